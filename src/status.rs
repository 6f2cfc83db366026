//! What the API tells about a message: its [`State`], its
//! [`MessageStatus`] and the [`Event`]s of its life.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::time::{from_millis, rfc3339};

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum State {
    /// Accepted with a `send_at` in the future; waiting for that time.
    Scheduled,
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is delivering it.
    Sending,
    /// Failed transiently; waiting for its next attempt.
    Retrying,
    /// The relay accepted it for every recipient it did not refuse for good.
    Sent,
    /// Given up: permanent refusal or attempts exhausted.
    Failed,
    /// Cancelled before it was sent; it never will be.
    Cancelled,
    /// Every recipient is on the suppression list; nothing was sent.
    Suppressed,
}

impl State {
    /// Every state, in the order of a message's life.
    pub const ALL: [State; 8] = [
        State::Scheduled,
        State::Queued,
        State::Sending,
        State::Retrying,
        State::Sent,
        State::Failed,
        State::Cancelled,
        State::Suppressed,
    ];

    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
            State::Queued => "queued",
            State::Sending => "sending",
            State::Retrying => "retrying",
            State::Sent => "sent",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Suppressed => "suppressed",
        }
    }

    /// The state with this API name.
    pub fn parse(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|state| state.as_str() == name)
    }

    /// Nothing more will happen to it (unless it is retried by hand).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            State::Sent | State::Failed | State::Cancelled | State::Suppressed
        )
    }

    /// Waiting for a worker or for its time: it may still be cancelled.
    pub fn is_cancellable(self) -> bool {
        matches!(self, State::Scheduled | State::Queued | State::Retrying)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a message, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// When, in milliseconds since the Unix epoch.
    #[serde(rename = "at")]
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of [`Event`], with their details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// Accepted (queued or scheduled).
    Accepted,
    /// One delivery attempt ended.
    Attempt {
        /// Which attempt (1 for the first).
        attempt: u32,
        /// The relay's reply code, when there was a reply.
        smtp_code: Option<u16>,
        /// The relay's reply text (or what went wrong when there was none).
        /// Shared with the status's `last_error` and the deferral that
        /// follows when they say the same: a held message keeps one copy.
        smtp_reply: Option<Arc<str>>,
        /// How long the attempt took.
        duration_ms: u64,
        /// The recipients it was for (shared with the message's status
        /// while they are all of them).
        recipients: Arc<[String]>,
    },
    /// A retry was scheduled.
    Deferred {
        /// When the next attempt is due (milliseconds since the epoch).
        #[serde(rename = "next_attempt_at")]
        next_attempt_at_ms: u64,
        /// Why.
        error: Arc<str>,
    },
    /// Delivered (to every recipient not refused for good).
    Sent {
        /// Recipients refused for good, with the relay's reply.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<String>,
    },
    /// Given up.
    Failed {
        /// Why.
        error: Arc<str>,
    },
    /// Cancelled by a client.
    Cancelled,
    /// Queued again by a client after it failed.
    Requeued,
    /// Not sent to these recipients: they are on the suppression list.
    Suppressed {
        /// The suppressed recipients.
        recipients: Vec<String>,
    },
}

impl EventKind {
    /// The event's `type` in the API.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Attempt { .. } => "attempt",
            EventKind::Deferred { .. } => "deferred",
            EventKind::Sent { .. } => "sent",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Requeued => "requeued",
            EventKind::Suppressed { .. } => "suppressed",
        }
    }
}

impl Event {
    /// An event happening now.
    pub fn now(kind: EventKind) -> Event {
        Event {
            at_ms: crate::time::to_millis(SystemTime::now()),
            kind,
        }
    }

    /// The API's JSON: `{"type", "at", ...details}`, times in RFC 3339.
    pub fn to_json(&self) -> Value {
        let mut value = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        value.insert("at".into(), json!(rfc3339(from_millis(self.at_ms))));
        if let EventKind::Deferred {
            next_attempt_at_ms, ..
        } = &self.kind
        {
            value.insert(
                "next_attempt_at".into(),
                json!(rfc3339(from_millis(*next_attempt_at_ms))),
            );
        }
        Value::Object(value)
    }
}

/// A message's status as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// When the next attempt is due (`retrying`) or the send time (`scheduled`).
    pub next_attempt_at: Option<SystemTime>,
    /// Every envelope recipient.
    pub recipients: Vec<String>,
    /// The client's tags.
    pub tags: Vec<String>,
    /// The client's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Its last events, oldest first.
    pub events: Vec<Event>,
}

impl MessageStatus {
    /// The `data` object of the status answer, times in RFC 3339 UTC.
    pub fn to_json(&self) -> Value {
        let mut value = self.summary_json();
        value["events"] = Value::Array(self.events.iter().map(Event::to_json).collect());
        value
    }

    /// As [`MessageStatus::to_json`] without the events (the list's items).
    pub fn summary_json(&self) -> Value {
        json!({
            "id": self.id,
            "status": self.state.as_str(),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "next_attempt_at": self.next_attempt_at.map(rfc3339),
            "recipients": self.recipients,
            "tags": self.tags,
            "metadata": self.metadata,
        })
    }
}
