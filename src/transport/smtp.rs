//! The SMTP conversation, on the worker's thread: connecting (greeting,
//! EHLO, STARTTLS, AUTH), learning the extensions lettre does not parse,
//! and the envelope and body of each transaction, with per-recipient
//! results.
//!
//! With PIPELINING (RFC 2920) offered, MAIL FROM, the RCPT TOs and DATA go
//! in one write (groups of at most [`GROUP`] commands) and the replies are
//! read in order; otherwise one command at a time. Either way each reply
//! is judged by the same rules (`rcpt_reply`), so the per-recipient results
//! do not depend on pipelining. Everything goes through lettre's public
//! `SmtpConnection`: `command` writes any text and reads one reply,
//! `read_response` reads the next.

use std::fmt;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;

use super::classify::{classify, DeliveryError, SmtpReply};
use super::deadline::Deadline;
use super::{undeliverable, Capabilities, RecipientRefusal};
use crate::config::{is_loopback_host, SmtpSettings, TlsMode};
use crate::message::OutgoingMessage;

/// Bodies larger than this go to lettre in pieces (its own dot-stuffing)
/// instead of as one formatted string: no second copy of a large message.
pub(super) const LARGE_BODY: usize = 1 << 20;
/// The pieces of a large body.
const BODY_CHUNK: usize = 64 * 1024;
/// At most this many commands go in one pipelined write: their replies
/// (at most ~512 octets each) must fit in the socket buffers while we are
/// still writing, or both ends would wait on each other (RFC 2920 §3.1).
pub(super) const GROUP: usize = 100;

/// Extensions read from the EHLO reply that lettre does not keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Extensions {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// CHUNKING (RFC 3030).
    pub chunking: bool,
    /// SIZE (RFC 1870) with a limit: the largest message taken, in octets.
    pub max_size: Option<u64>,
}

/// An open connection.
pub(super) struct Open {
    pub smtp: SmtpConnection,
    /// The per-read timeout last applied to the socket.
    read_timeout: Duration,
    /// The phase length, the per-read timeout lettre was given.
    timeout: Duration,
    /// The session is no longer in a known state (I/O error, cut-off
    /// reply, 421): it must not be reused.
    pub broken: bool,
    /// What the relay offers beyond lettre's reading of EHLO.
    pub extensions: Extensions,
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

/// A failed transaction, with where it stopped.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: DeliveryError,
    pub stage: Stage,
    /// The relay closed the connection or said 421: on a reused
    /// connection before the body went, not the message's fault.
    pub connection_dead: bool,
}

impl Failure {
    pub fn local(error: DeliveryError) -> Failure {
        Failure {
            error,
            stage: Stage::Local,
            connection_dead: false,
        }
    }

    /// A dead pooled connection found before the body went: the message is
    /// tried again at once on a fresh connection, not counted as an attempt.
    pub fn is_dead_on_reuse(&self) -> bool {
        self.connection_dead && self.stage != Stage::Body && self.stage != Stage::Local
    }
}

impl Open {
    /// A fresh connection, its per-read timeout as lettre set it.
    pub fn new(smtp: SmtpConnection, timeout: Duration, extensions: Extensions) -> Open {
        Open {
            smtp,
            read_timeout: timeout,
            timeout,
            broken: false,
            extensions,
        }
    }

    /// Keeps a read from outliving the phase's deadline by much: the
    /// per-read timeout follows the time left in the phase, but is changed
    /// (a system call) only when it is well off, so a quick transaction
    /// makes none.
    fn bound_reads(&mut self, deadline: &Deadline) {
        let remaining = deadline
            .remaining()
            .clamp(Duration::from_millis(1), self.timeout);
        let slack = (self.timeout / 4).min(Duration::from_secs(1));
        let too_long = remaining + slack < self.read_timeout;
        // Lowered for a phase that nearly ran out, raised again for the next.
        let too_short = self.read_timeout + slack < remaining;
        if too_long || too_short {
            let _ = self.smtp.set_timeout(Some(remaining));
            self.read_timeout = remaining;
        }
    }

    /// Writes `text` and reads one reply. An I/O error, a cut-off reply or
    /// a 421 marks the session broken.
    pub fn send<C: fmt::Display>(
        &mut self,
        text: C,
        deadline: &Deadline,
    ) -> Result<Response, SmtpError> {
        self.bound_reads(deadline);
        let result = self.smtp.command(text);
        self.note(&result);
        result
    }

    /// Reads the next reply (of a pipelined group).
    fn read(&mut self, deadline: &Deadline) -> Result<Response, SmtpError> {
        self.bound_reads(deadline);
        let result = self.smtp.read_response();
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

    /// The failure a lettre error amounts to at `stage`.
    pub fn failure(&self, error: SmtpError, stage: Stage) -> Failure {
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
        if !self.broken && self.send(Rset, deadline).is_err() {
            self.broken = true;
        }
    }

    /// The body and its terminator, followed in the same write by
    /// `then` (the next transaction's pipelined envelope); reads the reply
    /// to the final dot.
    pub fn body(
        &mut self,
        content: &str,
        then: Option<&str>,
        deadline: &Deadline,
    ) -> Result<Response, SmtpError> {
        self.bound_reads(deadline);
        let result = if content.len() <= LARGE_BODY {
            let then = then.unwrap_or_default();
            let mut flight = String::with_capacity(content.len() + 5 + then.len());
            if plain_crlf(content) {
                flight.push_str(content);
                flight.push_str("\r\n.\r\n");
            } else {
                let _ = fmt::write(&mut flight, format_args!("{}", DataBody(content)));
            }
            flight.push_str(then);
            // A `str` is copied by lettre in one allocation of its size.
            self.smtp.command(flight.as_str())
        } else {
            self.smtp
                .message_iter(content.as_bytes().chunks(BODY_CHUNK))
        };
        self.note(&result);
        result
    }
}

/// What the relay offers, from lettre's reading of EHLO and ours.
pub(super) fn capabilities_of(smtp: &SmtpConnection, extensions: Extensions) -> Capabilities {
    let info = smtp.server_info();
    Capabilities {
        smtputf8: info.supports_feature(Extension::SmtpUtfEight),
        eightbitmime: info.supports_feature(Extension::EightBitMime),
        starttls: info.supports_feature(Extension::StartTls),
        pipelining: extensions.pipelining,
        chunking: extensions.chunking,
        max_size: extensions.max_size,
    }
}

/// Opens a connection, upgrades it to TLS and authenticates, as configured.
/// Used by the workers and by `mailroom --check --smtp` (`report` gets one
/// line per step). Blocks as long as lettre does: the caller's deadline
/// is enforced from outside (see `deadline`).
pub fn connect_with_report(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
    report: &mut dyn FnMut(&str),
) -> Result<SmtpConnection, DeliveryError> {
    connect(settings, tls, hello, report).map(|(smtp, _)| smtp)
}

/// As [`connect_with_report`], with the extensions of the EHLO reply.
pub(super) fn connect(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
    report: &mut dyn FnMut(&str),
) -> Result<(SmtpConnection, Extensions), DeliveryError> {
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
    // lettre keeps only the extensions it knows; ask again for the rest,
    // after TLS (what is offered may change with it) and before AUTH (an
    // EHLO resets the session state, which must not touch the login).
    let ehlo = smtp
        .command(Ehlo::new(hello.clone()))
        .map_err(|error| unusable("EHLO at", error))?;
    let extensions = extensions_of(&ehlo);
    if extensions.pipelining {
        report("PIPELINING: offered");
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
    Ok((smtp, extensions))
}

/// The keywords of an EHLO reply that lettre does not parse.
fn extensions_of(ehlo: &Response) -> Extensions {
    let mut extensions = Extensions::default();
    // The first line is the server's name and greeting.
    for line in ehlo.message().skip(1) {
        let keyword = line.split_whitespace().next().unwrap_or_default();
        if keyword.eq_ignore_ascii_case("PIPELINING") {
            extensions.pipelining = true;
        } else if keyword.eq_ignore_ascii_case("CHUNKING") {
            extensions.chunking = true;
        } else if keyword.eq_ignore_ascii_case("SIZE") {
            // `SIZE` alone or `SIZE 0`: no fixed limit (RFC 1870 §4).
            extensions.max_size = line
                .split_whitespace()
                .nth(1)
                .and_then(|limit| limit.parse().ok())
                .filter(|limit| *limit > 0);
        }
    }
    extensions
}

/// What a message's transactions share: its MAIL FROM command.
pub(super) struct Sender {
    /// `MAIL FROM:<…> [parameters]\r\n`.
    mail: String,
}

impl Sender {
    /// The MAIL FROM command for `message` on this connection; a local
    /// failure when the message cannot go through this relay.
    pub fn new(open: &Open, message: &OutgoingMessage) -> Result<Sender, Failure> {
        let info = open.smtp.server_info();
        let offers_smtputf8 = || info.supports_feature(Extension::SmtpUtfEight);
        if let Some(refusal) = undeliverable(message, offers_smtputf8, open.extensions.max_size) {
            return Err(Failure::local(DeliveryError::permanent(
                refusal.to_string(),
            )));
        }
        let mut parameters = Vec::new();
        if open.extensions.max_size.is_some() {
            // RFC 1870: the relay can refuse it at MAIL, before the body.
            parameters.push(MailParameter::Size(message.content.len()));
        }
        if message.needs_smtputf8() {
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.content.is_ascii() && info.supports_feature(Extension::EightBitMime) {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let Some(from) = smtp_path(&message.envelope_from) else {
            return Err(Failure::local(DeliveryError::permanent(format!(
                "invalid envelope sender {:?}",
                message.envelope_from
            ))));
        };
        let mut mail = format!("MAIL FROM:<{from}>");
        for parameter in &parameters {
            mail.push(' ');
            mail.push_str(&parameter.to_string());
        }
        mail.push_str("\r\n");
        Ok(Sender { mail })
    }
}

/// An address as it may go between `<` and `>` in MAIL FROM or RCPT TO.
/// The message builder has checked every address with lettre's parser;
/// this only makes sure nothing here can end or extend the command (no
/// spaces, controls, angle brackets), without parsing it again for every
/// delivery.
fn smtp_path(address: &str) -> Option<&str> {
    let plausible = address.contains('@')
        && address
            .bytes()
            .all(|byte| byte > b' ' && byte != 0x7f && byte != b'<' && byte != b'>');
    plausible.then_some(address)
}

/// One transaction's results so far.
#[derive(Debug, Default)]
pub(super) struct Transaction {
    pub accepted: Vec<String>,
    pub refused: Vec<RecipientRefusal>,
    pub deferred: Vec<RecipientRefusal>,
    /// Refused as "too many recipients": for a further transaction.
    pub too_many: Vec<String>,
    pub limit_reply: Option<SmtpReply>,
    /// The relay answered DATA with 354: the body is to go.
    pub ready: bool,
    /// Some recipients were refused here without asking the relay.
    refused_locally: bool,
}

impl Transaction {
    /// Refused without asking: in pipelined groups such refusals are
    /// noted before the relay's replies, so they are put back in the
    /// order of the recipients, as one command at a time has them.
    fn refuse_locally(&mut self, refusal: RecipientRefusal) {
        self.refused_locally = true;
        self.refused.push(refusal);
    }

    fn order_refusals(&mut self, recipients: &[String]) {
        if !self.refused_locally {
            return;
        }
        let position: std::collections::HashMap<&str, usize> = recipients
            .iter()
            .enumerate()
            .map(|(index, recipient)| (recipient.as_str(), index))
            .collect();
        let mut refused = std::mem::take(&mut self.refused);
        refused.sort_by_key(|refusal| position.get(refusal.recipient.as_str()).copied());
        self.refused = refused;
    }
}

/// A recipient's RCPT TO, or its local refusal.
fn rcpt_command(recipient: &str) -> Result<String, RecipientRefusal> {
    match smtp_path(recipient) {
        Some(path) => Ok(format!("RCPT TO:<{path}>\r\n")),
        None => Err(RecipientRefusal {
            recipient: recipient.to_string(),
            reply: SmtpReply {
                code: 553,
                text: "5.1.3 mailroom: not a valid address for RCPT TO".into(),
            },
        }),
    }
}

/// Judges the reply to one RCPT TO; `Err` when the transaction cannot go
/// on (421, or no reply).
fn rcpt_reply(
    open: &Open,
    transaction: &mut Transaction,
    recipient: &str,
    reply: Result<Response, SmtpError>,
) -> Result<(), Failure> {
    let error = match reply {
        Ok(_) => {
            transaction.accepted.push(recipient.to_string());
            return Ok(());
        }
        Err(error) => error,
    };
    match SmtpReply::from_error(&error) {
        Some(reply) if reply.code != 421 && reply.is_too_many_recipients() => {
            transaction.too_many.push(recipient.to_string());
            transaction.limit_reply.get_or_insert(reply);
        }
        Some(reply) if reply.is_permanent() => transaction.refused.push(RecipientRefusal {
            recipient: recipient.to_string(),
            reply,
        }),
        Some(reply) if reply.code != 421 => transaction.deferred.push(RecipientRefusal {
            recipient: recipient.to_string(),
            reply,
        }),
        _ => return Err(open.failure(error, Stage::Rcpt)),
    }
    Ok(())
}

/// Sends a transaction's envelope (MAIL, RCPT…, then DATA when a recipient
/// was accepted) and reads the replies: pipelined when the relay offers
/// it, else one command at a time. `Ok` with the transaction `ready` when
/// the relay waits for the body, or not ready when no recipient was
/// accepted (the transaction was reset).
pub(super) fn envelope(
    open: &mut Open,
    sender: &Sender,
    recipients: &[String],
    deadline: &Deadline,
) -> Result<Transaction, Failure> {
    if deadline.is_abandoned() {
        open.broken = true;
        return Err(Failure::local(abandoned()));
    }
    if open.extensions.pipelining {
        return pipelined_envelope(open, sender, recipients, deadline);
    }
    let mut transaction = Transaction::default();
    if let Err(error) = open.send(sender.mail.as_str(), deadline) {
        return Err(open.failure(error, Stage::Mail));
    }
    for recipient in recipients {
        if transaction.limit_reply.is_some() {
            // The relay's limit for this transaction is reached: the rest
            // go in the next one without asking now.
            transaction.too_many.push(recipient.clone());
            continue;
        }
        match rcpt_command(recipient) {
            Ok(command) => {
                let reply = open.send(command, deadline);
                rcpt_reply(open, &mut transaction, recipient, reply)?;
            }
            Err(refusal) => transaction.refused.push(refusal),
        }
    }
    if transaction.accepted.is_empty() {
        open.reset(deadline);
        return Ok(transaction);
    }
    match open.send(Data, deadline) {
        Ok(_) => {
            transaction.ready = true;
            Ok(transaction)
        }
        Err(error) => Err(open.failure(error, Stage::Data)),
    }
}

/// What one pipelined write asks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Mail,
    Rcpt(String),
    Data,
}

/// Adds the RCPT TO of each recipient `rest` yields to a group (its text
/// and what it asks) until the group asks `limit` commands; a recipient
/// refused locally asks nothing.
fn push_rcpts<'r>(
    (text, asked): (&mut String, &mut Vec<Asked>),
    transaction: &mut Transaction,
    rest: &mut impl Iterator<Item = &'r String>,
    limit: usize,
) {
    while asked.len() < limit {
        let Some(recipient) = rest.next() else { break };
        match rcpt_command(recipient) {
            Ok(command) => {
                text.push_str(&command);
                asked.push(Asked::Rcpt(recipient.clone()));
            }
            Err(refusal) => transaction.refuse_locally(refusal),
        }
    }
}

/// Ends a group with DATA.
fn push_data((text, asked): (&mut String, &mut Vec<Asked>)) {
    text.push_str(&Data.to_string());
    asked.push(Asked::Data);
}

/// A pipelined envelope prepared in advance, to go out behind another
/// message's body (at most [`GROUP`] commands).
pub(super) struct Prepared {
    text: String,
    asked: Vec<Asked>,
    transaction: Transaction,
}

/// Prepares the whole envelope of a transaction as one pipelined write;
/// `None` when it would not fit in one group.
pub(super) fn prepare(sender: &Sender, recipients: &[String]) -> Option<Prepared> {
    if recipients.len() + 2 > GROUP {
        return None;
    }
    let mut transaction = Transaction::default();
    let mut text = sender.mail.clone();
    let mut asked = vec![Asked::Mail];
    push_rcpts(
        (&mut text, &mut asked),
        &mut transaction,
        &mut recipients.iter(),
        GROUP,
    );
    push_data((&mut text, &mut asked));
    Some(Prepared {
        text,
        asked,
        transaction,
    })
}

impl Prepared {
    /// The commands, to be written.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Reads the replies to a prepared envelope that was written (behind a
/// body, whose reply was read already).
pub(super) fn read_prepared(
    open: &mut Open,
    prepared: Prepared,
    recipients: &[String],
    deadline: &Deadline,
) -> Result<Transaction, Failure> {
    let Prepared {
        asked,
        mut transaction,
        ..
    } = prepared;
    let mut mail_failure = None;
    let first = open.read(deadline);
    replies(
        open,
        &mut transaction,
        &mut mail_failure,
        &asked,
        first,
        deadline,
    )?;
    finish_envelope(open, transaction, recipients, mail_failure, deadline)
}

/// The pipelined envelope, written in groups of at most [`GROUP`]
/// commands; after a group that reached the relay's recipient limit, the
/// rest are not asked (as one command at a time would not).
fn pipelined_envelope(
    open: &mut Open,
    sender: &Sender,
    recipients: &[String],
    deadline: &Deadline,
) -> Result<Transaction, Failure> {
    let mut transaction = Transaction::default();
    let mut mail_failure = None;
    let mut text = sender.mail.clone();
    let mut asked = vec![Asked::Mail];
    let mut rest = recipients.iter().peekable();
    loop {
        push_rcpts(
            (&mut text, &mut asked),
            &mut transaction,
            &mut rest,
            GROUP - 1,
        );
        let last = rest.peek().is_none();
        if last {
            push_data((&mut text, &mut asked));
        }
        if asked.is_empty() {
            break;
        }
        send_group(
            open,
            &text,
            &asked,
            &mut transaction,
            &mut mail_failure,
            deadline,
        )?;
        if last {
            break;
        }
        text.clear();
        asked.clear();
        if mail_failure.is_some() || transaction.limit_reply.is_some() {
            transaction.too_many.extend(rest.by_ref().cloned());
            if mail_failure.is_none() && !transaction.accepted.is_empty() {
                push_data((&mut text, &mut asked));
                send_group(
                    open,
                    &text,
                    &asked,
                    &mut transaction,
                    &mut mail_failure,
                    deadline,
                )?;
            }
            break;
        }
    }
    finish_envelope(open, transaction, recipients, mail_failure, deadline)
}

/// Writes one pipelined group and handles its replies (see [`replies`]).
fn send_group(
    open: &mut Open,
    text: &str,
    asked: &[Asked],
    transaction: &mut Transaction,
    mail_failure: &mut Option<Failure>,
    deadline: &Deadline,
) -> Result<(), Failure> {
    let first = open.send(text, deadline);
    replies(open, transaction, mail_failure, asked, first, deadline)
}

/// Handles the replies to one pipelined write, the first one given.
/// `Err` when the connection cannot go on; a refused MAIL FROM is kept in
/// `mail_failure` while the replies to the rest of the group are read.
fn replies(
    open: &mut Open,
    transaction: &mut Transaction,
    mail_failure: &mut Option<Failure>,
    asked: &[Asked],
    first: Result<Response, SmtpError>,
    deadline: &Deadline,
) -> Result<(), Failure> {
    let mut reply = Some(first);
    for command in asked {
        let result = match reply.take() {
            Some(result) => result,
            None => open.read(deadline),
        };
        let stage = match command {
            Asked::Mail => Stage::Mail,
            Asked::Rcpt(_) => Stage::Rcpt,
            Asked::Data => Stage::Data,
        };
        if open.broken {
            // No reply, or 421: nothing more will come.
            return Err(match (result, mail_failure.take()) {
                (Err(error), _) => open.failure(error, stage),
                (Ok(_), Some(failure)) => failure,
                (Ok(_), None) => Failure::local(DeliveryError::transient(
                    "the SMTP session broke".into(),
                    true,
                )),
            });
        }
        match command {
            Asked::Mail => {
                if let Err(error) = result {
                    *mail_failure = Some(open.failure(error, Stage::Mail));
                }
            }
            Asked::Rcpt(recipient) => {
                if mail_failure.is_none() {
                    rcpt_reply(open, transaction, recipient, result)?;
                }
            }
            Asked::Data => match result {
                Ok(_) if mail_failure.is_some() => {
                    // The relay waits for data it should not: end the
                    // session rather than send anything.
                    open.broken = true;
                }
                Ok(_) if transaction.accepted.is_empty() => {
                    // RFC 2920 §3.1: DATA accepted although no recipient
                    // was: a lone dot ends it.
                    if open.send(".\r\n", deadline).is_err() && !open.broken {
                        open.reset(deadline);
                    }
                }
                Ok(_) => transaction.ready = true,
                Err(error) if mail_failure.is_some() || transaction.accepted.is_empty() => {
                    // The expected refusal of a DATA after no recipient.
                    let _ = error;
                }
                Err(error) => return Err(open.failure(error, Stage::Data)),
            },
        }
    }
    Ok(())
}

/// The end of an envelope: a refused MAIL fails the transaction; one
/// without an accepted recipient is reset.
fn finish_envelope(
    open: &mut Open,
    transaction: Transaction,
    recipients: &[String],
    mail_failure: Option<Failure>,
    deadline: &Deadline,
) -> Result<Transaction, Failure> {
    if let Some(failure) = mail_failure {
        return Err(failure);
    }
    let mut transaction = transaction;
    transaction.order_refusals(recipients);
    if !transaction.ready {
        // MAIL was taken: clear it before the next transaction.
        open.reset(deadline);
    }
    Ok(transaction)
}

/// The failure of an attempt that its worker gave up on.
pub(super) fn abandoned() -> DeliveryError {
    DeliveryError::transient("given up at the deadline".into(), true)
}

/// The reply as kept in results.
pub(super) fn reply_of(response: &Response) -> SmtpReply {
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
        if plain_crlf(content) {
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

/// A body that goes as it is (nearly every message): CRLF line ends only
/// (every CR followed by LF, every LF preceded by CR) and no line starting
/// with a dot. This runs for every delivery: inside a line it moves eight
/// bytes at a time to the next CR or LF (a dot there is harmless).
fn plain_crlf(content: &str) -> bool {
    let bytes = content.as_bytes();
    let mut line_start = true;
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if !line_start {
            if let Some(word) = bytes.get(index..).and_then(<[u8]>::first_chunk::<8>) {
                let word = u64::from_le_bytes(*word);
                let found = bytes_equal(word, b'\r') | bytes_equal(word, b'\n');
                if found == 0 {
                    index += 8;
                    continue;
                }
                // The lowest flag is exact: to the first CR or LF.
                let skip = (found.trailing_zeros() / 8) as usize;
                if skip > 0 {
                    index += skip;
                    continue;
                }
            }
        }
        match byte {
            b'.' if line_start => return false,
            b'\r' if bytes.get(index + 1) == Some(&b'\n') => {
                index += 2;
                line_start = true;
                continue;
            }
            b'\r' | b'\n' => return false,
            _ => {}
        }
        line_start = false;
        index += 1;
    }
    true
}

/// The high bit of each byte of `word` (little-endian) that may equal
/// `byte`: zero when none does, and the lowest bit set is always a true
/// one (the zero-byte test of "Bit Twiddling Hacks"; a false flag can only
/// follow a true one).
fn bytes_equal(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_paths_cannot_break_the_command() {
        assert_eq!(smtp_path("jörg@example.org"), Some("jörg@example.org"));
        for bad in [
            "",
            "nobody",
            "a b@c.d",
            "a@b.c>\r\nRSET",
            "<a@b.c>",
            "a@b\u{7f}",
        ] {
            assert_eq!(smtp_path(bad), None, "{bad:?}");
        }
        assert_eq!(rcpt_command("a@b.c").unwrap(), "RCPT TO:<a@b.c>\r\n");
        assert_eq!(rcpt_command("x y@b.c").unwrap_err().reply.code, 553);
    }

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
        for plain in ["a\r\nb", "", "a\r\n", "a\r\nb. c\r\n\r\nd"] {
            assert!(plain_crlf(plain), "{plain:?}");
        }
        for not in [
            "a\nb",
            "a\rb",
            "\n",
            "\r",
            "\n\r",
            "a\r\r\n\nb",
            "a\r\n\r",
            "x\r\n.\r\n",
        ] {
            assert!(!plain_crlf(not), "{not:?}");
        }
        assert!(!plain_crlf("a\r\n.b"));
        assert!(!plain_crlf(".b"));
    }

    /// The eight-at-a-time check says what a byte-at-a-time one says.
    #[test]
    fn plain_crlf_agrees_with_a_byte_at_a_time_check() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        fn reference(content: &str) -> bool {
            let bytes = content.as_bytes();
            bytes.first() != Some(&b'.')
                && bytes.iter().enumerate().all(|(at, &byte)| match byte {
                    b'\r' => bytes.get(at + 1) == Some(&b'\n'),
                    b'\n' => at > 0 && bytes[at - 1] == b'\r' && bytes.get(at + 1) != Some(&b'.'),
                    _ => true,
                })
        }
        let piece = prop::sample::select(vec![
            "a",
            "bcdefghij",
            "\r\n",
            "\r",
            "\n",
            ".",
            "..",
            " ",
            "é",
            "\r\n.",
            "0123456789abcdef",
        ]);
        let text = prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat());
        let plain_ones = std::cell::Cell::new(0);
        TestRunner::new(Config {
            cases: 20_000,
            failure_persistence: None,
            ..Config::default()
        })
        .run(&text, |text| {
            let plain = plain_crlf(&text);
            plain_ones.set(plain_ones.get() + u32::from(plain));
            prop_assert_eq!(plain, reference(&text), "{:?}", text);
            Ok(())
        })
        .unwrap();
        assert!(plain_ones.get() > 100, "{} plain", plain_ones.get());
    }
}
