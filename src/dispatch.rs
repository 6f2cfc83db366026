//! Getting jobs to the workers: the bounded work channel, the schedule for
//! jobs that are not due yet, and the counts of unfinished messages that
//! `MAILROOM_QUEUE_CAPACITY` and `MAILROOM_SCHEDULED_CAPACITY` bound.
//!
//! Nothing here ever blocks: the channel never holds more than the
//! capacity (each message is reserved before it is sent into it), and a
//! momentarily full channel sends the job through the schedule instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::job::Job;
use crate::schedule::{Activate, Schedule, Waiting};

/// How many unfinished messages are held, against the limits.
pub(crate) struct Capacity {
    /// Queued, sending or waiting for a retry.
    held: AtomicUsize,
    limit: usize,
    /// Waiting for their `send_at`.
    scheduled: AtomicUsize,
    scheduled_limit: usize,
}

fn take(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            (held < limit).then_some(held + 1)
        })
        .is_ok()
}

fn give_back(counter: &AtomicUsize) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
        held.checked_sub(1)
    });
}

impl Capacity {
    /// Room for `limit` queued and `scheduled_limit` scheduled messages.
    pub(crate) fn new(limit: usize, scheduled_limit: usize) -> Capacity {
        Capacity {
            held: AtomicUsize::new(0),
            limit,
            scheduled: AtomicUsize::new(0),
            scheduled_limit,
        }
    }

    /// Takes a place for one more queued message; false when full.
    pub(crate) fn reserve(&self) -> bool {
        take(&self.held, self.limit)
    }

    /// Takes a place for one more scheduled message; false when full.
    pub(crate) fn reserve_scheduled(&self) -> bool {
        take(&self.scheduled, self.scheduled_limit)
    }

    /// Takes places for messages found at start, whatever the limits.
    pub(crate) fn reserve_recovered(&self, queued: usize, scheduled: usize) {
        self.held.fetch_add(queued, Ordering::SeqCst);
        self.scheduled.fetch_add(scheduled, Ordering::SeqCst);
    }

    /// One queued message is done (or was never accepted).
    pub(crate) fn release(&self) {
        give_back(&self.held);
    }

    /// One scheduled message is done (cancelled, or never accepted).
    pub(crate) fn release_scheduled(&self) {
        give_back(&self.scheduled);
    }

    /// A scheduled message is due: it now counts as queued (whatever the
    /// queue's limit: it was accepted long ago).
    pub(crate) fn promote(&self) {
        give_back(&self.scheduled);
        self.held.fetch_add(1, Ordering::SeqCst);
    }

    /// Queued, sending or retrying messages held.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Scheduled messages held.
    pub(crate) fn scheduled(&self) -> usize {
        self.scheduled.load(Ordering::SeqCst)
    }

    /// True when no more queued messages fit.
    pub(crate) fn is_full(&self) -> bool {
        self.held() >= self.limit
    }
}

/// The way to the workers.
pub(crate) struct Dispatch {
    work: Sender<Job>,
    schedule: Schedule,
}

impl Dispatch {
    /// A channel sized for the capacity and a started schedule thread;
    /// `activate` turns scheduled sends into jobs when they are due.
    pub(crate) fn start(
        capacity: Arc<Capacity>,
        workers: usize,
        activate: Activate,
    ) -> std::io::Result<(Dispatch, Receiver<Job>, std::thread::JoinHandle<()>)> {
        let channel_size = capacity.limit.clamp(workers, 1 << 20);
        let (work, receiver) = crossbeam_channel::bounded(channel_size);
        let (schedule, thread) = Schedule::start(work.clone(), activate)?;
        Ok((Dispatch { work, schedule }, receiver, thread))
    }

    /// Jobs waiting in the channel for a worker.
    pub(crate) fn queue_depth(&self) -> usize {
        self.work.len()
    }

    /// Hands a reserved job to the workers now.
    pub(crate) fn now(&self, job: Job) {
        match self.work.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.at(Instant::now(), Waiting::Retry(job));
            }
        }
    }

    /// Hands a reserved job (or a scheduled send) to the workers at `due`.
    pub(crate) fn at(&self, due: Instant, waiting: Waiting) {
        if let Err(stopped) = self.schedule.schedule(due, waiting) {
            // Only while stopping: the message stays in the spool (or, in
            // memory mode, is among those reported dropped).
            log::warn!(
                "message {}: not queued, the service is stopping",
                stopped.0.id()
            );
        }
    }

    /// Tries to hand a job to a worker now, without the schedule; gives
    /// it back when the channel is full (the caller refuses the request).
    pub(crate) fn try_now(&self, job: Job) -> Result<(), Job> {
        self.work.try_send(job).map_err(|error| error.into_inner())
    }

    /// Stops the schedule; with `release_retries`, hands the retries it
    /// holds to the workers first (memory mode drains at shutdown).
    pub(crate) fn stop_schedule(&self, release_retries: bool) {
        self.schedule.stop(release_retries);
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

    /// Takes the next slot; returns how long to wait until it starts.
    pub(crate) fn take_slot(&self) -> Duration {
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
        slot.saturating_duration_since(Instant::now())
    }
}
