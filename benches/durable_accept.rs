//! The journal spool against memory mode (`MAILROOM_SPOOL_DIR=none`), in
//! the same run, interleaved round by round:
//!
//! - **accept** (deliveries running): K keep-alive clients POST the seed
//!   body to `/api/mail` for BENCH_SECONDS while 5 workers deliver to the
//!   bench sink; every durable `202` is fsync'd first;
//! - **accept alone**: the same with the sink holding every delivery until
//!   the load ends;
//! - **end to end**: K clients POST N messages in all while 5 workers
//!   deliver them; timed from the first POST to the sink's count of N;
//! - **rest** (journal only): one client, deliveries held: the time a
//!   commit takes when the machine is idle, against the same figure under
//!   load, printed with each journal part (from `/metrics`);
//! - **disk** (once, before the rounds): 1, 2 and 4 threads each making
//!   2,000 synchronous 4 KiB writes (`O_DIRECT | O_DSYNC`, as the journal
//!   writes) to one file: whether the disk runs commits side by side, i.e.
//!   what keeping two commits in flight could gain;
//! - **batch**: one client, 500 single POSTs against one `/api/mail/batch`
//!   of 500 items (one commit for the whole batch).
//!
//! The engine and the HTTP server run in this process (no logger); the
//! spool lives under BENCH_DIR (default: the system temp dir; say which
//! file system that is when you report figures: tmpfs makes fsync free).
//! Prints figures; asserts nothing.
//!
//! `cargo bench --bench durable_accept`; BENCH_CLIENTS (32), BENCH_SECONDS
//! (2), BENCH_MESSAGES (end to end, 20000), BENCH_WORKERS (5), BENCH_ROUNDS
//! (3), BENCH_DIR; BENCH_PARTS (disk,rest,accept,alone,e2e,batch) and BENCH_SPOOLS
//! (journal,memory) pick what runs; BENCH_NO_DRAIN=1 skips draining after
//! "accept alone" (for profiling).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{config_for, env_number, heading, median, process_cpu, rounds, seed_json};
use mailroom::config::SpoolSetting;
use mailroom::{Engine, HttpServer};
use mailroom_testkit::load::{post_request, run_load, LoadReport};

/// Room enough that the queue never fills.
const CAPACITY: usize = 1_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Spool {
    Journal,
    Memory,
}

impl Spool {
    fn name(self) -> &'static str {
        match self {
            Spool::Journal => "journal",
            Spool::Memory => "memory",
        }
    }
}

/// A running service: engine and HTTP server in this process.
struct Service {
    engine: Engine,
    http: Arc<HttpServer>,
    accept: Option<std::thread::JoinHandle<()>>,
    directory: Option<PathBuf>,
}

impl Service {
    fn start(sink: &Sink, spool: Spool) -> Service {
        let mut config = config_for(sink, env_number("BENCH_WORKERS", 5) as usize, CAPACITY);
        let directory = (spool == Spool::Journal).then(|| {
            let base = std::env::var_os("BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let directory = base.join(format!(
                "mailroom-bench-durable-{}-{}",
                std::process::id(),
                common::env_number("BENCH_SEQUENCE", 0)
            ));
            let _ = std::fs::remove_dir_all(&directory);
            directory
        });
        if let Some(directory) = &directory {
            config.spool = SpoolSetting::Directory(directory.clone());
        }
        let engine = Engine::start(config).expect("the engine starts");
        let http =
            Arc::new(HttpServer::bind(engine.clone(), common::http_settings()).expect("bind"));
        let runner = Arc::clone(&http);
        let accept = Some(std::thread::spawn(move || runner.run()));
        Service {
            engine,
            http,
            accept,
            directory,
        }
    }

    fn address(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Waits (bounded) until every accepted message is delivered.
    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.engine.unfinished() > 0 && Instant::now() < deadline {
            // Polling the engine's count, as a user polls /api/stats.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.http.stop();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        self.engine.shutdown();
        if let Some(directory) = &self.directory {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

/// The journal's commits in one run, from the engine's `/metrics` text.
#[derive(Clone, Copy, Default)]
struct Commits {
    commits: f64,
    records: f64,
    seconds: f64,
}

impl Commits {
    fn of(service: &Service) -> Option<Commits> {
        let text = service.engine.metrics_text();
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        };
        Some(Commits {
            commits: value("mailroom_spool_commits_total")?,
            records: value("mailroom_spool_records_total")?,
            seconds: value("mailroom_spool_commit_seconds_sum")?,
        })
    }

    /// Medians over runs: records per commit, and µs per commit.
    fn describe(runs: &[Commits]) -> String {
        let per_commit = |f: fn(&Commits) -> f64| {
            median(
                &runs
                    .iter()
                    .map(|c| f(c) / c.commits.max(1.0))
                    .collect::<Vec<_>>(),
            )
        };
        format!(
            "{:.1} records per commit, {:.0} us per commit (write and flush)",
            per_commit(|c| c.records),
            per_commit(|c| c.seconds * 1e6)
        )
    }
}

/// Synchronous writes by `threads` threads at once, as the journal makes
/// them; (writes/s, median µs, p99 µs), or why it could not run.
fn disk_writes(directory: &std::path::Path, threads: usize) -> std::io::Result<(f64, f64, f64)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const WRITES: usize = 2_000;
    const BLOCK: usize = 4096;
    std::fs::create_dir_all(directory)?;
    let path = directory.join(format!("mailroom-bench-disk-{}", std::process::id()));
    // Written out first: the journal overwrites zero-filled blocks too.
    std::fs::write(&path, vec![0u8; threads * WRITES * BLOCK])?;
    let file = std::fs::File::open(&path)?;
    file.sync_all()?;
    let started = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..threads)
            .map(|thread| {
                let path = &path;
                scope.spawn(move || -> std::io::Result<Vec<Duration>> {
                    let file = std::fs::File::options()
                        .write(true)
                        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                        .open(path)?;
                    let mut storage = vec![1u8; 2 * BLOCK];
                    let start = storage.as_ptr().align_offset(BLOCK);
                    let block = &mut storage[start..start + BLOCK];
                    let mut latencies = Vec::with_capacity(WRITES);
                    for write in 0..WRITES {
                        let offset = ((thread * WRITES + write) * BLOCK) as u64;
                        let begun = Instant::now();
                        file.write_all_at(block, offset)?;
                        latencies.push(begun.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    });
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    drop(file);
    let mut all: Vec<Duration> = latencies?.into_iter().flatten().collect();
    all.sort();
    let at = |fraction: f64| all[((all.len() - 1) as f64 * fraction) as usize].as_secs_f64() * 1e6;
    Ok((all.len() as f64 / elapsed.as_secs_f64(), at(0.5), at(0.99)))
}

/// Accept figures: the load report, CPU µs per request, and the journal's
/// commits.
type AcceptRun = (LoadReport, f64, Option<Commits>);

/// `clients` POST for `seconds` (the sink holding deliveries if `held`).
fn accept(sink: &Sink, spool: Spool, clients: usize, seconds: Duration, held: bool) -> AcceptRun {
    if held {
        sink.close_gate();
    }
    let service = Service::start(sink, spool);
    let request = post_request("/api/mail", &seed_json());
    let cpu = process_cpu();
    let report = run_load(service.address(), clients, seconds, &request, 202, u64::MAX);
    let cpu = process_cpu() - cpu;
    let commits = Commits::of(&service);
    let per_request = cpu.as_secs_f64() * 1e6 / report.ok.max(1) as f64;
    if held && env_number("BENCH_NO_DRAIN", 0) == 1 {
        // Profiling the accept side alone: nothing more to measure.
        drop(service);
        sink.open_gate();
        return (report, per_request, commits);
    }
    sink.open_gate();
    service.drain();
    (report, per_request, commits)
}

/// End to end: `count` messages through HTTP and the workers; messages/s,
/// and the journal's commits.
fn end_to_end(sink: &Sink, spool: Spool, clients: usize, count: u64) -> (f64, Option<Commits>) {
    sink.open_gate();
    let service = Service::start(sink, spool);
    let request = post_request("/api/mail", &seed_json());
    let before = sink.messages();
    let started = Instant::now();
    let report = run_load(
        service.address(),
        clients,
        Duration::from_secs(600),
        &request,
        202,
        count.div_ceil(clients as u64),
    );
    let accepted = report.ok;
    let done = sink.wait_for(before + accepted, Duration::from_secs(600));
    let elapsed = done.unwrap_or_else(Instant::now) - started;
    let rate = (sink.messages() - before) as f64 / elapsed.as_secs_f64();
    (rate, Commits::of(&service))
}

/// One client: `batches` × 500 single POSTs, then `batches` batches of 500;
/// messages/s for each.
fn batch(sink: &Sink, spool: Spool, batches: u64) -> (f64, f64) {
    sink.open_gate();
    let service = Service::start(sink, spool);
    let single = post_request("/api/mail", &seed_json());
    let started = Instant::now();
    let singles = run_load(
        service.address(),
        1,
        Duration::from_secs(600),
        &single,
        202,
        500 * batches,
    );
    let single_rate = singles.ok as f64 / started.elapsed().as_secs_f64();
    let item: serde_json::Value = serde_json::from_str(&seed_json()).expect("seed JSON");
    let body = serde_json::json!({ "messages": vec![item; 500] }).to_string();
    let request = post_request("/api/mail/batch", &body);
    let started = Instant::now();
    let batched = run_load(
        service.address(),
        1,
        Duration::from_secs(600),
        &request,
        200,
        batches,
    );
    let elapsed = started.elapsed();
    if batched.ok < batches {
        println!("  note: {} of {batches} batches answered 200", batched.ok);
    }
    let batch_rate = (batched.ok * 500) as f64 / elapsed.as_secs_f64();
    service.drain();
    (single_rate, batch_rate)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("durable: the journal spool against memory mode, same run");
    let clients = env_number("BENCH_CLIENTS", 32) as usize;
    let seconds = Duration::from_secs(env_number("BENCH_SECONDS", 2));
    let count = env_number("BENCH_MESSAGES", 20_000);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "{clients} keep-alive clients, seed body, {} workers delivering to the bench sink (plain, PIPELINING), spool under {}; end to end: {count} messages",
        env_number("BENCH_WORKERS", 5),
        base.display()
    );
    let sink = Sink::start(SinkOptions {
        gated: true,
        ..SinkOptions::default()
    });
    sink.open_gate();
    let spools = [Spool::Journal, Spool::Memory];
    let mut accepts: Vec<Vec<AcceptRun>> = vec![Vec::new(); 2];
    let mut alone: Vec<Vec<AcceptRun>> = vec![Vec::new(); 2];
    let mut e2e: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut e2e_commits: Vec<Commits> = Vec::new();
    let mut at_rest: Vec<AcceptRun> = Vec::new();
    let mut batches: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
    // BENCH_PARTS (disk,rest,accept,alone,e2e,batch) and BENCH_SPOOLS (journal,memory)
    // pick what runs, e.g. to profile one part.
    let parts =
        std::env::var("BENCH_PARTS").unwrap_or_else(|_| "disk,rest,accept,alone,e2e,batch".into());
    let only = std::env::var("BENCH_SPOOLS").unwrap_or_else(|_| "journal,memory".into());
    let runs = |part: &str, spool: Spool| parts.contains(part) && only.contains(spool.name());
    if parts.contains("disk") {
        for threads in [1, 2, 4] {
            match disk_writes(&base, threads) {
                Ok((rate, median, p99)) => println!(
                    "  {:<32} {threads} at once: {rate:>6.0} writes/s, median {median:.0} us, p99 {p99:.0} us",
                    "disk, synchronous 4 KiB writes"
                ),
                Err(error) => println!("  disk: cannot write direct under {}: {error}", base.display()),
            }
        }
    }
    for _ in 0..rounds() {
        if runs("rest", Spool::Journal) {
            at_rest.push(accept(&sink, Spool::Journal, 1, seconds, true));
        }
        for (index, &spool) in spools.iter().enumerate() {
            if runs("accept", spool) {
                accepts[index].push(accept(&sink, spool, clients, seconds, false));
            }
            if runs("alone", spool) {
                alone[index].push(accept(&sink, spool, clients, seconds, true));
            }
            if runs("e2e", spool) {
                let (rate, commits) = end_to_end(&sink, spool, clients, count);
                e2e[index].push(rate);
                e2e_commits.extend(commits);
            }
            if runs("batch", spool) {
                batches[index].push(batch(&sink, spool, 4));
            }
        }
    }
    let rate =
        |runs: &[AcceptRun]| median(&runs.iter().map(|(r, ..)| r.rate()).collect::<Vec<_>>());
    let p99 = |runs: &[AcceptRun]| {
        median(
            &runs
                .iter()
                .map(|(r, ..)| r.percentile(99.0).as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        )
    };
    let cpu = |runs: &[AcceptRun]| median(&runs.iter().map(|(_, c, _)| *c).collect::<Vec<_>>());
    let commits = |runs: &[AcceptRun]| {
        Commits::describe(&runs.iter().filter_map(|(.., c)| *c).collect::<Vec<_>>())
    };
    if !at_rest.is_empty() {
        println!(
            "  {:<32} journal  {:>8.0} req/s, p99 {:.2} ms; {}",
            "one client (the disk at rest)",
            rate(&at_rest),
            p99(&at_rest),
            commits(&at_rest)
        );
    }
    let spread = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::MAX, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}..{max:.0}")
    };
    for (title, figures) in [
        ("accept, deliveries running", &accepts),
        ("accept alone (deliveries held)", &alone),
    ] {
        if figures.iter().all(Vec::is_empty) {
            continue;
        }
        for (index, spool) in spools.iter().enumerate() {
            if figures[index].is_empty() {
                continue;
            }
            let rates: Vec<f64> = figures[index].iter().map(|(r, ..)| r.rate()).collect();
            println!(
                "  {title:<32} {:<8} {:>8.0} req/s ({}), p99 {:.2} ms, {:.0} CPU us/req",
                spool.name(),
                rate(&figures[index]),
                spread(&rates),
                p99(&figures[index]),
                cpu(&figures[index])
            );
            if *spool == Spool::Journal {
                println!("  {:<32} journal  {}", "", commits(&figures[index]));
            }
        }
        println!(
            "  {title:<32} journal / memory: {:.2}",
            rate(&figures[0]) / rate(&figures[1]).max(1.0)
        );
    }
    for (index, spool) in spools.iter().enumerate() {
        if e2e[index].is_empty() {
            continue;
        }
        println!(
            "  {:<32} {:<8} {:>8.0} msg/s ({})",
            "end to end",
            spool.name(),
            median(&e2e[index]),
            spread(&e2e[index])
        );
        if *spool == Spool::Journal {
            println!("  {:<32} journal  {}", "", Commits::describe(&e2e_commits));
        }
    }
    println!(
        "  {:<32} journal / memory: {:.2}",
        "end to end",
        median(&e2e[0]) / median(&e2e[1]).max(1.0)
    );
    for (index, spool) in spools.iter().enumerate() {
        if batches[index].is_empty() {
            continue;
        }
        let singles: Vec<f64> = batches[index].iter().map(|(s, _)| *s).collect();
        let batched: Vec<f64> = batches[index].iter().map(|(_, b)| *b).collect();
        println!(
            "  {:<32} {:<8} 500 single POSTs {:>8.0} msg/s ({}); batches of 500 {:>8.0} msg/s ({}); batch / single {:.1}",
            "one client",
            spool.name(),
            median(&singles),
            spread(&singles),
            median(&batched),
            spread(&batched),
            median(&batched) / median(&singles).max(1.0)
        );
    }
    println!("figures: medians over rounds (spread: min..max); CPU us/req: CPU time of the whole bench process (clients, server, workers, sink) per accepted request");
}
