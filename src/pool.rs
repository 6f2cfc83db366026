//! The worker pool: N threads taking jobs from one bounded channel, each
//! delivering over its own reused transport, and carrying out what
//! [`decide`] says after each attempt (sent, retry later, failed).
//!
//! Workers get a narrow [`WorkerContext`]: the store for state changes,
//! the dispatch to reschedule, the retry policy, metrics and relay health.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver, TryRecvError};

use crate::health::RelayHealth;
use crate::job::{decide, describe, AttemptOutcome, Decision, Job, RetryPolicy, WaitedOutcome};
use crate::message::random_u64;
use crate::message::OutgoingMessage;
use crate::metrics::{AttemptResult, Metrics};
use crate::status::{Event, EventKind, State};
use crate::store::{MessageRecord, Settling, StatusRecord, Store};
use crate::time::to_millis;
use crate::transport::{
    abandoned_outcome, Deadline, Delivered, FailureKind, Hooks, Step, Transport,
};

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

/// Starts the workers and their supervisor; the handle returned is the
/// supervisor's, which ends once every worker has. Workers stop when
/// `stop` is closed (after finishing what they hold); in memory mode they
/// first drain what is queued, until the shutdown deadline.
///
/// Each worker runs its transport (lettre) on its own thread. The
/// supervisor watches the transports' deadlines: a worker still inside an
/// SMTP phase past its deadline (a relay trickling bytes, which lettre's
/// per-read timeout does not catch) is given up. A replacement starts at
/// once with a fresh transport and reports the attempts the stuck worker
/// held as timed out; the stuck thread's late result is discarded, and it
/// ends when a per-read timeout or the relay ends its read (at most
/// `MAX_ABANDONED` (64) such transports may linger; beyond that no new
/// connection is opened).
pub(crate) fn start_workers(
    context: &Arc<WorkerContext>,
    work: Receiver<Job>,
    stop: Receiver<()>,
    transports: Vec<Transport>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let pool = Arc::new(Pool {
        context: Arc::clone(context),
        work,
        stop,
        supervisor: OnceLock::new(),
    });
    let mut members = Vec::with_capacity(transports.len());
    for (index, transport) in transports.into_iter().enumerate() {
        let spare = transport.replacement();
        let (slot, handle) = spawn_worker(&pool, index, transport, Vec::new())?;
        members.push(Member {
            index,
            slot,
            handle,
            spare,
        });
    }
    let supervising = Arc::clone(&pool);
    let supervisor = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || supervise(&supervising, members))?;
    let _ = pool.supervisor.set(supervisor.thread().clone());
    supervisor.thread().unpark();
    Ok(vec![supervisor])
}

/// What the workers and the supervisor share.
struct Pool {
    context: Arc<WorkerContext>,
    work: Receiver<Job>,
    stop: Receiver<()>,
    /// Woken when a worker ends.
    supervisor: OnceLock<std::thread::Thread>,
}

/// A message a worker has begun an attempt on (the store shows it
/// `sending`): what is needed to carry out the decision after it.
struct Attempt {
    job: Job,
    status: StatusRecord,
    attempt: u32,
    id: String,
    started_at: SystemTime,
    started: Instant,
    /// Delivered in earlier transactions, and who is left (a recipient
    /// limit split the attempt); reported if it is given up.
    progress: Option<(Delivered, Vec<String>)>,
}

/// What a worker shares with the supervisor.
struct Slot {
    /// Its transport's deadline (none for the outbox).
    deadline: Option<Arc<Deadline>>,
    state: Mutex<SlotState>,
    /// The worker's last finish while its record is being written: kept
    /// here so that the supervisor can settle it when it gives the worker
    /// up (a stuck thread must not keep a sent message reading `sending`).
    recording: Mutex<Option<Settling>>,
}

#[derive(Default)]
struct SlotState {
    /// Attempts in flight: the one whose body goes next, and the one
    /// whose envelope went with it.
    attempts: Vec<Attempt>,
    /// Given up at a deadline: a replacement reports what it held.
    abandoned: bool,
    /// The worker's loop has ended.
    ended: bool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds an attempt in flight; gives it back when the worker was
    /// given up meanwhile.
    fn hold(&self, attempt: Attempt) -> Result<(), Box<Attempt>> {
        let mut state = self.lock();
        if state.abandoned {
            return Err(Box::new(attempt));
        }
        state.attempts.push(attempt);
        Ok(())
    }

    /// Takes back the attempt on message `id`; `None` when the supervisor
    /// took it (the worker was given up).
    fn take(&self, id: &str) -> Option<Attempt> {
        let mut state = self.lock();
        let position = state.attempts.iter().position(|held| held.id == id)?;
        Some(state.attempts.swap_remove(position))
    }

    fn note_progress(&self, id: &str, delivered: &Delivered, pending: &[String]) {
        if let Some(held) = self.lock().attempts.iter_mut().find(|held| held.id == id) {
            held.progress = Some((delivered.clone(), pending.to_vec()));
        }
    }

    fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    fn recording(&self) -> std::sync::MutexGuard<'_, Option<Settling>> {
        self.recording
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `settling` as the worker's last finish, then waits for the
    /// one before it: at most one finish per worker is left being recorded.
    fn record(&self, settling: Settling) {
        let previous = self.recording().replace(settling);
        if let Some(previous) = previous {
            previous.wait();
        }
    }

    /// Waits for the worker's last finish, if it is still being recorded.
    fn settle_recording(&self) {
        let last = self.recording().take();
        if let Some(last) = last {
            last.wait();
        }
    }
}

/// A worker as the supervisor sees it.
struct Member {
    index: usize,
    slot: Arc<Slot>,
    handle: JoinHandle<()>,
    /// The transport a replacement would get (not connected).
    spare: Transport,
}

/// Marks the worker ended and wakes the supervisor, however the loop ends
/// (a panic included).
struct Ended<'a> {
    pool: &'a Pool,
    slot: &'a Slot,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.slot.settle_recording();
        self.slot.lock().ended = true;
        if let Some(supervisor) = self.pool.supervisor.get() {
            supervisor.unpark();
        }
    }
}

/// An attempt a stuck worker held, with its outcome (computed at the
/// take-over, from the stuck transport's deadline).
type Inherited = (Attempt, AttemptOutcome);

fn spawn_worker(
    pool: &Arc<Pool>,
    index: usize,
    transport: Transport,
    inherited: Vec<Inherited>,
) -> std::io::Result<(Arc<Slot>, JoinHandle<()>)> {
    let slot = Arc::new(Slot {
        deadline: transport.deadline(),
        state: Mutex::new(SlotState::default()),
        recording: Mutex::new(None),
    });
    let worker_slot = Arc::clone(&slot);
    let worker_pool = Arc::clone(pool);
    let handle = std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || run_worker(&worker_pool, &worker_slot, transport, inherited))?;
    Ok((slot, handle))
}

/// The supervisor's loop: wakes at the earliest deadline of a phase in
/// progress (deadlines only move forward, and a phase that starts later
/// ends a whole timeout later), and when a worker ends.
fn supervise(pool: &Arc<Pool>, mut members: Vec<Member>) {
    loop {
        let mut index = 0;
        while index < members.len() {
            if members[index].slot.lock().ended {
                let member = members.swap_remove(index);
                let _ = member.handle.join();
            } else {
                index += 1;
            }
        }
        if members.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut wake = now + IDLE_CHECK;
        for member in &mut members {
            let Some(deadline) = member.slot.deadline.clone() else {
                continue;
            };
            match deadline.due() {
                Some(due) if due <= now => take_over(pool, member, &deadline),
                Some(due) => wake = wake.min(due),
                None => wake = wake.min(now + deadline.timeout()),
            }
        }
        std::thread::park_timeout(wake.saturating_duration_since(Instant::now()));
    }
}

/// Gives a worker up at its deadline and starts its replacement, which
/// reports the attempts it held.
fn take_over(pool: &Arc<Pool>, member: &mut Member, deadline: &Deadline) {
    let inherited = {
        let mut state = member.slot.lock();
        let expired = deadline.due().is_some_and(|due| due <= Instant::now());
        if state.ended || state.abandoned || !expired {
            return;
        }
        state.abandoned = true;
        // The outcomes now, from this deadline: it knows whether the stuck
        // thread was still connecting (the replacement's is a fresh one).
        std::mem::take(&mut state.attempts)
            .into_iter()
            .map(|mut attempt| {
                let result = abandoned_outcome(deadline, &attempt.id, attempt.progress.take());
                (attempt, result)
            })
            .collect::<Vec<Inherited>>()
    };
    // The stuck thread's last finish is shown now, not when it wakes.
    member.slot.settle_recording();
    let lingering = deadline.abandon();
    log::warn!(
        "SMTP session with {} given up at its deadline ({} ms, MAILROOM_SMTP_TIMEOUT_MS): worker replaced, {} attempts reported as timed out ({lingering} abandoned sessions still waiting on the relay)",
        deadline.endpoint(),
        deadline.timeout().as_millis(),
        inherited.len()
    );
    let spare = member.spare.replacement();
    let transport = std::mem::replace(&mut member.spare, spare);
    match spawn_worker(pool, member.index, transport, inherited) {
        Ok((slot, handle)) => {
            member.slot = slot;
            // The stuck thread is left to end on its own.
            drop(std::mem::replace(&mut member.handle, handle));
        }
        Err(error) => {
            log::error!("cannot start a worker to replace a stuck one: {error}");
        }
    }
}

fn run_worker(pool: &Pool, slot: &Slot, mut transport: Transport, inherited: Vec<Inherited>) {
    let _ended = Ended { pool, slot };
    let context = &*pool.context;
    lower_priority(context.niceness);
    for (attempt, result) in inherited {
        conclude(context, attempt, result).wait();
    }
    let (work, stop) = (&pool.work, &pool.stop);
    loop {
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            break;
        }
        let job = match work.try_recv() {
            Ok(job) => Ok(job),
            Err(_) => {
                // Nothing waiting: show the last finish before sleeping.
                slot.settle_recording();
                select! {
                    recv(work) -> job => job,
                    recv(stop) -> _ => break,
                    default(IDLE_CHECK) => {
                        transport.close_if_idle();
                        continue;
                    }
                }
            }
        };
        match job {
            Ok(job) if context.control.stopping.load(Ordering::SeqCst) => {
                // Stopping with a spool: the message is on disk and will
                // be sent after the restart (a v2 caller sees its channel
                // close and is told the service is stopping).
                drop(job);
                break;
            }
            Ok(job) => {
                if !deliver(pool, slot, &mut transport, job) {
                    return;
                }
            }
            Err(_) => break,
        }
    }
    if !context.store.is_durable() {
        // Memory mode: nothing survives the exit, so send what we can.
        while let Some(deadline) = context.control.drain_deadline() {
            if Instant::now() >= deadline {
                break;
            }
            match work.try_recv() {
                Ok(job) => {
                    if !deliver(pool, slot, &mut transport, job) {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
    }
    transport.close();
}

/// True unless the pool is stopping (spool mode) or past its drain deadline
/// (memory mode).
fn may_take_more(context: &WorkerContext) -> bool {
    !context.control.stopping.load(Ordering::SeqCst)
        && context
            .control
            .drain_deadline()
            .is_none_or(|deadline| Instant::now() < deadline)
}

/// A held attempt as the worker's transport needs it.
struct InFlight {
    message: Arc<OutgoingMessage>,
    recipients: Arc<[String]>,
}

impl InFlight {
    fn recipients(&self) -> &[String] {
        &self.recipients
    }
}

/// Hands an attempt to the slot (where the supervisor can report it);
/// `None` when the worker was given up meanwhile: the attempt is then
/// reported as timed out here, and the worker must end.
fn hold(context: &WorkerContext, slot: &Slot, attempt: Attempt) -> Option<InFlight> {
    let message = Arc::clone(&attempt.job.message);
    let recipients = Arc::clone(&attempt.job.recipients);
    match slot.hold(attempt) {
        Ok(()) => Some(InFlight {
            message,
            recipients,
        }),
        Err(attempt) => {
            let result = match &slot.deadline {
                Some(deadline) => Err(deadline.timeout_error_for(&attempt.id)),
                None => Err(crate::transport::DeliveryError::transient(
                    "the worker was stopped".into(),
                    false,
                )),
            };
            conclude(context, *attempt, result).wait();
            None
        }
    }
}

/// Carries out what follows the attempt on message `id`, unless the
/// supervisor took it over (false: the worker was given up and must end;
/// the late result is discarded). The worker's previous finish is waited
/// for once this one is under way: at most one finish per worker is still
/// being recorded when this returns.
fn settle(context: &WorkerContext, slot: &Slot, id: &str, result: AttemptOutcome) -> bool {
    match slot.take(id) {
        Some(attempt) => {
            slot.record(conclude(context, attempt, result));
            true
        }
        None => false,
    }
}

/// What to do with the next job while a body is about to go.
enum Next {
    /// Nothing to take along.
    None,
    /// Begun: its envelope goes with the body.
    Now(Box<Attempt>),
    /// Taken, but its delivery slot (MAILROOM_RATE_LIMIT) is this far off:
    /// it starts after the body, once the time has come.
    Paced(Job, Duration),
}

/// Takes the next waiting job when the transport would send its envelope
/// with the current body (PIPELINING and a backlog).
fn next_job(pool: &Pool, slot: &Slot, transport: &Transport) -> Next {
    let context = &*pool.context;
    if !transport.wants_next() || slot.is_abandoned() || !may_take_more(context) {
        return Next::None;
    }
    loop {
        let Ok(job) = pool.work.try_recv() else {
            return Next::None;
        };
        let wait = context.store.rate_slot();
        if !wait.is_zero() {
            return Next::Paced(job, wait);
        }
        if let Some(attempt) = begin_attempt(context, job) {
            return Next::Now(Box::new(attempt));
        }
    }
}

/// Delivers `job` and, while jobs are waiting and the relay takes the next
/// envelope in the same write as a body, those after it (about one round
/// trip per message on a busy connection). False when the worker was
/// given up at a deadline meanwhile: it must end.
fn deliver(pool: &Pool, slot: &Slot, transport: &mut Transport, job: Job) -> bool {
    let context = &*pool.context;
    let wait = context.store.rate_slot();
    if !wait.is_zero() {
        // Pacing (MAILROOM_RATE_LIMIT), not synchronisation.
        std::thread::sleep(wait);
    }
    let Some(attempt) = begin_attempt(context, job) else {
        return true;
    };
    let connected = || context.metrics.connection_opened();
    let progress = |id: &str, delivered: &Delivered, pending: &[String]| {
        slot.note_progress(id, delivered, pending);
    };
    let hooks = Hooks {
        connected: &connected,
        progress: &progress,
    };
    let Some(mut current) = hold(context, slot, attempt) else {
        return false;
    };
    let mut step = transport.begin(&current.message, current.recipients(), &hooks);
    loop {
        if let Step::Done(result) = step {
            return settle(context, slot, &current.message.id, result);
        }
        match next_job(pool, slot, transport) {
            Next::None => {
                let (result, _) = transport.finish(None, &hooks);
                return settle(context, slot, &current.message.id, result);
            }
            Next::Now(attempt) => {
                let Some(next) = hold(context, slot, *attempt) else {
                    return false;
                };
                let (result, next_step) =
                    transport.finish(Some((&next.message, next.recipients())), &hooks);
                if !settle(context, slot, &current.message.id, result) {
                    return false;
                }
                current = next;
                step = next_step.unwrap_or_else(|| {
                    Step::Done(Err(crate::transport::DeliveryError::transient(
                        "the next message was not begun".into(),
                        false,
                    )))
                });
            }
            Next::Paced(job, wait) => {
                let (result, _) = transport.finish(None, &hooks);
                if !settle(context, slot, &current.message.id, result) {
                    return false;
                }
                // Pacing (MAILROOM_RATE_LIMIT), not synchronisation.
                std::thread::sleep(wait);
                let Some(attempt) = begin_attempt(context, job) else {
                    return true;
                };
                let Some(next) = hold(context, slot, attempt) else {
                    return false;
                };
                current = next;
                step = transport.begin(&current.message, current.recipients(), &hooks);
            }
        }
    }
}

/// Marks a job's message `sending` for its next attempt (unless it was
/// cancelled meanwhile, or every recipient is suppressed).
fn begin_attempt(context: &WorkerContext, mut job: Job) -> Option<Attempt> {
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
            return None;
        }
    };
    if skip_suppressed(context, &mut job, &mut status) {
        return None;
    }
    // An attempt adds two events (the attempt, then its outcome): room for
    // exactly those, once (held messages are many; a doubling would keep
    // room for a fourth, 72 bytes each, and one growth per event costs a
    // reallocation each).
    status.events.reserve_exact(2);
    job.attempts = attempt;
    Some(Attempt {
        job,
        status,
        attempt,
        id,
        started_at: SystemTime::now(),
        started: Instant::now(),
        progress: None,
    })
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

/// `text` as a shared string: the attempt's reply itself when it says the
/// same (a relay that cannot be reached gives one text for the attempt, the
/// deferral and the status, kept once for as long as the message waits).
fn shared_text(text: String, reply: &Option<Arc<str>>) -> Arc<str> {
    match reply {
        Some(reply) if **reply == *text => Arc::clone(reply),
        _ => text.into(),
    }
}

/// What the relay said in an attempt, for its event: the reply to the end
/// of the data, else the first refusal, else the error.
fn attempt_reply(result: &AttemptOutcome) -> (Option<u16>, Option<Arc<str>>) {
    match result {
        Ok(delivered) => match (
            &delivered.reply,
            delivered.refused.first(),
            delivered.deferred.first(),
        ) {
            (Some(reply), _, _) => (Some(reply.code), Some(reply.text.as_str().into())),
            (None, Some(refusal), _) | (None, None, Some(refusal)) => (
                Some(refusal.reply.code),
                Some(refusal.reply.text.as_str().into()),
            ),
            (None, None, None) => (None, None),
        },
        Err(error) => (error.smtp_code, Some(error.detail.as_str().into())),
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

/// After an attempt: [`decide`] what follows, and carry it out through the
/// store (a finish may still be being recorded: see [`Settling`]).
fn conclude(context: &WorkerContext, attempt: Attempt, result: AttemptOutcome) -> Settling {
    let Attempt {
        mut job,
        mut status,
        attempt,
        id,
        started_at,
        started,
        ..
    } = attempt;
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
            smtp_reply: smtp_reply.clone(),
            duration_ms: elapsed.as_millis() as u64,
            recipients: job.recipients.clone(),
        },
    });
    let unreached = matches!(&result, Err(error) if error.before_transaction);
    if unreached {
        status.unreached_attempts += 1;
    }
    let decision = decide(
        &result,
        &job.recipients,
        status.tries(),
        &context.policy,
        !job.is_waited_for(),
        random_u64(),
    );
    // Spooled; but of the attempts that could not reach the relay, only the
    // 1st, 2nd, 4th, 8th, ...: any record of the message delivers it after
    // a restart (its attempts then read at worst half as many unreached),
    // and a long outage must not rewrite every held message, content and
    // all, every few minutes.
    let rewrite_skipped = unreached && !status.unreached_attempts.is_power_of_two();
    let durable = !job.is_waited_for() && !rewrite_skipped;
    match decision {
        Decision::Sent { refused } => {
            status.refused.extend(refused.iter().map(describe_one));
            status.set_state(State::Sent);
            status.pending = None;
            status.next_attempt_at_ms = None;
            status.last_error = (!status.refused.is_empty())
                .then(|| format!("some recipients refused: {}", status.refused.join("; ")).into());
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
            let settling = context.store.finish(status);
            context.metrics.message_sent();
            answer(
                &mut job,
                WaitedOutcome {
                    state: State::Sent,
                    error: None,
                    smtp_code,
                },
            );
            settling
        }
        Decision::Retry {
            recipients,
            refused,
            delay,
            error,
        } => {
            status.refused.extend(refused.iter().map(describe_one));
            let next_attempt_at = SystemTime::now() + delay;
            let error = shared_text(error, &smtp_reply);
            status.set_state(State::Retrying);
            status.last_error = Some(Arc::clone(&error));
            status.next_attempt_at_ms = Some(to_millis(next_attempt_at));
            status.set_pending(&recipients);
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
            if *job.recipients != *recipients {
                job.recipients = recipients.into();
            }
            context.store.retry_later(record, delay, job, durable);
            Settling::done()
        }
        Decision::Failed {
            undelivered,
            refused,
            error,
            permanent,
        } => {
            status.refused.extend(refused.iter().map(describe_one));
            let error = shared_text(error, &smtp_reply);
            status.set_state(State::Failed);
            status.last_error = Some(Arc::clone(&error));
            status.next_attempt_at_ms = None;
            status.set_pending(&undelivered);
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
            context.store.fail(record);
            context.metrics.message_failed();
            answer(
                &mut job,
                WaitedOutcome {
                    state: State::Failed,
                    error: Some(error.to_string()),
                    smtp_code,
                },
            );
            Settling::done()
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
    job.recipients = job
        .recipients
        .iter()
        .filter(|recipient| !suppressed.contains(recipient))
        .cloned()
        .collect();
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
    status.last_error = Some(
        format!(
            "every recipient is on the suppression list: {}",
            status.refused.join("; ")
        )
        .into(),
    );
    log::info!("message {id}: suppressed, every recipient is on the suppression list");
    let error = status.last_error.as_deref().map(str::to_string);
    context.store.finish(status.clone()).wait();
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
