//! Delivery of one message: over SMTP through a connection each worker keeps
//! open, or into the outbox directory. Also decides which failures are worth
//! retrying.
//!
//! Modules: `session` (a worker's SMTP connection and the attempts on
//! it, with PIPELINING when offered), `smtp` (the conversation: connecting,
//! envelopes, bodies, per-recipient results), `deadline` (what the pool's
//! supervisor watches), `classify` (errors, transient or permanent),
//! `outbox` (`.eml` files).
//!
//! Why lettre's `SmtpConnection` and not `SmtpTransport`: lettre 0.11.23
//! writes a message body and its final `.` in two writes without
//! TCP_NODELAY, so every message on a reused connection waits ~44 ms for a
//! delayed ACK (23 messages/s per connection). Driving lettre's public
//! `SmtpConnection` ourselves lets the dot-stuffed body and terminator go
//! out in one write, and gives us each RCPT reply (452 handling, SMTPUTF8).
//! Switch back to `SmtpTransport` once a lettre release contains the
//! TCP_NODELAY fix (lettre PR #1159) and per-recipient results: only this
//! module changes.

mod classify;
mod deadline;
mod outbox;
mod session;
mod smtp;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lettre::transport::smtp::client::{Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

use crate::config::{Relay, SmtpSettings, TlsMode};
use crate::message::{MessageError, OutgoingMessage};

pub use classify::{DeliveryError, FailureKind, SmtpReply};
pub use deadline::Deadline;
pub use session::{abandoned_outcome, SmtpSender};

/// A connection idle longer than this is closed rather than reused: many
/// relays drop idle clients after a minute or so.
pub const IDLE_LIMIT: Duration = Duration::from_secs(50);

/// A recipient the relay did not take, with its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRefusal {
    /// The address as given to `RCPT TO`.
    pub recipient: String,
    /// The relay's reply to it.
    pub reply: SmtpReply,
}

impl std::fmt::Display for RecipientRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.recipient, self.reply)
    }
}

/// Facts of one attempt (one or more transactions on one connection).
///
/// When a transaction after the first fails (a 452 split the recipients
/// and the relay then stopped answering), the recipients it carried are
/// in `deferred` (or `refused` for a 5xx) with the relay's reply, or with
/// a local `421 4.4.2` reply naming the failure when there was no reply:
/// those already accepted must not be sent again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The relay took the message for these.
    pub accepted: Vec<String>,
    /// 5xx to RCPT TO: never retried.
    pub refused: Vec<RecipientRefusal>,
    /// 4xx to RCPT TO (and recipients still refused as "too many" after
    /// the further transactions): to retry later.
    pub deferred: Vec<RecipientRefusal>,
    /// The relay's reply to the last end of data (None when nothing was sent).
    pub reply: Option<SmtpReply>,
}

impl Delivered {
    /// When no recipient was accepted: the failure it amounts to
    /// (permanent when every recipient was refused with a 5xx, else
    /// transient), naming each recipient with its reply.
    pub fn failure(&self) -> Option<DeliveryError> {
        if !self.accepted.is_empty() {
            return None;
        }
        let first = self.refused.first().or(self.deferred.first())?;
        let kind = if self.deferred.is_empty() {
            FailureKind::Permanent
        } else {
            FailureKind::Transient
        };
        let mut parts: Vec<String> = self.refused.iter().map(ToString::to_string).collect();
        parts.extend(self.deferred.iter().map(ToString::to_string));
        Some(DeliveryError::from_reply(
            kind,
            first.reply.clone(),
            format!("every recipient refused: {}", parts.join("; ")),
            false,
        ))
    }
}

/// What a relay offers, as its last EHLO said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// SMTPUTF8 (RFC 6531): UTF-8 addresses and headers.
    pub smtputf8: bool,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// STARTTLS (before it was used).
    pub starttls: bool,
    /// PIPELINING (RFC 2920): envelopes go in one write.
    pub pipelining: bool,
    /// CHUNKING (RFC 3030), offered; not used (see docs/performance.md).
    pub chunking: bool,
    /// SIZE (RFC 1870): the largest message the relay takes, in octets,
    /// when it names a limit.
    pub max_size: Option<u64>,
}

/// What the relay offers, once a connection has been made; shared by the
/// factory, its transports and the engine, updated on each EHLO.
#[derive(Debug, Clone, Default)]
pub struct RelayCapabilities {
    known: Arc<RwLock<Option<Capabilities>>>,
}

impl RelayCapabilities {
    /// The capabilities from the latest EHLO, if any connection was made.
    pub fn known(&self) -> Option<Capabilities> {
        *self
            .known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn record(&self, capabilities: Capabilities) {
        let mut known = self
            .known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *known != Some(capabilities) {
            *known = Some(capabilities);
        }
    }
}

/// A message that can never be delivered through the relay whose
/// capabilities are known: the reason, for a 400 at submit time. `None`
/// when it may go, or when nothing is known yet (then the attempt fails
/// permanently with the same reason).
pub fn refuse_at_submit(
    message: &OutgoingMessage,
    capabilities: &RelayCapabilities,
) -> Option<MessageError> {
    let known = capabilities.known()?;
    undeliverable(message, || known.smtputf8, known.max_size)
}

/// Why `message` can never go through a relay that offers SMTPUTF8 (asked
/// only when the message needs it) and takes at most `max_size` octets;
/// `None` when it may. The one rule for submit time and for each attempt.
pub(crate) fn undeliverable(
    message: &OutgoingMessage,
    offers_smtputf8: impl FnOnce() -> bool,
    max_size: Option<u64>,
) -> Option<MessageError> {
    if message.needs_smtputf8() && !offers_smtputf8() {
        return Some(smtputf8_refusal(message));
    }
    let size = message.content.len() as u64;
    match max_size {
        Some(limit) if size > limit => Some(MessageError::TooLargeForRelay { size, limit }),
        _ => None,
    }
}

/// The refusal for a message that needs SMTPUTF8 at a relay without it.
fn smtputf8_refusal(message: &OutgoingMessage) -> MessageError {
    let address = std::iter::once(&message.envelope_from)
        .chain(&message.recipients)
        .find(|address| !address.is_ascii())
        .cloned()
        .unwrap_or_default();
    MessageError::NeedsSmtpUtf8 { address }
}

/// Set up once at start and shared by the workers.
#[derive(Clone)]
pub struct TransportFactory {
    relay: Relay,
    tls: Option<TlsParameters>,
    capabilities: RelayCapabilities,
    /// Transports given up at their deadline whose threads still wait on
    /// the relay (see `deadline`).
    abandoned: Arc<AtomicUsize>,
}

impl TransportFactory {
    /// Prepares TLS parameters (trusted roots) for the configured relay.
    pub fn new(relay: &Relay) -> Result<TransportFactory, String> {
        let tls = match relay {
            Relay::Smtp(smtp) if smtp.tls != TlsMode::None => Some(tls_parameters(smtp)?),
            _ => None,
        };
        if let Relay::Outbox(dir) = relay {
            fs::create_dir_all(dir).map_err(|error| {
                format!(
                    "MAILROOM_OUTBOX_DIR={}: cannot create it: {error}",
                    dir.display()
                )
            })?;
        }
        Ok(TransportFactory {
            relay: relay.clone(),
            tls,
            capabilities: RelayCapabilities::default(),
            abandoned: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The relay's capabilities, known after the first connection.
    pub fn capabilities(&self) -> RelayCapabilities {
        self.capabilities.clone()
    }

    /// A transport for one worker.
    pub fn transport(&self) -> Transport {
        match &self.relay {
            Relay::Smtp(settings) => Transport::Smtp(Box::new(SmtpSender::new(
                Arc::new(session::SessionConfig {
                    settings: settings.clone(),
                    tls: self.tls.clone(),
                    hello: hello_name(settings),
                    capabilities: self.capabilities.clone(),
                }),
                Arc::clone(&self.abandoned),
            ))),
            Relay::Outbox(dir) => Transport::Outbox(dir.clone()),
        }
    }
}

fn hello_name(settings: &SmtpSettings) -> ClientId {
    settings
        .hello_name
        .clone()
        .map(ClientId::Domain)
        .unwrap_or_default()
}

fn tls_parameters(smtp: &SmtpSettings) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(smtp.host.clone());
    if let Some(pem) = &smtp.extra_root_pem {
        for certificate in split_pem_certificates(pem) {
            let certificate = Certificate::from_pem(certificate.as_bytes()).map_err(|error| {
                format!("MAILROOM_SMTP_CA_FILE: not a PEM certificate: {error}")
            })?;
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build_rustls()
        .map_err(|error| format!("TLS setup for the relay failed: {error}"))
}

/// What a transport tells its caller during an attempt.
pub struct Hooks<'a> {
    /// A new SMTP connection was opened.
    pub connected: &'a dyn Fn(),
    /// Message `id`'s attempt delivered this much in earlier transactions
    /// and goes on with a further one for the pending recipients (a
    /// recipient limit): what to report if it is given up at its deadline.
    pub progress: &'a dyn Fn(&str, &Delivered, &[String]),
}

/// Where an attempt stands after its envelope.
#[derive(Debug)]
#[must_use]
pub enum Step {
    /// The relay waits for the body: call [`Transport::finish`].
    Ready,
    /// The attempt is over (nothing was accepted, it failed, or it went).
    Done(Result<Delivered, DeliveryError>),
}

/// One worker's way to deliver.
pub enum Transport {
    /// SMTP relay, one connection reused across messages.
    Smtp(Box<SmtpSender>),
    /// `.eml` files in a directory.
    Outbox(PathBuf),
}

impl Transport {
    /// Starts an attempt: connects if needed, sends the envelope and reads
    /// the replies; [`Step::Ready`] when the body is to go.
    pub fn begin(
        &mut self,
        message: &Arc<OutgoingMessage>,
        recipients: &[String],
        hooks: &Hooks<'_>,
    ) -> Step {
        match self {
            Transport::Smtp(sender) => sender.begin(message, recipients, hooks),
            Transport::Outbox(dir) => Step::Done(outbox::write(dir, message, recipients)),
        }
    }

    /// Ends the attempt begun last (after [`Step::Ready`]): its body, and
    /// any further transactions a recipient limit asks for. With `next`,
    /// begins that attempt as well (its envelope in the same write as this
    /// body when the relay offers PIPELINING) and says where it stands.
    pub fn finish(
        &mut self,
        next: Option<(&Arc<OutgoingMessage>, &[String])>,
        hooks: &Hooks<'_>,
    ) -> (Result<Delivered, DeliveryError>, Option<Step>) {
        match self {
            Transport::Smtp(sender) => sender.finish(next, hooks),
            Transport::Outbox(dir) => (
                Err(DeliveryError::transient(
                    "no attempt was waiting for its body".into(),
                    false,
                )),
                next.map(|(message, recipients)| {
                    Step::Done(outbox::write(dir, message, recipients))
                }),
            ),
        }
    }

    /// True when [`Transport::finish`] would send another message's
    /// envelope together with this body: worth taking the next message now.
    pub fn wants_next(&self) -> bool {
        match self {
            Transport::Smtp(sender) => sender.wants_next(),
            Transport::Outbox(_) => false,
        }
    }

    /// The deadline of the phase running, for a supervisor (SMTP only).
    pub fn deadline(&self) -> Option<Arc<Deadline>> {
        match self {
            Transport::Smtp(sender) => Some(Arc::clone(sender.deadline())),
            Transport::Outbox(_) => None,
        }
    }

    /// A transport like this one, not connected: for a worker replacing
    /// one given up at its deadline.
    pub fn replacement(&self) -> Transport {
        match self {
            Transport::Smtp(sender) => Transport::Smtp(Box::new(sender.replacement())),
            Transport::Outbox(dir) => Transport::Outbox(dir.clone()),
        }
    }

    /// Closes the connection if it has been idle longer than [`IDLE_LIMIT`].
    pub fn close_if_idle(&mut self) {
        if let Transport::Smtp(sender) = self {
            sender.close_if_idle(IDLE_LIMIT);
        }
    }

    /// Says QUIT and closes any open connection.
    pub fn close(&mut self) {
        if let Transport::Smtp(sender) = self {
            sender.close();
        }
    }
}

/// `mailroom --check --smtp`: connect, STARTTLS, AUTH and QUIT against the
/// configured relay, reporting each step; bounded by the SMTP timeout for
/// each step.
pub fn check_relay(relay: &Relay, report: &mut dyn FnMut(&str)) -> Result<(), DeliveryError> {
    let factory =
        TransportFactory::new(relay).map_err(|detail| DeliveryError::transient(detail, true))?;
    let Relay::Smtp(settings) = relay else {
        report("no relay configured: messages go to the outbox directory");
        return Ok(());
    };
    session::check(
        settings,
        factory.tls.as_ref(),
        &hello_name(settings),
        report,
    )
}

fn split_pem_certificates(pem: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(pem);
    let mut certificates = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END CERTIFICATE-----") {
            certificates.push(std::mem::take(&mut current));
        }
    }
    certificates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(recipient: &str, code: u16) -> RecipientRefusal {
        RecipientRefusal {
            recipient: recipient.into(),
            reply: SmtpReply {
                code,
                text: "no".into(),
            },
        }
    }

    #[test]
    fn nothing_accepted_is_a_failure() {
        let all_refused = Delivered {
            refused: vec![refusal("a@b.c", 550), refusal("d@e.f", 550)],
            ..Delivered::default()
        };
        let error = all_refused.failure().unwrap();
        assert_eq!(error.kind, FailureKind::Permanent);
        assert_eq!(error.smtp_code, Some(550));
        assert!(error.detail.contains("a@b.c: 550 no") && error.detail.contains("d@e.f"));
        let some_deferred = Delivered {
            refused: vec![refusal("a@b.c", 550)],
            deferred: vec![refusal("d@e.f", 450)],
            ..Delivered::default()
        };
        assert_eq!(
            some_deferred.failure().unwrap().kind,
            FailureKind::Transient
        );
        let some_accepted = Delivered {
            accepted: vec!["x@y.z".into()],
            ..some_deferred
        };
        assert!(some_accepted.failure().is_none());
    }

    #[test]
    fn submit_refusal_needs_known_capabilities() {
        let message = OutgoingMessage {
            id: "x".into(),
            envelope_from: "a@b.c".into(),
            recipients: vec!["jörg@example.com".into()],
            content: String::new(),
        };
        let capabilities = RelayCapabilities::default();
        assert!(refuse_at_submit(&message, &capabilities).is_none());
        capabilities.record(Capabilities::default());
        let refusal = refuse_at_submit(&message, &capabilities).unwrap();
        assert!(
            refusal.to_string().contains("jörg@example.com"),
            "{refusal}"
        );
        capabilities.record(Capabilities {
            smtputf8: true,
            ..Capabilities::default()
        });
        assert!(refuse_at_submit(&message, &capabilities).is_none());
    }
}
