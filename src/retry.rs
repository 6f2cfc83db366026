//! The retry scheduler: one thread holding messages that failed
//! transiently in a min-heap of due times, re-sending each into the work
//! channel when due.
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

use crate::message::random_u64;
use crate::pool::Job;

/// How long a message waits before its next attempt, after `attempts`
/// attempts: `base * 2^(attempts-1)`, capped at `max`, with equal jitter (a
/// random delay between half and all of that).
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(40);
    let full = base.saturating_mul(1u32 << exponent.min(31)).min(max);
    let full = if exponent > 31 { max } else { full };
    let half = full / 2;
    let spread = (full - half).as_millis() as u64;
    half + Duration::from_millis(if spread == 0 {
        0
    } else {
        random_u64() % (spread + 1)
    })
}

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

/// Handle to the scheduler thread.
pub(crate) struct RetryScheduler {
    commands: Sender<Command>,
}

/// A message could not be scheduled because the scheduler has stopped.
pub(crate) struct Stopped(pub Job);

impl RetryScheduler {
    /// Starts the thread. `depth` tracks how many messages it holds.
    pub(crate) fn start(
        work: Sender<Job>,
        depth: Arc<AtomicUsize>,
    ) -> std::io::Result<(RetryScheduler, JoinHandle<()>)> {
        // Unbounded on purpose: what it holds is bounded by the queue
        // capacity, and a worker must never block handing a message over.
        let (commands, receiver) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("retry".into())
            .spawn(move || run(receiver, work, depth))?;
        Ok((RetryScheduler { commands }, handle))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_equal_jitter_and_cap() {
        let base = Duration::from_millis(1000);
        let max = Duration::from_millis(5000);
        for _ in 0..200 {
            let first = backoff(base, max, 1);
            assert!(
                first >= Duration::from_millis(500) && first <= base,
                "{first:?}"
            );
            let third = backoff(base, max, 3);
            assert!(
                third >= Duration::from_millis(2000) && third <= Duration::from_millis(4000),
                "{third:?}"
            );
            let capped = backoff(base, max, 30);
            assert!(
                capped >= Duration::from_millis(2500) && capped <= max,
                "{capped:?}"
            );
            assert!(backoff(base, max, 1000) <= max);
        }
    }
}
