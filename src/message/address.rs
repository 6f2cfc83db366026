//! Mailboxes as clients write them (`a@b.c`, `Name <a@b.c>`), parsed with
//! lettre's RFC 5322 parser and put in the form that goes on the wire:
//! the domain in IDNA (punycode) form, a non-ASCII local part kept as
//! UTF-8 (it needs SMTPUTF8, RFC 6531).

use super::encode::is_atext;
use super::MessageError;
use crate::domain::comparable_domain;

/// The longest address accepted, in octets (RFC 5321 §4.5.3.1.3: a path
/// is at most 256 octets with its angle brackets).
pub const MAX_ADDRESS_OCTETS: usize = 254;

/// One parsed mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mailbox {
    /// Display name, decoded (no quotes or encoded words).
    pub name: Option<String>,
    /// Local part as given (UTF-8 allowed).
    pub local: String,
    /// Domain in ASCII: IDNA A-labels, or an address literal.
    pub domain: String,
    /// Domain as given.
    pub unicode_domain: String,
}

impl Mailbox {
    /// `local@domain`, the domain in ASCII: the envelope form.
    pub fn address(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }

    /// `local@domain` with the domain as the client wrote it.
    pub fn unicode_address(&self) -> String {
        format!("{}@{}", self.local, self.unicode_domain)
    }
}

/// `local@domain` as addresses are compared (suppression list, list
/// filter): the domain in IDNA form and lower case, so `x@Bücher.example`
/// and `x@xn--bcher-kva.example` are the same address; the local part as
/// given (its case may matter, RFC 5321 §2.4).
pub(crate) fn comparable_address(address: &str) -> String {
    let address = address.trim();
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", comparable_domain(domain)),
        None => address.to_string(),
    }
}

/// Header fields whose values are lists of mailboxes, other than those the
/// service sets itself; given in `headers`, they are parsed and written
/// like the service's own address headers.
const ADDRESS_HEADERS: &[&str] = &[
    "reply-to",
    "sender",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "disposition-notification-to",
    "mail-followup-to",
    "mail-reply-to",
    "errors-to",
    "return-receipt-to",
];

/// Headers of which RFC 5322 allows exactly one mailbox.
const SINGLE_MAILBOX_HEADERS: &[&str] = &["sender", "resent-sender"];

/// Whether a header field (any case) carries addresses.
pub fn is_address_header(name: &str) -> bool {
    ADDRESS_HEADERS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(name))
}

/// Whether a header field (any case) holds exactly one mailbox.
pub(crate) fn is_single_mailbox_header(name: &str) -> bool {
    SINGLE_MAILBOX_HEADERS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(name))
}

/// Parses one mailbox from field `field`.
pub(crate) fn parse_mailbox(field: &str, value: &str) -> Result<Mailbox, MessageError> {
    let invalid = |reason: String| MessageError::InvalidAddress {
        field: field.to_string(),
        value: value.to_string(),
        reason,
    };
    if value.contains(['\r', '\n']) {
        return Err(MessageError::HeaderInjection {
            field: field.to_string(),
        });
    }
    let text = value.trim();
    if let Some(mailbox) = plain_address(text).or_else(|| plain_named(text)) {
        return Ok(mailbox);
    }
    let parsed: lettre::message::Mailbox = text
        .parse()
        .map_err(|error: lettre::address::AddressError| invalid(error.to_string()))?;
    // lettre's parser stops after the first mailbox; refuse anything it left.
    if !text.ends_with('>') && !text.ends_with(AsRef::<str>::as_ref(&parsed.email)) {
        return Err(invalid("unexpected text after the address".into()));
    }
    if text.ends_with('>') && count_unquoted(text, '<') != 1 {
        return Err(invalid("expected one address in <angle brackets>".into()));
    }
    from_lettre(parsed).map_err(invalid)
}

/// The longest local part (RFC 5321 §4.5.3.1.1).
const MAX_LOCAL_OCTETS: usize = 64;

/// `text` as a mailbox when it is a bare ASCII address of the plainest
/// form, `dot.atom@host.name` (what nearly every client sends): the same
/// mailbox lettre's parser gives for it, in a fraction of the time (the
/// parser was ~3% of an accepted request's CPU). `None` for anything else,
/// which then goes through lettre.
fn plain_address(text: &str) -> Option<Mailbox> {
    if text.len() > MAX_ADDRESS_OCTETS {
        return None;
    }
    let (local, domain) = text.split_once('@')?;
    // RFC 5321's 64 octets, which lettre enforces too.
    let local_ok = local.len() <= MAX_LOCAL_OCTETS
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext));
    let domain_ok = domain.split('.').all(|label| {
        let bytes = label.as_bytes();
        (1..=63).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    });
    (local_ok && domain_ok).then(|| Mailbox {
        name: None,
        local: local.to_string(),
        domain: domain.to_string(),
        unicode_domain: domain.to_string(),
    })
}

/// `text` as a mailbox when it is `Name <address>` with a name of plain
/// words (ASCII letters and digits, single spaces between them) and a
/// [`plain_address`]: what lettre's parser gives for it, without the
/// parser (the seed's `App <app@example.com>` form). `None` for anything
/// else.
fn plain_named(text: &str) -> Option<Mailbox> {
    let (name, rest) = text.split_once(" <")?;
    let address = rest.strip_suffix('>')?;
    let words_ok = name
        .split(' ')
        .all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !words_ok {
        return None;
    }
    let mut mailbox = plain_address(address)?;
    mailbox.name = Some(name.to_string());
    Some(mailbox)
}

/// Parses a comma-separated list of mailboxes (a custom address header).
pub(crate) fn parse_mailbox_list(header: &str, value: &str) -> Result<Vec<Mailbox>, MessageError> {
    let invalid = |reason: String| MessageError::InvalidHeader {
        name: header.to_string(),
        reason,
    };
    if value.trim().is_empty() {
        return Err(invalid("expected one or more addresses".into()));
    }
    let parsed: lettre::message::Mailboxes =
        value
            .trim()
            .parse()
            .map_err(|error: lettre::address::AddressError| {
                invalid(format!("not a list of addresses: {error}"))
            })?;
    let mailboxes: Vec<Mailbox> = parsed
        .into_iter()
        .map(from_lettre)
        .collect::<Result<_, _>>()
        .map_err(|reason| invalid(format!("invalid address: {reason}")))?;
    // lettre's list parser stops at the first thing it cannot read: make
    // sure every address written is one we return.
    let written = count_unquoted(value, '@');
    if mailboxes.is_empty() || written != mailboxes.len() {
        return Err(invalid(
            "not a list of addresses (`a@b.c` or `Name <a@b.c>`, separated by commas)".into(),
        ));
    }
    if is_single_mailbox_header(header) && mailboxes.len() != 1 {
        return Err(invalid("takes exactly one address".into()));
    }
    Ok(mailboxes)
}

/// How often `wanted` occurs outside quoted strings.
fn count_unquoted(text: &str, wanted: char) -> usize {
    let mut count = 0;
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == wanted && !quoted => count += 1,
            _ => {}
        }
    }
    count
}

fn from_lettre(parsed: lettre::message::Mailbox) -> Result<Mailbox, String> {
    let local = parsed.email.user().to_string();
    let unicode_domain = parsed.email.domain().to_string();
    let domain = if unicode_domain.is_ascii() {
        unicode_domain.clone()
    } else {
        idna::domain_to_ascii(&unicode_domain)
            .map_err(|_| format!("the domain {unicode_domain:?} has no IDNA form"))?
    };
    let name = parsed.name.filter(|name| !name.trim().is_empty());
    if let Some(name) = &name {
        if name.chars().any(char::is_control) {
            return Err("the display name must not contain control characters".into());
        }
    }
    let mailbox = Mailbox {
        name,
        local,
        domain,
        unicode_domain,
    };
    let octets = mailbox.address().len();
    if octets > MAX_ADDRESS_OCTETS {
        return Err(format!(
            "an address has at most {MAX_ADDRESS_OCTETS} octets, this one {octets}"
        ));
    }
    Ok(mailbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_become_punycode_and_local_parts_stay() {
        let mailbox = parse_mailbox("to", "Zoë <user@bücher.de>").unwrap();
        assert_eq!(mailbox.address(), "user@xn--bcher-kva.de");
        assert_eq!(mailbox.name.as_deref(), Some("Zoë"));
        let mailbox = parse_mailbox("to", "jörg@example.com").unwrap();
        assert_eq!(mailbox.address(), "jörg@example.com");
        assert_eq!(
            parse_mailbox("to", "a@Example.COM").unwrap().address(),
            "a@Example.COM"
        );
    }

    #[test]
    fn addresses_compare_by_the_idna_form_of_their_domain() {
        for same in [
            "x@Bücher.example",
            " x@xn--bcher-kva.EXAMPLE",
            "x@BÜCHER.example",
        ] {
            assert_eq!(
                comparable_address(same),
                "x@xn--bcher-kva.example",
                "{same:?}"
            );
        }
        assert_eq!(comparable_address("Ops@Example.COM"), "Ops@example.com");
        assert_eq!(comparable_address("no-at-sign"), "no-at-sign");
    }

    #[test]
    fn trailing_text_and_lists_are_refused() {
        for bad in [
            "a@b.c d@e.f",
            "a@b.c, d@e.f",
            "A <a@b.c> x",
            "A <a@b.c> <d@e.f>",
            "not an address",
            "",
        ] {
            assert!(parse_mailbox("to", bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(parse_mailbox("to", &long).is_err());
    }

    /// The plain fast path gives exactly what lettre's parser gives, and
    /// leaves to it everything it does not take.
    #[test]
    fn plain_addresses_parse_as_lettre_parses_them() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let through_lettre = |text: &str| -> Option<Mailbox> {
            let parsed: lettre::message::Mailbox = text.parse().ok()?;
            from_lettre(parsed).ok()
        };
        let examples = [
            "a@b.c",
            "first.last+tag@mail.example.com",
            "x!#$%&'*+-/=?^_`{|}~@a-b.c0",
            "a@localhost",
            "a.@b.c",
            ".a@b.c",
            "a..b@b.c",
            "a@b..c",
            "a@-b.c",
            "a@b-.c",
            "a@b.c.",
            "a@@b.c",
            "@b.c",
            "a@",
            "a b@c.d",
            "\"a\"@b.c",
            "a@[127.0.0.1]",
            "a@b_c.d",
            "a@1.2.3.4",
            "a@b.123",
        ];
        let named = [
            "App <app@example.com>",
            "John Doe <john.doe@example.org>",
            "A1 b2 C3 <x@y.z>",
            "John  Doe <a@b.c>",
            " John <a@b.c>",
            "John <a@b.c> ",
            "John <a@b.c>>",
            "John<a@b.c>",
            "J.R. <a@b.c>",
            "Jöhn <a@b.c>",
            "\"John\" <a@b.c>",
            "John <<a@b.c>",
            "John <a@b..c>",
            "<a@b.c>",
        ];
        for text in examples.iter().chain(&named) {
            for fast in [plain_address(text), plain_named(text)]
                .into_iter()
                .flatten()
            {
                assert_eq!(Some(fast), through_lettre(text), "{text:?}");
            }
        }
        assert!(plain_named("App <app@example.com>").is_some());
        assert!(plain_named("John  Doe <a@b.c>").is_none());
        assert!(plain_address("first.last+tag@mail.example.com").is_some());
        assert!(plain_address(&format!("{}@example.com", "a".repeat(250))).is_none());
        let long_label = format!("a@{}.com", "b".repeat(64));
        assert!(plain_address(&long_label).is_none());
        for local in [64, 65] {
            let bare = format!("{}@example.com", "a".repeat(local));
            let named = format!("App <{bare}>");
            assert_eq!(plain_address(&bare).is_some(), local == 64, "{bare}");
            assert_eq!(plain_named(&named).is_some(), local == 64, "{named}");
            assert_eq!(through_lettre(&bare).is_some(), local == 64, "{bare}");
            assert!(parse_mailbox("receiver", &named).is_ok() == (local == 64));
        }
        // Addresses built from pieces that are mostly valid in a local part
        // or a domain, with the characters that matter to either grammar.
        let pieces = || {
            let valid = prop::sample::select(vec!["a", "Z", "0", "9", "ab", "c9", "xn--", "."]);
            let any = prop::sample::select(vec![
                "-", "_", "+", "!", "~", "`", "'", "\"", " ", "(", ")", "<", ">", "[", "]", ":",
                ",", "\\", "é", "@", "\t",
            ]);
            let piece = prop_oneof![6 => valid, 1 => any];
            prop::collection::vec(piece, 1..12).prop_map(|pieces| pieces.concat())
        };
        let address = (pieces(), pieces()).prop_map(|(local, domain)| format!("{local}@{domain}"));
        // Half of them with a display name of the same kind of pieces.
        let text = (address, prop::option::of(pieces())).prop_map(|(address, name)| match name {
            Some(name) => format!("{name} <{address}>"),
            None => address,
        });
        let fast_ones = std::cell::Cell::new(0);
        let named_ones = std::cell::Cell::new(0);
        let mut runner = TestRunner::new(Config {
            cases: 20_000,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&text, |text| {
                if let Some(fast) = plain_named(&text) {
                    named_ones.set(named_ones.get() + 1);
                    prop_assert_eq!(Some(fast), through_lettre(&text), "{:?}", text);
                }
                if let Some(fast) = plain_address(&text) {
                    fast_ones.set(fast_ones.get() + 1);
                    prop_assert_eq!(Some(fast), through_lettre(&text), "{:?}", text);
                }
                Ok(())
            })
            .unwrap();
        // The comparison is not empty: many strings take the fast path.
        assert!(fast_ones.get() > 200, "{} plain addresses", fast_ones.get());
        assert!(named_ones.get() > 100, "{} named", named_ones.get());
    }

    #[test]
    fn address_lists() {
        let list =
            parse_mailbox_list("Reply-To", "a@b.c, \"Doe, J\" <j@d.e>, X <x@bücher.de>").unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[1].name.as_deref(), Some("Doe, J"));
        assert_eq!(list[2].domain, "xn--bcher-kva.de");
        assert!(parse_mailbox_list("Reply-To", "not an address").is_err());
        assert!(parse_mailbox_list("Reply-To", "a@b.c, nonsense").is_err());
        assert!(parse_mailbox_list("Sender", "a@b.c, d@e.f").is_err());
        assert!(parse_mailbox_list("Sender", "a@b.c").is_ok());
    }
}
