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
mod webhooks;

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
pub(crate) use webhooks::{open as open_webhook_queue, PendingWebhook, WebhookQueue};

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
        let (journal, recovered) = match setting {
            SpoolSetting::Memory => (None, journal::Recovered::default()),
            SpoolSetting::Directory(directory) => {
                let (journal, recovered) =
                    Journal::open(directory, journal::SEGMENT_BYTES, retention)?;
                (Some(journal), recovered)
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
            observers: std::sync::RwLock::new(Vec::new()),
            write_error: Mutex::new(None),
            write_failed: AtomicBool::new(false),
        };
        Ok((store, pending, corrupt))
    }

    /// Adds an observer of every change from now on.
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

    /// Cancels a message that waits for a worker or for its time: it
    /// becomes `cancelled`, durably, and is never sent.
    pub(crate) fn cancel(&self, id: &str) -> Result<StatusRecord, ActionRefusal> {
        let status = self
            .index
            .update(id, State::is_cancellable, |status| {
                status.set_state(State::Cancelled);
                status.next_attempt_at_ms = None;
                status.push_event(Event::now(EventKind::Cancelled));
                status.revision += 1;
                status.updated_at_ms = to_millis(SystemTime::now());
                status.clone()
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
        Ok(status)
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
