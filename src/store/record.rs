//! How a message is kept: [`StatusRecord`] (everything the API shows about
//! it) and [`MessageRecord`] (that and the built message, while it may
//! still be sent). Both are written as JSON; fields added since the first
//! release default, so older spools still read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::job::Tries;
use crate::message::OutgoingMessage;
use crate::status::{Event, EventKind, MessageStatus, State};
use crate::time::from_millis;

/// A message keeps at most this many events (its latest).
pub const MAX_EVENTS: usize = 50;

/// Everything known about a message except its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The message id.
    #[serde(default)]
    pub id: String,
    /// `None` in records written before states were recorded: then it is
    /// derived (see [`StatusRecord::state`]).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "state")]
    pub recorded_state: Option<State>,
    /// Attempts started, the current one included.
    pub attempts: u32,
    /// Of those, attempts that failed before any transaction (the relay
    /// unreachable or refusing the login): they do not count toward
    /// `MAILROOM_MAX_ATTEMPTS` (see [`StatusRecord::tries`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreached_attempts: u32,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// When the next attempt (or the scheduled send) is due.
    #[serde(default)]
    pub next_attempt_at_ms: Option<u64>,
    /// Last failure.
    #[serde(default)]
    pub last_error: Option<Arc<str>>,
    /// The client's `Idempotency-Key`.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Digest of the request that used the key (a repeat must match it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Every envelope recipient (for the list's filter); shared with the
    /// message's job and its attempts' events while they are for all.
    #[serde(default, skip_serializing_if = "no_recipients")]
    pub recipients: Arc<[String]>,
    /// Recipients still to deliver to; `None`: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<String>>,
    /// The client's tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The client's metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Recipients refused for good so far, each with the relay's reply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// The latest events, oldest first.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub events: VecDeque<Event>,
    /// Events ever added (the oldest beyond [`MAX_EVENTS`] are forgotten,
    /// this count is not): a change's new events are the last
    /// `after.events_total - before.events_total` ones.
    #[serde(default)]
    pub events_total: u64,
    /// Counts the durable writes of this message: of two records of it
    /// found at a restart (a dead letter and a journal record), the higher
    /// revision is the later one.
    #[serde(default)]
    pub revision: u64,
}

impl StatusRecord {
    /// A new message's status: `queued`, no attempts, no events.
    pub fn new(
        id: String,
        created_at_ms: u64,
        recipients: impl Into<Arc<[String]>>,
    ) -> StatusRecord {
        StatusRecord {
            id,
            recorded_state: Some(State::Queued),
            attempts: 0,
            unreached_attempts: 0,
            created_at_ms,
            updated_at_ms: created_at_ms,
            next_attempt_at_ms: None,
            last_error: None,
            idempotency_key: None,
            fingerprint: None,
            recipients: recipients.into(),
            pending: None,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            refused: Vec::new(),
            events: VecDeque::new(),
            events_total: 0,
            revision: 0,
        }
    }

    /// The message's state. Records from before states were recorded are
    /// either journal records (waiting: `retrying` when a time is due,
    /// else `queued`) or sent-log lines (`sent`); `finished` says which.
    pub fn state_or(&self, finished: State) -> State {
        match self.recorded_state {
            Some(state) => state,
            None if finished.is_finished() => finished,
            None if self.next_attempt_at_ms.is_some() => State::Retrying,
            None => State::Queued,
        }
    }

    /// The recorded state (`queued` when none was recorded).
    pub fn state(&self) -> State {
        self.state_or(State::Queued)
    }

    /// Sets the state.
    pub fn set_state(&mut self, state: State) {
        self.recorded_state = Some(state);
    }

    /// Adds an event, forgetting the oldest beyond [`MAX_EVENTS`].
    pub fn push_event(&mut self, event: Event) {
        self.events_total += 1;
        self.events.push_back(event);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// The events added since `before` was this message's status.
    pub fn events_since(&self, before: u64) -> impl Iterator<Item = &Event> {
        let new = self.events_total.saturating_sub(before) as usize;
        self.events
            .iter()
            .skip(self.events.len().saturating_sub(new))
    }

    /// Becomes `cancelled` (by a client): never sent.
    pub fn cancel(&mut self) {
        self.set_state(State::Cancelled);
        self.next_attempt_at_ms = None;
        self.push_event(Event::now(EventKind::Cancelled));
    }

    /// Becomes `queued` again after it failed, with a fresh attempt budget
    /// (its `pending` recipients, those it has not reached, stay).
    pub fn requeue(&mut self) {
        self.set_state(State::Queued);
        self.attempts = 0;
        self.unreached_attempts = 0;
        self.next_attempt_at_ms = None;
        self.last_error = None;
        self.refused.clear();
        self.push_event(Event::now(EventKind::Requeued));
    }

    /// Its attempts for [`decide`](crate::job::decide): all started, and
    /// those that count toward `MAILROOM_MAX_ATTEMPTS`, the ones that
    /// reached the relay (a long outage must not use up the budget).
    pub(crate) fn tries(&self) -> Tries {
        Tries {
            started: self.attempts,
            counted: self.attempts.saturating_sub(self.unreached_attempts),
        }
    }

    /// Recipients still to deliver to.
    pub fn pending_recipients(&self) -> &[String] {
        self.pending.as_deref().unwrap_or(&self.recipients)
    }

    /// Notes the recipients still to deliver to: kept as `None` when it is
    /// every recipient (the usual case, and a copy less of the list for
    /// each held message).
    pub fn set_pending(&mut self, pending: &[String]) {
        self.pending = (pending != &*self.recipients).then(|| pending.to_vec());
    }

    /// [`StatusRecord::pending_recipients`] for a job: the same allocation
    /// as `recipients` while they are all pending.
    pub fn pending_shared(&self) -> Arc<[String]> {
        match &self.pending {
            Some(pending) => pending.as_slice().into(),
            None => Arc::clone(&self.recipients),
        }
    }

    /// The public view.
    pub fn to_status(&self) -> MessageStatus {
        MessageStatus {
            id: self.id.clone(),
            state: self.state(),
            attempts: self.attempts,
            last_error: self.last_error.as_deref().map(str::to_string),
            created_at: from_millis(self.created_at_ms),
            updated_at: from_millis(self.updated_at_ms),
            next_attempt_at: self.next_attempt_at_ms.map(from_millis),
            recipients: self.recipients.to_vec(),
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
            events: self.events.iter().cloned().collect(),
        }
    }
}

/// A message that may still be sent: its content and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// The built message.
    pub message: Arc<OutgoingMessage>,
    /// Its status (`id` and `recipients` are taken from the message when
    /// read from older records).
    #[serde(flatten)]
    pub status: StatusRecord,
}

impl MessageRecord {
    /// Fills what older records left out, from the message itself.
    pub fn complete(mut self) -> MessageRecord {
        if self.status.id.is_empty() {
            self.status.id = self.message.id.clone();
        }
        if self.status.recipients.is_empty() {
            self.status.recipients = self.message.recipients.as_slice().into();
        }
        self
    }
}

fn no_recipients(recipients: &Arc<[String]>) -> bool {
    recipients.is_empty()
}

fn is_zero(count: &u32) -> bool {
    *count == 0
}
