//! Writing what a strict relay accepts: header lines folded at whitespace
//! (RFC 5322 §2.2.3) and RFC 2047 encoded words where there is none or
//! where the text is not plain ASCII; body parts with CRLF line ends in
//! 7bit, quoted-printable or base64 (RFC 2045).
//!
//! Everything is written through [`Out`], once into a counter (so the
//! message's buffer is allocated at its exact size) and once for real.

use base64::Engine as _;

/// Lines are folded before they grow past this (RFC 5322 §2.1.1 "SHOULD").
pub const SOFT_LINE: usize = 78;
/// No line is ever longer than this, CRLF excluded (RFC 5322 "MUST").
pub const HARD_LINE: usize = 998;
/// Words up to this length are written as they are; longer ones are
/// encoded (an encoded word can be split anywhere). Leaves room for the
/// header name and a separator on the same line.
pub const MAX_PLAIN_WORD: usize = 900;
/// Raw bytes per RFC 2047 word: 45 bytes make 60 base64 characters, and
/// `=?utf-8?b?…?=` stays within the 75 characters RFC 2047 allows.
const ENCODED_WORD_BYTES: usize = 45;
/// Raw bytes per base64 line: 57 make a 76-character line (RFC 2045).
const BASE64_LINE_BYTES: usize = 57;
/// Quoted-printable lines are at most 76 characters, soft break included.
const QP_LINE: usize = 76;

/// Where encoded text goes: a string, or a counter of its length.
pub trait Out {
    /// Appends text.
    fn put(&mut self, text: &str);
    /// Appends `bytes` in base64, in lines of 76 characters ending in CRLF.
    fn put_base64_lines(&mut self, bytes: &[u8]);
}

impl Out for String {
    fn put(&mut self, text: &str) {
        self.push_str(text);
    }

    fn put_base64_lines(&mut self, bytes: &[u8]) {
        let engine = &base64::engine::general_purpose::STANDARD;
        for chunk in bytes.chunks(BASE64_LINE_BYTES) {
            engine.encode_string(chunk, self);
            self.push_str("\r\n");
        }
    }
}

/// Counts what would be written.
#[derive(Default)]
pub struct Counter(pub usize);

impl Out for Counter {
    fn put(&mut self, text: &str) {
        self.0 += text.len();
    }

    fn put_base64_lines(&mut self, bytes: &[u8]) {
        let full = bytes.len() / BASE64_LINE_BYTES;
        let rest = bytes.len() % BASE64_LINE_BYTES;
        self.0 += full * 78;
        if rest > 0 {
            self.0 += rest.div_ceil(3) * 4 + 2;
        }
    }
}

/// One header field being written: tokens separated by a space, folded
/// (CRLF + space) before a token that would take the line past
/// [`SOFT_LINE`]. Callers keep each token within [`MAX_PLAIN_WORD`] + a few
/// octets, so no line can pass [`HARD_LINE`].
pub struct HeaderWriter<'a, O: Out> {
    out: &'a mut O,
    line: usize,
    has_token: bool,
}

impl<'a, O: Out> HeaderWriter<'a, O> {
    /// Starts `Name:`.
    pub fn new(out: &'a mut O, name: &str) -> HeaderWriter<'a, O> {
        out.put(name);
        out.put(":");
        HeaderWriter {
            out,
            line: name.len() + 1,
            has_token: false,
        }
    }

    /// A token after a space, or after a fold when the line is full.
    pub fn word(&mut self, token: &str) {
        if self.has_token && self.line + 1 + token.len() > SOFT_LINE {
            self.out.put("\r\n ");
            self.line = 1;
        } else {
            self.out.put(" ");
            self.line += 1;
        }
        self.out.put(token);
        self.line += token.len();
        self.has_token = true;
    }

    /// Text glued to the previous token (no space, no fold), e.g. `,`.
    pub fn glue(&mut self, text: &str) {
        self.out.put(text);
        self.line += text.len();
    }

    /// Ends the field.
    pub fn finish(self) {
        self.out.put("\r\n");
    }
}

/// Whether text may go into a header as it is, split at its spaces:
/// printable ASCII, single spaces between words, none at either end, no
/// word too long, nothing a reader could take for an encoded word.
pub fn is_plain_header_text(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|byte| (0x20..0x7f).contains(&byte))
        && !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.contains("  ")
        && !text.contains("=?")
        && text.split(' ').all(|word| word.len() <= MAX_PLAIN_WORD)
}

/// RFC 2047 encoded words (`=?utf-8?b?…?=`) that together carry `text`
/// exactly: split at character boundaries, each at most 72 characters.
/// Readers join adjacent encoded words without the space between them.
pub fn encoded_words(text: &str) -> Vec<String> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut words = Vec::with_capacity(text.len() / ENCODED_WORD_BYTES + 1);
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(ENCODED_WORD_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        let mut word = String::with_capacity(12 + piece.len().div_ceil(3) * 4);
        word.push_str("=?utf-8?b?");
        engine.encode_string(piece.as_bytes(), &mut word);
        word.push_str("?=");
        words.push(word);
        rest = tail;
    }
    words
}

/// An unstructured field (Subject, custom headers): plain words folded at
/// spaces, or else encoded words.
pub fn unstructured<O: Out>(out: &mut O, name: &str, value: &str) {
    let mut writer = HeaderWriter::new(out, name);
    if value.is_empty() {
    } else if is_plain_header_text(value) {
        for word in value.split(' ') {
            writer.word(word);
        }
    } else {
        for word in encoded_words(value) {
            writer.word(&word);
        }
    }
    writer.finish();
}

/// RFC 5322 `atext`: what an atom in a display name may hold.
pub(super) fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        )
}

/// A display name as phrase tokens: atoms as they are, else one quoted
/// string, else encoded words (non-ASCII, control characters, too long).
pub fn phrase_tokens(name: &str) -> Vec<String> {
    if is_plain_header_text(name) && name.split(' ').all(|word| word.bytes().all(is_atext)) {
        return name.split(' ').map(str::to_string).collect();
    }
    if !name.is_empty()
        && name.len() <= MAX_PLAIN_WORD
        && name.bytes().all(|byte| (0x20..0x7f).contains(&byte))
        && !name.contains("=?")
    {
        let mut quoted = String::with_capacity(name.len() + 2);
        quoted.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        return vec![quoted];
    }
    encoded_words(name)
}

/// How a body part is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferEncoding {
    /// As it is: short CRLF lines of printable ASCII.
    SevenBit,
    /// Mostly ASCII text with some bytes to escape.
    QuotedPrintable,
    /// Anything else.
    Base64,
}

impl TransferEncoding {
    /// The `Content-Transfer-Encoding` value.
    pub fn name(self) -> &'static str {
        match self {
            TransferEncoding::SevenBit => "7bit",
            TransferEncoding::QuotedPrintable => "quoted-printable",
            TransferEncoding::Base64 => "base64",
        }
    }
}

/// The lines of a text, whatever its line ends (CRLF, LF or a lone CR):
/// each without its line end.
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(end) => {
                let skip = if current[end..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[end + skip..]);
                Some(&current[..end])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn is_seven_bit_byte(byte: u8) -> bool {
    (0x20..0x7f).contains(&byte) || byte == b'\t'
}

/// The encoding for a text part (after CRLF normalisation): 7bit when
/// every line is short printable ASCII, quoted-printable when few bytes
/// need escaping, base64 for mostly non-ASCII text.
pub fn text_encoding(text: &str) -> TransferEncoding {
    let mut escaped = 0usize;
    let mut long_line = false;
    for line in lines(text) {
        long_line |= line.len() > HARD_LINE;
        escaped += line
            .bytes()
            .filter(|&byte| !is_seven_bit_byte(byte))
            .count();
    }
    if escaped == 0 && !long_line {
        TransferEncoding::SevenBit
    } else if escaped * 3 > text.len() {
        TransferEncoding::Base64
    } else {
        TransferEncoding::QuotedPrintable
    }
}

/// Writes a text part's body in `encoding`, lines ending in CRLF. The
/// text's own line ends, whatever they were, become CRLF.
pub fn write_text<O: Out>(out: &mut O, text: &str, encoding: TransferEncoding) {
    match encoding {
        TransferEncoding::SevenBit => {
            for line in lines(text) {
                out.put(line);
                out.put("\r\n");
            }
        }
        TransferEncoding::QuotedPrintable => {
            for line in lines(text) {
                write_quoted_printable_line(out, line.as_bytes());
                out.put("\r\n");
            }
        }
        TransferEncoding::Base64 => {
            let mut normalised = Vec::with_capacity(text.len() + text.len() / 32);
            let mut first = true;
            for line in lines(text) {
                if !first {
                    normalised.extend_from_slice(b"\r\n");
                }
                first = false;
                normalised.extend_from_slice(line.as_bytes());
            }
            out.put_base64_lines(&normalised);
        }
    }
}

/// One line in quoted-printable, with soft line breaks (`=` CRLF) to keep
/// each output line within 76 characters. Space and tab are escaped at
/// the end of a line, where relays may strip them.
fn write_quoted_printable_line<O: Out>(out: &mut O, line: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut column = 0;
    let mut buffer = [0u8; 3];
    for (index, &byte) in line.iter().enumerate() {
        let last = index + 1 == line.len();
        let literal = match byte {
            b' ' | b'\t' => !last,
            b'=' => false,
            33..=126 => true,
            _ => false,
        };
        let token: &[u8] = if literal {
            buffer[0] = byte;
            &buffer[..1]
        } else {
            buffer = [b'=', HEX[(byte >> 4) as usize], HEX[(byte & 15) as usize]];
            &buffer[..3]
        };
        // Room for a soft break's `=` unless this is the line's last token.
        let limit = if last { QP_LINE } else { QP_LINE - 1 };
        if column + token.len() > limit {
            out.put("=\r\n");
            column = 0;
        }
        // The token is ASCII, so the conversion cannot fail.
        out.put(std::str::from_utf8(token).unwrap_or("="));
        column += token.len();
    }
}

/// Whether bytes may go as they are in a 7bit part and arrive unchanged:
/// printable ASCII and tabs in lines of at most 998 octets, each line
/// ended by CRLF (no bare CR or LF), no NUL.
pub fn is_seven_bit_crlf(bytes: &[u8]) -> bool {
    let mut line = 0;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\r' => {
                if bytes.get(index + 1) != Some(&b'\n') {
                    return false;
                }
                index += 2;
                line = 0;
                continue;
            }
            byte if is_seven_bit_byte(byte) => line += 1,
            _ => return false,
        }
        if line > HARD_LINE {
            return false;
        }
        index += 1;
    }
    true
}

/// RFC 2231 parameter value characters that need no percent-encoding.
fn is_attribute_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte)
}

/// `name="value"` when the value is short printable ASCII; else RFC 2231
/// `name*0*=utf-8''…` continuations (each segment a separate token, split
/// at character boundaries).
pub fn parameter_tokens(name: &str, value: &str) -> Vec<String> {
    if !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|byte| (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\')
        && !value.contains("=?")
    {
        return vec![format!("{name}=\"{value}\"")];
    }
    const SEGMENT: usize = 60;
    let mut segments: Vec<String> = vec![String::new()];
    for c in value.chars() {
        let mut encoded = String::new();
        let mut bytes = [0u8; 4];
        for &byte in c.encode_utf8(&mut bytes).as_bytes() {
            if is_attribute_char(byte) {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        let current = segments.last_mut().map_or(0, |segment| segment.len());
        if current + encoded.len() > SEGMENT {
            segments.push(String::new());
        }
        if let Some(segment) = segments.last_mut() {
            segment.push_str(&encoded);
        }
    }
    if segments.len() == 1 {
        return vec![format!("{name}*=utf-8''{}", segments[0])];
    }
    segments
        .iter()
        .enumerate()
        .map(|(index, segment)| {
            if index == 0 {
                format!("{name}*0*=utf-8''{segment}")
            } else {
                format!("{name}*{index}*={segment}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> String {
        let mut out = String::new();
        unstructured(&mut out, name, value);
        out
    }

    fn assert_lines_within_limits(text: &str) {
        for line in text.split("\r\n") {
            assert!(line.len() <= HARD_LINE, "line of {}: {line}", line.len());
            assert!(!line.contains(['\r', '\n']), "bare CR/LF in {line:?}");
        }
    }

    #[test]
    fn plain_text_is_folded_at_spaces() {
        let value = "word ".repeat(60);
        let value = value.trim_end();
        let out = header("Subject", value);
        assert_lines_within_limits(&out);
        assert!(out.lines().count() > 3, "{out}");
        assert!(out.split("\r\n").all(|line| line.len() <= SOFT_LINE));
        assert_eq!(
            out.replace("\r\n", "").trim_end(),
            format!("Subject: {value}")
        );
    }

    #[test]
    fn long_words_and_non_ascii_are_encoded() {
        let out = header("Subject", &"x".repeat(2000));
        assert_lines_within_limits(&out);
        assert!(out.contains("=?utf-8?b?"));
        let out = header("Subject", "Grüße");
        assert_eq!(out, "Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n");
        for word in encoded_words(&"ü✓".repeat(100)) {
            assert!(word.len() <= 75, "{word}");
        }
    }

    #[test]
    fn phrases() {
        assert_eq!(phrase_tokens("John Smith"), vec!["John", "Smith"]);
        assert_eq!(phrase_tokens("John Q. Smith"), vec!["\"John Q. Smith\""]);
        assert_eq!(phrase_tokens("a \"b\""), vec!["\"a \\\"b\\\"\""]);
        assert!(phrase_tokens("Zoë")[0].starts_with("=?utf-8?b?"));
        assert!(phrase_tokens(&"n".repeat(1200)).len() > 20);
    }

    #[test]
    fn line_ends_are_normalised() {
        assert_eq!(
            lines("a\r\nb\nc\rd\r\n").collect::<Vec<_>>(),
            vec!["a", "b", "c", "d", ""]
        );
        let mut out = String::new();
        write_text(
            &mut out,
            "hi\r.\r\nMAIL FROM:<x>",
            TransferEncoding::SevenBit,
        );
        assert_eq!(out, "hi\r\n.\r\nMAIL FROM:<x>\r\n");
    }

    #[test]
    fn encodings_are_chosen_and_counted_exactly() {
        assert_eq!(text_encoding("hello\nworld"), TransferEncoding::SevenBit);
        assert_eq!(
            text_encoding("nul\0here"),
            TransferEncoding::QuotedPrintable
        );
        assert_eq!(
            text_encoding("Viele Grüße aus Köln, bis bald"),
            TransferEncoding::QuotedPrintable
        );
        assert_eq!(text_encoding("日本語のテキスト"), TransferEncoding::Base64);
        assert_eq!(
            text_encoding(&"y".repeat(1200)),
            TransferEncoding::QuotedPrintable
        );
        for text in ["a\0b = c \t\nnext", "日本語\r\nx", &"q=".repeat(500), ""] {
            for encoding in [
                TransferEncoding::SevenBit,
                TransferEncoding::QuotedPrintable,
                TransferEncoding::Base64,
            ] {
                let mut out = String::new();
                let mut counter = Counter::default();
                write_text(&mut out, text, encoding);
                write_text(&mut counter, text, encoding);
                assert_eq!(out.len(), counter.0, "{encoding:?} {text:?}");
                if encoding != TransferEncoding::SevenBit {
                    assert_lines_within_limits(&out);
                    assert!(out.is_ascii());
                }
            }
        }
        let mut out = String::new();
        write_text(&mut out, "a\0b=c \n", TransferEncoding::QuotedPrintable);
        assert_eq!(out, "a=00b=3Dc=20\r\n\r\n");
        let mut out = String::new();
        write_text(
            &mut out,
            &"z".repeat(100),
            TransferEncoding::QuotedPrintable,
        );
        assert!(out.split("\r\n").all(|line| line.len() <= QP_LINE), "{out}");
    }

    #[test]
    fn seven_bit_crlf_detection() {
        assert!(is_seven_bit_crlf(b"a\r\n.\r\nb"));
        assert!(!is_seven_bit_crlf(b"a\n.\nb"));
        assert!(!is_seven_bit_crlf(b"a\rb"));
        assert!(!is_seven_bit_crlf(b"a\0b"));
        assert!(!is_seven_bit_crlf(&[b'x'; 999]));
        assert!(!is_seven_bit_crlf("é".as_bytes()));
    }

    #[test]
    fn parameters() {
        assert_eq!(
            parameter_tokens("filename", "a.txt"),
            vec!["filename=\"a.txt\""]
        );
        assert_eq!(
            parameter_tokens("filename", "ä.txt"),
            vec!["filename*=utf-8''%C3%A4.txt"]
        );
        let long = parameter_tokens("filename", &"ü".repeat(40));
        assert!(long.len() > 1);
        assert!(long[1].starts_with("filename*1*="));
        assert!(long.iter().all(|token| token.len() < 80));
    }
}
