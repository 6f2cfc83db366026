//! The HTTP API over our tiny_http fork (`crates/tiny_http`), which holds
//! every connection to the limits in [`HttpSettings`] (timeouts, deadlines,
//! head and connection caps, framing). What is left here: routes, the JSON
//! envelope, auth, and the handler threads.
//!
//! Requests are received by a pool of handler threads in turn (leader and
//! followers): a thread takes a request from tiny_http, then reads, routes
//! and answers it itself, so a request costs no hand-off between threads.
//!
//! - Quick requests start no thread beyond `MIN_HANDLERS`: fewer runnable
//!   threads keep latency low under load.
//! - A thread that takes a `POST /api/mail` also takes the ones waiting
//!   behind it (up to `MAX_TOGETHER`) and accepts them together: one
//!   commit to the spool, one wait for its fsync, then each its own answer.
//! - Before anything that can wait on a client (reading a body from the
//!   socket, waiting for a delivery or for another request with the same
//!   idempotency key), a handler starts another receiving thread if none is
//!   left, so a slow client holds only the thread answering it.
//! - A connection's pipelined requests may be taken by several threads:
//!   tiny_http writes their answers in order (a thread whose answer comes
//!   later waits for its turn), and hands out at most `max_pipelined` of
//!   them unanswered. A thread answering request n+1 never waits for
//!   request n held by itself, so this cannot deadlock; a thread waiting
//!   for its turn counts as busy for the check below.
//! - [`HttpServer::run`] checks every `STALL_CHECK` that requests are
//!   being taken, and starts a receiver when none was taken while none is
//!   receiving (handlers blocked where nobody expected, e.g. a stalled disk).

mod actions;
mod auth;
mod metrics;
mod reply;
mod routes;
mod settings;

pub use routes::{Route, ROUTES};
pub use settings::HttpSettings;

use std::fmt;
use std::io::Cursor;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tiny_http::{Header, Request, Response, Server};

use crate::config::ConfigError;
use crate::engine::Engine;
use metrics::HttpMetrics;
use routes::{is_plain_submit, route, submit_together, Exchange};

/// Connections the kernel holds for the accept loop.
const LISTEN_BACKLOG: i32 = 1024;
/// Handler threads beyond this are not started: requests then wait for a
/// thread to finish its request.
const MAX_HANDLERS: usize = 1024;
/// Handler threads started for quick requests alone: enough to keep two
/// cores busy while some wait to be scheduled. (128 clients on 2 cores: p99
/// ~16 ms with 8 handlers against ~110 ms with one per client.)
const MIN_HANDLERS: usize = 8;
/// At most this many waiting `POST /api/mail` requests are answered
/// together (one commit). More keep the other core idle while one thread
/// parses them all (32 clients, durable accept: 8 about as fast as 4 or
/// 16, 32 ~15% slower); the committer still joins what several threads
/// add meanwhile.
const MAX_TOGETHER: usize = 8;
/// How often [`HttpServer::run`] checks that requests are being taken.
const STALL_CHECK: Duration = Duration::from_millis(50);
/// A handler thread that received nothing for this long ends, unless it is
/// the last one receiving.
const HANDLER_IDLE: Duration = Duration::from_secs(30);

/// The HTTP server could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum BindError {
    /// The settings are unsafe (e.g. an open relay).
    Refused(ConfigError),
    /// The listen address cannot be used.
    Listen {
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindError::Refused(error) => error.fmt(f),
            BindError::Listen { address, source } => {
                write!(f, "MAILROOM_LISTEN={address}: cannot listen: {source}")
            }
        }
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BindError::Refused(error) => Some(error),
            BindError::Listen { source, .. } => Some(source),
        }
    }
}

/// The HTTP front of an [`Engine`]: [`HttpServer::bind`], then
/// [`HttpServer::run`] on a thread until [`HttpServer::stop`].
pub struct HttpServer {
    handlers: Arc<Handlers>,
    address: SocketAddr,
    stopped: Receiver<()>,
}

/// The handler threads and what they share.
pub(crate) struct Handlers {
    server: Server,
    pub(crate) engine: Engine,
    pub(crate) settings: HttpSettings,
    pub(crate) metrics: HttpMetrics,
    stop: Sender<()>,
    stopping: AtomicBool,
    threads: AtomicUsize,
    /// Threads waiting for the next request (or about to).
    receiving: AtomicUsize,
    /// Requests taken so far ([`HttpServer::run`] watches progress).
    taken: AtomicUsize,
}

impl HttpServer {
    /// Listens on `settings.listen` (refusing an open relay, see
    /// [`HttpSettings::check`]). Requests are served once
    /// [`HttpServer::run`] is called.
    pub fn bind(engine: Engine, settings: HttpSettings) -> Result<HttpServer, BindError> {
        settings.check().map_err(BindError::Refused)?;
        let address = settings.listen;
        let listen = |source| BindError::Listen { address, source };
        let listener = TcpListener::bind(address).map_err(listen)?;
        // std listens with a backlog of 128: a burst of connections beyond
        // what has been accepted yet would see its SYNs dropped and retried
        // a second later. The kernel caps this at somaxconn.
        socket2::SockRef::from(&listener)
            .listen(LISTEN_BACKLOG)
            .map_err(listen)?;
        let local = listener.local_addr().map_err(listen)?;
        let server = Server::from_listener_with_limits(listener, None, settings.limits())
            .map_err(|error| listen(std::io::Error::other(error.to_string())))?;
        let (stop, stopped) = crossbeam_channel::bounded(1);
        Ok(HttpServer {
            handlers: Arc::new(Handlers {
                server,
                engine,
                settings,
                metrics: HttpMetrics::default(),
                stop,
                stopping: AtomicBool::new(false),
                threads: AtomicUsize::new(0),
                receiving: AtomicUsize::new(0),
                taken: AtomicUsize::new(0),
            }),
            address: local,
            stopped,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Serves requests until [`HttpServer::stop`].
    pub fn run(&self) {
        let handlers = &self.handlers;
        Handlers::start_receiver(handlers);
        let mut last_taken = 0;
        loop {
            match self.stopped.recv_timeout(STALL_CHECK) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let taken = handlers.taken.load(Ordering::SeqCst);
            if taken == last_taken && handlers.receiving.load(Ordering::SeqCst) == 0 {
                log::debug!("no HTTP handler took a request for {STALL_CHECK:?}: starting one");
                Handlers::start_receiver(handlers);
            }
            last_taken = taken;
        }
    }

    /// Makes [`HttpServer::run`] return and the receiving threads leave.
    /// Requests being handled still get their answer.
    pub fn stop(&self) {
        let handlers = &self.handlers;
        handlers.stopping.store(true, Ordering::SeqCst);
        let _ = handlers.stop.try_send(());
        // Each wake-up ends one receiver's wait.
        for _ in 0..handlers.threads.load(Ordering::SeqCst) {
            handlers.server.unblock();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // The receiving threads would otherwise keep the port open.
        self.stop();
    }
}

impl Handlers {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Starts a thread receiving requests, unless there are too many.
    fn start_receiver(handlers: &Arc<Handlers>) {
        if handlers.threads.fetch_add(1, Ordering::SeqCst) >= MAX_HANDLERS {
            handlers.threads.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        handlers.receiving.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(handlers);
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                shared.receive();
                shared.threads.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            handlers.receiving.fetch_sub(1, Ordering::SeqCst);
            handlers.threads.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start an HTTP handler thread: {error}");
        }
    }

    /// One handler thread: receive a request and answer it (making sure
    /// another thread is receiving before anything that may block); until
    /// idle for long or stopping.
    fn receive(self: &Arc<Handlers>) {
        loop {
            match self.server.recv_timeout(HANDLER_IDLE) {
                Ok(Some(request)) => {
                    self.taken.fetch_add(1, Ordering::SeqCst);
                    let last = self.receiving.fetch_sub(1, Ordering::SeqCst) == 1;
                    if last && self.threads.load(Ordering::SeqCst) < MIN_HANDLERS {
                        Handlers::start_receiver(self);
                    }
                    let may_block = || {
                        if self.receiving.load(Ordering::SeqCst) == 0 {
                            Handlers::start_receiver(self);
                        }
                    };
                    if is_plain_submit(&request) {
                        self.submit_together(request, &may_block);
                    } else {
                        self.handle(request, &may_block);
                    }
                    self.receiving.fetch_add(1, Ordering::SeqCst);
                }
                // A wake-up from `stop`, or the wait ran out, or the server
                // ended.
                Ok(None) | Err(_) if self.stopping() => {
                    self.receiving.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Ok(None) | Err(_) => {
                    // Leave only if another thread stays receiving.
                    let others = self.receiving.fetch_update(
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                        |receiving| (receiving > 1).then(|| receiving - 1),
                    );
                    if others.is_ok() {
                        return;
                    }
                }
            }
        }
    }

    /// Answers `first` (a [`is_plain_submit`] request) together with the
    /// plain submits waiting behind it, with one commit for all of them:
    /// under load a handler thread then waits for one fsync per batch of
    /// requests, not per request. A request of another kind taken meanwhile
    /// is handled after the answers.
    fn submit_together(&self, first: Request, may_block: &dyn Fn()) {
        let mut requests = vec![first];
        let mut other = None;
        while requests.len() < MAX_TOGETHER && !self.stopping() {
            match self.server.try_recv() {
                Ok(Some(request)) => {
                    self.taken.fetch_add(1, Ordering::SeqCst);
                    if is_plain_submit(&request) {
                        requests.push(request);
                    } else {
                        other = Some(request);
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        let exchange = Exchange {
            handlers: self,
            may_block,
        };
        let replies = submit_together(&exchange, &mut requests);
        for (request, reply) in requests.into_iter().zip(replies) {
            self.respond(request, reply);
        }
        if let Some(request) = other {
            self.handle(request, may_block);
        }
    }

    /// Routes and answers one request.
    fn handle(&self, mut request: Request, may_block: &dyn Fn()) {
        if reads_from_socket(&request) {
            may_block();
        }
        let exchange = Exchange {
            handlers: self,
            may_block,
        };
        let reply = route(&exchange, &mut request);
        self.respond(request, reply);
    }

    /// Writes `reply` as the answer to `request`.
    fn respond(&self, request: Request, reply: reply::Reply) {
        self.metrics.answered(reply.code);
        let length = reply.body.len();
        let mut response = Response::new(
            tiny_http::StatusCode(reply.code),
            Vec::new(),
            Cursor::new(reply.body),
            Some(length),
            None,
        );
        let headers = std::iter::once(("Content-Type", reply.content_type))
            .chain(
                reply
                    .headers
                    .iter()
                    .map(|(name, value)| (*name, value.as_str())),
            )
            .chain(reply.close.then_some(("Connection", "close")));
        for (name, value) in headers {
            // Our names and values are constants and numbers; the fork
            // refuses anything that could break the answer.
            if let Ok(header) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                response.add_header(header);
            }
        }
        if let Err(error) = request.respond(response) {
            log::debug!("HTTP answer not delivered: {error}");
        }
    }
}

/// True when reading the request's body may wait on the client: tiny_http
/// has already read bodies of up to 1 KiB sent without `Expect`; larger or
/// chunked ones are read from the socket by the handler thread.
fn reads_from_socket(request: &Request) -> bool {
    let has = |name: &'static str| {
        request
            .headers()
            .iter()
            .any(|header| header.field.equiv(name))
    };
    request.body_length().unwrap_or(0) > 1024 || has("Expect") || has("Transfer-Encoding")
}
