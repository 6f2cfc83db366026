//! A small, fast SMTP sink for the benchmarks: a thread per connection,
//! tolerant of pipelining (answers are flushed only when no more input is
//! buffered), optional STARTTLS (rustls, rcgen certificate for `localhost`)
//! with AUTH PLAIN/LOGIN accepting any login, and an optional delay per
//! message (a slow relay). It accepts every message and keeps only counts.
//!
//! It replaces the tests' mailin-embedded relay here because that one keeps
//! every message and parses more, and would be the bottleneck.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// How the sink behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkOptions {
    /// Offer STARTTLS (and AUTH PLAIN/LOGIN).
    pub tls: bool,
    /// Wait this long before accepting each message.
    pub delay: Duration,
    /// Hold new sessions before the greeting until [`Sink::open_gate`].
    pub gated: bool,
}

struct State {
    messages: AtomicU64,
    connections: AtomicU64,
    /// [`Sink::wait_for`] is woken when `messages` reaches this.
    target: AtomicU64,
    waiter: Mutex<()>,
    arrived: Condvar,
    gate_open: Mutex<bool>,
    gate: Condvar,
    tls: Option<Arc<ServerConfig>>,
    delay: Duration,
}

/// A running sink on a loopback port; it lives until the process ends.
pub struct Sink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed its `localhost` certificate (TLS sinks).
    pub ca_pem: Option<Vec<u8>>,
    state: Arc<State>,
}

impl Sink {
    /// Starts a sink.
    pub fn start(options: SinkOptions) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let port = listener.local_addr().expect("sink address").port();
        let (tls, ca_pem) = if options.tls {
            let (config, ca_pem) = tls_config();
            (Some(config), Some(ca_pem))
        } else {
            (None, None)
        };
        let state = Arc::new(State {
            messages: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            waiter: Mutex::new(()),
            arrived: Condvar::new(),
            gate_open: Mutex::new(!options.gated),
            gate: Condvar::new(),
            tls,
            delay: options.delay,
        });
        let accepting = Arc::clone(&state);
        std::thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&accepting);
                    let _ = std::thread::Builder::new()
                        .name("sink".into())
                        .stack_size(256 * 1024)
                        .spawn(move || serve(stream, &state));
                }
            })
            .expect("start the sink");
        Sink {
            port,
            ca_pem,
            state,
        }
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> u64 {
        self.state.messages.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Lets held sessions (and later ones) proceed.
    pub fn open_gate(&self) {
        *self.state.gate_open.lock().unwrap() = true;
        self.state.gate.notify_all();
    }

    /// Holds new sessions before the greeting again.
    pub fn close_gate(&self) {
        *self.state.gate_open.lock().unwrap() = false;
    }

    /// Waits until `count` messages have been accepted in all, or `limit`
    /// passes; returns when the count was reached, or `None`.
    pub fn wait_for(&self, count: u64, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        let mut guard = self.state.waiter.lock().unwrap();
        self.state.target.store(count, Ordering::SeqCst);
        loop {
            if self.state.messages.load(Ordering::SeqCst) >= count {
                self.state.target.store(u64::MAX, Ordering::SeqCst);
                return Some(Instant::now());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.state.target.store(u64::MAX, Ordering::SeqCst);
                return None;
            }
            // No lost wake-up: the target is stored and the count checked
            // under the lock that the notifying session takes.
            guard = self.state.arrived.wait_timeout(guard, left).unwrap().0;
        }
    }
}

fn tls_config() -> (Arc<ServerConfig>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    (Arc::new(config), ca.pem().into_bytes())
}

/// Buffered input and output of one session.
struct Connection<S> {
    stream: S,
    input: Box<[u8]>,
    start: usize,
    end: usize,
    output: Vec<u8>,
}

impl<S: Read + Write> Connection<S> {
    fn new(stream: S) -> Connection<S> {
        Connection {
            stream,
            input: vec![0; 64 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            output: Vec::with_capacity(1024),
        }
    }

    /// Reads one line (with its line end) into `line`; false at the end of input.
    fn line(&mut self, line: &mut Vec<u8>) -> io::Result<bool> {
        line.clear();
        loop {
            let buffered = &self.input[self.start..self.end];
            if let Some(position) = buffered.iter().position(|&byte| byte == b'\n') {
                line.extend_from_slice(&buffered[..=position]);
                self.start += position + 1;
                return Ok(true);
            }
            line.extend_from_slice(buffered);
            self.start = 0;
            self.end = 0;
            // Nothing more pipelined: answer what was asked before blocking.
            self.flush()?;
            let read = self.stream.read(&mut self.input)?;
            if read == 0 {
                return Ok(false);
            }
            self.end = read;
        }
    }

    fn reply(&mut self, text: &str) {
        self.output.extend_from_slice(text.as_bytes());
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output)?;
            self.stream.flush()?;
            self.output.clear();
        }
        Ok(())
    }
}

enum Ended {
    Closed,
    StartTls,
}

fn serve(stream: TcpStream, state: &State) {
    let _ = stream.set_nodelay(true);
    {
        let mut open = state.gate_open.lock().unwrap();
        while !*open {
            open = state.gate.wait(open).unwrap();
        }
    }
    state.connections.fetch_add(1, Ordering::SeqCst);
    let mut plain = Connection::new(stream);
    plain.reply("220 sink.bench ESMTP\r\n");
    if let Ok(Ended::StartTls) = session(&mut plain, state, false) {
        let Some(config) = &state.tls else { return };
        let Ok(tls) = ServerConnection::new(Arc::clone(config)) else {
            return;
        };
        let mut secure = Connection::new(StreamOwned::new(tls, plain.stream));
        let _ = session(&mut secure, state, true);
    }
}

fn session<S: Read + Write>(
    connection: &mut Connection<S>,
    state: &State,
    encrypted: bool,
) -> io::Result<Ended> {
    let mut line = Vec::with_capacity(1024);
    loop {
        if !connection.line(&mut line)? {
            return Ok(Ended::Closed);
        }
        let verb = line
            .get(..4)
            .map(|verb| verb.to_ascii_uppercase())
            .unwrap_or_default();
        match &verb[..] {
            b"EHLO" => {
                connection.reply("250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n");
                if state.tls.is_some() && !encrypted {
                    connection.reply("250-STARTTLS\r\n");
                }
                connection.reply("250 AUTH PLAIN LOGIN\r\n");
            }
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => connection.reply("250 ok\r\n"),
            b"STAR" if state.tls.is_some() && !encrypted => {
                connection.reply("220 go ahead\r\n");
                connection.flush()?;
                return Ok(Ended::StartTls);
            }
            b"AUTH" => {
                let words: Vec<&[u8]> = line.split(|&byte| byte == b' ').collect();
                let mechanism = words
                    .get(1)
                    .map(|word| word.trim_ascii().to_ascii_uppercase());
                let initial = words.len() > 2;
                match mechanism.as_deref() {
                    Some(b"PLAIN") if !initial => {
                        connection.reply("334 \r\n");
                        connection.line(&mut line)?;
                    }
                    Some(b"LOGIN") => {
                        if !initial {
                            connection.reply("334 VXNlcm5hbWU6\r\n");
                            connection.line(&mut line)?;
                        }
                        connection.reply("334 UGFzc3dvcmQ6\r\n");
                        connection.line(&mut line)?;
                    }
                    _ => {}
                }
                connection.reply("235 2.7.0 accepted\r\n");
            }
            b"DATA" => {
                connection.reply("354 go ahead\r\n");
                loop {
                    if !connection.line(&mut line)? {
                        return Ok(Ended::Closed);
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                }
                if !state.delay.is_zero() {
                    // The slow relay being simulated, not synchronisation.
                    std::thread::sleep(state.delay);
                }
                let count = state.messages.fetch_add(1, Ordering::SeqCst) + 1;
                if count >= state.target.load(Ordering::SeqCst) {
                    let _guard = state.waiter.lock().unwrap();
                    state.arrived.notify_all();
                }
                connection.reply("250 ok queued\r\n");
            }
            b"QUIT" => {
                connection.reply("221 bye\r\n");
                connection.flush()?;
                return Ok(Ended::Closed);
            }
            _ => connection.reply("500 unknown command\r\n"),
        }
    }
}
