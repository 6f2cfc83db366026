//! The engine: the library API that the HTTP layer (or any embedding
//! program) uses. Start it from a [`Config`], submit or send messages, read
//! and list their statuses, cancel or retry them, shut it down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, SpoolSetting};
use crate::health::RelayHealth;
use crate::job::{Job, RetryPolicy, WaitedOutcome};
use crate::message::{MailRequest, MessageError, OutgoingMessage};
use crate::metrics::{Gauges, Metrics};
use crate::pool::{start_workers, PoolControl, WorkerContext};
use crate::status::{Event, EventKind, MessageStatus, State};
use crate::store::{id_key, ActionRefusal, Admission, MessageRecord, StatusRecord, Store};
use crate::templates::Templates;
use crate::time::to_millis;
use crate::transport::{refuse_at_submit, RelayCapabilities, TransportFactory};
use crate::webhooks::Webhooks;

pub use crate::store::{ListQuery, Suppression};

/// How far ahead `send_at` may be.
pub const MAX_SCHEDULE_DAYS: u64 = 30;

/// A `send_at` on `/api/mail/v2` at most this far ahead is taken as now
/// (clocks differ); further is refused (v2 sends now and waits).
const V2_SEND_AT_SKEW: Duration = Duration::from_secs(60);

/// When a message with this `send_at` is to be sent: `None` for now (no
/// time, or one not in the future).
fn scheduled_time(send_at: Option<SystemTime>) -> Result<Option<SystemTime>, SubmitError> {
    let Some(send_at) = send_at else {
        return Ok(None);
    };
    let now = SystemTime::now();
    if send_at <= now {
        return Ok(None);
    }
    if send_at > now + Duration::from_secs(MAX_SCHEDULE_DAYS * 86_400) {
        return Err(SubmitError::SendAtTooLate);
    }
    Ok(Some(send_at))
}

/// The engine could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The relay's TLS settings or the outbox directory are unusable.
    Transport(String),
    /// The spool directory cannot be used.
    Spool(std::io::Error),
    /// The shared store (`MAILROOM_STORE`) cannot be used.
    SharedStore(std::io::Error),
    /// A thread could not be started.
    Thread(std::io::Error),
    /// A template is broken (the error names file and line).
    Templates(crate::templates::TemplateError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Transport(detail) => f.write_str(detail),
            StartError::Spool(error) => {
                write!(f, "MAILROOM_SPOOL_DIR: cannot use the spool: {error}")
            }
            StartError::SharedStore(error) => {
                write!(f, "MAILROOM_STORE: cannot use the shared store: {error}")
            }
            StartError::Thread(error) => write!(f, "cannot start a thread: {error}"),
            StartError::Templates(error) => write!(f, "templates: {error}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Transport(_) => None,
            StartError::Spool(error)
            | StartError::SharedStore(error)
            | StartError::Thread(error) => Some(error),
            StartError::Templates(error) => Some(error),
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
    /// `send_at` is not within the next [`MAX_SCHEDULE_DAYS`] days (HTTP 400).
    SendAtTooLate,
    /// `send_at` in the future on `/api/mail/v2`, which sends now and waits
    /// for the outcome (HTTP 400).
    SendAtNotNow,
    /// The request's template cannot be rendered: unknown, a variable
    /// missing from `data`, and the like (HTTP 400).
    Template(crate::templates::RenderError),
    /// `template` with `subject`, `message` or `html`, or `data` without
    /// `template` (HTTP 400).
    TemplateMixed(&'static str),
    /// `MAILROOM_QUEUE_CAPACITY` messages are unfinished (HTTP 503).
    Full,
    /// `MAILROOM_SCHEDULED_CAPACITY` messages wait for their time (HTTP 503).
    ScheduleFull,
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
            SubmitError::SendAtTooLate => write!(
                f,
                "field `send_at` must be at most {MAX_SCHEDULE_DAYS} days ahead"
            ),
            SubmitError::SendAtNotNow => f.write_str(
                "field `send_at` is in the future: /api/mail/v2 sends now and waits; schedule with /api/mail",
            ),
            SubmitError::Template(error) => error.fmt(f),
            SubmitError::TemplateMixed(detail) => f.write_str(detail),
            SubmitError::Full => {
                f.write_str("the queue is full (MAILROOM_QUEUE_CAPACITY); retry later")
            }
            SubmitError::ScheduleFull => f.write_str(
                "too many scheduled messages (MAILROOM_SCHEDULED_CAPACITY); retry later",
            ),
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
            SubmitError::Template(error) => Some(error),
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
#[derive(Debug)]
#[non_exhaustive]
pub enum ListError {
    /// The cursor is not one a previous page gave.
    InvalidCursor(String),
    /// The store cannot be read.
    Store(std::io::Error),
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::InvalidCursor(detail) => f.write_str(detail),
            ListError::Store(error) => write!(f, "the store cannot be read: {error}"),
        }
    }
}

impl std::error::Error for ListError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListError::Store(error) => Some(error),
            ListError::InvalidCursor(_) => None,
        }
    }
}

/// Why a change to the suppression list was not made.
#[derive(Debug)]
#[non_exhaustive]
pub enum SuppressionError {
    /// Not an email address (HTTP 400).
    InvalidAddress(String),
    /// The address is not on the list (HTTP 404).
    NotFound(String),
    /// The change could not be written to the spool (HTTP 503).
    Spool(std::io::Error),
}

impl std::fmt::Display for SuppressionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuppressionError::InvalidAddress(address) => {
                write!(f, "{address:?} is not an email address")
            }
            SuppressionError::NotFound(address) => {
                write!(f, "{address:?} is not on the suppression list")
            }
            SuppressionError::Spool(error) => {
                write!(f, "cannot record it in the spool: {error}")
            }
        }
    }
}

impl std::error::Error for SuppressionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SuppressionError::Spool(error) => Some(error),
            _ => None,
        }
    }
}

/// One page of the suppression list, in address order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SuppressionPage {
    /// The entries.
    pub suppressions: Vec<Suppression>,
    /// Pass this as the next cursor; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// One message of [`Engine::submit_batch`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BatchItem<'a> {
    /// The request.
    pub request: &'a MailRequest,
    /// Its idempotency key, if any (same rules as for one message).
    pub idempotency_key: Option<&'a str>,
}

impl<'a> BatchItem<'a> {
    /// An item with an optional idempotency key.
    pub fn new(request: &'a MailRequest, idempotency_key: Option<&'a str>) -> BatchItem<'a> {
        BatchItem {
            request,
            idempotency_key,
        }
    }
}

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
    /// The store cannot record messages: a spool that cannot be written,
    /// or an unreachable shared store (why).
    StoreFailing(String),
    /// Recent attempts all failed to reach or log in to the relay.
    RelayFailing(String),
}

/// The figures the dashboard shows (`GET /api/stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages waiting for a worker.
    pub queue_depth: usize,
    /// Messages waiting for their next attempt.
    pub retry_depth: usize,
    /// Messages waiting for their `send_at`.
    pub scheduled: usize,
    /// Unfinished messages held against `MAILROOM_QUEUE_CAPACITY`.
    pub held: usize,
    /// Messages kept, by state.
    pub by_state: Vec<(State, usize)>,
    /// Why the relay counts as failing, while it does.
    pub relay_failing: Option<String>,
    /// The last failure to use the relay and when (kept after it recovers).
    pub relay_last_error: Option<(SystemTime, String)>,
    /// Sent and failed per minute over the last hour, oldest first.
    pub last_hour: Vec<crate::metrics::Minute>,
    /// Webhooks waiting for delivery; `None` when no webhook is configured.
    pub webhooks_pending: Option<usize>,
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
    /// What the relay offers, once known (submit-time refusals).
    capabilities: RelayCapabilities,
    templates: Templates,
    store: Arc<dyn Store>,
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
    report: Option<ShutdownReport>,
}

/// A running engine. Cheap to clone; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    threads: Arc<Mutex<Threads>>,
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
    /// Feeds formatted text straight into the digest: a request with a large
    /// attachment is not copied into a string first.
    struct Digesting(ring::digest::Context);
    impl std::fmt::Write for Digesting {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            self.0.update(text.as_bytes());
            Ok(())
        }
    }
    let mut digesting = Digesting(ring::digest::Context::new(&ring::digest::SHA256));
    // Debug covers every field, in a fixed order, maps sorted (BTreeMap).
    let _ = std::fmt::Write::write_fmt(&mut digesting, format_args!("{request:?}"));
    let digest = digesting.0.finish();
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn store_unavailable(error: std::io::Error) -> SubmitError {
    SubmitError::Spool(error)
}

impl Engine {
    /// Starts the workers, and queues again what the store holds from an
    /// earlier run.
    pub fn start(config: Config) -> Result<Engine, StartError> {
        let factory = TransportFactory::new(&config.relay).map_err(StartError::Transport)?;
        // Checked before anything starts: a broken template stops the start.
        let templates = Templates::from_config(&config).map_err(StartError::Templates)?;
        if config.spool == SpoolSetting::Memory {
            log::warn!("MAILROOM_SPOOL_DIR=none: accepted messages live in memory only and are lost if the process stops");
        }
        let store_error = |error| match config.store {
            Some(_) => StartError::SharedStore(error),
            None => StartError::Spool(error),
        };
        let (store, recovery) = crate::store::open(&config).map_err(store_error)?;
        if recovery.unfinished > 0 || recovery.corrupt > 0 {
            log::info!(
                "spool: recovered {} unfinished messages ({} scheduled; {} set aside as corrupt)",
                recovery.unfinished,
                recovery.scheduled,
                recovery.corrupt
            );
        }
        let metrics = Arc::new(Metrics::default());
        let webhooks = match &config.webhook {
            Some(settings) => {
                let queue = store.webhook_queue().map_err(store_error)?;
                let webhooks = Webhooks::start(settings.clone(), queue, Arc::clone(&metrics))
                    .map_err(StartError::Thread)?;
                // Before any worker runs: every change from now on is seen.
                store.subscribe(webhooks.observer());
                Some(webhooks)
            }
            None => None,
        };
        let (stop, stop_receiver) = crossbeam_channel::bounded(0);
        let inner = Arc::new(Inner {
            store,
            metrics,
            health: Arc::new(RelayHealth::default()),
            control: Arc::new(PoolControl::default()),
            accepting: AtomicBool::new(true),
            templates,
            capabilities: factory.capabilities(),
            config,
            webhooks,
        });
        let config = &inner.config;
        let context = Arc::new(WorkerContext {
            store: Arc::clone(&inner.store),
            policy: RetryPolicy {
                base: config.retry_base,
                max: config.retry_max,
                max_attempts: config.max_attempts,
            },
            metrics: Arc::clone(&inner.metrics),
            health: Arc::clone(&inner.health),
            control: Arc::clone(&inner.control),
            niceness: config.worker_niceness,
            suppress_on_bounce: config.suppress_on_bounce,
        });
        let transports = (0..config.workers).map(|_| factory.transport()).collect();
        let workers = start_workers(&context, inner.store.work(), stop_receiver, transports)
            .map_err(StartError::Thread)?;
        Ok(Engine {
            inner,
            threads: Arc::new(Mutex::new(Threads {
                stop: Some(stop),
                workers,
                report: None,
            })),
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The message templates (reload them with [`Templates::reload`]).
    pub fn templates(&self) -> &Templates {
        &self.inner.templates
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

    /// The status record a new message starts with.
    fn new_status(
        message: &OutgoingMessage,
        key: Option<&str>,
        request: &MailRequest,
    ) -> StatusRecord {
        let mut status = StatusRecord::new(
            message.id.clone(),
            id_millis(&message.id),
            message.recipients.as_slice(),
        );
        status.idempotency_key = key.map(str::to_string);
        status.fingerprint = key.map(|_| fingerprint(request));
        status.tags = request.tags.clone();
        status.metadata = request.metadata.clone();
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
        let item = BatchItem {
            request,
            idempotency_key,
        };
        self.submit_batch(std::slice::from_ref(&item))
            .pop()
            .unwrap_or(Err(SubmitError::ShuttingDown))
    }

    /// Renders a request's template (when it names one) and builds the
    /// message dated `date`, refusing what could never be delivered.
    fn build(
        &self,
        request: &MailRequest,
        date: SystemTime,
    ) -> Result<OutgoingMessage, SubmitError> {
        let inner = &self.inner;
        let rendered;
        let request = match &request.template {
            None if request.data.is_some() => {
                return Err(SubmitError::TemplateMixed(
                    "field `data` goes with `template`: name the template to render",
                ))
            }
            None => request,
            Some(name) => {
                if !request.subject.is_empty()
                    || request.message.is_some()
                    || request.html.is_some()
                {
                    return Err(SubmitError::TemplateMixed(
                        "field `template` replaces `subject`, `message` and `html`: leave them out",
                    ));
                }
                let data = serde_json::Value::Object(request.data.clone().unwrap_or_default());
                let parts = inner
                    .templates
                    .render(name, &data)
                    .map_err(SubmitError::Template)?;
                let mut filled = request.clone();
                filled.subject = parts.subject;
                filled.message = parts.text;
                filled.html = parts.html;
                rendered = filled;
                &rendered
            }
        };
        let message = request
            .build_dated(inner.config.allowed_senders.as_deref(), date)
            .map_err(SubmitError::Invalid)?;
        if let Some(error) = refuse_at_submit(&message, &inner.capabilities) {
            return Err(SubmitError::Invalid(error));
        }
        Ok(message)
    }

    /// Builds one item's record (or says why not).
    fn prepare(&self, item: &BatchItem<'_>) -> Result<MessageRecord, SubmitError> {
        let inner = &self.inner;
        Engine::check_key(item.idempotency_key)?;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let send_at = scheduled_time(item.request.send_at);
        // A scheduled message is dated when it is due. (The message's own
        // faults are reported before a bad send_at, as they always were.)
        let due = send_at.as_ref().ok().copied().flatten();
        let message = self.build(item.request, due.unwrap_or_else(SystemTime::now))?;
        let send_at = send_at?;
        let mut status = Engine::new_status(&message, item.idempotency_key, item.request);
        if let Some(send_at) = send_at {
            status.set_state(State::Scheduled);
            status.next_attempt_at_ms = Some(to_millis(send_at));
        }
        Ok(MessageRecord {
            status,
            message: Arc::new(message),
        })
    }

    /// Submits several messages at once: one result per item, in order; a
    /// bad item does not refuse the others, and the accepted ones are on
    /// disk (one commit for all) before this returns.
    pub fn submit_batch(&self, items: &[BatchItem<'_>]) -> Vec<Result<Accepted, SubmitError>> {
        let inner = &self.inner;
        let mut results: Vec<Option<Result<Accepted, SubmitError>>> =
            items.iter().map(|_| None).collect();
        // Items repeating an earlier item's key in this batch: (item, earlier item).
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut first_with_key: std::collections::HashMap<&str, (usize, String)> =
            std::collections::HashMap::new();
        let mut positions = Vec::new();
        let mut records = Vec::new();
        for (position, item) in items.iter().enumerate() {
            let record = match self.prepare(item) {
                Ok(record) => record,
                Err(error) => {
                    results[position] = Some(Err(error));
                    continue;
                }
            };
            if let (Some(key), Some(digest)) =
                (item.idempotency_key, record.status.fingerprint.clone())
            {
                // The store would see the second as a repeat only once the
                // first is accepted: answer it from the first's result.
                if let Some((earlier, known)) = first_with_key.get(key) {
                    results[position] = if *known == digest {
                        repeats.push((position, *earlier));
                        None
                    } else {
                        Some(Err(SubmitError::IdempotencyConflict {
                            key: key.to_string(),
                        }))
                    };
                    continue;
                }
                first_with_key.insert(key, (position, digest));
            }
            positions.push(position);
            records.push(record);
        }
        let ids: Vec<String> = records
            .iter()
            .map(|record| record.status.id.clone())
            .collect();
        let admissions = inner.store.accept(records);
        let mut refused_for_spool = 0;
        for ((position, id), admission) in positions.into_iter().zip(ids).zip(admissions) {
            let key = || {
                items[position]
                    .idempotency_key
                    .unwrap_or_default()
                    .to_string()
            };
            results[position] = Some(match admission {
                Admission::Accepted(state) => {
                    inner.metrics.message_accepted();
                    Ok(Accepted {
                        id,
                        state,
                        repeated: false,
                    })
                }
                Admission::Repeat(first) => Ok(self.repeated(first)),
                Admission::Conflict => Err(SubmitError::IdempotencyConflict { key: key() }),
                Admission::Full => Err(SubmitError::Full),
                Admission::ScheduleFull => Err(SubmitError::ScheduleFull),
                Admission::Refused(error) => {
                    refused_for_spool += 1;
                    Err(SubmitError::Spool(error))
                }
            });
        }
        if refused_for_spool > 0 {
            log::error!("{refused_for_spool} messages refused: the store cannot record them");
        }
        for (position, earlier) in repeats {
            results[position] = Some(match &results[earlier] {
                Some(Ok(first)) => Ok(Accepted {
                    repeated: true,
                    ..first.clone()
                }),
                Some(Err(error)) => Err(copy_error(error)),
                None => Err(SubmitError::ShuttingDown),
            });
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or(Err(SubmitError::ShuttingDown)))
            .collect()
    }

    fn repeated(&self, id: String) -> Accepted {
        let state = match self.inner.store.get(&id) {
            Ok(Some(status)) => status.state(),
            _ => State::Queued,
        };
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
        // A client's clock a little ahead of ours still means now.
        let ahead = scheduled_time(request.send_at).map_err(SendError::Rejected)?;
        if ahead.is_some_and(|at| at > SystemTime::now() + V2_SEND_AT_SKEW) {
            return Err(SendError::Rejected(SubmitError::SendAtNotNow));
        }
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(SendError::Rejected(SubmitError::ShuttingDown));
        }
        // Sent now, also when `send_at` is a little ahead (a skewed clock).
        let message = self
            .build(request, SystemTime::now())
            .map_err(SendError::Rejected)?;
        let id = message.id.clone();
        let (waiter, outcome) = crossbeam_channel::bounded::<WaitedOutcome>(1);
        let status = Engine::new_status(&message, idempotency_key, request);
        let recipients = status.recipients.clone();
        let mut job = Job::new(Arc::new(message), recipients, 0);
        job.waiter = Some(waiter);
        match inner.store.accept_waited(status, job) {
            Admission::Accepted(_) => {}
            Admission::Repeat(first) => return self.outcome_of(first, deadline),
            Admission::Conflict => {
                return Err(SendError::Rejected(SubmitError::IdempotencyConflict {
                    key: idempotency_key.unwrap_or_default().to_string(),
                }))
            }
            Admission::Full | Admission::ScheduleFull => {
                return Err(SendError::Rejected(SubmitError::Full))
            }
            Admission::Refused(error) => {
                return Err(SendError::Rejected(SubmitError::Spool(error)))
            }
        }
        inner.metrics.message_accepted();
        log::info!("message {id}: sending (waiting for the outcome)");
        match outcome.recv_deadline(deadline) {
            Ok(outcome) => Engine::waited(id, outcome),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(SendError::Timeout { id }),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                match inner
                    .store
                    .get(&id)
                    .ok()
                    .flatten()
                    .map(|status| status.state())
                {
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
        let status = self
            .inner
            .store
            .wait_finished(&id, deadline)
            .map_err(|error| SendError::Rejected(store_unavailable(error)))?;
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
                    error: status.last_error.as_deref().map_or_else(
                        || format!("the message is {}", status.state()),
                        str::to_string,
                    ),
                    smtp_code,
                })
            }
            _ => Err(SendError::Timeout { id }),
        }
    }

    /// The status of a message, while it is kept; `Err` when the store
    /// cannot be read (a shared store that is unreachable).
    pub fn status(&self, id: &str) -> std::io::Result<Option<MessageStatus>> {
        Ok(self.inner.store.get(id)?.map(|status| status.to_status()))
    }

    /// Messages matching `query`, newest first, a page at a time.
    pub fn list(&self, query: &ListQuery) -> Result<MessagePage, ListError> {
        let page = self
            .inner
            .store
            .list(query)
            .map_err(ListError::Store)?
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
        match self.inner.store.cancel(id) {
            Ok(status) => {
                log::info!("message {id}: cancelled");
                Ok(status.to_status())
            }
            Err(refusal) => Err(action_error(id, refusal)),
        }
    }

    /// Queues a failed message again with a fresh attempt budget, for the
    /// recipients it has not reached.
    pub fn retry(&self, id: &str) -> Result<MessageStatus, ActionError> {
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(ActionError::Unavailable(SubmitError::ShuttingDown));
        }
        match self.inner.store.requeue(id) {
            Ok(status) => {
                log::info!("message {id}: queued again by request");
                Ok(status.to_status())
            }
            Err(refusal) => Err(action_error(id, refusal)),
        }
    }

    /// A page of the suppression list: up to `limit` (1 to 500) entries
    /// after `cursor`.
    pub fn suppressions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SuppressionPage, SuppressionError> {
        let (suppressions, next_cursor) = self
            .inner
            .store
            .suppressions(cursor, limit.clamp(1, ListQuery::MAX_LIMIT))
            .map_err(SuppressionError::Spool)?;
        Ok(SuppressionPage {
            suppressions,
            next_cursor,
        })
    }

    /// Puts an address on the suppression list (or updates its reason).
    pub fn suppress(
        &self,
        address: &str,
        reason: Option<String>,
    ) -> Result<Suppression, SuppressionError> {
        if address.trim().parse::<lettre::Address>().is_err() {
            return Err(SuppressionError::InvalidAddress(address.to_string()));
        }
        let entry = self
            .inner
            .store
            .suppress(address, reason)
            .map_err(SuppressionError::Spool)?;
        log::info!("suppression list: an address was added by request");
        log::debug!("suppression list: added {address}");
        Ok(entry)
    }

    /// Takes an address off the suppression list.
    pub fn unsuppress(&self, address: &str) -> Result<(), SuppressionError> {
        match self.inner.store.unsuppress(address) {
            Ok(true) => {
                log::info!("suppression list: an address was removed by request");
                log::debug!("suppression list: removed {address}");
                Ok(())
            }
            Ok(false) => Err(SuppressionError::NotFound(address.to_string())),
            Err(error) => Err(SuppressionError::Spool(error)),
        }
    }

    /// Whether new messages are taken.
    pub fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Readiness::ShuttingDown;
        }
        if let Some(problem) = inner.store.problem() {
            return Readiness::StoreFailing(problem);
        }
        match inner.store.counts() {
            Err(error) => Readiness::StoreFailing(error.to_string()),
            // The relay first: in an outage the queue fills with messages
            // waiting for it, and the cause is what an operator must see.
            Ok(counts) => match (inner.health.failing(), counts.full) {
                (Some(detail), true) => {
                    Readiness::RelayFailing(format!("{detail}; the queue is full meanwhile"))
                }
                (Some(detail), false) => Readiness::RelayFailing(detail),
                (None, true) => Readiness::Full,
                (None, false) => Readiness::Ready,
            },
        }
    }

    /// The figures of the moment, and the last hour's per minute.
    pub fn stats(&self) -> std::io::Result<Stats> {
        let inner = &self.inner;
        let counts = inner.store.counts()?;
        Ok(Stats {
            queue_depth: counts.queue_depth,
            retry_depth: counts.by_state.get(&State::Retrying).copied().unwrap_or(0),
            scheduled: counts.scheduled,
            held: counts.held,
            by_state: State::ALL
                .iter()
                .map(|state| (*state, counts.by_state.get(state).copied().unwrap_or(0)))
                .collect(),
            relay_failing: inner.health.failing(),
            relay_last_error: inner.health.last_error(),
            last_hour: inner.metrics.last_hour(),
            webhooks_pending: inner.webhooks.as_ref().map(Webhooks::pending),
        })
    }

    /// The Prometheus exposition text of the engine's metrics.
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let counts = inner.store.counts().unwrap_or_default();
        let mut text = inner.metrics.render(Gauges {
            queue_depth: counts.queue_depth as u64,
            retry_depth: counts.by_state.get(&State::Retrying).copied().unwrap_or(0) as u64,
            held: counts.held as u64,
        });
        let pending = inner.webhooks.as_ref().map_or(0, Webhooks::pending);
        text.push_str(&inner.metrics.render_webhooks(pending as u64));
        text.push_str(&inner.store.metrics_text());
        text
    }

    /// SMTP connections opened since start.
    pub fn connections_opened(&self) -> u64 {
        self.inner.metrics.connections_opened()
    }

    /// Unfinished messages held (queued, sending, waiting for retry).
    pub fn unfinished(&self) -> usize {
        self.inner.store.counts().map_or(0, |counts| counts.held)
    }

    /// Messages waiting for their `send_at`.
    pub fn scheduled(&self) -> usize {
        self.inner
            .store
            .counts()
            .map_or(0, |counts| counts.scheduled)
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
        inner.store.stop(!durable);
        threads.stop = None; // closes the stop channel: workers finish what they hold
        let workers = std::mem::take(&mut threads.workers);
        join_until(workers, deadline);
        inner.store.flush();
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
        let unfinished = inner
            .store
            .counts()
            .map_or(0, |counts| counts.held + counts.scheduled);
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

/// The same refusal again, for an item repeating a refused item's key.
fn copy_error(error: &SubmitError) -> SubmitError {
    match error {
        SubmitError::Invalid(error) => SubmitError::Invalid(error.clone()),
        SubmitError::InvalidIdempotencyKey => SubmitError::InvalidIdempotencyKey,
        SubmitError::IdempotencyConflict { key } => {
            SubmitError::IdempotencyConflict { key: key.clone() }
        }
        SubmitError::SendAtTooLate => SubmitError::SendAtTooLate,
        SubmitError::SendAtNotNow => SubmitError::SendAtNotNow,
        SubmitError::Template(error) => SubmitError::Template(error.clone()),
        SubmitError::TemplateMixed(detail) => SubmitError::TemplateMixed(detail),
        SubmitError::Full => SubmitError::Full,
        SubmitError::ScheduleFull => SubmitError::ScheduleFull,
        SubmitError::ShuttingDown => SubmitError::ShuttingDown,
        SubmitError::Spool(error) => {
            SubmitError::Spool(std::io::Error::new(error.kind(), error.to_string()))
        }
    }
}

fn action_error(id: &str, refusal: ActionRefusal) -> ActionError {
    match refusal {
        ActionRefusal::Unknown => ActionError::NotFound { id: id.to_string() },
        ActionRefusal::State(state) => ActionError::WrongState {
            id: id.to_string(),
            state,
        },
        ActionRefusal::Full => ActionError::Unavailable(SubmitError::Full),
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
