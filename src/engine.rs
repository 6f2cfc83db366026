//! The engine: the library API that the HTTP layer (or any embedding
//! program) uses. Start it from a [`Config`], submit or send messages, read
//! their status, shut it down.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Sender, TrySendError};

use crate::config::{Config, SpoolSetting};
use crate::message::{MailRequest, MessageError};
use crate::metrics::{Gauges, Metrics};
use crate::pool::{start_workers, Job, Outcome, RateLimiter};
use crate::retry::RetryScheduler;
use crate::spool::{from_millis, Spool, SpoolRecord};
use crate::status::{KeyClaim, MessageStatus, State, StatusStore};
use crate::transport::{refuse_at_submit, DeliveryError, RelayCapabilities, TransportFactory};

/// Consecutive relay failures (unreachable, TLS, AUTH) after which
/// `/readyz` reports the relay as failing.
const RELAY_FAILURES_NOT_READY: u32 = 3;

/// The engine could not start.
#[derive(Debug)]
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

impl std::error::Error for StartError {}

/// Why a message was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The request is malformed (HTTP 400).
    Invalid(MessageError),
    /// `Idempotency-Key` longer than 255 characters or with control characters.
    InvalidIdempotencyKey,
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

impl std::error::Error for SubmitError {}

/// Why `send_and_wait` has no success to report.
#[derive(Debug)]
pub enum SendError {
    /// Not accepted at all.
    Rejected(SubmitError),
    /// The relay refused it or could not be reached.
    Failed { id: String, error: DeliveryError },
    /// No outcome within the timeout; the message may still be delivered.
    Timeout { id: String },
}

/// An accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its id, for [`Engine::status`].
    pub id: String,
    /// True when an earlier request with the same idempotency key was
    /// accepted and this one queued nothing.
    pub repeated: bool,
}

/// Whether the engine takes new work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Accepting.
    Ready,
    /// Holding `MAILROOM_QUEUE_CAPACITY` unfinished messages.
    Full,
    /// Stopping.
    ShuttingDown,
    /// Recent attempts all failed to reach or log in to the relay.
    RelayFailing(String),
}

/// What a shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Unfinished messages kept in the spool for the next start.
    pub kept: usize,
    /// Unfinished messages lost (memory mode only).
    pub dropped: usize,
}

/// State shared by the engine handle, the workers and the scheduler.
pub(crate) struct Shared {
    pub config: Config,
    pub status: StatusStore,
    pub metrics: Metrics,
    pub spool: Spool,
    pub work: Sender<Job>,
    pub retry: RetryScheduler,
    pub rate_limiter: Option<RateLimiter>,
    /// What the relay offers, once known (submit-time refusals).
    pub capabilities: RelayCapabilities,
    /// Unfinished messages: queued, sending or waiting for retry.
    held: AtomicUsize,
    retry_depth: Arc<AtomicUsize>,
    accepting: AtomicBool,
    /// Workers stop taking messages (spool mode shutdown).
    pub stopping: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
    relay_failures: AtomicU32,
    last_relay_error: Mutex<Option<String>>,
}

impl Shared {
    /// One unfinished message is done (sent or failed).
    pub(crate) fn finish(&self) {
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn relay_ok(&self) {
        self.relay_failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn relay_failed(&self, detail: &str) {
        self.relay_failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_relay_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(detail.to_string());
    }

    /// In memory mode, how long workers keep draining after a stop.
    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        *self
            .drain_deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reserve(&self) -> bool {
        let capacity = self.config.queue_capacity;
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < capacity).then_some(held + 1)
            })
            .is_ok()
    }
}

struct Threads {
    stop: Option<Sender<()>>,
    workers: Vec<JoinHandle<()>>,
    retry: Option<JoinHandle<()>>,
    report: Option<ShutdownReport>,
}

/// A running engine. Cheap to clone; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    threads: Arc<Mutex<Threads>>,
}

/// A claimed idempotency key until its request is accepted: dropped
/// unsettled (a refusal, or a panic), it releases the key, so a repeat
/// waiting for the outcome never waits forever.
struct KeyClaimGuard<'a> {
    status: &'a StatusStore,
    key: Option<&'a str>,
}

impl KeyClaimGuard<'_> {
    /// The request was accepted as `id`.
    fn settle(mut self, id: &str) {
        if let Some(key) = self.key.take() {
            self.status.settle_idempotency_key(key, id);
        }
    }
}

impl Drop for KeyClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.status.release_idempotency_key(key);
        }
    }
}

impl Engine {
    /// Starts the workers and the retry scheduler, and re-queues what the
    /// spool holds from an earlier run.
    pub fn start(config: Config) -> Result<Engine, StartError> {
        let factory = TransportFactory::new(&config.relay).map_err(StartError::Transport)?;
        let (spool, recovered) =
            Spool::open(&config.spool, config.status_retention).map_err(StartError::Spool)?;
        if config.spool == SpoolSetting::Memory {
            log::warn!("MAILROOM_SPOOL_DIR=none: accepted messages live in memory only and are lost if the process stops");
        }
        // The channel never holds more than the capacity (each message is
        // reserved before it is sent), so sends into it never block.
        let channel_size = config.queue_capacity.clamp(config.workers, 1 << 20);
        let (work, work_receiver) = crossbeam_channel::bounded(channel_size);
        let (stop, stop_receiver) = crossbeam_channel::bounded(0);
        let retry_depth = Arc::new(AtomicUsize::new(0));
        let (retry, retry_thread) = RetryScheduler::start(work.clone(), Arc::clone(&retry_depth))
            .map_err(StartError::Thread)?;
        let shared = Arc::new(Shared {
            status: StatusStore::new(config.status_retention),
            metrics: Metrics::default(),
            spool,
            work,
            retry,
            rate_limiter: RateLimiter::new(config.rate_limit),
            capabilities: factory.capabilities(),
            held: AtomicUsize::new(0),
            retry_depth,
            accepting: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            drain_deadline: Mutex::new(None),
            relay_failures: AtomicU32::new(0),
            last_relay_error: Mutex::new(None),
            config,
        });

        // Delivered messages first (the oldest finished), unless the journal
        // still holds them (sent again after a crash between the two writes).
        let unfinished: std::collections::HashSet<String> = recovered
            .pending
            .iter()
            .chain(&recovered.dead)
            .map(|record| record.message.id.clone())
            .collect();
        for sent in recovered.sent {
            if unfinished.contains(&sent.id) {
                continue;
            }
            shared.status.put(MessageStatus {
                id: sent.id.clone(),
                state: State::Sent,
                attempts: sent.attempts,
                last_error: sent.last_error,
                created_at: from_millis(sent.created_at_ms),
                updated_at: from_millis(sent.updated_at_ms),
                next_attempt_at: None,
            });
            if let Some(key) = &sent.idempotency_key {
                shared.status.restore_idempotency_key(key, &sent.id);
            }
        }
        for record in recovered.dead {
            shared.status.put(status_of(&record, State::Failed));
            if let Some(key) = &record.idempotency_key {
                shared
                    .status
                    .restore_idempotency_key(key, &record.message.id);
            }
        }
        let pending = recovered.pending.len();
        for record in recovered.pending {
            let due = record.next_attempt_at_ms.map(from_millis);
            let state = if due.is_some() {
                State::Retrying
            } else {
                State::Queued
            };
            shared.status.put(status_of(&record, state));
            if let Some(key) = &record.idempotency_key {
                shared
                    .status
                    .restore_idempotency_key(key, &record.message.id);
            }
            shared.held.fetch_add(1, Ordering::SeqCst);
            let job = Job {
                message: Arc::new(record.message),
                attempts: record.attempts,
                created_at: from_millis(record.created_at_ms),
                idempotency_key: record.idempotency_key,
                waiter: None,
            };
            let wait = due
                .and_then(|due| due.duration_since(SystemTime::now()).ok())
                .unwrap_or_default();
            enqueue(&shared, job, Instant::now() + wait);
        }
        if pending > 0 || recovered.corrupt > 0 {
            log::info!(
                "spool: recovered {pending} unfinished messages ({} set aside as corrupt)",
                recovered.corrupt
            );
        }

        let transports = (0..shared.config.workers)
            .map(|_| factory.transport())
            .collect();
        let workers = start_workers(&shared, work_receiver, stop_receiver, transports)
            .map_err(StartError::Thread)?;
        Ok(Engine {
            shared,
            threads: Arc::new(Mutex::new(Threads {
                stop: Some(stop),
                workers,
                retry: Some(retry_thread),
                report: None,
            })),
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Validates, spools and queues a message; returns at once. With an
    /// idempotency key already seen, returns the first message's id.
    pub fn submit(
        &self,
        request: &MailRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Accepted, SubmitError> {
        let shared = &self.shared;
        if let Some(key) = idempotency_key {
            if key.is_empty() || key.chars().count() > 255 || key.chars().any(char::is_control) {
                return Err(SubmitError::InvalidIdempotencyKey);
            }
        }
        if !shared.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let message = request
            .build(shared.config.allowed_senders.as_deref())
            .map_err(SubmitError::Invalid)?;
        if let Some(error) = refuse_at_submit(&message, &shared.capabilities) {
            return Err(SubmitError::Invalid(error));
        }
        let id = message.id.clone();
        let mut claim = KeyClaimGuard {
            status: &shared.status,
            key: None,
        };
        if let Some(key) = idempotency_key {
            if let KeyClaim::Existing(first) = shared.status.claim_idempotency_key(key, &id) {
                return Ok(Accepted {
                    id: first,
                    repeated: true,
                });
            }
            claim.key = Some(key);
        }
        if !shared.reserve() {
            return Err(SubmitError::Full);
        }
        let job = Job {
            message: Arc::new(message),
            attempts: 0,
            created_at: SystemTime::now(),
            idempotency_key: idempotency_key.map(str::to_string),
            waiter: None,
        };
        if let Err(error) = shared.spool.store(&job.spool_record(None, None)) {
            shared.finish();
            log::error!("message {id}: refused, the spool cannot be written: {error}");
            return Err(SubmitError::Spool(error));
        }
        shared.status.put(new_status(&id, job.created_at));
        claim.settle(&id);
        shared.metrics.message_accepted();
        log::info!("message {id}: queued");
        enqueue(shared, job, Instant::now());
        Ok(Accepted {
            id,
            repeated: false,
        })
    }

    /// Sends a message through the pool and waits up to `timeout` for the
    /// relay's answer. One attempt, no retry; not spooled (the caller learns
    /// the outcome).
    pub fn send_and_wait(
        &self,
        request: &MailRequest,
        timeout: Duration,
    ) -> Result<Accepted, SendError> {
        let shared = &self.shared;
        if !shared.accepting.load(Ordering::SeqCst) {
            return Err(SendError::Rejected(SubmitError::ShuttingDown));
        }
        let message = request
            .build(shared.config.allowed_senders.as_deref())
            .map_err(|error| SendError::Rejected(SubmitError::Invalid(error)))?;
        if let Some(error) = refuse_at_submit(&message, &shared.capabilities) {
            return Err(SendError::Rejected(SubmitError::Invalid(error)));
        }
        let id = message.id.clone();
        if !shared.reserve() {
            return Err(SendError::Rejected(SubmitError::Full));
        }
        let (waiter, outcome) = crossbeam_channel::bounded::<Outcome>(1);
        let job = Job {
            message: Arc::new(message),
            attempts: 0,
            created_at: SystemTime::now(),
            idempotency_key: None,
            waiter: Some(waiter),
        };
        shared.status.put(new_status(&id, job.created_at));
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            shared.work.try_send(job)
        {
            shared.finish();
            shared.status.remove(&id);
            return Err(SendError::Rejected(SubmitError::Full));
        }
        shared.metrics.message_accepted();
        log::info!("message {id}: sending (waiting for the outcome)");
        match outcome.recv_timeout(timeout) {
            Ok(Ok(_)) => Ok(Accepted {
                id,
                repeated: false,
            }),
            Ok(Err(error)) => Err(SendError::Failed { id, error }),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(SendError::Timeout { id }),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(SendError::Rejected(SubmitError::ShuttingDown))
            }
        }
    }

    /// The status of a message, while it is kept.
    pub fn status(&self, id: &str) -> Option<MessageStatus> {
        self.shared.status.get(id)
    }

    /// Whether new messages are taken.
    pub fn readiness(&self) -> Readiness {
        let shared = &self.shared;
        if !shared.accepting.load(Ordering::SeqCst) {
            Readiness::ShuttingDown
        } else if shared.held.load(Ordering::SeqCst) >= shared.config.queue_capacity {
            Readiness::Full
        } else if shared.relay_failures.load(Ordering::Relaxed) >= RELAY_FAILURES_NOT_READY {
            let detail = shared
                .last_relay_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
                .unwrap_or_default();
            Readiness::RelayFailing(detail)
        } else {
            Readiness::Ready
        }
    }

    /// The Prometheus exposition text.
    pub fn metrics_text(&self) -> String {
        let shared = &self.shared;
        shared.metrics.render(Gauges {
            queue_depth: shared.work.len() as u64,
            retry_depth: shared.retry_depth.load(Ordering::Relaxed) as u64,
            held: shared.held.load(Ordering::SeqCst) as u64,
        })
    }

    /// Counts an HTTP answer for `/metrics`.
    pub fn record_http(&self, code: u16) {
        self.shared.metrics.http_request(code);
    }

    /// SMTP connections opened since start.
    pub fn connections_opened(&self) -> u64 {
        self.shared.metrics.connections_opened()
    }

    /// Unfinished messages held (queued, sending, waiting for retry).
    pub fn unfinished(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Stops taking new messages (they get `ShuttingDown`); idempotent.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Stops: refuses new messages, lets deliveries in flight finish within
    /// `MAILROOM_SHUTDOWN_TIMEOUT_MS`, and keeps the rest in the spool (in
    /// memory mode: sends what it can in that time and drops the rest).
    /// Safe to call more than once; later calls return the first report.
    pub fn shutdown(&self) -> ShutdownReport {
        let mut threads = self
            .threads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(report) = threads.report {
            return report;
        }
        let shared = &self.shared;
        self.stop_accepting();
        let deadline = Instant::now() + shared.config.shutdown_timeout;
        let durable = shared.spool.is_durable();
        if durable {
            shared.stopping.store(true, Ordering::SeqCst);
        } else {
            *shared
                .drain_deadline
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(deadline);
        }
        // Memory mode: retries waiting for their time get one last chance now.
        shared.retry.stop(!durable);
        if let Some(retry) = threads.retry.take() {
            let _ = retry.join();
        }
        threads.stop = None; // closes the stop channel: workers finish what they hold
        let workers = std::mem::take(&mut threads.workers);
        join_until(workers, deadline);
        let unfinished = shared.held.load(Ordering::SeqCst);
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

/// Hands a reserved job to the workers at `due`, via the scheduler when it
/// is not due yet or the channel is momentarily full.
fn enqueue(shared: &Shared, job: Job, due: Instant) {
    let job = if due <= Instant::now() {
        match shared.work.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        }
    } else {
        job
    };
    if let Err(stopped) = shared.retry.schedule(due, job) {
        log::warn!(
            "message {}: not queued, the service is stopping (it stays in the spool)",
            stopped.0.message.id
        );
    }
}

fn new_status(id: &str, created_at: SystemTime) -> MessageStatus {
    MessageStatus {
        id: id.to_string(),
        state: State::Queued,
        attempts: 0,
        last_error: None,
        created_at,
        updated_at: created_at,
        next_attempt_at: None,
    }
}

fn status_of(record: &SpoolRecord, state: State) -> MessageStatus {
    MessageStatus {
        id: record.message.id.clone(),
        state,
        attempts: record.attempts,
        last_error: record.last_error.clone(),
        created_at: from_millis(record.created_at_ms),
        updated_at: from_millis(record.updated_at_ms),
        next_attempt_at: record.next_attempt_at_ms.map(from_millis),
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("unfinished", &self.unfinished())
            .finish()
    }
}
