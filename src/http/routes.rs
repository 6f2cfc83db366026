//! Which request goes where, and the endpoints themselves.

use std::io::{ErrorKind, Read};

use serde_json::json;
use tiny_http::{Method, Request};

use super::actions;
use super::auth::check_token;
use super::reply::Reply;
use super::Handlers;
use crate::dashboard;
use crate::engine::{Readiness, SendError, SubmitError};
use crate::message::MailRequest;

/// What a handler works with while routing one request.
pub(crate) struct Exchange<'a> {
    pub handlers: &'a Handlers,
    /// Call before anything that may wait on the client or on another
    /// request: it makes sure another thread receives requests meanwhile.
    pub may_block: &'a dyn Fn(),
}

pub(crate) fn route(exchange: &Exchange<'_>, request: &mut Request) -> Reply {
    let handlers = exchange.handlers;
    let engine = &handlers.engine;
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let method = request.method().clone();
    let is = |allowed: &Method| {
        method == *allowed || (*allowed == Method::Get && method == Method::Head)
    };
    match path.as_str() {
        "/healthz" if is(&Method::Get) => Reply::ok(json!({ "status": "alive" })),
        "/readyz" if is(&Method::Get) => readiness(engine.readiness()),
        "/metrics" if is(&Method::Get) => {
            let mut text = engine.metrics_text();
            handlers.metrics.render(&mut text);
            Reply::text(text, "text/plain; version=0.0.4; charset=utf-8")
        }
        "/healthz" | "/readyz" | "/metrics" => method_not_allowed("GET, HEAD"),
        // The dashboard (src/dashboard.rs): static files, no token (they hold no data).
        _ if dashboard::serves(&path) && is(&Method::Get) => dashboard_page(&path, request),
        _ if dashboard::serves(&path) => method_not_allowed("GET, HEAD"),
        _ if path == "/api" || path.starts_with("/api/") => {
            if let Some(refusal) = check_token(handlers.settings.api_token.as_ref(), request) {
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
                "/api/templates" if is(&Method::Get) => answer(actions::templates(engine)),
                "/api/templates" => method_not_allowed("GET, HEAD"),
                "/api/templates/reload" if method == Method::Post => {
                    answer(actions::reload_templates(engine))
                }
                "/api/templates/reload" => method_not_allowed("POST"),
                _ => {
                    if let Some(name) = path
                        .strip_prefix("/api/templates/")
                        .and_then(|rest| rest.strip_suffix("/preview"))
                        .filter(|name| !name.is_empty() && !name.contains('/'))
                    {
                        return match method {
                            Method::Post => match read_body(exchange, request) {
                                Ok(body) => answer(actions::preview(engine, name, &body)),
                                Err(reply) => reply,
                            },
                            _ => method_not_allowed("POST"),
                        };
                    }
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
                        [id] if !id.is_empty() && is(&Method::Get) => status(exchange, id),
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
    let mut reply = Reply::json(answer.code, answer.body);
    reply.headers = answer.headers;
    reply
}

fn dashboard_page(path: &str, request: &Request) -> Reply {
    let if_none_match = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("If-None-Match"))
        .and_then(|header| header.value.to_utf8());
    match dashboard::serve(path, if_none_match) {
        Some(page) => {
            let mut reply = Reply::json(page.code, serde_json::Value::Null);
            reply.body = page.body.to_vec();
            reply.content_type = page.content_type;
            reply.headers = page.headers;
            reply
        }
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

fn readiness(readiness: Readiness) -> Reply {
    match readiness {
        Readiness::Ready => Reply::ok(json!({ "status": "ready" })),
        Readiness::Full => Reply::unavailable("not ready", "the queue is full"),
        Readiness::ShuttingDown => Reply::unavailable("not ready", "shutting down"),
        Readiness::StoreFailing(detail) => Reply::unavailable("not ready", &detail),
        Readiness::RelayFailing(detail) => {
            Reply::unavailable("not ready", &format!("the relay is failing: {detail}"))
        }
    }
}

/// Reads the body, up to the limit. A refusal closes the connection: the
/// rest of the body is not read (SPEC: 413, then closed).
fn read_body(exchange: &Exchange<'_>, request: &mut Request) -> Result<Vec<u8>, Reply> {
    let settings = &exchange.handlers.settings;
    let limit = settings.max_body_bytes;
    let too_large = || {
        Reply::error(
            413,
            "request body too large",
            &format!("the limit is {limit} bytes (MAILROOM_MAX_BODY_BYTES)"),
        )
        .closing()
    };
    let declared = request.body_length();
    if declared.is_some_and(|length| length as u64 > limit) {
        return Err(too_large());
    }
    let mut content = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024));
    // Straight into the vector, one byte past the limit at most (a chunked
    // body has no declared length to refuse early). The server's deadlines
    // end a read that takes too long.
    let read = request
        .as_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut content);
    match read {
        Ok(_) if content.len() as u64 > limit => Err(too_large()),
        Ok(_) if declared.is_some_and(|length| content.len() < length) => Err(Reply::error(
            400,
            "cannot read the request body",
            "the connection ended before the declared Content-Length",
        )
        .closing()),
        Ok(_) => Ok(content),
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(Reply::error(
                408,
                "request body not received in time",
                &format!(
                    "the body must arrive within {} s (MAILROOM_HTTP_BODY_TIMEOUT_MS), with no pause over {} s (MAILROOM_HTTP_IO_TIMEOUT_MS)",
                    settings.body_timeout.as_secs(),
                    settings.io_timeout.as_secs()
                ),
            )
            .closing())
        }
        Err(error) => Err(Reply::error(
            400,
            "cannot read the request body",
            &error.to_string(),
        )
        .closing()),
    }
}

fn parse_request(exchange: &Exchange<'_>, request: &mut Request) -> Result<MailRequest, Reply> {
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
        | SubmitError::SendAtTooLate
        | SubmitError::Template(_)
        | SubmitError::TemplateMixed(_) => invalid(&error.to_string()),
        SubmitError::IdempotencyConflict { .. } => {
            Reply::error(409, &error.to_string(), &error.to_string())
        }
        SubmitError::Full => Reply::unavailable("queue full", &error.to_string()),
        SubmitError::ScheduleFull => {
            Reply::unavailable("too many scheduled messages", &error.to_string())
        }
        SubmitError::ShuttingDown => Reply::unavailable("shutting down", &error.to_string()),
        SubmitError::Spool(_) => Reply::unavailable("cannot store the message", &error.to_string()),
    }
}

fn submit(exchange: &Exchange<'_>, request: &mut Request) -> Reply {
    let engine = &exchange.handlers.engine;
    let mail = match parse_request(exchange, request) {
        Ok(mail) => mail,
        Err(reply) => return reply,
    };
    let key = match idempotency_key(request) {
        Ok(key) => key,
        Err(reply) => return reply,
    };
    // A repeated key waits for its first request.
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

/// The request's `Idempotency-Key`, if any.
fn idempotency_key(request: &Request) -> Result<Option<String>, Reply> {
    match request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Idempotency-Key"))
    {
        // A key is text: bytes that are not UTF-8 cannot be one.
        Some(header) => match header.value.to_utf8() {
            Some(key) => Ok(Some(key.trim().to_string())),
            None => Err(refusal(&SubmitError::InvalidIdempotencyKey)),
        },
        None => Ok(None),
    }
}

fn send_and_wait(exchange: &Exchange<'_>, request: &mut Request) -> Reply {
    let engine = &exchange.handlers.engine;
    let mail = match parse_request(exchange, request) {
        Ok(mail) => mail,
        Err(reply) => return reply,
    };
    let key = match idempotency_key(request) {
        Ok(key) => key,
        Err(reply) => return reply,
    };
    (exchange.may_block)();
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

fn status(exchange: &Exchange<'_>, id: &str) -> Reply {
    match exchange.handlers.engine.status(id) {
        Ok(Some(status)) => Reply::ok(status.to_json()),
        Ok(None) => Reply::error(404, "not found", &format!("no message with id {id:?}")),
        Err(error) => Reply::unavailable("the store cannot be read", &error.to_string()),
    }
}
