//! Delivery of one message: over SMTP through a connection each worker keeps
//! open, or into the outbox directory. Also decides which failures are worth
//! retrying.
//!
//! Why lettre's `SmtpConnection` and not `SmtpTransport`: lettre 0.11.23
//! writes a message body and its final `.` in two writes without
//! TCP_NODELAY, so every message on a reused connection waits ~44 ms for a
//! delayed ACK (23 messages/s per connection). Driving lettre's public
//! `SmtpConnection` ourselves lets the dot-stuffed body and terminator go
//! out in one write. Switch back to `SmtpTransport` once a lettre release
//! contains the TCP_NODELAY fix (lettre PR #1159): only this module changes.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::Error as SmtpError;

use crate::config::{is_loopback_host, Relay, SmtpSettings, TlsMode};
use crate::message::OutgoingMessage;

/// A connection idle longer than this is closed rather than reused: many
/// relays drop idle clients after a minute or so.
pub const IDLE_LIMIT: Duration = Duration::from_secs(50);

/// Whether a failed delivery may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Try again later.
    Transient,
    /// Do not try again.
    Permanent,
}

/// A failed delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// Retry or not.
    pub kind: FailureKind,
    /// The relay's reply code, when there was a reply.
    pub smtp_code: Option<u16>,
    /// What happened, with the relay's reply text.
    pub detail: String,
    /// The relay itself is unusable (unreachable, TLS or AUTH failing), as
    /// opposed to this message being refused.
    pub relay_unusable: bool,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl DeliveryError {
    /// An error of `kind` saying `detail`, for the engine's unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(kind: FailureKind, detail: &str) -> DeliveryError {
        DeliveryError {
            kind,
            smtp_code: None,
            detail: detail.to_string(),
            relay_unusable: false,
        }
    }

    fn transient(detail: String, relay_unusable: bool) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Transient,
            smtp_code: None,
            detail,
            relay_unusable,
        }
    }
}

/// A reply from the relay: its code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// The three-digit reply code.
    pub code: u16,
    /// The reply text, without the code.
    pub text: String,
}

impl SmtpReply {
    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<(u8, u16, u16)> {
        let first = self.text.split_whitespace().next()?;
        let mut parts = first.split('.');
        let class = parts.next()?.parse().ok()?;
        let subject = parts.next()?.parse().ok()?;
        let detail = parts.next()?.parse().ok()?;
        (parts.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// One recipient the relay did not take, and its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRefusal {
    /// The envelope address.
    pub recipient: String,
    /// What the relay answered to its `RCPT TO`.
    pub reply: SmtpReply,
}

/// The facts of one attempt: who got the message, who was refused for
/// good (5xx), who should be tried again later (4xx).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The relay took the message for these.
    pub accepted: Vec<String>,
    /// Refused with a 5xx to `RCPT TO`: never retried.
    pub refused: Vec<RecipientRefusal>,
    /// Refused with a 4xx to `RCPT TO`: to try again later.
    pub deferred: Vec<RecipientRefusal>,
    /// The reply to the end of the data (None when nothing was sent).
    pub reply: Option<SmtpReply>,
}

/// Set up once at start and shared by the workers.
#[derive(Clone)]
pub struct TransportFactory {
    relay: Relay,
    tls: Option<TlsParameters>,
}

impl TransportFactory {
    /// Prepares TLS parameters (trusted roots) for the configured relay.
    pub fn new(relay: &Relay) -> Result<TransportFactory, String> {
        let tls = match relay {
            Relay::Smtp(smtp) if smtp.tls != TlsMode::None => {
                let mut builder = TlsParameters::builder(smtp.host.clone());
                if let Some(pem) = &smtp.extra_root_pem {
                    for certificate in split_pem_certificates(pem) {
                        let certificate =
                            Certificate::from_pem(certificate.as_bytes()).map_err(|error| {
                                format!("MAILROOM_SMTP_CA_FILE: not a PEM certificate: {error}")
                            })?;
                        builder = builder.add_root_certificate(certificate);
                    }
                }
                Some(
                    builder
                        .build_rustls()
                        .map_err(|error| format!("TLS setup for the relay failed: {error}"))?,
                )
            }
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
        })
    }

    /// A transport for one worker.
    pub fn transport(&self) -> Transport {
        match &self.relay {
            Relay::Smtp(settings) => Transport::Smtp(Box::new(SmtpSender {
                settings: Arc::new(settings.clone()),
                tls: self.tls.clone(),
                hello: settings
                    .hello_name
                    .clone()
                    .map(ClientId::Domain)
                    .unwrap_or_else(ClientId::default),
                connection: None,
            })),
            Relay::Outbox(dir) => Transport::Outbox(dir.clone()),
        }
    }
}

/// One worker's way to deliver.
pub enum Transport {
    /// SMTP relay, one connection reused across messages.
    Smtp(Box<SmtpSender>),
    /// `.eml` files in a directory.
    Outbox(PathBuf),
}

impl Transport {
    /// Delivers one message. `on_connect` is called for each new SMTP connection.
    pub fn deliver(
        &mut self,
        message: &OutgoingMessage,
        recipients: &[String],
        on_connect: &dyn Fn(),
    ) -> Result<Delivered, DeliveryError> {
        match self {
            Transport::Smtp(sender) => sender.deliver(message, recipients, on_connect),
            Transport::Outbox(dir) => write_outbox(dir, message, recipients),
        }
    }

    /// Closes the connection if it has been idle longer than [`IDLE_LIMIT`].
    pub fn close_if_idle(&mut self) {
        if let Transport::Smtp(sender) = self {
            if sender
                .connection
                .as_ref()
                .is_some_and(|open| open.last_used.elapsed() >= IDLE_LIMIT)
            {
                sender.close();
            }
        }
    }

    /// Says QUIT and closes any open connection.
    pub fn close(&mut self) {
        if let Transport::Smtp(sender) = self {
            sender.close();
        }
    }
}

fn write_outbox(
    dir: &std::path::Path,
    message: &OutgoingMessage,
    recipients: &[String],
) -> Result<Delivered, DeliveryError> {
    let write = || -> std::io::Result<()> {
        let temporary = dir.join(format!(".{}.eml.tmp", message.id));
        let mut file = fs::File::create(&temporary)?;
        file.write_all(message.content.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temporary, dir.join(format!("{}.eml", message.id)))
    };
    write()
        .map(|()| Delivered {
            accepted: recipients.to_vec(),
            ..Delivered::default()
        })
        .map_err(|error| {
            DeliveryError::transient(
                format!("cannot write to outbox {}: {error}", dir.display()),
                true,
            )
        })
}

struct OpenConnection {
    smtp: SmtpConnection,
    last_used: Instant,
}

/// Delivers over SMTP, keeping one connection open between messages.
pub struct SmtpSender {
    settings: Arc<SmtpSettings>,
    tls: Option<TlsParameters>,
    hello: ClientId,
    connection: Option<OpenConnection>,
}

/// How a send on an open connection went wrong.
struct SendFailure {
    error: DeliveryError,
    /// The connection is still in a known state and may be reused.
    connection_usable: bool,
    /// The connection was dead (closed, cut off, 421): not the message's fault.
    connection_dead: bool,
}

impl SendFailure {
    fn from_smtp(error: SmtpError) -> SendFailure {
        let code = error.status().map(u16::from);
        SendFailure {
            // A negative reply leaves the session in a known state (RSET
            // fixes it); an I/O error or garbled reply does not.
            connection_usable: code.is_some_and(|code| code != 421),
            connection_dead: match code {
                Some(code) => code == 421,
                None => !error.is_client() && !error.is_tls(),
            },
            error: classify(&error, false),
        }
    }

    fn invalid(detail: String) -> SendFailure {
        SendFailure {
            error: DeliveryError {
                kind: FailureKind::Permanent,
                smtp_code: None,
                detail,
                relay_unusable: false,
            },
            connection_usable: true,
            connection_dead: false,
        }
    }
}

impl SmtpSender {
    fn deliver(
        &mut self,
        message: &OutgoingMessage,
        recipients: &[String],
        on_connect: &dyn Fn(),
    ) -> Result<Delivered, DeliveryError> {
        let reused = self.connection.is_some();
        let mut open = match self.connection.take() {
            Some(open) => open,
            None => self.connect(on_connect)?,
        };
        let mut result = send(&mut open.smtp, message, recipients);
        if reused {
            if let Err(failure) = &result {
                if failure.connection_dead {
                    // The relay closed the idle connection or said 421 on
                    // reuse: not the message's fault, and not an attempt.
                    log::debug!(
                        "message {}: reused SMTP connection is dead ({}), reconnecting",
                        message.id,
                        failure.error
                    );
                    open.smtp.abort();
                    open = self.connect(on_connect)?;
                    result = send(&mut open.smtp, message, recipients);
                }
            }
        }
        match result {
            Ok(delivered) => {
                open.last_used = Instant::now();
                self.connection = Some(open);
                Ok(delivered)
            }
            Err(failure) => {
                if failure.connection_usable && open.smtp.command(Rset).is_ok() {
                    open.last_used = Instant::now();
                    self.connection = Some(open);
                } else {
                    open.smtp.abort();
                }
                Err(failure.error)
            }
        }
    }

    fn connect(&self, on_connect: &dyn Fn()) -> Result<OpenConnection, DeliveryError> {
        let smtp = connect(&self.settings, self.tls.as_ref(), &self.hello)?;
        on_connect();
        Ok(OpenConnection {
            smtp,
            last_used: Instant::now(),
        })
    }

    fn close(&mut self) {
        if let Some(mut open) = self.connection.take() {
            let _ = open.smtp.quit();
            open.smtp.abort();
        }
    }
}

impl Drop for SmtpSender {
    fn drop(&mut self) {
        self.close();
    }
}

/// Opens a connection, upgrades it to TLS and authenticates, as configured.
/// Used by the workers and by `mailroom --check --smtp` (`report` gets one
/// line per step).
pub fn connect_with_report(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
    report: &mut dyn FnMut(&str),
) -> Result<SmtpConnection, DeliveryError> {
    let endpoint = settings.endpoint();
    let unusable = |step: &str, error: SmtpError| {
        let mut failure = classify(&error, true);
        failure.detail = format!("{step} {endpoint}: {}", failure.detail);
        failure
    };
    let mut smtp = if settings.tls == TlsMode::Implicit {
        connect_implicit_tls(settings, tls, hello)?
    } else {
        SmtpConnection::connect(
            (settings.host.as_str(), settings.port),
            Some(settings.timeout),
            hello,
            None,
            None,
        )
        .map_err(|error| unusable("connect to", error))?
    };
    report(&format!(
        "connected to {endpoint}{}",
        if smtp.is_encrypted() { " (TLS)" } else { "" }
    ));
    match (settings.tls, tls) {
        (TlsMode::Required | TlsMode::Opportunistic, Some(parameters)) if smtp.can_starttls() => {
            smtp.starttls(parameters, hello)
                .map_err(|error| unusable("STARTTLS with", error))?;
            report("STARTTLS: ok");
        }
        (TlsMode::Required, _) => {
            smtp.abort();
            return Err(DeliveryError::transient(
                format!("{endpoint} does not offer STARTTLS, and MAILROOM_SMTP_URL requires it"),
                true,
            ));
        }
        _ => {}
    }
    if let Some((user, password)) = &settings.credentials {
        if !smtp.is_encrypted() && !is_loopback_host(&settings.host) {
            smtp.abort();
            return Err(DeliveryError::transient(
                format!(
                    "refusing to send credentials to {endpoint} over an unencrypted connection"
                ),
                true,
            ));
        }
        let credentials = Credentials::new(user.clone(), password.expose().to_string());
        smtp.auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
            .map_err(|error| unusable("AUTH at", error))?;
        report("AUTH: ok");
    }
    Ok(smtp)
}

/// `mailroom --check --smtp`: connect, STARTTLS, AUTH and QUIT against the
/// configured relay, reporting each step.
pub fn check_relay(relay: &Relay, report: &mut dyn FnMut(&str)) -> Result<(), DeliveryError> {
    let factory =
        TransportFactory::new(relay).map_err(|detail| DeliveryError::transient(detail, true))?;
    let Relay::Smtp(settings) = relay else {
        report("no relay configured: messages go to the outbox directory");
        return Ok(());
    };
    let hello = settings
        .hello_name
        .clone()
        .map(ClientId::Domain)
        .unwrap_or_default();
    let mut smtp = connect_with_report(settings, factory.tls.as_ref(), &hello, report)?;
    match smtp.quit() {
        Ok(_) => report("QUIT: ok"),
        Err(error) => report(&format!("QUIT: {error}")),
    }
    Ok(())
}

fn connect(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
) -> Result<SmtpConnection, DeliveryError> {
    connect_with_report(settings, tls, hello, &mut |_| {})
}

/// lettre applies its timeout only after an implicit-TLS handshake, so a
/// relay that accepts TCP and stays silent would hang the worker forever.
/// The connect runs on a helper thread; past the timeout the worker gives
/// up and the helper ends whenever the socket does.
fn connect_implicit_tls(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
) -> Result<SmtpConnection, DeliveryError> {
    let (sender, receiver) = mpsc::channel();
    let address = (settings.host.clone(), settings.port);
    let timeout = settings.timeout;
    let tls = tls.cloned();
    let hello = hello.clone();
    std::thread::Builder::new()
        .name("smtps-connect".into())
        .spawn(move || {
            let result =
                SmtpConnection::connect(address, Some(timeout), &hello, tls.as_ref(), None);
            let _ = sender.send(result);
        })
        .map_err(|error| {
            DeliveryError::transient(format!("cannot start a connect thread: {error}"), false)
        })?;
    let endpoint = settings.endpoint();
    match receiver.recv_timeout(timeout + Duration::from_millis(500)) {
        Ok(Ok(smtp)) => Ok(smtp),
        Ok(Err(error)) => {
            let mut failure = classify(&error, true);
            failure.detail = format!("TLS connect to {endpoint}: {}", failure.detail);
            Err(failure)
        }
        Err(_) => Err(DeliveryError::transient(
            format!(
                "TLS connect to {endpoint}: no handshake within {} ms",
                timeout.as_millis()
            ),
            true,
        )),
    }
}

/// MAIL, RCPT for each recipient, DATA, then the body and its terminator in
/// one write. Refused recipients are skipped when others are accepted.
fn send(
    smtp: &mut SmtpConnection,
    message: &OutgoingMessage,
    recipients: &[String],
) -> Result<Delivered, SendFailure> {
    let mut parameters = Vec::new();
    if !message.content.is_ascii() && smtp.server_info().supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let from = message.envelope_from.parse().map_err(|_| {
        SendFailure::invalid(format!(
            "invalid envelope sender {:?}",
            message.envelope_from
        ))
    })?;
    smtp.command(Mail::new(Some(from), parameters))
        .map_err(SendFailure::from_smtp)?;
    let mut delivered = Delivered::default();
    for recipient in recipients {
        let address = recipient
            .parse()
            .map_err(|_| SendFailure::invalid(format!("invalid recipient {recipient:?}")))?;
        match smtp.command(Rcpt::new(address, Vec::new())) {
            Ok(_) => delivered.accepted.push(recipient.clone()),
            Err(error)
                if error.status().is_some() && error.status().map(u16::from) != Some(421) =>
            {
                let refusal = RecipientRefusal {
                    recipient: recipient.clone(),
                    reply: SmtpReply {
                        code: error.status().map(u16::from).unwrap_or_default(),
                        text: reply_text(&error),
                    },
                };
                if error.is_permanent() {
                    delivered.refused.push(refusal);
                } else {
                    delivered.deferred.push(refusal);
                }
            }
            Err(error) => return Err(SendFailure::from_smtp(error)),
        }
    }
    if delivered.accepted.is_empty() {
        // Nobody to send to: end the transaction (a failed RSET shows at the next use).
        let _ = smtp.command(Rset);
        return Ok(delivered);
    }
    smtp.command(Data).map_err(SendFailure::from_smtp)?;
    let reply = smtp
        .command(DataBody(&message.content))
        .map_err(SendFailure::from_smtp)?;
    delivered.reply = Some(SmtpReply {
        code: u16::from(reply.code()),
        text: reply.message().collect::<Vec<_>>().join(" "),
    });
    Ok(delivered)
}

/// The body after DATA: dot-stuffed, with the terminating `.` line, written
/// by lettre in a single write (see the module documentation).
struct DataBody<'a>(&'a str);

impl fmt::Display for DataBody<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Most messages have no line starting with '.': copy them whole
        // instead of line by line (this runs for every delivery).
        if !self.0.starts_with('.') && !self.0.contains("\n.") {
            f.write_str(self.0)?;
            return f.write_str("\r\n.\r\n");
        }
        let mut at_line_start = true;
        let mut rest = self.0;
        while !rest.is_empty() {
            if at_line_start && rest.starts_with('.') {
                f.write_str(".")?;
            }
            match rest.find('\n') {
                Some(end) => {
                    f.write_str(&rest[..=end])?;
                    rest = &rest[end + 1..];
                    at_line_start = true;
                }
                None => {
                    f.write_str(rest)?;
                    rest = "";
                    at_line_start = false;
                }
            }
        }
        f.write_str("\r\n.\r\n")
    }
}

/// Decides retry or not. `while_connecting`: the error came from connecting,
/// STARTTLS or AUTH (a relay or configuration problem, never the message's).
pub fn classify(error: &SmtpError, while_connecting: bool) -> DeliveryError {
    let smtp_code = error.status().map(u16::from);
    let detail = match smtp_code {
        Some(code) => format!("{code} {}", reply_text(error)),
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
        detail,
        relay_unusable: while_connecting || smtp_code.is_none(),
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

    #[test]
    fn dot_stuffing_and_terminator() {
        assert_eq!(
            DataBody("a\r\n.b\r\n..c\r\n").to_string(),
            "a\r\n..b\r\n...c\r\n\r\n.\r\n"
        );
        assert_eq!(DataBody(".x").to_string(), "..x\r\n.\r\n");
        assert_eq!(
            DataBody("a\r\nb. c\r\n").to_string(),
            "a\r\nb. c\r\n\r\n.\r\n"
        );
    }
}
