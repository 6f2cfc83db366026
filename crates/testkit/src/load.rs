//! The HTTP load generator: K clients, each on its own keep-alive
//! connection, sending the same request back to back (closed loop) for a
//! fixed time, timing every answer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Answers with the expected status.
    pub ok: u64,
    /// Other answers, I/O errors and reconnections.
    pub errors: u64,
    /// From the start signal until the last client stopped.
    pub elapsed: Duration,
    /// Every answer's latency, sorted.
    pub latencies: Vec<Duration>,
    /// The slowest first answer of any connection (connect included).
    pub slowest_first: Duration,
}

impl LoadReport {
    /// Answers per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency below which `percent` % of answers came.
    pub fn percentile(&self, percent: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() as f64 * percent / 100.0) as usize)
            .min(self.latencies.len() - 1);
        self.latencies[index]
    }

    /// The slowest answer.
    pub fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }
}

/// A complete HTTP/1.1 keep-alive POST with a JSON body.
pub fn post_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Runs `clients` closed-loop clients against `address` for `duration`,
/// each sending `request` and expecting status `expect`. A client stops
/// after `max_per_client` requests at the latest (a bound on the loop).
pub fn run_load(
    address: SocketAddr,
    clients: usize,
    duration: Duration,
    request: &[u8],
    expect: u16,
    max_per_client: u64,
) -> LoadReport {
    let request: Arc<[u8]> = Arc::from(request);
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let request = Arc::clone(&request);
            let start = Arc::clone(&start);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    start.wait();
                    client(address, duration, &request, expect, max_per_client)
                })
                .expect("start a client thread")
        })
        .collect();
    start.wait();
    let started = Instant::now();
    let mut report = LoadReport::default();
    for thread in threads {
        let one = thread.join().expect("client thread");
        report.ok += one.ok;
        report.errors += one.errors;
        report.latencies.extend(one.latencies);
        report.slowest_first = report.slowest_first.max(one.slowest_first);
    }
    report.elapsed = started.elapsed();
    report.latencies.sort_unstable();
    report
}

fn client(
    address: SocketAddr,
    duration: Duration,
    request: &[u8],
    expect: u16,
    max_requests: u64,
) -> LoadReport {
    let mut report = LoadReport {
        latencies: Vec::with_capacity(16 * 1024),
        ..LoadReport::default()
    };
    let began = Instant::now();
    let deadline = began + duration;
    let mut connection: Option<Reader> = None;
    let mut first = true;
    for _ in 0..max_requests {
        if Instant::now() >= deadline {
            break;
        }
        let sent = Instant::now();
        let reader = match connection.as_mut() {
            Some(reader) => reader,
            None => match TcpStream::connect(address) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    connection.insert(Reader::new(stream))
                }
                Err(_) => {
                    report.errors += 1;
                    continue;
                }
            },
        };
        let answer = reader
            .stream
            .write_all(request)
            .and_then(|()| reader.read_answer());
        let latency = sent.elapsed();
        match answer {
            Ok((code, keep_alive)) => {
                if first {
                    report.slowest_first = sent.duration_since(began) + latency;
                    first = false;
                }
                if code == expect {
                    report.ok += 1;
                    report.latencies.push(latency);
                } else {
                    report.errors += 1;
                }
                if !keep_alive {
                    connection = None;
                }
            }
            Err(_) => {
                report.errors += 1;
                connection = None;
            }
        }
    }
    report
}

struct Reader {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader {
            stream,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// Reads one answer; returns its status and whether the connection stays open.
    fn read_answer(&mut self) -> io::Result<(u16, bool)> {
        self.buffer.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            let read = self.stream.read(&mut chunk)?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_ascii_lowercase();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or(io::ErrorKind::InvalidData)?;
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .ok_or(io::ErrorKind::InvalidData)?;
        let keep_alive = !head.contains("connection: close");
        while self.buffer.len() < head_end + length {
            let read = self.stream.read(&mut chunk)?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        Ok((code, keep_alive))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
