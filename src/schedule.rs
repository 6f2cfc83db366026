//! The schedule: one thread holding messages until they are due (retries
//! after a transient failure) in a min-heap of due times, handing each to
//! the work channel when due.
//!
//! It never blocks on the work channel (`try_send`): the original design
//! deadlocked when workers blocked re-enqueueing into a queue only they
//! drained. A full channel just keeps the message in the heap a little longer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::job::Job;

pub(crate) enum Command {
    Schedule(Instant, Job),
    /// Stop; with `release_all`, hand every held message to the workers first
    /// (memory mode drains on shutdown instead of keeping them).
    Stop {
        release_all: bool,
    },
}

struct Due {
    at: Instant,
    sequence: u64,
    job: Job,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

/// Handle to the schedule's thread.
pub(crate) struct Schedule {
    commands: Sender<Command>,
}

/// A message could not be scheduled because the scheduler has stopped.
pub(crate) struct Stopped(pub Job);

impl Schedule {
    /// Starts the thread. `depth` tracks how many messages it holds.
    pub(crate) fn start(
        work: Sender<Job>,
        depth: Arc<AtomicUsize>,
    ) -> std::io::Result<(Schedule, JoinHandle<()>)> {
        // Unbounded on purpose: what it holds is bounded by the queue
        // capacity, and a worker must never block handing a message over.
        let (commands, receiver) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("schedule".into())
            .spawn(move || run(receiver, work, depth))?;
        Ok((Schedule { commands }, handle))
    }

    /// Holds `job` until `at`, then sends it to the workers.
    pub(crate) fn schedule(&self, at: Instant, job: Job) -> Result<(), Stopped> {
        self.commands
            .send(Command::Schedule(at, job))
            .map_err(|error| match error.0 {
                Command::Schedule(_, job) => Stopped(job),
                Command::Stop { .. } => unreachable!("only Schedule is sent here"),
            })
    }

    /// Asks the thread to stop (join its handle to wait for it).
    pub(crate) fn stop(&self, release_all: bool) {
        let _ = self.commands.send(Command::Stop { release_all });
    }
}

fn run(commands: Receiver<Command>, work: Sender<Job>, depth: Arc<AtomicUsize>) {
    let mut heap: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    let mut sequence = 0u64;
    loop {
        let command = match heap.peek() {
            Some(Reverse(next)) => commands.recv_deadline(next.at),
            None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match command {
            Ok(Command::Schedule(at, job)) => {
                sequence += 1;
                heap.push(Reverse(Due { at, sequence, job }));
            }
            Ok(Command::Stop { release_all }) => {
                if release_all {
                    for Reverse(due) in heap.drain() {
                        let _ = work.try_send(due.job);
                    }
                }
                depth.store(heap.len(), Ordering::Relaxed);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(next)| next.at <= now) {
            let Some(Reverse(due)) = heap.pop() else {
                break;
            };
            match work.try_send(due.job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    // Workers are busy: look again shortly, never block.
                    sequence += 1;
                    heap.push(Reverse(Due {
                        at: now + Duration::from_millis(20),
                        sequence,
                        job,
                    }));
                    break;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        depth.store(heap.len(), Ordering::Relaxed);
    }
}
