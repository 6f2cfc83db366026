//! What `GET /api/mail/{id}` answers: one entry per message, live ones kept
//! until they finish, finished ones kept for `MAILROOM_STATUS_RETENTION`
//! entries (oldest forgotten first), so memory stays bounded however many
//! messages pass through.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is delivering it.
    Sending,
    /// Failed transiently; waiting for its next attempt.
    Retrying,
    /// The relay accepted it.
    Sent,
    /// Given up: permanent refusal or attempts exhausted.
    Failed,
}

impl State {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sending => "sending",
            State::Retrying => "retrying",
            State::Sent => "sent",
            State::Failed => "failed",
        }
    }

    /// Sent or failed: nothing more will happen to it.
    pub fn is_finished(self) -> bool {
        matches!(self, State::Sent | State::Failed)
    }
}

/// A message's status as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStatus {
    /// The message id.
    pub id: String,
    /// Current state.
    pub state: State,
    /// Attempts started, the current one included.
    pub attempts: u32,
    /// The last failure (SMTP reply or connection error), if any.
    pub last_error: Option<String>,
    /// When it was accepted.
    pub created_at: SystemTime,
    /// When the status last changed.
    pub updated_at: SystemTime,
    /// When the next attempt is due (state `retrying`).
    pub next_attempt_at: Option<SystemTime>,
}

impl MessageStatus {
    /// The `data` object of the status answer, times in RFC 3339 UTC.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "status": self.state.as_str(),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "next_attempt_at": self.next_attempt_at.map(rfc3339),
        })
    }
}

struct Entry {
    status: MessageStatus,
    idempotency_key: Option<String>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Finished ids, oldest first; the front is forgotten beyond retention.
    finished: VecDeque<String>,
    idempotency: HashMap<String, KeyBinding>,
}

/// The message an idempotency key belongs to.
struct KeyBinding {
    id: String,
    /// False while the request that claimed the key is still being
    /// accepted: it may yet be refused, and then the key is free again.
    settled: bool,
}

/// Outcome of [`StatusStore::claim_idempotency_key`].
#[derive(Debug, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key is new and now belongs to the given id, until
    /// [`StatusStore::settle_idempotency_key`] or
    /// [`StatusStore::release_idempotency_key`] says how its request ended.
    Claimed,
    /// The key was used before, by this id.
    Existing(String),
}

/// All statuses, behind one lock (each operation is a few map lookups).
pub struct StatusStore {
    inner: Mutex<Inner>,
    /// Signalled when a claimed idempotency key is settled or released.
    keys_decided: Condvar,
    retention: usize,
}

impl StatusStore {
    /// An empty store that keeps `retention` finished entries.
    pub fn new(retention: usize) -> StatusStore {
        StatusStore {
            inner: Mutex::new(Inner::default()),
            keys_decided: Condvar::new(),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a status (new or replacing the old one). Finished entries
    /// join the retention queue.
    pub fn put(&self, status: MessageStatus) {
        let mut inner = self.lock();
        let finished = status.state.is_finished();
        let id = status.id.clone();
        let was_finished = match inner.entries.get_mut(&id) {
            Some(entry) => {
                let was = entry.status.state.is_finished();
                entry.status = status;
                was
            }
            None => {
                inner.entries.insert(
                    id.clone(),
                    Entry {
                        status,
                        idempotency_key: None,
                    },
                );
                false
            }
        };
        if finished && !was_finished {
            self.retire(&mut inner, id);
        }
    }

    /// Changes a live entry in place; does nothing for unknown ids. Called
    /// twice per delivery by every worker, so it takes the lock once and
    /// copies nothing.
    pub fn update(&self, id: &str, change: impl FnOnce(&mut MessageStatus)) {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(id) else {
            return;
        };
        let was_finished = entry.status.state.is_finished();
        change(&mut entry.status);
        entry.status.updated_at = SystemTime::now();
        if entry.status.state.is_finished() && !was_finished {
            self.retire(&mut inner, id.to_string());
        }
    }

    /// A finished entry joins the retention queue; the oldest beyond
    /// retention are forgotten.
    fn retire(&self, inner: &mut Inner, id: String) {
        inner.finished.push_back(id);
        while inner.finished.len() > self.retention {
            let Some(oldest) = inner.finished.pop_front() else {
                break;
            };
            if let Some(entry) = inner.entries.remove(&oldest) {
                if let Some(key) = entry.idempotency_key {
                    inner.idempotency.remove(&key);
                }
            }
        }
    }

    /// The status of a message, if known.
    pub fn get(&self, id: &str) -> Option<MessageStatus> {
        self.lock()
            .entries
            .get(id)
            .map(|entry| entry.status.clone())
    }

    /// Binds an idempotency key to `id` unless the key is already bound.
    /// While another request holding the key is still being accepted, waits
    /// for its outcome, so a repeat never answers with the id of a request
    /// that is then refused.
    pub fn claim_idempotency_key(&self, key: &str, id: &str) -> KeyClaim {
        let mut inner = self.lock();
        loop {
            match inner.idempotency.get(key) {
                Some(binding) if binding.settled => return KeyClaim::Existing(binding.id.clone()),
                Some(_) => {
                    inner = self
                        .keys_decided
                        .wait(inner)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                None => break,
            }
        }
        inner.idempotency.insert(
            key.to_string(),
            KeyBinding {
                id: id.to_string(),
                settled: false,
            },
        );
        if let Some(entry) = inner.entries.get_mut(id) {
            entry.idempotency_key = Some(key.to_string());
        }
        KeyClaim::Claimed
    }

    /// The request that claimed `key` was accepted as `id` (or recovered
    /// from the spool): repeats now get `id`, and the key is forgotten with
    /// its entry.
    pub fn settle_idempotency_key(&self, key: &str, id: &str) {
        let mut inner = self.lock();
        if let Some(binding) = inner.idempotency.get_mut(key) {
            binding.settled = true;
        }
        if let Some(entry) = inner.entries.get_mut(id) {
            entry.idempotency_key = Some(key.to_string());
        }
        drop(inner);
        self.keys_decided.notify_all();
    }

    /// Binds a key recovered from the spool to its message, settled.
    pub fn restore_idempotency_key(&self, key: &str, id: &str) {
        let mut inner = self.lock();
        inner
            .idempotency
            .entry(key.to_string())
            .or_insert_with(|| KeyBinding {
                id: id.to_string(),
                settled: true,
            });
        if let Some(entry) = inner.entries.get_mut(id) {
            entry.idempotency_key = Some(key.to_string());
        }
    }

    /// Releases a key whose request was not accepted after all.
    pub fn release_idempotency_key(&self, key: &str) {
        self.lock().idempotency.remove(key);
        self.keys_decided.notify_all();
    }

    /// Forgets a message entirely (a request refused after its entry was made).
    pub fn remove(&self, id: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.remove(id) {
            if let Some(key) = entry.idempotency_key {
                inner.idempotency.remove(&key);
            }
        }
    }

    /// How many entries are held (live and finished).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2026-11-29T10:28:50.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs() as i64;
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn status(id: &str, state: State) -> MessageStatus {
        MessageStatus {
            id: id.into(),
            state,
            attempts: 0,
            last_error: None,
            created_at: UNIX_EPOCH,
            updated_at: UNIX_EPOCH,
            next_attempt_at: None,
        }
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let time = UNIX_EPOCH + Duration::from_millis(1_795_948_130_123);
        assert_eq!(rfc3339(time), "2026-11-29T10:28:50.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn finished_entries_are_bounded_live_ones_kept() {
        let store = StatusStore::new(2);
        store.put(status("live", State::Queued));
        for index in 0..5 {
            store.put(status(&format!("done{index}"), State::Sent));
        }
        assert!(store.get("live").is_some());
        assert!(store.get("done0").is_none());
        assert!(store.get("done4").is_some());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn updates_change_in_place_and_finished_ones_are_bounded() {
        let store = StatusStore::new(1);
        store.put(status("a", State::Queued));
        store.put(status("b", State::Queued));
        store.update("a", |status| {
            status.state = State::Sending;
            status.attempts = 1;
        });
        let a = store.get("a").unwrap();
        assert_eq!((a.state, a.attempts), (State::Sending, 1));
        assert!(a.updated_at > UNIX_EPOCH);
        store.update("a", |status| status.state = State::Sent);
        store.update("a", |status| status.last_error = Some("late".into()));
        store.update("b", |status| status.state = State::Failed);
        assert!(
            store.get("a").is_none(),
            "retention 1 keeps the newest finished"
        );
        assert_eq!(store.get("b").unwrap().state, State::Failed);
        store.update("unknown", |status| status.state = State::Sent);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn idempotency_keys_follow_their_entry() {
        let store = StatusStore::new(1);
        store.put(status("a", State::Queued));
        assert_eq!(store.claim_idempotency_key("k", "a"), KeyClaim::Claimed);
        store.settle_idempotency_key("k", "a");
        assert_eq!(
            store.claim_idempotency_key("k", "b"),
            KeyClaim::Existing("a".into())
        );
        store.put(status("a", State::Sent));
        store.put(status("b", State::Sent));
        assert_eq!(store.claim_idempotency_key("k", "c"), KeyClaim::Claimed);
    }

    /// A repeat arriving while the first request is still being accepted
    /// gets that request's outcome: its id once accepted, the key itself
    /// if it was refused. (Either order of the two threads must give this.)
    #[test]
    fn a_repeat_waits_for_the_first_request_outcome() {
        for accepted in [true, false] {
            let store = std::sync::Arc::new(StatusStore::new(10));
            assert_eq!(store.claim_idempotency_key("k", "a"), KeyClaim::Claimed);
            let repeat = {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || store.claim_idempotency_key("k", "b"))
            };
            if accepted {
                store.put(status("a", State::Queued));
                store.settle_idempotency_key("k", "a");
            } else {
                store.release_idempotency_key("k");
            }
            let expected = if accepted {
                KeyClaim::Existing("a".into())
            } else {
                KeyClaim::Claimed
            };
            assert_eq!(repeat.join().unwrap(), expected);
        }
    }
}
