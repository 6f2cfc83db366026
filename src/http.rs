//! The HTTP API: routes, the JSON envelope, auth and limits, over tiny_http.
//!
//! Requests are received by a pool of handler threads in turn (leader and
//! followers): a thread takes a request from tiny_http, then reads, routes
//! and answers it itself, so a request costs no hand-off between threads.
//!
//! - Quick requests start no thread beyond [`MIN_HANDLERS`]: fewer runnable
//!   threads keep latency low under load.
//! - Before anything that can wait on a client (reading a body from the
//!   socket, discarding a refused body, waiting for a delivery or for
//!   another request with the same idempotency key), a handler starts
//!   another receiving thread if none is left, so a slow client holds only
//!   the thread answering it.
//! - A connection's pipelined requests are answered in order by the thread
//!   answering its first one; more than [`MAX_PIPELINED`] waiting closes it.
//! - The main thread ([`HttpServer::run`]) supervises: it replaces
//!   tiny_http's accept thread when that dies, and starts a receiver when
//!   none has taken a request for [`STALL_CHECK`] while none is receiving
//!   (handlers blocked where nobody expected, e.g. on a stalled disk).
//!
//! What tiny_http does not limit on its connections is limited by
//! [`crate::connections`]. Connections are kept alive across requests
//! unless a body was left unread.

use std::collections::{HashMap, VecDeque};
use std::io::{Cursor, ErrorKind, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::allocator;
use crate::connections::{self, Connections, HEAD_DEADLINE, READ_TIMEOUT};
use crate::dashboard;
use crate::engine::{Engine, Readiness, SendError, SubmitError};
use crate::http_actions as actions;
use crate::message::MailRequest;

/// Connections the kernel holds for tiny_http to accept.
const LISTEN_BACKLOG: i32 = 1024;
/// Handler threads beyond this are not started: requests then wait for a
/// thread to finish its request.
const MAX_HANDLERS: usize = 1024;
/// Handler threads started for quick requests alone: enough to keep two
/// cores busy while some wait to be scheduled. (128 clients on 2 cores: p99
/// ~16 ms with 8 handlers against ~110 ms with one per client.)
const MIN_HANDLERS: usize = 8;
/// Requests a connection may have waiting behind the one being answered
/// (HTTP pipelining); beyond this the connection is closed.
const MAX_PIPELINED: usize = 32;
/// How often the supervisor checks that requests are being taken.
const STALL_CHECK: Duration = Duration::from_millis(50);
/// A handler thread that received nothing for this long ends, unless it is
/// the last one receiving.
const HANDLER_IDLE: Duration = Duration::from_secs(30);
/// Longest request line (the SPEC's 8 KiB), answered 414 beyond.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest request head without the request line, answered 431 beyond.
const MAX_HEADERS: usize = 64 * 1024;
/// Time a client has to send a request body it declared.
const BODY_DEADLINE: Duration = Duration::from_secs(30);
/// An unread body up to this size is received and discarded for up to
/// [`LINGER`] after a refusal, so the client reads the answer instead of a
/// reset connection; larger ones are cut off at once.
const LINGER_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// See [`LINGER_MAX_BYTES`].
const LINGER: Duration = Duration::from_secs(2);
/// Declared bodies from this size on are huge: discarding one makes
/// tiny_http allocate (untouched) memory as large as the declared size.
const HUGE_BODY: u64 = allocator::HUGE as u64;
/// Largest declared body whose unread rest may be discarded the usual way
/// when the program runs on [`allocator::HugeAllocator`].
const MAX_DISCARDED: u64 = 1 << 40;
/// A retired tiny_http server is drained for this long after its last
/// request: by then each of its connections has delivered its request or
/// been closed.
const RETIRED_GRACE: Duration =
    Duration::from_secs(HEAD_DEADLINE.as_secs() + READ_TIMEOUT.as_secs() + 10);

/// One huge discard at a time, so their mappings cannot exhaust the address space.
static HUGE_DISCARD: Mutex<()> = Mutex::new(());
/// Connections closed without an answer because their declared body was
/// too large to discard (each keeps a tiny_http thread and two descriptors).
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// The HTTP front of an [`Engine`].
pub struct HttpServer {
    listener: TcpListener,
    handlers: Arc<Handlers>,
    events: Receiver<Event>,
}

/// One tiny_http server (an accept thread and its connections) and the
/// handler threads receiving its requests.
struct Intake {
    server: Server,
    /// tiny_http's copy of the listening socket, owned by its accept
    /// thread: closed when that thread ends, whether by an error (after
    /// which it accepts nothing more) or by a panic (e.g. it unwraps a
    /// failed descriptor copy when out of descriptors, and no error reaches
    /// the receivers).
    fd: i32,
    /// Handler threads waiting for its next request (or about to).
    receiving: AtomicUsize,
    /// Requests taken from it so far (the supervisor watches progress).
    taken: AtomicUsize,
    /// Replaced by a newer intake: drained until quiet, then left.
    retired: AtomicBool,
    /// Its end has been reported to the supervisor.
    reported: AtomicBool,
}

/// What the supervisor ([`HttpServer::run`]) hears about.
enum Event {
    /// An intake's accept thread ended (why).
    AcceptorEnded(Arc<Intake>, String),
    Stop,
}

/// The handler threads and what they share.
struct Handlers {
    /// The intake whose accept thread owns the listening socket now.
    current: Arc<Mutex<Arc<Intake>>>,
    events: Sender<Event>,
    stopping: AtomicBool,
    threads: AtomicUsize,
    engine: Engine,
    connections: Arc<Connections>,
    /// Connections with a request being answered, and their requests
    /// waiting behind it.
    lanes: Mutex<HashMap<SocketAddr, Lane>>,
}

/// The requests of one connection, answered in order by one thread.
/// tiny_http reads a connection's pipelined requests ahead (those without a
/// large body) and hands each out at once; a thread taking one would only
/// wait for its turn to write.
#[derive(Default)]
struct Lane {
    queued: VecDeque<Request>,
    /// Closed (too many pipelined, or an answer could not be written): its
    /// queued requests are dropped unanswered.
    closed: bool,
}

impl HttpServer {
    /// Binds the listen address. Requests are served once [`HttpServer::run`] is called.
    pub fn bind(engine: Engine, address: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(address)?;
        // std listens with a backlog of 128: a burst of connections beyond
        // what tiny_http has accepted yet would see its SYNs dropped and
        // retried a second later. The kernel caps this at somaxconn.
        socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG)?;
        let current = Arc::new(Mutex::new(serve_on(&listener)?));
        let (events, heard) = crossbeam_channel::unbounded();
        let listening = connections::socket_inode(listener.as_raw_fd());
        let (watched, reports) = (Arc::clone(&current), events.clone());
        // Each janitor pass: a dead accept thread is reported to the
        // supervisor, which starts a new one.
        let connections = Connections::start(listener.local_addr()?, move || {
            let intake = Arc::clone(&lock(&watched));
            if listening.is_some() && connections::socket_inode(intake.fd) != listening {
                report_end(&reports, intake, "its accept thread ended".into());
            }
        });
        Ok(HttpServer {
            listener,
            handlers: Arc::new(Handlers {
                current,
                events,
                stopping: AtomicBool::new(false),
                threads: AtomicUsize::new(0),
                engine,
                connections,
                lanes: Mutex::new(HashMap::new()),
            }),
            events: heard,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests until [`HttpServer::stop`]; the calling thread
    /// supervises tiny_http's accept thread meanwhile.
    pub fn run(&self) {
        let first = Arc::clone(&lock(&self.handlers.current));
        Handlers::start_receiver(&self.handlers, &first);
        let mut started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut last_taken = 0;
        loop {
            let (intake, why) = match self.events.recv_timeout(STALL_CHECK) {
                Ok(Event::AcceptorEnded(intake, why)) => (intake, why),
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let current = Arc::clone(&lock(&self.handlers.current));
                    let taken = current.taken.load(Ordering::SeqCst);
                    if taken == last_taken && current.receiving.load(Ordering::SeqCst) == 0 {
                        log::debug!(
                            "no HTTP handler took a request for {STALL_CHECK:?}: starting one"
                        );
                        Handlers::start_receiver(&self.handlers, &current);
                    }
                    last_taken = taken;
                    continue;
                }
            };
            if self.handlers.stopping() {
                return;
            }
            if !Arc::ptr_eq(&intake, &lock(&self.handlers.current)) {
                continue;
            }
            // tiny_http's acceptor stops for good after an accept error
            // (e.g. out of file descriptors). Its open connections still
            // deliver requests to it, so its receivers drain it while a new
            // acceptor takes over the listening socket. Back off while
            // acceptors keep dying.
            log::error!("HTTP acceptor stopped ({why}); starting a new acceptor");
            intake.retired.store(true, Ordering::SeqCst);
            backoff = if started.elapsed() < Duration::from_secs(10) {
                (backoff * 2).min(Duration::from_secs(2))
            } else {
                Duration::from_millis(100)
            };
            if !self.replace_acceptor(backoff) {
                return;
            }
            started = Instant::now();
        }
    }

    /// Starts a new acceptor, retrying until it works; false when stopping.
    fn replace_acceptor(&self, backoff: Duration) -> bool {
        loop {
            // Pacing retries against a persistent error, not synchronisation.
            std::thread::sleep(backoff);
            let fresh = serve_on(&self.listener);
            let mut current = lock(&self.handlers.current);
            if self.handlers.stopping() {
                return false;
            }
            match fresh {
                Ok(fresh) => {
                    *current = Arc::clone(&fresh);
                    drop(current);
                    Handlers::start_receiver(&self.handlers, &fresh);
                    log::info!("HTTP acceptor restarted");
                    return true;
                }
                Err(error) => log::error!("cannot start an HTTP acceptor: {error}"),
            }
        }
    }

    /// Makes [`HttpServer::run`] return and the receiving threads leave.
    /// Requests being handled still get their answer.
    pub fn stop(&self) {
        self.handlers.stopping.store(true, Ordering::SeqCst);
        let _ = self.handlers.events.send(Event::Stop);
        let current = Arc::clone(&lock(&self.handlers.current));
        // Each wake-up ends one receiver's wait.
        for _ in 0..self.handlers.threads.load(Ordering::SeqCst) {
            current.server.unblock();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // The receiving threads would otherwise keep the port open.
        self.stop();
        // Handler threads may outlive the server; its port may not stay ours.
        self.handlers.connections.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve_on(listener: &TcpListener) -> std::io::Result<Arc<Intake>> {
    let clone = listener.try_clone()?;
    let fd = clone.as_raw_fd();
    // tiny_http panics when the OS refuses it a thread.
    let server = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Server::from_listener(clone, None)
    }))
    .map_err(|_| std::io::Error::other("tiny_http could not start its threads"))?
    .map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok(Arc::new(Intake {
        server,
        fd,
        receiving: AtomicUsize::new(0),
        taken: AtomicUsize::new(0),
        retired: AtomicBool::new(false),
        reported: AtomicBool::new(false),
    }))
}

/// Tells the supervisor, once per intake, that its accept thread ended.
fn report_end(events: &Sender<Event>, intake: Arc<Intake>, why: String) {
    if !intake.reported.swap(true, Ordering::SeqCst) {
        let _ = events.send(Event::AcceptorEnded(intake, why));
    }
}

impl Handlers {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Starts a thread receiving from `intake`, unless there are too many.
    fn start_receiver(handlers: &Arc<Handlers>, intake: &Arc<Intake>) {
        if handlers.threads.fetch_add(1, Ordering::SeqCst) >= MAX_HANDLERS {
            handlers.threads.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        intake.receiving.fetch_add(1, Ordering::SeqCst);
        let (shared, source) = (Arc::clone(handlers), Arc::clone(intake));
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                shared.receive(&source);
                shared.threads.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            intake.receiving.fetch_sub(1, Ordering::SeqCst);
            handlers.threads.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start an HTTP handler thread: {error}");
        }
    }

    /// One handler thread: receive a request and answer it (making sure
    /// another thread is receiving before anything that may block); until
    /// idle for long, retired and quiet, or stopping.
    fn receive(self: &Arc<Handlers>, intake: &Arc<Intake>) {
        let leave = || {
            intake.receiving.fetch_sub(1, Ordering::SeqCst);
        };
        loop {
            let retired = intake.retired.load(Ordering::SeqCst);
            let patience = if retired { RETIRED_GRACE } else { HANDLER_IDLE };
            let waiting = Instant::now();
            match intake.server.recv_timeout(patience) {
                Ok(Some(request)) => {
                    intake.taken.fetch_add(1, Ordering::SeqCst);
                    let last = intake.receiving.fetch_sub(1, Ordering::SeqCst) == 1;
                    if last && self.threads.load(Ordering::SeqCst) < MIN_HANDLERS {
                        Handlers::start_receiver(self, intake);
                    }
                    if let Some(request) = self.enter_lane(request) {
                        let may_block = || {
                            if intake.receiving.load(Ordering::SeqCst) == 0 {
                                Handlers::start_receiver(self, intake);
                            }
                        };
                        self.answer_in_order(request, &may_block);
                    }
                    intake.receiving.fetch_add(1, Ordering::SeqCst);
                }
                // A wake-up from `stop`, or the wait ran out.
                Ok(None) if self.stopping() => return leave(),
                Ok(None) if waiting.elapsed() < patience => {}
                Ok(None) if retired => return leave(),
                Ok(None) => {
                    // Leave only if another thread stays receiving.
                    let others = intake.receiving.fetch_update(
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                        |receiving| (receiving > 1).then(|| receiving - 1),
                    );
                    if others.is_ok() {
                        return;
                    }
                }
                Err(error) => report_end(&self.events, Arc::clone(intake), error.to_string()),
            }
        }
    }

    /// The request, when this thread is to answer it; `None` when it was
    /// queued behind the request being answered on its connection.
    fn enter_lane(&self, request: Request) -> Option<Request> {
        let Some(peer) = request.remote_addr().copied() else {
            return Some(request);
        };
        let mut lanes = lock(&self.lanes);
        let Some(lane) = lanes.get_mut(&peer) else {
            lanes.insert(peer, Lane::default());
            return Some(request);
        };
        lane.queued.push_back(request);
        if lane.queued.len() > MAX_PIPELINED && !lane.closed {
            lane.closed = true;
            drop(lanes);
            log::debug!(
                "HTTP connection from {peer} closed: over {MAX_PIPELINED} pipelined requests"
            );
            // tiny_http then reads no more from it, and answers fail fast.
            self.connections.finish(peer);
        }
        None
    }

    /// Answers `request`, then each request its connection queued meanwhile.
    fn answer_in_order(&self, request: Request, may_block: &dyn Fn()) {
        let peer = request.remote_addr().copied();
        let mut next = Some(request);
        let mut closed = false;
        while let Some(request) = next {
            if closed {
                // Unanswered: tiny_http's attempt at a 500 fails on the closed socket.
                drop(request);
            } else {
                if let Some(peer) = peer {
                    self.connections.request_arrived(peer);
                }
                if !handle(&self.engine, &self.connections, may_block, request) {
                    // Nothing more can be written to it in order.
                    closed = true;
                    if let Some(peer) = peer {
                        self.connections.finish(peer);
                    }
                }
            }
            let Some(peer) = peer else {
                return;
            };
            let mut lanes = lock(&self.lanes);
            let Some(lane) = lanes.get_mut(&peer) else {
                return;
            };
            closed |= lane.closed;
            lane.closed = closed;
            next = lane.queued.pop_front();
            if next.is_none() {
                lanes.remove(&peer);
            }
        }
    }
}

/// An answer before it is written.
struct Reply {
    code: u16,
    body: Vec<u8>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(code: u16, value: Value) -> Reply {
        Reply {
            code,
            body: value.to_string().into_bytes(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    fn ok(data: Value) -> Reply {
        Reply::json(200, json!({ "message": "ok", "data": data }))
    }

    fn error(code: u16, message: &str, detail: &str) -> Reply {
        Reply::json(
            code,
            json!({ "message": message, "data": { "error": detail } }),
        )
    }

    fn unavailable(message: &str, detail: &str) -> Reply {
        Reply::error(503, message, detail).with_header("Retry-After", "1")
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// What a handler works with while routing one request.
struct Exchange<'a> {
    engine: &'a Engine,
    connections: &'a Connections,
    /// Call before anything that may wait on the client or the disk: it
    /// makes sure another thread receives requests meanwhile.
    may_block: &'a dyn Fn(),
    /// What became of the request body.
    body: Body,
}

/// What became of a request's body while it was routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Not read (a refusal before the body mattered).
    Unread,
    /// Read to its end.
    Read,
    /// Reading stopped early: over the limit, too slow, or broken.
    Abandoned,
}

/// Routes and answers one request; false when the answer could not be
/// written (nothing more can be written to that connection).
fn handle(
    engine: &Engine,
    connections: &Connections,
    may_block: &dyn Fn(),
    mut request: Request,
) -> bool {
    let declared = request.body_length().map_or(0, |length| length as u64);
    let has = |name: &'static str| {
        request
            .headers()
            .iter()
            .any(|header| header.field.equiv(name))
    };
    // tiny_http has already read bodies of up to 1 KiB sent without Expect;
    // only larger ones are read from the socket by this thread.
    let expects_continue = has("Expect");
    let reads_socket = declared > 1024 || expects_continue || has("Transfer-Encoding");
    if reads_socket {
        may_block();
        if let Some(peer) = request.remote_addr() {
            // Its timeouts must be in place before anything reads from it.
            connections.track(*peer);
        }
    }
    let mut exchange = Exchange {
        engine,
        connections,
        may_block,
        body: Body::Unread,
    };
    let reply = route(&mut exchange, &mut request);
    let body = exchange.body;
    engine.record_http(reply.code);
    let length = reply.body.len();
    let mut response = Response::new(
        tiny_http::StatusCode(reply.code),
        Vec::new(),
        Cursor::new(reply.body),
        Some(length),
        None,
    );
    let content_type = ("Content-Type", reply.content_type.to_string());
    for (name, value) in std::iter::once(&content_type).chain(&reply.headers) {
        if let Some(header) = header(name, value) {
            response.add_header(header);
        }
    }
    // Answering drops the request, and tiny_http then discards what is
    // left of the body by reading it: that is bounded below, and the
    // connection closes after it.
    let pending = body == Body::Abandoned || (body == Body::Unread && reads_socket);
    if pending {
        if let Some(header) = header("Cache-Control", CLOSE_AFTER_ANSWER) {
            response.add_header(header);
        }
    }
    let Some(peer) = request.remote_addr().copied() else {
        return request.respond(response).is_ok();
    };
    let huge = pending && declared >= HUGE_BODY;
    if pending {
        // Discarding the rest of the body reads from the client.
        may_block();
        if huge || expects_continue || body == Body::Abandoned || declared > LINGER_MAX_BYTES {
            // Nothing worth waiting for: the discard ends at once.
            let cut = connections.shut_read(peer);
            if huge && (!cut || !allocator::in_use() || declared > MAX_DISCARDED) {
                abandon(connections, request, peer, declared);
                return false;
            }
        } else {
            connections.close_at(peer, Instant::now() + LINGER);
        }
    }
    let serial = huge.then(|| {
        HUGE_DISCARD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    });
    let written = request.respond(response);
    drop(serial);
    connections.answered(peer);
    if let Err(error) = &written {
        log::debug!("HTTP answer to {peer} not delivered: {error}");
    }
    written.is_ok()
}

/// Closes a connection whose declared body is too large for tiny_http to
/// discard (it would allocate the declared size, and abort the process when
/// that fails), without answering, and keeps the request forever instead of
/// dropping it. SPEC allows a closed connection for this; the cost is one
/// tiny_http thread and two descriptors per such connection.
fn abandon(connections: &Connections, request: Request, peer: SocketAddr, declared: u64) {
    connections.finish(peer);
    std::mem::forget(request);
    let count = ABANDONED.fetch_add(1, Ordering::Relaxed) + 1;
    log::warn!(
        "HTTP connection from {peer} declared a {declared}-byte body: closed without an answer \
         ({count} such connections so far, each keeping a thread and two descriptors)"
    );
}

/// Tells the client that the connection closes after this answer, when the
/// rest of its request body is not read (SPEC: refused, then closed).
///
/// tiny_http drops a `Connection` header set by the server (`add_header`
/// ignores it), so it rides in the value of a harmless header; the text is
/// this constant, never anything a client sent. Should a later tiny_http
/// refuse line breaks in values, `header` skips it and the connection is
/// still closed after the answer (the client then sees the close only).
const CLOSE_AFTER_ANSWER: &str = "no-store\r\nConnection: close";

/// Our header names and values are ASCII constants and numbers; anything
/// else would be skipped rather than break the answer.
fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn route(exchange: &mut Exchange<'_>, request: &mut Request) -> Reply {
    let engine = exchange.engine;
    if request.url().len() > MAX_REQUEST_LINE {
        return Reply::error(
            414,
            "request line too long",
            &format!("the limit is {MAX_REQUEST_LINE} bytes"),
        );
    }
    let head: usize = request
        .headers()
        .iter()
        .map(|header| header.field.as_str().as_str().len() + header.value.as_str().len() + 4)
        .sum();
    if head > MAX_HEADERS {
        return Reply::error(
            431,
            "request headers too large",
            &format!("the limit is {MAX_HEADERS} bytes in all"),
        );
    }
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let method = request.method().clone();
    let is = |allowed: &Method| {
        method == *allowed || (*allowed == Method::Get && method == Method::Head)
    };
    match path.as_str() {
        "/healthz" if is(&Method::Get) => Reply::ok(json!({ "status": "alive" })),
        "/readyz" if is(&Method::Get) => readiness(engine),
        "/metrics" if is(&Method::Get) => Reply {
            code: 200,
            body: engine.metrics_text().into_bytes(),
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: Vec::new(),
        },
        "/healthz" | "/readyz" | "/metrics" => method_not_allowed("GET, HEAD"),
        // The dashboard (src/dashboard.rs): static files, no token (they hold no data).
        _ if dashboard::serves(&path) && is(&Method::Get) => dashboard_page(&path, request),
        _ if dashboard::serves(&path) => method_not_allowed("GET, HEAD"),
        _ if path == "/api" || path.starts_with("/api/") => {
            if let Some(refusal) = check_token(engine, request) {
                return refusal;
            }
            let query = request
                .url()
                .split_once('?')
                .map_or("", |(_, query)| query)
                .to_string();
            match path.as_str() {
                "/api/mail" if method == Method::Post => submit(exchange, request),
                "/api/mail" if is(&Method::Get) => answer(actions::list(engine, &query)),
                "/api/mail" => method_not_allowed("GET, HEAD, POST"),
                "/api/mail/v2" if method == Method::Post => send_and_wait(exchange, request),
                "/api/mail/v2" => method_not_allowed("POST"),
                "/api/mail/batch" if method == Method::Post => match read_body(exchange, request) {
                    Ok(body) => answer(actions::batch(engine, &body)),
                    Err(reply) => reply,
                },
                "/api/mail/batch" => method_not_allowed("POST"),
                "/api/stats" if is(&Method::Get) => answer(actions::stats(engine)),
                "/api/stats" => method_not_allowed("GET, HEAD"),
                "/api/suppressions" if is(&Method::Get) => {
                    answer(actions::suppressions(engine, &query))
                }
                "/api/suppressions" => method_not_allowed("GET, HEAD"),
                _ => {
                    if let Some(address) = path
                        .strip_prefix("/api/suppressions/")
                        .filter(|address| !address.is_empty() && !address.contains('/'))
                    {
                        let address = match actions::decode(address) {
                            Ok(address) => address,
                            Err(reason) => return invalid(&reason),
                        };
                        return match method {
                            Method::Put => match read_body(exchange, request) {
                                Ok(body) => answer(actions::suppress(engine, &address, &body)),
                                Err(reply) => reply,
                            },
                            Method::Delete => answer(actions::unsuppress(engine, &address)),
                            _ => method_not_allowed("PUT, DELETE"),
                        };
                    }
                    let Some(rest) = path.strip_prefix("/api/mail/") else {
                        return not_found(&path);
                    };
                    match rest.split('/').collect::<Vec<_>>().as_slice() {
                        [id] if !id.is_empty() && is(&Method::Get) => status(engine, id),
                        [id] if !id.is_empty() && method == Method::Delete => {
                            answer(actions::cancel(engine, id))
                        }
                        [id] if !id.is_empty() => method_not_allowed("GET, HEAD, DELETE"),
                        [id, "retry"] if !id.is_empty() && method == Method::Post => {
                            answer(actions::retry(engine, id))
                        }
                        [id, "retry"] if !id.is_empty() => method_not_allowed("POST"),
                        _ => not_found(&path),
                    }
                }
            }
        }
        _ => not_found(&path),
    }
}

fn answer(answer: actions::Answer) -> Reply {
    Reply {
        code: answer.code,
        body: answer.body.to_string().into_bytes(),
        content_type: "application/json",
        headers: answer.headers,
    }
}

fn dashboard_page(path: &str, request: &Request) -> Reply {
    let if_none_match = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("If-None-Match"))
        .map(|header| header.value.as_str());
    match dashboard::serve(path, if_none_match) {
        Some(page) => Reply {
            code: page.code,
            body: page.body.to_vec(),
            content_type: page.content_type,
            headers: page.headers,
        },
        None => not_found(path),
    }
}

fn not_found(path: &str) -> Reply {
    Reply::error(404, "not found", &format!("no such path: {path}"))
}

fn method_not_allowed(allow: &'static str) -> Reply {
    Reply::error(405, "method not allowed", &format!("allowed: {allow}"))
        .with_header("Allow", allow)
}

fn readiness(engine: &Engine) -> Reply {
    match engine.readiness() {
        Readiness::Ready => Reply::ok(json!({ "status": "ready" })),
        Readiness::Full => Reply::unavailable("not ready", "the queue is full"),
        Readiness::ShuttingDown => Reply::unavailable("not ready", "shutting down"),
        Readiness::SpoolFailing(detail) => Reply::unavailable(
            "not ready",
            &format!("the spool cannot be written: {detail}"),
        ),
        Readiness::RelayFailing(detail) => {
            Reply::unavailable("not ready", &format!("the relay is failing: {detail}"))
        }
    }
}

fn check_token(engine: &Engine, request: &Request) -> Option<Reply> {
    let expected = engine.config().api_token.as_ref()?;
    let given = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Authorization"))
        .and_then(|header| header.value.as_str().trim().split_once(' '))
        // The scheme name is case-insensitive (RFC 9110 section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(token) if constant_time_equal(token.as_bytes(), expected.expose().as_bytes()) => None,
        Some(_) => Some(unauthorized("wrong bearer token")),
        None => Some(unauthorized("missing header Authorization: Bearer <token>")),
    }
}

fn unauthorized(detail: &str) -> Reply {
    Reply::error(401, "unauthorized", detail).with_header("WWW-Authenticate", "Bearer")
}

/// Compares without stopping at the first difference, so the time taken
/// does not reveal how much of a guessed token is right.
fn constant_time_equal(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(index).copied().unwrap_or(0));
    }
    difference == 0
}

fn read_body(exchange: &mut Exchange<'_>, request: &mut Request) -> Result<Vec<u8>, Reply> {
    let limit = exchange.engine.config().max_body_bytes;
    let too_large = || {
        Reply::error(
            413,
            "request body too large",
            &format!("the limit is {limit} bytes (MAILROOM_MAX_BODY_BYTES)"),
        )
    };
    let late = || {
        Reply::error(
            408,
            "request body not received in time",
            &format!(
                "the body must arrive within {} s, with no pause over {} s",
                BODY_DEADLINE.as_secs(),
                READ_TIMEOUT.as_secs()
            ),
        )
    };
    let declared = request.body_length();
    if declared.is_some_and(|length| length as u64 > limit) {
        return Err(too_large());
    }
    // A read blocked past the deadline is ended by closing the connection.
    let peer = request.remote_addr().copied();
    let started = Instant::now();
    if let Some(peer) = peer {
        exchange.connections.close_at(peer, started + BODY_DEADLINE);
    }
    let result = read_within(request, limit, declared);
    if let Some(peer) = peer {
        exchange.connections.keep_open(peer);
    }
    let outcome = match result {
        Ok(content) if content.len() as u64 > limit => Err(too_large()),
        Ok(content) if declared.is_some_and(|length| content.len() < length) => {
            Err(if started.elapsed() >= BODY_DEADLINE {
                late()
            } else {
                Reply::error(
                    400,
                    "cannot read the request body",
                    "the connection ended before the declared Content-Length",
                )
            })
        }
        Ok(content) if started.elapsed() > BODY_DEADLINE => {
            drop(content);
            Err(late())
        }
        Ok(content) => Ok(content),
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(late())
        }
        Err(error) => Err(Reply::error(
            400,
            "cannot read the request body",
            &error.to_string(),
        )),
    };
    exchange.body = if outcome.is_ok() {
        Body::Read
    } else {
        Body::Abandoned
    };
    outcome
}

/// Reads the body, stopping one byte past `limit` (a chunked body has no
/// declared length to refuse early).
fn read_within(
    request: &mut Request,
    limit: u64,
    declared: Option<usize>,
) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024));
    // Straight into the vector: no zeroed buffer to copy through.
    request
        .as_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut content)?;
    Ok(content)
}

fn parse_request(exchange: &mut Exchange<'_>, request: &mut Request) -> Result<MailRequest, Reply> {
    let content = read_body(exchange, request)?;
    MailRequest::from_json(&content).map_err(|error| invalid(&error.to_string()))
}

fn invalid(detail: &str) -> Reply {
    Reply::error(400, detail, detail)
}

fn refusal(error: &SubmitError) -> Reply {
    match error {
        SubmitError::Invalid(_)
        | SubmitError::InvalidIdempotencyKey
        | SubmitError::SendAtTooLate => invalid(&error.to_string()),
        SubmitError::ScheduleFull => Reply::unavailable("too many scheduled", &error.to_string()),
        SubmitError::IdempotencyConflict { .. } => {
            Reply::error(409, &error.to_string(), &error.to_string())
        }
        SubmitError::Full => Reply::unavailable("queue full", &error.to_string()),
        SubmitError::ShuttingDown => Reply::unavailable("shutting down", &error.to_string()),
        SubmitError::Spool(_) => Reply::unavailable("cannot store the message", &error.to_string()),
    }
}

fn submit(exchange: &mut Exchange<'_>, request: &mut Request) -> Reply {
    let engine = exchange.engine;
    let mail = match parse_request(exchange, request) {
        Ok(mail) => mail,
        Err(reply) => return reply,
    };
    let key = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Idempotency-Key"))
        .map(|header| header.value.as_str().trim().to_string());
    // A repeated key waits for its first request. (The spool's fsync wait
    // does not count: it is short, and with few handlers each group commit
    // still takes many requests; a stalled disk is left to the supervisor.)
    if key.is_some() {
        (exchange.may_block)();
    }
    match engine.submit(&mail, key.as_deref()) {
        Ok(accepted) => Reply::json(
            202,
            json!({ "message": "ok", "data": { "id": accepted.id, "status": accepted.state.as_str() } }),
        ),
        Err(error) => refusal(&error),
    }
}

fn send_and_wait(exchange: &mut Exchange<'_>, request: &mut Request) -> Reply {
    let engine = exchange.engine;
    let mail = match parse_request(exchange, request) {
        Ok(mail) => mail,
        Err(reply) => return reply,
    };
    (exchange.may_block)();
    let key = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Idempotency-Key"))
        .map(|header| header.value.as_str().trim().to_string());
    match engine.send_and_wait(&mail, key.as_deref(), engine.config().sync_timeout) {
        Ok(accepted) => Reply::ok(json!({ "id": accepted.id, "status": "sent" })),
        Err(SendError::Rejected(error)) => refusal(&error),
        Err(SendError::Failed {
            id,
            error,
            smtp_code,
        }) => {
            let mut data = json!({ "id": id, "error": error });
            if let Some(code) = smtp_code {
                data["smtp_code"] = json!(code);
            }
            Reply::json(
                502,
                json!({ "message": "failed to send email", "data": data }),
            )
        }
        Err(SendError::Timeout { id }) => Reply::json(
            504,
            json!({
                "message": "no outcome within MAILROOM_SYNC_TIMEOUT_MS",
                "data": { "id": id, "error": "timed out waiting for the relay; see GET /api/mail/{id}" }
            }),
        ),
    }
}

fn status(engine: &Engine, id: &str) -> Reply {
    match engine.status(id) {
        Some(status) => Reply::ok(status.to_json()),
        None => Reply::error(404, "not found", &format!("no message with id {id:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_equal;

    #[test]
    fn token_comparison() {
        assert!(constant_time_equal(b"secret", b"secret"));
        assert!(!constant_time_equal(b"secreT", b"secret"));
        assert!(!constant_time_equal(b"secret1", b"secret"));
        assert!(!constant_time_equal(b"", b"secret"));
    }
}
