//! The engine's counters and the delivery-time histogram, rendered in the
//! Prometheus text exposition format for `GET /metrics` (the HTTP layer
//! adds its own). Plain atomics: the hot paths only add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The upper bounds (seconds) of a [`Histogram`]'s buckets.
pub(crate) trait Buckets {
    /// Ascending; `+Inf` is implied.
    const UPPER: &'static [f64];
}

/// The delivery-duration histogram's buckets.
struct DeliverySeconds;

impl Buckets for DeliverySeconds {
    const UPPER: &'static [f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
}

/// A Prometheus histogram of durations (cumulative buckets, a count and a
/// sum), for hot paths: observing adds to one bucket and the sum. Buckets
/// are kept apart (the last one past every bound) and summed when
/// rendered, so a scrape during an observation still reads cumulative
/// buckets and a count equal to `+Inf`.
pub(crate) struct Histogram<B: Buckets> {
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    bounds: std::marker::PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            buckets: (0..=B::UPPER.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            bounds: std::marker::PhantomData,
        }
    }
}

impl<B: Buckets> Histogram<B> {
    /// Counts one duration.
    pub(crate) fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = B::UPPER
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(B::UPPER.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Durations counted so far.
    pub(crate) fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .sum()
    }

    /// Appends the histogram as `name` (with its `# HELP` and `# TYPE`).
    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut count = 0;
        for (bound, bucket) in B::UPPER.iter().zip(&self.buckets) {
            count += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        count += self.buckets[B::UPPER.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Appends a counter without labels, with its `# HELP` and `# TYPE`.
pub(crate) fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Result of one delivery attempt, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The relay accepted the message.
    Ok,
    /// Failed; will be (or could have been) retried.
    Transient,
    /// Refused for good.
    Permanent,
}

/// Minutes of history kept for the dashboard's chart.
pub const MINUTES_KEPT: usize = 60;

/// Messages finished in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Minute {
    /// The minute's start, in minutes since the Unix epoch.
    pub minute: u64,
    /// Messages that reached `sent` in it.
    pub sent: u64,
    /// Messages that reached `failed` in it.
    pub failed: u64,
}

/// A ring of per-minute counts over the last [`MINUTES_KEPT`] minutes.
#[derive(Default)]
struct PerMinute {
    ring: Mutex<Vec<Minute>>,
}

impl PerMinute {
    fn count(&self, sent: u64, failed: u64) {
        let minute = now_minute();
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ring.is_empty() {
            ring.resize(MINUTES_KEPT, Minute::default());
        }
        let slot = &mut ring[(minute % MINUTES_KEPT as u64) as usize];
        if slot.minute != minute {
            *slot = Minute {
                minute,
                sent: 0,
                failed: 0,
            };
        }
        slot.sent += sent;
        slot.failed += failed;
    }

    /// The last [`MINUTES_KEPT`] minutes, oldest first (the current one last).
    fn last_hour(&self) -> Vec<Minute> {
        let now = now_minute();
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (0..MINUTES_KEPT as u64)
            .rev()
            .map(|ago| {
                let minute = now.saturating_sub(ago);
                ring.get((minute % MINUTES_KEPT as u64) as usize)
                    .filter(|slot| slot.minute == minute)
                    .copied()
                    .unwrap_or(Minute {
                        minute,
                        sent: 0,
                        failed: 0,
                    })
            })
            .collect()
    }
}

fn now_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() / 60)
        .unwrap_or(0)
}

/// The service's counters.
#[derive(Default)]
pub struct Metrics {
    per_minute: PerMinute,
    accepted: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    attempts_ok: AtomicU64,
    attempts_transient: AtomicU64,
    attempts_permanent: AtomicU64,
    connections_opened: AtomicU64,
    duration: Histogram<DeliverySeconds>,
    webhooks_ok: AtomicU64,
    webhooks_retry: AtomicU64,
    webhooks_failed: AtomicU64,
    webhooks_dropped: AtomicU64,
}

/// How a webhook delivery attempt, or a pending webhook, ended, as counted
/// in `mailroom_webhook_deliveries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookResult {
    /// `ok`: the endpoint answered 2xx; the webhook is delivered.
    Ok,
    /// `retry`: an attempt failed (no answer in time, or not 2xx); it will
    /// be tried again.
    Retry,
    /// `failed`: an attempt failed at the end of the retry window; given up.
    Failed,
    /// `dropped`: removed unsent, the oldest first, because too many were
    /// pending (or at a stop without a spool).
    Dropped,
}

/// Gauges read at render time from the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Messages waiting for a worker.
    pub queue_depth: u64,
    /// Messages waiting for their retry time.
    pub retry_depth: u64,
    /// Unfinished messages held (queued, sending, retrying).
    pub held: u64,
}

impl Metrics {
    /// A message was accepted (202 or v2).
    pub fn message_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
    /// A message reached `sent`.
    pub fn message_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.per_minute.count(1, 0);
    }
    /// A message reached `failed`.
    pub fn message_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.per_minute.count(0, 1);
    }
    /// Sent and failed messages per minute over the last hour, oldest first.
    pub fn last_hour(&self) -> Vec<Minute> {
        self.per_minute.last_hour()
    }
    /// A new SMTP connection was opened.
    pub fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }
    /// SMTP connections opened since start.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }
    /// One delivery attempt finished after `elapsed`.
    pub fn attempt(&self, result: AttemptResult, elapsed: Duration) {
        let counter = match result {
            AttemptResult::Ok => &self.attempts_ok,
            AttemptResult::Transient => &self.attempts_transient,
            AttemptResult::Permanent => &self.attempts_permanent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed);
    }
    /// Counts a webhook attempt's or a pending webhook's end.
    pub fn webhook(&self, result: WebhookResult) {
        self.webhook_counter(result).fetch_add(1, Ordering::Relaxed);
    }

    /// Webhook attempts (or ends) counted with `result`.
    pub fn webhooks(&self, result: WebhookResult) -> u64 {
        self.webhook_counter(result).load(Ordering::Relaxed)
    }

    fn webhook_counter(&self, result: WebhookResult) -> &AtomicU64 {
        match result {
            WebhookResult::Ok => &self.webhooks_ok,
            WebhookResult::Retry => &self.webhooks_retry,
            WebhookResult::Failed => &self.webhooks_failed,
            WebhookResult::Dropped => &self.webhooks_dropped,
        }
    }

    /// The exposition text of the webhook metrics, with `pending` webhooks
    /// waiting for delivery.
    pub fn render_webhooks(&self, pending: u64) -> String {
        let mut out = String::with_capacity(512);
        let name = "mailroom_webhook_deliveries_total";
        let _ = writeln!(
            out,
            "# HELP {name} Webhook delivery attempts by result (ok, retry, failed: given up at the end of the retry window), and pending webhooks dropped unsent (dropped).\n# TYPE {name} counter"
        );
        for (label, result) in [
            ("ok", WebhookResult::Ok),
            ("retry", WebhookResult::Retry),
            ("failed", WebhookResult::Failed),
            ("dropped", WebhookResult::Dropped),
        ] {
            let _ = writeln!(
                out,
                "{name}{{result=\"{label}\"}} {}",
                self.webhooks(result)
            );
        }
        let name = "mailroom_webhooks_pending";
        let _ = writeln!(
            out,
            "# HELP {name} Webhooks waiting for delivery (including those being sent).\n# TYPE {name} gauge\n{name} {pending}"
        );
        out
    }

    /// The exposition text.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        counter(
            &mut out,
            "mailroom_messages_accepted_total",
            "Messages accepted for delivery.",
            self.accepted.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailroom_messages_sent_total",
            "Messages the relay accepted.",
            self.sent.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailroom_messages_failed_total",
            "Messages given up on.",
            self.failed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailroom_smtp_connections_opened_total",
            "SMTP connections opened to the relay.",
            self.connections_opened.load(Ordering::Relaxed),
        );

        let _ = writeln!(
            out,
            "# HELP mailroom_delivery_attempts_total Delivery attempts by result."
        );
        let _ = writeln!(out, "# TYPE mailroom_delivery_attempts_total counter");
        for (label, value) in [
            ("ok", &self.attempts_ok),
            ("transient", &self.attempts_transient),
            ("permanent", &self.attempts_permanent),
        ] {
            let _ = writeln!(
                out,
                "mailroom_delivery_attempts_total{{result=\"{label}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }

        for (name, help, value) in [
            (
                "mailroom_queue_depth",
                "Messages waiting for a worker.",
                gauges.queue_depth,
            ),
            (
                "mailroom_retry_depth",
                "Messages waiting for their next attempt.",
                gauges.retry_depth,
            ),
            (
                "mailroom_messages_held",
                "Unfinished messages held (queued, sending, retrying).",
                gauges.held,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }

        self.duration.render(
            &mut out,
            "mailroom_delivery_duration_seconds",
            "Time one delivery attempt took.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_add_up() {
        let histogram = Histogram::<DeliverySeconds>::default();
        for millis in [1, 5, 7, 20_000, 60_000] {
            histogram.observe(Duration::from_millis(millis));
        }
        let mut out = String::new();
        histogram.render(&mut out, "h", "help");
        for line in [
            "h_bucket{le=\"0.005\"} 2",
            "h_bucket{le=\"0.01\"} 3",
            "h_bucket{le=\"10\"} 3",
            "h_bucket{le=\"30\"} 4",
            "h_bucket{le=\"+Inf\"} 5",
            "h_count 5",
            "h_sum 80.013",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }

    #[test]
    fn the_last_hour_ends_with_this_minute() {
        let metrics = Metrics::default();
        metrics.message_sent();
        metrics.message_sent();
        metrics.message_failed();
        let hour = metrics.last_hour();
        assert_eq!(hour.len(), MINUTES_KEPT);
        let this = hour[MINUTES_KEPT - 1];
        // (A minute boundary may fall between the counts and the read.)
        assert!(this.sent + this.failed <= 3);
        assert_eq!(hour.iter().map(|m| m.sent).sum::<u64>(), 2);
        assert_eq!(hour.iter().map(|m| m.failed).sum::<u64>(), 1);
        assert!(hour.windows(2).all(|w| w[0].minute + 1 == w[1].minute));
    }
}
