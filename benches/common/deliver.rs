//! The two sides of the delivery ratio, timed the same way (from the start
//! signal until the sink has counted every message):
//! - [`mailroom`]: N messages submitted to the engine while the sink holds
//!   its sessions, then released; the workers deliver them.
//! - [`raw`]: the fastest plain loop of lettre sends we can write: one
//!   reused `SmtpConnection` per thread, the message pre-built and
//!   pre-dot-stuffed, body and terminator in one write, no queue, no
//!   status, no HTTP.
//!
//! Plus [`lettre_send`], lettre's own send path as its pooled
//! `SmtpTransport` uses it, for reference (see docs/performance.md on
//! switching back to it).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use mailroom::{Engine, MailRequest, OutgoingMessage};

use super::sink::Sink;
use super::{config_for, process_cpu, PASSWORD, USER};

/// How long a delivery run may take before it is reported as stuck.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// One delivery run.
#[derive(Debug, Clone, Copy)]
pub struct DeliverRun {
    /// Messages the sink counted.
    pub messages: u64,
    /// From the start signal to the last message counted.
    pub elapsed: Duration,
    /// SMTP connections opened during the run.
    pub connections: u64,
    /// False when the run hit [`RUN_LIMIT`].
    pub complete: bool,
    /// CPU time the whole bench process used (both ends of SMTP).
    pub cpu: Duration,
}

impl DeliverRun {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per message (sender and sink together).
    pub fn cpu_per_message(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages.max(1) as f64
    }
}

/// mailroom's engine with `workers` delivers `count` copies of `request`.
/// All are queued before the sink lets the first session greet, so the
/// figure is delivery alone (connection set-up included, as for [`raw`]).
pub fn mailroom(sink: &Sink, workers: usize, count: u64, request: &MailRequest) -> DeliverRun {
    sink.close_gate();
    let engine =
        Engine::start(config_for(sink, workers, count as usize + 16)).expect("the engine starts");
    let before = sink.messages();
    for _ in 0..count {
        engine.submit(request, None).expect("queued");
    }
    let cpu = process_cpu();
    let started = Instant::now();
    sink.open_gate();
    let done = sink.wait_for(before + count, RUN_LIMIT);
    let finished = done.unwrap_or_else(Instant::now);
    let cpu = process_cpu() - cpu;
    // The engine's bookkeeping after the last 250 (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.unfinished() > 0 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let run = DeliverRun {
        messages: sink.messages() - before,
        elapsed: finished - started,
        connections: engine.connections_opened(),
        complete: done.is_some(),
        cpu,
    };
    engine.shutdown();
    run
}

/// The message mailroom would send for `request`, as the raw loop sends it.
pub fn built(request: &MailRequest) -> OutgoingMessage {
    request.build(None).expect("the request builds")
}

/// How the raw loop talks to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loop {
    /// MAIL, each RCPT, DATA, each waiting for its reply; then the body.
    OneAtATime,
    /// MAIL, the RCPTs and DATA in one write, the replies read in order;
    /// then the body (PIPELINING, RFC 2920).
    Pipelined,
    /// lettre's own `SmtpConnection::send`.
    LettreSend,
}

/// `threads` threads, each with one reused lettre `SmtpConnection`, send
/// `count` messages in all (taken from a shared counter), one command at a
/// time.
pub fn raw(sink: &Sink, threads: usize, count: u64, message: &OutgoingMessage) -> DeliverRun {
    lettre_loop(sink, threads, count, message, Loop::OneAtATime)
}

/// As [`raw`], with the envelope pipelined (the sink must offer it).
pub fn raw_pipelined(
    sink: &Sink,
    threads: usize,
    count: u64,
    message: &OutgoingMessage,
) -> DeliverRun {
    lettre_loop(sink, threads, count, message, Loop::Pipelined)
}

/// As [`raw`], but through lettre's own `SmtpConnection::send`, which is
/// what `SmtpTransport` does on a pooled connection: the body and its final
/// `.` go out in two writes.
pub fn lettre_send(
    sink: &Sink,
    threads: usize,
    count: u64,
    message: &OutgoingMessage,
) -> DeliverRun {
    lettre_loop(sink, threads, count, message, Loop::LettreSend)
}

fn lettre_loop(
    sink: &Sink,
    threads: usize,
    count: u64,
    message: &OutgoingMessage,
    mode: Loop,
) -> DeliverRun {
    let stuffed: Arc<str> = Arc::from(dot_stuffed(&message.content));
    let from: lettre::Address = message.envelope_from.parse().expect("sender");
    let to: Vec<lettre::Address> = message
        .recipients
        .iter()
        .map(|recipient| recipient.parse().expect("recipient"))
        .collect();
    let content: Arc<[u8]> = Arc::from(message.content.as_bytes());
    let tls = tls_parameters(sink);
    let next = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let port = sink.port;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stuffed, from, to, tls) =
                (Arc::clone(&stuffed), from.clone(), to.clone(), tls.clone());
            let envelope = Envelope::new(Some(from.clone()), to.clone()).expect("envelope");
            let mut envelope_text = Mail::new(Some(from.clone()), Vec::new()).to_string();
            for recipient in &to {
                envelope_text.push_str(&Rcpt::new(recipient.clone(), Vec::new()).to_string());
            }
            envelope_text.push_str(&Data.to_string());
            let content = Arc::clone(&content);
            let (next, connections, start) = (
                Arc::clone(&next),
                Arc::clone(&connections),
                Arc::clone(&start),
            );
            std::thread::spawn(move || {
                same_priority_as_workers();
                start.wait();
                let mut smtp = None;
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let connection = match smtp.as_mut() {
                        Some(connection) => connection,
                        None => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            smtp.insert(open(port, tls.as_ref()))
                        }
                    };
                    if mode == Loop::LettreSend {
                        connection.send(&envelope, &content).expect("sent");
                        continue;
                    }
                    if mode == Loop::Pipelined {
                        connection.command(Raw(&envelope_text)).expect("MAIL");
                        for _ in 0..to.len() {
                            connection.read_response().expect("RCPT");
                        }
                        connection.read_response().expect("DATA");
                        connection.command(Raw(&stuffed)).expect("message");
                        continue;
                    }
                    connection
                        .command(Mail::new(Some(from.clone()), Vec::new()))
                        .expect("MAIL");
                    for recipient in &to {
                        connection
                            .command(Rcpt::new(recipient.clone(), Vec::new()))
                            .expect("RCPT");
                    }
                    connection.command(Data).expect("DATA");
                    connection.command(Raw(&stuffed)).expect("message");
                }
                if let Some(mut connection) = smtp {
                    let _ = connection.command(Quit);
                }
            })
        })
        .collect();
    let before = sink.messages();
    let cpu = process_cpu();
    start.wait();
    let started = Instant::now();
    let done = sink.wait_for(before + count, RUN_LIMIT);
    let finished = done.unwrap_or_else(Instant::now);
    let cpu = process_cpu() - cpu;
    for handle in handles {
        let _ = handle.join();
    }
    DeliverRun {
        messages: sink.messages() - before,
        elapsed: finished - started,
        connections: connections.load(Ordering::Relaxed),
        complete: done.is_some(),
        cpu,
    }
}

/// mailroom's workers run below normal priority ([`mailroom::config::DEFAULT_WORKER_NICENESS`])
/// so that answering HTTP comes first on a saturated machine. The raw
/// loop's threads take the same priority (`BENCH_RAW_NICE` overrides it), so
/// that the ratio compares the work done per message, not scheduling
/// priority; `BENCH_RAW_NICE=0` runs them at normal priority.
fn same_priority_as_workers() {
    let niceness = super::env_number(
        "BENCH_RAW_NICE",
        mailroom::config::DEFAULT_WORKER_NICENESS as u64,
    ) as i32;
    // SAFETY: a plain system call about the calling thread (Linux keeps a
    // nice value per thread).
    let _ = unsafe { libc::nice(niceness) };
}

fn host(sink: &Sink) -> String {
    if sink.ca_pem.is_some() {
        "localhost".into()
    } else {
        "127.0.0.1".into()
    }
}

fn tls_parameters(sink: &Sink) -> Option<TlsParameters> {
    let pem = sink.ca_pem.as_ref()?;
    Some(
        TlsParameters::builder("localhost".into())
            .add_root_certificate(Certificate::from_pem(pem).expect("CA"))
            .build_rustls()
            .expect("TLS parameters"),
    )
}

/// Connects, and with TLS parameters does STARTTLS and AUTH.
fn open(port: u16, tls: Option<&TlsParameters>) -> SmtpConnection {
    let hello = ClientId::Domain("bench.local".into());
    let host = if tls.is_some() {
        "localhost"
    } else {
        "127.0.0.1"
    };
    let mut smtp = SmtpConnection::connect(
        (host, port),
        Some(Duration::from_secs(30)),
        &hello,
        None,
        None,
    )
    .expect("connect to the sink");
    if let Some(tls) = tls {
        smtp.starttls(tls, &hello).expect("STARTTLS");
        smtp.auth(
            &[Mechanism::Plain, Mechanism::Login],
            &Credentials::new(USER.into(), PASSWORD.into()),
        )
        .expect("AUTH");
    }
    smtp
}

/// The body as sent after DATA: dot-stuffed, with its terminator.
fn dot_stuffed(content: &str) -> String {
    let mut out = String::with_capacity(content.len() + 8);
    for line in content.split_inclusive('\n') {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out.push_str("\r\n.\r\n");
    out
}

/// Pre-stuffed text handed to `SmtpConnection::command` (one write).
struct Raw<'a>(&'a str);

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
