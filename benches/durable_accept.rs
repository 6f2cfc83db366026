//! Accepted `POST /api/mail` per second, with the durable spool and with
//! `MAILROOM_SPOOL_DIR=none`, in the same run.
//!
//! The engine and the HTTP server run in this process; 32 client threads
//! (`MAILROOM_BENCH_CLIENTS`) each keep one HTTP/1.1 connection alive and
//! POST the seed body as fast as they are answered, for
//! `MAILROOM_BENCH_SECONDS` (default 5) per mode after a 1 s warm-up.
//! Messages are delivered meanwhile to a minimal SMTP sink on loopback (it
//! answers 250 to everything and keeps nothing), so the workers compete for
//! the CPU as in production. The spool lives in a fresh directory under
//! `MAILROOM_BENCH_DIR` (default: the system temp dir — say which file
//! system that is when you report figures; tmpfs makes fsync free).
//!
//! Run: `cargo bench --bench durable_accept`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::config::{Relay, SmtpSettings, SpoolSetting, TlsMode};
use mailroom::{Config, Engine, HttpServer};

const SEED_BODY: &str = r#"{"sender":"App <app@example.com>","receiver":"user@example.org","subject":"Welcome","message":"Hello from mailroom"}"#;

fn main() {
    let clients = env_number("MAILROOM_BENCH_CLIENTS", 32) as usize;
    let seconds = env_number("MAILROOM_BENCH_SECONDS", 5);
    // Without RUST_LOG nothing is logged; with it, the service's log lines
    // (two per message) go to stderr as in production.
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::init();
    }
    let base = std::env::var_os("MAILROOM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let sink = start_sink();
    println!(
        "durable_accept: {clients} keep-alive clients, {seconds} s per mode, seed body, \
         SMTP sink on {sink}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let spool_dir = base.join(format!("mailroom-bench-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool_dir);
    let durable = run(
        SpoolSetting::Directory(spool_dir.clone()),
        sink,
        clients,
        seconds,
    );
    let spool_bytes = directory_bytes(&spool_dir);
    let _ = std::fs::remove_dir_all(&spool_dir);
    let memory = run(SpoolSetting::Memory, sink, clients, seconds);
    println!(
        "spool {}: {:.0} accepted/s ({} accepted, {} refused, p50 {:.2} ms, p99 {:.2} ms, \
         max {:.1} ms, {:.0} µs CPU per accept; spool held {} KiB at the end)",
        spool_dir.display(),
        durable.rate,
        durable.accepted,
        durable.refused,
        durable.p50_ms,
        durable.p99_ms,
        durable.max_ms,
        durable.cpu_us,
        spool_bytes / 1024
    );
    println!(
        "spool none: {:.0} accepted/s ({} accepted, {} refused, p50 {:.2} ms, p99 {:.2} ms, \
         max {:.1} ms, {:.0} µs CPU per accept)",
        memory.rate,
        memory.accepted,
        memory.refused,
        memory.p50_ms,
        memory.p99_ms,
        memory.max_ms,
        memory.cpu_us
    );
    println!(
        "durable / memory: {:.0}%",
        100.0 * durable.rate / memory.rate.max(1.0)
    );
}

struct Figures {
    rate: f64,
    accepted: u64,
    refused: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU time of the whole process (clients and sink included) per
    /// accepted request, in microseconds.
    cpu_us: f64,
}

fn run(spool: SpoolSetting, sink: SocketAddr, clients: usize, seconds: u64) -> Figures {
    let mut config = Config::for_outbox(std::env::temp_dir().join("mailroom-bench-unused"));
    config.relay = Relay::Smtp(SmtpSettings {
        host: "127.0.0.1".into(),
        port: sink.port(),
        tls: TlsMode::None,
        credentials: None,
        hello_name: Some("bench.test".into()),
        extra_root_pem: None,
        timeout: Duration::from_secs(10),
    });
    config.spool = spool;
    // Measure acceptance, not back-pressure.
    config.queue_capacity = 10_000_000;
    config.shutdown_timeout = Duration::from_secs(2);
    let engine = Engine::start(config).expect("engine starts");
    let server = Arc::new(HttpServer::bind(engine.clone(), http_settings()).expect("bind"));
    let address = server.local_addr();
    let runner = Arc::clone(&server);
    let accept_loop = std::thread::spawn(move || runner.run());

    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let request = format!(
        "POST /api/mail HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{SEED_BODY}",
        SEED_BODY.len()
    );
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            // Connections open one at a time, each answered once before the
            // next: tiny_http 0.12's connection thread pool can leave a
            // connection that arrives in a burst unserved for as long as
            // the others stay open (see the report), which would measure
            // that, not the spool.
            let (mut writer, mut reader) = connect(address);
            writer.write_all(request.as_bytes()).expect("first request");
            read_reply(&mut reader).expect("first answer");
            let mut connection = Some((writer, reader));
            let (measuring, done) = (Arc::clone(&measuring), Arc::clone(&done));
            let (accepted, refused) = (Arc::clone(&accepted), Arc::clone(&refused));
            let request = request.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    // Reconnects when the server closed the connection.
                    let (writer, reader) = connection.get_or_insert_with(|| connect(address));
                    let answer = writer
                        .write_all(request.as_bytes())
                        .and_then(|()| read_reply(reader));
                    let code = match answer {
                        Ok((code, keep_alive)) => {
                            if !keep_alive {
                                connection = None;
                            }
                            code
                        }
                        Err(_) => {
                            connection = None;
                            continue;
                        }
                    };
                    if measuring.load(Ordering::Relaxed) {
                        latencies.push(started.elapsed());
                        if code == 202 {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        } else {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(1)); // warm-up
    measuring.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    std::thread::sleep(Duration::from_secs(seconds));
    let cpu = process_cpu_seconds() - cpu_before;
    measuring.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let per_client: Vec<Vec<Duration>> = threads
        .into_iter()
        .map(|thread| thread.join().expect("client thread"))
        .collect();
    let idle_clients = per_client
        .iter()
        .filter(|answers| answers.is_empty())
        .count();
    if idle_clients > 0 {
        println!("warning: {idle_clients} of {clients} clients got no answer while measuring");
    }
    let mut latencies: Vec<Duration> = per_client.into_iter().flatten().collect();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
    };
    server.stop();
    let _ = accept_loop.join();
    engine.shutdown();
    let accepted = accepted.load(Ordering::SeqCst);
    Figures {
        rate: accepted as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu * 1e6 / accepted.max(1) as f64,
        accepted,
        refused: refused.load(Ordering::SeqCst),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        max_ms: latencies
            .last()
            .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0),
    }
}

fn connect(address: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(address).expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    (stream.try_clone().expect("clone"), BufReader::new(stream))
}

/// Reads one answer (the service always sends Content-Length); returns its
/// code and whether the connection stays open.
fn read_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0;
    let mut keep_alive = true;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(std::io::Error::other)?;
            } else if name.eq_ignore_ascii_case("connection") {
                keep_alive = !value.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((code, keep_alive))
}

/// A minimal SMTP server that accepts everything and keeps nothing.
fn start_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("sink bind");
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = sink_session(stream);
            });
        }
    });
    address
}

fn sink_session(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 sink ESMTP\r\n")?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let command = String::from_utf8_lossy(&line).to_ascii_uppercase();
        if command.starts_with("EHLO") || command.starts_with("HELO") {
            writer.write_all(b"250-sink\r\n250 8BITMIME\r\n")?;
        } else if command.starts_with("DATA") {
            writer.write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
            }
            writer.write_all(b"250 OK\r\n")?;
        } else if command.starts_with("QUIT") {
            writer.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            writer.write_all(b"250 OK\r\n")?;
        }
    }
}

/// User and system CPU time of this process so far (Linux `/proc`; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks (100 per second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn directory_bytes(directory: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// HTTP settings for an in-process server on a free loopback port.
fn http_settings() -> mailroom::HttpSettings {
    let mut settings = mailroom::HttpSettings::default();
    settings.listen = "127.0.0.1:0".parse().expect("address");
    settings
}
