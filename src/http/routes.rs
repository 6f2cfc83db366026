//! Which request goes where, and the endpoints themselves.

use std::io::{ErrorKind, Read};

use serde_json::json;
use tiny_http::{Method, Request};

use super::actions;
use super::auth::check_token;
use super::reply::Reply;
use super::Handlers;
use crate::dashboard;
use crate::engine::{Accepted, BatchItem, Readiness, SendError, SubmitError};
use crate::message::{MailRequest, MessageError};

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Ready,
    Metrics,
    OpenApi,
    Dashboard,
    Submit,
    List,
    SendAndWait,
    Batch,
    Status,
    Cancel,
    Retry,
    Stats,
    Suppressions,
    Suppress,
    Unsuppress,
    Templates,
    ReloadTemplates,
    Preview,
}

/// One route of the API: a method and a path pattern.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET` (which answers `HEAD` too), `POST`, `PUT` or `DELETE`.
    pub method: &'static str,
    /// The path; `{name}` stands for one non-empty path segment.
    pub path: &'static str,
    endpoint: Endpoint,
}

const fn route_to(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route {
        method,
        path,
        endpoint,
    }
}

/// Every route the service answers: the router below finds requests'
/// endpoints in this table, so it is also the list that docs/openapi.json
/// must describe (tests/docs.rs checks both ways). Paths under `/api/` need
/// the bearer token when one is set.
pub const ROUTES: &[Route] = &[
    route_to("GET", "/healthz", Endpoint::Health),
    route_to("GET", "/readyz", Endpoint::Ready),
    route_to("GET", "/metrics", Endpoint::Metrics),
    route_to("GET", "/openapi.json", Endpoint::OpenApi),
    route_to("GET", "/", Endpoint::Dashboard),
    route_to("GET", "/dashboard/app.js", Endpoint::Dashboard),
    route_to("GET", "/dashboard/style.css", Endpoint::Dashboard),
    route_to("POST", "/api/mail", Endpoint::Submit),
    route_to("GET", "/api/mail", Endpoint::List),
    route_to("POST", "/api/mail/v2", Endpoint::SendAndWait),
    route_to("POST", "/api/mail/batch", Endpoint::Batch),
    route_to("GET", "/api/mail/{id}", Endpoint::Status),
    route_to("DELETE", "/api/mail/{id}", Endpoint::Cancel),
    route_to("POST", "/api/mail/{id}/retry", Endpoint::Retry),
    route_to("GET", "/api/stats", Endpoint::Stats),
    route_to("GET", "/api/suppressions", Endpoint::Suppressions),
    route_to("PUT", "/api/suppressions/{address}", Endpoint::Suppress),
    route_to(
        "DELETE",
        "/api/suppressions/{address}",
        Endpoint::Unsuppress,
    ),
    route_to("GET", "/api/templates", Endpoint::Templates),
    route_to("POST", "/api/templates/reload", Endpoint::ReloadTemplates),
    route_to("POST", "/api/templates/{name}/preview", Endpoint::Preview),
];

/// The OpenAPI document, served at `/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// The values of `pattern`'s `{name}` segments in `path`, when it matches.
fn match_path<'p>(pattern: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut values = Vec::new();
    let mut given = path.split('/');
    for expected in pattern.split('/') {
        let segment = given.next()?;
        if expected.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            values.push(segment);
        } else if expected != segment {
            return None;
        }
    }
    given.next().is_none().then_some(values)
}

/// Which routes have this path: those with the fewest `{name}` segments
/// (a literal `/api/mail/batch` wins over `/api/mail/{id}`), with the
/// segments' values.
fn routes_for(path: &str) -> Vec<(&'static Route, Vec<&str>)> {
    let mut found: Vec<(&'static Route, Vec<&str>)> = ROUTES
        .iter()
        .filter_map(|route| match_path(route.path, path).map(|values| (route, values)))
        .collect();
    if let Some(fewest) = found.iter().map(|(_, values)| values.len()).min() {
        found.retain(|(_, values)| values.len() == fewest);
    }
    found
}

/// The `Allow` header for these routes, in a fixed order.
fn allowed(routes: &[(&'static Route, Vec<&str>)]) -> String {
    let has = |method: &str| routes.iter().any(|(route, _)| route.method == method);
    let mut methods = Vec::new();
    for method in ["GET", "POST", "PUT", "DELETE"] {
        if has(method) {
            methods.push(method);
            if method == "GET" {
                methods.push("HEAD");
            }
        }
    }
    methods.join(", ")
}

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
    if path == "/api" || path.starts_with("/api/") {
        if let Some(refusal) = check_token(handlers.settings.api_token.as_ref(), request) {
            return refusal;
        }
    }
    let candidates = routes_for(&path);
    if candidates.is_empty() {
        return not_found(&path);
    }
    let wanted = match method {
        Method::Head => "GET",
        ref other => other.as_str(),
    };
    let Some((route, values)) = candidates.iter().find(|(route, _)| route.method == wanted) else {
        return method_not_allowed(&allowed(&candidates));
    };
    let value = |index: usize| values.get(index).copied().unwrap_or("");
    let query = request
        .url()
        .split_once('?')
        .map_or("", |(_, query)| query)
        .to_string();
    match route.endpoint {
        Endpoint::Health => Reply::ok(json!({ "status": "alive" })),
        Endpoint::Ready => readiness(engine.readiness()),
        Endpoint::Metrics => {
            let mut text = engine.metrics_text();
            handlers.metrics.render(&mut text);
            Reply::text(text, "text/plain; version=0.0.4; charset=utf-8")
        }
        Endpoint::OpenApi => Reply::bytes(OPENAPI.as_bytes().to_vec(), "application/json"),
        // The dashboard (src/dashboard.rs): static files, no token (they hold no data).
        Endpoint::Dashboard => dashboard_page(&path, request),
        Endpoint::Submit => submit(exchange, request),
        Endpoint::List => answer(actions::list(engine, &query)),
        Endpoint::SendAndWait => send_and_wait(exchange, request),
        Endpoint::Batch => match read_body(exchange, request) {
            Ok(body) => answer(actions::batch(engine, &body)),
            Err(reply) => reply,
        },
        Endpoint::Status => status(exchange, value(0)),
        Endpoint::Cancel => answer(actions::cancel(engine, value(0))),
        Endpoint::Retry => answer(actions::retry(engine, value(0))),
        Endpoint::Stats => answer(actions::stats(engine)),
        Endpoint::Suppressions => answer(actions::suppressions(engine, &query)),
        Endpoint::Suppress | Endpoint::Unsuppress => {
            let address = match actions::decode(value(0)) {
                Ok(address) => address,
                Err(reason) => return invalid(&reason),
            };
            if route.endpoint == Endpoint::Unsuppress {
                return answer(actions::unsuppress(engine, &address));
            }
            match read_body(exchange, request) {
                Ok(body) => answer(actions::suppress(engine, &address, &body)),
                Err(reply) => reply,
            }
        }
        Endpoint::Templates => answer(actions::templates(engine)),
        Endpoint::ReloadTemplates => answer(actions::reload_templates(engine)),
        Endpoint::Preview => match read_body(exchange, request) {
            Ok(body) => answer(actions::preview(engine, value(0), &body)),
            Err(reply) => reply,
        },
    }
}

fn answer(answer: actions::Answer) -> Reply {
    let mut reply = Reply::serialized(answer.code, &answer.message, &answer.data);
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
            let mut reply = Reply::bytes(page.body.to_vec(), page.content_type);
            reply.code = page.code;
            reply.headers = page.headers;
            reply
        }
        None => not_found(path),
    }
}

fn not_found(path: &str) -> Reply {
    Reply::error(404, "not found", &format!("no such path: {path}"))
}

fn method_not_allowed(allow: &str) -> Reply {
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
fn read_body(exchange: &Exchange<'_>, request: &mut Request) -> Result<actions::Body, Reply> {
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
        Ok(_) => Ok(actions::Body {
            bytes: content,
            content_type: request
                .headers()
                .iter()
                .find(|header| header.field.equiv("Content-Type"))
                .map(|header| header.value.as_str().to_string()),
        }),
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

/// The message a request asks for, and its `Idempotency-Key` if any.
fn parse_request(
    exchange: &Exchange<'_>,
    request: &mut Request,
) -> Result<(MailRequest, Option<String>), Reply> {
    let body = read_body(exchange, request)?;
    let mail = MailRequest::from_json(&body.bytes).map_err(|error| match error {
        MessageError::MalformedJson(detail) => invalid(&body.not_json(&detail)),
        error => invalid(&error.to_string()),
    })?;
    Ok((mail, idempotency_key(request)?))
}

fn invalid(detail: &str) -> Reply {
    Reply::error(400, detail, detail)
}

fn refusal(error: &SubmitError) -> Reply {
    match error {
        SubmitError::Invalid(_)
        | SubmitError::InvalidIdempotencyKey
        | SubmitError::SendAtTooLate
        | SubmitError::SendAtNotNow
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
    let (mail, key) = match parse_request(exchange, request) {
        Ok(parsed) => parsed,
        Err(reply) => return reply,
    };
    // A repeated key waits for its first request.
    if key.is_some() {
        (exchange.may_block)();
    }
    submitted(engine.submit(&mail, key.as_deref()))
}

fn submitted(result: Result<Accepted, SubmitError>) -> Reply {
    match result {
        Ok(accepted) => {
            #[derive(serde::Serialize)]
            struct Submitted<'a> {
                id: &'a str,
                status: &'a str,
            }
            let data = Submitted {
                id: &accepted.id,
                status: accepted.state.as_str(),
            };
            Reply::serialized(202, "ok", &data)
        }
        Err(error) => refusal(&error),
    }
}

/// True for a `POST /api/mail` that [`submit_together`] may take with
/// others: its body is in memory already (nothing to wait for from the
/// client) and it has no `Idempotency-Key` (which may wait for another
/// request).
pub(crate) fn is_plain_submit(request: &Request) -> bool {
    *request.method() == Method::Post
        && request.url() == "/api/mail"
        && !super::reads_from_socket(request)
        && !request
            .headers()
            .iter()
            .any(|header| header.field.equiv("Idempotency-Key"))
}

/// Answers several [`is_plain_submit`] requests as `POST /api/mail`
/// answers each one, but with one commit to the spool for all of them.
pub(crate) fn submit_together(exchange: &Exchange<'_>, requests: &mut [Request]) -> Vec<Reply> {
    let handlers = exchange.handlers;
    let mut replies: Vec<Option<Reply>> = Vec::with_capacity(requests.len());
    let mut mails = Vec::new();
    for request in requests.iter_mut() {
        let parsed = match check_token(handlers.settings.api_token.as_ref(), request) {
            Some(refused) => Err(refused),
            None => parse_request(exchange, request),
        };
        match parsed {
            Ok((mail, _)) => {
                mails.push((replies.len(), mail));
                replies.push(None);
            }
            Err(reply) => replies.push(Some(reply)),
        }
    }
    let items: Vec<BatchItem<'_>> = mails
        .iter()
        .map(|(_, mail)| BatchItem {
            request: mail,
            idempotency_key: None,
        })
        .collect();
    let results = handlers.engine.submit_batch(&items);
    for ((position, _), result) in mails.iter().zip(results) {
        replies[*position] = Some(submitted(result));
    }
    replies
        .into_iter()
        .map(|reply| reply.unwrap_or_else(|| submitted(Err(SubmitError::ShuttingDown))))
        .collect()
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
    let (mail, key) = match parse_request(exchange, request) {
        Ok(parsed) => parsed,
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
            Reply::serialized(502, "failed to send email", &data)
        }
        Err(SendError::Timeout { id }) => Reply::serialized(
            504,
            "no outcome within MAILROOM_SYNC_TIMEOUT_MS",
            &json!({ "id": id, "error": "timed out waiting for the relay; see GET /api/mail/{id}" }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_their_patterns_only() {
        assert_eq!(
            match_path("/api/mail/{id}", "/api/mail/abc"),
            Some(vec!["abc"])
        );
        assert_eq!(match_path("/api/mail/{id}", "/api/mail/"), None);
        assert_eq!(match_path("/api/mail/{id}", "/api/mail/abc/"), None);
        assert_eq!(match_path("/api/mail/{id}", "/api/mail"), None);
        assert_eq!(
            match_path(
                "/api/templates/{name}/preview",
                "/api/templates/welcome/preview"
            ),
            Some(vec!["welcome"])
        );
        assert_eq!(match_path("/", "/"), Some(vec![]));
        assert_eq!(match_path("/", "/x"), None);
    }

    #[test]
    fn literal_paths_win_and_allow_lists_the_methods() {
        let batch = routes_for("/api/mail/batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(allowed(&batch), "POST");
        assert_eq!(allowed(&routes_for("/api/mail")), "GET, HEAD, POST");
        assert_eq!(allowed(&routes_for("/api/mail/abc")), "GET, HEAD, DELETE");
        assert_eq!(
            allowed(&routes_for("/api/suppressions/a@b.c")),
            "PUT, DELETE"
        );
        assert!(routes_for("/api/nope").is_empty());
        assert!(routes_for("/dashboard/other.js").is_empty());
    }

    #[test]
    fn the_table_is_consistent() {
        for (index, route) in ROUTES.iter().enumerate() {
            assert!(
                ["GET", "POST", "PUT", "DELETE"].contains(&route.method),
                "{route:?}"
            );
            assert!(route.path.starts_with('/'), "{route:?}");
            for segment in route.path.split('/').skip(1) {
                let parameter = segment.starts_with('{');
                assert_eq!(parameter, segment.ends_with('}'), "{route:?}");
                assert!(parameter || !segment.contains(['{', '}']), "{route:?}");
            }
            assert!(
                !ROUTES[..index]
                    .iter()
                    .any(|other| other.method == route.method && other.path == route.path),
                "{route:?} twice"
            );
        }
        let dashboard: Vec<&str> = ROUTES
            .iter()
            .filter(|route| route.endpoint == Endpoint::Dashboard)
            .map(|route| route.path)
            .collect();
        assert_eq!(dashboard, crate::dashboard::paths().collect::<Vec<_>>());
    }

    #[test]
    fn the_openapi_document_is_json() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
    }
}
