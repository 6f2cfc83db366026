//! SMTP delivery on the worker's own thread: one reused connection, the
//! attempts' transactions, and the deadline the pool's supervisor watches.
//!
//! An attempt is [`SmtpSender::begin`] (connect if needed, the envelope)
//! and [`SmtpSender::finish`] (the body, and any further transactions a
//! recipient limit asks for). With PIPELINING, `finish` can carry the next
//! message's envelope in the same write as this one's body (RFC 2920
//! §3.1): a busy connection then costs about one round trip per message.
//! The two transactions stay independent: the reply to the final dot ends
//! this one, whatever it says, before the relay reads the next MAIL.
//!
//! Deadlines: each phase (connect; each transaction from its MAIL to the
//! reply to its final dot) must end within `MAILROOM_SMTP_TIMEOUT_MS`.
//! The phase's end is stored in a [`Deadline`] (an atomic, no wake-up) that
//! the pool's supervisor watches; lettre's per-read timeout follows the
//! time left, so a silent relay ends the read by itself, and only a relay
//! that trickles bytes needs the supervisor (see `pool`).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::extension::ClientId;

use super::classify::{DeliveryError, FailureKind, SmtpReply};
use super::deadline::{Deadline, MAX_ABANDONED};
use super::smtp::{
    self, abandoned, capabilities_of, connect_with_report, envelope, prepare, read_prepared,
    reply_of, Failure, Open, Prepared, Sender, Stage, Transaction, LARGE_BODY,
};
use super::{Delivered, Hooks, RecipientRefusal, RelayCapabilities, Step};
use crate::config::SmtpSettings;
use crate::message::OutgoingMessage;

/// What every transport of a factory needs.
pub(crate) struct SessionConfig {
    pub settings: SmtpSettings,
    pub tls: Option<TlsParameters>,
    pub hello: ClientId,
    pub capabilities: RelayCapabilities,
}

/// The attempt whose body is to go next.
struct Current {
    message: Arc<OutgoingMessage>,
    sender: Sender,
    /// What earlier transactions of this attempt delivered.
    delivered: Delivered,
    /// The waiting transaction is the attempt's first (its failure fails
    /// the attempt).
    first: bool,
    /// A further transaction's recipients (empty for the first).
    pending: Vec<String>,
    /// The waiting transaction (its envelope answered with 354).
    transaction: Transaction,
}

/// Delivers over SMTP on the calling thread, keeping one connection open
/// between messages.
pub struct SmtpSender {
    config: Arc<SessionConfig>,
    deadline: Arc<Deadline>,
    open: Option<Open>,
    /// When the connection was last used.
    used_at: Option<Instant>,
    current: Option<Current>,
}

impl SmtpSender {
    pub(crate) fn new(config: Arc<SessionConfig>, lingering: Arc<AtomicUsize>) -> SmtpSender {
        let deadline = Arc::new(Deadline::new(
            config.settings.timeout,
            lingering,
            config.settings.endpoint(),
        ));
        SmtpSender {
            config,
            deadline,
            open: None,
            used_at: None,
            current: None,
        }
    }

    /// A transport like this one, without its connection (for a worker
    /// that replaces one given up at its deadline).
    pub(crate) fn replacement(&self) -> SmtpSender {
        SmtpSender::new(Arc::clone(&self.config), self.deadline.lingering_counter())
    }

    /// The deadline the supervisor watches.
    pub fn deadline(&self) -> &Arc<Deadline> {
        &self.deadline
    }

    /// True when [`SmtpSender::finish`] would carry another message's
    /// envelope with this body (the relay offers PIPELINING, the body is
    /// not large, and no further transaction of this message comes first).
    pub fn wants_next(&self) -> bool {
        let (Some(open), Some(current)) = (&self.open, &self.current) else {
            return false;
        };
        !open.broken && carries_next(open, current)
    }

    /// Starts an attempt: connects if needed and sends the envelope. See
    /// [`super::Transport::begin`].
    pub fn begin(
        &mut self,
        message: &Arc<OutgoingMessage>,
        recipients: &[String],
        hooks: &Hooks<'_>,
    ) -> Step {
        if self.current.is_some() {
            // An attempt left waiting for its body cannot be continued.
            self.drop_connection();
            self.current = None;
        }
        let step = self.start(message, recipients, None, hooks);
        self.settle(&step);
        step
    }

    /// Sends the body of the attempt begun last (and any further
    /// transactions it needs); with `next`, begins that attempt too,
    /// its envelope in the same write as the body when possible. See
    /// [`super::Transport::finish`].
    pub fn finish(
        &mut self,
        next: Option<(&Arc<OutgoingMessage>, &[String])>,
        hooks: &Hooks<'_>,
    ) -> (Result<Delivered, DeliveryError>, Option<Step>) {
        let Some(mut current) = self.current.take() else {
            let result = Err(DeliveryError::transient(
                "no SMTP transaction was waiting for its body".into(),
                false,
            ));
            let step = next.map(|(message, recipients)| self.begin(message, recipients, hooks));
            return (result, step);
        };
        let message = Arc::clone(&current.message);
        let mut chained: Option<(Sender, Prepared, Instant)> = None;
        let result = loop {
            let Some(open) = self.open.as_mut() else {
                break Err(DeliveryError::transient(
                    "the SMTP connection is gone".into(),
                    false,
                ));
            };
            if self.deadline.is_abandoned() {
                // Closing without the final dot: the relay drops the
                // transaction.
                open.broken = true;
                break Err(abandoned());
            }
            let chain = match next {
                Some((message, recipients)) if carries_next(open, &current) => {
                    Sender::new(open, message)
                        .ok()
                        .and_then(|sender| prepare(&sender, recipients).map(|p| (sender, p)))
                }
                _ => None,
            };
            let written_at = Instant::now();
            let reply = open.body(
                &current.message.content,
                chain.as_ref().map(|(_, prepared)| prepared.text()),
                &self.deadline,
            );
            chained = chain.map(|(sender, prepared)| (sender, prepared, written_at));
            match self.after_body(current, reply, hooks) {
                Step::Ready => match self.current.take() {
                    Some(further) => current = further,
                    None => break Err(DeliveryError::transient("lost track".into(), false)),
                },
                Step::Done(result) => break result,
            }
        };
        if let (Ok(delivered), Some(_)) = (&result, next) {
            // Known to the pool before the next message's commands wait on
            // the relay: a deadline there (a reconnect that hangs) must
            // not report this one as timed out, to be sent again.
            (hooks.progress)(&message.id, delivered, &[]);
        }
        let step = next.map(|(message, recipients)| match chained {
            Some((sender, prepared, written_at)) => {
                // The next transaction's time runs from when its commands went.
                self.deadline.phase_started_at(written_at);
                self.start(message, recipients, Some((sender, prepared)), hooks)
            }
            None => self.start(message, recipients, None, hooks),
        });
        match &step {
            Some(step) => self.settle(step),
            None => self.settle(&Step::Done(Ok(Delivered::default()))),
        }
        (result, step)
    }

    /// After a step: a broken connection is dropped; with nothing waiting,
    /// no deadline runs.
    fn settle(&mut self, step: &Step) {
        if self.open.as_ref().is_some_and(|open| open.broken) {
            self.drop_connection();
        }
        if self.open.is_some() {
            self.used_at = Some(Instant::now());
        }
        if matches!(step, Step::Done(_)) {
            self.current = None;
            self.deadline.idle();
        }
    }

    /// Connects (if needed) and sends the envelope, or reads the replies
    /// of one that went out behind a body (`prepared`). A dead pooled
    /// connection found before the body went is not an attempt: the
    /// envelope goes again on a fresh one.
    fn start(
        &mut self,
        message: &Arc<OutgoingMessage>,
        recipients: &[String],
        prepared: Option<(Sender, Prepared)>,
        hooks: &Hooks<'_>,
    ) -> Step {
        let (reused, sender, result) = match prepared {
            Some((sender, prepared)) => {
                let result = match self.open.as_mut() {
                    Some(open) if !open.broken => {
                        read_prepared(open, prepared, recipients, &self.deadline)
                    }
                    _ => Err(Failure {
                        error: DeliveryError::transient("connection closed".into(), false),
                        stage: Stage::Mail,
                        connection_dead: true,
                    }),
                };
                (true, sender, result)
            }
            None => {
                let reused = self.open.as_ref().is_some_and(|open| !open.broken);
                if !reused {
                    self.drop_connection();
                    if let Err(error) = self.connect(hooks, &message.id) {
                        return Step::Done(Err(error));
                    }
                }
                match self.transaction_start(message, recipients) {
                    Ok((sender, result)) => (reused, sender, result),
                    Err(failure) => return Step::Done(Err(failure.error)),
                }
            }
        };
        let (sender, result) = match result {
            Err(failure) if reused && failure.is_dead_on_reuse() => {
                // The relay closed the idle connection or said 421 on reuse:
                // not the message's fault, and not an attempt.
                log::debug!(
                    "message {}: reused SMTP connection is dead ({}), reconnecting",
                    message.id,
                    failure.error
                );
                self.drop_connection();
                if let Err(error) = self.connect(hooks, &message.id) {
                    return Step::Done(Err(error));
                }
                match self.transaction_start(message, recipients) {
                    Ok(started) => started,
                    Err(failure) => return Step::Done(Err(failure.error)),
                }
            }
            other => (sender, other),
        };
        let current = Current {
            message: Arc::clone(message),
            sender,
            delivered: Delivered::default(),
            first: true,
            pending: Vec::new(),
            transaction: Transaction::default(),
        };
        self.after_envelope(current, recipients, result)
    }

    /// The first transaction's envelope on the open connection.
    fn transaction_start(
        &mut self,
        message: &OutgoingMessage,
        recipients: &[String],
    ) -> Result<(Sender, Result<Transaction, Failure>), Failure> {
        let Some(open) = self.open.as_mut() else {
            return Err(Failure::local(DeliveryError::transient(
                "no SMTP connection".into(),
                true,
            )));
        };
        let sender = Sender::new(open, message)?;
        self.deadline.start_phase();
        let result = envelope(open, &sender, recipients, &self.deadline);
        Ok((sender, result))
    }

    /// After a transaction's envelope: ready for the body, or done.
    fn after_envelope(
        &mut self,
        mut current: Current,
        recipients: &[String],
        result: Result<Transaction, Failure>,
    ) -> Step {
        match result {
            Ok(transaction) if transaction.ready => {
                current.transaction = transaction;
                self.current = Some(current);
                Step::Ready
            }
            Ok(transaction) => {
                // No recipient accepted in this transaction: those it could
                // not ask for because of a limit are deferred with it.
                let mut delivered = current.delivered;
                delivered.refused.extend(transaction.refused);
                delivered.deferred.extend(transaction.deferred);
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
                Step::Done(Ok(delivered))
            }
            Err(failure) => {
                if failure.stage != Stage::Local {
                    self.reset();
                }
                if current.first {
                    Step::Done(Err(failure.error))
                } else {
                    Step::Done(Ok(with_failed(current.delivered, recipients, &failure)))
                }
            }
        }
    }

    /// After a body's reply: done, or a further transaction for the
    /// recipients the relay's limit left out (ready for its body, or done).
    fn after_body(
        &mut self,
        current: Current,
        reply: Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error>,
        hooks: &Hooks<'_>,
    ) -> Step {
        let Current {
            message,
            sender,
            mut delivered,
            first,
            pending,
            transaction,
        } = current;
        let response = match reply {
            Ok(response) => response,
            Err(error) => {
                let failure = match self.open.as_ref() {
                    Some(open) => open.failure(error, Stage::Body),
                    None => Failure::local(DeliveryError::transient(error.to_string(), true)),
                };
                return if first {
                    Step::Done(Err(failure.error))
                } else {
                    Step::Done(Ok(with_failed(delivered, &pending, &failure)))
                };
            }
        };
        delivered.accepted.extend(transaction.accepted);
        delivered.refused.extend(transaction.refused);
        delivered.deferred.extend(transaction.deferred);
        delivered.reply = Some(reply_of(&response));
        if transaction.too_many.is_empty() {
            return Step::Done(Ok(delivered));
        }
        // A further transaction on the same connection for the rest; what
        // is delivered so far is known to the pool first, so that a
        // deadline in it does not lose it.
        let pending = transaction.too_many;
        (hooks.progress)(&message.id, &delivered, &pending);
        let mut current = Current {
            message,
            sender,
            delivered,
            first: false,
            pending,
            transaction: Transaction::default(),
        };
        let result = match self.open.as_mut() {
            Some(open) if !open.broken => {
                self.deadline.start_phase();
                envelope(open, &current.sender, &current.pending, &self.deadline)
            }
            _ => Err(Failure {
                error: DeliveryError::transient("the SMTP connection broke".into(), true),
                stage: Stage::Mail,
                connection_dead: true,
            }),
        };
        let pending = std::mem::take(&mut current.pending);
        current.pending = pending.clone();
        self.after_envelope(current, &pending, result)
    }

    fn reset(&mut self) {
        if let Some(open) = self.open.as_mut() {
            open.reset(&self.deadline);
        }
    }

    /// Opens a connection for a message that has not reached the relay
    /// yet: whatever fails here fails before a transaction (and does not
    /// use up the message's attempts).
    fn connect(&mut self, hooks: &Hooks<'_>, id: &str) -> Result<(), DeliveryError> {
        // Left set when it fails: no connection is open, and whoever gives
        // this attempt up at its deadline (maybe just as lettre's own
        // timeout ends it) must see that it never reached the relay.
        self.deadline.set_connecting(Some(id));
        let opened = self
            .open_connection(hooks)
            .map_err(DeliveryError::before_transaction);
        if opened.is_ok() {
            self.deadline.set_connecting(None);
        }
        opened
    }

    fn open_connection(&mut self, hooks: &Hooks<'_>) -> Result<(), DeliveryError> {
        let endpoint = || self.config.settings.endpoint();
        if self.deadline.is_abandoned() {
            return Err(abandoned());
        }
        let lingering = self.deadline.lingering();
        if lingering >= MAX_ABANDONED {
            return Err(DeliveryError::transient(
                format!(
                    "{lingering} SMTP sessions with {} are still stuck after their deadline; not opening more",
                    endpoint()
                ),
                true,
            ));
        }
        self.deadline.start_phase();
        let config = &self.config;
        let (smtp, extensions) = smtp::connect(
            &config.settings,
            config.tls.as_ref(),
            &config.hello,
            &mut |_| {},
        )?;
        (hooks.connected)();
        if self.deadline.is_abandoned() {
            return Err(abandoned());
        }
        config
            .capabilities
            .record(capabilities_of(&smtp, extensions));
        self.open = Some(Open::new(smtp, config.settings.timeout, extensions));
        Ok(())
    }

    /// Closes the connection without a word (its state is unknown).
    fn drop_connection(&mut self) {
        self.open = None;
        self.used_at = None;
    }

    /// Closes the connection when idle for `limit` or longer.
    pub(crate) fn close_if_idle(&mut self, limit: Duration) {
        if self.current.is_none() && self.used_at.is_some_and(|at| at.elapsed() >= limit) {
            self.close();
        }
    }

    /// Says QUIT and closes the connection, within the SMTP timeout.
    pub fn close(&mut self) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        self.used_at = None;
        self.current = None;
        if !open.broken && !self.deadline.is_abandoned() {
            self.deadline.start_phase();
            let _ = open.send(lettre::transport::smtp::commands::Quit, &self.deadline);
            self.deadline.idle();
        }
    }
}

impl Drop for SmtpSender {
    fn drop(&mut self) {
        if self.deadline.is_abandoned() {
            self.drop_connection();
            self.deadline.release();
        } else {
            self.close();
        }
    }
}

/// What earlier transactions delivered, with the recipients of a further
/// one that failed refused or deferred with its reply (or a local `421
/// 4.4.2` naming the failure when there was no reply): those already
/// accepted must not be sent again.
/// True when the next message's envelope may go in the same write as the
/// body of `current`: the relay offers PIPELINING, the body is not large
/// (large ones go in pieces), and no further transaction of this message
/// comes first.
fn carries_next(open: &Open, current: &Current) -> bool {
    open.extensions.pipelining
        && current.transaction.too_many.is_empty()
        && current.message.content.len() <= LARGE_BODY
}

fn with_failed(mut delivered: Delivered, recipients: &[String], failure: &Failure) -> Delivered {
    let reply = failure.error.reply.clone().unwrap_or_else(|| SmtpReply {
        code: 421,
        text: format!("4.4.2 no reply from the relay: {}", failure.error.detail),
    });
    let refusals = recipients.iter().map(|recipient| RecipientRefusal {
        recipient: recipient.clone(),
        reply: reply.clone(),
    });
    match failure.error.kind {
        FailureKind::Permanent => delivered.refused.extend(refusals),
        _ => delivered.deferred.extend(refusals),
    }
    delivered
}

/// The outcome of an attempt given up at its deadline: what earlier
/// transactions of it delivered (told through [`Hooks::progress`]), the
/// rest deferred with the timeout; or the timeout itself.
pub fn abandoned_outcome(
    deadline: &Deadline,
    id: &str,
    progress: Option<(Delivered, Vec<String>)>,
) -> Result<Delivered, DeliveryError> {
    let error = deadline.timeout_error_for(id);
    match progress {
        Some((mut delivered, pending)) if !delivered.accepted.is_empty() => {
            let reply = SmtpReply {
                code: 421,
                text: format!("4.4.2 {}", error.detail),
            };
            delivered
                .deferred
                .extend(pending.into_iter().map(|recipient| RecipientRefusal {
                    recipient,
                    reply: reply.clone(),
                }));
            Ok(delivered)
        }
        _ => Err(error),
    }
}

/// `mailroom --check --smtp` on a thread of its own, bounded like a
/// connection: a relay that does not answer cannot hold the check.
pub(super) fn check(
    settings: &SmtpSettings,
    tls: Option<&TlsParameters>,
    hello: &ClientId,
    report: &mut dyn FnMut(&str),
) -> Result<(), DeliveryError> {
    let (lines, steps) = crossbeam_channel::unbounded::<Result<String, DeliveryError>>();
    let (settings_copy, tls, hello) = (settings.clone(), tls.cloned(), hello.clone());
    std::thread::Builder::new()
        .name("smtp-check".into())
        .spawn(move || {
            let mut send = |line: &str| {
                let _ = lines.send(Ok(line.to_string()));
            };
            match connect_with_report(&settings_copy, tls.as_ref(), &hello, &mut send) {
                Ok(mut smtp) => {
                    let _ = lines.send(Ok(match smtp.quit() {
                        Ok(_) => "QUIT: ok".to_string(),
                        Err(error) => format!("QUIT: {error}"),
                    }));
                }
                Err(error) => {
                    let _ = lines.send(Err(error));
                }
            }
        })
        .map_err(|error| {
            DeliveryError::transient(format!("cannot start the check thread: {error}"), false)
        })?;
    // Connect, STARTTLS, AUTH and QUIT: each gets the timeout.
    let deadline = Instant::now() + settings.timeout * 4;
    loop {
        match steps.recv_deadline(deadline) {
            Ok(Ok(line)) => report(&line),
            Ok(Err(error)) => return Err(error),
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                return Err(DeliveryError::transient(
                    format!(
                        "{} did not finish the check within {} ms",
                        settings.endpoint(),
                        (settings.timeout * 4).as_millis()
                    ),
                    true,
                ))
            }
        }
    }
}
