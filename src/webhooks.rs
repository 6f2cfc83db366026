//! Webhooks: the chosen events of every message are POSTed as JSON to
//! `MAILROOM_WEBHOOK_URL`, signed as the Standard Webhooks specification
//! says, by a few threads of their own.
//!
//! The store tells `Webhooks` of each recorded change (it is an
//! observer): that only builds the body, appends it to the pending queue
//! (`store::webhooks`, a `write` without fsync) and hands it to the
//! delivery threads, so mail delivery and the API never wait for an
//! endpoint. Each webhook gets an id at that moment, sent as `webhook-id`
//! on every attempt (after a restart too) so receivers can drop repeats;
//! `webhook-timestamp` and the signature are made anew for each attempt,
//! since receivers refuse timestamps more than a few minutes old.
//!
//! Delivery is at least once: a 2xx answer within the timeout ends it;
//! anything else is tried again after a delay that doubles from about a
//! second up to ten minutes, with jitter, until the retry window after the
//! event is over. The threads always take the webhook due first, so one in
//! backoff never holds up the others. At most `max_pending` webhooks are
//! kept; beyond, the oldest are dropped (counted, and logged at most every
//! ten seconds).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::message::random_u64;
use crate::metrics::{Metrics, WebhookResult};
use crate::status::{Event, EventKind};
use crate::store::{Observer, PendingWebhook, StatusRecord, WebhookQueue};
use crate::time::{from_millis, rfc3339};

/// The webhook signing secret: the bytes after `whsec_`, base64-decoded.
/// `Debug` shows `"***"`; nothing prints it.
#[derive(Clone)]
pub struct WebhookSecret(ring::hmac::Key);

impl WebhookSecret {
    /// Parses `whsec_` followed by base64 (padded or not) of 24 to 64
    /// bytes, the sizes the Standard Webhooks specification allows.
    pub fn parse(text: &str) -> Result<WebhookSecret, ConfigError> {
        let refused = |reason: &str| ConfigError::Refused {
            variable: "MAILROOM_WEBHOOK_SECRET",
            reason: reason.to_string(),
        };
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or_else(|| refused("must start with whsec_ (then base64 of the secret bytes)"))?;
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let bytes = engine
            .decode(encoded)
            .map_err(|_| refused("the part after whsec_ is not valid base64"))?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(refused(&format!(
                "the secret is {} bytes; use 24 to 64 random bytes (e.g. whsec_$(head -c 32 /dev/urandom | base64))",
                bytes.len()
            )));
        }
        Ok(WebhookSecret(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &bytes,
        )))
    }

    /// The HMAC-SHA256 signing key.
    pub(crate) fn key(&self) -> &ring::hmac::Key {
        &self.0
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Webhooks retry for this long after their event by default (hours).
pub const DEFAULT_RETRY_HOURS: u64 = 24;

/// Where message events go as signed webhooks, and how hard to try.
#[derive(Clone)]
#[non_exhaustive]
pub struct WebhookSettings {
    /// Where webhooks are POSTed (`MAILROOM_WEBHOOK_URL`).
    pub url: url::Url,
    /// The signing secret (`MAILROOM_WEBHOOK_SECRET`).
    pub secret: WebhookSecret,
    /// The events sent (`MAILROOM_WEBHOOK_EVENTS`), without repeats.
    pub events: Vec<WebhookEvent>,
    /// How long after its event a webhook is retried (`MAILROOM_WEBHOOK_RETRY_HOURS`).
    pub retry_window: Duration,
    /// Webhooks pending at most; beyond, the oldest are dropped.
    pub max_pending: usize,
    /// Delay before the first retry; it doubles from there, with jitter.
    pub first_retry: Duration,
    /// The longest delay between two attempts.
    pub max_retry_delay: Duration,
    /// Time allowed for one delivery, from connecting to the end of the answer.
    pub timeout: Duration,
    /// Delivery threads.
    pub threads: usize,
}

impl WebhookSettings {
    /// Webhooks pending at most, by default.
    pub const DEFAULT_MAX_PENDING: usize = 100_000;
    /// The first retry's delay, by default.
    pub const DEFAULT_FIRST_RETRY: Duration = Duration::from_secs(1);
    /// The longest delay between attempts, by default.
    pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(600);
    /// Time allowed for one delivery, by default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Delivery threads, by default: enough that a few slow answers do
    /// not hold up the rest.
    pub const DEFAULT_THREADS: usize = 4;

    /// Settings for `url` and `secret`, everything else at its default.
    pub fn new(url: url::Url, secret: WebhookSecret) -> WebhookSettings {
        WebhookSettings {
            url,
            secret,
            events: WebhookEvent::DEFAULT.to_vec(),
            retry_window: Duration::from_secs(DEFAULT_RETRY_HOURS * 3600),
            max_pending: WebhookSettings::DEFAULT_MAX_PENDING,
            first_retry: WebhookSettings::DEFAULT_FIRST_RETRY,
            max_retry_delay: WebhookSettings::DEFAULT_MAX_RETRY_DELAY,
            timeout: WebhookSettings::DEFAULT_TIMEOUT,
            threads: WebhookSettings::DEFAULT_THREADS,
        }
    }

    /// `scheme://host:port` of the URL, for logs (its path, query and any
    /// user or password may hold a token, so they are left out).
    pub fn endpoint(&self) -> String {
        format!(
            "{}://{}:{}",
            self.url.scheme(),
            self.url.host_str().unwrap_or(""),
            self.url.port_or_known_default().unwrap_or(0)
        )
    }
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("endpoint", &self.endpoint())
            .field("secret", &self.secret)
            .field("events", &self.events)
            .field("retry_window", &self.retry_window)
            .field("max_pending", &self.max_pending)
            .field("first_retry", &self.first_retry)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("timeout", &self.timeout)
            .field("threads", &self.threads)
            .finish()
    }
}

/// A message event that can be sent as a webhook, as named in
/// `MAILROOM_WEBHOOK_EVENTS`; the webhook's `type` is `message.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum WebhookEvent {
    /// The message was accepted (queued or scheduled).
    Accepted,
    /// An attempt failed; a retry is scheduled.
    Deferred,
    /// The relay accepted the message.
    Sent,
    /// Given up on.
    Failed,
    /// Cancelled by a client.
    Cancelled,
    /// Not sent to some or all recipients: they are on the suppression list.
    Suppressed,
}

impl WebhookEvent {
    /// Every event, in the order of a message's life.
    pub const ALL: [WebhookEvent; 6] = [
        WebhookEvent::Accepted,
        WebhookEvent::Deferred,
        WebhookEvent::Sent,
        WebhookEvent::Failed,
        WebhookEvent::Cancelled,
        WebhookEvent::Suppressed,
    ];

    /// The events sent when `MAILROOM_WEBHOOK_EVENTS` is unset: the
    /// outcomes of a message.
    pub const DEFAULT: [WebhookEvent; 4] = [
        WebhookEvent::Sent,
        WebhookEvent::Failed,
        WebhookEvent::Suppressed,
        WebhookEvent::Cancelled,
    ];

    /// The name in `MAILROOM_WEBHOOK_EVENTS` (and in the message's events).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Accepted => "accepted",
            WebhookEvent::Deferred => "deferred",
            WebhookEvent::Sent => "sent",
            WebhookEvent::Failed => "failed",
            WebhookEvent::Cancelled => "cancelled",
            WebhookEvent::Suppressed => "suppressed",
        }
    }

    /// The webhook's `type`, e.g. `message.sent`.
    pub fn webhook_type(self) -> &'static str {
        match self {
            WebhookEvent::Accepted => "message.accepted",
            WebhookEvent::Deferred => "message.deferred",
            WebhookEvent::Sent => "message.sent",
            WebhookEvent::Failed => "message.failed",
            WebhookEvent::Cancelled => "message.cancelled",
            WebhookEvent::Suppressed => "message.suppressed",
        }
    }

    /// The event with this name.
    pub fn parse(name: &str) -> Option<WebhookEvent> {
        WebhookEvent::ALL
            .into_iter()
            .find(|event| event.as_str() == name)
    }

    /// The webhook event of a message event; `None` for those never sent
    /// (attempts, requeues).
    pub fn of(kind: &EventKind) -> Option<WebhookEvent> {
        match kind {
            EventKind::Accepted => Some(WebhookEvent::Accepted),
            EventKind::Deferred { .. } => Some(WebhookEvent::Deferred),
            EventKind::Sent { .. } => Some(WebhookEvent::Sent),
            EventKind::Failed { .. } => Some(WebhookEvent::Failed),
            EventKind::Cancelled => Some(WebhookEvent::Cancelled),
            EventKind::Suppressed { .. } => Some(WebhookEvent::Suppressed),
            _ => None,
        }
    }
}

impl std::fmt::Display for WebhookEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `webhook-signature` header of one attempt: `v1,` and the base64
/// HMAC-SHA256, keyed with the secret's bytes, of `<id>.<timestamp>.<body>`.
pub fn signature(secret: &WebhookSecret, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut context = ring::hmac::Context::with_key(secret.key());
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(context.sign().as_ref())
    )
}

/// The body of a webhook (field order as in the specification).
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: PayloadData<'a>,
}

#[derive(Serialize)]
struct PayloadData<'a> {
    id: &'a str,
    status: &'static str,
    recipients: &'a [String],
    attempts: u32,
    smtp_code: Option<u16>,
    smtp_reply: Option<&'a str>,
    tags: &'a [String],
    metadata: &'a BTreeMap<String, String>,
}

/// The JSON body of the webhook of `event`, one of the events just added
/// to the message whose status is now `status`. `smtp_code` and
/// `smtp_reply` are those of the latest attempt (null before any).
fn payload(kind: WebhookEvent, event: &Event, status: &StatusRecord) -> String {
    let (smtp_code, smtp_reply) = status
        .events
        .iter()
        .rev()
        .find_map(|event| match &event.kind {
            EventKind::Attempt {
                smtp_code,
                smtp_reply,
                ..
            } => Some((*smtp_code, smtp_reply.as_deref())),
            _ => None,
        })
        .unwrap_or((None, None));
    let payload = Payload {
        kind: kind.webhook_type(),
        timestamp: rfc3339(from_millis(event.at_ms)),
        data: PayloadData {
            id: &status.id,
            status: status.state().as_str(),
            recipients: &status.recipients,
            attempts: status.attempts,
            smtp_code,
            smtp_reply,
            tags: &status.tags,
            metadata: &status.metadata,
        },
    };
    // Plain strings, numbers and maps with string keys: this cannot fail.
    serde_json::to_string(&payload).unwrap_or_default()
}

/// A new webhook's id: the message's and a random part, no dots (the id
/// is part of what is signed, dot-separated).
fn new_id(message_id: &str) -> String {
    format!("msg_{message_id}_{:016x}", random_u64())
}

/// The webhooks of this process: the observer and the delivery threads.
pub(crate) struct Webhooks {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    settings: WebhookSettings,
    endpoint: String,
    queue: Arc<dyn WebhookQueue>,
    metrics: Arc<Metrics>,
    schedule: Mutex<Schedule>,
    wake: Condvar,
    agent: ureq::Agent,
    drops: Mutex<Quiet>,
    write_errors: Mutex<Quiet>,
}

/// What the delivery threads do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Deliver, retry.
    Running,
    /// Stopping without a spool: one more attempt for each, no retries.
    LastChance,
    /// Stopping: finish the attempts in flight, keep the rest pending.
    Now,
}

/// The pending webhooks, by age, and when each is due.
struct Schedule {
    /// By the order they were queued in (oldest first).
    entries: BTreeMap<u64, Entry>,
    /// `(due, entry)`, earliest first; an item whose entry is gone, is
    /// being sent or has another due time is stale and skipped.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    next: u64,
    stop: Stop,
}

struct Entry {
    webhook: Arc<PendingWebhook>,
    attempts: u32,
    due: Instant,
    in_flight: bool,
}

impl Schedule {
    /// Rebuilds the heap once stale items outnumber the live ones (drops
    /// leave theirs behind).
    fn tidy(&mut self) {
        if self.due.len() > 2 * self.entries.len() + 1024 {
            self.due = self
                .entries
                .iter()
                .filter(|(_, entry)| !entry.in_flight)
                .map(|(seq, entry)| Reverse((entry.due, *seq)))
                .collect();
        }
    }
}

/// Counts occurrences of a problem and says when to log them: at most
/// once per [`Quiet::EVERY`].
#[derive(Default)]
struct Quiet {
    unlogged: u64,
    last: Option<Instant>,
}

impl Quiet {
    const EVERY: Duration = Duration::from_secs(10);

    /// Notes `count` more; returns how many to log now, if it is time.
    fn note(&mut self, count: u64) -> Option<u64> {
        self.unlogged += count;
        self.due()
    }

    /// How many to log now, if any and it is time.
    fn due(&mut self) -> Option<u64> {
        if self.unlogged == 0 || self.last.is_some_and(|last| last.elapsed() < Quiet::EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Everything not logged yet.
    fn rest(&mut self) -> Option<u64> {
        (self.unlogged > 0).then(|| std::mem::take(&mut self.unlogged))
    }
}

/// Why an attempt failed.
enum AttemptError {
    /// The endpoint answered, but not 2xx.
    Status(u16),
    /// No answer: connection refused, TLS, timeout...
    Transport(String),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Status(code) => write!(f, "HTTP {code}"),
            AttemptError::Transport(detail) => write!(f, "no answer: {detail}"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Webhooks {
    /// Starts the delivery threads, with what `queue` kept from an earlier run.
    pub(crate) fn start(
        settings: WebhookSettings,
        queue: Arc<dyn WebhookQueue>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Webhooks> {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            // A redirect is a failure (the URL should be updated instead).
            .max_redirects(0)
            .user_agent(format!("mailroom/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        let shared = Arc::new(Shared {
            endpoint: settings.endpoint(),
            settings,
            queue,
            metrics,
            schedule: Mutex::new(Schedule {
                entries: BTreeMap::new(),
                due: BinaryHeap::new(),
                next: 0,
                stop: Stop::Running,
            }),
            wake: Condvar::new(),
            agent,
            drops: Mutex::default(),
            write_errors: Mutex::default(),
        });
        let recovered = shared.queue.load();
        let count = recovered.len();
        shared.push(recovered);
        let webhooks = Webhooks {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::new()),
        };
        for index in 0..shared.settings.threads.max(1) {
            let shared = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("webhook-{index}"))
                .spawn(move || shared.run())?;
            lock(&webhooks.threads).push(thread);
        }
        let events: Vec<&str> = shared
            .settings
            .events
            .iter()
            .map(|event| event.as_str())
            .collect();
        log::info!(
            "webhooks: {} to {}, {} threads{}",
            events.join(","),
            shared.endpoint,
            shared.settings.threads.max(1),
            if count > 0 {
                format!("; {count} pending from the last run")
            } else {
                String::new()
            }
        );
        Ok(webhooks)
    }

    /// The observer to subscribe to the store.
    pub(crate) fn observer(&self) -> Arc<dyn Observer> {
        Arc::clone(&self.shared) as Arc<dyn Observer>
    }

    /// Webhooks waiting for delivery, those being sent included.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.shared.schedule).entries.len()
    }

    /// Stops the delivery threads, waiting for them until `deadline`, and
    /// returns how many webhooks are still pending. Durable: those stay in
    /// the queue for the next start. `last_chance` (memory mode): each
    /// pending webhook gets one more attempt first, and those still
    /// pending are dropped.
    pub(crate) fn shutdown(&self, deadline: Instant, last_chance: bool) -> usize {
        let shared = &self.shared;
        lock(&shared.schedule).stop = if last_chance {
            Stop::LastChance
        } else {
            Stop::Now
        };
        shared.wake.notify_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        // Idle threads exit at once, even when the workers used up the time.
        let deadline = deadline.max(Instant::now() + Duration::from_millis(200));
        if !join_until(threads, deadline) {
            lock(&shared.schedule).stop = Stop::Now;
            shared.wake.notify_all();
            log::warn!("webhooks: shutdown timeout reached with deliveries still in flight");
        }
        shared.log_drops(true);
        let left = lock(&shared.schedule).entries.len();
        if last_chance && left > 0 {
            for _ in 0..left {
                shared.metrics.webhook(WebhookResult::Dropped);
            }
        }
        left
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        // Delivery threads exit after their attempt in flight.
        lock(&self.shared.schedule).stop = Stop::Now;
        self.shared.wake.notify_all();
    }
}

/// Joins `threads` until `deadline`; false when some were still running.
fn join_until(threads: Vec<JoinHandle<()>>, deadline: Instant) -> bool {
    let (done, finished) = crossbeam_channel::unbounded();
    let count = threads.len();
    for thread in threads {
        let done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("webhook-join".into())
            .spawn(move || {
                let _ = thread.join();
                let _ = done.send(());
            });
        if spawned.is_err() {
            return false;
        }
    }
    (0..count).all(|_| finished.recv_deadline(deadline).is_ok())
}

impl Observer for Shared {
    fn changed(&self, status: &StatusRecord, new_events: &[&Event]) {
        let mut new = Vec::new();
        for event in new_events {
            let Some(kind) = WebhookEvent::of(&event.kind) else {
                continue;
            };
            if !self.settings.events.contains(&kind) {
                continue;
            }
            let webhook = PendingWebhook {
                id: new_id(&status.id),
                event: kind,
                message_id: status.id.clone(),
                at_ms: event.at_ms,
                body: payload(kind, event, status),
            };
            if let Err(error) = self.queue.add(&webhook) {
                self.write_failed(&error);
            }
            log::info!(
                "webhook {}: queued, {} of message {}",
                webhook.id,
                kind.webhook_type(),
                webhook.message_id
            );
            new.push(webhook);
        }
        if !new.is_empty() {
            self.push(new);
        }
    }
}

impl Shared {
    /// Schedules webhooks for now, dropping the oldest beyond the cap.
    fn push(&self, webhooks: Vec<PendingWebhook>) {
        if webhooks.is_empty() {
            return;
        }
        let count = webhooks.len();
        let mut dropped = Vec::new();
        {
            let mut schedule = lock(&self.schedule);
            let now = Instant::now();
            for webhook in webhooks {
                let seq = schedule.next;
                schedule.next += 1;
                schedule.entries.insert(
                    seq,
                    Entry {
                        webhook: Arc::new(webhook),
                        attempts: 0,
                        due: now,
                        in_flight: false,
                    },
                );
                schedule.due.push(Reverse((now, seq)));
            }
            while schedule.entries.len() > self.settings.max_pending {
                match schedule.entries.pop_first() {
                    Some((_, entry)) => dropped.push(entry.webhook),
                    None => break,
                }
            }
            schedule.tidy();
        }
        if count == 1 {
            self.wake.notify_one();
        } else {
            self.wake.notify_all();
        }
        if dropped.is_empty() {
            return;
        }
        for webhook in &dropped {
            self.complete(webhook);
            self.metrics.webhook(WebhookResult::Dropped);
        }
        lock(&self.drops).note(dropped.len() as u64);
        self.log_drops(false);
    }

    /// Logs the drops not logged yet: now when `all`, else when it is time.
    fn log_drops(&self, all: bool) {
        let count = {
            let mut drops = lock(&self.drops);
            if all {
                drops.rest()
            } else {
                drops.due()
            }
        };
        if let Some(count) = count {
            log::warn!(
                "webhooks: {count} pending webhooks dropped unsent, the oldest first: more than {} were pending ({} is not taking them fast enough)",
                self.settings.max_pending,
                self.endpoint
            );
        }
    }

    fn write_failed(&self, error: &io::Error) {
        if let Some(count) = lock(&self.write_errors).note(1) {
            log::error!(
                "webhooks: cannot write pending webhooks to the spool ({count} times): {error}; they are kept in memory and lost if the process stops"
            );
        }
    }

    /// No longer pending: tells the queue.
    fn complete(&self, webhook: &PendingWebhook) {
        if let Err(error) = self.queue.complete(&webhook.id) {
            self.write_failed(&error);
        }
    }

    /// A delivery thread.
    fn run(&self) {
        lower_priority();
        while let Some((seq, webhook, attempt)) = self.next_due() {
            let outcome = self.attempt(&webhook);
            self.settle(seq, &webhook, attempt, outcome);
            self.log_drops(false);
        }
    }

    /// Waits for the webhook due first; `None` when stopping.
    fn next_due(&self) -> Option<(u64, Arc<PendingWebhook>, u32)> {
        let mut schedule = lock(&self.schedule);
        loop {
            let last_chance = match schedule.stop {
                Stop::Now => return None,
                Stop::LastChance => true,
                Stop::Running => false,
            };
            let Some(&Reverse((due, seq))) = schedule.due.peek() else {
                if last_chance {
                    return None;
                }
                schedule = self
                    .wake
                    .wait(schedule)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            };
            let current = schedule
                .entries
                .get(&seq)
                .is_some_and(|entry| !entry.in_flight && entry.due == due);
            if !current {
                schedule.due.pop();
                continue;
            }
            let now = Instant::now();
            if due > now && !last_chance {
                schedule = self
                    .wake
                    .wait_timeout(schedule, due - now)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
                continue;
            }
            schedule.due.pop();
            if let Some(entry) = schedule.entries.get_mut(&seq) {
                entry.in_flight = true;
                entry.attempts += 1;
                return Some((seq, Arc::clone(&entry.webhook), entry.attempts));
            }
        }
    }

    /// One POST, signed now.
    fn attempt(&self, webhook: &PendingWebhook) -> Result<u16, AttemptError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        let signature = signature(
            &self.settings.secret,
            &webhook.id,
            timestamp,
            webhook.body.as_bytes(),
        );
        let sent = self
            .agent
            .post(self.settings.url.as_str())
            .header("content-type", "application/json")
            .header("webhook-id", webhook.id.as_str())
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .send(webhook.body.as_bytes());
        match sent {
            Ok(mut response) => {
                let code = response.status().as_u16();
                // Read (a bounded part of) the answer so the connection can be reused.
                let _ = response
                    .body_mut()
                    .with_config()
                    .limit(64 * 1024)
                    .read_to_vec();
                if (200..300).contains(&code) {
                    Ok(code)
                } else {
                    Err(AttemptError::Status(code))
                }
            }
            Err(error) => Err(AttemptError::Transport(error.to_string())),
        }
    }

    /// Records how an attempt went: delivered, retried later, or given up.
    fn settle(
        &self,
        seq: u64,
        webhook: &PendingWebhook,
        attempt: u32,
        outcome: Result<u16, AttemptError>,
    ) {
        let (id, kind, message) = (
            &webhook.id,
            webhook.event.webhook_type(),
            &webhook.message_id,
        );
        let error = match outcome {
            Ok(code) => {
                // Gone when it was dropped meanwhile (and counted then).
                if lock(&self.schedule).entries.remove(&seq).is_some() {
                    self.complete(webhook);
                    self.metrics.webhook(WebhookResult::Ok);
                }
                log::info!(
                    "webhook {id}: delivered, {kind} of message {message}, HTTP {code} (attempt {attempt})"
                );
                return;
            }
            Err(error) => error,
        };
        let window_end = from_millis(webhook.at_ms) + self.settings.retry_window;
        let left = window_end
            .duration_since(SystemTime::now())
            .ok()
            .filter(|left| !left.is_zero());
        let mut guard = lock(&self.schedule);
        let schedule = &mut *guard;
        let stop = schedule.stop;
        let Some(entry) = schedule.entries.get_mut(&seq) else {
            return;
        };
        match (stop, left) {
            (Stop::Running | Stop::Now, Some(left)) => {
                let wait = backoff(&self.settings, attempt).min(left);
                entry.due = Instant::now() + wait;
                entry.in_flight = false;
                schedule.due.push(Reverse((entry.due, seq)));
                drop(guard);
                self.wake.notify_one();
                self.metrics.webhook(WebhookResult::Retry);
                log::warn!(
                    "webhook {id}: attempt {attempt} failed ({error}), {kind} of message {message}; next attempt in {:.1} s",
                    wait.as_secs_f64()
                );
            }
            (Stop::LastChance, _) => {
                schedule.entries.remove(&seq);
                drop(guard);
                self.complete(webhook);
                self.metrics.webhook(WebhookResult::Dropped);
                log::warn!(
                    "webhook {id}: dropped at the stop (MAILROOM_SPOOL_DIR=none), {kind} of message {message}: attempt {attempt} failed ({error})"
                );
            }
            (_, None) => {
                schedule.entries.remove(&seq);
                drop(guard);
                self.complete(webhook);
                self.metrics.webhook(WebhookResult::Failed);
                log::warn!(
                    "webhook {id}: given up, {kind} of message {message}: attempt {attempt} failed ({error}) and its retry window ({} h after the event) is over",
                    self.settings.retry_window.as_secs() / 3600
                );
            }
        }
    }
}

/// Puts the calling thread at the lowest CPU priority: when the CPU is
/// short (an endpoint refusing thousands of retries), webhooks wait, not
/// the workers (nice 15) or the API.
fn lower_priority() {
    // Linux keeps a nice value per thread; raising it needs no privilege.
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call about the calling thread; no memory
        // is handed over. A failure leaves the priority as it was, which
        // is harmless (and -1 is also a valid result), so it is not checked.
        let _ = unsafe { libc::nice(19) };
    }
}

/// The delay after failed attempt `attempt` (1 for the first): doubling
/// from `first_retry`, capped, with equal jitter (between half and all of
/// it) so that webhooks failing together do not come back together.
fn backoff(settings: &WebhookSettings, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let full = settings
        .first_retry
        .saturating_mul(factor)
        .min(settings.max_retry_delay);
    let half = full / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random_u64() % spread.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> WebhookSecret {
        WebhookSecret::parse(text).unwrap()
    }

    #[test]
    fn signs_as_the_standard_webhooks_test_vector() {
        // From the specification's reference libraries.
        let secret = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(
            signature(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn backoff_doubles_from_about_a_second_with_jitter_and_a_cap() {
        let url = url::Url::parse("https://example.com/hook").unwrap();
        let settings = WebhookSettings::new(url, secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        for _ in 0..100 {
            let first = backoff(&settings, 1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let fourth = backoff(&settings, 4);
            assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
            let late = backoff(&settings, 40);
            assert!(late >= Duration::from_secs(300) && late <= Duration::from_secs(600));
        }
    }

    #[test]
    fn the_payload_has_the_fields_of_the_specification() {
        let mut status = StatusRecord::new(
            "0190aabbccddeeff0011223344".into(),
            1_795_948_130_000,
            vec!["a@example.org".into()],
        );
        status.attempts = 1;
        status.tags = vec!["welcome".into()];
        status.metadata.insert("user".into(), "42".into());
        status.push_event(Event {
            at_ms: 1_795_948_130_100,
            kind: EventKind::Attempt {
                attempt: 1,
                smtp_code: Some(250),
                smtp_reply: Some("2.0.0 Ok: queued".into()),
                duration_ms: 12,
                recipients: vec!["a@example.org".into()].into(),
            },
        });
        let sent = Event {
            at_ms: 1_795_948_130_123,
            kind: EventKind::Sent {
                refused: Vec::new(),
            },
        };
        status.push_event(sent.clone());
        status.set_state(crate::status::State::Sent);
        let body = payload(WebhookEvent::Sent, &sent, &status);
        assert_eq!(
            body,
            r#"{"type":"message.sent","timestamp":"2026-11-29T10:28:50.123Z","data":{"id":"0190aabbccddeeff0011223344","status":"sent","recipients":["a@example.org"],"attempts":1,"smtp_code":250,"smtp_reply":"2.0.0 Ok: queued","tags":["welcome"],"metadata":{"user":"42"}}}"#
        );
        assert!(!new_id(&status.id).contains('.'));
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use std::collections::HashMap;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    fn refusal(pairs: &[(&str, &str)]) -> String {
        config(pairs).unwrap_err().to_string()
    }

    #[test]
    fn no_url_no_webhooks_and_defaults_with_one() {
        assert!(config(&[]).unwrap().webhook.is_none());
        let settings = config(&[
            (
                "MAILROOM_WEBHOOK_URL",
                "https://hooks.example.com/mail?token=t0ken",
            ),
            ("MAILROOM_WEBHOOK_SECRET", SECRET),
        ])
        .unwrap()
        .webhook
        .unwrap();
        assert_eq!(settings.events, WebhookEvent::DEFAULT);
        assert_eq!(settings.retry_window, Duration::from_secs(24 * 3600));
        assert_eq!(settings.endpoint(), "https://hooks.example.com:443");
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("t0ken") && !shown.contains("MfKQ9r8"),
            "{shown}"
        );
    }

    #[test]
    fn events_retry_hours_and_loopback_http() {
        let settings = config(&[
            ("MAILROOM_WEBHOOK_URL", "http://[::1]:9000/hook"),
            ("MAILROOM_WEBHOOK_SECRET", SECRET),
            ("MAILROOM_WEBHOOK_EVENTS", " Deferred, sent,sent "),
            ("MAILROOM_WEBHOOK_RETRY_HOURS", "2"),
        ])
        .unwrap()
        .webhook
        .unwrap();
        assert_eq!(
            settings.events,
            [WebhookEvent::Deferred, WebhookEvent::Sent]
        );
        assert_eq!(settings.retry_window, Duration::from_secs(7200));
        for url in ["http://127.0.0.1:1/x", "http://localhost/x"] {
            assert!(config(&[
                ("MAILROOM_WEBHOOK_URL", url),
                ("MAILROOM_WEBHOOK_SECRET", SECRET)
            ])
            .is_ok());
        }
        assert!(config(&[
            ("MAILROOM_WEBHOOK_URL", "http://hooks.example.com/x"),
            ("MAILROOM_WEBHOOK_SECRET", SECRET),
            ("MAILROOM_WEBHOOK_ALLOW_HTTP", "1"),
        ])
        .is_ok());
    }

    #[test]
    fn bad_settings_name_the_variable_and_never_show_the_secret() {
        let url = ("MAILROOM_WEBHOOK_URL", "https://hooks.example.com/x");
        let text = refusal(&[url]);
        assert!(text.contains("MAILROOM_WEBHOOK_SECRET"), "{text}");
        let text = refusal(&[
            url,
            (
                "MAILROOM_WEBHOOK_SECRET",
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ]);
        assert!(
            text.contains("MAILROOM_WEBHOOK_SECRET")
                && text.contains("whsec_")
                && !text.contains("MfKQ9r8"),
            "{text}"
        );
        let text = refusal(&[url, ("MAILROOM_WEBHOOK_SECRET", "whsec_not*base64")]);
        assert!(
            text.contains("MAILROOM_WEBHOOK_SECRET") && !text.contains("not*base64"),
            "{text}"
        );
        let text = refusal(&[url, ("MAILROOM_WEBHOOK_SECRET", "whsec_c2hvcnQ=")]);
        assert!(text.contains("5 bytes"), "{text}");
        let text = refusal(&[("MAILROOM_WEBHOOK_SECRET", SECRET)]);
        assert!(text.contains("MAILROOM_WEBHOOK_URL"), "{text}");
        let secret = ("MAILROOM_WEBHOOK_SECRET", SECRET);
        let text = refusal(&[
            ("MAILROOM_WEBHOOK_URL", "http://hooks.example.com/x"),
            secret,
        ]);
        assert!(
            text.contains("MAILROOM_WEBHOOK_URL") && text.contains("MAILROOM_WEBHOOK_ALLOW_HTTP"),
            "{text}"
        );
        let text = refusal(&[
            ("MAILROOM_WEBHOOK_URL", "ftp://hooks.example.com/x"),
            secret,
        ]);
        assert!(text.contains("MAILROOM_WEBHOOK_URL"), "{text}");
        let text = refusal(&[
            (
                "MAILROOM_WEBHOOK_URL",
                "https://u:pa55word@hooks.example.com:x/",
            ),
            secret,
        ]);
        assert!(
            text.contains("MAILROOM_WEBHOOK_URL") && !text.contains("pa55word"),
            "{text}"
        );
        let text = refusal(&[url, secret, ("MAILROOM_WEBHOOK_EVENTS", "sent,bounced")]);
        assert!(
            text.contains("MAILROOM_WEBHOOK_EVENTS") && text.contains("bounced"),
            "{text}"
        );
        let text = refusal(&[url, secret, ("MAILROOM_WEBHOOK_RETRY_HOURS", "soon")]);
        assert!(text.contains("MAILROOM_WEBHOOK_RETRY_HOURS"), "{text}");
        let text = refusal(&[url, secret, ("MAILROOM_WEBHOOK_ALLOW_HTTP", "maybe")]);
        assert!(text.contains("MAILROOM_WEBHOOK_ALLOW_HTTP"), "{text}");
    }
}
