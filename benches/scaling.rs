//! Scaling: delivery throughput with 1, 2, 5, 20 and 50 workers against a
//! slow relay (the bench sink adding 20 ms per message), each figure
//! against the 1-worker one. Prints figures.
//!
//! `cargo bench --bench scaling`; BENCH_WORKERS (default "1,2,5,20,50"),
//! BENCH_DELAY_MS (default 20), BENCH_PER_WORKER messages (default 100),
//! BENCH_ROUNDS (default 3).

mod common;

use std::time::Duration;

use common::deliver;
use common::sink::{Sink, SinkOptions};
use common::{env_number, heading, median, rounds, seed_request};

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("scaling: workers against a slow relay");
    let workers: Vec<usize> = std::env::var("BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2,5,20,50".into())
        .split(',')
        .filter_map(|value| value.trim().parse().ok())
        .collect();
    let delay = Duration::from_millis(env_number("BENCH_DELAY_MS", 20));
    let per_worker = env_number("BENCH_PER_WORKER", 100);
    let sink = Sink::start(SinkOptions {
        delay,
        gated: true,
        ..SinkOptions::default()
    });
    sink.open_gate();
    let request = seed_request();
    let message = deliver::built(&request);
    println!(
        "sink: benches/common/sink.rs, plain, {} ms per message; {per_worker} messages per worker per run; raw = the raw lettre loop with as many threads (at the workers' nice +{})",
        delay.as_millis(),
        mailroom::config::DEFAULT_WORKER_NICENESS
    );
    println!(
        "{:>7} {:>10} {:>9} {:>12} {:>10} {:>13}",
        "workers", "messages", "msg/s", "x 1 worker", "raw msg/s", "mailroom/raw"
    );
    let mut base = None;
    for &threads in &workers {
        let count = per_worker * threads as u64;
        let mut ours = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..rounds() {
            ours.push(deliver::mailroom(&sink, threads, count, &request).rate());
            raw.push(deliver::raw(&sink, threads, count, &message).rate());
        }
        let rate = median(&ours);
        let base_rate = *base.get_or_insert(rate);
        println!(
            "{:>7} {:>10} {:>9.1} {:>11.1}x {:>10.1} {:>13.2}",
            threads,
            count,
            rate,
            rate / base_rate,
            median(&raw),
            rate / median(&raw)
        );
    }
}
