//! Getting jobs to the workers: the bounded work channel, the schedule for
//! jobs that are not due yet, and the count of unfinished messages that
//! `MAILROOM_QUEUE_CAPACITY` bounds.
//!
//! Nothing here ever blocks: the channel never holds more than the
//! capacity (each message is reserved before it is sent into it), and a
//! momentarily full channel sends the job through the schedule instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::job::Job;
use crate::schedule::Schedule;

/// The way to the workers.
pub(crate) struct Dispatch {
    work: Sender<Job>,
    schedule: Schedule,
    /// Unfinished messages: queued, sending or waiting for a retry.
    held: AtomicUsize,
    capacity: usize,
    /// Jobs the schedule holds.
    scheduled: Arc<AtomicUsize>,
}

impl Dispatch {
    /// A channel for `capacity` messages and a started schedule thread.
    pub(crate) fn start(
        capacity: usize,
        workers: usize,
    ) -> std::io::Result<(Dispatch, Receiver<Job>, std::thread::JoinHandle<()>)> {
        let channel_size = capacity.clamp(workers, 1 << 20);
        let (work, receiver) = crossbeam_channel::bounded(channel_size);
        let scheduled = Arc::new(AtomicUsize::new(0));
        let (schedule, thread) = Schedule::start(work.clone(), Arc::clone(&scheduled))?;
        Ok((
            Dispatch {
                work,
                schedule,
                held: AtomicUsize::new(0),
                capacity,
                scheduled,
            },
            receiver,
            thread,
        ))
    }

    /// Takes a place for one more unfinished message; false when full.
    pub(crate) fn reserve(&self) -> bool {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < self.capacity).then_some(held + 1)
            })
            .is_ok()
    }

    /// Takes places for messages found at start, whatever the capacity.
    pub(crate) fn reserve_recovered(&self, count: usize) {
        self.held.fetch_add(count, Ordering::SeqCst);
    }

    /// One unfinished message is done (or was never accepted).
    pub(crate) fn release(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_sub(1)
            });
    }

    /// Unfinished messages held.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// True when no more messages fit.
    pub(crate) fn is_full(&self) -> bool {
        self.held() >= self.capacity
    }

    /// Jobs waiting in the channel for a worker.
    pub(crate) fn queue_depth(&self) -> usize {
        self.work.len()
    }

    /// Jobs waiting in the schedule for their time (retries; cancelled
    /// ones until their time comes).
    pub(crate) fn scheduled_depth(&self) -> usize {
        self.scheduled.load(Ordering::Relaxed)
    }

    /// Hands a reserved job to the workers now.
    pub(crate) fn now(&self, job: Job) {
        match self.work.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.at(Instant::now(), job);
            }
        }
    }

    /// Hands a reserved job to the workers at `due`.
    pub(crate) fn at(&self, due: Instant, job: Job) {
        if let Err(stopped) = self.schedule.schedule(due, job) {
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

    /// Stops the schedule; with `release_all`, hands everything it holds
    /// to the workers first (memory mode drains at shutdown).
    pub(crate) fn stop_schedule(&self, release_all: bool) {
        self.schedule.stop(release_all);
    }
}
