//! What one connection is doing, shared by its reader (the connection's
//! thread), the bodies it hands out and the writers of its answers: which
//! deadline applies to the next read, how many answers are pending, and
//! whether the connection is to be closed.

use std::io::{Error as IoError, ErrorKind, Result as IoResult};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::connection::Connection;
use crate::Limits;

/// A socket timeout is changed only when it would be off by more than this.
const TIMEOUT_SLACK: Duration = Duration::from_millis(20);

/// What the connection's reads are for.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the first byte of a request, since then.
    Idle { since: Instant },
    /// Reading a request head, until the deadline.
    Head { deadline: Instant },
    /// A request body; the deadline is set by its first read.
    Body { deadline: Option<Instant> },
    /// Skipping an unread body or draining before closing, until then.
    Draining { deadline: Instant },
}

struct Inner {
    phase: Phase,
    /// Requests handed out whose answer is not finished.
    outstanding: usize,
    /// When the last answer was finished.
    last_answer: Instant,
    /// The socket's read timeout as last set.
    socket_timeout: Option<Duration>,
    /// No more requests are read: an answer said `Connection: close`, or
    /// the connection cannot be read in step any more.
    closing: bool,
    /// Bytes of an unread body to skip before the next request head.
    skip: u64,
}

/// See the module documentation.
pub(crate) struct ConnectionState {
    pub(crate) limits: Arc<Limits>,
    /// The socket, to change its read timeout and shut it down (absent for
    /// TLS streams, whose socket is inside the TLS session).
    socket: Option<Arc<Connection>>,
    inner: Mutex<Inner>,
    /// Signalled when an answer is finished.
    answered: Condvar,
}

impl ConnectionState {
    pub(crate) fn new(limits: Arc<Limits>, socket: Option<Arc<Connection>>) -> ConnectionState {
        let now = Instant::now();
        ConnectionState {
            inner: Mutex::new(Inner {
                phase: Phase::Idle { since: now },
                outstanding: 0,
                last_answer: now,
                socket_timeout: Some(limits.io_timeout),
                closing: false,
                skip: 0,
            }),
            limits,
            socket,
            answered: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reader now waits for the next request.
    pub(crate) fn start_idle(&self) {
        self.lock().phase = Phase::Idle {
            since: Instant::now(),
        };
    }

    /// True while no byte of the next request has arrived.
    pub(crate) fn idle(&self) -> bool {
        matches!(self.lock().phase, Phase::Idle { .. })
    }

    /// A request body is about to be read (its deadline starts at the
    /// first read).
    pub(crate) fn start_body(&self) {
        self.lock().phase = Phase::Body { deadline: None };
    }

    /// Reads from now on drain the connection, for at most the discard
    /// timeout.
    pub(crate) fn start_draining(&self) {
        self.lock().phase = Phase::Draining {
            deadline: Instant::now() + self.limits.discard_timeout,
        };
    }

    /// A request was handed out; its answer is pending.
    pub(crate) fn request_started(&self) {
        self.lock().outstanding += 1;
    }

    /// An answer is finished (written, or given up).
    pub(crate) fn answer_finished(&self) {
        let mut inner = self.lock();
        inner.outstanding = inner.outstanding.saturating_sub(1);
        inner.last_answer = Instant::now();
        drop(inner);
        self.answered.notify_all();
    }

    /// Waits until fewer than `max_pipelined` answers are pending (or the
    /// connection is closing).
    pub(crate) fn wait_for_room(&self) {
        let mut inner = self.lock();
        while inner.outstanding >= self.limits.max_pipelined.max(1) && !inner.closing {
            inner = self
                .answered
                .wait(inner)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// No more requests are to be read; with `shut_write`, the client is
    /// told at once (end of file after the answers written so far).
    pub(crate) fn close(&self, shut_write: bool) {
        self.lock().closing = true;
        self.answered.notify_all();
        if shut_write {
            if let Some(socket) = &self.socket {
                let _ = socket.shutdown(Shutdown::Write);
            }
        }
    }

    /// Stops the connection in both directions at once (its reads and
    /// writes fail or end).
    pub(crate) fn abort(&self) {
        self.lock().closing = true;
        self.answered.notify_all();
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn closing(&self) -> bool {
        self.lock().closing
    }

    /// The rest of a body was left unread: `remaining` bytes are skipped
    /// before the next head when that is within the limits, else the
    /// connection closes. True when it is kept.
    pub(crate) fn leave_unread(&self, remaining: u64) -> bool {
        let mut inner = self.lock();
        if remaining <= self.limits.max_discard_bytes && !inner.closing {
            inner.skip += remaining;
            true
        } else {
            inner.closing = true;
            false
        }
    }

    /// Bytes to skip before the next head (and forgets them).
    pub(crate) fn take_skip(&self) -> u64 {
        std::mem::take(&mut self.lock().skip)
    }

    /// Before each read from the socket: fails with `TimedOut` when the
    /// phase's deadline has passed, else makes the socket's timeout end
    /// the read by the deadline.
    pub(crate) fn before_read(&self) -> IoResult<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        let deadline = match inner.phase {
            Phase::Idle { since } if inner.closing => {
                Some(since.max(inner.last_answer) + self.limits.discard_timeout)
            }
            // An answer is being prepared: the client is right to wait.
            Phase::Idle { .. } if inner.outstanding > 0 => None,
            Phase::Idle { since } => Some(since.max(inner.last_answer) + self.limits.idle_timeout),
            Phase::Head { deadline } | Phase::Draining { deadline } => Some(deadline),
            Phase::Body {
                deadline: Some(deadline),
            } => Some(deadline),
            Phase::Body { deadline: None } => {
                let deadline = now + self.limits.body_timeout;
                inner.phase = Phase::Body {
                    deadline: Some(deadline),
                };
                Some(deadline)
            }
        };
        let wanted = match deadline {
            Some(deadline) if deadline <= now => {
                return Err(IoError::new(ErrorKind::TimedOut, "deadline passed"))
            }
            Some(deadline) => (deadline - now).min(self.limits.io_timeout),
            None => self.limits.io_timeout,
        }
        .max(Duration::from_millis(1));
        let off = inner
            .socket_timeout
            .is_none_or(|set| set > wanted + TIMEOUT_SLACK || set + TIMEOUT_SLACK < wanted);
        if off {
            if let Some(socket) = &self.socket {
                if socket.set_read_timeout(Some(wanted)).is_ok() {
                    inner.socket_timeout = Some(wanted);
                }
            }
        }
        Ok(())
    }

    /// After a read returned `n` bytes: the first byte of a request starts
    /// its head's deadline.
    pub(crate) fn after_read(&self, n: usize) {
        let mut inner = self.lock();
        if n > 0 {
            if let Phase::Idle { .. } = inner.phase {
                inner.phase = Phase::Head {
                    deadline: Instant::now() + self.limits.head_timeout,
                };
            }
        }
    }

    /// After a read timed out: true when waiting goes on (an idle
    /// connection before its deadline, e.g. while its answer is prepared).
    pub(crate) fn keep_waiting(&self) -> bool {
        matches!(self.lock().phase, Phase::Idle { .. })
    }
}
