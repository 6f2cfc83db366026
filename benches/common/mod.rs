//! Shared by the benchmarks: the SMTP sink, the
//! two delivery drivers (mailroom's engine and a raw lettre loop) and small
//! helpers for figures. Benchmarks print figures; they never assert timings.
#![allow(dead_code)]

pub mod deliver;
pub mod postfix;
pub mod sink;

use std::time::Duration;

use mailroom::config::{Relay, Secret, SmtpSettings, TlsMode};
use mailroom::{Config, MailRequest};

use sink::Sink;

/// One delivery run over a latency proxy.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkRun {
    /// Messages the sink counted.
    pub messages: u64,
    /// From the start signal to the last message counted.
    pub elapsed: Duration,
    /// Client flights counted at the proxy.
    pub flights: u64,
    /// Connections through the proxy.
    pub connections: u64,
}

impl LinkRun {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Client flights per message.
    pub fn round_trips(&self) -> f64 {
        self.flights as f64 / self.messages.max(1) as f64
    }
}

/// Login the benchmarks use against TLS sinks (which accept any).
pub const USER: &str = "bench";
/// Password for [`USER`].
pub const PASSWORD: &str = "bench-password";

/// The seed's request: what the original service was sent.
pub fn seed_json() -> String {
    serde_json::json!({
        "sender": "App <app@example.com>",
        "receiver": "user@example.org",
        "subject": "Welcome",
        "message": "Hello from mailroom",
    })
    .to_string()
}

/// A request whose built message is about 1 KB.
pub fn one_kb_json() -> String {
    let line = "The quick brown fox jumps over the lazy dog; mailroom bench line.\n";
    serde_json::json!({
        "sender": "App <app@example.com>",
        "receiver": "user@example.org",
        "subject": "A message of about one kilobyte",
        "message": line.repeat(10),
    })
    .to_string()
}

/// The seed request as a [`MailRequest`].
pub fn seed_request() -> MailRequest {
    MailRequest::from_json(seed_json().as_bytes()).expect("the seed request is valid")
}

/// Relay settings for mailroom pointing at `sink` (STARTTLS required and
/// AUTH when the sink offers TLS).
pub fn settings_for(sink: &Sink) -> SmtpSettings {
    let tls = sink.ca_pem.is_some();
    SmtpSettings {
        host: if tls { "localhost" } else { "127.0.0.1" }.into(),
        port: sink.port,
        tls: if tls {
            TlsMode::Required
        } else {
            TlsMode::None
        },
        credentials: tls.then(|| (USER.to_string(), Secret::new(PASSWORD))),
        hello_name: Some("bench.local".into()),
        extra_root_pem: sink.ca_pem.clone(),
        timeout: Duration::from_secs(30),
    }
}

/// An engine configuration delivering to `sink` with `workers`, memory
/// spool, holding up to `capacity` messages.
pub fn config_for(sink: &Sink, workers: usize, capacity: usize) -> Config {
    let mut config = Config::for_outbox(std::env::temp_dir().join("mailroom-bench-unused"));
    config.relay = Relay::Smtp(settings_for(sink));
    config.workers = workers;
    config.queue_capacity = capacity;
    if let Ok(niceness) = std::env::var("BENCH_WORKER_NICE") {
        config.worker_niceness = niceness.trim().parse().unwrap_or(config.worker_niceness);
    }
    config
}

/// HTTP settings for an in-process server on a free loopback port.
pub fn http_settings() -> mailroom::HttpSettings {
    let mut settings = mailroom::HttpSettings::default();
    settings.listen = "127.0.0.1:0".parse().expect("address");
    settings
}

/// Rounds per figure (`BENCH_ROUNDS`, default 3); figures are medians.
pub fn rounds() -> usize {
    env_number("BENCH_ROUNDS", 3) as usize
}

/// A whole-number setting from the environment.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(default)
}

/// The median of some figures (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// The median of some durations.
pub fn median_duration(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// CPU time this process has used (all threads: user and system), from
/// /proc/self/stat. Robust to other load on the machine, unlike rates.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): state is
    // the 3rd field of the line, utime the 14th, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Linux reports clock ticks of 1/100 s (USER_HZ) here.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// One line about the machine, for the record.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|load| {
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, load average {load} at start")
}

/// Prints the benchmark's heading.
pub fn heading(title: &str) {
    println!("\n== {title} ==");
    println!("machine: {}", machine());
    println!(
        "rounds per figure: {} (medians; BENCH_ROUNDS to change)",
        rounds()
    );
}
