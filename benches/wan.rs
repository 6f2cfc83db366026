//! WAN: delivery through the testkit's latency proxy (each direction held
//! RTT/2, per-chunk timestamps, due chunks released together) to the bench
//! sink offering PIPELINING, at RTT 0/10/20/50 ms, 5 and 50 workers, plain
//! and STARTTLS+AUTH. Prints messages/s, round trips per message counted at
//! the proxy (every client flight, connection set-up included, over the
//! messages), and the limit `workers / (round trips × RTT)`.
//!
//! Two loads: a **backlog** (N messages queued before the sink greets:
//! each body goes with the next envelope) and **no backlog** (as many
//! closed-loop callers as workers, each sending through `/api/mail/v2`'s
//! engine call and waiting for the relay's answer before the next: nothing
//! to carry with a body). Plus a message to 10 recipients against one to 1.
//!
//! With `postfix` installed (and BENCH_POSTFIX not 0), a private Postfix
//! instance runs as the peer on the same link: `smtp-source` → Postfix
//! (smtpd on a loopback port, its smtp client relaying to the proxy with
//! `smtp_tls_connection_reuse`) → proxy → the same sink; see
//! `common/postfix.rs` for exactly how it is set up.
//!
//! `cargo bench --bench wan`; BENCH_RTTS ("0,10,20,50"), BENCH_WORKERS
//! ("5,50"), BENCH_WAN_MESSAGES (2000), BENCH_TLS ("0,1"), BENCH_ROUNDS
//! (default 3; medians), BENCH_POSTFIX (1).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{config_for, env_number, heading, median, rounds, seed_request, LinkRun as Run};
use mailroom::config::Relay;
use mailroom::{Engine, MailRequest};
use mailroom_testkit::latency::LatencyProxy;

/// How long one run may take before it is reported as stuck.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|value| value.trim().parse().ok())
        .collect()
}

/// A sink behind a proxy with `rtt`.
struct Link {
    sink: Sink,
    proxy: LatencyProxy,
}

impl Link {
    fn start(tls: bool, rtt: Duration) -> Link {
        let sink = Sink::start(SinkOptions {
            tls,
            gated: true,
            ..SinkOptions::default()
        });
        let proxy = LatencyProxy::start(SocketAddr::from(([127, 0, 0, 1], sink.port)), rtt);
        Link { sink, proxy }
    }

    fn engine(&self, workers: usize, capacity: usize) -> Engine {
        let mut config = config_for(&self.sink, workers, capacity);
        if let Relay::Smtp(settings) = &mut config.relay {
            settings.port = self.proxy.port;
        }
        Engine::start(config).expect("the engine starts")
    }

    /// What the sink and the proxy have counted so far.
    fn mark(&self) -> Mark {
        Mark {
            messages: self.sink.messages(),
            flights: self.proxy.flights(),
            connections: self.proxy.connections(),
        }
    }

    /// The run since `start`, which took `elapsed`.
    fn run_since(&self, start: &Mark, elapsed: Duration) -> Run {
        let now = self.mark();
        Run {
            messages: now.messages - start.messages,
            elapsed,
            flights: now.flights - start.flights,
            connections: now.connections - start.connections,
        }
    }
}

/// Counts at the start of a run.
struct Mark {
    messages: u64,
    flights: u64,
    connections: u64,
}

/// N messages queued while the sink holds its greeting, then released.
fn backlog(link: &Link, workers: usize, count: u64, request: &MailRequest) -> Run {
    let sink = &link.sink;
    sink.close_gate();
    let start = link.mark();
    let engine = link.engine(workers, count as usize + 16);
    for _ in 0..count {
        engine.submit(request, None).expect("queued");
    }
    let started = Instant::now();
    sink.open_gate();
    let done = sink.wait_for(start.messages + count, RUN_LIMIT);
    let run = link.run_since(&start, done.unwrap_or_else(Instant::now) - started);
    engine.shutdown();
    run
}

/// `workers` callers, each sending and waiting for the outcome before its
/// next, `count` messages in all.
fn closed_loop(link: &Link, workers: usize, count: u64, request: &MailRequest) -> Run {
    let sink = &link.sink;
    sink.open_gate();
    let start = link.mark();
    let engine = link.engine(workers, workers * 4 + 16);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let callers: Vec<_> = (0..workers)
        .map(|_| {
            let (engine, next, request) = (engine.clone(), Arc::clone(&next), request.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::SeqCst) < count {
                    let _ = engine.send_and_wait(&request, None, RUN_LIMIT);
                }
            })
        })
        .collect();
    for caller in callers {
        let _ = caller.join();
    }
    let run = link.run_since(&start, started.elapsed());
    engine.shutdown();
    run
}

fn ten_recipients() -> MailRequest {
    let to: Vec<String> = (0..10).map(|i| format!("user{i}@example.org")).collect();
    MailRequest::from_json(
        serde_json::json!({
            "sender": "App <app@example.com>",
            "to": to,
            "subject": "Welcome",
            "message": "Hello from mailroom",
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid request")
}

/// Medians over rounds: rate, round trips per message, connections.
fn summary(runs: &[Run]) -> (f64, f64, u64, String) {
    let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    let trips: Vec<f64> = runs.iter().map(Run::round_trips).collect();
    let min = rates.iter().copied().fold(f64::MAX, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    let incomplete = runs.iter().filter(|run| run.elapsed >= RUN_LIMIT).count();
    let spread = if incomplete > 0 {
        format!("{min:.0}..{max:.0}, {incomplete} incomplete")
    } else {
        format!("{min:.0}..{max:.0}")
    };
    (
        median(&rates),
        median(&trips),
        runs.last().map_or(0, |run| run.connections),
        spread,
    )
}

fn limit(workers: usize, round_trips: f64, rtt: Duration) -> String {
    if rtt.is_zero() || round_trips <= 0.0 {
        return "-".into();
    }
    format!("{:.0}", workers as f64 / (round_trips * rtt.as_secs_f64()))
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("wan: delivery through a latency proxy (RTT/2 each way) to a sink offering PIPELINING");
    let rtts: Vec<Duration> = list("BENCH_RTTS", "0,10,20,50")
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    let workers: Vec<usize> = list("BENCH_WORKERS", "5,50")
        .into_iter()
        .map(|n| n as usize)
        .collect();
    let tls_modes: Vec<bool> = list("BENCH_TLS", "0,1")
        .into_iter()
        .map(|n| n == 1)
        .collect();
    let count = env_number("BENCH_WAN_MESSAGES", 2000);
    let request = seed_request();
    let ten = ten_recipients();
    println!(
        "N = {count} seed messages per run; RT/msg: client flights counted at the proxy (set-up included) / messages; limit: workers / (RT/msg x RTT)"
    );
    println!(
        "{:<14} {:>4} {:>4} {:<11} {:>9} {:>14} {:>7} {:>7} {:>6}",
        "sink", "RTT", "wkrs", "load", "msg/s", "spread", "RT/msg", "limit", "conns"
    );
    let postfix = common::postfix::Postfix::available();
    let mut postfix_rows = Vec::new();
    for &tls in &tls_modes {
        let kind = if tls { "STARTTLS+AUTH" } else { "plain" };
        for &rtt in &rtts {
            let link = Link::start(tls, rtt);
            for &n in &workers {
                let mut queued = Vec::new();
                let mut looped = Vec::new();
                for _ in 0..rounds() {
                    queued.push(backlog(&link, n, count, &request));
                    looped.push(closed_loop(&link, n, count, &request));
                }
                for (load, runs) in [("backlog", &queued), ("no backlog", &looped)] {
                    let (rate, trips, connections, spread) = summary(runs);
                    println!(
                        "{kind:<14} {:>4} {n:>4} {load:<11} {rate:>9.0} {spread:>14} {trips:>7.2} {:>7} {connections:>6}",
                        rtt.as_millis(),
                        limit(n, trips, rtt)
                    );
                }
                if let Some(postfix) = postfix.as_ref().filter(|_| n <= 50) {
                    let runs: Vec<Run> = (0..rounds())
                        .map(|_| postfix.run(&link.sink, &link.proxy, tls, n, count))
                        .collect();
                    let (rate, trips, connections, spread) = summary(&runs);
                    println!(
                        "{kind:<14} {:>4} {n:>4} {:<11} {rate:>9.0} {spread:>14} {trips:>7.2} {:>7} {connections:>6}",
                        rtt.as_millis(),
                        "Postfix",
                        limit(n, trips, rtt)
                    );
                    let ours = summary(&queued).0;
                    let ours_loop = summary(&looped).0;
                    postfix_rows.push((kind, rtt, n, ours / rate, ours_loop / rate));
                }
            }
            if rtt.as_millis() == 20 && tls == tls_modes[0] {
                let n = workers.first().copied().unwrap_or(5);
                let runs: Vec<Run> = (0..rounds())
                    .map(|_| backlog(&link, n, count, &ten))
                    .collect();
                let (rate, trips, _, spread) = summary(&runs);
                let single: Vec<Run> = (0..rounds())
                    .map(|_| closed_loop(&link, n, count, &ten))
                    .collect();
                let (single_rate, single_trips, _, single_spread) = summary(&single);
                println!(
                    "{kind:<14} {:>4} {n:>4} {:<11} {rate:>9.0} {spread:>14} {trips:>7.2} {:>7}   (10 recipients per message)",
                    rtt.as_millis(),
                    "backlog",
                    limit(n, trips, rtt)
                );
                println!(
                    "{kind:<14} {:>4} {n:>4} {:<11} {single_rate:>9.0} {single_spread:>14} {single_trips:>7.2} {:>7}   (10 recipients per message)",
                    rtt.as_millis(),
                    "no backlog",
                    limit(n, single_trips, rtt)
                );
            }
            if link.sink.improper_pipelining() > 0 {
                println!("  note: the sink refused pipelined commands");
            }
        }
    }
    if postfix.is_none() {
        println!("Postfix: not installed (or BENCH_POSTFIX=0): no comparison");
    }
    for (kind, rtt, n, backlog, no_backlog) in postfix_rows {
        println!(
            "mailroom / Postfix, {kind}, RTT {} ms, {n} connections: {backlog:.2} with a backlog, {no_backlog:.2} without",
            rtt.as_millis()
        );
    }
}
