//! The local store (the default): statuses, events, the list's indexes and
//! idempotency keys in memory ([`super::index`]), made durable by the
//! spool's journal ([`super::journal`]) unless the spool is `none`; the
//! queue is the in-process work channel and schedule ([`crate::dispatch`]).
//!
//! Each change is written to disk first and shown by the API after, so a
//! status the API shows survives a crash. Changes that race (a cancel and
//! a worker taking the message, two retries by hand) are decided by the
//! index's state check, under one lock.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;

use super::index::{Index, KeyClaim};
use super::journal::{self, Journal};
use super::suppression::Suppressions;
use super::{
    ActionRefusal, Admission, Counts, ListQuery, MessageRecord, Observer, Observers, Page,
    Settling, StatusRecord, Store, Suppression,
};
use crate::config::{Config, SpoolSetting};
use crate::dispatch::{Capacity, Dispatch, RateLimiter};
use crate::job::Job;
use crate::message::OutgoingMessage;
use crate::schedule::{Activate, Waiting};
use crate::status::{Event, EventKind, State};
use crate::time::{from_millis, to_millis};

/// What the store found at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Unfinished messages queued again (scheduled ones included).
    pub unfinished: usize,
    /// Of those, waiting for their `send_at`.
    pub scheduled: usize,
    /// Pieces of data set aside as unreadable.
    pub corrupt: usize,
}

/// The state shared with the schedule's thread.
struct Core {
    journal: Option<Journal>,
    index: Index,
    suppressions: Suppressions,
    observers: Observers,
    /// The last write to the spool failed, and why; cleared by the next
    /// one that works.
    write_error: Mutex<Option<String>>,
    write_failed: AtomicBool,
}

/// The local store.
pub(crate) struct LocalStore {
    core: Arc<Core>,
    dispatch: Dispatch,
    capacity: Arc<Capacity>,
    work: Receiver<Job>,
    schedule: Mutex<Option<JoinHandle<()>>>,
    rate: Option<RateLimiter>,
    /// Where the pending webhooks go (the spool's `webhooks/`, or memory).
    spool: SpoolSetting,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn copy(error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), error.to_string())
}

fn refusal(state: Option<State>) -> ActionRefusal {
    match state {
        Some(state) => ActionRefusal::State(state),
        None => ActionRefusal::Unknown,
    }
}

impl LocalStore {
    /// Opens the spool (or memory), loads what it holds and queues again
    /// what is unfinished.
    pub(crate) fn open(config: &Config) -> io::Result<(LocalStore, Recovery)> {
        let retention = config.status_retention;
        let index = Index::new(retention);
        let (journal, recovered, suppressions) = match &config.spool {
            SpoolSetting::Memory => (
                None,
                journal::Recovered::default(),
                Suppressions::in_memory(),
            ),
            SpoolSetting::Directory(directory) => {
                let (journal, recovered) =
                    Journal::open(directory, journal::SEGMENT_BYTES, retention)?;
                (Some(journal), recovered, Suppressions::open(directory)?)
            }
        };
        let journal::Recovered {
            pending,
            dead,
            finished,
            corrupt,
        } = recovered;
        // Oldest news first: later records of the same message replace them.
        for mut status in finished {
            status.set_state(status.state_or(State::Sent));
            restore(&index, status);
        }
        for record in dead {
            let mut status = record.status;
            status.set_state(State::Failed);
            restore(&index, status);
        }
        for record in &pending {
            restore(&index, record.status.clone());
        }
        let core = Arc::new(Core {
            journal,
            index,
            suppressions,
            observers: Observers::default(),
            write_error: Mutex::new(None),
            write_failed: AtomicBool::new(false),
        });
        let capacity = Arc::new(Capacity::new(
            config.queue_capacity,
            config.scheduled_capacity,
        ));
        let activate = activation(Arc::clone(&core), Arc::clone(&capacity));
        let (dispatch, work, schedule) =
            Dispatch::start(Arc::clone(&capacity), config.workers, activate)?;
        let store = LocalStore {
            core,
            dispatch,
            capacity,
            work,
            schedule: Mutex::new(Some(schedule)),
            rate: RateLimiter::new(config.rate_limit),
            spool: config.spool.clone(),
        };
        let recovery = store.queue_recovered(pending, corrupt);
        Ok((store, recovery))
    }

    fn queue_recovered(&self, pending: Vec<MessageRecord>, corrupt: usize) -> Recovery {
        let unfinished = pending.len();
        let scheduled = pending
            .iter()
            .filter(|record| record.status.state() == State::Scheduled)
            .count();
        self.capacity
            .reserve_recovered(unfinished - scheduled, scheduled);
        for record in pending {
            let due = record
                .status
                .next_attempt_at_ms
                .map(from_millis)
                .and_then(|due| due.duration_since(SystemTime::now()).ok())
                .map(|wait| Instant::now() + wait);
            if record.status.state() == State::Scheduled {
                // Its content stays on disk until it is due.
                let id = record.status.id.clone();
                self.dispatch
                    .at(due.unwrap_or_else(Instant::now), Waiting::OnDisk(id));
                continue;
            }
            let job = Job::new(
                record.message,
                record.status.pending_shared(),
                record.status.attempts,
            );
            match due {
                Some(due) => self.dispatch.at(due, Waiting::Retry(job)),
                None => self.dispatch.now(job),
            }
        }
        Recovery {
            unfinished,
            scheduled,
            corrupt,
        }
    }

    /// Hands an accepted message to the workers, now or at its `send_at`.
    fn hand_over(&self, record: MessageRecord) {
        let id = record.status.id.clone();
        if record.status.state() == State::Scheduled {
            let send_at = record.status.next_attempt_at_ms.map(from_millis);
            let wait = send_at
                .and_then(|at| at.duration_since(SystemTime::now()).ok())
                .unwrap_or_default();
            log::info!(
                "message {id}: scheduled for {}",
                send_at.map(crate::time::rfc3339).unwrap_or_default()
            );
            let waiting = if self.core.journal.is_some() {
                // Only its id waits in memory; the content is on disk.
                Waiting::OnDisk(id)
            } else {
                let recipients = record.status.recipients.clone();
                Waiting::InMemory(Job::new(record.message, recipients, 0))
            };
            self.dispatch.at(Instant::now() + wait, waiting);
            return;
        }
        log::info!("message {id}: queued");
        let recipients = record.status.recipients.clone();
        self.dispatch.now(Job::new(record.message, recipients, 0));
    }

    fn release(&self, state: State) {
        if state == State::Scheduled {
            self.capacity.release_scheduled();
        } else {
            self.capacity.release();
        }
    }
}

impl Core {
    /// Notes how a write to the spool went, for readiness.
    fn written<T>(&self, result: io::Result<T>) -> io::Result<T> {
        match &result {
            Ok(_) => {
                if self.write_failed.swap(false, Ordering::SeqCst) {
                    log::info!("spool: writes work again");
                    *lock(&self.write_error) = None;
                }
            }
            Err(error) => {
                self.write_failed.store(true, Ordering::SeqCst);
                *lock(&self.write_error) = Some(error.to_string());
            }
        }
        result
    }

    /// Shows a recorded change: the index first, then the observers.
    fn show(&self, status: StatusRecord, dead_letter: Option<Arc<OutgoingMessage>>) {
        if self.observers.is_empty() {
            self.index.put(status, dead_letter);
            return;
        }
        let noted = status.clone();
        let before = self.index.put(status, dead_letter).unwrap_or(0);
        self.observers.tell(&noted, before);
    }

    /// Tells the observers of the last `count` events of `status`.
    fn notify(&self, status: &StatusRecord, count: u64) {
        self.observers
            .tell(status, status.events_total.saturating_sub(count));
    }

    /// A scheduled send is due: it becomes `queued`; `None` when it is no
    /// longer scheduled (cancelled meanwhile).
    fn activate(&self, id: &str) -> Option<StatusRecord> {
        self.index
            .update(
                id,
                |state| state == State::Scheduled,
                |status| {
                    status.set_state(State::Queued);
                    status.next_attempt_at_ms = None;
                    status.clone()
                },
            )
            .ok()
    }

    /// Marks a message as failed without an attempt (a scheduled send
    /// whose content cannot be read back), keeping what is known.
    fn fail_unreadable(&self, id: &str, error: &str) {
        let failed = self.index.update(
            id,
            |state| !state.is_finished(),
            |status| {
                status.set_state(State::Failed);
                let error: Arc<str> = error.into();
                status.last_error = Some(Arc::clone(&error));
                status.push_event(Event::now(EventKind::Failed { error }));
                status.clone()
            },
        );
        if let (Ok(status), Some(journal)) = (failed, &self.journal) {
            if let Err(write_error) = self.written(journal.finish(&status)) {
                log::error!("message {id}: cannot record its failure: {write_error}");
            }
            self.notify(&status, 1);
        }
    }
}

/// What the schedule does with a scheduled send when it is due: it
/// becomes queued (unless cancelled meanwhile), its content read back from
/// the spool when it waited there.
fn activation(core: Arc<Core>, capacity: Arc<Capacity>) -> Activate {
    Box::new(move |waiting| {
        let (id, in_memory) = match waiting {
            Waiting::OnDisk(id) => (id, None),
            Waiting::InMemory(job) | Waiting::Retry(job) => (job.id().to_string(), Some(job)),
        };
        let status = core.activate(&id)?;
        capacity.promote();
        log::info!("message {id}: due, queued");
        if let Some(job) = in_memory {
            return Some(job);
        }
        let loaded = match &core.journal {
            Some(journal) => journal.load(&id),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "memory mode keeps nothing on disk",
            )),
        };
        match loaded {
            Ok(record) => Some(Job::new(
                record.message,
                status.pending_shared(),
                status.attempts,
            )),
            Err(error) => {
                log::error!("message {id}: cannot read its content back from the spool: {error}");
                core.fail_unreadable(
                    &id,
                    &format!("its content could not be read back from the spool: {error}"),
                );
                capacity.release();
                None
            }
        }
    })
}

fn restore(index: &Index, status: StatusRecord) {
    if let Some(key) = &status.idempotency_key {
        index.restore_key(key, status.fingerprint.as_deref(), &status.id);
    }
    index.put(status, None);
}

/// Claims a record's idempotency key; `Err` with the admission when it
/// belongs to another message; `Ok(true)` when a key was claimed.
fn claim(index: &Index, status: &StatusRecord) -> Result<bool, Admission> {
    let Some(key) = &status.idempotency_key else {
        return Ok(false);
    };
    let fingerprint = status.fingerprint.as_deref().unwrap_or_default();
    match index.claim_key(key, fingerprint, &status.id) {
        KeyClaim::Claimed => Ok(true),
        KeyClaim::Existing(first) => Err(Admission::Repeat(first)),
        KeyClaim::Conflict => Err(Admission::Conflict),
    }
}

impl Store for LocalStore {
    fn is_durable(&self) -> bool {
        self.core.journal.is_some()
    }

    fn metrics_text(&self) -> String {
        self.core
            .journal
            .as_ref()
            .map(Journal::metrics_text)
            .unwrap_or_default()
    }

    fn problem(&self) -> Option<String> {
        if !self.core.write_failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.core.write_error)
            .clone()
            .map(|error| format!("the spool cannot be written: {error}"))
    }

    fn subscribe(&self, observer: Arc<dyn Observer>) {
        self.core.observers.add(observer);
    }

    fn work(&self) -> Receiver<Job> {
        self.work.clone()
    }

    fn accept(&self, records: Vec<MessageRecord>) -> Vec<Admission> {
        let core = &self.core;
        let mut admissions: Vec<Option<Admission>> = records.iter().map(|_| None).collect();
        // Reserved and claimed: (position, record, holds a key).
        let mut kept: Vec<(usize, MessageRecord, bool)> = Vec::new();
        for (position, record) in records.into_iter().enumerate() {
            let claimed = match claim(&core.index, &record.status) {
                Ok(claimed) => claimed,
                Err(admission) => {
                    admissions[position] = Some(admission);
                    continue;
                }
            };
            let scheduled = record.status.state() == State::Scheduled;
            let reserved = if scheduled {
                self.capacity.reserve_scheduled()
            } else {
                self.capacity.reserve()
            };
            if !reserved {
                if let (true, Some(key)) = (claimed, &record.status.idempotency_key) {
                    core.index.release_key(key);
                }
                admissions[position] = Some(if scheduled {
                    Admission::ScheduleFull
                } else {
                    Admission::Full
                });
                continue;
            }
            kept.push((position, record, claimed));
        }
        let written = match &core.journal {
            Some(journal) => {
                let all: Vec<&MessageRecord> = kept.iter().map(|(_, record, _)| record).collect();
                core.written(journal.store(&all))
            }
            None => Ok(()),
        };
        for (position, record, claimed) in kept {
            let key = record.status.idempotency_key.clone().filter(|_| claimed);
            match &written {
                Err(error) => {
                    self.release(record.status.state());
                    if let Some(key) = key {
                        core.index.release_key(&key);
                    }
                    admissions[position] = Some(Admission::Refused(copy(error)));
                }
                Ok(()) => {
                    let state = record.status.state();
                    core.show(record.status.clone(), None);
                    if let Some(key) = key {
                        core.index.settle_key(&key);
                    }
                    self.hand_over(record);
                    admissions[position] = Some(Admission::Accepted(state));
                }
            }
        }
        admissions
            .into_iter()
            .map(|admission| {
                admission.unwrap_or_else(|| Admission::Refused(io::Error::other("not handled")))
            })
            .collect()
    }

    fn accept_waited(&self, status: StatusRecord, job: Job) -> Admission {
        let core = &self.core;
        let claimed = match claim(&core.index, &status) {
            Ok(claimed) => claimed,
            Err(admission) => return admission,
        };
        let key = status.idempotency_key.clone().filter(|_| claimed);
        if !self.capacity.reserve() {
            if let Some(key) = key {
                core.index.release_key(&key);
            }
            return Admission::Full;
        }
        let id = status.id.clone();
        core.show(status, None);
        if self.dispatch.try_now(job).is_err() {
            self.capacity.release();
            core.index.remove(&id);
            if let Some(key) = key {
                core.index.release_key(&key);
            }
            return Admission::Full;
        }
        if let Some(key) = key {
            core.index.settle_key(&key);
        }
        Admission::Accepted(State::Queued)
    }

    fn wait_finished(&self, id: &str, deadline: Instant) -> io::Result<Option<StatusRecord>> {
        Ok(self.core.index.wait_finished(id, deadline))
    }

    fn begin_attempt(&self, id: &str, attempt: u32) -> Result<StatusRecord, Option<State>> {
        self.core.index.update(
            id,
            |state| matches!(state, State::Queued | State::Retrying | State::Scheduled),
            |status| {
                status.set_state(State::Sending);
                status.attempts = attempt;
                status.next_attempt_at_ms = None;
                status.clone()
            },
        )
    }

    fn rate_slot(&self) -> Duration {
        self.rate
            .as_ref()
            .map(RateLimiter::take_slot)
            .unwrap_or_default()
    }

    fn retry_later(&self, mut record: MessageRecord, delay: Duration, job: Job, durable: bool) {
        let core = &self.core;
        let id = record.status.id.clone();
        record.status.revision += 1;
        record.status.updated_at_ms = to_millis(SystemTime::now());
        if let (true, Some(journal)) = (durable, &core.journal) {
            if let Err(error) = core.written(journal.store(&[&record])) {
                log::error!("message {id}: cannot record the retry in the spool: {error}");
            }
        }
        core.show(record.status, None);
        self.dispatch
            .at(Instant::now() + delay, Waiting::Retry(job));
    }

    fn finish(&self, mut status: StatusRecord) -> Settling {
        status.revision += 1;
        status.updated_at_ms = to_millis(SystemTime::now());
        let (core, capacity) = (Arc::clone(&self.core), Arc::clone(&self.capacity));
        // Also a message that was never spooled (`/api/mail/v2`) has its
        // final status recorded: with its idempotency key it must outlive a
        // restart, or a client's repeat would send it again.
        let journal = self.core.journal.as_ref();
        let Some(begun) = journal.map(|journal| core.written(journal.begin_finish(&status))) else {
            core.show(status, None);
            capacity.release();
            return Settling::done();
        };
        Settling::later(move || {
            let recorded = begun.and_then(|finishing| match &core.journal {
                Some(journal) => core.written(journal.end_finish(finishing, &status.id)),
                None => Ok(()),
            });
            if let Err(error) = recorded {
                log::error!(
                    "message {}: finished but not recorded in the spool ({error}); it may be sent again after a restart",
                    status.id
                );
            }
            core.show(status, None);
            capacity.release();
        })
    }

    fn fail(&self, mut record: MessageRecord) {
        let core = &self.core;
        record.status.revision += 1;
        record.status.updated_at_ms = to_millis(SystemTime::now());
        // A dead letter also for a message never spooled (`/api/mail/v2`):
        // the SPEC keeps every permanently failed message, and its status
        // and idempotency key must outlive a restart.
        let keep_in_memory = match &core.journal {
            Some(journal) => match core.written(journal.dead_letter(&record)) {
                Ok(()) => None,
                Err(error) => {
                    // Kept in memory then, for a retry by hand (a spooled
                    // message also keeps its journal record).
                    log::error!(
                        "message {}: cannot keep it as a dead letter: {error}",
                        record.status.id
                    );
                    Some(Arc::clone(&record.message))
                }
            },
            None => Some(Arc::clone(&record.message)),
        };
        core.show(record.status, keep_in_memory);
        self.capacity.release();
    }

    fn cancel(&self, id: &str) -> Result<StatusRecord, ActionRefusal> {
        let core = &self.core;
        let (before, status) = core
            .index
            .update(id, State::is_cancellable, |status| {
                let before = status.state();
                status.cancel();
                status.revision += 1;
                status.updated_at_ms = to_millis(SystemTime::now());
                (before, status.clone())
            })
            .map_err(refusal)?;
        // Taken out of the queue already (workers skip it), so its place is free.
        self.release(before);
        if let Some(journal) = &core.journal {
            // A failure here costs only this: after a restart it would be sent.
            if let Err(error) = core.written(journal.finish(&status)) {
                log::error!("message {id}: cancelled, but the spool cannot record it: {error}");
                return Err(ActionRefusal::Io(error));
            }
        }
        core.notify(&status, 1);
        Ok(status)
    }

    fn requeue(&self, id: &str) -> Result<StatusRecord, ActionRefusal> {
        let core = &self.core;
        if !self.capacity.reserve() {
            return Err(ActionRefusal::Full);
        }
        let previous = match core.index.update(
            id,
            |state| state == State::Failed,
            |status| {
                let previous = status.clone();
                status.set_state(State::Queued);
                previous
            },
        ) {
            Ok(previous) => previous,
            Err(state) => {
                self.capacity.release();
                return Err(refusal(state));
            }
        };
        let undo = |refusal: ActionRefusal| {
            let _ = core
                .index
                .update(id, |_| true, |status| *status = previous.clone());
            self.capacity.release();
            Err(refusal)
        };
        // Kept in memory when it was not spooled (memory mode, or sent
        // through /api/mail/v2), else a dead letter on disk.
        let message = match (core.index.dead_letter(id), &core.journal) {
            (Some(message), _) => message,
            (None, Some(journal)) => match journal.read_dead_letter(id) {
                Ok(record) => record.message,
                Err(error) => return undo(ActionRefusal::Io(error)),
            },
            (None, None) => return undo(ActionRefusal::Unknown),
        };
        let mut status = previous.clone();
        status.requeue();
        status.revision += 1;
        status.updated_at_ms = to_millis(SystemTime::now());
        let record = MessageRecord {
            message,
            status: status.clone(),
        };
        if let Some(journal) = &core.journal {
            if let Err(error) = core.written(journal.requeue(&record)) {
                return undo(ActionRefusal::Io(error));
            }
        }
        core.show(status.clone(), None);
        let recipients = status.pending_shared();
        self.dispatch.now(Job::new(record.message, recipients, 0));
        Ok(status)
    }

    fn get(&self, id: &str) -> io::Result<Option<StatusRecord>> {
        Ok(self.core.index.get(id))
    }

    fn list(&self, query: &ListQuery) -> io::Result<Result<Page, String>> {
        Ok(self.core.index.list(query))
    }

    fn counts(&self) -> io::Result<Counts> {
        Ok(Counts {
            by_state: self.core.index.counts(),
            held: self.capacity.held(),
            scheduled: self.capacity.scheduled(),
            queue_depth: self.dispatch.queue_depth(),
            full: self.capacity.is_full(),
        })
    }

    fn suppressed(&self, _id: &str, recipients: &[String]) -> io::Result<Vec<String>> {
        Ok(self
            .core
            .suppressions
            .filter(recipients)
            .into_iter()
            .cloned()
            .collect())
    }

    fn suppress(&self, address: &str, reason: Option<String>) -> io::Result<Suppression> {
        self.core.suppressions.put(address, reason)
    }

    fn suppress_bounced(&self, address: &str, reason: &str) -> io::Result<bool> {
        self.core.suppressions.add_if_absent(address, reason)
    }

    fn unsuppress(&self, address: &str) -> io::Result<bool> {
        self.core.suppressions.delete(address)
    }

    fn suppressions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> io::Result<(Vec<Suppression>, Option<String>)> {
        Ok(self.core.suppressions.page(cursor, limit))
    }

    fn webhook_queue(&self) -> io::Result<Arc<dyn super::WebhookQueue>> {
        super::webhooks::open(&self.spool)
    }

    fn stop(&self, release_retries: bool) {
        self.dispatch.stop_schedule(release_retries);
        if let Some(schedule) = lock(&self.schedule).take() {
            let _ = schedule.join();
        }
    }

    fn flush(&self) {
        if let Some(journal) = &self.core.journal {
            journal.flush_sent_log();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::tests::empty_directory;

    fn message_id(n: u64) -> String {
        format!("{:012x}{n:016x}", to_millis(SystemTime::now()))
    }

    fn record(id: &str) -> MessageRecord {
        let status = StatusRecord::new(
            id.to_string(),
            to_millis(SystemTime::now()),
            vec!["user@example.org".into()],
        );
        MessageRecord {
            message: Arc::new(OutgoingMessage {
                id: id.to_string(),
                envelope_from: "app@example.com".into(),
                recipients: vec!["user@example.org".into()],
                content: "Subject: x\r\n\r\nhello\r\n".into(),
            }),
            status,
        }
    }

    fn config(spool: SpoolSetting) -> Config {
        let mut config = Config::for_outbox(std::env::temp_dir());
        config.spool = spool;
        config.status_retention = 100;
        config
    }

    fn open(directory: &std::path::Path) -> (LocalStore, Recovery) {
        let (store, recovery) =
            LocalStore::open(&config(SpoolSetting::Directory(directory.to_path_buf()))).unwrap();
        assert_eq!(recovery.corrupt, 0);
        (store, recovery)
    }

    fn accept(store: &LocalStore, records: Vec<MessageRecord>) {
        for admission in store.accept(records) {
            assert!(matches!(admission, Admission::Accepted(_)), "{admission:?}");
        }
    }

    fn failed(store: &LocalStore, id: &str) {
        let mut failed = record(id);
        store.begin_attempt(id, 1).unwrap();
        failed.status.set_state(State::Failed);
        failed.status.attempts = 1;
        failed.status.last_error = Some("550 no".into());
        store.fail(failed);
    }

    fn state(store: &LocalStore, id: &str) -> State {
        store.get(id).unwrap().unwrap().state()
    }

    /// A cancel and a worker taking the message race: exactly one wins,
    /// whichever comes first.
    #[test]
    fn a_cancel_and_a_worker_taking_the_message_never_both_win() {
        let store = Arc::new(LocalStore::open(&config(SpoolSetting::Memory)).unwrap().0);
        for round in 0..200 {
            let id = message_id(round);
            accept(&store, vec![record(&id)]);
            let worker = {
                let store = Arc::clone(&store);
                let id = id.clone();
                std::thread::spawn(move || store.begin_attempt(&id, 1).is_ok())
            };
            let cancelled = store.cancel(&id).is_ok();
            let taken = worker.join().unwrap();
            assert!(
                cancelled != taken,
                "round {round}: cancelled {cancelled}, taken {taken}"
            );
            let expected = if cancelled {
                State::Cancelled
            } else {
                State::Sending
            };
            assert_eq!(state(&store, &id), expected);
        }
    }

    #[test]
    fn keys_capacity_and_refusals_are_answered_per_record() {
        let mut small = config(SpoolSetting::Memory);
        small.queue_capacity = 2;
        let (store, _) = LocalStore::open(&small).unwrap();
        let keyed = |n: u64, fingerprint: &str| {
            let mut record = record(&message_id(n));
            record.status.idempotency_key = Some("key".into());
            record.status.fingerprint = Some(fingerprint.into());
            record
        };
        let first = keyed(1, "a");
        let first_id = first.status.id.clone();
        let admissions = store.accept(vec![first, record(&message_id(2)), record(&message_id(3))]);
        assert!(matches!(admissions[0], Admission::Accepted(State::Queued)));
        assert!(matches!(admissions[1], Admission::Accepted(State::Queued)));
        assert!(matches!(admissions[2], Admission::Full));
        let again = store.accept(vec![keyed(4, "a"), keyed(5, "b")]);
        assert!(matches!(&again[0], Admission::Repeat(id) if *id == first_id));
        assert!(matches!(again[1], Admission::Conflict));
    }

    #[test]
    fn cancelled_and_failed_messages_read_the_same_after_a_restart() {
        let directory = empty_directory("store-restart");
        let (cancelled, dead) = (message_id(1), message_id(2));
        {
            let (store, _) = open(&directory);
            accept(&store, vec![record(&cancelled), record(&dead)]);
            store.cancel(&cancelled).unwrap();
            failed(&store, &dead);
            store.stop(false);
        }
        let (store, recovery) = open(&directory);
        assert_eq!(recovery.unfinished, 0, "nothing is left to send");
        let status = store.get(&cancelled).unwrap().unwrap();
        assert_eq!(status.state(), State::Cancelled);
        assert!(status
            .events
            .iter()
            .any(|event| event.kind == EventKind::Cancelled));
        assert_eq!(state(&store, &dead), State::Failed);
        assert!(matches!(
            store.cancel(&dead),
            Err(ActionRefusal::State(State::Failed))
        ));
    }

    /// A dead letter queued again by hand is queued after a restart, even
    /// when the crash came before its dead-letter file was deleted.
    #[test]
    fn a_requeued_dead_letter_stays_queued_after_a_restart() {
        let directory = empty_directory("store-requeue");
        let id = message_id(3);
        {
            let (store, _) = open(&directory);
            accept(&store, vec![record(&id)]);
            failed(&store, &id);
            store.stop(false);
        }
        let dead_letter = directory.join("dead").join(format!("{id}.json"));
        let kept = std::fs::read(&dead_letter).unwrap();
        {
            let (store, _) = open(&directory);
            let requeued = store.requeue(&id).unwrap();
            assert_eq!(requeued.state(), State::Queued);
            assert_eq!(requeued.attempts, 0);
            assert!(matches!(store.requeue(&id), Err(ActionRefusal::State(_))));
            store.stop(false);
        }
        assert!(!dead_letter.exists());
        // As if the crash came between the journal record and the delete.
        std::fs::write(&dead_letter, kept).unwrap();
        let (store, recovery) = open(&directory);
        assert_eq!(recovery.unfinished, 1);
        assert_ne!(state(&store, &id), State::Failed);
        assert!(!dead_letter.exists(), "the stale dead letter is removed");
    }

    #[test]
    fn a_scheduled_message_waits_on_disk_and_is_read_back_when_due() {
        let directory = empty_directory("store-scheduled");
        let (store, _) = open(&directory);
        let id = message_id(4);
        let mut scheduled = record(&id);
        scheduled.status.set_state(State::Scheduled);
        scheduled.status.next_attempt_at_ms = Some(to_millis(SystemTime::now()) + 150);
        accept(&store, vec![scheduled.clone()]);
        assert_eq!(state(&store, &id), State::Scheduled);
        assert_eq!(store.counts().unwrap().scheduled, 1);
        let job = store
            .work()
            .recv_timeout(Duration::from_secs(10))
            .expect("due within seconds");
        assert_eq!(job.message, scheduled.message, "read back from the journal");
        assert_eq!(state(&store, &id), State::Queued);
        let counts = store.counts().unwrap();
        assert_eq!((counts.scheduled, counts.held), (0, 1));
    }
}
