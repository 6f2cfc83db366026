//! The worker's side of SMTP: each worker owns a connection thread that
//! holds its lettre connection and runs each attempt, while the worker
//! waits for the outcome with a deadline.
//!
//! Why a thread: `MAILROOM_SMTP_TIMEOUT_MS` bounds every phase (connect
//! with greeting, EHLO, STARTTLS and AUTH; each MAIL..end-of-data
//! transaction), but lettre's timeouts are per read, so a relay that
//! trickles a byte now and then holds a read for ever, and lettre gives
//! no access to its socket to cut it. The connection thread moves the
//! phase's deadline forward as each phase starts (an atomic store, no
//! wake-up); the worker waits on the outcome channel until the deadline
//! in force. Past it, the worker gives the thread up with its connection
//! (the attempt fails transiently) and the next attempt starts a fresh
//! thread. The abandoned thread ends when a per-read timeout (lowered to
//! the remaining budget before each command) or the relay ends its read;
//! how many may linger at once is capped.
//!
//! Per message this costs one hand-off each way (a channel send and a
//! wake-up); `benches/deliver` compares it with a plain lettre loop.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::extension::ClientId;

use super::classify::DeliveryError;
use super::smtp::{attempt, capabilities_of, connect_with_report, Failure, Open, Stage};
use super::{Delivered, RecipientRefusal, RelayCapabilities, SmtpReply};
use crate::config::SmtpSettings;
use crate::message::OutgoingMessage;

/// At most this many abandoned connection threads may still wait on a
/// relay; beyond it no new connection is opened (the relay is not
/// answering, and each would hold a thread and a socket).
pub const MAX_ABANDONED: usize = 64;

/// Stack of a connection thread (lettre and rustls need little).
const SESSION_STACK: usize = 512 * 1024;

/// What every connection thread of a factory needs.
pub(crate) struct SessionConfig {
    pub settings: SmtpSettings,
    pub tls: Option<TlsParameters>,
    pub hello: ClientId,
    pub capabilities: RelayCapabilities,
}

/// The deadline of the current phase, shared by a worker and its
/// connection thread: nanoseconds after `base`.
pub(super) struct Deadline {
    base: Instant,
    at: AtomicU64,
    timeout: Duration,
    /// The worker gave up waiting: start nothing more on this connection.
    abandoned: AtomicBool,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        Deadline {
            base: Instant::now(),
            at: AtomicU64::new(0),
            timeout,
            abandoned: AtomicBool::new(false),
        }
    }

    /// A new phase starts now: it has `timeout` from here.
    pub fn start_phase(&self) {
        let at = (self.base.elapsed() + self.timeout).as_nanos();
        self.at.store(at as u64, Ordering::SeqCst);
    }

    /// When the current phase must be over.
    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.at.load(Ordering::SeqCst))
    }

    /// Time left in the current phase.
    pub fn remaining(&self) -> Duration {
        self.instant().saturating_duration_since(Instant::now())
    }

    /// The length of a phase.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True once the worker has given this connection thread up.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

enum Request {
    Deliver {
        message: Arc<OutgoingMessage>,
        /// `None`: every recipient of the message (no copy of the list).
        recipients: Option<Vec<String>>,
    },
    /// QUIT and close the connection (the thread stays).
    Close,
}

/// Delivered so far in a multi-transaction attempt, and who is left; read
/// by the worker when it gives the attempt up at a deadline.
type Progress = Arc<Mutex<Option<(Delivered, Vec<String>)>>>;

struct Outcome {
    result: Result<Delivered, DeliveryError>,
    connections_opened: u32,
}

/// The hand-off between a worker and its connection thread: one request,
/// then one outcome. A waiting side parks (no spinning, no yielding, as a
/// channel's receive would do first) and is woken with `unpark`, so each
/// direction costs one wake-up.
struct Exchange {
    request: Mutex<Option<Request>>,
    has_request: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    /// The thread waiting for the outcome.
    worker: Mutex<Option<std::thread::Thread>>,
    /// The worker is gone or gave the thread up: the thread ends.
    closed: AtomicBool,
    /// The thread ended (normally, or by a panic).
    ended: AtomicBool,
}

impl Exchange {
    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Marks the exchange ended when the connection thread stops, even by a
/// panic, so its worker does not wait for an outcome that cannot come.
struct EndGuard(Arc<Exchange>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::SeqCst);
        if let Some(worker) = Exchange::lock(&self.0.worker).as_ref() {
            worker.unpark();
        }
    }
}

/// A connection thread as its worker sees it.
struct Session {
    exchange: Arc<Exchange>,
    thread: std::thread::Thread,
    deadline: Arc<Deadline>,
    /// Delivered so far in a multi-transaction attempt, and who is left.
    progress: Progress,
    /// A connection is open on the thread, last used then.
    open_since: Option<Instant>,
}

impl Session {
    /// Hands a request to the thread.
    fn post(&self, request: Request) {
        {
            let mut worker = Exchange::lock(&self.exchange.worker);
            let current = std::thread::current();
            if worker.as_ref().map(std::thread::Thread::id) != Some(current.id()) {
                *worker = Some(current);
            }
        }
        *Exchange::lock(&self.exchange.request) = Some(request);
        self.exchange.has_request.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.exchange.closed.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Delivers over SMTP through the worker's connection thread, keeping one
/// connection open between messages.
pub struct SmtpSender {
    config: Arc<SessionConfig>,
    abandoned: Arc<AtomicUsize>,
    session: Option<Session>,
}

impl SmtpSender {
    pub(crate) fn new(config: Arc<SessionConfig>, abandoned: Arc<AtomicUsize>) -> SmtpSender {
        SmtpSender {
            config,
            abandoned,
            session: None,
        }
    }

    /// See [`super::Transport::deliver`].
    pub fn deliver(
        &mut self,
        message: &Arc<OutgoingMessage>,
        recipients: &[String],
        on_connect: &dyn Fn(),
    ) -> Result<Delivered, DeliveryError> {
        let session = match self.session.take() {
            Some(session) => session,
            None => self.spawn()?,
        };
        session.deadline.start_phase();
        let every = recipients.len() == message.recipients.len()
            && recipients.as_ptr() == message.recipients.as_ptr();
        let request = Request::Deliver {
            message: Arc::clone(message),
            recipients: (!every).then(|| recipients.to_vec()),
        };
        session.post(request);
        match wait(&session) {
            Ok(outcome) => {
                for _ in 0..outcome.connections_opened {
                    on_connect();
                }
                let mut session = session;
                session.open_since = Some(Instant::now());
                self.session = Some(session);
                outcome.result
            }
            Err(Waited::Disconnected) => Err(DeliveryError::transient(
                "the SMTP connection thread ended unexpectedly".into(),
                false,
            )),
            Err(Waited::Deadline) => {
                let partial = session
                    .progress
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                self.abandon(session);
                let error = self.deadline_error();
                match partial {
                    // Earlier transactions of this attempt delivered.
                    Some((delivered, pending)) if !delivered.accepted.is_empty() => {
                        Ok(with_pending_deferred(delivered, pending, &error))
                    }
                    _ => Err(error),
                }
            }
        }
    }

    fn deadline_error(&self) -> DeliveryError {
        DeliveryError::transient(
            format!(
                "timed out: {} did not finish within {} ms (MAILROOM_SMTP_TIMEOUT_MS); connection abandoned",
                self.config.settings.endpoint(),
                self.config.settings.timeout.as_millis()
            ),
            true,
        )
    }

    /// Gives a connection thread up: it ends on its own.
    fn abandon(&self, session: Session) {
        session.deadline.abandoned.store(true, Ordering::SeqCst);
        let lingering = self.abandoned.fetch_add(1, Ordering::SeqCst) + 1;
        log::warn!(
            "SMTP session with {} abandoned at its deadline ({lingering} abandoned sessions still waiting on the relay)",
            self.config.settings.endpoint()
        );
        drop(session);
    }

    fn spawn(&self) -> Result<Session, DeliveryError> {
        let lingering = self.abandoned.load(Ordering::SeqCst);
        if lingering >= MAX_ABANDONED {
            return Err(DeliveryError::transient(
                format!(
                    "{lingering} SMTP sessions with {} are still stuck after their deadline; not opening more",
                    self.config.settings.endpoint()
                ),
                true,
            ));
        }
        let exchange = Arc::new(Exchange {
            request: Mutex::new(None),
            has_request: AtomicBool::new(false),
            outcome: Mutex::new(None),
            worker: Mutex::new(None),
            closed: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        let deadline = Arc::new(Deadline::new(self.config.settings.timeout));
        let progress = Arc::new(Mutex::new(None));
        let thread = Thread {
            config: Arc::clone(&self.config),
            exchange: Arc::clone(&exchange),
            deadline: Arc::clone(&deadline),
            progress: Arc::clone(&progress),
            lingering: Arc::clone(&self.abandoned),
        };
        let handle = std::thread::Builder::new()
            .name("smtp-session".into())
            .stack_size(SESSION_STACK)
            .spawn(move || thread.run())
            .map_err(|error| {
                DeliveryError::transient(
                    format!("cannot start an SMTP connection thread: {error}"),
                    false,
                )
            })?;
        Ok(Session {
            exchange,
            thread: handle.thread().clone(),
            deadline,
            progress,
            open_since: None,
        })
    }

    /// Closes the connection when idle for `limit` or longer.
    pub(crate) fn close_if_idle(&mut self, limit: Duration) {
        let idle = self
            .session
            .as_ref()
            .and_then(|session| session.open_since)
            .is_some_and(|since| since.elapsed() >= limit);
        if idle {
            self.close();
        }
    }

    /// Says QUIT and closes the connection, within the SMTP timeout.
    pub fn close(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        if session.open_since.is_none() {
            self.session = Some(session);
            return;
        }
        session.deadline.start_phase();
        session.post(Request::Close);
        match wait(&session) {
            Ok(_) => {
                session.open_since = None;
                self.session = Some(session);
            }
            Err(Waited::Deadline) => self.abandon(session),
            Err(Waited::Disconnected) => {}
        }
    }
}

impl Drop for SmtpSender {
    fn drop(&mut self) {
        self.close();
    }
}

enum Waited {
    Deadline,
    Disconnected,
}

/// Waits for the thread's outcome until the deadline in force (which the
/// thread moves forward at each new phase).
fn wait(session: &Session) -> Result<Outcome, Waited> {
    let exchange = &session.exchange;
    loop {
        if let Some(outcome) = Exchange::lock(&exchange.outcome).take() {
            return Ok(outcome);
        }
        if exchange.ended.load(Ordering::SeqCst) {
            return Err(Waited::Disconnected);
        }
        let now = Instant::now();
        let deadline = session.deadline.instant();
        if now >= deadline {
            return Err(Waited::Deadline);
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// What earlier transactions delivered, the rest deferred with `error`.
fn with_pending_deferred(
    mut delivered: Delivered,
    pending: Vec<String>,
    error: &DeliveryError,
) -> Delivered {
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
    delivered
}

/// The connection thread.
struct Thread {
    config: Arc<SessionConfig>,
    exchange: Arc<Exchange>,
    deadline: Arc<Deadline>,
    progress: Progress,
    lingering: Arc<AtomicUsize>,
}

impl Thread {
    /// The worker's next request; `None` once the worker is gone. Parks
    /// while there is none: staying awake for the next one (spinning for
    /// a few tens of microseconds) cost more CPU than it saved in
    /// `benches/deliver` on this 2-core machine.
    fn next_request(&self) -> Option<Request> {
        let exchange = &self.exchange;
        loop {
            if exchange.has_request.swap(false, Ordering::SeqCst) {
                if let Some(request) = Exchange::lock(&exchange.request).take() {
                    return Some(request);
                }
            }
            if exchange.closed.load(Ordering::SeqCst) {
                return None;
            }
            std::thread::park();
        }
    }

    fn reply(&self, outcome: Outcome) {
        *Exchange::lock(&self.exchange.outcome) = Some(outcome);
        if let Some(worker) = Exchange::lock(&self.exchange.worker).as_ref() {
            worker.unpark();
        }
    }

    fn run(self) {
        let _end = EndGuard(Arc::clone(&self.exchange));
        let mut open: Option<Open> = None;
        while let Some(request) = self.next_request() {
            let outcome = match request {
                Request::Deliver {
                    message,
                    recipients,
                } => {
                    let recipients = recipients.as_deref().unwrap_or(&message.recipients);
                    self.deliver(&mut open, &message, recipients)
                }
                Request::Close => {
                    if let Some(mut open) = open.take() {
                        let _ = open.smtp.quit();
                        open.smtp.abort();
                    }
                    Outcome {
                        result: Ok(Delivered::default()),
                        connections_opened: 0,
                    }
                }
            };
            if self.exchange.closed.load(Ordering::SeqCst) {
                break;
            }
            self.reply(outcome);
        }
        if let Some(mut open) = open.take() {
            if !self.deadline.abandoned() {
                let _ = open.smtp.quit();
            }
            open.smtp.abort();
        }
        if self.deadline.abandoned() {
            self.lingering.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn connect(&self) -> Result<Open, DeliveryError> {
        self.deadline.start_phase();
        let config = &self.config;
        let smtp = connect_with_report(
            &config.settings,
            config.tls.as_ref(),
            &config.hello,
            &mut |_| {},
        )?;
        config.capabilities.record(capabilities_of(&smtp));
        // The transaction that follows has its own full budget.
        self.deadline.start_phase();
        Ok(Open::new(smtp, config.settings.timeout))
    }

    fn deliver(
        &self,
        slot: &mut Option<Open>,
        message: &OutgoingMessage,
        recipients: &[String],
    ) -> Outcome {
        let mut opened = 0;
        let reused = slot.is_some();
        let mut open = match slot.take() {
            Some(open) => open,
            None => match self.connect() {
                Ok(open) => {
                    opened += 1;
                    open
                }
                Err(error) => {
                    return Outcome {
                        result: Err(error),
                        connections_opened: opened,
                    }
                }
            },
        };
        let progress = |delivered: &Delivered, pending: &[String]| {
            *self
                .progress
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                Some((delivered.clone(), pending.to_vec()));
        };
        let mut result = attempt(&mut open, message, recipients, &self.deadline, &progress);
        if reused {
            if let Err(failure) = &result {
                if is_dead_on_reuse(failure) {
                    // The relay closed the idle connection or said 421 on
                    // reuse: not the message's fault, and not an attempt.
                    log::debug!(
                        "message {}: reused SMTP connection is dead ({}), reconnecting",
                        message.id,
                        failure.error
                    );
                    open.smtp.abort();
                    open = match self.connect() {
                        Ok(fresh) => {
                            opened += 1;
                            fresh
                        }
                        Err(error) => {
                            return Outcome {
                                result: Err(error),
                                connections_opened: opened,
                            }
                        }
                    };
                    result = attempt(&mut open, message, recipients, &self.deadline, &progress);
                }
            }
        }
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let result = match result {
            Ok(delivered) => Ok(delivered),
            Err(failure) => {
                if failure.stage != Stage::Local {
                    open.reset(&self.deadline);
                }
                Err(failure.error)
            }
        };
        if open.broken {
            open.smtp.abort();
        } else {
            *slot = Some(open);
        }
        Outcome {
            result,
            connections_opened: opened,
        }
    }
}

fn is_dead_on_reuse(failure: &Failure) -> bool {
    failure.connection_dead && failure.stage != Stage::Body && failure.stage != Stage::Local
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
