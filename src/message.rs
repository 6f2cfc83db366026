//! From a request to a validated, fully built email.
//!
//! [`MailRequest`] is what a client asks for; [`OutgoingMessage`] is what the
//! workers deliver. The only way from one to the other is [`MailRequest::build`],
//! which checks every field, so an `OutgoingMessage` never holds a header that
//! a client could have injected, and nothing is accepted that could be refused
//! later for being malformed.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::SenderRule;

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
    /// Subject line; no CR or LF.
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
    /// Send at this time instead of now (`send_at`, RFC 3339 in JSON).
    pub send_at: Option<std::time::SystemTime>,
}

/// Why a request cannot become a message. Each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The body is not JSON.
    MalformedJson(String),
    /// The body is JSON but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        field: String,
        expected: &'static str,
    },
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
    /// A custom header that is malformed or that the service sets itself.
    InvalidHeader { name: String, reason: String },
    /// An attachment that cannot be built.
    InvalidAttachment { index: usize, reason: String },
    /// `sender` is not in `MAILROOM_ALLOWED_SENDERS`.
    SenderNotAllowed { sender: String },
    /// lettre refused the assembled message.
    Build(String),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::MalformedJson(detail) => write!(f, "malformed JSON: {detail}"),
            MessageError::NotAnObject => f.write_str("the body must be a JSON object"),
            MessageError::MissingField(field) => write!(f, "missing field `{field}`"),
            MessageError::WrongType { field, expected } => {
                write!(f, "field `{field}` must be {expected}")
            }
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
            MessageError::Build(detail) => write!(f, "cannot build the message: {detail}"),
        }
    }
}

impl MessageError {
    /// The request field at fault, when there is one (`None` for a body
    /// that is not JSON at all).
    pub fn field(&self) -> Option<&str> {
        match self {
            MessageError::MalformedJson(_) | MessageError::NotAnObject => None,
            MessageError::MissingField(field) => Some(field),
            MessageError::WrongType { field, .. }
            | MessageError::HeaderInjection { field }
            | MessageError::InvalidAddress { field, .. } => Some(field),
            MessageError::NoRecipients => Some("receiver"),
            MessageError::InvalidHeader { .. } => Some("headers"),
            MessageError::InvalidAttachment { .. } => Some("attachments"),
            MessageError::SenderNotAllowed { .. } => Some("sender"),
            MessageError::Build(_) => None,
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
    /// Envelope sender (`MAIL FROM`).
    pub envelope_from: String,
    /// Envelope recipients (`RCPT TO`), each once, Bcc included.
    pub recipients: Vec<String>,
    /// The RFC 5322 message, as sent after `DATA`.
    pub content: String,
}

/// Headers the service sets itself; a client may not supply them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
];

impl MailRequest {
    /// Parses a JSON body, naming the field at fault on error. Unknown fields
    /// are ignored.
    pub fn from_json(body: &[u8]) -> Result<MailRequest, MessageError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|error| MessageError::MalformedJson(error.to_string()))?;
        let Value::Object(object) = value else {
            return Err(MessageError::NotAnObject);
        };
        let sender =
            optional_string(&object, "sender")?.ok_or(MessageError::MissingField("sender"))?;
        let receiver = match object.get("receiver") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(_)) => string_list(&object, "receiver")?,
            Some(_) => {
                return Err(MessageError::WrongType {
                    field: "receiver".into(),
                    expected: "a string or an array of strings",
                })
            }
        };
        let subject =
            optional_string(&object, "subject")?.ok_or(MessageError::MissingField("subject"))?;
        let headers = match object.get("headers") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => {
                let mut headers = BTreeMap::new();
                for (name, value) in map {
                    let Value::String(value) = value else {
                        return Err(MessageError::WrongType {
                            field: format!("headers.{name}"),
                            expected: "a string",
                        });
                    };
                    headers.insert(name.clone(), value.clone());
                }
                headers
            }
            Some(_) => {
                return Err(MessageError::WrongType {
                    field: "headers".into(),
                    expected: "an object of strings",
                })
            }
        };
        let attachments = match object.get("attachments") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(index, item)| parse_attachment(index, item))
                .collect::<Result<_, _>>()?,
            Some(_) => {
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
            to: string_list(&object, "to")?,
            cc: string_list(&object, "cc")?,
            bcc: string_list(&object, "bcc")?,
            html: optional_string(&object, "html")?,
            reply_to: optional_string(&object, "reply_to")?,
            headers,
            attachments,
            send_at: None,
        })
    }

    /// Checks every field and builds the message under a new id.
    pub fn build(
        &self,
        allowed_senders: Option<&[SenderRule]>,
    ) -> Result<OutgoingMessage, MessageError> {
        self.build_with_id(new_message_id(), allowed_senders)
    }

    /// As [`MailRequest::build`], with a given id.
    pub fn build_with_id(
        &self,
        id: String,
        allowed_senders: Option<&[SenderRule]>,
    ) -> Result<OutgoingMessage, MessageError> {
        let sender = parse_mailbox("sender", &self.sender)?;
        if let Some(rules) = allowed_senders {
            if !sender_allowed(&sender, rules) {
                return Err(MessageError::SenderNotAllowed {
                    sender: sender.email.to_string(),
                });
            }
        }
        reject_line_breaks("subject", &self.subject)?;

        let mut builder = lettre::Message::builder()
            .from(sender.clone())
            .subject(self.subject.clone())
            .message_id(Some(format!("<{id}@{}>", sender.email.domain())))
            .date_now();
        let mut recipients: Vec<String> = Vec::new();
        let mut add_recipient = |mailbox: &Mailbox| {
            let address = mailbox.email.to_string();
            if !recipients
                .iter()
                .any(|known| known.eq_ignore_ascii_case(&address))
            {
                recipients.push(address);
            }
        };
        for (field, list) in [("receiver", &self.receiver), ("to", &self.to)] {
            for (index, text) in list.iter().enumerate() {
                let mailbox = parse_mailbox(&indexed(field, index, list.len()), text)?;
                add_recipient(&mailbox);
                builder = builder.to(mailbox);
            }
        }
        for (index, text) in self.cc.iter().enumerate() {
            let mailbox = parse_mailbox(&indexed("cc", index, self.cc.len()), text)?;
            add_recipient(&mailbox);
            builder = builder.cc(mailbox);
        }
        for (index, text) in self.bcc.iter().enumerate() {
            // Bcc goes only into the envelope: lettre would drop the header
            // anyway, but not adding it means it can never leak.
            let mailbox = parse_mailbox(&indexed("bcc", index, self.bcc.len()), text)?;
            add_recipient(&mailbox);
        }
        if recipients.is_empty() {
            return Err(MessageError::NoRecipients);
        }
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(parse_mailbox("reply_to", reply_to)?);
        }
        for (name, value) in &self.headers {
            builder = builder.raw_header(self.custom_header(name, value)?);
        }

        let body = self.body()?;
        let message = match body {
            Body::Single(part) => builder.singlepart(part),
            Body::Multi(part) => builder.multipart(part),
        }
        .map_err(|error| MessageError::Build(error.to_string()))?;
        let mut content = String::from_utf8(message.formatted())
            .map_err(|_| MessageError::Build("the formatted message is not UTF-8".into()))?;
        // lettre grows the buffer by doubling; a queued message would keep
        // up to twice its size for as long as it waits.
        content.shrink_to_fit();
        Ok(OutgoingMessage {
            id,
            envelope_from: sender.email.to_string(),
            recipients,
            content,
        })
    }

    fn custom_header(&self, name: &str, value: &str) -> Result<HeaderValue, MessageError> {
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
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("content-") {
            return Err(invalid(
                "set by the service itself; use the request's own fields",
            ));
        }
        if lower == "reply-to" && self.reply_to.is_some() {
            return Err(invalid("given twice: also in the `reply_to` field"));
        }
        let name = HeaderName::new_from_ascii(name.to_string())
            .map_err(|_| invalid("not a valid header field name"))?;
        Ok(HeaderValue::new(name, value.to_string()))
    }

    fn body(&self) -> Result<Body, MessageError> {
        let text = self.message.clone();
        let main = match (text, self.html.clone()) {
            (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(text, html)),
            (None, Some(html)) => Body::Single(SinglePart::html(html)),
            (text, None) => Body::Single(SinglePart::plain(text.unwrap_or_default())),
        };
        if self.attachments.is_empty() {
            return Ok(main);
        }
        let mut mixed = match main {
            Body::Single(part) => MultiPart::mixed().singlepart(part),
            Body::Multi(part) => MultiPart::mixed().multipart(part),
        };
        for (index, attachment) in self.attachments.iter().enumerate() {
            let invalid = |reason: String| MessageError::InvalidAttachment { index, reason };
            if attachment.filename.trim().is_empty() {
                return Err(invalid("`filename` must not be empty".into()));
            }
            if attachment.filename.contains(['\r', '\n', '\0']) {
                return Err(invalid("`filename` must not contain CR, LF or NUL".into()));
            }
            let content_type = ContentType::parse(&attachment.content_type).map_err(|_| {
                invalid(format!(
                    "`content_type` {:?} is not a MIME type",
                    attachment.content_type
                ))
            })?;
            mixed = mixed.singlepart(
                Attachment::new(attachment.filename.clone())
                    .body(attachment.content.clone(), content_type),
            );
        }
        Ok(Body::Multi(mixed))
    }
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn indexed(field: &str, index: usize, length: usize) -> String {
    if length > 1 || field != "receiver" {
        format!("{field}[{index}]")
    } else {
        field.to_string()
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

fn parse_attachment(index: usize, item: &Value) -> Result<AttachmentRequest, MessageError> {
    let invalid = |reason: &str| MessageError::InvalidAttachment {
        index,
        reason: reason.to_string(),
    };
    let Value::Object(object) = item else {
        return Err(invalid(
            "must be an object {filename, content_type, content}",
        ));
    };
    let text = |field: &str| match object.get(field) {
        Some(Value::String(text)) => Ok(Some(text.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(MessageError::InvalidAttachment {
            index,
            reason: format!("`{field}` must be a string"),
        }),
    };
    let filename = text("filename")?.ok_or_else(|| invalid("missing `filename`"))?;
    let content_type = text("content_type")?.unwrap_or_else(|| "application/octet-stream".into());
    let content = text("content")?.ok_or_else(|| invalid("missing `content` (base64)"))?;
    // Line breaks are common in base64 produced by tools; they carry no data.
    let compact: String = content
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let content = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|error| invalid(&format!("`content` is not valid base64: {error}")))?;
    Ok(AttachmentRequest {
        filename,
        content_type,
        content,
    })
}

fn reject_line_breaks(field: &str, value: &str) -> Result<(), MessageError> {
    if value.contains(['\r', '\n']) {
        return Err(MessageError::HeaderInjection {
            field: field.to_string(),
        });
    }
    Ok(())
}

fn parse_mailbox(field: &str, value: &str) -> Result<Mailbox, MessageError> {
    reject_line_breaks(field, value)?;
    value
        .trim()
        .parse::<Mailbox>()
        .map_err(|error| MessageError::InvalidAddress {
            field: field.to_string(),
            value: value.to_string(),
            reason: error.to_string(),
        })
}

fn sender_allowed(sender: &Mailbox, rules: &[SenderRule]) -> bool {
    let address = sender.email.to_string().to_ascii_lowercase();
    let domain = sender.email.domain().to_ascii_lowercase();
    rules.iter().any(|rule| match rule {
        SenderRule::Address(allowed) => *allowed == address,
        SenderRule::Domain(allowed) => *allowed == domain,
    })
}

/// A new message id: 12 hex digits of milliseconds (so ids sort by time)
/// and 16 of randomness.
pub fn new_message_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0);
    format!("{:012x}{:016x}", millis & 0xffff_ffff_ffff, random_u64())
}

/// 64 random bits from the standard library's randomly keyed hasher (no
/// extra crate for ids and jitter).
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
    fn reserved_headers_are_refused() {
        for name in ["From", "message-id", "Content-Type", "MIME-Version"] {
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
    }
}
