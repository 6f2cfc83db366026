//! A TCP proxy that behaves like a network link with a round-trip time:
//! each direction holds what it reads for RTT/2 before passing it on. Every
//! chunk read is stamped when it arrives and released at that time plus
//! RTT/2, in order; chunks already due when the link wakes go out together
//! in one write, as a real link delivers what is in flight. No bandwidth
//! limit, no loss.
//!
//! It also counts **flights**: a chunk from the client that arrives after
//! the client has received something from the server since its last chunk
//! starts a new flight, i.e. a round trip the client waited for. Flights
//! per message is what a sender's latency costs on a real link.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts shared by the proxy's connections.
#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    flights: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A running proxy on a loopback port; it lives until the process ends.
pub struct LatencyProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    counts: Arc<Counts>,
}

impl LatencyProxy {
    /// Forwards connections on a new loopback port to `upstream`, each
    /// direction delayed by `rtt / 2`.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> LatencyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let counts = Arc::new(Counts::default());
        let shared = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = link(client, server, rtt / 2, &shared);
                }
            })
            .expect("start the proxy");
        LatencyProxy { port, counts }
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Client flights so far (see the module documentation).
    pub fn flights(&self) -> u64 {
        self.counts.flights.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from clients to the server, and back.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.counts.bytes_up.load(Ordering::SeqCst),
            self.counts.bytes_down.load(Ordering::SeqCst),
        )
    }
}

/// The two directions of one connection, each a reader and a writer
/// thread.
fn link(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    counts: &Arc<Counts>,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // The client has heard from the server since its last chunk.
    let answered = Arc::new(AtomicBool::new(true));
    let up = Direction {
        from: client.try_clone()?,
        to: server.try_clone()?,
        delay,
        counts: Arc::clone(counts),
        answered: Arc::clone(&answered),
        upstream: true,
    };
    let down = Direction {
        from: server,
        to: client,
        delay,
        counts: Arc::clone(counts),
        answered,
        upstream: false,
    };
    up.start()?;
    down.start()
}

struct Direction {
    from: TcpStream,
    to: TcpStream,
    delay: Duration,
    counts: Arc<Counts>,
    answered: Arc<AtomicBool>,
    /// Client to server.
    upstream: bool,
}

/// What a reader hands its writer: bytes due at an instant, or the end.
type Chunk = Option<(Instant, Vec<u8>)>;

impl Direction {
    fn start(self) -> io::Result<()> {
        let (chunks, pending) = channel::<Chunk>();
        let Direction {
            from,
            to,
            delay,
            counts,
            answered,
            upstream,
        } = self;
        let writer_answered = Arc::clone(&answered);
        std::thread::Builder::new()
            .name("proxy-write".into())
            .stack_size(128 * 1024)
            .spawn(move || write_loop(&pending, to, upstream, &writer_answered))?;
        std::thread::Builder::new()
            .name("proxy-read".into())
            .stack_size(128 * 1024)
            .spawn(move || read_loop(from, &chunks, delay, upstream, &answered, &counts))?;
        Ok(())
    }
}

/// Stamps each chunk read with the time it is due at the other end.
fn read_loop(
    mut from: TcpStream,
    chunks: &Sender<Chunk>,
    delay: Duration,
    upstream: bool,
    answered: &AtomicBool,
    counts: &Counts,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let arrived = Instant::now();
        if upstream {
            if answered.swap(false, Ordering::SeqCst) {
                counts.flights.fetch_add(1, Ordering::SeqCst);
            }
            counts.bytes_up.fetch_add(read as u64, Ordering::SeqCst);
        } else {
            counts.bytes_down.fetch_add(read as u64, Ordering::SeqCst);
        }
        if chunks
            .send(Some((arrived + delay, buffer[..read].to_vec())))
            .is_err()
        {
            break;
        }
    }
    let _ = chunks.send(None);
}

/// Releases each chunk when it is due, with whatever else is due by then;
/// at the end of input, shuts its side of the destination down.
fn write_loop(pending: &Receiver<Chunk>, mut to: TcpStream, upstream: bool, answered: &AtomicBool) {
    let mut next: Option<Chunk> = None;
    loop {
        let chunk = match next.take() {
            Some(chunk) => chunk,
            None => pending.recv().unwrap_or_default(),
        };
        let Some((due, mut batch)) = chunk else {
            break;
        };
        let now = Instant::now();
        if due > now {
            // The link's latency being simulated, not synchronisation.
            std::thread::sleep(due - now);
        }
        // Whatever else is due by now travels with it.
        let mut ended = false;
        loop {
            match pending.recv_timeout(Duration::ZERO) {
                Ok(Some((due, bytes))) if due <= Instant::now() => batch.extend_from_slice(&bytes),
                Ok(later @ Some(_)) => {
                    next = Some(later);
                    break;
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        // Before the write: once the client has the bytes it may answer at
        // once, and its next chunk must see that it heard from the server
        // (set after, a preempted writer let a flight go uncounted).
        if !upstream {
            answered.store(true, Ordering::SeqCst);
        }
        if to.write_all(&batch).is_err() {
            break;
        }
        if ended {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// An echo server: each line back at once.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        stream.write_all(line.as_bytes()).unwrap();
                        line.clear();
                    }
                });
            }
        });
        address
    }

    #[test]
    fn each_round_trip_takes_the_rtt_and_counts_one_flight() {
        let rtt = Duration::from_millis(40);
        let proxy = LatencyProxy::start(echo(), rtt);
        let stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let started = Instant::now();
        for round in 0..3 {
            // Two writes back to back are one flight.
            writer.write_all(format!("a{round}\n").as_bytes()).unwrap();
            writer.write_all(format!("b{round}\n").as_bytes()).unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, format!("a{round}\n"));
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, format!("b{round}\n"));
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= rtt * 3, "{elapsed:?}");
        assert_eq!(proxy.flights(), 3);
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.bytes(), (18, 18));
    }
}
