//! The schedule: one thread holding messages until they are due (retries
//! after a transient failure, sends scheduled with `send_at`) in a min-heap
//! of due times, handing each to the work channel when due.
//!
//! It never blocks on the work channel (`try_send`): the original design
//! deadlocked when workers blocked re-enqueueing into a queue only they
//! drained. A full channel just keeps the message in the heap a little longer.
//!
//! A scheduled send waiting on disk costs the heap only its id: its
//! content is read back when it is due (see [`Waiting::OnDisk`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::job::Job;

/// What the schedule holds.
pub(crate) enum Waiting {
    /// A message waiting for its next attempt.
    Retry(Job),
    /// A scheduled send held in memory (memory mode).
    InMemory(Job),
    /// A scheduled send whose content is in the spool, by id.
    OnDisk(String),
}

impl Waiting {
    /// The message's id.
    pub(crate) fn id(&self) -> &str {
        match self {
            Waiting::Retry(job) | Waiting::InMemory(job) => job.id(),
            Waiting::OnDisk(id) => id,
        }
    }
}

/// Turns a scheduled send that is due into a job (`None`: it was cancelled
/// meanwhile, or cannot be read).
pub(crate) type Activate = Box<dyn Fn(Waiting) -> Option<Job> + Send>;

enum Command {
    Schedule(Instant, Waiting),
    /// Stop; with `release_retries`, hand every held retry to the workers
    /// first (memory mode drains on shutdown instead of keeping them).
    /// Scheduled sends are never released before their time.
    Stop {
        release_retries: bool,
    },
}

struct Due {
    at: Instant,
    sequence: u64,
    waiting: Waiting,
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

/// Something could not be scheduled because the schedule has stopped.
pub(crate) struct Stopped(pub Waiting);

impl Schedule {
    /// Starts the thread; `activate` is called for each scheduled send
    /// when it is due.
    pub(crate) fn start(
        work: Sender<Job>,
        activate: Activate,
    ) -> std::io::Result<(Schedule, JoinHandle<()>)> {
        // Unbounded on purpose: what it holds is bounded by the capacities,
        // and a worker must never block handing a message over.
        let (commands, receiver) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("schedule".into())
            .spawn(move || run(receiver, work, activate))?;
        Ok((Schedule { commands }, handle))
    }

    /// Holds `waiting` until `at`, then hands it to the workers.
    pub(crate) fn schedule(&self, at: Instant, waiting: Waiting) -> Result<(), Stopped> {
        self.commands
            .send(Command::Schedule(at, waiting))
            .map_err(|error| match error.0 {
                Command::Schedule(_, waiting) => Stopped(waiting),
                Command::Stop { .. } => unreachable!("only Schedule is sent here"),
            })
    }

    /// Asks the thread to stop (join its handle to wait for it).
    pub(crate) fn stop(&self, release_retries: bool) {
        let _ = self.commands.send(Command::Stop { release_retries });
    }
}

fn run(commands: Receiver<Command>, work: Sender<Job>, activate: Activate) {
    let mut heap: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    let mut sequence = 0u64;
    loop {
        let command = match heap.peek() {
            Some(Reverse(next)) => commands.recv_deadline(next.at),
            None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match command {
            Ok(Command::Schedule(at, waiting)) => {
                sequence += 1;
                heap.push(Reverse(Due {
                    at,
                    sequence,
                    waiting,
                }));
            }
            Ok(Command::Stop { release_retries }) => {
                if release_retries {
                    for Reverse(due) in heap.drain() {
                        if let Waiting::Retry(job) = due.waiting {
                            let _ = work.try_send(job);
                        }
                    }
                }
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
            let job = match due.waiting {
                Waiting::Retry(job) => job,
                scheduled => match activate(scheduled) {
                    Some(job) => job,
                    None => continue,
                },
            };
            match work.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    // Workers are busy: look again shortly, never block.
                    sequence += 1;
                    heap.push(Reverse(Due {
                        at: now + Duration::from_millis(20),
                        sequence,
                        waiting: Waiting::Retry(job),
                    }));
                    break;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OutgoingMessage;
    use std::sync::Arc;

    fn job(id: &str) -> Job {
        Job::new(
            Arc::new(OutgoingMessage {
                id: id.into(),
                envelope_from: "a@example.com".into(),
                recipients: vec!["b@example.org".into()],
                content: String::new(),
            }),
            vec!["b@example.org".into()],
            0,
        )
    }

    #[test]
    fn hands_jobs_over_in_due_order_and_activates_scheduled_ones() {
        let (work, jobs) = crossbeam_channel::bounded(10);
        let activate: Activate = Box::new(|waiting| match waiting {
            Waiting::OnDisk(id) if id == "cancelled" => None,
            Waiting::OnDisk(id) => Some(job(&id)),
            Waiting::InMemory(job) | Waiting::Retry(job) => Some(job),
        });
        let (schedule, thread) = Schedule::start(work, activate).unwrap();
        let now = Instant::now();
        let _ = schedule.schedule(
            now + Duration::from_millis(60),
            Waiting::Retry(job("third")),
        );
        let _ = schedule.schedule(
            now + Duration::from_millis(40),
            Waiting::OnDisk("cancelled".into()),
        );
        let _ = schedule.schedule(
            now + Duration::from_millis(20),
            Waiting::OnDisk("second".into()),
        );
        let _ = schedule.schedule(now, Waiting::InMemory(job("first")));
        let order: Vec<String> = (0..3)
            .map(|_| {
                jobs.recv_timeout(Duration::from_secs(5))
                    .unwrap()
                    .id()
                    .to_string()
            })
            .collect();
        assert_eq!(order, ["first", "second", "third"]);
        assert!(Instant::now() >= now + Duration::from_millis(60));
        schedule.stop(false);
        thread.join().unwrap();
    }

    #[test]
    fn a_stop_releases_retries_but_never_scheduled_sends() {
        let (work, jobs) = crossbeam_channel::bounded(10);
        let (schedule, thread) =
            Schedule::start(work, Box::new(|_| panic!("nothing is due"))).unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let _ = schedule.schedule(later, Waiting::Retry(job("retry")));
        let _ = schedule.schedule(later, Waiting::InMemory(job("scheduled")));
        schedule.stop(true);
        thread.join().unwrap();
        let released: Vec<String> = jobs.try_iter().map(|job| job.id().to_string()).collect();
        assert_eq!(released, ["retry"]);
    }
}
