//! Replicas on one Redis against the local journal, in the same run:
//! accept rate (batches of 100 through the engine, so HTTP costs are left
//! out) and end-to-end delivery rate to a local sink, with 1, 2 and 3
//! replicas (engines in this process, each its own Redis consumer), and
//! the Redis commands each accepted and delivered message costs (from
//! `INFO commandstats`). Prints figures; asserts nothing.
//!
//! Needs `redis-server`; says so and does nothing without it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{config_for, env_number, heading, machine, median, rounds, seed_request};
use mailroom::config::{RedisSettings, SpoolSetting};
use mailroom::{BatchItem, Engine};
use mailroom_testkit::redis::RedisServer;

/// All of `INFO commandstats`' `calls=` summed.
fn commands(redis: &RedisServer) -> u64 {
    let mut stream = TcpStream::connect(("127.0.0.1", redis.port)).expect("redis");
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .expect("sent");
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).expect("answer");
    let length: usize = header.trim_start_matches('$').trim().parse().unwrap_or(0);
    let mut body = vec![0; length];
    std::io::Read::read_exact(&mut reader, &mut body).expect("body");
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|line| line.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

struct Figures {
    accept_rate: f64,
    deliver_rate: f64,
    commands_per_message: Option<f64>,
}

fn run(count: usize, replicas: usize, redis: Option<&RedisServer>) -> Figures {
    let sink = Sink::start(SinkOptions::default());
    let spool = mailroom_testkit::temp_dir("bench-replicas-spool");
    if let Some(redis) = redis {
        redis.command(&["FLUSHALL"]);
    }
    let engines: Vec<Engine> = (0..replicas)
        .map(|_| {
            let mut config = config_for(&sink, 5, count * 2);
            config.status_retention = count * 2;
            match redis {
                Some(redis) => config.store = Some(RedisSettings::new(redis.url())),
                None => config.spool = SpoolSetting::Directory(spool.clone()),
            }
            Engine::start(config).expect("engine starts")
        })
        .collect();
    let before = redis.map(commands);
    // Deliveries wait behind the gate while accepting is measured.
    sink.close_gate();
    let request = seed_request();
    let started = Instant::now();
    for chunk in 0..count / 100 {
        let items: Vec<BatchItem<'_>> = (0..100).map(|_| BatchItem::new(&request, None)).collect();
        let engine = &engines[chunk % engines.len()];
        for result in engine.submit_batch(&items) {
            result.expect("accepted");
        }
    }
    let accepted = started.elapsed();
    let after_accept = redis.map(commands);
    let opened = Instant::now();
    sink.open_gate();
    let done = sink
        .wait_for(count as u64, Duration::from_secs(300))
        .expect("every message delivered");
    let delivering = done.duration_since(opened);
    let after = redis.map(commands);
    for engine in &engines {
        engine.shutdown();
    }
    let _ = std::fs::remove_dir_all(&spool);
    let per_message = match (before, after_accept, after) {
        (Some(before), Some(_), Some(after)) => Some((after - before) as f64 / count as f64),
        _ => None,
    };
    Figures {
        accept_rate: count as f64 / accepted.as_secs_f64(),
        deliver_rate: count as f64 / delivering.as_secs_f64(),
        commands_per_message: per_message,
    }
}

fn main() {
    heading("replicas on Redis against the local journal");
    println!("{}", machine());
    let Some(redis) = RedisServer::start("bench-replicas") else {
        println!("no redis-server: nothing measured (apt-get install redis-server)");
        return;
    };
    let count = env_number("BENCH_REPLICA_MESSAGES", 5_000) as usize;
    println!(
        "{count} messages, batches of 100, 5 workers per replica, local sink; Redis with appendfsync always"
    );
    let rounds = rounds();
    let mut rows = Vec::new();
    for (label, replicas, use_redis) in [
        ("local journal, 1 process", 1, false),
        ("Redis, 1 replica", 1, true),
        ("Redis, 2 replicas", 2, true),
        ("Redis, 3 replicas", 3, true),
    ] {
        let runs: Vec<Figures> = (0..rounds)
            .map(|_| run(count, replicas, use_redis.then_some(&redis)))
            .collect();
        let accept = median(&runs.iter().map(|f| f.accept_rate).collect::<Vec<_>>());
        let deliver = median(&runs.iter().map(|f| f.deliver_rate).collect::<Vec<_>>());
        let commands: Vec<f64> = runs.iter().filter_map(|f| f.commands_per_message).collect();
        rows.push((
            label,
            accept,
            deliver,
            (!commands.is_empty()).then(|| median(&commands)),
        ));
    }
    println!(
        "| setup | accepted msg/s | delivered msg/s | Redis commands per message (accept + delivery) |"
    );
    println!("|---|---|---|---|");
    for (label, accept, deliver, commands) in rows {
        println!(
            "| {label} | {accept:.0} | {deliver:.0} | {} |",
            commands.map_or("—".to_string(), |c| format!("{c:.1}"))
        );
    }
}
