//! What went wrong, and whether it is worth trying again.
//!
//! Transient (retry): connection refused or reset, timeouts, TLS, any 4xx,
//! and authentication failures (530/534/535/538: a configuration problem,
//! never the message's). Permanent: a 5xx to MAIL, RCPT or DATA, or a
//! message the relay can never take (SMTPUTF8 needed but not offered).

use std::fmt;
use std::sync::Arc;

use lettre::transport::smtp::Error as SmtpError;

/// Whether a failed delivery may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Try again later.
    Transient,
    /// Do not try again.
    Permanent,
}

/// A reply from the relay: its code and its text (without the code; lines
/// of a multi-line reply joined by spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// The three-digit reply code.
    pub code: u16,
    /// The text after the code, enhanced status code included.
    pub text: String,
}

impl SmtpReply {
    /// The enhanced status code (RFC 3463) at the start of the text, e.g.
    /// `(5, 1, 1)` for `550 5.1.1 No such user`.
    pub fn enhanced(&self) -> Option<(u8, u16, u16)> {
        let word = self.text.split_whitespace().next()?;
        let mut parts = word.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        let matches_code = u16::from(class) == self.code / 100;
        (parts.next().is_none() && matches!(class, 2 | 4 | 5) && matches_code)
            .then_some((class, subject, detail))
    }

    /// A 4xx reply.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// A 5xx reply.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The relay's way of saying "too many recipients in this transaction"
    /// (RFC 5321 §4.5.3.1.10: 452, or 552 from older relays).
    pub fn is_too_many_recipients(&self) -> bool {
        matches!(self.code, 452 | 552)
            && (matches!(self.enhanced(), Some((_, 5, 3)))
                || self
                    .text
                    .to_ascii_lowercase()
                    .contains("too many recipients"))
    }

    /// The reply carried by a lettre error (a negative reply), if any.
    pub(crate) fn from_error(error: &SmtpError) -> Option<SmtpReply> {
        let code = u16::from(error.status()?);
        Some(SmtpReply {
            code,
            text: reply_text(error),
        })
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// A failed delivery attempt: nothing was delivered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeliveryError {
    /// Retry or not.
    pub kind: FailureKind,
    /// The relay's reply code, when there was a reply.
    pub smtp_code: Option<u16>,
    /// The relay's reply, when there was one.
    pub reply: Option<SmtpReply>,
    /// What happened, with the relay's reply text (for logs and `last_error`).
    pub detail: String,
    /// The relay itself is unusable (unreachable, too slow, TLS or AUTH
    /// failing), as opposed to this message being refused.
    pub relay_unusable: bool,
    /// The relay could not be reached or logged in to (connect, TLS, EHLO,
    /// AUTH): no transaction began, so the message itself cannot be the
    /// cause. Such a failure is retried however many attempts it takes
    /// (the SPEC: an unreachable relay or bad credentials never destroy
    /// the queue).
    pub before_transaction: bool,
    source: Option<Arc<SmtpError>>,
}

impl PartialEq for DeliveryError {
    fn eq(&self, other: &DeliveryError) -> bool {
        self.kind == other.kind
            && self.reply == other.reply
            && self.detail == other.detail
            && self.relay_unusable == other.relay_unusable
            && self.before_transaction == other.before_transaction
    }
}

impl Eq for DeliveryError {}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for DeliveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|error| error as &(dyn std::error::Error + 'static))
    }
}

impl DeliveryError {
    /// A transient failure without a reply.
    pub fn transient(detail: String, relay_unusable: bool) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Transient,
            smtp_code: None,
            reply: None,
            detail,
            relay_unusable,
            before_transaction: false,
            source: None,
        }
    }

    /// A permanent failure without a reply (the message can never go).
    pub fn permanent(detail: String) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Permanent,
            smtp_code: None,
            reply: None,
            detail,
            relay_unusable: false,
            before_transaction: false,
            source: None,
        }
    }

    /// A failure made of a relay's reply.
    pub fn from_reply(
        kind: FailureKind,
        reply: SmtpReply,
        detail: String,
        relay_unusable: bool,
    ) -> DeliveryError {
        DeliveryError {
            kind,
            smtp_code: Some(reply.code),
            reply: Some(reply),
            detail,
            relay_unusable,
            before_transaction: false,
            source: None,
        }
    }

    /// Retry or not.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The same error, as one that happened before any transaction
    /// began (see [`DeliveryError::before_transaction`]).
    pub(crate) fn before_transaction(mut self) -> DeliveryError {
        self.before_transaction = true;
        self.relay_unusable = true;
        self
    }

    /// The same error with `prefix: ` before its detail.
    pub(crate) fn prefixed(mut self, prefix: &str) -> DeliveryError {
        self.detail = format!("{prefix}: {}", self.detail);
        self
    }
}

/// Decides retry or not. `while_connecting`: the error came from connecting,
/// STARTTLS or AUTH (a relay or configuration problem, never the message's).
pub fn classify(error: SmtpError, while_connecting: bool) -> DeliveryError {
    let reply = SmtpReply::from_error(&error);
    let smtp_code = reply.as_ref().map(|reply| reply.code);
    let detail = match &reply {
        Some(reply) => reply.to_string(),
        None if error.is_timeout() => format!("timed out: {error}"),
        None => error.to_string(),
    };
    let kind = match smtp_code {
        // Authentication failures are configuration problems: retry them
        // (and say so loudly) instead of failing every queued message.
        Some(530 | 534 | 535 | 538) => FailureKind::Transient,
        Some(code) if (500..600).contains(&code) && !while_connecting => FailureKind::Permanent,
        _ => FailureKind::Transient,
    };
    DeliveryError {
        kind,
        smtp_code,
        reply,
        detail,
        relay_unusable: while_connecting || smtp_code.is_none(),
        before_transaction: false,
        source: Some(Arc::new(error)),
    }
}

fn reply_text(error: &SmtpError) -> String {
    // lettre's Display is "permanent error (550): text"; keep just the text.
    let text = error.to_string();
    match text.split_once("): ") {
        Some((_, reply)) => reply.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> SmtpReply {
        SmtpReply {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(reply(550, "5.1.1 No such user").enhanced(), Some((5, 1, 1)));
        assert_eq!(reply(452, "4.5.3 Too many").enhanced(), Some((4, 5, 3)));
        assert_eq!(reply(550, "No such user").enhanced(), None);
        assert_eq!(reply(550, "4.1.1 mismatch").enhanced(), None);
        assert_eq!(reply(250, "2.0.0").enhanced(), Some((2, 0, 0)));
    }

    #[test]
    fn too_many_recipients() {
        assert!(reply(452, "4.5.3 Too many recipients").is_too_many_recipients());
        assert!(reply(452, "Too many recipients").is_too_many_recipients());
        assert!(reply(552, "5.5.3 too many recipients").is_too_many_recipients());
        assert!(!reply(452, "4.2.2 Mailbox full").is_too_many_recipients());
        assert!(!reply(450, "4.5.3 busy").is_too_many_recipients());
    }
}
