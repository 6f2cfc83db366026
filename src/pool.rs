//! The worker pool: N threads taking jobs from one bounded channel, each
//! delivering over its own reused transport, and carrying out what
//! [`decide`] says after each attempt (sent, retry later, failed).
//!
//! Workers get a narrow [`WorkerContext`]: the store for state changes,
//! the dispatch to reschedule, the retry policy, metrics and relay health.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver};

use crate::health::RelayHealth;
use crate::job::{decide, describe, AttemptOutcome, Decision, Job, RetryPolicy, WaitedOutcome};
use crate::message::random_u64;
use crate::metrics::{AttemptResult, Metrics};
use crate::status::{Event, EventKind, State};
use crate::store::{MessageRecord, StatusRecord, Store};
use crate::time::to_millis;
use crate::transport::{Delivered, FailureKind, Transport};

/// How often an idle worker wakes to close a connection idle too long.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How the engine stops the workers.
#[derive(Default)]
pub(crate) struct PoolControl {
    /// Workers stop taking messages (spool mode shutdown).
    stopping: AtomicBool,
    /// In memory mode, how long workers keep draining after a stop.
    drain_deadline: Mutex<Option<Instant>>,
}

impl PoolControl {
    /// Workers finish the job in hand and take no more.
    pub(crate) fn stop_taking(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Workers keep delivering what is queued until `deadline`.
    pub(crate) fn drain_until(&self, deadline: Instant) {
        *self
            .drain_deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(deadline);
    }

    fn drain_deadline(&self) -> Option<Instant> {
        *self
            .drain_deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a worker needs, and nothing more.
pub(crate) struct WorkerContext {
    pub store: Arc<dyn Store>,
    pub policy: RetryPolicy,
    pub metrics: Arc<Metrics>,
    pub health: Arc<RelayHealth>,
    pub control: Arc<PoolControl>,
    /// How much lower than the rest of the process the workers run (see
    /// `Config::worker_niceness`).
    pub niceness: i32,
    /// Recipients refused with 5.1.x join the suppression list.
    pub suppress_on_bounce: bool,
}

/// Starts the workers. They stop when `stop` is closed (after finishing the
/// message in hand); in memory mode they first drain what is queued, until
/// the shutdown deadline.
pub(crate) fn start_workers(
    context: &Arc<WorkerContext>,
    work: Receiver<Job>,
    stop: Receiver<()>,
    transports: Vec<Transport>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    transports
        .into_iter()
        .enumerate()
        .map(|(index, transport)| {
            let context = Arc::clone(context);
            let work = work.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || run_worker(&context, &work, &stop, transport))
        })
        .collect()
}

fn run_worker(
    context: &WorkerContext,
    work: &Receiver<Job>,
    stop: &Receiver<()>,
    mut transport: Transport,
) {
    lower_priority(context.niceness);
    loop {
        select! {
            recv(work) -> job => match job {
                Ok(job) if context.control.stopping.load(Ordering::SeqCst) => {
                    // Stopping with a spool: the message is on disk and will
                    // be sent after the restart (a v2 caller sees its
                    // channel close and is told the service is stopping).
                    drop(job);
                    break;
                }
                Ok(job) => deliver(context, &mut transport, job),
                Err(_) => break,
            },
            recv(stop) -> _ => break,
            default(IDLE_CHECK) => transport.close_if_idle(),
        }
    }
    if !context.store.is_durable() {
        // Memory mode: nothing survives the exit, so send what we can.
        while let Some(deadline) = context.control.drain_deadline() {
            if Instant::now() >= deadline {
                break;
            }
            match work.try_recv() {
                Ok(job) => deliver(context, &mut transport, job),
                Err(_) => break,
            }
        }
    }
    transport.close();
}

/// Lowers the calling thread's CPU priority by `niceness` steps.
fn lower_priority(niceness: i32) {
    if niceness == 0 {
        return;
    }
    // Linux keeps a nice value per thread (nice() changes only the caller's),
    // and raising it needs no privilege. Elsewhere it would be per process.
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call about the calling thread; no memory
        // is handed over. A failure leaves the priority as it was, which is
        // harmless (and -1 is also a valid result), so it is not checked.
        let _ = unsafe { libc::nice(niceness) };
    }
}

/// What the relay said in an attempt, for its event: the reply to the end
/// of the data, else the first refusal, else the error.
fn attempt_reply(result: &AttemptOutcome) -> (Option<u16>, Option<String>) {
    match result {
        Ok(delivered) => match (
            &delivered.reply,
            delivered.refused.first(),
            delivered.deferred.first(),
        ) {
            (Some(reply), _, _) => (Some(reply.code), Some(reply.text.clone())),
            (None, Some(refusal), _) | (None, None, Some(refusal)) => {
                (Some(refusal.reply.code), Some(refusal.reply.text.clone()))
            }
            (None, None, None) => (None, None),
        },
        Err(error) => (error.smtp_code, Some(error.detail.clone())),
    }
}

fn counted_result(result: &AttemptOutcome) -> AttemptResult {
    match result {
        Ok(delivered) if !delivered.accepted.is_empty() => AttemptResult::Ok,
        Ok(delivered) if delivered.deferred.is_empty() => AttemptResult::Permanent,
        Ok(_) => AttemptResult::Transient,
        Err(error) if error.kind == FailureKind::Permanent => AttemptResult::Permanent,
        Err(_) => AttemptResult::Transient,
    }
}

fn deliver(context: &WorkerContext, transport: &mut Transport, mut job: Job) {
    let wait = context.store.rate_slot();
    if !wait.is_zero() {
        // Pacing (MAILROOM_RATE_LIMIT), not synchronisation.
        std::thread::sleep(wait);
    }
    let attempt = job.attempts + 1;
    let id = job.id().to_string();
    let mut status = match context.store.begin_attempt(&id, attempt) {
        Ok(status) => status,
        Err(state) => {
            // Cancelled (or forgotten) while it waited: whoever finished it
            // released its place.
            log::debug!(
                "message {id}: not sent, it is {}",
                state.map_or("unknown", State::as_str)
            );
            return;
        }
    };
    if skip_suppressed(context, &mut job, &mut status) {
        return;
    }
    job.attempts = attempt;
    let started_at = SystemTime::now();
    let started = Instant::now();
    let result: AttemptOutcome = transport.deliver(&job.message, &job.recipients, &|| {
        context.metrics.connection_opened()
    });
    let elapsed = started.elapsed();
    match &result {
        Err(error) if error.relay_unusable => context.health.failed(&error.detail),
        _ => context.health.ok(),
    }
    context.metrics.attempt(counted_result(&result), elapsed);
    if context.suppress_on_bounce {
        suppress_bounced(context, &id, &result);
    }
    let (smtp_code, smtp_reply) = attempt_reply(&result);
    status.push_event(Event {
        at_ms: to_millis(started_at),
        kind: EventKind::Attempt {
            attempt,
            smtp_code,
            smtp_reply,
            duration_ms: elapsed.as_millis() as u64,
            recipients: job.recipients.clone(),
        },
    });
    let decision = decide(
        &result,
        &job.recipients,
        attempt,
        &context.policy,
        !job.is_waited_for(),
        random_u64(),
    );
    let durable = !job.is_waited_for();
    match decision {
        Decision::Sent { refused } => {
            status.refused.extend(refused.iter().map(describe_one));
            status.set_state(State::Sent);
            status.pending = None;
            status.next_attempt_at_ms = None;
            status.last_error = (!status.refused.is_empty())
                .then(|| format!("some recipients refused: {}", status.refused.join("; ")));
            status.push_event(Event::now(EventKind::Sent {
                refused: status.refused.clone(),
            }));
            match &status.last_error {
                Some(refused) => log::warn!("message {id}: sent, attempt {attempt}; {refused}"),
                None => log::info!(
                    "message {id}: sent, attempt {attempt}{}",
                    reply_suffix(&result)
                ),
            }
            log::debug!("message {id}: recipients {:?}", job.recipients);
            context.store.finish(status, durable);
            context.metrics.message_sent();
            answer(
                &mut job,
                WaitedOutcome {
                    state: State::Sent,
                    error: None,
                    smtp_code,
                },
            );
        }
        Decision::Retry {
            recipients,
            refused,
            delay,
            error,
        } => {
            status.refused.extend(refused.iter().map(describe_one));
            let next_attempt_at = SystemTime::now() + delay;
            status.set_state(State::Retrying);
            status.last_error = Some(error.clone());
            status.next_attempt_at_ms = Some(to_millis(next_attempt_at));
            status.pending = Some(recipients.clone());
            status.push_event(Event::now(EventKind::Deferred {
                next_attempt_at_ms: to_millis(next_attempt_at),
                error: error.clone(),
            }));
            let relay_problem = matches!(&result, Err(error) if error.relay_unusable);
            log::log!(
                if relay_problem {
                    log::Level::Error
                } else {
                    log::Level::Warn
                },
                "message {id}: attempt {attempt} failed, retrying in {} ms: {error}",
                delay.as_millis()
            );
            let record = MessageRecord {
                message: Arc::clone(&job.message),
                status,
            };
            job.recipients = recipients;
            context.store.retry_later(record, delay, job, durable);
        }
        Decision::Failed {
            undelivered,
            refused,
            error,
            permanent,
        } => {
            status.refused.extend(refused.iter().map(describe_one));
            status.set_state(State::Failed);
            status.last_error = Some(error.clone());
            status.next_attempt_at_ms = None;
            status.pending = Some(undelivered);
            status.push_event(Event::now(EventKind::Failed {
                error: error.clone(),
            }));
            log::error!(
                "message {id}: failed after attempt {attempt}{}: {error}",
                if permanent { "" } else { " (attempts used up)" }
            );
            let record = MessageRecord {
                message: Arc::clone(&job.message),
                status,
            };
            context.store.fail(record, durable);
            context.metrics.message_failed();
            answer(
                &mut job,
                WaitedOutcome {
                    state: State::Failed,
                    error: Some(error),
                    smtp_code,
                },
            );
        }
    }
}

/// Leaves out the recipients on the suppression list; when that is every
/// one of them, the message ends `suppressed` without contacting the relay
/// (true: nothing more to do).
fn skip_suppressed(context: &WorkerContext, job: &mut Job, status: &mut StatusRecord) -> bool {
    let suppressed = match context.store.suppressed(job.id(), &job.recipients) {
        Ok(suppressed) => suppressed,
        Err(error) => {
            log::warn!(
                "message {}: the suppression list cannot be read ({error}); sending to every recipient",
                job.id()
            );
            Vec::new()
        }
    };
    if suppressed.is_empty() {
        return false;
    }
    let id = job.id().to_string();
    status.push_event(Event::now(EventKind::Suppressed {
        recipients: suppressed.clone(),
    }));
    status.refused.extend(
        suppressed
            .iter()
            .map(|address| format!("{address}: on the suppression list")),
    );
    job.recipients
        .retain(|recipient| !suppressed.contains(recipient));
    log::debug!("message {id}: suppressed recipients {suppressed:?}");
    if !job.recipients.is_empty() {
        log::info!(
            "message {id}: {} recipients skipped (on the suppression list)",
            suppressed.len()
        );
        return false;
    }
    // Not an attempt: the relay was not contacted.
    status.attempts = job.attempts;
    status.set_state(State::Suppressed);
    status.pending = None;
    status.last_error = Some(format!(
        "every recipient is on the suppression list: {}",
        status.refused.join("; ")
    ));
    log::info!("message {id}: suppressed, every recipient is on the suppression list");
    let durable = !job.is_waited_for();
    let error = status.last_error.clone();
    context.store.finish(status.clone(), durable);
    answer(
        job,
        WaitedOutcome {
            state: State::Suppressed,
            error,
            smtp_code: None,
        },
    );
    true
}

/// Puts recipients the relay refused as unknown (5.1.x) on the suppression list.
fn suppress_bounced(context: &WorkerContext, id: &str, result: &AttemptOutcome) {
    let Ok(delivered) = result else {
        return;
    };
    for refusal in &delivered.refused {
        let unknown = refusal.reply.code >= 500
            && refusal
                .reply
                .enhanced()
                .is_some_and(|(class, subject, _)| class == 5 && subject == 1);
        if !unknown {
            continue;
        }
        let reason = refusal.reply.to_string();
        match context.store.suppress_bounced(&refusal.recipient, &reason) {
            Ok(true) => {
                log::info!(
                    "message {id}: a refused recipient joins the suppression list ({reason})"
                );
                log::debug!(
                    "message {id}: suppressed from now on: {}",
                    refusal.recipient
                );
            }
            Ok(false) => {}
            Err(error) => log::error!("message {id}: cannot add to the suppression list: {error}"),
        }
    }
}

fn describe_one(refusal: &crate::transport::RecipientRefusal) -> String {
    describe(std::slice::from_ref(refusal))
}

fn reply_suffix(result: &AttemptOutcome) -> String {
    match result {
        Ok(Delivered {
            reply: Some(reply), ..
        }) => format!(": {reply}"),
        _ => String::new(),
    }
}

fn answer(job: &mut Job, outcome: WaitedOutcome) {
    if let Some(waiter) = job.waiter.take() {
        let _ = waiter.send(outcome);
    }
}
