//! Memory: the release binary as a child process; VmRSS and VmHWM from
//! /proc/PID/status when idle, around messages with a large attachment,
//! with 100,000 messages of about 1 KB held while the relay is down, and
//! with 100,000 scheduled a week ahead with the spool on. Prints figures.
//!
//! `cargo bench --bench memory`; BENCH_QUEUED (default 100000),
//! BENCH_SCHEDULED (default 100000), BENCH_ATTACHMENT_MIB (default 7).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{env_number, machine, one_kb_json, seed_json};
use mailroom_testkit::load::{post_request, run_load};

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!("\n== memory: RSS of the release binary (child process) ==");
    println!("machine: {}", machine());
    let queued = env_number("BENCH_QUEUED", 100_000);
    let directory =
        std::env::temp_dir().join(format!("mailroom-bench-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("a work directory");

    // Idle: relay up (the bench sink), default settings, spool on and off.
    let sink = Sink::start(SinkOptions::default());
    let relay = format!("smtp://127.0.0.1:{}", sink.port);
    for spool in ["none", "spool"] {
        let spool_dir = directory.join("spool").to_string_lossy().into_owned();
        let spool_value = if spool == "none" {
            "none".to_string()
        } else {
            spool_dir
        };
        let service = Service::start(
            &directory,
            &[
                ("MAILROOM_SMTP_URL", relay.clone()),
                ("MAILROOM_SPOOL_DIR", spool_value),
            ],
        );
        let (rss, hwm) = service.memory();
        println!(
            "idle, just started (spool {spool}, 5 workers, relay up): VmRSS {:.1} MB, VmHWM {:.1} MB",
            mb(rss),
            mb(hwm)
        );
        if spool == "none" {
            // The same process after 20,000 seed messages went through.
            let request = post_request("/api/mail", &seed_json());
            let report = run_load(
                service.address,
                8,
                Duration::from_secs(600),
                &request,
                202,
                2_500,
            );
            service.wait_metric("mailroom_messages_sent_total", report.ok);
            let (rss, hwm) = service.memory();
            println!(
                "idle again after {} seed messages were delivered (their statuses kept): VmRSS {:.1} MB, VmHWM {:.1} MB",
                report.ok,
                mb(rss),
                mb(hwm)
            );
        }
        service.stop();
    }

    // Large attachments: one message with a 7 MiB attachment, then four at
    // once; peak (VmHWM) and what stays (VmRSS) once they were delivered.
    let attachment_mib = env_number("BENCH_ATTACHMENT_MIB", 7) as usize;
    let body = large_attachment_json(attachment_mib << 20);
    let request = post_request("/api/mail", &body);
    for spool in ["none", "spool"] {
        let spool_value = if spool == "none" {
            "none".to_string()
        } else {
            directory
                .join(format!("spool-large-{}", std::process::id()))
                .to_string_lossy()
                .into_owned()
        };
        let service = Service::start(
            &directory,
            &[
                ("MAILROOM_SMTP_URL", relay.clone()),
                ("MAILROOM_SPOOL_DIR", spool_value),
            ],
        );
        let (idle, _) = service.memory();
        let one = run_load(
            service.address,
            1,
            Duration::from_secs(120),
            &request,
            202,
            1,
        );
        service.wait_metric("mailroom_messages_sent_total", one.ok);
        let (after_one, peak_one) = service.memory();
        let four = run_load(
            service.address,
            4,
            Duration::from_secs(120),
            &request,
            202,
            1,
        );
        service.wait_metric("mailroom_messages_sent_total", one.ok + four.ok);
        let (after_four, peak_four) = service.memory();
        println!(
            "{attachment_mib} MiB attachment (request body {:.1} MB; spool {spool}): idle VmRSS {:.1} MB; one message: peak VmHWM {:.1} MB, VmRSS {:.1} MB once delivered; four at once ({} accepted, {} errors): peak VmHWM {:.1} MB, VmRSS {:.1} MB once delivered",
            body.len() as f64 / 1e6,
            mb(idle),
            mb(peak_one),
            mb(after_one),
            four.ok,
            four.errors,
            mb(peak_four),
            mb(after_four)
        );
        service.stop();
    }

    // Relay down: a port with nothing listening; retries far apart, so the
    // messages stay held.
    let down = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address").port()
    };
    let service = Service::start(
        &directory,
        &[
            ("MAILROOM_SMTP_URL", format!("smtp://127.0.0.1:{down}")),
            ("MAILROOM_SPOOL_DIR", "none".into()),
            ("MAILROOM_QUEUE_CAPACITY", queued.to_string()),
            ("MAILROOM_RETRY_BASE_MS", "3600000".into()),
            ("MAILROOM_RETRY_MAX_MS", "3600000".into()),
        ],
    );
    let (idle, _) = service.memory();
    let body = one_kb_json();
    let built = mailroom::MailRequest::from_json(body.as_bytes())
        .expect("valid")
        .build(None)
        .expect("builds");
    let request = post_request("/api/mail", &body);
    let clients = 8;
    let started = Instant::now();
    let report = run_load(
        service.address,
        clients,
        Duration::from_secs(600),
        &request,
        202,
        queued / clients as u64,
    );
    // Every message has had its first (failed) attempt and waits for a retry.
    service.wait_metric("mailroom_retry_depth", report.ok);
    let (rss, hwm) = service.memory();
    println!(
        "relay down, {} messages held (spool none; each {} bytes as built, request body {} bytes; accepted in {:.1} s, {} errors): VmRSS {:.1} MB, VmHWM {:.1} MB, {:.0} bytes per message above idle",
        report.ok,
        built.content.len(),
        body.len(),
        started.elapsed().as_secs_f64(),
        report.errors,
        mb(rss),
        mb(hwm),
        (rss.saturating_sub(idle)) as f64 / report.ok.max(1) as f64
    );
    service.stop();

    // Scheduled sends with the spool on: the content waits on disk, only
    // the id (and the status) in memory.
    let scheduled = env_number("BENCH_SCHEDULED", 100_000);
    let spool = directory.join(format!("spool-scheduled-{}", std::process::id()));
    let service = Service::start(
        &directory,
        &[
            ("MAILROOM_SMTP_URL", relay.clone()),
            ("MAILROOM_SPOOL_DIR", spool.to_string_lossy().into_owned()),
        ],
    );
    let (idle, _) = service.memory();
    let mut later: serde_json::Value = serde_json::from_str(&one_kb_json()).expect("JSON");
    let send_at = std::time::SystemTime::now() + Duration::from_secs(7 * 24 * 3600);
    later["send_at"] = serde_json::Value::String(mailroom_testkit::time::rfc3339(send_at));
    let body = later.to_string();
    let request = post_request("/api/mail", &body);
    let started = Instant::now();
    let report = run_load(
        service.address,
        clients,
        Duration::from_secs(900),
        &request,
        202,
        scheduled / clients as u64,
    );
    let (rss, hwm) = service.memory();
    println!(
        "{} messages of ~1 KB scheduled a week ahead (spool on: content on disk, ids in memory; accepted in {:.1} s, {} errors): VmRSS {:.1} MB (idle {:.1} MB), VmHWM {:.1} MB, {:.0} bytes per scheduled message above idle",
        report.ok,
        started.elapsed().as_secs_f64(),
        report.errors,
        mb(rss),
        mb(idle),
        mb(hwm),
        (rss.saturating_sub(idle)) as f64 / report.ok.max(1) as f64
    );
    service.stop();
    let _ = std::fs::remove_dir_all(&directory);
}

/// A request with one attachment of `size` pseudo-random bytes.
fn large_attachment_json(size: usize) -> String {
    use base64::Engine as _;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    serde_json::json!({
        "sender": "App <app@example.com>",
        "receiver": "user@example.org",
        "subject": "A large attachment",
        "message": "See the attached file.",
        "attachments": [{
            "filename": "large.bin",
            "content_type": "application/octet-stream",
            "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
        }],
    })
    .to_string()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The release binary running as a child process.
struct Service {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Service {
    fn start(directory: &std::path::Path, variables: &[(&str, String)]) -> Service {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("address").port()
        };
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = directory.join(format!("service-{port}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
        command
            .current_dir(directory)
            .env_clear()
            .env("MAILROOM_LISTEN", address.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"));
        for (name, value) in variables {
            command.env(name, value);
        }
        // For experiments with glibc's allocator (e.g. MALLOC_ARENA_MAX=2).
        if let Ok(arenas) = std::env::var("MALLOC_ARENA_MAX") {
            command.env("MALLOC_ARENA_MAX", arenas);
        }
        let child = command.spawn().expect("start the release binary");
        let service = Service {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(address).is_err() {
            assert!(
                Instant::now() < deadline,
                "the service did not start: {}",
                service.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        service
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// VmRSS and VmHWM in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Polls /metrics until `name` reaches `value` (bounded).
    fn wait_metric(&self, name: &str, value: u64) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let current = self.metric(name);
            if current >= value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} stayed at {current}, expected {value}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect(self.address) else {
            return 0;
        };
        let _ =
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
