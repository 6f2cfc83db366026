//! The HTTP API: routes, the JSON envelope, auth and limits, over tiny_http.
//!
//! The accept loop (the thread calling [`HttpServer::run`]) only takes
//! requests from tiny_http and hands each to a handler thread: it never
//! reads, answers or drops a request itself, because each of those can
//! block on a slow client (dropping an unread request makes tiny_http read
//! the rest of its body). What tiny_http does not limit on its connections
//! is limited by [`crate::connections`]; each connection serves one request.

use std::io::{Cursor, ErrorKind};
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
use crate::engine::{Engine, Readiness, SendError, SubmitError};
use crate::message::MailRequest;

/// Connections the kernel holds for tiny_http to accept.
const LISTEN_BACKLOG: i32 = 1024;
/// Handler threads beyond this wait for a free one.
const MAX_HANDLERS: usize = 1024;
/// An idle handler thread ends after this long.
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
/// A retired acceptor is drained for this long after its last request: by
/// then each of its connections has delivered its request or been closed.
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
    /// The tiny_http server accepting connections now.
    acceptor: Arc<Mutex<Acceptor>>,
    stopping: AtomicBool,
    handlers: Arc<HandlerPool>,
}

/// A tiny_http server and what tells whether its accept thread still runs.
struct Acceptor {
    server: Arc<Server>,
    /// tiny_http's copy of the listening socket, owned by its accept
    /// thread: closed when that thread ends, whether by an error (after
    /// which it accepts nothing more) or by a panic (e.g. it unwraps a
    /// failed descriptor copy when out of descriptors, and `recv` then
    /// blocks forever).
    fd: i32,
    /// Cleared once its end has been reported to the accept loop.
    watched: bool,
}

impl HttpServer {
    /// Binds the listen address. Requests are served once [`HttpServer::run`] is called.
    pub fn bind(engine: Engine, address: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(address)?;
        // std listens with a backlog of 128: a burst of connections beyond
        // what tiny_http has accepted yet would see its SYNs dropped and
        // retried a second later. The kernel caps this at somaxconn.
        socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG)?;
        let acceptor = Arc::new(Mutex::new(serve_on(&listener)?));
        let listening = connections::socket_inode(listener.as_raw_fd());
        let watched = Arc::clone(&acceptor);
        // Each janitor pass: a dead accept thread wakes the accept loop,
        // which starts a new one.
        let connections = Connections::start(listener.local_addr()?, move || {
            let mut acceptor = lock(&watched);
            if acceptor.watched
                && listening.is_some()
                && connections::socket_inode(acceptor.fd) != listening
            {
                acceptor.watched = false;
                acceptor.server.unblock();
            }
        });
        Ok(HttpServer {
            listener,
            acceptor,
            stopping: AtomicBool::new(false),
            handlers: Arc::new(HandlerPool::new(Arc::new(engine), connections)),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The accept loop: runs until [`HttpServer::stop`].
    pub fn run(&self) {
        let mut started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let server = Arc::clone(&lock(&self.acceptor).server);
            match server.recv() {
                Ok(request) => self.handlers.accept(request),
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(error) => {
                    // tiny_http's acceptor stops for good after an accept
                    // error (e.g. out of file descriptors). Its open
                    // connections still deliver requests to it, so it is
                    // drained aside while a new acceptor takes over the
                    // listening socket. Back off while acceptors keep dying.
                    let reported = !std::mem::replace(&mut lock(&self.acceptor).watched, false);
                    let why = if reported {
                        "its accept thread ended".to_string()
                    } else {
                        error.to_string()
                    };
                    log::error!("HTTP acceptor stopped ({why}); starting a new acceptor");
                    retire(server, Arc::clone(&self.handlers));
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
        }
    }

    /// Starts a new acceptor, retrying until it works; false when stopping.
    fn replace_acceptor(&self, backoff: Duration) -> bool {
        loop {
            // Pacing retries against a persistent error, not synchronisation.
            std::thread::sleep(backoff);
            let fresh = serve_on(&self.listener);
            let mut acceptor = lock(&self.acceptor);
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            match fresh {
                Ok(fresh) => {
                    *acceptor = fresh;
                    log::info!("HTTP acceptor restarted");
                    return true;
                }
                Err(error) => log::error!("cannot start an HTTP acceptor: {error}"),
            }
        }
    }

    /// Makes [`HttpServer::run`] return. Requests being handled still get their answer.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        lock(&self.acceptor).server.unblock();
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Handler threads may outlive the server; its port may not stay ours.
        self.handlers.connections.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve_on(listener: &TcpListener) -> std::io::Result<Acceptor> {
    let clone = listener.try_clone()?;
    let fd = clone.as_raw_fd();
    // tiny_http panics when the OS refuses it a thread.
    let server = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Server::from_listener(clone, None)
    }))
    .map_err(|_| std::io::Error::other("tiny_http could not start its threads"))?
    .map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok(Acceptor {
        server: Arc::new(server),
        fd,
        watched: true,
    })
}

/// Hands the requests that a dead acceptor's connections still deliver to
/// the handlers, until it has been quiet for [`RETIRED_GRACE`].
fn retire(server: Arc<Server>, handlers: Arc<HandlerPool>) {
    let spawned = std::thread::Builder::new()
        .name("http-retired".into())
        .stack_size(256 * 1024)
        .spawn(move || loop {
            let waiting = Instant::now();
            match server.recv_timeout(RETIRED_GRACE) {
                Ok(Some(request)) => handlers.accept(request),
                // An early `None` is a wake-up, not the end of the grace period.
                Ok(None) if waiting.elapsed() < RETIRED_GRACE => {}
                Ok(None) => return,
                Err(error) => log::debug!("retired HTTP acceptor: {error}"),
            }
        });
    if let Err(error) = spawned {
        log::error!("cannot drain a retired HTTP acceptor: {error}");
    }
}

/// Handler threads, started on demand so that every request gets a thread
/// at once (a slow client holds only its own).
struct HandlerPool {
    sender: Sender<Request>,
    receiver: Receiver<Request>,
    /// Threads waiting for a request. Each dispatch takes one (or starts a
    /// thread), so a dispatched request always finds a thread.
    idle: Arc<AtomicUsize>,
    threads: Arc<AtomicUsize>,
    engine: Arc<Engine>,
    connections: Arc<Connections>,
}

impl HandlerPool {
    fn new(engine: Arc<Engine>, connections: Arc<Connections>) -> HandlerPool {
        let (sender, receiver) = crossbeam_channel::unbounded();
        HandlerPool {
            sender,
            receiver,
            idle: Arc::new(AtomicUsize::new(0)),
            threads: Arc::new(AtomicUsize::new(0)),
            engine,
            connections,
        }
    }

    /// A request's head is complete: note it and hand it to a handler.
    fn accept(&self, request: Request) {
        if let Some(peer) = request.remote_addr() {
            self.connections.request_arrived(*peer);
        }
        self.dispatch(request);
    }

    fn dispatch(&self, request: Request) {
        let took_idle = self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |idle| {
                idle.checked_sub(1)
            })
            .is_ok();
        if !took_idle && self.threads.load(Ordering::SeqCst) < MAX_HANDLERS {
            self.spawn();
        }
        // Unbounded: never blocks the accept loop.
        let _ = self.sender.send(request);
    }

    fn spawn(&self) {
        let receiver = self.receiver.clone();
        let idle = Arc::clone(&self.idle);
        let threads = Arc::clone(&self.threads);
        let engine = Arc::clone(&self.engine);
        let connections = Arc::clone(&self.connections);
        threads.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                loop {
                    match receiver.recv_timeout(HANDLER_IDLE) {
                        Ok(request) => {
                            handle(&engine, &connections, request);
                            idle.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            // Leave only if still counted idle: otherwise a
                            // request was dispatched to this thread's share.
                            if idle
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                            {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                threads.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            self.threads.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start an HTTP handler thread: {error}");
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

fn handle(engine: &Engine, connections: &Connections, mut request: Request) {
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
        if let Some(peer) = request.remote_addr() {
            // Its timeouts must be in place before anything reads from it.
            connections.track(*peer);
        }
    }
    let mut exchange = Exchange {
        engine,
        connections,
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
    if let Some(header) = header("Cache-Control", CLOSE_AFTER_ANSWER) {
        response.add_header(header);
    }
    let Some(peer) = request.remote_addr().copied() else {
        let _ = request.respond(response);
        return;
    };
    // Answering drops the request, and tiny_http then discards what is
    // left of the body by reading it: bound that first.
    let pending = body == Body::Abandoned || (body == Body::Unread && reads_socket);
    let huge = pending && declared >= HUGE_BODY;
    if pending {
        if huge || expects_continue || body == Body::Abandoned || declared > LINGER_MAX_BYTES {
            // Nothing worth waiting for: the discard ends at once.
            let cut = connections.shut_read(peer);
            if huge && (!cut || !allocator::in_use() || declared > MAX_DISCARDED) {
                abandon(connections, request, peer, declared);
                return;
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
    if let Err(error) = request.respond(response) {
        log::debug!("HTTP answer not delivered: {error}");
    }
    drop(serial);
    // The client was told to close. One that lingers is closed by the
    // janitor's next pass (at most JANITOR_INTERVAL later), so it cannot
    // hold one of tiny_http's threads for long while others wait. Closing it
    // here would need a descriptor scan per request (half the accept rate).
    connections.close_at(peer, Instant::now());
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

/// One request per connection: tiny_http serves a keep-alive connection on
/// one thread of its pool until the client leaves, and that pool queues a
/// burst of new connections behind busy threads (a first answer could wait
/// indefinitely). So every answer asks the client to close.
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
        _ if path == "/api" || path.starts_with("/api/") => {
            if let Some(refusal) = check_token(engine, request) {
                return refusal;
            }
            match path.as_str() {
                "/api/mail" if method == Method::Post => submit(exchange, request),
                "/api/mail/v2" if method == Method::Post => send_and_wait(exchange, request),
                "/api/mail" | "/api/mail/v2" => method_not_allowed("POST"),
                _ => match path
                    .strip_prefix("/api/mail/")
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Some(id) if is(&Method::Get) => status(engine, id),
                    Some(_) => method_not_allowed("GET, HEAD"),
                    None => not_found(&path),
                },
            }
        }
        _ => not_found(&path),
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
    let mut chunk = [0u8; 16 * 1024];
    let reader = request.as_reader();
    loop {
        let room = limit.saturating_add(1).saturating_sub(content.len() as u64);
        if room == 0 {
            return Ok(content);
        }
        let wanted = chunk.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        match reader.read(&mut chunk[..wanted]) {
            Ok(0) => return Ok(content),
            Ok(read) => content.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
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
        SubmitError::Invalid(_) | SubmitError::InvalidIdempotencyKey => invalid(&error.to_string()),
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
    match engine.submit(&mail, key.as_deref()) {
        Ok(accepted) => Reply::json(
            202,
            json!({ "message": "ok", "data": { "id": accepted.id, "status": "queued" } }),
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
    match engine.send_and_wait(&mail, engine.config().sync_timeout) {
        Ok(accepted) => Reply::ok(json!({ "id": accepted.id, "status": "sent" })),
        Err(SendError::Rejected(error)) => refusal(&error),
        Err(SendError::Failed { id, error }) => {
            let mut data = json!({ "id": id, "error": error.detail });
            if let Some(code) = error.smtp_code {
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
