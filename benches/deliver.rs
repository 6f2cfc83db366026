//! Deliver: N messages queued in mailroom's engine, delivered to the bench
//! SMTP sink (plain, then STARTTLS+AUTH), against a raw lettre loop with
//! the same thread count and the same sink. Prints figures.
//!
//! Twice: with a sink that does not offer PIPELINING (mailroom and the raw
//! loop both send one command at a time: the cost of the service itself),
//! and with one that does (mailroom pipelines its envelopes and, with its
//! backlog, sends each body with the next envelope; the raw loop pipelines
//! its envelope, the fastest plain lettre loop against such a sink).
//!
//! `cargo bench --bench deliver`; BENCH_MESSAGES (default 20000),
//! BENCH_WORKERS (default "1,5"), BENCH_ROUNDS (default 3),
//! BENCH_PIPELINING ("0,1": sinks without and with PIPELINING).

mod common;

use common::deliver::{self, DeliverRun};
use common::sink::{Sink, SinkOptions};
use common::{env_number, heading, median, rounds, seed_request};

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("deliver: messages/s to a local SMTP sink, mailroom vs raw lettre loop");
    let count = env_number("BENCH_MESSAGES", 20_000);
    let workers: Vec<usize> = std::env::var("BENCH_WORKERS")
        .unwrap_or_else(|_| "1,5".into())
        .split(',')
        .filter_map(|value| value.trim().parse().ok())
        .collect();
    let request = seed_request();
    let message = deliver::built(&request);
    println!(
        "message: the seed request, {} bytes as sent; sink: the testkit strict relay (thread per connection, counting only)",
        message.content.len()
    );
    println!("N = {count} messages per run; both sides timed from the start signal to the sink's count of N; CPU us/msg: CPU time of the whole bench process (sender and sink) per message; raw threads run at the workers' nice +{} (BENCH_RAW_NICE to change)", mailroom::config::DEFAULT_WORKER_NICENESS);

    let pipelining: Vec<bool> = std::env::var("BENCH_PIPELINING")
        .unwrap_or_else(|_| "0,1".into())
        .split(',')
        .filter_map(|value| value.trim().parse::<u8>().ok())
        .map(|value| value == 1)
        .collect();
    // BENCH_ONLY_MAILROOM=1: no raw runs (for profiling mailroom alone).
    let only_mailroom = env_number("BENCH_ONLY_MAILROOM", 0) == 1;
    // BENCH_ONLY_RAW=1: no mailroom runs.
    let only_raw = env_number("BENCH_ONLY_RAW", 0) == 1;
    let tls_modes: Vec<bool> = std::env::var("BENCH_TLS")
        .unwrap_or_else(|_| "0,1".into())
        .split(',')
        .filter_map(|value| value.trim().parse::<u8>().ok())
        .map(|value| value == 1)
        .collect();
    for tls in tls_modes {
        for &pipelined in &pipelining {
            let sink = Sink::start(SinkOptions {
                tls,
                gated: true,
                no_pipelining: !pipelined,
                ..SinkOptions::default()
            });
            sink.open_gate();
            let kind = match (tls, pipelined) {
                (false, false) => "plain",
                (false, true) => "plain+PIPE",
                (true, false) => "STARTTLS+AUTH",
                (true, true) => "TLS+AUTH+PIPE",
            };
            for &threads in &workers {
                let mut ours = Vec::new();
                let mut raw = Vec::new();
                for _ in 0..rounds() {
                    if only_raw {
                        let run = if pipelined {
                            deliver::raw_pipelined(&sink, threads, count, &message)
                        } else {
                            deliver::raw(&sink, threads, count, &message)
                        };
                        ours.push(run);
                        raw.push(run);
                        continue;
                    }
                    ours.push(deliver::mailroom(&sink, threads, count, &request));
                    if only_mailroom {
                        raw.push(ours[ours.len() - 1]);
                        continue;
                    }
                    raw.push(if pipelined {
                        deliver::raw_pipelined(&sink, threads, count, &message)
                    } else {
                        deliver::raw(&sink, threads, count, &message)
                    });
                }
                report(kind, threads, &ours, &raw);
            }
            if sink.improper_pipelining() > 0 {
                println!(
                    "  {kind:<13} note: the sink refused {} pipelined commands",
                    sink.improper_pipelining()
                );
            }
        }
        if only_mailroom || only_raw {
            continue;
        }
        let sink = Sink::start(SinkOptions {
            tls,
            ..SinkOptions::default()
        });
        let kind = if tls { "STARTTLS+AUTH" } else { "plain" };
        // lettre's own send path on a reused connection (what its pooled
        // SmtpTransport does), a few hundred messages: see docs/performance.md.
        let reference = deliver::lettre_send(&sink, 5, 250, &message);
        println!(
            "  {kind:<13} reference: lettre SmtpConnection::send (SmtpTransport's path), 5 threads, {} messages: {:>8.0} msg/s, {} connections",
            reference.messages,
            reference.rate(),
            reference.connections
        );
    }
}

fn report(kind: &str, threads: usize, ours: &[DeliverRun], raw: &[DeliverRun]) {
    let rates = |runs: &[DeliverRun]| runs.iter().map(DeliverRun::rate).collect::<Vec<_>>();
    let (our_rates, raw_rates) = (rates(ours), rates(raw));
    let ratios: Vec<f64> = our_rates
        .iter()
        .zip(&raw_rates)
        .map(|(ours, raw)| ours / raw)
        .collect();
    let incomplete = ours.iter().chain(raw).filter(|run| !run.complete).count();
    let spread = |rates: &[f64]| {
        let min = rates.iter().copied().fold(f64::MAX, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}..{max:.0}")
    };
    let cpu = |runs: &[DeliverRun]| {
        median(
            &runs
                .iter()
                .map(DeliverRun::cpu_per_message)
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "  {kind:<13} {threads:>2} workers  mailroom {:>8.0} msg/s ({}; {} connections; {:.0} CPU us/msg)  raw lettre loop {:>8.0} msg/s ({}; {} connections; {:.0} CPU us/msg)  mailroom/raw {:.2} (median of per-round ratios){}",
        median(&our_rates),
        spread(&our_rates),
        ours.last().map_or(0, |run| run.connections),
        cpu(ours),
        median(&raw_rates),
        spread(&raw_rates),
        raw.last().map_or(0, |run| run.connections),
        cpu(raw),
        median(&ratios),
        if incomplete > 0 {
            format!("  [{incomplete} runs incomplete]")
        } else {
            String::new()
        }
    );
}
