//! The limits a [`Server`](crate::Server) applies to its connections.

use std::time::Duration;

/// What a server allows its clients: timeouts, deadlines and sizes. Every
/// accepted connection is held to these from its first read.
///
/// Build from [`Limits::default`] and change the fields you need:
///
/// ```
/// let mut limits = tiny_http::Limits::default();
/// limits.head_timeout = std::time::Duration::from_secs(5);
/// limits.max_connections = 256;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest pause in a read from or a write to a client while a request
    /// is being received or answered (the sockets' timeouts). Default 10 s.
    pub io_timeout: Duration,
    /// Time a client has from the first byte of a request to the end of its
    /// head (request line and headers); then `408` and the connection is
    /// closed. Default 10 s.
    pub head_timeout: Duration,
    /// How long a connection may wait for the first byte of its next
    /// request, from its opening or from its last answer; then it is closed
    /// without an answer. Not counted while an answer is being prepared.
    /// Default 10 s.
    pub idle_timeout: Duration,
    /// Time to receive a request body, from its first read; reads after it
    /// fail with [`TimedOut`](std::io::ErrorKind::TimedOut). Default 30 s.
    pub body_timeout: Duration,
    /// Longest request line; longer ones get `414` and the connection is
    /// closed. Default 8 KiB.
    pub max_request_line: usize,
    /// Largest total size of a request's header lines; larger heads get
    /// `431` and the connection is closed. Default 64 KiB.
    pub max_header_bytes: usize,
    /// The rest of a request body left unread by the handler is skipped
    /// (read into a fixed buffer) when it is at most this long, to keep the
    /// connection; a longer one closes the connection after the answer.
    /// Also what is read, at most, after an answer that closes the
    /// connection, so that the client sees the answer rather than a reset.
    /// Default 1 MiB.
    pub max_discard_bytes: u64,
    /// Time allowed for skipping an unread body or draining a connection
    /// before it is closed. Default 2 s.
    pub discard_timeout: Duration,
    /// Connections served at once (each has a thread); further ones are
    /// answered `503` and closed. Default 1000.
    pub max_connections: usize,
    /// Requests of one connection handed out and not yet answered
    /// (pipelining); beyond this the connection is not read until an
    /// answer is done. Default 16.
    pub max_pipelined: usize,
    /// The body of the answers the server gives by itself (`400` for a
    /// request it cannot read, `408`, `414`, `417`, `431`, and `503` beyond
    /// `max_connections`). Default `None`: no body.
    pub refusal_body: Option<RefusalBody>,
}

/// A body for the server's own refusals (see [`Limits::refusal_body`]),
/// so that they read like the application's other answers.
///
/// ```
/// let body = tiny_http::RefusalBody::new("application/json", r#"{"error":"{reason}"}"#);
/// assert_eq!(body.render("request line too long"), r#"{"error":"request line too long"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalBody {
    content_type: String,
    template: String,
}

impl RefusalBody {
    /// A body of `content_type` made from `template`, in which every
    /// `{reason}` is replaced by what was wrong: fixed English text of
    /// letters, digits, spaces and `,.:;()-` (safe inside a JSON string).
    pub fn new(content_type: impl Into<String>, template: impl Into<String>) -> RefusalBody {
        RefusalBody {
            content_type: content_type.into(),
            template: template.into(),
        }
    }

    /// The `Content-Type` of the body.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The body for a refusal because of `reason`.
    pub fn render(&self, reason: &str) -> String {
        self.template.replace("{reason}", reason)
    }
}

impl Limits {
    /// The `Content-Type` (when there is a body) and the body of a refusal
    /// because of `reason`, as [`Limits::refusal_body`] sets them.
    pub(crate) fn refusal(&self, reason: &str) -> (Option<&str>, String) {
        match &self.refusal_body {
            Some(body) => (Some(body.content_type()), body.render(reason)),
            None => (None, String::new()),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            io_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_request_line: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_discard_bytes: 1024 * 1024,
            discard_timeout: Duration::from_secs(2),
            max_connections: 1000,
            max_pipelined: 16,
            refusal_body: None,
        }
    }
}
