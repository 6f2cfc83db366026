//! The HTTP API: routes, the JSON envelope, auth and limits, over tiny_http.
//!
//! The accept loop (the thread calling [`HttpServer::run`]) only takes
//! requests from tiny_http and hands each to a handler thread: it never
//! reads, answers or drops a request itself, because each of those can
//! block on a slow client (dropping an unread request makes tiny_http read
//! the rest of its body).

use std::io::{Cursor, Read};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::engine::{Engine, Readiness, SendError, SubmitError};
use crate::message::MailRequest;

/// Handler threads beyond this wait for a free one.
const MAX_HANDLERS: usize = 1024;
/// An idle handler thread ends after this long.
const HANDLER_IDLE: Duration = Duration::from_secs(30);

/// The HTTP front of an [`Engine`].
pub struct HttpServer {
    listener: TcpListener,
    server: Mutex<Arc<Server>>,
    stopping: AtomicBool,
    handlers: HandlerPool,
}

impl HttpServer {
    /// Binds the listen address. Requests are served once [`HttpServer::run`] is called.
    pub fn bind(engine: Engine, address: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(address)?;
        let server = serve_on(&listener)?;
        Ok(HttpServer {
            listener,
            server: Mutex::new(server),
            stopping: AtomicBool::new(false),
            handlers: HandlerPool::new(Arc::new(engine)),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The accept loop: runs until [`HttpServer::stop`].
    pub fn run(&self) {
        loop {
            let server = Arc::clone(
                &self
                    .server
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            match server.recv() {
                Ok(request) => self.handlers.dispatch(request),
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(error) => {
                    // tiny_http stops accepting for good after an accept
                    // error (e.g. out of file descriptors). Start a new
                    // acceptor on the same listening socket so the service
                    // never goes deaf; pause briefly so a persistent error
                    // does not spin.
                    log::error!("HTTP accept failed ({error}); restarting the acceptor");
                    std::thread::sleep(Duration::from_millis(100));
                    match serve_on(&self.listener) {
                        Ok(fresh) => {
                            *self
                                .server
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh
                        }
                        Err(error) => log::error!("cannot restart the HTTP acceptor: {error}"),
                    }
                }
            }
        }
    }

    /// Makes [`HttpServer::run`] return. Requests being handled still get their answer.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.server
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .unblock();
    }
}

fn serve_on(listener: &TcpListener) -> std::io::Result<Arc<Server>> {
    let clone = listener.try_clone()?;
    Server::from_listener(clone, None)
        .map(Arc::new)
        .map_err(|error| std::io::Error::other(error.to_string()))
}

/// Handler threads, started on demand so that every request gets a thread
/// at once (a slow client holds only its own).
struct HandlerPool {
    sender: Sender<Request>,
    receiver: Receiver<Request>,
    /// Threads waiting for a request. Only the accept loop takes from it,
    /// so a request dispatched after a successful take always finds a thread.
    idle: Arc<AtomicUsize>,
    threads: Arc<AtomicUsize>,
    engine: Arc<Engine>,
}

impl HandlerPool {
    fn new(engine: Arc<Engine>) -> HandlerPool {
        let (sender, receiver) = crossbeam_channel::unbounded();
        HandlerPool {
            sender,
            receiver,
            idle: Arc::new(AtomicUsize::new(0)),
            threads: Arc::new(AtomicUsize::new(0)),
            engine,
        }
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
        threads.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                loop {
                    match receiver.recv_timeout(HANDLER_IDLE) {
                        Ok(request) => {
                            handle(&engine, request);
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

fn handle(engine: &Engine, mut request: Request) {
    let reply = route(engine, &mut request);
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
    if let Err(error) = request.respond(response) {
        log::debug!("HTTP answer not delivered: {error}");
    }
}

/// Our header names and values are ASCII constants and numbers; anything
/// else would be skipped rather than break the answer.
fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn route(engine: &Engine, request: &mut Request) -> Reply {
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
                "/api/mail" if method == Method::Post => submit(engine, request),
                "/api/mail/v2" if method == Method::Post => send_and_wait(engine, request),
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
        .and_then(|header| header.value.as_str().strip_prefix("Bearer "))
        .map(str::trim);
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

fn read_body(engine: &Engine, request: &mut Request) -> Result<Vec<u8>, Reply> {
    let limit = engine.config().max_body_bytes;
    let too_large = || {
        Reply::error(
            413,
            "request body too large",
            &format!("the limit is {limit} bytes (MAILROOM_MAX_BODY_BYTES)"),
        )
        .with_header("Connection", "close")
    };
    let declared = request.body_length();
    if declared.is_some_and(|length| length as u64 > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024));
    // A client that sends more than it declared, or a chunked body, is cut at the limit.
    if let Err(error) = request.as_reader().take(limit + 1).read_to_end(&mut body) {
        return Err(Reply::error(
            400,
            "cannot read the request body",
            &error.to_string(),
        ));
    }
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(body)
}

fn parse_request(engine: &Engine, request: &mut Request) -> Result<MailRequest, Reply> {
    let body = read_body(engine, request)?;
    MailRequest::from_json(&body).map_err(|error| invalid(&error.to_string()))
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

fn submit(engine: &Engine, request: &mut Request) -> Reply {
    let mail = match parse_request(engine, request) {
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

fn send_and_wait(engine: &Engine, request: &mut Request) -> Reply {
    let mail = match parse_request(engine, request) {
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
