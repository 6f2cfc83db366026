//! Where every message's state lives: statuses, events, the list's
//! indexes and idempotency keys in memory ([`index`]), made durable by the
//! spool's journal ([`journal`]) unless the spool is `none`.
//!
//! The rest of the engine changes message state only through [`Store`]:
//! each change is written to disk first and shown by the API after, so a
//! status the API shows survives a crash. Changes that race (a cancel and
//! a worker taking the message, two retries by hand) are decided by the
//! index's state check, under one lock.

mod committer;
mod finished;
mod frame;
mod index;
mod journal;
mod record;
mod suppression;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::config::SpoolSetting;
use crate::message::OutgoingMessage;
use crate::status::{Event, EventKind, State};
use crate::time::to_millis;
use index::Index;
pub use index::ListQuery;
pub(crate) use index::{id_key, KeyClaim, Page};
use journal::Journal;
pub(crate) use record::{MessageRecord, StatusRecord};
pub use suppression::Suppression;
pub(crate) use suppression::Suppressions;

/// Why an action on a message (cancel, retry) was refused.
#[derive(Debug)]
pub(crate) enum ActionRefusal {
    /// No such message (or it is no longer kept).
    Unknown,
    /// The message is in a state that does not allow it.
    State(State),
    /// The change could not be written to the spool.
    Io(io::Error),
}

/// Told of every change of a message's status that added events, after
/// the change is recorded (durably, when it is spooled). Called on the
/// thread making the change (a worker, a request): it must not block.
pub(crate) trait Observer: Send + Sync {
    /// `status` is the message's new status; `new_events` what happened.
    fn changed(&self, status: &StatusRecord, new_events: &[&Event]);
}

/// The state of every message, kept in memory and on disk.
pub(crate) struct Store {
    journal: Option<Journal>,
    index: Index,
    suppressions: Suppressions,
    observers: std::sync::RwLock<Vec<Arc<dyn Observer>>>,
    /// The last write to the spool failed, and why; cleared by the next
    /// one that works.
    write_error: Mutex<Option<String>>,
    write_failed: AtomicBool,
}

impl Store {
    /// Opens the spool (or memory) and loads what it holds; returns the
    /// messages still to send, oldest first, and how many pieces of data
    /// were set aside as unreadable.
    pub(crate) fn open(
        setting: &SpoolSetting,
        retention: usize,
    ) -> io::Result<(Store, Vec<MessageRecord>, usize)> {
        let index = Index::new(retention);
        let (journal, recovered, suppressions) = match setting {
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
        for status in finished {
            let mut status = status;
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
        let store = Store {
            journal,
            index,
            suppressions,
            observers: std::sync::RwLock::new(Vec::new()),
            write_error: Mutex::new(None),
            write_failed: AtomicBool::new(false),
        };
        Ok((store, pending, corrupt))
    }

    /// Adds an observer of every change from now on.
    #[allow(dead_code)] // webhooks, next
    pub(crate) fn subscribe(&self, observer: Arc<dyn Observer>) {
        self.observers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(observer);
    }

    /// Shows a recorded change: the index first, then the observers.
    fn show(&self, status: StatusRecord, dead_letter: Option<Arc<OutgoingMessage>>) {
        let before = self.index.events_total(&status.id);
        let observers = self
            .observers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if observers.is_empty() || status.events_total <= before {
            self.index.put(status, dead_letter);
            return;
        }
        let noted = status.clone();
        self.index.put(status, dead_letter);
        let new_events: Vec<&Event> = noted.events_since(before).collect();
        for observer in observers.iter() {
            observer.changed(&noted, &new_events);
        }
    }

    /// Tells the observers of the last `count` events of `status`.
    fn notify(&self, status: &StatusRecord, count: u64) {
        let observers = self
            .observers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let new_events: Vec<&Event> = status
            .events_since(status.events_total.saturating_sub(count))
            .collect();
        for observer in observers.iter() {
            observer.changed(status, &new_events);
        }
    }

    /// True when messages survive a restart.
    pub(crate) fn is_durable(&self) -> bool {
        self.journal.is_some()
    }

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

    /// Why the spool cannot be written, while the last write failed.
    pub(crate) fn write_problem(&self) -> Option<String> {
        if !self.write_failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.write_error).clone()
    }

    /// Keeps new messages (durably, in one commit, when spooled) and shows
    /// their statuses.
    pub(crate) fn accept(&self, records: &[MessageRecord]) -> io::Result<()> {
        if let Some(journal) = &self.journal {
            let all: Vec<&MessageRecord> = records.iter().collect();
            self.written(journal.store(&all))?;
        }
        for record in records {
            self.show(record.status.clone(), None);
        }
        Ok(())
    }

    /// Marks a message as failed without an attempt (e.g. a scheduled
    /// send whose content cannot be read back), keeping what is known.
    pub(crate) fn fail_unreadable(&self, id: &str, error: &str) {
        let failed = self.index.update(
            id,
            |state| !state.is_finished(),
            |status| {
                status.set_state(State::Failed);
                status.last_error = Some(error.to_string());
                status.push_event(Event::now(EventKind::Failed {
                    error: error.to_string(),
                }));
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

    /// Shows a message that is sent and waited for (`/api/mail/v2`): not
    /// spooled, the caller learns the outcome.
    pub(crate) fn track(&self, status: StatusRecord) {
        self.show(status, None);
    }

    /// A worker takes a message for attempt `attempt`; refused (with the
    /// current state) unless it is waiting for one, e.g. when it was
    /// cancelled meanwhile. Returns its status as it now is.
    pub(crate) fn begin_attempt(
        &self,
        id: &str,
        attempt: u32,
    ) -> Result<StatusRecord, Option<State>> {
        self.index.update(
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

    /// Records a message's new state while it may still be sent (e.g.
    /// waiting for a retry). `durable`: written to the spool first.
    pub(crate) fn save(&self, mut record: MessageRecord, durable: bool) -> io::Result<()> {
        record.status.revision += 1;
        record.status.updated_at_ms = to_millis(SystemTime::now());
        if durable {
            if let Some(journal) = &self.journal {
                self.written(journal.store(&[&record]))?;
            }
        }
        self.show(record.status, None);
        Ok(())
    }

    /// Records that a message is finished (sent, cancelled, suppressed).
    pub(crate) fn finish(&self, mut status: StatusRecord, durable: bool) -> io::Result<()> {
        status.revision += 1;
        status.updated_at_ms = to_millis(SystemTime::now());
        if durable {
            if let Some(journal) = &self.journal {
                self.written(journal.finish(&status))?;
            }
        }
        self.show(status, None);
        Ok(())
    }

    /// Records that a message failed for good; its content is kept (a dead
    /// letter) so it can be retried by hand.
    pub(crate) fn fail(&self, mut record: MessageRecord, durable: bool) -> io::Result<()> {
        record.status.revision += 1;
        record.status.updated_at_ms = to_millis(SystemTime::now());
        let keep_in_memory = match (&self.journal, durable) {
            (Some(journal), true) => {
                self.written(journal.dead_letter(&record))?;
                None
            }
            _ => Some(Arc::clone(&record.message)),
        };
        self.show(record.status, keep_in_memory);
        Ok(())
    }

    /// A scheduled send is due: it becomes `queued`; `None` when it is no
    /// longer scheduled (cancelled meanwhile).
    pub(crate) fn activate(&self, id: &str) -> Option<StatusRecord> {
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

    /// Reads an unfinished message's record back from the spool (a
    /// scheduled send's content is not kept in memory).
    pub(crate) fn load(&self, id: &str) -> io::Result<MessageRecord> {
        match &self.journal {
            Some(journal) => journal.load(id),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "memory mode keeps no records on disk",
            )),
        }
    }

    /// Cancels a message that waits for a worker or for its time: it
    /// becomes `cancelled`, durably, and is never sent. Returns the state
    /// it was in, and its status now.
    pub(crate) fn cancel(&self, id: &str) -> Result<(State, StatusRecord), ActionRefusal> {
        let (before, status) = self
            .index
            .update(id, State::is_cancellable, |status| {
                let before = status.state();
                status.set_state(State::Cancelled);
                status.next_attempt_at_ms = None;
                status.push_event(Event::now(EventKind::Cancelled));
                status.revision += 1;
                status.updated_at_ms = to_millis(SystemTime::now());
                (before, status.clone())
            })
            .map_err(refusal)?;
        if let Some(journal) = &self.journal {
            // Taken out of the queue already (workers skip it), so a failure
            // here costs only this: after a restart it would be sent.
            if let Err(error) = self.written(journal.finish(&status)) {
                log::error!("message {id}: cancelled, but the spool cannot record it: {error}");
                return Err(ActionRefusal::Io(error));
            }
        }
        self.notify(&status, 1);
        Ok((before, status))
    }

    /// Queues a failed message again with a fresh attempt budget, for the
    /// recipients it has not reached; returns its new record.
    pub(crate) fn requeue(&self, id: &str) -> Result<MessageRecord, ActionRefusal> {
        let previous = self
            .index
            .update(
                id,
                |state| state == State::Failed,
                |status| {
                    let previous = status.clone();
                    status.set_state(State::Queued);
                    previous
                },
            )
            .map_err(refusal)?;
        let restore_failed = || {
            let _ = self
                .index
                .update(id, |_| true, |status| *status = previous.clone());
        };
        let message = match &self.journal {
            Some(journal) => match journal.read_dead_letter(id) {
                Ok(record) => record.message,
                Err(error) => {
                    restore_failed();
                    return Err(ActionRefusal::Io(error));
                }
            },
            None => match self.index.dead_letter(id) {
                Some(message) => message,
                None => {
                    restore_failed();
                    return Err(ActionRefusal::Unknown);
                }
            },
        };
        let mut status = previous.clone();
        status.set_state(State::Queued);
        status.attempts = 0;
        status.next_attempt_at_ms = None;
        status.last_error = None;
        status.refused.clear();
        status.revision += 1;
        status.updated_at_ms = to_millis(SystemTime::now());
        status.push_event(Event::now(EventKind::Requeued));
        let record = MessageRecord {
            message,
            status: status.clone(),
        };
        if let Some(journal) = &self.journal {
            if let Err(error) = self.written(journal.requeue(&record)) {
                restore_failed();
                return Err(ActionRefusal::Io(error));
            }
        }
        self.show(status, None);
        Ok(record)
    }

    /// The suppression list.
    pub(crate) fn suppressions(&self) -> &Suppressions {
        &self.suppressions
    }

    /// A message's status.
    pub(crate) fn get(&self, id: &str) -> Option<StatusRecord> {
        self.index.get(id)
    }

    /// Messages matching a query, newest first.
    pub(crate) fn list(&self, query: &ListQuery) -> Result<Page, String> {
        self.index.list(query)
    }

    /// How many messages are in each state.
    pub(crate) fn counts(&self) -> HashMap<State, usize> {
        self.index.counts()
    }

    /// Waits until a message is finished, or `deadline`.
    pub(crate) fn wait_finished(&self, id: &str, deadline: Instant) -> Option<StatusRecord> {
        self.index.wait_finished(id, deadline)
    }

    /// See [`Index::claim_key`].
    pub(crate) fn claim_key(&self, key: &str, fingerprint: &str, id: &str) -> KeyClaim {
        self.index.claim_key(key, fingerprint, id)
    }

    /// See [`Index::settle_key`].
    pub(crate) fn settle_key(&self, key: &str) {
        self.index.settle_key(key);
    }

    /// See [`Index::release_key`].
    pub(crate) fn release_key(&self, key: &str) {
        self.index.release_key(key);
    }

    /// Forgets a message that was never accepted after all.
    pub(crate) fn forget(&self, id: &str) {
        self.index.remove(id);
    }
}

fn restore(index: &Index, status: StatusRecord) {
    if let Some(key) = &status.idempotency_key {
        index.restore_key(key, status.fingerprint.as_deref(), &status.id);
    }
    index.put(status, None);
}

fn refusal(state: Option<State>) -> ActionRefusal {
    match state {
        Some(state) => ActionRefusal::State(state),
        None => ActionRefusal::Unknown,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OutgoingMessage;
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

    fn open(directory: &std::path::Path) -> (Store, Vec<MessageRecord>) {
        let (store, pending, corrupt) =
            Store::open(&SpoolSetting::Directory(directory.to_path_buf()), 100).unwrap();
        assert_eq!(corrupt, 0);
        (store, pending)
    }

    fn failed(store: &Store, id: &str) {
        let mut failed = record(id);
        store.begin_attempt(id, 1).unwrap();
        failed.status.set_state(State::Failed);
        failed.status.attempts = 1;
        failed.status.last_error = Some("550 no".into());
        store.fail(failed, true).unwrap();
    }

    /// A cancel and a worker taking the message race: exactly one wins,
    /// whichever comes first.
    #[test]
    fn a_cancel_and_a_worker_taking_the_message_never_both_win() {
        for round in 0..200 {
            let store = Arc::new(Store::open(&SpoolSetting::Memory, 1000).unwrap().0);
            let id = message_id(round);
            store.accept(&[record(&id)]).unwrap();
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
            let state = store.get(&id).unwrap().state();
            assert_eq!(
                state,
                if cancelled {
                    State::Cancelled
                } else {
                    State::Sending
                }
            );
        }
    }

    #[test]
    fn cancelled_and_failed_messages_read_the_same_after_a_restart() {
        let directory = empty_directory("store-restart");
        let (cancelled, dead) = (message_id(1), message_id(2));
        {
            let (store, _) = open(&directory);
            store.accept(&[record(&cancelled), record(&dead)]).unwrap();
            let (before, _) = store.cancel(&cancelled).unwrap();
            assert_eq!(before, State::Queued);
            failed(&store, &dead);
        }
        let (store, pending) = open(&directory);
        assert!(pending.is_empty(), "nothing is left to send");
        let status = store.get(&cancelled).unwrap();
        assert_eq!(status.state(), State::Cancelled);
        assert!(status
            .events
            .iter()
            .any(|event| event.kind == EventKind::Cancelled));
        assert_eq!(store.get(&dead).unwrap().state(), State::Failed);
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
            store.accept(&[record(&id)]).unwrap();
            failed(&store, &id);
        }
        let dead_letter = directory.join("dead").join(format!("{id}.json"));
        let kept = std::fs::read(&dead_letter).unwrap();
        {
            let (store, _) = open(&directory);
            let requeued = store.requeue(&id).unwrap();
            assert_eq!(requeued.status.state(), State::Queued);
            assert_eq!(requeued.status.attempts, 0);
            assert!(matches!(
                store.requeue(&id),
                Err(ActionRefusal::State(State::Queued))
            ));
        }
        assert!(!dead_letter.exists());
        // As if the crash came between the journal record and the delete.
        std::fs::write(&dead_letter, kept).unwrap();
        let (store, pending) = open(&directory);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].status.id, id);
        assert_eq!(store.get(&id).unwrap().state(), State::Queued);
        assert!(!dead_letter.exists(), "the stale dead letter is removed");
    }

    #[test]
    fn a_scheduled_message_is_read_back_from_the_journal_when_due() {
        let directory = empty_directory("store-scheduled");
        let (store, _) = open(&directory);
        let id = message_id(4);
        let mut scheduled = record(&id);
        scheduled.status.set_state(State::Scheduled);
        scheduled.status.next_attempt_at_ms = Some(to_millis(SystemTime::now()) + 60_000);
        store.accept(&[scheduled.clone()]).unwrap();
        assert_eq!(store.load(&id).unwrap().message, scheduled.message);
        assert!(store.activate(&id).is_some());
        assert_eq!(store.get(&id).unwrap().state(), State::Queued);
        assert!(store.activate(&id).is_none(), "only once");
    }
}
