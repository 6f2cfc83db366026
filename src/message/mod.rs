//! From a request to a validated, fully built email.
//!
//! [`MailRequest`] is what a client asks for; [`OutgoingMessage`] is what the
//! workers deliver. The only way from one to the other is [`MailRequest::build`],
//! which checks every field, so an `OutgoingMessage` never holds a header that
//! a client could have injected, and nothing is accepted that a strict relay
//! would refuse for being malformed.
//!
//! One job per module: this one parses and validates requests; `address`
//! parses mailboxes (IDNA domains, SMTPUTF8 local parts); `json` reads the
//! body (attachments without a copy of their base64 text); `encode` writes
//! folded header lines, RFC 2047 words and transfer encodings; `build`
//! assembles the MIME message as it goes on the wire.

mod address;
mod build;
mod encode;
mod json;

pub(crate) use address::comparable_address;
pub use json::MAX_BATCH;
pub(crate) use json::{parse_batch, Body as RequestBody, Messages};

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::SenderRule;

pub use address::is_address_header;

/// The fields a request may carry (SPEC "POST /api/mail").
pub const FIELDS: &[&str] = &[
    "sender",
    "receiver",
    "subject",
    "message",
    "to",
    "cc",
    "bcc",
    "html",
    "reply_to",
    "headers",
    "attachments",
    "tags",
    "metadata",
    "template",
    "data",
    "send_at",
];

/// What a body that is not JSON is told (curl's `-d` alone says the body
/// is a form, so the header is named too).
pub const JSON_REQUIRED: &str = "the body must be JSON (Content-Type: application/json)";

/// At most this many tags per message.
pub const MAX_TAGS: usize = 10;
/// A tag's length in characters, at most.
pub const MAX_TAG_CHARS: usize = 64;
/// At most this many metadata pairs per message.
pub const MAX_METADATA_PAIRS: usize = 20;
/// Metadata keys and values together, in bytes, at most.
pub const MAX_METADATA_BYTES: usize = 2048;

/// A file attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRequest {
    /// Shown to the recipient; may be non-ASCII.
    pub filename: String,
    /// MIME type, e.g. `application/pdf`.
    pub content_type: String,
    /// The file's bytes (base64 in JSON).
    pub content: Vec<u8>,
}

/// What a client asks to send: the JSON body of `POST /api/mail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailRequest {
    /// `a@b.c` or `Name <a@b.c>`; becomes `From` and the envelope sender.
    pub sender: String,
    /// The original `receiver` field (a string or an array in JSON).
    pub receiver: Vec<String>,
    /// Subject line; no CR or LF. Empty when absent with a `template`.
    pub subject: String,
    /// Plain-text body.
    pub message: Option<String>,
    /// More `To` recipients.
    pub to: Vec<String>,
    /// `Cc` recipients.
    pub cc: Vec<String>,
    /// Hidden recipients: in the envelope, never in the headers.
    pub bcc: Vec<String>,
    /// HTML body.
    pub html: Option<String>,
    /// `Reply-To`.
    pub reply_to: Option<String>,
    /// Extra headers, by name.
    pub headers: BTreeMap<String, String>,
    /// Attached files.
    pub attachments: Vec<AttachmentRequest>,
    /// Labels kept with the status and sent in webhooks; never in the email.
    pub tags: Vec<String>,
    /// Pairs kept with the status and sent in webhooks; never in the email.
    pub metadata: BTreeMap<String, String>,
    /// A stored template to render instead of subject/message/html.
    pub template: Option<String>,
    /// The template's variables.
    pub data: Option<Map<String, Value>>,
    /// Send then instead of now; also the message's `Date` when it is
    /// scheduled (a message scheduled for Monday is dated Monday, as mail
    /// clients sort by it).
    pub send_at: Option<SystemTime>,
}

/// Why a request cannot become a message. Each names the field at fault;
/// the text is meant for the client (the 400 answer).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The body is not JSON.
    MalformedJson(String),
    /// The body is JSON but not an object.
    NotAnObject,
    /// Top-level fields the service does not know (a typo would otherwise
    /// send something else than meant).
    UnknownFields(Vec<String>),
    /// A required field is absent.
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        field: String,
        expected: &'static str,
    },
    /// A field's value breaks a rule (length, count, format).
    InvalidValue { field: String, reason: String },
    /// CR or LF where it would start a new header line.
    HeaderInjection { field: String },
    /// Not a valid email address.
    InvalidAddress {
        field: String,
        value: String,
        reason: String,
    },
    /// No recipient at all.
    NoRecipients,
    /// A custom header that is malformed or that the service or relays set.
    InvalidHeader { name: String, reason: String },
    /// An attachment that cannot be built.
    InvalidAttachment { index: usize, reason: String },
    /// `sender` is not in `MAILROOM_ALLOWED_SENDERS`.
    SenderNotAllowed { sender: String },
    /// An address needs SMTPUTF8 (a non-ASCII local part) and the relay
    /// does not offer it.
    NeedsSmtpUtf8 { address: String },
    /// The message as built is larger than the relay's SIZE limit.
    TooLargeForRelay {
        /// The message's size in octets, as it would follow DATA.
        size: u64,
        /// The relay's limit in octets.
        limit: u64,
    },
    /// The assembled message cannot be built.
    Build(String),
}

impl MessageError {
    /// The request field at fault, when there is one (`None` for a body
    /// that is not JSON at all).
    pub fn field(&self) -> Option<&str> {
        match self {
            MessageError::MalformedJson(_) | MessageError::NotAnObject | MessageError::Build(_) => {
                None
            }
            MessageError::UnknownFields(fields) => fields.first().map(String::as_str),
            MessageError::MissingField(field) => Some(field),
            MessageError::WrongType { field, .. }
            | MessageError::InvalidValue { field, .. }
            | MessageError::HeaderInjection { field }
            | MessageError::InvalidAddress { field, .. } => Some(field),
            MessageError::NoRecipients => Some("receiver"),
            MessageError::InvalidHeader { .. } => Some("headers"),
            MessageError::InvalidAttachment { .. } => Some("attachments"),
            MessageError::SenderNotAllowed { .. } => Some("sender"),
            MessageError::NeedsSmtpUtf8 { .. } => Some("receiver"),
            MessageError::TooLargeForRelay { .. } => None,
        }
    }
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::MalformedJson(detail) => write!(f, "malformed JSON: {detail}; {JSON_REQUIRED}"),
            MessageError::NotAnObject => f.write_str("the body must be a JSON object"),
            MessageError::UnknownFields(fields) => {
                let named: Vec<String> = fields.iter().map(|field| format!("`{field}`")).collect();
                write!(
                    f,
                    "unknown field{} {}; the valid fields are {}",
                    if fields.len() > 1 { "s" } else { "" },
                    named.join(", "),
                    FIELDS.join(", ")
                )
            }
            MessageError::MissingField(field) => write!(f, "missing field `{field}`"),
            MessageError::WrongType { field, expected } => {
                write!(f, "field `{field}` must be {expected}")
            }
            MessageError::InvalidValue { field, reason } => write!(f, "field `{field}`: {reason}"),
            MessageError::HeaderInjection { field } => {
                write!(
                    f,
                    "field `{field}` must not contain CR or LF (header injection)"
                )
            }
            MessageError::InvalidAddress {
                field,
                value,
                reason,
            } => write!(f, "field `{field}`: invalid address {value:?}: {reason}"),
            MessageError::NoRecipients => {
                f.write_str("missing field `receiver`: no recipient in receiver, to, cc or bcc")
            }
            MessageError::InvalidHeader { name, reason } => {
                write!(f, "header {name:?} in `headers`: {reason}")
            }
            MessageError::InvalidAttachment { index, reason } => {
                write!(f, "attachments[{index}]: {reason}")
            }
            MessageError::SenderNotAllowed { sender } => write!(
                f,
                "field `sender`: {sender:?} is not allowed to send here (MAILROOM_ALLOWED_SENDERS)"
            ),
            MessageError::NeedsSmtpUtf8 { address } => write!(
                f,
                "address {address:?} has a non-ASCII local part: it needs SMTPUTF8 (RFC 6531), which the relay does not offer; use an ASCII address"
            ),
            MessageError::TooLargeForRelay { size, limit } => write!(
                f,
                "the message is {size} bytes as built, and the relay takes at most {limit} (its SIZE limit); send smaller attachments"
            ),
            MessageError::Build(detail) => write!(f, "cannot build the message: {detail}"),
        }
    }
}

impl std::error::Error for MessageError {}

/// A message ready for delivery: built once, at acceptance, and never
/// changed afterwards, so every attempt sends the same bytes with the same
/// `Message-ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// The service's id for it (also the left part of `Message-ID`).
    pub id: String,
    /// Envelope sender (`MAIL FROM`), its domain in IDNA (ASCII) form.
    pub envelope_from: String,
    /// Envelope recipients (`RCPT TO`), each once, Bcc included; domains
    /// in IDNA (ASCII) form.
    pub recipients: Vec<String>,
    /// The RFC 5322 message as sent after `DATA`: CRLF line ends only,
    /// lines of at most 998 octets, 7-bit unless an address needs SMTPUTF8.
    pub content: String,
}

impl OutgoingMessage {
    /// True when an address has a non-ASCII local part: the message can
    /// only go to a relay that offers SMTPUTF8 (RFC 6531).
    pub fn needs_smtputf8(&self) -> bool {
        !self.envelope_from.is_ascii() || self.recipients.iter().any(|r| !r.is_ascii())
    }
}

impl MailRequest {
    /// Parses a JSON body, naming the field at fault on error. Unknown
    /// top-level fields are refused.
    pub fn from_json(body: &[u8]) -> Result<MailRequest, MessageError> {
        let parsed = json::parse(body).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => MessageError::NotAnObject,
            _ => MessageError::MalformedJson(error.to_string()),
        })?;
        MailRequest::from_body(parsed)
    }

    /// Checks a request object already read (a body, or a batch item).
    pub(crate) fn from_body(parsed: json::Body<'_>) -> Result<MailRequest, MessageError> {
        let object = parsed.fields;
        let unknown: Vec<String> = object
            .keys()
            .filter(|key| !FIELDS.contains(&key.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(MessageError::UnknownFields(unknown));
        }
        if let Some(field) = parsed.repeated {
            return Err(MessageError::InvalidValue {
                reason: "given more than once (parsers differ on which one counts)".into(),
                field,
            });
        }
        let sender =
            optional_string(&object, "sender")?.ok_or(MessageError::MissingField("sender"))?;
        let receiver = recipient_list(&object, "receiver")?;
        let template = optional_string(&object, "template")?;
        let subject = match optional_string(&object, "subject")? {
            Some(subject) => subject,
            None if template.is_some() => String::new(),
            None => return Err(MessageError::MissingField("subject")),
        };
        let headers = string_map(&object, "headers", "an object of strings")?;
        let tags = parse_tags(&object)?;
        let metadata = parse_metadata(&object)?;
        let data = match object.get("data") {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map.clone()),
            Some(_) => {
                return Err(MessageError::WrongType {
                    field: "data".into(),
                    expected: "an object",
                })
            }
        };
        let send_at = match optional_string(&object, "send_at")? {
            None => None,
            Some(text) => Some(
                parse_rfc3339(&text).ok_or_else(|| MessageError::InvalidValue {
                    field: "send_at".into(),
                    reason: format!("{text:?} is not an RFC 3339 time (e.g. 2026-05-01T09:30:00Z)"),
                })?,
            ),
        };
        // Each attachment's base64 text is decoded from the body itself.
        let attachments = match parsed.attachments {
            None | Some(json::Attachments::Other(Value::Null)) => Vec::new(),
            Some(json::Attachments::List(items)) => items
                .into_iter()
                .enumerate()
                .map(|(index, item)| parse_attachment(index, item))
                .collect::<Result<_, _>>()?,
            Some(json::Attachments::Other(_)) => {
                return Err(MessageError::WrongType {
                    field: "attachments".into(),
                    expected: "an array of {filename, content_type, content}",
                })
            }
        };
        Ok(MailRequest {
            sender,
            receiver,
            subject,
            message: optional_string(&object, "message")?,
            to: recipient_list(&object, "to")?,
            cc: recipient_list(&object, "cc")?,
            bcc: recipient_list(&object, "bcc")?,
            html: optional_string(&object, "html")?,
            reply_to: optional_string(&object, "reply_to")?,
            headers,
            attachments,
            tags,
            metadata,
            template,
            data,
            send_at,
        })
    }

    /// Checks every field and builds the message under a new id.
    pub fn build(
        &self,
        allowed_senders: Option<&[SenderRule]>,
    ) -> Result<OutgoingMessage, MessageError> {
        self.build_with_id(new_message_id(), allowed_senders)
    }

    /// As [`MailRequest::build`], with a given id. The message is dated
    /// its `send_at` when that is ahead, else now.
    pub fn build_with_id(
        &self,
        id: String,
        allowed_senders: Option<&[SenderRule]>,
    ) -> Result<OutgoingMessage, MessageError> {
        let now = SystemTime::now();
        let date = self.send_at.filter(|at| *at > now).unwrap_or(now);
        build::build(self, id, allowed_senders, date)
    }

    /// As [`MailRequest::build`], dated `date` (the engine's: the time a
    /// scheduled message is due, else now, whatever `send_at` says).
    pub(crate) fn build_dated(
        &self,
        allowed_senders: Option<&[SenderRule]>,
        date: SystemTime,
    ) -> Result<OutgoingMessage, MessageError> {
        build::build(self, new_message_id(), allowed_senders, date)
    }
}

fn optional_string(
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, MessageError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(MessageError::WrongType {
            field: field.into(),
            expected: "a string",
        }),
    }
}

fn string_list(
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<Vec<String>, MessageError> {
    let wrong = || MessageError::WrongType {
        field: field.into(),
        expected: "an array of strings",
    };
    match object.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(wrong))
            .collect(),
        Some(_) => Err(wrong()),
    }
}

/// A recipient field: one address as a string, or an array of them
/// (`receiver`, `to`, `cc` and `bcc` alike).
fn recipient_list(
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<Vec<String>, MessageError> {
    let wrong = || MessageError::WrongType {
        field: field.into(),
        expected: "a string or an array of strings",
    };
    match object.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(one)) => Ok(vec![one.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(wrong))
            .collect(),
        Some(_) => Err(wrong()),
    }
}

fn string_map(
    object: &Map<String, Value>,
    field: &'static str,
    expected: &'static str,
) -> Result<BTreeMap<String, String>, MessageError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, value)| match value {
                Value::String(value) => Ok((name.clone(), value.clone())),
                _ => Err(MessageError::WrongType {
                    field: format!("{field}.{name}"),
                    expected: "a string",
                }),
            })
            .collect(),
        Some(_) => Err(MessageError::WrongType {
            field: field.into(),
            expected,
        }),
    }
}

fn parse_tags(object: &Map<String, Value>) -> Result<Vec<String>, MessageError> {
    let tags = string_list(object, "tags")?;
    let invalid = |reason: String| MessageError::InvalidValue {
        field: "tags".into(),
        reason,
    };
    if tags.len() > MAX_TAGS {
        return Err(invalid(format!(
            "at most {MAX_TAGS} tags, got {}",
            tags.len()
        )));
    }
    for (index, tag) in tags.iter().enumerate() {
        let length = tag.chars().count();
        if !(1..=MAX_TAG_CHARS).contains(&length) {
            return Err(MessageError::InvalidValue {
                field: format!("tags[{index}]"),
                reason: format!("a tag has 1 to {MAX_TAG_CHARS} characters, got {length}"),
            });
        }
    }
    Ok(tags)
}

fn parse_metadata(object: &Map<String, Value>) -> Result<BTreeMap<String, String>, MessageError> {
    let metadata = string_map(object, "metadata", "an object of strings")?;
    let invalid = |reason: String| MessageError::InvalidValue {
        field: "metadata".into(),
        reason,
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(invalid(format!(
            "at most {MAX_METADATA_PAIRS} pairs, got {}",
            metadata.len()
        )));
    }
    let bytes: usize = metadata
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    if bytes > MAX_METADATA_BYTES {
        return Err(invalid(format!(
            "keys and values hold at most {MAX_METADATA_BYTES} bytes in all, got {bytes}"
        )));
    }
    if metadata.keys().any(String::is_empty) {
        return Err(invalid("a key must not be empty".into()));
    }
    Ok(metadata)
}

fn parse_attachment(index: usize, item: json::Item<'_>) -> Result<AttachmentRequest, MessageError> {
    let invalid = |reason: &str| MessageError::InvalidAttachment {
        index,
        reason: reason.to_string(),
    };
    let json::Item::Object(fields) = item else {
        return Err(invalid(
            "must be an object {filename, content_type, content}",
        ));
    };
    let (mut filename, mut content_type, mut encoded) = (None, None, None);
    for (name, value) in fields {
        let text = match value {
            json::Field::Text(text) => Some(text),
            json::Field::Other(Value::Null) => None,
            json::Field::Other(_) => {
                return Err(invalid(&format!("`{name}` must be a string")));
            }
        };
        match name.as_str() {
            "filename" => filename = text,
            "content_type" => content_type = text,
            "content" => encoded = text,
            _ => {
                return Err(invalid(&format!(
                    "unknown field `{name}`; the valid ones are filename, content_type, content"
                )))
            }
        }
    }
    let filename = filename
        .ok_or_else(|| invalid("missing `filename`"))?
        .into_owned();
    let content_type = content_type.map_or_else(
        || "application/octet-stream".to_string(),
        std::borrow::Cow::into_owned,
    );
    let encoded = encoded.ok_or_else(|| invalid("missing `content` (base64)"))?;
    let content = decode_base64(&encoded)
        .map_err(|error| invalid(&format!("`content` is not valid base64: {error}")))?;
    Ok(AttachmentRequest {
        filename,
        content_type,
        content,
    })
}

/// Standard base64; line breaks and spaces (common in base64 produced by
/// tools) carry no data and are skipped.
fn decode_base64(encoded: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let engine = &base64::engine::general_purpose::STANDARD;
    if !encoded.bytes().any(|byte| byte.is_ascii_whitespace()) {
        return engine.decode(encoded.as_bytes());
    }
    let compact: Vec<u8> = encoded
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    engine.decode(&compact)
}

pub use crate::time::parse_rfc3339;

fn sender_allowed(address: &address::Mailbox, rules: &[SenderRule]) -> bool {
    let full = address.address().to_lowercase();
    let domains = [
        address.domain.to_ascii_lowercase(),
        address.unicode_domain.to_lowercase(),
    ];
    rules.iter().any(|rule| match rule {
        SenderRule::Address(allowed) => {
            *allowed == full || *allowed == address.unicode_address().to_lowercase()
        }
        SenderRule::Domain(allowed) => domains.contains(allowed),
    })
}

/// A new message id: 12 hex digits of milliseconds (so ids sort by time)
/// and 16 of randomness.
pub fn new_message_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0);
    let mut id = String::with_capacity(28);
    push_hex(&mut id, millis & 0xffff_ffff_ffff, 12);
    push_hex(&mut id, random_u64(), 16);
    id
}

/// Appends the low `digits` hex digits of `value`, lowercase, zero-padded
/// (by hand: `format!` with padding cost ~10x as much, for every message).
pub(crate) fn push_hex(out: &mut String, value: u64, digits: usize) {
    for shift in (0..digits.min(16)).rev() {
        let digit = (value >> (4 * shift)) & 0xf;
        out.push(char::from(b"0123456789abcdef"[digit as usize]));
    }
}

/// 64 random bits from the standard library's randomly keyed hasher (no
/// extra crate for ids and jitter).
#[doc(hidden)]
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(json: &str) -> Result<OutgoingMessage, MessageError> {
        MailRequest::from_json(json.as_bytes())?.build(None)
    }

    #[test]
    fn seed_request_builds_headers() {
        let message = request(r#"{"sender":"App <app@example.com>","receiver":"user@example.org","subject":"Hi","message":"Hello"}"#).unwrap();
        assert_eq!(message.envelope_from, "app@example.com");
        assert_eq!(message.recipients, vec!["user@example.org"]);
        for header in [
            "From: App <app@example.com>",
            "To: user@example.org",
            "Subject: Hi",
            "Date: ",
            "Message-ID: <",
        ] {
            assert!(
                message.content.contains(header),
                "{header} missing in {}",
                message.content
            );
        }
    }

    #[test]
    fn line_breaks_are_refused() {
        let error =
            request(r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"Hi\r\nBcc: x@y.z"}"#)
                .unwrap_err();
        assert_eq!(
            error,
            MessageError::HeaderInjection {
                field: "subject".into()
            }
        );
        let error = request(r#"{"sender":"a@b.c\nBcc: x@y.z","receiver":"d@e.f","subject":"Hi"}"#)
            .unwrap_err();
        assert!(error.to_string().contains("sender"));
        let error = request(r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"Hi","headers":{"X-A":"1\r\nBcc: x@y.z"}}"#).unwrap_err();
        assert!(error.to_string().contains("X-A"), "{error}");
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        assert_eq!(
            request(r#"{"receiver":"d@e.f","subject":"Hi"}"#).unwrap_err(),
            MessageError::MissingField("sender")
        );
        assert_eq!(
            request(r#"{"sender":"a@b.c","receiver":"d@e.f"}"#).unwrap_err(),
            MessageError::MissingField("subject")
        );
        assert_eq!(
            request(r#"{"sender":"a@b.c","subject":"x"}"#).unwrap_err(),
            MessageError::NoRecipients
        );
        assert!(request(r#"{"sender":"a@b.c","receiver":5,"subject":"x"}"#)
            .unwrap_err()
            .to_string()
            .contains("receiver"));
        assert!(matches!(
            request("{nope").unwrap_err(),
            MessageError::MalformedJson(_)
        ));
        assert!(
            request(r#"{"sender":"not an address","receiver":"d@e.f","subject":"x"}"#)
                .unwrap_err()
                .to_string()
                .contains("sender")
        );
    }

    #[test]
    fn every_recipient_field_takes_a_string_or_an_array() {
        let parsed = MailRequest::from_json(
            br#"{"sender":"a@b.c","receiver":"r@e.f","to":"t@e.f","cc":"c@e.f","bcc":["b@e.f","d@e.f"],"subject":"x"}"#,
        )
        .unwrap();
        assert_eq!(parsed.receiver, vec!["r@e.f"]);
        assert_eq!(parsed.to, vec!["t@e.f"]);
        assert_eq!(parsed.cc, vec!["c@e.f"]);
        assert_eq!(parsed.bcc, vec!["b@e.f", "d@e.f"]);
        let built = parsed.build(None).unwrap();
        assert_eq!(
            built.recipients,
            vec!["r@e.f", "t@e.f", "c@e.f", "b@e.f", "d@e.f"]
        );
        for field in ["receiver", "to", "cc", "bcc"] {
            // (Not beside another `receiver`: a field given twice is refused.)
            let receiver = if field == "receiver" {
                ""
            } else {
                r#""receiver":"r@e.f","#
            };
            let json = format!(r#"{{"sender":"a@b.c",{receiver}"subject":"x","{field}":5}}"#);
            let error = MailRequest::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("field `{field}` must be a string or an array of strings")
            );
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_told_to_be_json() {
        let error = MailRequest::from_json(b"sender=a@b.c&receiver=d@e.f").unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed JSON: expected value at line 1 column 1; the body must be JSON (Content-Type: application/json)"
        );
    }

    /// A field given twice is refused, naming it: a proxy in front may
    /// have checked the other one.
    #[test]
    fn a_field_given_twice_is_refused() {
        for (json, field) in [
            (
                r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"x","subject":"y"}"#,
                "subject",
            ),
            (
                r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"x","attachments":[],"attachments":[]}"#,
                "attachments",
            ),
        ] {
            let error = MailRequest::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(error.field(), Some(field), "{error}");
            assert!(error.to_string().contains("more than once"), "{error}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_the_valid_ones() {
        let error = request(r#"{"sender":"a@b.c","receiver":"d@e.f","subject":"x","text":"hi"}"#)
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("`text`"), "{text}");
        for field in FIELDS {
            assert!(text.contains(field), "{text} should list {field}");
        }
    }

    #[test]
    fn tags_metadata_and_later_fields_are_parsed_and_checked() {
        let parsed = MailRequest::from_json(
            br#"{"sender":"a@b.c","receiver":"d@e.f","template":"welcome","data":{"name":"Zo\u00eb"},
                "tags":["signup","eu"],"metadata":{"user":"42"},"send_at":"2026-05-01T09:30:00.5+02:00"}"#,
        )
        .unwrap();
        assert_eq!(parsed.subject, "", "subject may be absent with a template");
        assert_eq!(parsed.tags, vec!["signup", "eu"]);
        assert_eq!(parsed.metadata["user"], "42");
        assert_eq!(parsed.template.as_deref(), Some("welcome"));
        assert_eq!(parsed.data.unwrap()["name"], "Zoë");
        let expected = UNIX_EPOCH + Duration::from_millis(1_777_620_600_500);
        assert_eq!(parsed.send_at, Some(expected));

        let base = r#""sender":"a@b.c","receiver":"d@e.f","subject":"x""#;
        for (extra, named) in [
            (r#""tags":"one""#, "tags"),
            (r#""tags":[""]"#, "tags[0]"),
            (&format!(r#""tags":["{}"]"#, "t".repeat(65)), "tags[0]"),
            (
                r#""tags":["1","2","3","4","5","6","7","8","9","10","11"]"#,
                "tags",
            ),
            (r#""metadata":{"a":1}"#, "metadata.a"),
            (
                &format!(r#""metadata":{{"a":"{}"}}"#, "v".repeat(2048)),
                "metadata",
            ),
            (r#""template":5"#, "template"),
            (r#""data":[1]"#, "data"),
            (r#""send_at":"tomorrow""#, "send_at"),
            (r#""send_at":"2026-02-30T00:00:00Z""#, "send_at"),
        ] {
            let json = format!("{{{base},{extra}}}");
            let error = MailRequest::from_json(json.as_bytes()).unwrap_err();
            assert!(error.to_string().contains(named), "{json}: {error}");
        }
        let pairs: Vec<String> = (0..21).map(|i| format!(r#""k{i}":"v""#)).collect();
        let json = format!(r#"{{{base},"metadata":{{{}}}}}"#, pairs.join(","));
        assert!(MailRequest::from_json(json.as_bytes()).is_err());
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_rfc3339("2000-03-01t00:00:00z"),
            Some(UNIX_EPOCH + Duration::from_secs(951_868_800))
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00+0100",
            "2026-01-01T00:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn reserved_headers_are_refused() {
        for name in [
            "From",
            "message-id",
            "Content-Type",
            "MIME-Version",
            "Return-Path",
            "Received",
        ] {
            let json = format!(
                r#"{{"sender":"a@b.c","receiver":"d@e.f","subject":"x","headers":{{"{name}":"v"}}}}"#
            );
            let error = request(&json).unwrap_err();
            assert!(error.to_string().contains(name), "{error}");
        }
    }

    #[test]
    fn ids_are_unique() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 10_000);
        // 12 hex digits of milliseconds, then 16 random ones.
        let before = SystemTime::now();
        let id = new_message_id();
        let millis = u64::from_str_radix(&id[..12], 16).unwrap();
        let now = before.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(id.len() == 28 && millis.abs_diff(now) < 60_000, "{id}");
        assert!(
            id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );
        let mut hex = String::new();
        push_hex(&mut hex, 0xab, 4);
        push_hex(&mut hex, u64::MAX, 16);
        assert_eq!(hex, "00abffffffffffffffff");
    }

    #[test]
    fn sender_allow_list() {
        let rules = vec![SenderRule::Domain("example.com".into())];
        let request =
            MailRequest::from_json(br#"{"sender":"a@other.org","receiver":"d@e.f","subject":"x"}"#)
                .unwrap();
        assert!(matches!(
            request.build(Some(&rules)),
            Err(MessageError::SenderNotAllowed { .. })
        ));
        let request = MailRequest::from_json(
            br#"{"sender":"A <a@Example.com>","receiver":"d@e.f","subject":"x"}"#,
        )
        .unwrap();
        assert!(request.build(Some(&rules)).is_ok());
        let rules = vec![SenderRule::Domain("bücher.de".into())];
        let request = MailRequest::from_json(
            r#"{"sender":"a@bücher.de","receiver":"d@e.f","subject":"x"}"#.as_bytes(),
        )
        .unwrap();
        assert!(request.build(Some(&rules)).is_ok());
    }
}
