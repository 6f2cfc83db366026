//! Accept: K keep-alive clients POST the seed body to `/api/mail` while
//! the workers deliver to the bench SMTP sink (the queue never fills), with
//! the spool off (`none`) and on; beside it, in the same rounds, the
//! ceiling: a bare tiny_http server answering 202 to the same requests
//! with the same client. Prints figures.
//!
//! `cargo bench --bench accept`; BENCH_CLIENTS (default "1,32,128"),
//! BENCH_SECONDS per run (default 2), BENCH_ROUNDS (default 3),
//! BENCH_SPOOL=0 to skip the spool-on runs, BENCH_CLOSE=0 to skip the
//! ceiling that closes each connection after one request, BENCH_HELD=0 to
//! skip the run where the sink holds deliveries until the load ends (the
//! accept side alone), BENCH_ONLY_HELD=1 for that run alone (to profile
//! the accept side; "of ceil" is then meaningless).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{
    config_for, env_number, heading, median, median_duration, ms, process_cpu, rounds, seed_json,
};
use mailroom::config::SpoolSetting;
use mailroom::{Engine, HttpServer};
use mailroom_testkit::load::{post_request, run_load, LoadReport};

/// Per server: load reports, messages delivered, CPU microseconds per request.
type Figures = (Server, Vec<LoadReport>, Vec<u64>, Vec<f64>);

/// Enough room that the queue never fills during a run.
const CAPACITY: usize = 200_000;
/// Per-client bound on the request loop.
const MAX_PER_CLIENT: u64 = 1_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Ceiling,
    /// The ceiling, closing each connection after its answer.
    CeilingClose,
    /// mailroom, spool none, with the sink holding deliveries until the
    /// run ends: the accept side alone.
    SpoolNoneHeld,
    SpoolNone,
    SpoolOn,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Ceiling => "bare tiny_http (ceiling)",
            Server::CeilingClose => "bare tiny_http, conn close",
            Server::SpoolNoneHeld => "mailroom, none, held",
            Server::SpoolNone => "mailroom, spool none",
            Server::SpoolOn => "mailroom, spool on",
        }
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("accept: POST /api/mail over keep-alive connections");
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,32,128".into())
        .split(',')
        .filter_map(|value| value.trim().parse().ok())
        .collect();
    let seconds = Duration::from_secs(env_number("BENCH_SECONDS", 2));
    let mut servers = vec![Server::Ceiling, Server::SpoolNone];
    if env_number("BENCH_CLOSE", 1) == 1 {
        servers.push(Server::CeilingClose);
    }
    if env_number("BENCH_HELD", 1) == 1 {
        servers.push(Server::SpoolNoneHeld);
    }
    if env_number("BENCH_SPOOL", 1) == 1 {
        servers.push(Server::SpoolOn);
    }
    if env_number("BENCH_ONLY_HELD", 0) == 1 {
        servers = vec![Server::SpoolNoneHeld];
    }
    let sink = Sink::start(SinkOptions::default());
    let body = seed_json();
    let request = post_request("/api/mail", &body);
    println!(
        "request: {} bytes (seed body {} bytes); {} s per run; mailroom: 5 workers delivering to the bench sink (plain), in-process, no logger; spool on = the spool on this branch",
        request.len(),
        body.len(),
        seconds.as_secs(),
    );
    println!(
        "{:>4} {:<26} {:>9} {:>8} {:>8} {:>8} {:>7} {:>11} {:>9} {:>10} {:>8}",
        "K",
        "server",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "1st ans ms",
        "of ceil",
        "delivered",
        "CPU us"
    );
    for &k in &clients {
        let mut figures: Vec<Figures> = servers
            .iter()
            .map(|&server| (server, Vec::new(), Vec::new(), Vec::new()))
            .collect();
        for _ in 0..rounds() {
            for (server, reports, delivered, cpu) in &mut figures {
                let (report, sent, used) = run(*server, &sink, k, seconds, &request);
                cpu.push(used.as_secs_f64() * 1e6 / report.ok.max(1) as f64);
                reports.push(report);
                delivered.push(sent);
            }
        }
        let ceiling = median(
            &figures[0]
                .1
                .iter()
                .map(LoadReport::rate)
                .collect::<Vec<_>>(),
        );
        for (server, reports, delivered, cpu) in &figures {
            let rate = median(&reports.iter().map(LoadReport::rate).collect::<Vec<_>>());
            let pick = |f: fn(&LoadReport) -> Duration| {
                median_duration(&reports.iter().map(f).collect::<Vec<_>>())
            };
            println!(
                "{:>4} {:<26} {:>9.0} {:>8} {:>8} {:>8} {:>7} {:>11} {:>8.0}% {:>10} {:>8.0}",
                k,
                server.name(),
                rate,
                ms(pick(|r| r.percentile(50.0))),
                ms(pick(|r| r.percentile(99.0))),
                ms(pick(LoadReport::max)),
                reports.iter().map(|r| r.errors).max().unwrap_or(0),
                ms(pick(|r| r.slowest_first)),
                rate / ceiling * 100.0,
                if *server == Server::Ceiling {
                    "-".to_string()
                } else {
                    delivered.iter().max().unwrap_or(&0).to_string()
                },
                median(cpu)
            );
        }
    }
    println!("figures: medians over rounds; errors: the most in any round; 1st ans: slowest first answer of any connection; delivered: messages the sink got during the run and the drain after it; CPU us: CPU time of the whole bench process (clients, server, and for mailroom its workers and the sink until drained) per accepted request; held: the sink holds deliveries until the load ends, so the figures (CPU included) are the accept side alone");
}

/// One load run against a fresh server; returns the load report and, for
/// mailroom, how many messages reached the sink (after draining), and the
/// CPU time the whole bench process used (for mailroom: until drained).
fn run(
    server: Server,
    sink: &Sink,
    clients: usize,
    seconds: Duration,
    request: &[u8],
) -> (LoadReport, u64, Duration) {
    let cpu = process_cpu();
    match server {
        Server::Ceiling | Server::CeilingClose => {
            let bare = Bare::start(server == Server::CeilingClose);
            let report = run_load(bare.address, clients, seconds, request, 202, MAX_PER_CLIENT);
            let cpu = process_cpu() - cpu;
            drop(bare);
            (report, 0, cpu)
        }
        Server::SpoolNone | Server::SpoolOn | Server::SpoolNoneHeld => {
            if server == Server::SpoolNoneHeld {
                sink.close_gate();
            }
            let mut config = config_for(sink, 5, CAPACITY);
            let spool = std::env::temp_dir().join(format!(
                "mailroom-bench-spool-{}-{}",
                std::process::id(),
                clients
            ));
            if server == Server::SpoolOn {
                let _ = std::fs::remove_dir_all(&spool);
                config.spool = SpoolSetting::Directory(spool.clone());
            }
            let engine = Engine::start(config).expect("the engine starts");
            let http =
                Arc::new(HttpServer::bind(engine.clone(), common::http_settings()).expect("bind"));
            let address = http.local_addr();
            let runner = Arc::clone(&http);
            let accept = std::thread::spawn(move || runner.run());
            let before = sink.messages();
            let report = run_load(address, clients, seconds, request, 202, MAX_PER_CLIENT);
            // CPU of the accept side alone when deliveries were held.
            let held_cpu = process_cpu() - cpu;
            sink.open_gate();
            // Drain what was accepted before stopping (bounded).
            let deadline = Instant::now() + Duration::from_secs(120);
            while engine.unfinished() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let delivered = sink.messages() - before;
            let left = engine.unfinished();
            if left > 0 {
                println!("  note: {left} accepted messages still undelivered after the drain");
            }
            let cpu = if server == Server::SpoolNoneHeld {
                held_cpu
            } else {
                process_cpu() - cpu
            };
            http.stop();
            let _ = accept.join();
            engine.shutdown();
            let _ = std::fs::remove_dir_all(&spool);
            (report, delivered, cpu)
        }
    }
}

/// The ceiling: tiny_http with nothing behind it, answering every request
/// with a 202 and a JSON body the size of mailroom's.
struct Bare {
    address: SocketAddr,
    server: Arc<tiny_http::Server>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Threads calling `recv` on the bare server.
const BARE_THREADS: usize = 2;

impl Bare {
    /// With `close`, every answer says `Connection: close` (one request per
    /// connection; the fork honours it, 0.12.0 dropped the header).
    fn start(close: bool) -> Bare {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind"));
        let address = server.server_addr().to_ip().expect("an IP address");
        let threads = (0..BARE_THREADS)
            .map(|_| {
                let server = Arc::clone(&server);
                std::thread::spawn(move || {
                    let answer = br#"{"message":"ok","data":{"id":"0123456789abcdef0123456789","status":"queued"}}"#;
                    let content_type = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/json"[..],
                    )
                    .expect("header");
                    let connection =
                        tiny_http::Header::from_bytes(&b"Connection"[..], &b"close"[..])
                            .expect("header");
                    while let Ok(mut request) = server.recv() {
                        let mut body = Vec::new();
                        let _ = request.as_reader().read_to_end(&mut body);
                        let mut response = tiny_http::Response::from_data(&answer[..])
                            .with_status_code(202)
                            .with_header(content_type.clone());
                        if close {
                            response.add_header(connection.clone());
                        }
                        let _ = request.respond(response);
                    }
                })
            })
            .collect();
        Bare {
            address,
            server,
            threads,
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
