//! Every message's status in memory, with the indexes the list needs
//! (by state, tag and recipient, each ordered newest first) and the
//! idempotency keys. Unfinished messages are kept until they finish;
//! finished ones for `retention` entries (oldest forgotten first), so
//! memory stays bounded however many messages pass through.
//!
//! Ids start with their creation time in milliseconds (12 hex digits), so
//! their order is the list's order; the indexes hold them as `u128`s.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use crate::message::OutgoingMessage;
use crate::status::State;
use crate::store::record::StatusRecord;
use crate::time::to_millis;

/// The index key of a message id: its 28 hex digits as a number.
pub(crate) fn id_key(id: &str) -> Option<u128> {
    if id.len() != 28 {
        return None;
    }
    // By hand: lowercase only, and 112 bits cannot overflow (the generic
    // `from_str_radix` cost ~20x as much, on every status change).
    id.bytes().try_fold(0u128, |key, byte| {
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        Some(key << 4 | u128::from(digit))
    })
}

/// Hashes an [`id_key`] with one multiplication: its last 16 hex digits
/// are 64 random bits we drew ourselves (clients look ids up but never
/// choose the ones stored), so no keyed hash is needed against crafted
/// collisions, and SipHash cost ~10x as much on a path every status change
/// takes. The multiplication spreads even sequential keys (tests) into
/// the high bits the table also uses.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u128 keys; mixed in anyway for completeness.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = ((key as u64) ^ ((key >> 64) as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The smallest key of a message created at `time` or later.
fn key_from(time: SystemTime) -> u128 {
    u128::from(to_millis(time)) << 64
}

/// What to list (each filter optional) and how much.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListQuery {
    /// Only messages in this state.
    pub state: Option<State>,
    /// Only messages with this envelope recipient (case-insensitive).
    pub recipient: Option<String>,
    /// Only messages with this tag.
    pub tag: Option<String>,
    /// Only messages created at this time or later.
    pub since: Option<SystemTime>,
    /// Only messages created before or at this time.
    pub until: Option<SystemTime>,
    /// At most this many (1 to [`ListQuery::MAX_LIMIT`]).
    pub limit: usize,
    /// Continue after this message (a previous page's `next_cursor`).
    pub cursor: Option<String>,
}

impl ListQuery {
    /// The default page size.
    pub const DEFAULT_LIMIT: usize = 50;
    /// The largest page size.
    pub const MAX_LIMIT: usize = 500;

    /// Every message, newest first, a default page at a time.
    pub fn new() -> ListQuery {
        ListQuery {
            limit: ListQuery::DEFAULT_LIMIT,
            ..ListQuery::default()
        }
    }
}

/// One page of a list, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page {
    pub records: Vec<StatusRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// How a claim of an idempotency key went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyClaim {
    /// The key is new and now belongs to the caller's message, until
    /// [`Index::settle_key`] or [`Index::release_key`].
    Claimed,
    /// The key belongs to this message, whose request was the same.
    Existing(String),
    /// The key belongs to a message whose request was different.
    Conflict,
}

struct KeyBinding {
    id: String,
    fingerprint: Option<String>,
    /// False while the request that claimed the key is being accepted: it
    /// may yet be refused, and then the key is free again.
    settled: bool,
}

struct Entry {
    record: StatusRecord,
    /// A failed message's content in memory mode, for a retry by hand.
    dead_letter: Option<Arc<OutgoingMessage>>,
    /// Its place in the retirement queue, when finished.
    retired: Option<u64>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: a table has up to twice the slots it fills, and an empty
    /// slot then costs a pointer, not a whole status (~80 bytes less per
    /// message at 100,000).
    entries: HashMap<u128, Box<Entry>, BuildHasherDefault<IdHasher>>,
    all: BTreeSet<u128>,
    by_state: HashMap<State, BTreeSet<u128>>,
    by_tag: HashMap<String, BTreeSet<u128>>,
    by_recipient: HashMap<String, BTreeSet<u128>>,
    /// Finished messages, oldest first, with their retirement number.
    finished: VecDeque<(u64, u128)>,
    next_retirement: u64,
    keys: HashMap<String, KeyBinding>,
    /// Threads in [`Index::wait_finished`]: a finish wakes them only when
    /// there are some (a condvar's notify is a system call even without
    /// waiters, and every delivery finishes a message).
    finish_waiters: usize,
}

/// All statuses, behind one lock (each operation is a few map lookups).
pub(crate) struct Index {
    inner: Mutex<Inner>,
    /// Signalled when a claimed key is settled or released.
    keys_decided: Condvar,
    /// Signalled when a message finishes.
    finished: Condvar,
    retention: usize,
}

impl Inner {
    fn link(&mut self, key: u128, record: &StatusRecord) {
        self.all.insert(key);
        self.by_state.entry(record.state()).or_default().insert(key);
        for tag in &record.tags {
            self.by_tag.entry(tag.clone()).or_default().insert(key);
        }
        for recipient in record.recipients.iter() {
            self.by_recipient
                .entry(recipient.to_lowercase())
                .or_default()
                .insert(key);
        }
    }

    fn unlink(&mut self, key: u128, record: &StatusRecord) {
        self.all.remove(&key);
        remove_from(&mut self.by_state, &record.state(), key);
        for tag in &record.tags {
            remove_from(&mut self.by_tag, tag, key);
        }
        for recipient in record.recipients.iter() {
            remove_from(&mut self.by_recipient, &recipient.to_lowercase(), key);
        }
    }

    /// Forgets a message: its entry, its index places and its key.
    fn forget(&mut self, key: u128) {
        if let Some(entry) = self.entries.remove(&key) {
            self.unlink(key, &entry.record);
            if let Some(idempotency) = &entry.record.idempotency_key {
                if self
                    .keys
                    .get(idempotency)
                    .is_some_and(|binding| binding.id == entry.record.id)
                {
                    self.keys.remove(idempotency);
                }
            }
        }
    }

    /// Called after an entry's state may have changed from `before`: moves
    /// it between the state indexes and into (or out of) the retirement
    /// queue. True when it has just finished.
    fn restate(&mut self, key: u128, before: State, retention: usize) -> bool {
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        let after = entry.record.state();
        if after == before {
            return false;
        }
        remove_from(&mut self.by_state, &before, key);
        self.by_state.entry(after).or_default().insert(key);
        self.retirement(key, before, after, retention)
    }

    /// Puts a message that has just finished into the retirement queue
    /// (and takes one that is live again out of it). True when it has
    /// just finished.
    fn retirement(&mut self, key: u128, before: State, after: State, retention: usize) -> bool {
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        if !after.is_finished() {
            entry.retired = None;
            return false;
        }
        if before.is_finished() && entry.retired.is_some() {
            return false;
        }
        let number = self.next_retirement;
        self.next_retirement += 1;
        entry.retired = Some(number);
        self.finished.push_back((number, key));
        self.retire(retention);
        true
    }

    /// Forgets the oldest finished messages beyond `retention`.
    fn retire(&mut self, retention: usize) {
        while self.finished.len() > retention {
            let Some((number, key)) = self.finished.pop_front() else {
                break;
            };
            // A message retried by hand and finished again has a newer number.
            let current = self
                .entries
                .get(&key)
                .is_some_and(|entry| entry.retired == Some(number));
            if current {
                self.forget(key);
            }
        }
    }
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, BTreeSet<u128>>, name: &K, key: u128) {
    if let Some(set) = map.get_mut(name) {
        set.remove(&key);
        if set.is_empty() {
            map.remove(name);
        }
    }
}

impl Index {
    /// An empty index that keeps `retention` finished messages.
    pub(crate) fn new(retention: usize) -> Index {
        Index {
            inner: Mutex::new(Inner::default()),
            keys_decided: Condvar::new(),
            finished: Condvar::new(),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a status, new or replacing the one with the same id.
    /// Returns how many events the replaced status had (0 for a new one),
    /// or `None` for an id that is not a message id.
    pub(crate) fn put(
        &self,
        record: StatusRecord,
        dead_letter: Option<Arc<OutgoingMessage>>,
    ) -> Option<u64> {
        let key = id_key(&record.id)?;
        // Declared before the guard, so the replaced status is dropped
        // after the lock is released: every worker's finish takes this lock.
        let replaced: (Option<StatusRecord>, Option<Arc<OutgoingMessage>>);
        let mut inner = self.lock();
        let after = record.state();
        let existing = inner.entries.get(&key).map(|entry| {
            let old = &entry.record;
            let same_places = old.tags == record.tags && old.recipients == record.recipients;
            (old.state(), old.events_total, same_places)
        });
        let (before, events_before) = match existing {
            Some((before, events_before, same_places)) => {
                if !same_places {
                    let old = inner.entries.get(&key).map(|entry| entry.record.clone());
                    if let Some(old) = old {
                        inner.unlink(key, &old);
                    }
                    inner.link(key, &record);
                } else if before != after {
                    remove_from(&mut inner.by_state, &before, key);
                    inner.by_state.entry(after).or_default().insert(key);
                }
                replaced = match inner.entries.get_mut(&key) {
                    Some(entry) => (
                        Some(std::mem::replace(&mut entry.record, record)),
                        std::mem::replace(&mut entry.dead_letter, dead_letter),
                    ),
                    None => (None, None),
                };
                (before, events_before)
            }
            None => {
                replaced = (None, None);
                inner.link(key, &record);
                inner.entries.insert(
                    key,
                    Box::new(Entry {
                        record,
                        dead_letter,
                        retired: None,
                    }),
                );
                // As if it had been live: a finished one joins the queue.
                (State::Queued, 0)
            }
        };
        if inner.retirement(key, before, after, self.retention) && inner.finish_waiters > 0 {
            self.finished.notify_all();
        }
        drop(inner);
        drop(replaced);
        Some(events_before)
    }

    /// Changes a message's status in place, when `allowed` accepts its
    /// current state; `Err` holds the current state otherwise (`None`: no
    /// such message). The update time is set; tags and recipients must not
    /// change.
    pub(crate) fn update<R>(
        &self,
        id: &str,
        allowed: impl FnOnce(State) -> bool,
        change: impl FnOnce(&mut StatusRecord) -> R,
    ) -> Result<R, Option<State>> {
        let key = id_key(id).ok_or(None)?;
        let now = to_millis(SystemTime::now());
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(&key) else {
            return Err(None);
        };
        let before = entry.record.state();
        if !allowed(before) {
            return Err(Some(before));
        }
        let result = change(&mut entry.record);
        entry.record.updated_at_ms = now;
        if inner.restate(key, before, self.retention) && inner.finish_waiters > 0 {
            self.finished.notify_all();
        }
        Ok(result)
    }

    /// A copy of a message's status.
    pub(crate) fn get(&self, id: &str) -> Option<StatusRecord> {
        let key = id_key(id)?;
        self.lock()
            .entries
            .get(&key)
            .map(|entry| entry.record.clone())
    }

    /// The content kept for a failed message in memory mode.
    pub(crate) fn dead_letter(&self, id: &str) -> Option<Arc<OutgoingMessage>> {
        let key = id_key(id)?;
        self.lock()
            .entries
            .get(&key)
            .and_then(|entry| entry.dead_letter.clone())
    }

    /// Waits until the message is finished, or `deadline`; its status then.
    pub(crate) fn wait_finished(&self, id: &str, deadline: Instant) -> Option<StatusRecord> {
        let key = id_key(id)?;
        let mut inner = self.lock();
        loop {
            let record = inner.entries.get(&key).map(|entry| entry.record.clone())?;
            let left = deadline.saturating_duration_since(Instant::now());
            if record.state().is_finished() || left.is_zero() {
                return Some(record);
            }
            inner.finish_waiters += 1;
            inner = self
                .finished
                .wait_timeout(inner, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            inner.finish_waiters -= 1;
        }
    }

    /// Messages matching `query`, newest first. `Err` for a cursor that is
    /// not a message id.
    pub(crate) fn list(&self, query: &ListQuery) -> Result<Page, String> {
        let limit = query.limit.clamp(1, ListQuery::MAX_LIMIT);
        let mut upper = query
            .until
            .map(|until| key_from(until + std::time::Duration::from_millis(1)))
            .unwrap_or(u128::MAX);
        if let Some(cursor) = &query.cursor {
            let key = id_key(cursor).ok_or_else(|| format!("invalid cursor {cursor:?}"))?;
            upper = upper.min(key);
        }
        let lower = query.since.map(key_from).unwrap_or(0);
        let inner = self.lock();
        let empty = BTreeSet::new();
        let recipient = query.recipient.as_ref().map(|r| r.to_lowercase());
        // Walk the smallest index that applies; check the other filters.
        let mut candidates: Vec<&BTreeSet<u128>> = vec![&inner.all];
        if let Some(state) = query.state {
            candidates.push(inner.by_state.get(&state).unwrap_or(&empty));
        }
        if let Some(tag) = &query.tag {
            candidates.push(inner.by_tag.get(tag).unwrap_or(&empty));
        }
        if let Some(recipient) = &recipient {
            candidates.push(inner.by_recipient.get(recipient).unwrap_or(&empty));
        }
        let base = candidates
            .into_iter()
            .min_by_key(|set| set.len())
            .unwrap_or(&empty);
        let since_ms = query.since.map(to_millis);
        let until_ms = query.until.map(to_millis);
        let mut records = Vec::with_capacity(limit);
        let mut more = false;
        if lower < upper {
            for key in base.range(lower..upper).rev() {
                let Some(entry) = inner.entries.get(key) else {
                    continue;
                };
                let record = &entry.record;
                let matches = query.state.is_none_or(|state| record.state() == state)
                    && query
                        .tag
                        .as_ref()
                        .is_none_or(|tag| record.tags.contains(tag))
                    && recipient.as_ref().is_none_or(|wanted| {
                        record
                            .recipients
                            .iter()
                            .any(|known| known.to_lowercase() == *wanted)
                    })
                    && since_ms.is_none_or(|since| record.created_at_ms >= since)
                    && until_ms.is_none_or(|until| record.created_at_ms <= until);
                if !matches {
                    continue;
                }
                if records.len() == limit {
                    more = true;
                    break;
                }
                records.push(record.clone());
            }
        }
        let next_cursor = if more {
            records.last().map(|record| record.id.clone())
        } else {
            None
        };
        Ok(Page {
            records,
            next_cursor,
        })
    }

    /// How many messages are in each state.
    pub(crate) fn counts(&self) -> HashMap<State, usize> {
        self.lock()
            .by_state
            .iter()
            .map(|(state, set)| (*state, set.len()))
            .collect()
    }

    /// Binds an idempotency key to `id` unless it is bound already. While
    /// another request holding the key is still being accepted, waits for
    /// its outcome, so a repeat never answers with the id of a request
    /// that is then refused.
    pub(crate) fn claim_key(&self, key: &str, fingerprint: &str, id: &str) -> KeyClaim {
        let mut inner = self.lock();
        loop {
            match inner.keys.get(key) {
                Some(binding) if binding.settled => {
                    return if binding
                        .fingerprint
                        .as_deref()
                        .is_none_or(|known| known == fingerprint)
                    {
                        KeyClaim::Existing(binding.id.clone())
                    } else {
                        KeyClaim::Conflict
                    };
                }
                Some(_) => {
                    inner = self
                        .keys_decided
                        .wait(inner)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                None => break,
            }
        }
        inner.keys.insert(
            key.to_string(),
            KeyBinding {
                id: id.to_string(),
                fingerprint: Some(fingerprint.to_string()),
                settled: false,
            },
        );
        KeyClaim::Claimed
    }

    /// The request that claimed `key` was accepted: repeats now get its id.
    pub(crate) fn settle_key(&self, key: &str) {
        if let Some(binding) = self.lock().keys.get_mut(key) {
            binding.settled = true;
        }
        self.keys_decided.notify_all();
    }

    /// Binds a key recovered from the spool to its message, settled.
    pub(crate) fn restore_key(&self, key: &str, fingerprint: Option<&str>, id: &str) {
        self.lock()
            .keys
            .entry(key.to_string())
            .or_insert_with(|| KeyBinding {
                id: id.to_string(),
                fingerprint: fingerprint.map(str::to_string),
                settled: true,
            });
    }

    /// Releases a key whose request was not accepted after all.
    pub(crate) fn release_key(&self, key: &str) {
        self.lock().keys.remove(key);
        self.keys_decided.notify_all();
    }

    /// Forgets a message entirely (a request refused after its entry was made).
    pub(crate) fn remove(&self, id: &str) {
        if let Some(key) = id_key(id) {
            self.lock().forget(key);
        }
    }

    /// How many messages are held (live and finished).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::from_millis;

    fn id(millis: u64, n: u64) -> String {
        format!("{millis:012x}{n:016x}")
    }

    #[test]
    fn id_keys_are_the_ids_as_hex_numbers() {
        for (millis, n) in [
            (0, 0),
            (1, u64::MAX),
            (0xffff_ffff_ffff, 0x0123_4567_89ab_cdef),
        ] {
            let text = id(millis, n);
            assert_eq!(
                id_key(&text),
                u128::from_str_radix(&text, 16).ok(),
                "{text}"
            );
        }
        for bad in [
            "",
            "0190aabbccddeeff00112233445",
            "0190aabbccddeeff0011223344556",
            "0190AABBCCDDEEFF001122334455",
            "0190aabbccddeeff00112233445g",
            "+190aabbccddeeff001122334455",
        ] {
            assert_eq!(id_key(bad), None, "{bad:?}");
        }
    }

    fn record(id: &str, state: State) -> StatusRecord {
        let millis = (id_key(id).unwrap() >> 64) as u64;
        let mut record = StatusRecord::new(
            id.to_string(),
            millis,
            vec![format!("User{}@Example.org", millis % 3)],
        );
        record.set_state(state);
        record.tags = vec![format!("t{}", millis % 2)];
        record
    }

    #[test]
    fn finished_entries_are_bounded_live_ones_kept() {
        let index = Index::new(2);
        index.put(record(&id(1, 0), State::Queued), None);
        for n in 0..5 {
            index.put(record(&id(10 + n, 0), State::Sent), None);
        }
        assert!(index.get(&id(1, 0)).is_some());
        assert!(index.get(&id(10, 0)).is_none());
        assert!(index.get(&id(14, 0)).is_some());
        assert_eq!(index.len(), 3);
        assert!(index.get("not-an-id").is_none());
    }

    #[test]
    fn updates_check_the_state_and_move_between_indexes() {
        let index = Index::new(10);
        let a = id(5, 1);
        index.put(record(&a, State::Queued), None);
        let begun = index.update(
            &a,
            |state| state == State::Queued,
            |record| record.set_state(State::Sending),
        );
        assert!(begun.is_ok());
        let again = index.update(&a, |state| state == State::Queued, |_| ());
        assert_eq!(again, Err(Some(State::Sending)));
        assert_eq!(index.counts().get(&State::Sending), Some(&1));
        assert_eq!(index.counts().get(&State::Queued), None);
        assert_eq!(index.update(&id(9, 9), |_| true, |_| ()), Err(None));
    }

    #[test]
    fn a_message_retried_by_hand_is_not_forgotten_for_its_first_finish() {
        let index = Index::new(1);
        let a = id(1, 0);
        index.put(record(&a, State::Failed), None);
        index
            .update(&a, |_| true, |r| r.set_state(State::Queued))
            .unwrap();
        index.put(record(&id(2, 0), State::Sent), None);
        assert!(
            index.get(&a).is_some(),
            "live again: its old retirement does not count"
        );
        index
            .update(&a, |_| true, |r| r.set_state(State::Sent))
            .unwrap();
        assert!(index.get(&id(2, 0)).is_none());
        assert!(index.get(&a).is_some());
    }

    #[test]
    fn lists_newest_first_with_filters_and_cursors() {
        let index = Index::new(1000);
        for millis in 1..=100u64 {
            let state = if millis % 5 == 0 {
                State::Failed
            } else {
                State::Sent
            };
            index.put(record(&id(millis, 7), state), None);
        }
        let mut query = ListQuery::new();
        query.limit = 30;
        let mut seen = Vec::new();
        loop {
            let page = index.list(&query).unwrap();
            seen.extend(page.records.iter().map(|r| r.created_at_ms));
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        assert_eq!(seen, (1..=100).rev().collect::<Vec<_>>());

        let mut failed = ListQuery::new();
        failed.state = Some(State::Failed);
        failed.tag = Some("t0".into());
        failed.since = Some(from_millis(20));
        failed.until = Some(from_millis(80));
        let page = index.list(&failed).unwrap();
        let got: Vec<u64> = page.records.iter().map(|r| r.created_at_ms).collect();
        assert_eq!(got, vec![80, 70, 60, 50, 40, 30, 20]);

        let mut by_recipient = ListQuery::new();
        by_recipient.recipient = Some("user1@example.ORG".into());
        by_recipient.limit = 500;
        let page = index.list(&by_recipient).unwrap();
        assert_eq!(page.records.len(), 34);
        assert!(page.next_cursor.is_none());

        let mut bad = ListQuery::new();
        bad.cursor = Some("x".into());
        assert!(index.list(&bad).is_err());
    }

    #[test]
    fn idempotency_keys_follow_their_entry_and_compare_fingerprints() {
        let index = Index::new(1);
        let a = id(1, 1);
        index.put(record(&a, State::Queued), None);
        assert_eq!(index.claim_key("k", "f1", &a), KeyClaim::Claimed);
        index
            .update(&a, |_| true, |r| r.idempotency_key = Some("k".into()))
            .unwrap();
        index.settle_key("k");
        assert_eq!(
            index.claim_key("k", "f1", &id(2, 2)),
            KeyClaim::Existing(a.clone())
        );
        assert_eq!(index.claim_key("k", "f2", &id(2, 2)), KeyClaim::Conflict);
        index
            .update(&a, |_| true, |r| r.set_state(State::Sent))
            .unwrap();
        index.put(record(&id(3, 3), State::Sent), None);
        assert_eq!(index.claim_key("k", "f2", &id(4, 4)), KeyClaim::Claimed);
    }

    /// A repeat arriving while the first request is still being accepted
    /// gets that request's outcome: its id once accepted, the key itself
    /// if it was refused. (Either order of the two threads must give this.)
    #[test]
    fn a_repeat_waits_for_the_first_request_outcome() {
        for accepted in [true, false] {
            let index = Arc::new(Index::new(10));
            let a = id(1, 1);
            assert_eq!(index.claim_key("k", "f", &a), KeyClaim::Claimed);
            let repeat = {
                let index = Arc::clone(&index);
                std::thread::spawn(move || index.claim_key("k", "f", &id(2, 2)))
            };
            if accepted {
                index.put(record(&a, State::Queued), None);
                index.settle_key("k");
            } else {
                index.release_key("k");
            }
            let expected = if accepted {
                KeyClaim::Existing(a)
            } else {
                KeyClaim::Claimed
            };
            assert_eq!(repeat.join().unwrap(), expected);
        }
    }
}
