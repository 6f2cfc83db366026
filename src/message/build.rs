//! The one place where a validated request becomes wire bytes.
//!
//! MIME is assembled here rather than with lettre's builder, which (0.11)
//! writes long words and address lists unfolded, picks `7bit` for text
//! with bare LF or NUL, and turns a non-ASCII domain in `Message-ID` into
//! an encoded word. The message is written twice through
//! [`encode::Out`]: once to count its length, once into a buffer of exactly
//! that size, so building holds little more than the request and the
//! result.

use std::borrow::Cow;
use std::time::SystemTime;

use super::address::{is_address_header, parse_mailbox, parse_mailbox_list, Mailbox};
use super::encode::{
    self, is_seven_bit_crlf, parameter_tokens, phrase_tokens, text_encoding, write_text, Counter,
    HeaderWriter, Out, TransferEncoding,
};
use super::{random_u64, sender_allowed, MailRequest, MessageError, OutgoingMessage};
use crate::config::SenderRule;

/// Headers the service sets itself, or that relays and receiving MTAs set
/// (`Return-Path`, `Received`); a client may not supply them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "return-path",
    "received",
];

/// The longest attachment `content_type` accepted.
const MAX_CONTENT_TYPE: usize = 200;

/// A custom header, checked.
enum CustomHeader<'a> {
    Addresses(&'a str, Vec<Mailbox>),
    Text(&'a str, &'a str),
}

/// A MIME body part.
enum Node<'a> {
    Leaf {
        content_type: &'a str,
        parameters: Vec<String>,
        disposition: Option<Vec<String>>,
        encoding: TransferEncoding,
        body: LeafBody<'a>,
    },
    Multi {
        subtype: &'static str,
        children: Vec<Node<'a>>,
    },
}

enum LeafBody<'a> {
    /// Text whose line ends become CRLF.
    Text(&'a str),
    /// Bytes carried exactly.
    Bytes(&'a [u8]),
}

/// Validates `request` and builds the message `id`, dated `date`.
pub(super) fn build(
    request: &MailRequest,
    id: String,
    allowed_senders: Option<&[SenderRule]>,
    date: SystemTime,
) -> Result<OutgoingMessage, MessageError> {
    let sender = parse_mailbox("sender", &request.sender)?;
    if let Some(rules) = allowed_senders {
        if !sender_allowed(&sender, rules) {
            return Err(MessageError::SenderNotAllowed {
                sender: sender.unicode_address(),
            });
        }
    }
    if request.subject.contains(['\r', '\n']) {
        return Err(MessageError::HeaderInjection {
            field: "subject".into(),
        });
    }
    let mut recipients: Vec<String> = Vec::new();
    let mut add_recipient = |mailbox: &Mailbox| {
        let address = mailbox.address();
        if !recipients
            .iter()
            .any(|known| known.eq_ignore_ascii_case(&address))
        {
            recipients.push(address);
        }
    };
    let mut to = Vec::with_capacity(request.receiver.len() + request.to.len());
    for (field, list) in [("receiver", &request.receiver), ("to", &request.to)] {
        for (index, text) in list.iter().enumerate() {
            let mailbox = parse_mailbox(&indexed(field, index, list.len()), text)?;
            add_recipient(&mailbox);
            to.push(mailbox);
        }
    }
    let mut cc = Vec::with_capacity(request.cc.len());
    for (index, text) in request.cc.iter().enumerate() {
        let mailbox = parse_mailbox(&indexed("cc", index, request.cc.len()), text)?;
        add_recipient(&mailbox);
        cc.push(mailbox);
    }
    for (index, text) in request.bcc.iter().enumerate() {
        // Bcc goes only into the envelope, never into a header.
        let mailbox = parse_mailbox(&indexed("bcc", index, request.bcc.len()), text)?;
        add_recipient(&mailbox);
    }
    if recipients.is_empty() {
        return Err(MessageError::NoRecipients);
    }
    let reply_to = request
        .reply_to
        .as_deref()
        .map(|text| parse_mailbox("reply_to", text))
        .transpose()?;
    let custom = request
        .headers
        .iter()
        .map(|(name, value)| custom_header(request, name, value))
        .collect::<Result<Vec<_>, _>>()?;
    let body = body(request)?;

    let date = crate::time::rfc5322_date(date);
    let message_id = format!("<{id}@{}>", sender.domain);
    let boundary = boundary_for(&body);
    let parts = Parts {
        sender: &sender,
        to: &to,
        cc: &cc,
        reply_to: reply_to.as_ref(),
        subject: &request.subject,
        date: &date,
        message_id: &message_id,
        custom: &custom,
        body: &body,
        boundary: &boundary,
    };
    // Small ones are written once into room for them and trimmed after
    // (counting first cost as much as writing); large ones are counted
    // first, so that their size is never held twice while written.
    let capacity = small_estimate(request).unwrap_or_else(|| {
        let mut counter = Counter::default();
        parts.write(&mut counter);
        counter.0
    });
    let mut content = String::with_capacity(capacity);
    parts.write(&mut content);
    // The last line's CRLF is written by the transport, before the final
    // `.` (RFC 5321 §4.1.1.4), and by the outbox at the end of the file.
    if content.ends_with("\r\n") {
        content.truncate(content.len() - 2);
    }
    // A queued message keeps this allocation for as long as it waits.
    content.shrink_to_fit();
    Ok(OutgoingMessage {
        id,
        envelope_from: sender.address(),
        recipients,
        content,
    })
}

/// Texts up to this size (and no attachments) are built in one pass.
const SMALL_TEXT: usize = 64 * 1024;

/// Room for a message without attachments whose texts are small: twice
/// what the client sent (encodings expand, headers fold) and 1 KiB for the
/// headers we add. `None` for the others.
fn small_estimate(request: &MailRequest) -> Option<usize> {
    if !request.attachments.is_empty() {
        return None;
    }
    let addresses = [&request.receiver, &request.to, &request.cc]
        .into_iter()
        .flatten()
        .chain(request.reply_to.as_ref())
        .chain(std::iter::once(&request.sender))
        .map(String::len);
    let custom = request
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len());
    let texts = [request.message.as_deref(), request.html.as_deref()]
        .into_iter()
        .flatten()
        .chain(std::iter::once(request.subject.as_str()))
        .map(str::len);
    let total: usize = addresses.chain(custom).chain(texts).sum();
    (total <= SMALL_TEXT).then_some(2 * total + 1024)
}

/// Everything that goes into the message, checked.
struct Parts<'a> {
    sender: &'a Mailbox,
    to: &'a [Mailbox],
    cc: &'a [Mailbox],
    reply_to: Option<&'a Mailbox>,
    subject: &'a str,
    date: &'a str,
    message_id: &'a str,
    custom: &'a [CustomHeader<'a>],
    body: &'a Node<'a>,
    boundary: &'a str,
}

impl Parts<'_> {
    fn write<O: Out>(&self, out: &mut O) {
        address_header(out, "From", std::slice::from_ref(self.sender));
        if !self.to.is_empty() {
            address_header(out, "To", self.to);
        }
        if !self.cc.is_empty() {
            address_header(out, "Cc", self.cc);
        }
        if let Some(reply_to) = self.reply_to {
            address_header(out, "Reply-To", std::slice::from_ref(reply_to));
        }
        encode::unstructured(out, "Subject", self.subject);
        let mut date = HeaderWriter::new(out, "Date");
        for word in self.date.split(' ') {
            date.word(word);
        }
        date.finish();
        let mut message_id = HeaderWriter::new(out, "Message-ID");
        message_id.word(self.message_id);
        message_id.finish();
        for header in self.custom {
            match header {
                CustomHeader::Addresses(name, mailboxes) => address_header(out, name, mailboxes),
                CustomHeader::Text(name, value) => encode::unstructured(out, name, value),
            }
        }
        out.put("MIME-Version: 1.0\r\n");
        write_node(out, self.body, self.boundary, 0);
    }
}

/// An address list, folded between addresses (and between the words of
/// long display names).
fn address_header<O: Out>(out: &mut O, name: &str, mailboxes: &[Mailbox]) {
    let mut writer = HeaderWriter::new(out, name);
    let mut address = String::new();
    for (index, mailbox) in mailboxes.iter().enumerate() {
        address.clear();
        let named = mailbox.name.is_some();
        if named {
            address.push('<');
        }
        address.push_str(&mailbox.local);
        address.push('@');
        address.push_str(&mailbox.domain);
        if named {
            address.push('>');
        }
        for token in mailbox
            .name
            .iter()
            .flat_map(|display| phrase_tokens(display))
        {
            writer.word(&token);
        }
        writer.word(&address);
        if index + 1 < mailboxes.len() {
            writer.glue(",");
        }
    }
    writer.finish();
}

/// The boundary of the multipart at `depth`.
fn nested_boundary(boundary: &str, depth: usize) -> String {
    format!("{boundary}_{depth}")
}

/// Writes a part's headers (Content-*), the blank line and its body.
fn write_node<O: Out>(out: &mut O, node: &Node<'_>, boundary: &str, depth: usize) {
    match node {
        Node::Leaf {
            content_type,
            parameters,
            disposition,
            encoding,
            body,
        } => {
            let mut header = HeaderWriter::new(out, "Content-Type");
            header.word(content_type);
            for parameter in parameters {
                header.glue(";");
                header.word(parameter);
            }
            header.finish();
            out.put("Content-Transfer-Encoding: ");
            out.put(encoding.name());
            out.put("\r\n");
            if let Some(tokens) = disposition {
                let mut header = HeaderWriter::new(out, "Content-Disposition");
                header.word("attachment");
                for token in tokens {
                    header.glue(";");
                    header.word(token);
                }
                header.finish();
            }
            out.put("\r\n");
            match (body, encoding) {
                (LeafBody::Text(text), _) => write_text(out, text, *encoding),
                (LeafBody::Bytes(bytes), TransferEncoding::Base64) => out.put_base64_lines(bytes),
                (LeafBody::Bytes(bytes), _) => {
                    // Only 7-bit CRLF text gets here (see `attachment`).
                    out.put(std::str::from_utf8(bytes).unwrap_or_default());
                    out.put("\r\n");
                }
            }
        }
        Node::Multi { subtype, children } => {
            let own = nested_boundary(boundary, depth);
            let mut header = HeaderWriter::new(out, "Content-Type");
            header.word(&format!("multipart/{subtype}"));
            header.glue(";");
            header.word(&format!("boundary=\"{own}\""));
            header.finish();
            out.put("\r\n");
            for child in children {
                out.put("--");
                out.put(&own);
                out.put("\r\n");
                write_node(out, child, boundary, depth + 1);
            }
            out.put("--");
            out.put(&own);
            out.put("--\r\n");
        }
    }
}

/// A boundary found in no 7bit part (base64 and quoted-printable output
/// never hold `=_`).
fn boundary_for(body: &Node<'_>) -> String {
    if matches!(body, Node::Leaf { .. }) {
        // A single part has no boundary.
        return String::new();
    }
    loop {
        let mut boundary = String::with_capacity(27);
        boundary.push_str("=_mailroom_");
        super::push_hex(&mut boundary, random_u64(), 16);
        if !appears_in(body, boundary.as_bytes()) {
            return boundary;
        }
    }
}

fn appears_in(node: &Node<'_>, needle: &[u8]) -> bool {
    match node {
        Node::Leaf {
            encoding: TransferEncoding::SevenBit,
            body,
            ..
        } => {
            let haystack = match body {
                LeafBody::Text(text) => text.as_bytes(),
                LeafBody::Bytes(bytes) => bytes,
            };
            haystack
                .windows(needle.len())
                .any(|window| window == needle)
        }
        Node::Leaf { .. } => false,
        Node::Multi { children, .. } => children.iter().any(|child| appears_in(child, needle)),
    }
}

fn text_leaf<'a>(content_type: &'a str, text: &'a str) -> Node<'a> {
    Node::Leaf {
        content_type,
        parameters: vec!["charset=utf-8".into()],
        disposition: None,
        encoding: text_encoding(text),
        body: LeafBody::Text(text),
    }
}

fn body(request: &MailRequest) -> Result<Node<'_>, MessageError> {
    let main = match (request.message.as_deref(), request.html.as_deref()) {
        (Some(text), Some(html)) => Node::Multi {
            subtype: "alternative",
            children: vec![text_leaf("text/plain", text), text_leaf("text/html", html)],
        },
        (None, Some(html)) => text_leaf("text/html", html),
        (text, None) => text_leaf("text/plain", text.unwrap_or_default()),
    };
    if request.attachments.is_empty() {
        return Ok(main);
    }
    let mut children = Vec::with_capacity(request.attachments.len() + 1);
    children.push(main);
    for (index, attachment) in request.attachments.iter().enumerate() {
        children.push(attachment_leaf(index, attachment)?);
    }
    Ok(Node::Multi {
        subtype: "mixed",
        children,
    })
}

fn attachment_leaf(
    index: usize,
    attachment: &super::AttachmentRequest,
) -> Result<Node<'_>, MessageError> {
    let invalid = |reason: String| MessageError::InvalidAttachment { index, reason };
    if attachment.filename.trim().is_empty() {
        return Err(invalid("`filename` must not be empty".into()));
    }
    if attachment.filename.contains(['\r', '\n', '\0']) {
        return Err(invalid("`filename` must not contain CR, LF or NUL".into()));
    }
    let content_type = attachment.content_type.trim();
    let not_a_type = || {
        invalid(format!(
            "`content_type` {:?} is not a MIME type",
            attachment.content_type
        ))
    };
    if content_type.len() > MAX_CONTENT_TYPE {
        return Err(invalid(format!(
            "`content_type` is longer than {MAX_CONTENT_TYPE} characters"
        )));
    }
    if !content_type
        .bytes()
        .all(|byte| (0x20..0x7f).contains(&byte))
    {
        return Err(not_a_type());
    }
    lettre::message::header::ContentType::parse(content_type).map_err(|_| not_a_type())?;
    // Text that is 7-bit with CRLF line ends goes as it is and arrives
    // unchanged; anything else in base64, so every byte arrives exactly.
    let is_text = content_type
        .get(..5)
        .is_some_and(|kind| kind.eq_ignore_ascii_case("text/"));
    let encoding = if is_text && is_seven_bit_crlf(&attachment.content) {
        TransferEncoding::SevenBit
    } else {
        TransferEncoding::Base64
    };
    Ok(Node::Leaf {
        content_type,
        parameters: Vec::new(),
        disposition: Some(parameter_tokens("filename", &attachment.filename)),
        encoding,
        body: LeafBody::Bytes(&attachment.content),
    })
}

fn custom_header<'a>(
    request: &MailRequest,
    name: &'a str,
    value: &'a str,
) -> Result<CustomHeader<'a>, MessageError> {
    let invalid = |reason: &str| MessageError::InvalidHeader {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    // RFC 5322 field name: printable ASCII except ':'.
    if name.is_empty()
        || name.len() > 76
        || !name
            .bytes()
            .all(|byte| (33..=126).contains(&byte) && byte != b':')
    {
        return Err(invalid(
            "not a valid header field name (printable ASCII without ':')",
        ));
    }
    if value.contains(['\r', '\n']) {
        return Err(invalid(
            "the value must not contain CR or LF (header injection)",
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "return-path" || lower == "received" {
        return Err(invalid(
            "set by relays and receiving servers, not by the sender",
        ));
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("content-") {
        return Err(invalid(
            "set by the service itself; use the request's own fields",
        ));
    }
    if lower == "reply-to" && request.reply_to.is_some() {
        return Err(invalid("given twice: also in the `reply_to` field"));
    }
    if is_address_header(name) {
        return Ok(CustomHeader::Addresses(
            name,
            parse_mailbox_list(name, value)?,
        ));
    }
    Ok(CustomHeader::Text(name, value))
}

fn indexed(field: &'static str, index: usize, length: usize) -> Cow<'static, str> {
    if length > 1 || field != "receiver" {
        Cow::Owned(format!("{field}[{index}]"))
    } else {
        Cow::Borrowed(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_json(json: &str) -> OutgoingMessage {
        MailRequest::from_json(json.as_bytes())
            .unwrap()
            .build(None)
            .unwrap()
    }

    fn assert_strict(message: &OutgoingMessage) {
        let content = &message.content;
        assert!(
            !content.ends_with("\r\n"),
            "the transport ends the last line"
        );
        for line in content.split("\r\n") {
            assert!(line.len() <= 998, "line of {} octets", line.len());
            assert!(
                !line.contains(['\r', '\n', '\0']),
                "bare CR/LF/NUL: {line:?}"
            );
        }
    }

    #[test]
    fn long_headers_are_folded_or_encoded() {
        let to: Vec<String> = (0..50).map(|i| format!("user{i}@example.org")).collect();
        let json = serde_json::json!({
            "sender": format!("{} <app@example.com>", "N".repeat(1200)),
            "to": to,
            "subject": "s".repeat(995),
            "headers": {"X-Long": "v".repeat(3000), "X-Words": "word ".repeat(400).trim_end()},
            "message": "hi",
        });
        let message = build_json(&json.to_string());
        assert_strict(&message);
        assert!(message.content.is_ascii());
        assert_eq!(message.recipients.len(), 50);
    }

    #[test]
    fn idna_and_message_id() {
        let message = build_json(
            r#"{"sender":"App <app@bücher.de>","receiver":"user@bücher.de","subject":"x"}"#,
        );
        assert_eq!(message.envelope_from, "app@xn--bcher-kva.de");
        assert_eq!(message.recipients, vec!["user@xn--bcher-kva.de"]);
        assert!(message
            .content
            .contains(&format!("Message-ID: <{}@xn--bcher-kva.de>", message.id)));
        assert!(message.content.is_ascii());
        assert!(!message.needs_smtputf8());
        let message =
            build_json(r#"{"sender":"a@b.c","receiver":"jörg@example.com","subject":"x"}"#);
        assert!(message.needs_smtputf8());
    }

    #[test]
    fn bodies_have_only_crlf_and_attachments_are_encoded() {
        let json = serde_json::json!({
            "sender": "a@b.c", "receiver": "d@e.f", "subject": "x",
            "message": "hi\r.\r\nMAIL FROM:<evil@example.net>\nnul\0here\rend",
            "attachments": [
                {"filename": "a.txt", "content_type": "text/plain", "content": "YQouCmI="},
                {"filename": "crlf.txt", "content_type": "text/plain", "content": "YQ0KLg0KYg=="},
            ],
        });
        let message = build_json(&json.to_string());
        assert_strict(&message);
        assert!(message
            .content
            .contains("Content-Transfer-Encoding: quoted-printable"));
        assert!(message.content.contains("nul=00here"));
        assert!(
            message.content.contains("YQouCmI="),
            "bare-LF text in base64"
        );
        assert!(
            message.content.contains("a\r\n.\r\nb\r\n"),
            "CRLF text as it is"
        );
    }

    #[test]
    fn address_headers_in_headers_are_checked() {
        let bad = MailRequest::from_json(
            br#"{"sender":"a@b.c","receiver":"d@e.f","subject":"x","headers":{"Reply-To":"nope"}}"#,
        )
        .unwrap()
        .build(None)
        .unwrap_err();
        assert!(bad.to_string().contains("Reply-To"), "{bad}");
        let good = build_json(
            r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"x","headers":{"Reply-To":"Zoë <z@bücher.de>, b@c.d"}}"#,
        );
        assert!(
            good.content.contains("<z@xn--bcher-kva.de>, b@c.d\r\n"),
            "{}",
            good.content
        );
    }
}
