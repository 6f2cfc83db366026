//! What runs on a worker's connection thread: connecting (greeting, EHLO,
//! STARTTLS, AUTH) and the MAIL/RCPT/DATA transactions of one attempt,
//! with per-recipient results.
//!
//! Commands go one at a time; the replies are handled in order, so
//! PIPELINING (RFC 2920) can later write MAIL, every RCPT and DATA at once
//! and read the same replies here.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lettre::address::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;

use super::classify::{classify, DeliveryError, FailureKind, SmtpReply};
use super::session::Deadline;
use super::{smtputf8_refusal, Capabilities, Delivered, RecipientRefusal};
use crate::config::{is_loopback_host, SmtpSettings, TlsMode};
use crate::message::OutgoingMessage;

/// Bodies larger than this go to lettre in pieces (its own dot-stuffing)
/// instead of as one formatted string: no second copy of a large message.
const LARGE_BODY: usize = 1 << 20;
/// The pieces of a large body.
const BODY_CHUNK: usize = 64 * 1024;

/// An open connection on a connection thread.
pub(super) struct Open {
    pub smtp: SmtpConnection,
    /// The per-read timeout last applied to the socket.
    read_timeout: Duration,
    /// The session is no longer in a known state (I/O error, cut-off
    /// reply, 421): it must not be reused.
    pub broken: bool,
}

/// Where an attempt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Before anything was sent (a local refusal).
    Local,
    Mail,
    Rcpt,
    Data,
    /// The message itself and its final reply.
    Body,
}

/// A failed attempt, with where it stopped.
pub(super) struct Failure {
    pub error: DeliveryError,
    pub stage: Stage,
    /// The relay closed the connection or said 421: on a reused
    /// connection before the body went, not the message's fault.
    pub connection_dead: bool,
}

impl Failure {
    fn local(error: DeliveryError) -> Failure {
        Failure {
            error,
            stage: Stage::Local,
            connection_dead: false,
        }
    }
}

impl Open {
    /// A fresh connection, its per-read timeout as lettre set it.
    pub fn new(smtp: SmtpConnection, timeout: Duration) -> Open {
        Open {
            smtp,
            read_timeout: timeout,
            broken: false,
        }
    }

    /// Keeps a read from outliving the phase's deadline by much: lowers
    /// the per-read timeout when the deadline is nearer than the one in
    /// force (a setsockopt only then, so a quick transaction makes none).
    fn bound_reads(&mut self, deadline: &Deadline) {
        let remaining = deadline.remaining().max(Duration::from_millis(1));
        let slack = (deadline.timeout() / 4).min(Duration::from_secs(1));
        if remaining + slack < self.read_timeout {
            let _ = self.smtp.set_timeout(Some(remaining));
            self.read_timeout = remaining;
        }
    }

    /// One command and its reply. An I/O error, a cut-off reply or a 421
    /// marks the session broken.
    fn command<C: fmt::Display>(
        &mut self,
        command: C,
        deadline: &Deadline,
    ) -> Result<Response, SmtpError> {
        self.bound_reads(deadline);
        let result = self.smtp.command(command);
        self.note(&result);
        result
    }

    fn note(&mut self, result: &Result<Response, SmtpError>) {
        if let Err(error) = result {
            let code = error.status().map(u16::from);
            if code.is_none_or(|code| code == 421) {
                self.broken = true;
            }
        }
    }

    fn failure(&self, error: SmtpError, stage: Stage) -> Failure {
        let code = error.status().map(u16::from);
        let dead = match code {
            Some(code) => code == 421,
            None => !error.is_client() && !error.is_tls(),
        };
        Failure {
            error: classify(error, false),
            stage,
            connection_dead: dead,
        }
    }

    /// RSET after a negative reply; a failure there breaks the session.
    pub fn reset(&mut self, deadline: &Deadline) {
        if !self.broken && self.command(Rset, deadline).is_err() {
            self.broken = true;
        }
    }

    /// The body and its terminator.
    fn body(&mut self, content: &str, deadline: &Deadline) -> Result<Response, SmtpError> {
        self.bound_reads(deadline);
        let result = if content.len() <= LARGE_BODY {
            self.smtp.command(DataBody(content))
        } else {
            self.smtp
                .message_iter(content.as_bytes().chunks(BODY_CHUNK))
        };
        self.note(&result);
        result
    }
}

/// What the relay offers, from lettre's reading of EHLO.
pub(super) fn capabilities_of(smtp: &SmtpConnection) -> Capabilities {
    let info = smtp.server_info();
    Capabilities {
        smtputf8: info.supports_feature(Extension::SmtpUtfEight),
        eightbitmime: info.supports_feature(Extension::EightBitMime),
        starttls: info.supports_feature(Extension::StartTls),
    }
}

/// Opens a connection, upgrades it to TLS and authenticates, as configured.
/// Used by the connection threads and by `mailroom --check --smtp`
/// (`report` gets one line per step). Runs on a thread that may be
/// abandoned at a deadline: it blocks as long as lettre does.
pub fn connect_with_report(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
    report: &mut dyn FnMut(&str),
) -> Result<SmtpConnection, DeliveryError> {
    let endpoint = settings.endpoint();
    let implicit = settings.tls == TlsMode::Implicit;
    let step = if implicit {
        "TLS connect to"
    } else {
        "connect to"
    };
    let unusable = |step: &str, error: SmtpError| {
        classify(error, true).prefixed(&format!("{step} {endpoint}"))
    };
    let mut smtp = SmtpConnection::connect(
        (settings.host.as_str(), settings.port),
        Some(settings.timeout),
        hello,
        if implicit { tls } else { None },
        None,
    )
    .map_err(|error| unusable(step, error))?;
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

/// One transaction's results.
#[derive(Default)]
struct Transaction {
    accepted: Vec<String>,
    refused: Vec<RecipientRefusal>,
    deferred: Vec<RecipientRefusal>,
    /// Refused as "too many recipients": for a further transaction.
    too_many: Vec<String>,
    limit_reply: Option<SmtpReply>,
    /// The reply to the end of data.
    reply: Option<SmtpReply>,
}

/// One attempt: a transaction to `recipients`, then, while the relay
/// limits recipients per transaction (452) and each transaction takes at
/// least one, further transactions to the rest on the same connection.
/// `progress` is told what was delivered before each further transaction,
/// so a deadline in one of them does not lose what earlier ones delivered.
pub(super) fn attempt(
    open: &mut Open,
    message: &OutgoingMessage,
    recipients: &[String],
    deadline: &Deadline,
    progress: &dyn Fn(&Delivered, &[String]),
) -> Result<Delivered, Failure> {
    let parameters = mail_parameters(&open.smtp, message)?;
    let from = Address::from_str(&message.envelope_from).map_err(|_| {
        Failure::local(DeliveryError::permanent(format!(
            "invalid envelope sender {:?}",
            message.envelope_from
        )))
    })?;
    let mut delivered = Delivered::default();
    let mut pending: Vec<String> = recipients.to_vec();
    let mut first = true;
    loop {
        if !first {
            progress(&delivered, &pending);
            deadline.start_phase();
        }
        match transaction(open, message, &from, &parameters, &pending, deadline) {
            Ok(transaction) => {
                let took_some = !transaction.accepted.is_empty();
                delivered.accepted.extend(transaction.accepted);
                delivered.refused.extend(transaction.refused);
                delivered.deferred.extend(transaction.deferred);
                if transaction.reply.is_some() {
                    delivered.reply = transaction.reply;
                }
                if !took_some || transaction.too_many.is_empty() {
                    if let Some(reply) = transaction.limit_reply {
                        delivered
                            .deferred
                            .extend(transaction.too_many.into_iter().map(|recipient| {
                                RecipientRefusal {
                                    recipient,
                                    reply: reply.clone(),
                                }
                            }));
                    }
                    return Ok(delivered);
                }
                pending = transaction.too_many;
                first = false;
            }
            Err(failure) if first => return Err(failure),
            Err(failure) => {
                // Earlier transactions delivered: the rest are refused or
                // deferred with this failure, never sent again to all.
                let reply = failure.error.reply.clone().unwrap_or_else(|| SmtpReply {
                    code: 421,
                    text: format!("4.4.2 no reply from the relay: {}", failure.error.detail),
                });
                let refusals = pending.into_iter().map(|recipient| RecipientRefusal {
                    recipient,
                    reply: reply.clone(),
                });
                match failure.error.kind {
                    FailureKind::Permanent => delivered.refused.extend(refusals),
                    _ => delivered.deferred.extend(refusals),
                }
                if !open.broken {
                    open.reset(deadline);
                }
                return Ok(delivered);
            }
        }
    }
}

fn mail_parameters(
    smtp: &SmtpConnection,
    message: &OutgoingMessage,
) -> Result<Vec<MailParameter>, Failure> {
    let info = smtp.server_info();
    let mut parameters = Vec::new();
    if message.needs_smtputf8() {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure::local(DeliveryError::permanent(
                smtputf8_refusal(message).to_string(),
            )));
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !message.content.is_ascii() && info.supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    Ok(parameters)
}

fn transaction(
    open: &mut Open,
    message: &OutgoingMessage,
    from: &Address,
    parameters: &[MailParameter],
    recipients: &[String],
    deadline: &Deadline,
) -> Result<Transaction, Failure> {
    // A worker that gave up must not get a message delivered behind its
    // back (it reports a failure, and the message is tried again).
    if deadline.abandoned() {
        open.broken = true;
        return Err(Failure::local(abandoned()));
    }
    if let Err(error) = open.command(Mail::new(Some(from.clone()), parameters.to_vec()), deadline) {
        return Err(open.failure(error, Stage::Mail));
    }
    let mut result = Transaction::default();
    for recipient in recipients {
        if result.limit_reply.is_some() {
            // The relay's limit for this transaction is reached: the rest
            // go in the next one without asking now.
            result.too_many.push(recipient.clone());
            continue;
        }
        let Ok(address) = Address::from_str(recipient) else {
            result.refused.push(RecipientRefusal {
                recipient: recipient.clone(),
                reply: SmtpReply {
                    code: 553,
                    text: "5.1.3 mailroom: not a valid address for RCPT TO".into(),
                },
            });
            continue;
        };
        match open.command(Rcpt::new(address, Vec::new()), deadline) {
            Ok(_) => result.accepted.push(recipient.clone()),
            Err(error) => match SmtpReply::from_error(&error) {
                Some(reply) if reply.code != 421 && reply.is_too_many_recipients() => {
                    result.too_many.push(recipient.clone());
                    result.limit_reply = Some(reply);
                }
                Some(reply) if reply.is_permanent() => result.refused.push(RecipientRefusal {
                    recipient: recipient.clone(),
                    reply,
                }),
                Some(reply) if reply.code != 421 => result.deferred.push(RecipientRefusal {
                    recipient: recipient.clone(),
                    reply,
                }),
                _ => return Err(open.failure(error, Stage::Rcpt)),
            },
        }
    }
    if result.accepted.is_empty() {
        open.reset(deadline);
        return Ok(result);
    }
    if let Err(error) = open.command(Data, deadline) {
        return Err(open.failure(error, Stage::Data));
    }
    if deadline.abandoned() {
        // Closing without the final dot: the relay drops the transaction.
        open.broken = true;
        return Err(Failure::local(abandoned()));
    }
    match open.body(&message.content, deadline) {
        Ok(response) => {
            result.reply = Some(reply_of(&response));
            Ok(result)
        }
        Err(error) => Err(open.failure(error, Stage::Body)),
    }
}

fn abandoned() -> DeliveryError {
    DeliveryError::transient("given up at the deadline".into(), true)
}

fn reply_of(response: &Response) -> SmtpReply {
    SmtpReply {
        code: u16::from(response.code()),
        text: response.message().collect::<Vec<_>>().join(" "),
    }
}

/// The body after DATA: line ends made CRLF, dot-stuffed, with the
/// terminating `.` line, written by lettre in a single write (see the
/// module documentation of `transport`).
struct DataBody<'a>(&'a str);

impl fmt::Display for DataBody<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let content = self.0;
        // Messages built here have CRLF line ends only; most have no line
        // starting with '.': copy them whole (this runs for every delivery).
        if !content.starts_with('.') && !content.contains("\n.") && crlf_only(content) {
            f.write_str(content)?;
            return f.write_str("\r\n.\r\n");
        }
        let mut rest = content;
        while !rest.is_empty() {
            let (line, next) = match rest.find(['\r', '\n']) {
                Some(end) => {
                    let skip = if rest[end..].starts_with("\r\n") {
                        2
                    } else {
                        1
                    };
                    (&rest[..end], Some(&rest[end + skip..]))
                }
                None => (rest, None),
            };
            if line.starts_with('.') {
                f.write_str(".")?;
            }
            f.write_str(line)?;
            match next {
                Some(next) => {
                    f.write_str("\r\n")?;
                    rest = next;
                }
                None => rest = "",
            }
        }
        f.write_str("\r\n.\r\n")
    }
}

/// True when every CR is followed by LF and every LF preceded by CR.
fn crlf_only(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().all(|(index, &byte)| match byte {
        b'\r' => bytes.get(index + 1) == Some(&b'\n'),
        b'\n' => index > 0 && bytes[index - 1] == b'\r',
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_line_ends_and_terminator() {
        assert_eq!(
            DataBody("a\r\n.b\r\n..c").to_string(),
            "a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(DataBody(".x").to_string(), "..x\r\n.\r\n");
        assert_eq!(DataBody("a\r\nb. c").to_string(), "a\r\nb. c\r\n.\r\n");
        assert_eq!(
            DataBody("hi\r.\r\nMAIL FROM:<e@x>\nz").to_string(),
            "hi\r\n..\r\nMAIL FROM:<e@x>\r\nz\r\n.\r\n"
        );
        assert!(crlf_only("a\r\nb"));
        assert!(!crlf_only("a\nb"));
        assert!(!crlf_only("a\rb"));
        assert!(!crlf_only("\n"));
    }
}
