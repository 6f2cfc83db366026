//! A strict SMTP relay for tests and benchmarks: a thread per connection,
//! optional STARTTLS or implicit TLS (rustls), AUTH PLAIN/LOGIN, and the
//! faults mailroom must survive.
//!
//! Strict like a careful production relay: a line longer than 1000 octets
//! (CRLF included) is refused with `500 Line too long`; a byte above 0x7f
//! in a command or in the message is refused with `500 strict ASCII mode`
//! unless the transaction said `SMTPUTF8` on MAIL (or, for the body only,
//! `BODY=8BITMIME`), each only when advertised; a bare CR or LF, or a NUL,
//! anywhere in DATA is refused. What DATA carried is recorded exactly as
//! sent, after removing the dot-stuffing.
//!
//! Pipelining: replies are written out only when no more input is
//! buffered, so a client that sends a group of commands in one write gets
//! its replies in order, in one write; one that waits for each reply gets
//! it at once. Without PIPELINING offered, a command that arrives with
//! more input behind it (the client did not wait for its reply) is
//! refused with `503 5.5.0 improper use of SMTP command pipelining` and
//! counted ([`StrictRelay::improper_pipelining`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// The longest line a relay must accept (RFC 5321 §4.5.3.1.6), CRLF included.
pub const LINE_LIMIT: usize = 1000;

/// The reply to a message over the relay's `max_size`, at MAIL or after
/// the data.
const TOO_LARGE: &str = "552 5.3.4 message size exceeds fixed maximum message size";

/// Transport security the relay offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Security {
    /// Plain text only.
    #[default]
    None,
    /// STARTTLS offered (and AUTH only after it).
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// Who may log in with AUTH PLAIN/LOGIN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Login {
    /// AUTH is not offered.
    #[default]
    Off,
    /// Any user and password (benchmarks).
    Anyone,
    /// Only this user with this password; others get 535.
    Only { user: String, password: String },
}

/// How the relay behaves from its start.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// STARTTLS, implicit TLS or none (certificates: [`crate::certs`]).
    pub security: Security,
    /// AUTH PLAIN/LOGIN.
    pub login: Login,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Advertise SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Advertise 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// Keep every message (tests); off, only counts are kept (benchmarks).
    pub record: bool,
    /// Wait this long before accepting each message (a slow relay).
    pub delay: Duration,
    /// Hold new sessions before the greeting until [`StrictRelay::open_gate`].
    pub gated: bool,
    /// Advertise `SIZE` with this limit (RFC 1870) and refuse larger
    /// messages with `552 5.3.4`, at MAIL (its `SIZE=`) and after the data.
    pub max_size: Option<usize>,
}

impl Default for RelayOptions {
    fn default() -> RelayOptions {
        RelayOptions {
            security: Security::None,
            login: Login::Off,
            pipelining: false,
            smtputf8: false,
            eightbitmime: false,
            record: true,
            delay: Duration::ZERO,
            gated: false,
            max_size: None,
        }
    }
}

/// One message as the relay received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The MAIL FROM address (without brackets).
    pub from: String,
    /// Accepted RCPT TO addresses, in order.
    pub recipients: Vec<String>,
    /// The message's lines after DATA, each with its CRLF, dot-stuffing
    /// removed, the terminating `.` line excluded.
    pub data: Vec<u8>,
    /// When its end of data was answered.
    pub at: Instant,
    /// MAIL FROM carried SMTPUTF8.
    pub smtputf8: bool,
    /// MAIL FROM carried BODY=8BITMIME.
    pub eightbit: bool,
    /// Which connection (1 for the first) carried it.
    pub connection: usize,
}

/// What the relay does after each accepted message (dead pooled connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterMessage {
    /// Keep the connection.
    #[default]
    Keep,
    /// Close it (as a relay closes an idle connection).
    Close,
    /// Answer the next command with `421` and close.
    Reply421,
}

#[derive(Default)]
struct Faults {
    /// Replies to the next MAIL FROM commands, in order.
    mail_replies: VecDeque<(u16, String)>,
    /// Recipients refused with this reply.
    refused_recipients: HashMap<String, (u16, String)>,
    /// `452 4.5.3` after this many accepted recipients in a transaction.
    recipient_limit: Option<usize>,
    /// Send the greeting one byte per interval.
    trickle_greeting: Option<Duration>,
    /// While true, the end of DATA waits (a stalled relay).
    stall_data_end: bool,
    after_message: AfterMessage,
    /// In the next transaction, close the connection when this many
    /// recipients were answered and another RCPT TO arrives.
    close_after_recipients: Option<usize>,
}

struct State {
    options: RelayOptions,
    tls: Option<Arc<ServerConfig>>,
    received: Mutex<Vec<Received>>,
    messages: AtomicU64,
    connections: AtomicUsize,
    /// Waiters are woken when `messages` reaches this.
    target: AtomicU64,
    waiter: Mutex<()>,
    arrived: Condvar,
    faults: Mutex<Faults>,
    unstalled: Condvar,
    stalled_sessions: AtomicUsize,
    gate_open: Mutex<bool>,
    gate: Condvar,
    improper_pipelining: AtomicUsize,
}

impl State {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running relay on a loopback port; it lives until the process ends.
pub struct StrictRelay {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed its `localhost` certificate (TLS relays).
    pub ca_pem: Option<Vec<u8>>,
    state: Arc<State>,
}

impl StrictRelay {
    /// Starts a relay on a new loopback port.
    pub fn start(options: RelayOptions) -> StrictRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        StrictRelay::start_on(listener, options)
    }

    /// Starts a relay on a given listener (e.g. a port reserved earlier).
    pub fn start_on(listener: TcpListener, options: RelayOptions) -> StrictRelay {
        let port = listener.local_addr().expect("relay address").port();
        let (tls, ca_pem) = if options.security == Security::None {
            (None, None)
        } else {
            let (config, ca_pem) = tls_config();
            (Some(config), Some(ca_pem))
        };
        let state = Arc::new(State {
            gate_open: Mutex::new(!options.gated),
            options,
            tls,
            received: Mutex::new(Vec::new()),
            messages: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            target: AtomicU64::new(u64::MAX),
            waiter: Mutex::new(()),
            arrived: Condvar::new(),
            faults: Mutex::new(Faults::default()),
            unstalled: Condvar::new(),
            stalled_sessions: AtomicUsize::new(0),
            gate: Condvar::new(),
            improper_pipelining: AtomicUsize::new(0),
        });
        let accepting = Arc::clone(&state);
        std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&accepting);
                    let _ = std::thread::Builder::new()
                        .name("relay-session".into())
                        .stack_size(256 * 1024)
                        .spawn(move || serve(stream, &state));
                }
            })
            .expect("start the relay");
        StrictRelay {
            port,
            ca_pem,
            state,
        }
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> u64 {
        self.state.messages.load(Ordering::SeqCst)
    }

    /// Connections greeted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every message received so far (empty unless `record`).
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits until `count` messages have been accepted in all, or `limit`
    /// passes; returns when the count was reached, or `None`.
    pub fn wait_for_count(&self, count: u64, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        let mut guard = self
            .state
            .waiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
            guard = self
                .state
                .arrived
                .wait_timeout(guard, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// The next MAIL FROM commands get these replies (then 250 again).
    pub fn reply_to_next_mail(&self, replies: &[(u16, &str)]) {
        self.state
            .faults()
            .mail_replies
            .extend(replies.iter().map(|(code, text)| (*code, text.to_string())));
    }

    /// RCPT TO for `address` gets this reply.
    pub fn refuse_recipient(&self, address: &str, code: u16, text: &str) {
        self.state
            .faults()
            .refused_recipients
            .insert(address.to_string(), (code, text.to_string()));
    }

    /// RCPT TO for `address` is accepted again.
    pub fn accept_recipient(&self, address: &str) {
        self.state.faults().refused_recipients.remove(address);
    }

    /// After `limit` accepted recipients, each further RCPT TO in the same
    /// transaction gets `452 4.5.3 Too many recipients`; `None` lifts it.
    pub fn limit_recipients(&self, limit: Option<usize>) {
        self.state.faults().recipient_limit = limit;
    }

    /// New sessions get their greeting one byte per `interval`; `None`
    /// greets at once again.
    pub fn trickle_greeting(&self, interval: Option<Duration>) {
        self.state.faults().trickle_greeting = interval;
    }

    /// While stalled, sessions wait at the end of DATA without answering.
    pub fn stall(&self, stalled: bool) {
        self.state.faults().stall_data_end = stalled;
        if !stalled {
            self.state.unstalled.notify_all();
        }
    }

    /// Sessions that have waited at a stalled end of DATA, in all.
    pub fn stalled_sessions(&self) -> usize {
        self.state.stalled_sessions.load(Ordering::SeqCst)
    }

    /// What happens to a connection after each accepted message.
    pub fn after_message(&self, behaviour: AfterMessage) {
        self.state.faults().after_message = behaviour;
    }

    /// In the next transaction (on any connection), once `recipients`
    /// RCPT TOs were answered, the next RCPT TO makes the relay send the
    /// replies it has and close the connection (a relay that dies in the
    /// middle of a pipelined group). Happens once.
    pub fn close_after_recipients(&self, recipients: usize) {
        self.state.faults().close_after_recipients = Some(recipients);
    }

    /// Commands refused because they were pipelined while PIPELINING was
    /// not offered, in all.
    pub fn improper_pipelining(&self) -> usize {
        self.state.improper_pipelining.load(Ordering::SeqCst)
    }

    /// Lets held sessions (and later ones) proceed.
    pub fn open_gate(&self) {
        *self
            .state
            .gate_open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        self.state.gate.notify_all();
    }

    /// Holds new sessions before the greeting again.
    pub fn close_gate(&self) {
        *self
            .state
            .gate_open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = false;
    }
}

fn tls_config() -> (Arc<ServerConfig>, Vec<u8>) {
    let set = crate::certs::generate();
    let chain: Vec<CertificateDer<'static>> = set
        .chain_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(set.key_der.clone()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("the test certificate");
    (Arc::new(config), set.ca_pem.into_bytes())
}

/// Buffered input and output of one session.
struct Connection<S> {
    stream: S,
    input: Box<[u8]>,
    start: usize,
    end: usize,
    output: Vec<u8>,
}

/// One line read from the client.
struct Line {
    /// Its bytes with the line end, cut at [`LINE_LIMIT`] + 1.
    bytes: Vec<u8>,
    /// Longer than [`LINE_LIMIT`] octets.
    too_long: bool,
}

impl Line {
    /// The content without CRLF, when it ended with exactly CRLF and holds
    /// no other CR or LF.
    fn content(&self) -> Option<&[u8]> {
        let content = self.bytes.strip_suffix(b"\r\n")?;
        (!content.contains(&b'\r') && !content.contains(&b'\n')).then_some(content)
    }
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

    /// Reads one line up to its LF; false at the end of input.
    fn line(&mut self, line: &mut Line) -> io::Result<bool> {
        line.bytes.clear();
        line.too_long = false;
        let mut length = 0;
        loop {
            let buffered = &self.input[self.start..self.end];
            let (piece, done) = match buffered.iter().position(|&byte| byte == b'\n') {
                Some(position) => (&buffered[..=position], true),
                None => (buffered, false),
            };
            length += piece.len();
            let room = (LINE_LIMIT + 1).saturating_sub(line.bytes.len());
            line.bytes
                .extend_from_slice(&piece[..piece.len().min(room)]);
            self.start += piece.len();
            if length > LINE_LIMIT {
                line.too_long = true;
            }
            if done {
                return Ok(true);
            }
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

    /// More input is already buffered (the client did not wait).
    fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    fn reply(&mut self, text: &str) {
        self.output.extend_from_slice(text.as_bytes());
        self.output.extend_from_slice(b"\r\n");
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
        let mut open = state
            .gate_open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while !*open {
            open = state
                .gate
                .wait(open)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
    let number = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let trickle = state.faults().trickle_greeting;
    let greeting = "220 relay.test ESMTP strict test relay";
    match (state.options.security, &state.tls) {
        (Security::Implicit, Some(config)) => {
            let Ok(tls) = ServerConnection::new(Arc::clone(config)) else {
                return;
            };
            let mut secure = Connection::new(StreamOwned::new(tls, stream));
            if greet(&mut secure, greeting, trickle).is_ok() {
                let _ = session(&mut secure, state, true, number);
            }
        }
        _ => {
            let mut plain = Connection::new(stream);
            if greet(&mut plain, greeting, trickle).is_err() {
                return;
            }
            if let Ok(Ended::StartTls) = session(&mut plain, state, false, number) {
                let Some(config) = &state.tls else { return };
                let Ok(tls) = ServerConnection::new(Arc::clone(config)) else {
                    return;
                };
                let mut secure = Connection::new(StreamOwned::new(tls, plain.stream));
                let _ = session(&mut secure, state, true, number);
            }
        }
    }
}

fn greet<S: Read + Write>(
    connection: &mut Connection<S>,
    greeting: &str,
    trickle: Option<Duration>,
) -> io::Result<()> {
    match trickle {
        None => {
            connection.reply(greeting);
            Ok(())
        }
        Some(interval) => {
            for byte in greeting.bytes().chain(*b"\r\n") {
                connection.stream.write_all(&[byte])?;
                connection.stream.flush()?;
                // Pacing the trickle being simulated, not synchronisation.
                std::thread::sleep(interval);
            }
            Ok(())
        }
    }
}

/// One MAIL..DATA transaction in progress.
#[derive(Default)]
struct Transaction {
    from: Option<String>,
    recipients: Vec<String>,
    smtputf8: bool,
    eightbit: bool,
    /// RCPT TO commands answered.
    answered: usize,
}

fn session<S: Read + Write>(
    connection: &mut Connection<S>,
    state: &State,
    encrypted: bool,
    number: usize,
) -> io::Result<Ended> {
    let options = &state.options;
    let offers_tls = state.tls.is_some() && options.security == Security::StartTls && !encrypted;
    let offers_auth =
        options.login != Login::Off && (encrypted || options.security == Security::None);
    let mut line = Line {
        bytes: Vec::with_capacity(1024),
        too_long: false,
    };
    let mut transaction = Transaction::default();
    let mut closing = false;
    loop {
        if !connection.line(&mut line)? {
            return Ok(Ended::Closed);
        }
        if closing {
            connection.reply("421 4.4.2 relay.test closing idle connection");
            connection.flush()?;
            return Ok(Ended::Closed);
        }
        if line.too_long {
            connection.reply("500 5.5.2 Line too long");
            continue;
        }
        if !options.pipelining && connection.has_buffered() {
            state.improper_pipelining.fetch_add(1, Ordering::SeqCst);
            connection.reply("503 5.5.0 improper use of SMTP command pipelining");
            continue;
        }
        let Some(command) = line.content() else {
            connection.reply("500 5.5.2 bare CR or LF in command (CRLF required)");
            continue;
        };
        let verb = command
            .get(..4)
            .map(|verb| verb.to_ascii_uppercase())
            .unwrap_or_default();
        if !command.is_ascii() {
            let allowed = match &verb[..] {
                b"MAIL" => options.smtputf8 && has_parameter(command, b"SMTPUTF8"),
                b"RCPT" => transaction.smtputf8,
                _ => false,
            };
            if !allowed {
                connection.reply("500 5.6.7 strict ASCII mode");
                continue;
            }
        }
        let text = String::from_utf8_lossy(command).into_owned();
        match &verb[..] {
            b"EHLO" => {
                transaction = Transaction::default();
                let mut lines = vec!["relay.test".to_string()];
                if options.pipelining {
                    lines.push("PIPELINING".into());
                }
                if options.eightbitmime {
                    lines.push("8BITMIME".into());
                }
                if options.smtputf8 {
                    lines.push("SMTPUTF8".into());
                }
                if let Some(limit) = options.max_size {
                    lines.push(format!("SIZE {limit}"));
                }
                if offers_tls {
                    lines.push("STARTTLS".into());
                }
                if offers_auth {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                lines.push("ENHANCEDSTATUSCODES".into());
                let last = lines.len() - 1;
                for (index, item) in lines.iter().enumerate() {
                    let separator = if index == last { ' ' } else { '-' };
                    connection.reply(&format!("250{separator}{item}"));
                }
            }
            b"HELO" => {
                transaction = Transaction::default();
                connection.reply("250 relay.test");
            }
            b"STAR" if offers_tls => {
                connection.reply("220 2.0.0 go ahead");
                connection.flush()?;
                return Ok(Ended::StartTls);
            }
            b"AUTH" if offers_auth => {
                let reply = authenticate(connection, &mut line, &text, &options.login)?;
                connection.reply(reply);
            }
            b"MAIL" => {
                if transaction.from.is_some() {
                    connection.reply("503 5.5.1 nested MAIL command");
                    continue;
                }
                let Some(address) = path_of(&text, "MAIL FROM:") else {
                    connection.reply("501 5.5.4 syntax: MAIL FROM:<address>");
                    continue;
                };
                let fault = state.faults().mail_replies.pop_front();
                if let Some((code, reply)) = fault {
                    connection.reply(&format!("{code} {reply}"));
                    continue;
                }
                if let (Some(limit), Some(declared)) = (options.max_size, size_parameter(&text)) {
                    if declared > limit {
                        connection.reply(TOO_LARGE);
                        continue;
                    }
                }
                transaction = Transaction {
                    from: Some(address),
                    recipients: Vec::new(),
                    smtputf8: options.smtputf8 && has_parameter(command, b"SMTPUTF8"),
                    eightbit: options.eightbitmime && has_parameter(command, b"BODY=8BITMIME"),
                    answered: 0,
                };
                connection.reply("250 2.1.0 sender ok");
            }
            b"RCPT" => {
                if transaction.from.is_none() {
                    connection.reply("503 5.5.1 need MAIL before RCPT");
                    continue;
                }
                let Some(address) = path_of(&text, "RCPT TO:") else {
                    connection.reply("501 5.5.4 syntax: RCPT TO:<address>");
                    continue;
                };
                let mut faults = state.faults();
                if let Some(limit) = faults.close_after_recipients {
                    if transaction.answered >= limit {
                        faults.close_after_recipients = None;
                        drop(faults);
                        connection.flush()?;
                        return Ok(Ended::Closed);
                    }
                }
                transaction.answered += 1;
                if let Some((code, reply)) = faults.refused_recipients.get(&address) {
                    let reply = format!("{code} {reply}");
                    drop(faults);
                    connection.reply(&reply);
                    continue;
                }
                if faults
                    .recipient_limit
                    .is_some_and(|limit| transaction.recipients.len() >= limit)
                {
                    drop(faults);
                    connection.reply("452 4.5.3 Too many recipients");
                    continue;
                }
                drop(faults);
                transaction.recipients.push(address);
                connection.reply("250 2.1.5 recipient ok");
            }
            b"DATA" => {
                if transaction.recipients.is_empty() {
                    connection.reply("554 5.5.1 no valid recipients");
                    continue;
                }
                connection.reply("354 end data with <CR><LF>.<CR><LF>");
                let Some(data) = read_data(connection, &mut line, state, &transaction)? else {
                    return Ok(Ended::Closed);
                };
                let reply = match data {
                    Err(refusal) => refusal,
                    Ok(data) if options.max_size.is_some_and(|limit| data.len() > limit) => {
                        TOO_LARGE
                    }
                    Ok(data) => {
                        accept_message(state, &mut transaction, data, number);
                        "250 2.0.0 ok queued"
                    }
                };
                transaction = Transaction::default();
                connection.reply(reply);
                if reply.starts_with('2') {
                    match state.faults().after_message {
                        AfterMessage::Keep => {}
                        AfterMessage::Close => {
                            connection.flush()?;
                            return Ok(Ended::Closed);
                        }
                        AfterMessage::Reply421 => closing = true,
                    }
                }
            }
            b"RSET" => {
                transaction = Transaction::default();
                connection.reply("250 2.0.0 ok");
            }
            b"NOOP" => connection.reply("250 2.0.0 ok"),
            b"QUIT" => {
                connection.reply("221 2.0.0 bye");
                connection.flush()?;
                return Ok(Ended::Closed);
            }
            _ => connection.reply("500 5.5.1 unknown command"),
        }
    }
}

/// Reads DATA up to its terminator: `None` when the client went away,
/// else the content or the refusal to answer at its end.
fn read_data<S: Read + Write>(
    connection: &mut Connection<S>,
    line: &mut Line,
    state: &State,
    transaction: &Transaction,
) -> io::Result<Option<Result<Vec<u8>, &'static str>>> {
    let mut data = Vec::new();
    let mut refusal = None;
    let mut in_headers = true;
    loop {
        if !connection.line(line)? {
            return Ok(None);
        }
        if line.bytes == b".\r\n" {
            break;
        }
        if refusal.is_some() {
            continue;
        }
        if line.too_long {
            refusal = Some("500 5.5.2 Line too long");
            continue;
        }
        let Some(content) = line.content() else {
            refusal = Some("500 5.6.0 bare CR or LF in DATA (CRLF required)");
            continue;
        };
        if content.contains(&0) {
            refusal = Some("500 5.6.0 NUL in DATA");
            continue;
        }
        if !content.is_ascii() {
            let allowed = transaction.smtputf8 || (!in_headers && transaction.eightbit);
            if !allowed {
                refusal = Some("500 5.6.7 strict ASCII mode");
                continue;
            }
        }
        if content.is_empty() {
            in_headers = false;
        }
        if state.options.record {
            let unstuffed = line.bytes.strip_prefix(b".").unwrap_or(&line.bytes);
            data.extend_from_slice(unstuffed);
        }
    }
    Ok(Some(match refusal {
        Some(refusal) => Err(refusal),
        None => Ok(data),
    }))
}

fn accept_message(state: &State, transaction: &mut Transaction, data: Vec<u8>, number: usize) {
    {
        let mut faults = state.faults();
        if faults.stall_data_end {
            state.stalled_sessions.fetch_add(1, Ordering::SeqCst);
            while faults.stall_data_end {
                faults = state
                    .unstalled
                    .wait(faults)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
    }
    if !state.options.delay.is_zero() {
        // The slow relay being simulated, not synchronisation.
        std::thread::sleep(state.options.delay);
    }
    if state.options.record {
        state
            .received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Received {
                from: transaction.from.take().unwrap_or_default(),
                recipients: std::mem::take(&mut transaction.recipients),
                data,
                at: Instant::now(),
                smtputf8: transaction.smtputf8,
                eightbit: transaction.eightbit,
                connection: number,
            });
    }
    let count = state.messages.fetch_add(1, Ordering::SeqCst) + 1;
    if count >= state.target.load(Ordering::SeqCst) {
        let _guard = state
            .waiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.arrived.notify_all();
    }
}

/// The address in `MAIL FROM:<a>` or `RCPT TO:<a>` (case-insensitive verb).
fn path_of(command: &str, prefix: &str) -> Option<String> {
    let head = command.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = command[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

/// The `SIZE=` parameter of a MAIL command, if any.
fn size_parameter(command: &str) -> Option<usize> {
    let after_path = &command[command.find('>')? + 1..];
    after_path.split(' ').find_map(|word| {
        let (name, value) = word.split_once('=')?;
        name.eq_ignore_ascii_case("SIZE")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Whether a MAIL/RCPT command carries `parameter` after its path.
fn has_parameter(command: &[u8], parameter: &[u8]) -> bool {
    let after_path = match command.iter().position(|&byte| byte == b'>') {
        Some(end) => &command[end + 1..],
        None => return false,
    };
    after_path
        .split(|&byte| byte == b' ')
        .any(|word| word.eq_ignore_ascii_case(parameter))
}

fn authenticate<S: Read + Write>(
    connection: &mut Connection<S>,
    line: &mut Line,
    command: &str,
    login: &Login,
) -> io::Result<&'static str> {
    let words: Vec<&str> = command.split(' ').collect();
    let mechanism = words.get(1).map(|word| word.to_ascii_uppercase());
    let initial = words.get(2).map(|word| word.to_string());
    let mut next = |connection: &mut Connection<S>, prompt: &str| -> io::Result<String> {
        connection.reply(prompt);
        connection.line(line)?;
        Ok(line
            .content()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()
            .into_owned())
    };
    let (user, password) = match mechanism.as_deref() {
        Some("PLAIN") => {
            let response = match initial {
                Some(initial) => initial,
                None => next(connection, "334 ")?,
            };
            let decoded = decode_base64(&response).unwrap_or_default();
            let mut parts = decoded.split(|&byte| byte == 0).skip(1);
            let user = parts.next().unwrap_or_default().to_vec();
            let password = parts.next().unwrap_or_default().to_vec();
            (user, password)
        }
        Some("LOGIN") => {
            let user = match initial {
                Some(initial) => initial,
                None => next(connection, "334 VXNlcm5hbWU6")?,
            };
            let password = next(connection, "334 UGFzc3dvcmQ6")?;
            (
                decode_base64(&user).unwrap_or_default(),
                decode_base64(&password).unwrap_or_default(),
            )
        }
        _ => return Ok("504 5.5.4 unrecognised authentication mechanism"),
    };
    let accepted = match login {
        Login::Off => false,
        Login::Anyone => true,
        Login::Only {
            user: expected_user,
            password: expected_password,
        } => user == expected_user.as_bytes() && password == expected_password.as_bytes(),
    };
    Ok(if accepted {
        "235 2.7.0 authentication succeeded"
    } else {
        "535 5.7.8 authentication credentials invalid"
    })
}

/// Standard base64 (with padding), or `None` when malformed.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(byte: u8) -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text = text.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text.bytes() {
        buffer = (buffer << 6) | value(byte)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A raw client: writes what it is given, reads whole replies.
    struct Client {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Client {
        fn connect(relay: &StrictRelay) -> Client {
            let stream = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut client = Client {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            assert!(client.reply().starts_with("220 "));
            client
        }

        fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).unwrap();
        }

        /// One reply, its lines joined by `|`.
        fn reply(&mut self) -> String {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                self.reader.read_line(&mut line).unwrap();
                let line = line.trim_end().to_string();
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line);
                if last {
                    return lines.join("|");
                }
            }
        }

        fn command(&mut self, command: &str) -> String {
            self.send(format!("{command}\r\n").as_bytes());
            self.reply()
        }
    }

    #[test]
    fn pipelined_groups_get_their_replies_in_order() {
        let relay = StrictRelay::start(RelayOptions {
            pipelining: true,
            ..RelayOptions::default()
        });
        relay.refuse_recipient("gone@example.org", 550, "5.1.1 no such user");
        let mut client = Client::connect(&relay);
        assert!(client.command("EHLO client").contains("PIPELINING"));
        client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<gone@example.org>\r\nDATA\r\n",
        );
        assert!(client.reply().starts_with("250 "));
        assert!(client.reply().starts_with("250 "));
        assert!(client.reply().starts_with("550 5.1.1"));
        assert!(client.reply().starts_with("354 "));
        client.send(b"Subject: x\r\n\r\n..dot\r\n.\r\nRSET\r\nNOOP\r\n");
        assert!(client.reply().starts_with("250 "));
        assert!(client.reply().starts_with("250 "));
        assert!(client.reply().starts_with("250 "));
        let received = relay.received();
        assert_eq!(received[0].recipients, vec!["b@example.org"]);
        assert_eq!(received[0].data, b"Subject: x\r\n\r\n.dot\r\n");
    }

    #[test]
    fn pipelining_unless_offered_is_refused_and_a_group_can_be_cut() {
        let relay = StrictRelay::start(RelayOptions::default());
        let mut client = Client::connect(&relay);
        assert!(!client.command("EHLO client").contains("PIPELINING"));
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n");
        assert!(client.reply().starts_with("503 5.5.0 improper"));
        assert!(client.reply().starts_with("503 5.5.1 need MAIL"));
        assert_eq!(relay.improper_pipelining(), 1);

        let relay = StrictRelay::start(RelayOptions {
            pipelining: true,
            ..RelayOptions::default()
        });
        relay.close_after_recipients(1);
        let mut client = Client::connect(&relay);
        client.command("EHLO client");
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n");
        assert!(client.reply().starts_with("250 "));
        assert!(client.reply().starts_with("250 "));
        let mut rest = String::new();
        assert_eq!(client.reader.read_line(&mut rest).unwrap(), 0, "{rest}");
        assert_eq!(relay.improper_pipelining(), 0);
    }

    #[test]
    fn strictness() {
        let relay = StrictRelay::start(RelayOptions::default());
        let mut client = Client::connect(&relay);
        assert!(!client.command("EHLO client").contains("SMTPUTF8"));
        let long = format!("NOOP {}", "x".repeat(996));
        assert!(client.command(&long).starts_with("500 5.5.2 Line too long"));
        assert!(client
            .command("MAIL FROM:<jörg@example.com> SMTPUTF8")
            .contains("strict ASCII mode"));
        client.send(b"NOOP\n");
        assert!(client.reply().starts_with("500"), "bare LF in a command");
        for (data, refusal) in [
            (&b"a\nb\r\n"[..], "bare CR or LF"),
            (b"a\rb\r\n", "bare CR or LF"),
            (b"nul\0\r\n", "NUL"),
            ("Subject: é\r\n".as_bytes(), "strict ASCII mode"),
        ] {
            assert!(client
                .command("MAIL FROM:<a@example.com>")
                .starts_with("250"));
            assert!(client.command("RCPT TO:<b@example.org>").starts_with("250"));
            assert!(client.command("DATA").starts_with("354"));
            client.send(data);
            client.send(b".\r\n");
            let reply = client.reply();
            assert!(
                reply.starts_with("500") && reply.contains(refusal),
                "{reply}"
            );
        }
        assert_eq!(relay.messages(), 0);
    }

    #[test]
    fn smtputf8_and_8bitmime_when_offered() {
        let relay = StrictRelay::start(RelayOptions {
            smtputf8: true,
            eightbitmime: true,
            ..RelayOptions::default()
        });
        let mut client = Client::connect(&relay);
        let ehlo = client.command("EHLO client");
        assert!(ehlo.contains("SMTPUTF8") && ehlo.contains("8BITMIME"));
        // 8BITMIME: 8-bit body, ASCII headers.
        assert!(client
            .command("MAIL FROM:<a@example.com> BODY=8BITMIME")
            .starts_with("250"));
        assert!(client.command("RCPT TO:<b@example.org>").starts_with("250"));
        assert!(client.command("DATA").starts_with("354"));
        client.send("Subject: x\r\n\r\nGrüße\r\n.\r\n".as_bytes());
        assert!(client.reply().starts_with("250"));
        // SMTPUTF8: UTF-8 addresses and headers.
        assert!(client
            .command("MAIL FROM:<jörg@example.com> SMTPUTF8")
            .starts_with("250"));
        assert!(client
            .command("RCPT TO:<zoë@example.org>")
            .starts_with("250"));
        assert!(client.command("DATA").starts_with("354"));
        client.send("From: jörg@example.com\r\n\r\nhi\r\n.\r\n".as_bytes());
        assert!(client.reply().starts_with("250"));
        let received = relay.received();
        assert!(received[0].eightbit && !received[0].smtputf8);
        assert!(received[1].smtputf8);
        assert_eq!(received[1].recipients, vec!["zoë@example.org"]);
    }

    #[test]
    fn recipient_limit_and_idle_close() {
        let relay = StrictRelay::start(RelayOptions::default());
        relay.limit_recipients(Some(1));
        relay.after_message(AfterMessage::Reply421);
        let mut client = Client::connect(&relay);
        client.command("EHLO client");
        client.command("MAIL FROM:<a@example.com>");
        assert!(client.command("RCPT TO:<b@example.org>").starts_with("250"));
        assert_eq!(
            client.command("RCPT TO:<c@example.org>"),
            "452 4.5.3 Too many recipients"
        );
        client.command("DATA");
        client.send(b"x\r\n.\r\n");
        assert!(client.reply().starts_with("250"));
        assert!(client
            .command("MAIL FROM:<a@example.com>")
            .starts_with("421"));
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64("AHVzZXIAcGFzcw==").unwrap(), b"\0user\0pass");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert!(decode_base64("!!").is_none());
    }

    #[test]
    fn paths_and_parameters() {
        assert_eq!(
            path_of("MAIL FROM:<a@b.c> SMTPUTF8", "MAIL FROM:").as_deref(),
            Some("a@b.c")
        );
        assert_eq!(path_of("rcpt to:<x@y>", "RCPT TO:").as_deref(), Some("x@y"));
        assert!(has_parameter(
            b"MAIL FROM:<a@b> BODY=8BITMIME SMTPUTF8",
            b"smtputf8"
        ));
        assert!(!has_parameter(b"MAIL FROM:<SMTPUTF8@b>", b"SMTPUTF8"));
    }
}
