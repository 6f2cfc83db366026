//! Where every message's state lives, behind one interface ([`Store`]):
//! statuses and their events, the list's indexes, idempotency keys, the
//! suppression list, the queue (what is due now and later) and the counts
//! that the capacities bound.
//!
//! Two implementations: [`local`] (memory, made durable by the spool's
//! journal; the default) and `redis` (shared by several replicas). The
//! engine and the workers change message state only through [`Store`];
//! each change is recorded (durably, when spooled) before the API shows it.

mod committer;
mod finished;
mod frame;
mod index;
mod journal;
pub(crate) mod local;
mod record;
mod redis;
mod suppression;
mod webhooks;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::job::Job;
use crate::status::{Event, State};
pub use index::ListQuery;
pub(crate) use index::{id_key, Page};
pub(crate) use record::{MessageRecord, StatusRecord};
pub use suppression::Suppression;
pub(crate) use webhooks::{PendingWebhook, WebhookQueue};

/// Why an action on a message (cancel, retry) was refused.
#[derive(Debug)]
pub(crate) enum ActionRefusal {
    /// No such message (or it is no longer kept).
    Unknown,
    /// The message is in a state that does not allow it.
    State(State),
    /// No room: the queue is full.
    Full,
    /// The change could not be recorded.
    Io(io::Error),
}

/// A finish whose record is still being written. The message reads
/// `sending` (it is still in flight) until the record is on disk; then
/// its final status is shown. Waiting is [`Settling::wait`], or dropping
/// it: a finish is never left unsettled.
///
/// Why workers get this instead of waiting at once: the next delivery
/// overlaps the fsync, and a worker waits for its previous finish before
/// its next one (or before it sits idle; the supervisor settles it for a
/// worker it gives up), so at most two of its messages are in flight.
#[must_use = "dropping it waits for the record at once"]
pub(crate) struct Settling(Option<Box<dyn FnOnce() + Send>>);

impl Settling {
    /// Nothing left to wait for.
    pub(crate) fn done() -> Settling {
        Settling(None)
    }

    /// Runs `rest` when waited for (or dropped).
    pub(super) fn later(rest: impl FnOnce() + Send + 'static) -> Settling {
        Settling(Some(Box::new(rest)))
    }

    /// Waits until the finish is recorded and shown.
    pub(crate) fn wait(mut self) {
        if let Some(rest) = self.0.take() {
            rest();
        }
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if let Some(rest) = self.0.take() {
            rest();
        }
    }
}

/// What became of one message handed to [`Store::accept`].
#[derive(Debug)]
pub(crate) enum Admission {
    /// Kept, and queued or scheduled (the state says which).
    Accepted(State),
    /// Its idempotency key belongs to this earlier message (same request).
    Repeat(String),
    /// Its idempotency key belongs to a different request.
    Conflict,
    /// `MAILROOM_QUEUE_CAPACITY` unfinished messages are held.
    Full,
    /// `MAILROOM_SCHEDULED_CAPACITY` scheduled messages are held.
    ScheduleFull,
    /// It could not be recorded.
    Refused(io::Error),
}

/// Told of every change of a message's status that added events, after
/// the change is recorded (durably, when it is spooled). Called on the
/// thread making the change (a worker, a request): it must not block.
pub(crate) trait Observer: Send + Sync {
    /// `status` is the message's new status; `new_events` what happened.
    fn changed(&self, status: &StatusRecord, new_events: &[&Event]);
}

/// A store's observers: added at start, told of each change.
#[derive(Default)]
pub(super) struct Observers(RwLock<Vec<Arc<dyn Observer>>>);

impl Observers {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn Observer>>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn add(&self, observer: Arc<dyn Observer>) {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(observer);
    }

    /// True when nobody would be told anything.
    pub(super) fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Tells every observer of `status`'s events after the first
    /// `before` (nothing when there are none).
    pub(super) fn tell(&self, status: &StatusRecord, before: u64) {
        let observers = self.read();
        if observers.is_empty() || status.events_total <= before {
            return;
        }
        let new_events: Vec<&Event> = status.events_since(before).collect();
        for observer in observers.iter() {
            observer.changed(status, &new_events);
        }
    }
}

/// How many messages are where, for readiness, metrics and the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Kept messages by state.
    pub by_state: HashMap<State, usize>,
    /// Unfinished messages held against `MAILROOM_QUEUE_CAPACITY`.
    pub held: usize,
    /// Messages waiting for their `send_at`.
    pub scheduled: usize,
    /// Jobs waiting for a worker.
    pub queue_depth: usize,
    /// True when no more queued messages fit.
    pub full: bool,
}

/// The store's part of what a worker does: everything but the delivery.
pub(crate) trait Store: Send + Sync {
    /// True when accepted messages survive a restart.
    fn is_durable(&self) -> bool;

    /// Why the store cannot take work now (a spool that cannot be written,
    /// an unreachable Redis), while that lasts.
    fn problem(&self) -> Option<String>;

    /// Adds an observer of every change from now on.
    fn subscribe(&self, observer: Arc<dyn Observer>);

    /// The channel the workers take jobs from.
    fn work(&self) -> Receiver<Job>;

    /// Keeps new messages and hands them to the workers (now, or at their
    /// `send_at`). Their statuses carry their idempotency key and
    /// fingerprint; the accepted ones are recorded (durably, in one commit,
    /// when spooled) before this returns.
    fn accept(&self, records: Vec<MessageRecord>) -> Vec<Admission>;

    /// Shows a message sent through `/api/mail/v2` and hands `job` (with its
    /// waiter) to a worker at once; not spooled: the caller gets the outcome.
    fn accept_waited(&self, status: StatusRecord, job: Job) -> Admission;

    /// Waits until a message is finished, or `deadline`; its status then.
    fn wait_finished(&self, id: &str, deadline: Instant) -> io::Result<Option<StatusRecord>>;

    /// A worker takes a message for attempt `attempt`; refused (with the
    /// current state) unless it waits for one, e.g. when it was cancelled
    /// meanwhile. Returns its status as it now is.
    fn begin_attempt(&self, id: &str, attempt: u32) -> Result<StatusRecord, Option<State>>;

    /// How long this worker waits before its next delivery
    /// (`MAILROOM_RATE_LIMIT`); the slot is taken when this returns.
    fn rate_slot(&self) -> Duration;

    /// Records that a message waits for a retry and hands `job` back to the
    /// workers after `delay`. `durable`: written to the spool (not for
    /// every retry of an outage: a record of the message is enough).
    fn retry_later(&self, record: MessageRecord, delay: Duration, job: Job, durable: bool);

    /// Records that a message is finished (sent, suppressed); durably
    /// once the [`Settling`] is waited for, also for `/api/mail/v2` (whose
    /// status and idempotency key outlive a restart like any other).
    fn finish(&self, status: StatusRecord) -> Settling;

    /// Records that a message failed for good; its content is kept (a
    /// dead letter) so it can be retried by hand, also for `/api/mail/v2`.
    fn fail(&self, record: MessageRecord);

    /// Cancels a message that waits for a worker or for its time: it
    /// becomes `cancelled` and is never sent, also after a restart.
    fn cancel(&self, id: &str) -> Result<StatusRecord, ActionRefusal>;

    /// Queues a failed message again with a fresh attempt budget, for the
    /// recipients it has not reached.
    fn requeue(&self, id: &str) -> Result<StatusRecord, ActionRefusal>;

    /// A message's status.
    fn get(&self, id: &str) -> io::Result<Option<StatusRecord>>;

    /// Messages matching a query, newest first; `Ok(Err(..))` for a bad cursor.
    fn list(&self, query: &ListQuery) -> io::Result<Result<Page, String>>;

    /// How many messages are where.
    fn counts(&self) -> io::Result<Counts>;

    /// Which of `recipients` (of message `id`) are on the suppression list.
    fn suppressed(&self, id: &str, recipients: &[String]) -> io::Result<Vec<String>>;

    /// Puts an address on the suppression list (or updates its reason).
    fn suppress(&self, address: &str, reason: Option<String>) -> io::Result<Suppression>;

    /// Adds an address unless it is there already (a bounce); true when added.
    fn suppress_bounced(&self, address: &str, reason: &str) -> io::Result<bool>;

    /// Takes an address off the suppression list; false when it was not on it.
    fn unsuppress(&self, address: &str) -> io::Result<bool>;

    /// Up to `limit` suppressions after `cursor`, in address order, and the
    /// next page's cursor.
    fn suppressions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> io::Result<(Vec<Suppression>, Option<String>)>;

    /// The store's own lines for `/metrics` (Prometheus text; none by default).
    fn metrics_text(&self) -> String {
        String::new()
    }

    /// Where pending webhooks are kept with this store.
    fn webhook_queue(&self) -> io::Result<Arc<dyn WebhookQueue>>;

    /// Stops the store's own threads. With `release_retries`, retries that
    /// wait for their time are handed to the workers first (memory mode
    /// drains at shutdown).
    fn stop(&self, release_retries: bool);

    /// Writes out what is buffered (once the workers have ended, at a stop).
    fn flush(&self) {}
}

/// Opens the store the configuration asks for, and queues again what it
/// holds from an earlier run.
pub(crate) fn open(
    config: &crate::config::Config,
) -> io::Result<(Arc<dyn Store>, local::Recovery)> {
    if let Some(settings) = &config.store {
        let store = redis::RedisStore::open(config, settings)?;
        return Ok((Arc::new(store), local::Recovery::default()));
    }
    let (store, recovery) = local::LocalStore::open(config)?;
    Ok((Arc::new(store), recovery))
}
