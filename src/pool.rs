//! The worker pool: N threads taking messages from one bounded channel, each
//! delivering over its own reused transport, and deciding what happens
//! after each attempt (sent, retry later, failed).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver, Sender};

use crate::engine::Shared;
use crate::message::OutgoingMessage;
use crate::metrics::AttemptResult;
use crate::retry::backoff;
use crate::spool::{to_millis, SentRecord, SpoolRecord};
use crate::status::State;
use crate::transport::{Delivered, DeliveryError, FailureKind, Transport};

/// How often an idle worker wakes to close a connection idle too long.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How much lower than the rest of the process the workers run (Linux nice
/// steps). When the CPU is saturated, answering clients comes first and the
/// queue absorbs the burst; deliveries catch up as soon as CPU is free. A
/// relay that is not on this machine leaves the workers waiting on the
/// network, where priority does not matter. At +15 a worker still gets a
/// share of a saturated CPU (weight 36 against 1024 for a normal thread);
/// at +5 the accept bench's p99 with 32 clients was ~11.5 ms instead of
/// ~8.5 ms. The cost: a worker preempted while it holds the status lock
/// stalls the HTTP threads waiting for it longer (max latency up to
/// ~150 ms instead of ~80 ms in that bench). See docs/performance.md.
pub const WORKER_NICENESS: i32 = 15;

/// The outcome sent back to a `send_and_wait` caller.
pub(crate) type Outcome = Result<Delivered, DeliveryError>;

/// A message on its way through the pool.
pub(crate) struct Job {
    pub message: Arc<OutgoingMessage>,
    /// Attempts started so far.
    pub attempts: u32,
    pub created_at: SystemTime,
    pub idempotency_key: Option<String>,
    /// Set for `/api/mail/v2`: one attempt, outcome to the caller, not spooled.
    pub waiter: Option<Sender<Outcome>>,
}

impl Job {
    pub(crate) fn spool_record(
        &self,
        next_attempt_at: Option<SystemTime>,
        last_error: Option<String>,
    ) -> SpoolRecord {
        SpoolRecord {
            message: (*self.message).clone(),
            attempts: self.attempts,
            created_at_ms: to_millis(self.created_at),
            updated_at_ms: to_millis(SystemTime::now()),
            next_attempt_at_ms: next_attempt_at.map(to_millis),
            last_error,
            idempotency_key: self.idempotency_key.clone(),
        }
    }

    fn is_durable(&self) -> bool {
        self.waiter.is_none()
    }
}

/// Spaces deliveries evenly over the whole pool (`MAILROOM_RATE_LIMIT`),
/// with no initial burst.
pub(crate) struct RateLimiter {
    interval: Duration,
    next_slot: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub(crate) fn new(per_second: f64) -> Option<RateLimiter> {
        (per_second > 0.0).then(|| RateLimiter {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next_slot: Mutex::new(None),
        })
    }

    /// Waits for this worker's turn.
    fn wait_turn(&self) {
        let slot = {
            let mut next = self
                .next_slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            let slot = next.filter(|slot| *slot > now).unwrap_or(now);
            *next = Some(slot + self.interval);
            slot
        };
        // Pacing, not synchronisation: the slot is the time this send may start.
        std::thread::sleep(slot.saturating_duration_since(Instant::now()));
    }
}

/// Starts the workers. They stop when `stop` is closed (after finishing the
/// message in hand); in memory mode they first drain what is queued, until
/// the shutdown deadline.
pub(crate) fn start_workers(
    shared: &Arc<Shared>,
    work: Receiver<Job>,
    stop: Receiver<()>,
    transports: Vec<Transport>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    transports
        .into_iter()
        .enumerate()
        .map(|(index, transport)| {
            let shared = Arc::clone(shared);
            let work = work.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || run_worker(&shared, &work, &stop, transport))
        })
        .collect()
}

fn run_worker(
    shared: &Shared,
    work: &Receiver<Job>,
    stop: &Receiver<()>,
    mut transport: Transport,
) {
    lower_priority();
    loop {
        select! {
            recv(work) -> job => match job {
                Ok(job) if shared.stopping.load(Ordering::SeqCst) => {
                    // Stopping with a spool: the message is on disk and will
                    // be sent after the restart (a v2 caller sees its
                    // channel close and is told the service is stopping).
                    drop(job);
                    break;
                }
                Ok(job) => deliver(shared, &mut transport, job),
                Err(_) => break,
            },
            recv(stop) -> _ => break,
            default(IDLE_CHECK) => transport.close_if_idle(),
        }
    }
    if !shared.spool.is_durable() {
        // Memory mode: nothing survives the exit, so send what we can.
        while let Some(deadline) = shared.drain_deadline() {
            if Instant::now() >= deadline {
                break;
            }
            match work.try_recv() {
                Ok(job) => deliver(shared, &mut transport, job),
                Err(_) => break,
            }
        }
    }
    transport.close();
}

/// Lowers the calling thread's CPU priority by [`WORKER_NICENESS`].
fn lower_priority() {
    // Linux keeps a nice value per thread (nice() changes only the caller's),
    // and raising it needs no privilege. Elsewhere it would be per process.
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call about the calling thread; no memory
        // is handed over. A failure leaves the priority as it was, which is
        // harmless (and -1 is also a valid result), so it is not checked.
        let _ = unsafe { libc::nice(WORKER_NICENESS) };
    }
}

fn deliver(shared: &Shared, transport: &mut Transport, mut job: Job) {
    if let Some(limiter) = &shared.rate_limiter {
        limiter.wait_turn();
    }
    job.attempts += 1;
    let id = job.message.id.clone();
    let attempt = job.attempts;
    shared.status.update(&id, |status| {
        status.state = State::Sending;
        status.attempts = attempt;
        status.next_attempt_at = None;
    });
    let started = Instant::now();
    let result = transport
        .deliver(&job.message, &job.message.recipients, &|| {
            shared.metrics.connection_opened()
        })
        .and_then(|delivered| match delivered.failure() {
            Some(error) => Err(error),
            None => Ok(delivered),
        });
    let elapsed = started.elapsed();
    match result {
        Ok(delivered) => {
            shared.relay_ok();
            shared.metrics.attempt(AttemptResult::Ok, elapsed);
            shared.metrics.message_sent();
            let join = |list: &[crate::transport::RecipientRefusal]| {
                list.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let mut warnings = Vec::new();
            if !delivered.refused.is_empty() {
                warnings.push(format!(
                    "some recipients refused: {}",
                    join(&delivered.refused)
                ));
            }
            if !delivered.deferred.is_empty() {
                warnings.push(format!(
                    "some recipients deferred: {}",
                    join(&delivered.deferred)
                ));
            }
            let last_error = (!warnings.is_empty()).then(|| warnings.join("; "));
            match &last_error {
                Some(refused) => log::warn!("message {id}: sent, attempt {attempt}; {refused}"),
                None => log::info!("message {id}: sent, attempt {attempt}"),
            }
            log::debug!("message {id}: recipients {:?}", job.message.recipients);
            // The spool changes first: a status the API shows is on disk.
            if job.is_durable() {
                if let Err(error) = shared.spool.remove(&id) {
                    log::error!("message {id}: sent but not removed from the spool ({error}); it may be sent again after a restart");
                }
                shared.spool.remember_sent(&SentRecord {
                    id: id.clone(),
                    attempts: attempt,
                    created_at_ms: to_millis(job.created_at),
                    updated_at_ms: to_millis(SystemTime::now()),
                    last_error: last_error.clone(),
                    idempotency_key: job.idempotency_key.clone(),
                });
            }
            shared.status.update(&id, |status| {
                status.state = State::Sent;
                status.last_error = last_error;
            });
            shared.finish();
            if let Some(waiter) = job.waiter.take() {
                let _ = waiter.send(Ok(delivered));
            }
        }
        Err(error) => {
            if error.relay_unusable {
                shared.relay_failed(&error.detail);
            }
            let retry = error.kind == FailureKind::Transient
                && job.is_durable()
                && attempt < shared.config.max_attempts;
            if retry {
                schedule_retry(shared, job, error, elapsed);
            } else {
                fail(shared, job, error, elapsed);
            }
        }
    }
}

fn schedule_retry(shared: &Shared, job: Job, error: DeliveryError, elapsed: Duration) {
    let id = job.message.id.clone();
    shared.metrics.attempt(AttemptResult::Transient, elapsed);
    let delay = backoff(
        shared.config.retry_base,
        shared.config.retry_max,
        job.attempts,
    );
    let next_attempt_at = SystemTime::now() + delay;
    let level = if error.relay_unusable {
        log::Level::Error
    } else {
        log::Level::Warn
    };
    log::log!(
        level,
        "message {id}: attempt {} failed, retrying in {} ms: {}",
        job.attempts,
        delay.as_millis(),
        error.detail
    );
    if let Err(write_error) = shared
        .spool
        .store(&job.spool_record(Some(next_attempt_at), Some(error.detail.clone())))
    {
        log::error!("message {id}: cannot record the retry in the spool: {write_error}");
    }
    shared.status.update(&id, |status| {
        status.state = State::Retrying;
        status.last_error = Some(error.detail.clone());
        status.next_attempt_at = Some(next_attempt_at);
    });
    if let Err(stopped) = shared.retry.schedule(Instant::now() + delay, job) {
        // Only during shutdown: the message stays in the spool (or, in memory mode, is dropped).
        log::warn!(
            "message {}: not rescheduled, the service is stopping",
            stopped.0.message.id
        );
    }
}

fn fail(shared: &Shared, mut job: Job, error: DeliveryError, elapsed: Duration) {
    let id = job.message.id.clone();
    let result = match error.kind {
        FailureKind::Permanent => AttemptResult::Permanent,
        FailureKind::Transient => AttemptResult::Transient,
    };
    shared.metrics.attempt(result, elapsed);
    shared.metrics.message_failed();
    log::error!(
        "message {id}: failed after attempt {}: {}",
        job.attempts,
        error.detail
    );
    if job.is_durable() {
        if let Err(write_error) = shared
            .spool
            .dead_letter(&job.spool_record(None, Some(error.detail.clone())))
        {
            log::error!("message {id}: cannot move it to the dead letters: {write_error}");
        }
    }
    shared.status.update(&id, |status| {
        status.state = State::Failed;
        status.last_error = Some(error.detail.clone());
    });
    shared.finish();
    if let Some(waiter) = job.waiter.take() {
        let _ = waiter.send(Err(error));
    }
}
