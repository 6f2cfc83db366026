//! The engine: the library API that the HTTP layer (or any embedding
//! program) uses. Start it from a [`Config`], submit or send messages, read
//! and list their statuses, cancel or retry them, shut it down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, SpoolSetting};
use crate::dispatch::Dispatch;
use crate::health::RelayHealth;
use crate::job::{Job, RetryPolicy, WaitedOutcome};
use crate::message::{MailRequest, MessageError, OutgoingMessage};
use crate::metrics::{Gauges, Metrics};
use crate::pool::{start_workers, PoolControl, RateLimiter, WorkerContext};
use crate::status::{Event, EventKind, MessageStatus, State};
use crate::store::{id_key, ActionRefusal, KeyClaim, MessageRecord, StatusRecord, Store};
use crate::time::{from_millis, to_millis};
use crate::transport::TransportFactory;
use crate::webhooks::Webhooks;

pub use crate::store::ListQuery;

/// The engine could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The relay's TLS settings or the outbox directory are unusable.
    Transport(String),
    /// The spool directory cannot be used.
    Spool(std::io::Error),
    /// A thread could not be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Transport(detail) => f.write_str(detail),
            StartError::Spool(error) => {
                write!(f, "MAILROOM_SPOOL_DIR: cannot use the spool: {error}")
            }
            StartError::Thread(error) => write!(f, "cannot start a thread: {error}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Transport(_) => None,
            StartError::Spool(error) | StartError::Thread(error) => Some(error),
        }
    }
}

/// Why a message was not accepted.
#[derive(Debug)]
#[non_exhaustive]
pub enum SubmitError {
    /// The request is malformed (HTTP 400).
    Invalid(MessageError),
    /// `Idempotency-Key` longer than 255 characters or with control characters.
    InvalidIdempotencyKey,
    /// The idempotency key was used before with a different request (HTTP 409).
    IdempotencyConflict {
        /// The key.
        key: String,
    },
    /// `MAILROOM_QUEUE_CAPACITY` messages are unfinished (HTTP 503).
    Full,
    /// The engine is stopping (HTTP 503).
    ShuttingDown,
    /// The message could not be written to the spool (HTTP 503).
    Spool(std::io::Error),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Invalid(error) => error.fmt(f),
            SubmitError::InvalidIdempotencyKey => {
                f.write_str("header Idempotency-Key must be 1 to 255 printable characters")
            }
            SubmitError::IdempotencyConflict { key } => write!(
                f,
                "Idempotency-Key {key:?} was already used for a different request"
            ),
            SubmitError::Full => {
                f.write_str("the queue is full (MAILROOM_QUEUE_CAPACITY); retry later")
            }
            SubmitError::ShuttingDown => f.write_str("the service is shutting down; retry later"),
            SubmitError::Spool(error) => {
                write!(f, "cannot write the message to the spool: {error}")
            }
        }
    }
}

impl std::error::Error for SubmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SubmitError::Invalid(error) => Some(error),
            SubmitError::Spool(error) => Some(error),
            _ => None,
        }
    }
}

/// Why `send_and_wait` has no success to report.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendError {
    /// Not accepted at all.
    Rejected(SubmitError),
    /// The relay refused it or could not be reached.
    Failed {
        /// The message's id (its status says more).
        id: String,
        /// What went wrong, with the relay's reply.
        error: String,
        /// The relay's reply code, when there was a reply.
        smtp_code: Option<u16>,
    },
    /// No outcome within the timeout; the message may still be delivered.
    Timeout {
        /// The message's id, to follow its status.
        id: String,
    },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Rejected(error) => error.fmt(f),
            SendError::Failed { id, error, .. } => write!(f, "message {id} failed: {error}"),
            SendError::Timeout { id } => write!(f, "message {id}: no outcome in time"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Rejected(error) => Some(error),
            _ => None,
        }
    }
}

/// Why an action on a message (cancel, retry) was not done.
#[derive(Debug)]
#[non_exhaustive]
pub enum ActionError {
    /// No message with this id is known (HTTP 404).
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The message's state does not allow it (HTTP 409).
    WrongState {
        /// The message.
        id: String,
        /// Its current state.
        state: State,
    },
    /// The engine cannot take it now (queue full, stopping; HTTP 503).
    Unavailable(SubmitError),
    /// The change could not be written to the spool (HTTP 503).
    Spool(std::io::Error),
}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionError::NotFound { id } => write!(f, "no message with id {id:?}"),
            ActionError::WrongState { id, state } => write!(f, "message {id} is {state}"),
            ActionError::Unavailable(error) => error.fmt(f),
            ActionError::Spool(error) => write!(f, "cannot record it in the spool: {error}"),
        }
    }
}

impl std::error::Error for ActionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ActionError::Unavailable(error) => Some(error),
            ActionError::Spool(error) => Some(error),
            _ => None,
        }
    }
}

/// A list query that cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListError {
    /// The cursor is not one a previous page gave.
    InvalidCursor(String),
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::InvalidCursor(detail) => f.write_str(detail),
        }
    }
}

impl std::error::Error for ListError {}

/// An accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Accepted {
    /// Its id, for [`Engine::status`].
    pub id: String,
    /// Its state now (`queued` for a new message; for a repeated
    /// idempotency key, the first message's current state).
    pub state: State,
    /// True when an earlier request with the same idempotency key was
    /// accepted and this one queued nothing.
    pub repeated: bool,
}

/// One page of [`Engine::list`], newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessagePage {
    /// The messages (their events left out).
    pub messages: Vec<MessageStatus>,
    /// Pass this as the next query's cursor; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Whether the engine takes new work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Readiness {
    /// Accepting.
    Ready,
    /// Holding `MAILROOM_QUEUE_CAPACITY` unfinished messages.
    Full,
    /// Stopping.
    ShuttingDown,
    /// The spool cannot be written (why).
    SpoolFailing(String),
    /// Recent attempts all failed to reach or log in to the relay.
    RelayFailing(String),
}

/// What a shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Unfinished messages kept in the spool for the next start.
    pub kept: usize,
    /// Unfinished messages lost (memory mode only).
    pub dropped: usize,
}

/// What the engine handle shares with its threads.
struct Inner {
    config: Config,
    store: Arc<Store>,
    dispatch: Arc<Dispatch>,
    metrics: Arc<Metrics>,
    health: Arc<RelayHealth>,
    control: Arc<PoolControl>,
    accepting: AtomicBool,
    /// Signed webhooks, when configured.
    webhooks: Option<Webhooks>,
}

struct Threads {
    stop: Option<crossbeam_channel::Sender<()>>,
    workers: Vec<JoinHandle<()>>,
    schedule: Option<JoinHandle<()>>,
    report: Option<ShutdownReport>,
}

/// A running engine. Cheap to clone; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    threads: Arc<Mutex<Threads>>,
}

/// A claimed idempotency key until its request is accepted: dropped
/// unsettled (a refusal, or a panic), it releases the key, so a repeat
/// waiting for the outcome never waits forever.
struct KeyClaimGuard<'a> {
    store: &'a Store,
    key: Option<&'a str>,
}

impl KeyClaimGuard<'_> {
    /// The request was accepted.
    fn settle(mut self) {
        if let Some(key) = self.key.take() {
            self.store.settle_key(key);
        }
    }
}

impl Drop for KeyClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.store.release_key(key);
        }
    }
}

/// How a claimed idempotency key turned out.
enum Claim<'a> {
    /// New: accept the request under this guard.
    New(KeyClaimGuard<'a>),
    /// A repeat of an accepted request.
    Repeat(String),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The creation time written into an id (its first 12 hex digits).
fn id_millis(id: &str) -> u64 {
    id_key(id).map_or_else(|| to_millis(SystemTime::now()), |key| (key >> 64) as u64)
}

/// A digest of what a request asks for: a repeat with the same
/// idempotency key must ask for the same.
fn fingerprint(request: &MailRequest) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{request:?}").as_bytes());
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl Engine {
    /// Starts the workers and the schedule, and queues again what the
    /// spool holds from an earlier run.
    pub fn start(config: Config) -> Result<Engine, StartError> {
        let factory = TransportFactory::new(&config.relay).map_err(StartError::Transport)?;
        if config.spool == SpoolSetting::Memory {
            log::warn!("MAILROOM_SPOOL_DIR=none: accepted messages live in memory only and are lost if the process stops");
        }
        let (store, pending, corrupt) =
            Store::open(&config.spool, config.status_retention).map_err(StartError::Spool)?;
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::default());
        let webhooks = match &config.webhook {
            Some(settings) => {
                let queue =
                    crate::store::open_webhook_queue(&config.spool).map_err(StartError::Spool)?;
                let webhooks = Webhooks::start(settings.clone(), queue, Arc::clone(&metrics))
                    .map_err(StartError::Thread)?;
                // Before any worker runs: every change from now on is seen.
                store.subscribe(webhooks.observer());
                Some(webhooks)
            }
            None => None,
        };
        let (dispatch, work, schedule) =
            Dispatch::start(config.queue_capacity, config.workers).map_err(StartError::Thread)?;
        let dispatch = Arc::new(dispatch);
        let (stop, stop_receiver) = crossbeam_channel::bounded(0);
        let inner = Arc::new(Inner {
            store: Arc::clone(&store),
            dispatch: Arc::clone(&dispatch),
            metrics,
            health: Arc::new(RelayHealth::default()),
            control: Arc::new(PoolControl::default()),
            accepting: AtomicBool::new(true),
            config,
            webhooks,
        });

        let count = pending.len();
        dispatch.reserve_recovered(count);
        for record in pending {
            let due = record.status.next_attempt_at_ms.map(from_millis);
            let job = Job::new(
                record.message,
                record.status.pending_recipients().to_vec(),
                record.status.attempts,
            );
            match due.and_then(|due| due.duration_since(SystemTime::now()).ok()) {
                Some(wait) => dispatch.at(Instant::now() + wait, job),
                None => dispatch.now(job),
            }
        }
        if count > 0 || corrupt > 0 {
            log::info!(
                "spool: recovered {count} unfinished messages ({corrupt} set aside as corrupt)"
            );
        }

        let config = &inner.config;
        let context = Arc::new(WorkerContext {
            store: Arc::clone(&inner.store),
            dispatch: Arc::clone(&inner.dispatch),
            policy: RetryPolicy {
                base: config.retry_base,
                max: config.retry_max,
                max_attempts: config.max_attempts,
            },
            metrics: Arc::clone(&inner.metrics),
            health: Arc::clone(&inner.health),
            control: Arc::clone(&inner.control),
            rate_limiter: RateLimiter::new(config.rate_limit),
            niceness: config.worker_niceness,
        });
        let transports = (0..config.workers).map(|_| factory.transport()).collect();
        let workers =
            start_workers(&context, work, stop_receiver, transports).map_err(StartError::Thread)?;
        Ok(Engine {
            inner,
            threads: Arc::new(Mutex::new(Threads {
                stop: Some(stop),
                workers,
                schedule: Some(schedule),
                report: None,
            })),
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn check_key(key: Option<&str>) -> Result<(), SubmitError> {
        match key {
            Some(key)
                if key.is_empty()
                    || key.chars().count() > 255
                    || key.chars().any(char::is_control) =>
            {
                Err(SubmitError::InvalidIdempotencyKey)
            }
            _ => Ok(()),
        }
    }

    /// Claims `key` for a request that would become `id`.
    fn claim<'a>(
        &'a self,
        key: Option<&'a str>,
        request: &MailRequest,
        id: &str,
    ) -> Result<Claim<'a>, SubmitError> {
        let store = &self.inner.store;
        let Some(key) = key else {
            return Ok(Claim::New(KeyClaimGuard { store, key: None }));
        };
        match store.claim_key(key, &fingerprint(request), id) {
            KeyClaim::Claimed => Ok(Claim::New(KeyClaimGuard {
                store,
                key: Some(key),
            })),
            KeyClaim::Existing(first) => Ok(Claim::Repeat(first)),
            KeyClaim::Conflict => Err(SubmitError::IdempotencyConflict {
                key: key.to_string(),
            }),
        }
    }

    /// The status record a new message starts with.
    fn new_status(
        message: &OutgoingMessage,
        key: Option<&str>,
        request: &MailRequest,
    ) -> StatusRecord {
        let mut status = StatusRecord::new(
            message.id.clone(),
            id_millis(&message.id),
            message.recipients.clone(),
        );
        status.idempotency_key = key.map(str::to_string);
        status.fingerprint = key.map(|_| fingerprint(request));
        status.push_event(Event {
            at_ms: status.created_at_ms,
            kind: EventKind::Accepted,
        });
        status
    }

    /// Validates, spools and queues a message; returns at once. With an
    /// idempotency key already seen for the same request, returns the first
    /// message's id and current state and queues nothing.
    pub fn submit(
        &self,
        request: &MailRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Accepted, SubmitError> {
        let inner = &self.inner;
        Engine::check_key(idempotency_key)?;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let message = request
            .build(inner.config.allowed_senders.as_deref())
            .map_err(SubmitError::Invalid)?;
        let id = message.id.clone();
        let guard = match self.claim(idempotency_key, request, &id)? {
            Claim::Repeat(first) => return Ok(self.repeated(first)),
            Claim::New(guard) => guard,
        };
        if !inner.dispatch.reserve() {
            return Err(SubmitError::Full);
        }
        let record = MessageRecord {
            status: Engine::new_status(&message, idempotency_key, request),
            message: Arc::new(message),
        };
        if let Err(error) = inner.store.accept(std::slice::from_ref(&record)) {
            inner.dispatch.release();
            log::error!("message {id}: refused, the spool cannot be written: {error}");
            return Err(SubmitError::Spool(error));
        }
        guard.settle();
        inner.metrics.message_accepted();
        log::info!("message {id}: queued");
        let recipients = record.status.recipients.clone();
        inner.dispatch.now(Job::new(record.message, recipients, 0));
        Ok(Accepted {
            id,
            state: State::Queued,
            repeated: false,
        })
    }

    fn repeated(&self, id: String) -> Accepted {
        let state = self
            .inner
            .store
            .get(&id)
            .map_or(State::Queued, |status| status.state());
        Accepted {
            id,
            state,
            repeated: true,
        }
    }

    /// Sends a message through the pool and waits up to `timeout` for the
    /// relay's answer. One attempt, no retry; not spooled (the caller learns
    /// the outcome). A repeated idempotency key waits for the first
    /// request's outcome instead of sending again.
    pub fn send_and_wait(
        &self,
        request: &MailRequest,
        idempotency_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Accepted, SendError> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        Engine::check_key(idempotency_key).map_err(SendError::Rejected)?;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(SendError::Rejected(SubmitError::ShuttingDown));
        }
        let message = request
            .build(inner.config.allowed_senders.as_deref())
            .map_err(|error| SendError::Rejected(SubmitError::Invalid(error)))?;
        let id = message.id.clone();
        let guard = match self
            .claim(idempotency_key, request, &id)
            .map_err(SendError::Rejected)?
        {
            Claim::Repeat(first) => return self.outcome_of(first, deadline),
            Claim::New(guard) => guard,
        };
        if !inner.dispatch.reserve() {
            return Err(SendError::Rejected(SubmitError::Full));
        }
        let (waiter, outcome) = crossbeam_channel::bounded::<WaitedOutcome>(1);
        let status = Engine::new_status(&message, idempotency_key, request);
        let recipients = status.recipients.clone();
        inner.store.track(status);
        let mut job = Job::new(Arc::new(message), recipients, 0);
        job.waiter = Some(waiter);
        if inner.dispatch.try_now(job).is_err() {
            inner.dispatch.release();
            inner.store.forget(&id);
            return Err(SendError::Rejected(SubmitError::Full));
        }
        guard.settle();
        inner.metrics.message_accepted();
        log::info!("message {id}: sending (waiting for the outcome)");
        match outcome.recv_deadline(deadline) {
            Ok(outcome) => Engine::waited(id, outcome),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(SendError::Timeout { id }),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                match inner.store.get(&id).map(|status| status.state()) {
                    Some(State::Cancelled) => Err(SendError::Failed {
                        id,
                        error: "cancelled before it was sent".into(),
                        smtp_code: None,
                    }),
                    _ => Err(SendError::Rejected(SubmitError::ShuttingDown)),
                }
            }
        }
    }

    fn waited(id: String, outcome: WaitedOutcome) -> Result<Accepted, SendError> {
        match outcome.state {
            State::Sent => Ok(Accepted {
                id,
                state: State::Sent,
                repeated: false,
            }),
            _ => Err(SendError::Failed {
                id,
                error: outcome.error.unwrap_or_default(),
                smtp_code: outcome.smtp_code,
            }),
        }
    }

    /// The outcome of an earlier message, waiting for it until `deadline`.
    fn outcome_of(&self, id: String, deadline: Instant) -> Result<Accepted, SendError> {
        let status = self.inner.store.wait_finished(&id, deadline);
        match status {
            Some(status) if status.state() == State::Sent => Ok(Accepted {
                id,
                state: State::Sent,
                repeated: true,
            }),
            Some(status) if status.state().is_finished() => {
                let smtp_code = status
                    .events
                    .iter()
                    .rev()
                    .find_map(|event| match &event.kind {
                        EventKind::Attempt { smtp_code, .. } => *smtp_code,
                        _ => None,
                    });
                Err(SendError::Failed {
                    id,
                    error: status
                        .last_error
                        .clone()
                        .unwrap_or_else(|| format!("the message is {}", status.state())),
                    smtp_code,
                })
            }
            _ => Err(SendError::Timeout { id }),
        }
    }

    /// The status of a message, while it is kept.
    pub fn status(&self, id: &str) -> Option<MessageStatus> {
        self.inner.store.get(id).map(|status| status.to_status())
    }

    /// Messages matching `query`, newest first, a page at a time.
    pub fn list(&self, query: &ListQuery) -> Result<MessagePage, ListError> {
        let page = self
            .inner
            .store
            .list(query)
            .map_err(ListError::InvalidCursor)?;
        Ok(MessagePage {
            messages: page
                .records
                .iter()
                .map(|record| {
                    let mut status = record.to_status();
                    status.events.clear();
                    status
                })
                .collect(),
            next_cursor: page.next_cursor,
        })
    }

    /// Cancels a message that is scheduled, queued or waiting for a retry:
    /// it becomes `cancelled` and is never sent, also after a restart.
    pub fn cancel(&self, id: &str) -> Result<MessageStatus, ActionError> {
        let inner = &self.inner;
        match inner.store.cancel(id) {
            Ok(status) => {
                inner.dispatch.release();
                log::info!("message {id}: cancelled");
                Ok(status.to_status())
            }
            Err(refusal) => Err(action_error(id, refusal)),
        }
    }

    /// Queues a failed message again with a fresh attempt budget, for the
    /// recipients it has not reached.
    pub fn retry(&self, id: &str) -> Result<MessageStatus, ActionError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(ActionError::Unavailable(SubmitError::ShuttingDown));
        }
        match inner.store.get(id) {
            None => {
                return Err(ActionError::NotFound { id: id.to_string() });
            }
            Some(status) if status.state() != State::Failed => {
                return Err(ActionError::WrongState {
                    id: id.to_string(),
                    state: status.state(),
                });
            }
            Some(_) => {}
        }
        if !inner.dispatch.reserve() {
            return Err(ActionError::Unavailable(SubmitError::Full));
        }
        match inner.store.requeue(id) {
            Ok(record) => {
                log::info!("message {id}: queued again by request");
                let status = record.status.to_status();
                let recipients = record.status.pending_recipients().to_vec();
                inner.dispatch.now(Job::new(record.message, recipients, 0));
                Ok(status)
            }
            Err(refusal) => {
                inner.dispatch.release();
                Err(action_error(id, refusal))
            }
        }
    }

    /// Whether new messages are taken.
    pub fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            Readiness::ShuttingDown
        } else if let Some(problem) = inner.store.write_problem() {
            Readiness::SpoolFailing(problem)
        } else if inner.dispatch.is_full() {
            Readiness::Full
        } else if let Some(detail) = inner.health.failing() {
            Readiness::RelayFailing(detail)
        } else {
            Readiness::Ready
        }
    }

    /// The Prometheus exposition text of the engine's metrics.
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let counts = inner.store.counts();
        let mut text = inner.metrics.render(Gauges {
            queue_depth: inner.dispatch.queue_depth() as u64,
            retry_depth: counts.get(&State::Retrying).copied().unwrap_or(0) as u64,
            held: inner.dispatch.held() as u64,
        });
        let pending = inner.webhooks.as_ref().map_or(0, Webhooks::pending);
        text.push_str(&inner.metrics.render_webhooks(pending as u64));
        text
    }

    /// Counts an HTTP answer for `/metrics`.
    pub fn record_http(&self, code: u16) {
        self.inner.metrics.http_request(code);
    }

    /// SMTP connections opened since start.
    pub fn connections_opened(&self) -> u64 {
        self.inner.metrics.connections_opened()
    }

    /// Unfinished messages held (queued, sending, waiting for retry).
    pub fn unfinished(&self) -> usize {
        self.inner.dispatch.held()
    }

    /// Jobs the schedule holds until their time.
    pub fn scheduled_jobs(&self) -> usize {
        self.inner.dispatch.scheduled_depth()
    }

    /// Stops taking new messages (they get `ShuttingDown`); idempotent.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// Stops: refuses new messages, lets deliveries in flight finish within
    /// `MAILROOM_SHUTDOWN_TIMEOUT_MS`, and keeps the rest in the spool (in
    /// memory mode: sends what it can in that time and drops the rest).
    /// Safe to call more than once; later calls return the first report.
    pub fn shutdown(&self) -> ShutdownReport {
        let mut threads = lock(&self.threads);
        if let Some(report) = threads.report {
            return report;
        }
        let inner = &self.inner;
        self.stop_accepting();
        let deadline = Instant::now() + inner.config.shutdown_timeout;
        let durable = inner.store.is_durable();
        if durable {
            inner.control.stop_taking();
        } else {
            inner.control.drain_until(deadline);
        }
        // Memory mode: retries waiting for their time get one last chance now.
        inner.dispatch.stop_schedule(!durable);
        if let Some(schedule) = threads.schedule.take() {
            let _ = schedule.join();
        }
        threads.stop = None; // closes the stop channel: workers finish what they hold
        let workers = std::mem::take(&mut threads.workers);
        join_until(workers, deadline);
        if let Some(webhooks) = &inner.webhooks {
            // After the workers: the webhooks of their last deliveries are queued.
            let left = webhooks.shutdown(deadline, !durable);
            if durable {
                log::info!(
                    "webhooks: stopped; {left} pending kept in the spool for the next start"
                );
            } else if left > 0 {
                log::warn!("webhooks: stopped; {left} pending dropped (MAILROOM_SPOOL_DIR=none)");
            }
        }
        let unfinished = inner.dispatch.held();
        let report = if durable {
            log::info!(
                "stopped; {unfinished} unfinished messages kept in the spool for the next start"
            );
            ShutdownReport {
                kept: unfinished,
                dropped: 0,
            }
        } else {
            if unfinished > 0 {
                log::warn!("stopped; {unfinished} messages dropped (MAILROOM_SPOOL_DIR=none)");
            } else {
                log::info!("stopped; every accepted message was delivered");
            }
            ShutdownReport {
                kept: 0,
                dropped: unfinished,
            }
        };
        threads.report = Some(report);
        report
    }
}

fn action_error(id: &str, refusal: ActionRefusal) -> ActionError {
    match refusal {
        ActionRefusal::Unknown => ActionError::NotFound { id: id.to_string() },
        ActionRefusal::State(state) => ActionError::WrongState {
            id: id.to_string(),
            state,
        },
        ActionRefusal::Io(error) => ActionError::Spool(error),
    }
}

/// Waits for the threads until `deadline`; a thread stuck on a relay past
/// it is left behind (the process is about to exit).
fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) {
    let (done, finished) = crossbeam_channel::unbounded();
    let count = handles.len();
    for handle in handles {
        let done = done.clone();
        let _ = std::thread::Builder::new()
            .name("join".into())
            .spawn(move || {
                let _ = handle.join();
                let _ = done.send(());
            });
    }
    for _ in 0..count {
        if finished.recv_deadline(deadline).is_err() {
            log::warn!("shutdown timeout reached with deliveries still in flight");
            return;
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("unfinished", &self.unfinished())
            .finish()
    }
}
