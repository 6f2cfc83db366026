//! The API's answers about kept messages and lists: the message list,
//! cancel and retry, the suppression list, batches and the dashboard's
//! figures. Each takes what the request said (query string, path part,
//! body) and returns the JSON answer; the HTTP layer frames it.

use serde_json::{json, Map, Value};

use crate::engine::{ActionError, BatchItem, Engine, ListError, SubmitError, SuppressionError};
use crate::message::{
    parse_batch, MailRequest, MessageError, Messages, RequestBody, JSON_REQUIRED, MAX_BATCH,
};
use crate::status::State;
use crate::store::ListQuery;
use crate::templates::RenderError;
use crate::time::{from_millis, parse_rfc3339, rfc3339};

/// A request body as read, with what the request said it is.
#[derive(Debug)]
pub(crate) struct Body {
    pub bytes: Vec<u8>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
}

impl Body {
    /// The 400 text for a body that is not JSON (`detail`: the parser's
    /// words). A request that declared another type (curl's `-d` alone
    /// declares a form) is told so.
    pub(crate) fn not_json(&self, detail: &str) -> String {
        let declared = self
            .content_type
            .as_deref()
            .map(str::trim)
            .filter(|declared| {
                let essence = declared.split(';').next().unwrap_or("").trim();
                !(essence.eq_ignore_ascii_case("application/json")
                    || essence.to_ascii_lowercase().ends_with("+json"))
            });
        match declared {
            Some(declared) => format!(
                "malformed JSON: {detail}; {JSON_REQUIRED}, and this request says Content-Type: {declared}"
            ),
            None => format!("malformed JSON: {detail}; {JSON_REQUIRED}"),
        }
    }
}

/// An answer: status code, JSON body, extra headers.
#[derive(Debug)]
pub(crate) struct Answer {
    pub code: u16,
    /// The envelope's `message` and `data`.
    pub message: String,
    pub data: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub(crate) fn ok(data: Value) -> Answer {
        Answer::with(200, "ok", data)
    }

    pub(crate) fn with(code: u16, message: &str, data: Value) -> Answer {
        Answer {
            code,
            message: message.to_string(),
            data,
            headers: Vec::new(),
        }
    }

    pub(crate) fn error(code: u16, message: &str, detail: &str) -> Answer {
        Answer::with(code, message, json!({ "error": detail }))
    }

    pub(crate) fn unavailable(message: &str, detail: &str) -> Answer {
        let mut answer = Answer::error(503, message, detail);
        answer.headers.push(("Retry-After", "1".to_string()));
        answer
    }
}

/// The `(name, value)` pairs of a query string, percent-decoded (`+` is a
/// space). A parameter with an empty value is left out, as if not given:
/// the SPEC writes the list as `?status=&recipient=&…&cursor=`, and a
/// form or client that fills in the parameters it has sends it so.
pub(crate) fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .filter(|pair| !matches!(pair, Ok((_, value)) if value.is_empty()))
        .collect()
}

/// Percent-decodes a URL part (`+` as a space in query strings too).
pub(crate) fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = bytes
                    .get(index + 1..index + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| format!("{text:?} has a bad percent escape"))?;
                out.push(hex);
                index += 3;
            }
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// The store cannot be read: the answer is a 503 (retry later).
pub(crate) fn store_unreachable(error: &std::io::Error) -> Answer {
    Answer::unavailable("the store cannot be read", &error.to_string())
}

fn bad_parameter(name: &str, reason: &str) -> Answer {
    let detail = format!("query parameter `{name}` {reason}");
    Answer::error(400, &detail, &detail)
}

fn limit_of(value: &str, name: &str) -> Result<usize, Answer> {
    match value.parse::<usize>() {
        Ok(limit) if (1..=ListQuery::MAX_LIMIT).contains(&limit) => Ok(limit),
        _ => Err(bad_parameter(
            name,
            &format!("must be a whole number from 1 to {}", ListQuery::MAX_LIMIT),
        )),
    }
}

/// `GET /api/mail?status=&recipient=&tag=&since=&until=&limit=&cursor=`
pub(crate) fn list(engine: &Engine, query: &str) -> Answer {
    let pairs = match query_pairs(query) {
        Ok(pairs) => pairs,
        Err(reason) => return Answer::error(400, "malformed query string", &reason),
    };
    let mut list = ListQuery::new();
    for (name, value) in pairs {
        let time = |value: &str| {
            parse_rfc3339(value).ok_or_else(|| {
                bad_parameter(&name, "must be an RFC 3339 time, e.g. 2026-12-01T10:00:00Z")
            })
        };
        let parsed = match name.as_str() {
            "status" => match State::parse(&value) {
                Some(state) => {
                    list.state = Some(state);
                    Ok(())
                }
                None => Err(bad_parameter(
                    "status",
                    &format!(
                        "must be one of {}",
                        State::ALL.map(State::as_str).join(", ")
                    ),
                )),
            },
            "recipient" => {
                list.recipient = Some(crate::message::comparable_address(&value));
                Ok(())
            }
            "tag" => {
                list.tag = Some(value);
                Ok(())
            }
            "since" => time(&value).map(|since| list.since = Some(since)),
            "until" => time(&value).map(|until| list.until = Some(until)),
            "limit" => limit_of(&value, "limit").map(|limit| list.limit = limit),
            "cursor" => {
                list.cursor = Some(value);
                Ok(())
            }
            other => Err(bad_parameter(
                other,
                "is unknown; known: status, recipient, tag, since, until, limit, cursor",
            )),
        };
        if let Err(answer) = parsed {
            return answer;
        }
    }
    match engine.list(&list) {
        Ok(page) => Answer::ok(json!({
            "messages": page.messages.iter().map(|status| status.summary_json()).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor,
        })),
        Err(ListError::InvalidCursor(detail)) => {
            bad_parameter("cursor", &format!("is not valid ({detail})"))
        }
        Err(ListError::Store(error)) => store_unreachable(&error),
    }
}

fn action_refused(error: ActionError) -> Answer {
    let detail = error.to_string();
    match error {
        ActionError::NotFound { .. } => Answer::error(404, "not found", &detail),
        ActionError::WrongState { state, .. } => Answer::with(
            409,
            &detail,
            json!({ "error": detail, "status": state.as_str() }),
        ),
        ActionError::Unavailable(_) => Answer::unavailable("not available", &detail),
        ActionError::Spool(_) => Answer::unavailable("cannot record it", &detail),
    }
}

/// `DELETE /api/mail/{id}`
pub(crate) fn cancel(engine: &Engine, id: &str) -> Answer {
    match engine.cancel(id) {
        Ok(status) => Answer::ok(status.to_json()),
        Err(error) => action_refused(error),
    }
}

/// `POST /api/mail/{id}/retry`
pub(crate) fn retry(engine: &Engine, id: &str) -> Answer {
    match engine.retry(id) {
        Ok(status) => Answer::with(
            202,
            "ok",
            json!({ "id": status.id, "status": status.state.as_str() }),
        ),
        Err(error) => action_refused(error),
    }
}

/// `GET /api/suppressions?cursor=&limit=`
pub(crate) fn suppressions(engine: &Engine, query: &str) -> Answer {
    let pairs = match query_pairs(query) {
        Ok(pairs) => pairs,
        Err(reason) => return Answer::error(400, "malformed query string", &reason),
    };
    let mut cursor = None;
    let mut limit = ListQuery::DEFAULT_LIMIT;
    for (name, value) in pairs {
        match name.as_str() {
            "cursor" => cursor = Some(value),
            "limit" => match limit_of(&value, "limit") {
                Ok(value) => limit = value,
                Err(answer) => return answer,
            },
            other => return bad_parameter(other, "is unknown; known: cursor, limit"),
        }
    }
    let page = match engine.suppressions(cursor.as_deref(), limit) {
        Ok(page) => page,
        Err(error) => return suppression_refused(error),
    };
    Answer::ok(json!({
        "suppressions": page.suppressions.iter().map(|entry| entry.to_json()).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    }))
}

fn suppression_refused(error: SuppressionError) -> Answer {
    let detail = error.to_string();
    match error {
        SuppressionError::InvalidAddress(_) => Answer::error(400, &detail, &detail),
        SuppressionError::NotFound(_) => Answer::error(404, "not found", &detail),
        _ => Answer::unavailable("cannot record it", &detail),
    }
}

/// `PUT /api/suppressions/{address}` with an optional `{"reason"}` body.
pub(crate) fn suppress(engine: &Engine, address: &str, body: &Body) -> Answer {
    let reason = if body.bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&body.bytes) {
            Ok(Value::Object(object)) => {
                if let Some(unknown) = object.keys().find(|key| key.as_str() != "reason") {
                    let detail = format!("unknown field `{unknown}`; the only field is `reason`");
                    return Answer::error(400, &detail, &detail);
                }
                match object.get("reason") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(reason)) => Some(reason.clone()),
                    Some(_) => {
                        let detail = "field `reason` must be a string";
                        return Answer::error(400, detail, detail);
                    }
                }
            }
            Ok(_) => {
                let detail = "the body must be a JSON object like {\"reason\": \"...\"}";
                return Answer::error(400, detail, detail);
            }
            Err(error) => {
                let detail = body.not_json(&error.to_string());
                return Answer::error(400, &detail, &detail);
            }
        }
    };
    match engine.suppress(address, reason) {
        Ok(entry) => Answer::ok(entry.to_json()),
        Err(error) => suppression_refused(error),
    }
}

/// `DELETE /api/suppressions/{address}`
pub(crate) fn unsuppress(engine: &Engine, address: &str) -> Answer {
    match engine.unsuppress(address) {
        Ok(()) => Answer::ok(json!({ "address": address })),
        Err(error) => suppression_refused(error),
    }
}

/// The item error of a batch: `{"message", "field"}`.
fn item_error(error: &SubmitError) -> Value {
    let field = match error {
        SubmitError::Invalid(error) => error.field().map(str::to_string),
        SubmitError::InvalidIdempotencyKey | SubmitError::IdempotencyConflict { .. } => {
            Some("idempotency_key".into())
        }
        SubmitError::SendAtTooLate | SubmitError::SendAtNotNow => Some("send_at".into()),
        SubmitError::Template(error) => Some(error.field().into()),
        SubmitError::TemplateMixed(_) => Some("template".into()),
        _ => None,
    };
    json!({ "error": { "message": error.to_string(), "field": field } })
}

/// `POST /api/mail/batch` with `{"messages": [...]}`.
pub(crate) fn batch(engine: &Engine, body: &Body) -> Answer {
    let batch = match parse_batch(&body.bytes) {
        Ok(batch) => batch,
        Err(error) if error.classify() == serde_json::error::Category::Data => {
            let detail = "the body must be a JSON object {\"messages\": [...]}";
            return Answer::error(400, detail, detail);
        }
        Err(error) => {
            let detail = body.not_json(&error.to_string());
            return Answer::error(400, &detail, &detail);
        }
    };
    if let Some(unknown) = &batch.unknown {
        let detail = format!("unknown field `{unknown}`; the only field is `messages`");
        return Answer::error(400, &detail, &detail);
    }
    if batch.repeated {
        let detail =
            "field `messages` is given more than once (parsers differ on which one counts)";
        return Answer::error(400, detail, detail);
    }
    let Some(Messages::List(items)) = batch.messages else {
        let detail = "field `messages` must be an array of message requests";
        return Answer::error(400, detail, detail);
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        let detail = format!("field `messages` must hold 1 to {MAX_BATCH} items");
        return Answer::error(400, &detail, &detail);
    }
    // Parse every item; the valid ones go to the engine together.
    let mut parsed: Vec<Result<(MailRequest, Option<String>), Value>> = Vec::new();
    for item in items {
        parsed.push(parse_item(item.0));
    }
    let requests: Vec<BatchItem<'_>> = parsed
        .iter()
        .filter_map(|item| item.as_ref().ok())
        .map(|(request, key)| BatchItem::new(request, key.as_deref()))
        .collect();
    let outcomes = engine.submit_batch(&requests);
    // The store unreachable (or the service stopping) and nothing taken:
    // the whole request is refused as a single one would be, `503` at once.
    let unavailable = outcomes.iter().find_map(|outcome| match outcome {
        Err(error @ (SubmitError::Spool(_) | SubmitError::ShuttingDown)) => Some(error),
        _ => None,
    });
    if let (Some(error), false) = (unavailable, outcomes.iter().any(Result::is_ok)) {
        let message = match error {
            SubmitError::ShuttingDown => "shutting down",
            _ => "cannot store the message",
        };
        return Answer::unavailable(message, &error.to_string());
    }
    let mut outcomes = outcomes.into_iter();
    let results: Vec<Value> = parsed
        .iter()
        .map(|item| match item {
            Err(error) => error.clone(),
            Ok(_) => match outcomes.next() {
                Some(Ok(accepted)) => {
                    json!({ "id": accepted.id, "status": accepted.state.as_str() })
                }
                Some(Err(error)) => item_error(&error),
                None => json!({ "error": { "message": "not accepted", "field": null } }),
            },
        })
        .collect();
    Answer::ok(json!({ "results": results }))
}

/// One batch item: a message request with an optional `idempotency_key`
/// (`None`: the item is not an object).
fn parse_item(item: Option<RequestBody<'_>>) -> Result<(MailRequest, Option<String>), Value> {
    let Some(mut item) = item else {
        return Err(
            json!({ "error": { "message": "an item must be a JSON object (a message request)", "field": null } }),
        );
    };
    let key = match item.fields.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key),
        // A field given twice (this one, say) is the item's first fault.
        Some(_) if item.repeated.is_some() => None,
        Some(_) => {
            return Err(
                json!({ "error": { "message": "field `idempotency_key` must be a string", "field": "idempotency_key" } }),
            )
        }
    };
    MailRequest::from_body(item)
        .map(|request| (request, key))
        .map_err(|error| {
            let mut message = error.to_string();
            if matches!(error, MessageError::UnknownFields(_)) {
                // The list names a request's fields; an item takes one more.
                message.push_str(", and idempotency_key in a batch item");
            }
            json!({ "error": { "message": message, "field": error.field() } })
        })
}

/// `GET /api/templates`
pub(crate) fn templates(engine: &Engine) -> Answer {
    Answer::ok(json!({ "templates": engine.templates().list() }))
}

/// `POST /api/templates/reload`: a broken set is refused, the old one kept.
pub(crate) fn reload_templates(engine: &Engine) -> Answer {
    match engine.templates().reload() {
        Ok(()) => Answer::ok(json!({ "templates": engine.templates().list() })),
        Err(error) => {
            let detail = format!("templates not reloaded, the previous set stays: {error}");
            Answer::error(422, &detail, &detail)
        }
    }
}

/// `POST /api/templates/{name}/preview` with `{"data": {...}}`: renders,
/// sends nothing.
pub(crate) fn preview(engine: &Engine, name: &str, body: &Body) -> Answer {
    let data = if body.bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(&body.bytes) {
            Ok(Value::Object(mut object)) => {
                if let Some(unknown) = object.keys().find(|key| key.as_str() != "data") {
                    let detail = format!("unknown field `{unknown}`; the only field is `data`");
                    return Answer::error(400, &detail, &detail);
                }
                object.remove("data").unwrap_or_else(|| json!({}))
            }
            Ok(_) => {
                let detail = "the body must be a JSON object like {\"data\": {...}}";
                return Answer::error(400, detail, detail);
            }
            Err(error) => {
                let detail = body.not_json(&error.to_string());
                return Answer::error(400, &detail, &detail);
            }
        }
    };
    match engine.templates().render(name, &data) {
        Ok(rendered) => Answer::ok(json!(rendered)),
        Err(error @ RenderError::UnknownTemplate { .. }) => {
            Answer::error(404, "not found", &error.to_string())
        }
        Err(error) => {
            let detail = error.to_string();
            Answer::with(
                400,
                &detail,
                json!({ "error": detail, "field": error.field() }),
            )
        }
    }
}

/// `GET /api/stats`: the dashboard's figures.
pub(crate) fn stats(engine: &Engine) -> Answer {
    let stats = match engine.stats() {
        Ok(stats) => stats,
        Err(error) => return store_unreachable(&error),
    };
    let by_state: Map<String, Value> = stats
        .by_state
        .iter()
        .map(|(state, count)| (state.as_str().to_string(), json!(count)))
        .collect();
    Answer::ok(json!({
        "queue_depth": stats.queue_depth,
        "retry_depth": stats.retry_depth,
        "scheduled": stats.scheduled,
        "held": stats.held,
        "webhooks_pending": stats.webhooks_pending,
        "by_state": by_state,
        "relay": {
            "status": if stats.relay_failing.is_some() { "failing" } else { "ok" },
            "last_error": stats.relay_last_error.as_ref().map(|(_, error)| error),
            "last_error_at": stats.relay_last_error.as_ref().map(|(at, _)| rfc3339(*at)),
        },
        "last_hour": stats.last_hour.iter().map(|minute| json!({
            "minute": rfc3339(from_millis(minute.minute * 60_000)),
            "sent": minute.sent,
            "failed": minute.failed,
        })).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_pairs("recipient=a%40b.org&tag=x+y&limit=5&&").unwrap(),
            vec![
                ("recipient".to_string(), "a@b.org".to_string()),
                ("tag".to_string(), "x y".to_string()),
                ("limit".to_string(), "5".to_string()),
            ]
        );
        assert!(query_pairs("a=%zz").is_err());
        assert!(query_pairs("a=%ff").is_err(), "not UTF-8");
        // Empty values are parameters not given.
        assert_eq!(
            query_pairs("status=&recipient=&tag=&since=&until=&limit=7&cursor").unwrap(),
            vec![("limit".to_string(), "7".to_string())]
        );
    }
}
