//! Whether the relay works, as the workers see it: `/readyz` says
//! "not ready" after a few consecutive failures to reach or log in to it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// Consecutive relay failures (unreachable, TLS, AUTH) after which the
/// relay counts as failing.
const FAILURES_NOT_READY: u32 = 3;

/// The relay's recent record.
#[derive(Default)]
pub(crate) struct RelayHealth {
    failures: AtomicU32,
    last_error: Mutex<Option<(SystemTime, String)>>,
}

impl RelayHealth {
    /// An attempt reached the relay and got an answer.
    pub(crate) fn ok(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The relay could not be used (connect, TLS, AUTH).
    pub(crate) fn failed(&self, detail: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some((SystemTime::now(), detail.to_string()));
    }

    /// Why the relay counts as failing, while it does.
    pub(crate) fn failing(&self) -> Option<String> {
        if self.failures.load(Ordering::Relaxed) < FAILURES_NOT_READY {
            return None;
        }
        Some(
            self.last_error()
                .map(|(_, detail)| detail)
                .unwrap_or_default(),
        )
    }

    /// The last failure to use the relay, and when (kept after it recovers).
    pub(crate) fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
