//! The deadline an SMTP transport is held to, shared between the worker
//! thread that runs lettre and the pool's supervisor that watches it.
//!
//! `MAILROOM_SMTP_TIMEOUT_MS` bounds each phase: the connect (TCP,
//! greeting, EHLO, STARTTLS, AUTH) and each transaction (MAIL … the reply
//! to the final dot). The transport moves the deadline forward as a phase
//! starts (an atomic store, no wake-up) and clears it when it goes idle.
//! lettre's timeouts are per read, so a relay that trickles a byte now and
//! then can hold a read for ever; the supervisor (`pool`) sees the deadline
//! pass, gives the worker thread up and starts a replacement. The abandoned
//! thread starts nothing new on its connection and ends when a per-read
//! timeout or the relay ends its read.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::classify::DeliveryError;

/// At most this many abandoned transports may still wait on a relay;
/// beyond it no new connection is opened (the relay is not answering, and
/// each would hold a thread and a socket).
pub const MAX_ABANDONED: usize = 64;

/// No phase is running.
const IDLE: u64 = u64::MAX;

/// The deadline of the current phase of one transport.
#[derive(Debug)]
pub struct Deadline {
    base: Instant,
    /// Nanoseconds after `base`, or [`IDLE`].
    at: AtomicU64,
    timeout: Duration,
    abandoned: AtomicBool,
    /// The message a connection is being opened for (connect, TLS, EHLO,
    /// AUTH), until it is open: a timeout fails that message's attempt
    /// before any transaction, and only that one's (the worker may hold
    /// another message whose outcome is not recorded yet).
    connecting: Mutex<Option<String>>,
    /// Abandoned transports of the same factory still alive.
    lingering: Arc<AtomicUsize>,
    /// `host:port`, for the error.
    endpoint: String,
}

impl Deadline {
    pub(super) fn new(timeout: Duration, lingering: Arc<AtomicUsize>, endpoint: String) -> Self {
        Deadline {
            base: Instant::now(),
            at: AtomicU64::new(IDLE),
            timeout,
            abandoned: AtomicBool::new(false),
            connecting: Mutex::new(None),
            lingering,
            endpoint,
        }
    }

    /// Notes for which message a connection is being opened, `None` once
    /// one is open (see [`Deadline::timeout_error_for`]).
    pub(super) fn set_connecting(&self, message: Option<&str>) {
        *self
            .connecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = message.map(str::to_string);
    }

    fn store(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        self.at
            .store(u64::try_from(nanos).unwrap_or(IDLE - 1), Ordering::SeqCst);
    }

    /// A new phase starts now: it has `timeout` from here.
    pub(super) fn start_phase(&self) {
        self.store(Instant::now() + self.timeout);
    }

    /// A phase that started at `started` (a transaction whose commands
    /// went out earlier, together with another one's body).
    pub(super) fn phase_started_at(&self, started: Instant) {
        self.store(started + self.timeout);
    }

    /// Nothing is running: no deadline.
    pub(super) fn idle(&self) {
        self.at.store(IDLE, Ordering::SeqCst);
    }

    /// When the current phase must be over; `None` while idle.
    pub fn due(&self) -> Option<Instant> {
        match self.at.load(Ordering::SeqCst) {
            IDLE => None,
            nanos => Some(self.base + Duration::from_nanos(nanos)),
        }
    }

    /// Time left in the current phase (a whole phase while idle).
    pub(super) fn remaining(&self) -> Duration {
        self.due().map_or(self.timeout, |due| {
            due.saturating_duration_since(Instant::now())
        })
    }

    /// The length of a phase (`MAILROOM_SMTP_TIMEOUT_MS`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Gives the transport up: it starts nothing more. Returns how many
    /// abandoned transports of its factory are now alive.
    pub fn abandon(&self) -> usize {
        if self.abandoned.swap(true, Ordering::SeqCst) {
            return self.lingering.load(Ordering::SeqCst);
        }
        self.lingering.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// True once given up.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// The abandoned transport is gone (its thread ends).
    pub(super) fn release(&self) {
        if self.is_abandoned() {
            let _ = self
                .lingering
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }

    /// Abandoned transports of this factory still alive.
    pub(super) fn lingering(&self) -> usize {
        self.lingering.load(Ordering::SeqCst)
    }

    /// The counter of abandoned transports, for another transport of the
    /// same factory.
    pub(super) fn lingering_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.lingering)
    }

    /// The failure of an attempt given up at this deadline.
    fn timeout_error(&self) -> DeliveryError {
        DeliveryError::transient(
            format!(
                "timed out: {} did not finish within {} ms (MAILROOM_SMTP_TIMEOUT_MS); connection abandoned",
                self.endpoint,
                self.timeout.as_millis()
            ),
            true,
        )
    }

    /// The failure of message `id`'s attempt given up at this deadline:
    /// one before any transaction when the connection was being opened for
    /// it (a relay that does not greet or stalls in TLS or AUTH is
    /// unreachable, and uses up no attempts).
    pub fn timeout_error_for(&self, id: &str) -> DeliveryError {
        let connecting = self
            .connecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_deref()
            == Some(id);
        let error = self.timeout_error();
        if connecting {
            error.before_transaction()
        } else {
            error
        }
    }

    /// The endpoint, for logs.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_abandoning() {
        let lingering = Arc::new(AtomicUsize::new(0));
        let deadline = Deadline::new(
            Duration::from_secs(5),
            Arc::clone(&lingering),
            "relay:25".into(),
        );
        assert!(deadline.due().is_none());
        deadline.start_phase();
        let due = deadline.due().unwrap();
        assert!(due > Instant::now() + Duration::from_secs(4));
        let earlier = Instant::now() - Duration::from_secs(10);
        deadline.phase_started_at(earlier);
        assert!(deadline.due().unwrap() < Instant::now());
        assert_eq!(deadline.remaining(), Duration::ZERO);
        deadline.idle();
        assert_eq!(deadline.remaining(), Duration::from_secs(5));
        assert_eq!(deadline.abandon(), 1);
        assert_eq!(deadline.abandon(), 1, "counted once");
        deadline.release();
        assert_eq!(lingering.load(Ordering::SeqCst), 0);
        let error = deadline.timeout_error().to_string();
        assert!(
            error.contains("timed out") && error.contains("5000 ms"),
            "{error}"
        );
    }
}
