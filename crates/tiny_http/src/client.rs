use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::common::{HTTPVersion, Method};
use crate::util::{ConnectionState, RefinedTcpStream};
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::{Limits, Request};

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // deadlines, pending answers, closing
    state: Arc<ConnectionState>,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    /// a header line is malformed, or ends with a lone CR or LF
    WrongHeader(HTTPVersion),
    /// the request has more than one `Host` header
    SeveralHosts(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    /// the request line is longer than the limit
    RequestLineTooLong,
    /// the header lines are larger than the limit
    HeadersTooLarge(HTTPVersion),
    /// the length of the body cannot be known for sure (RFC 9112 section 6)
    BadFraming(HTTPVersion),
    /// the request line names an HTTP version above 1.1
    UnsupportedVersion,
    /// no request came before the idle deadline, or the connection is closing
    Idle,
    ReadIoError(IoError),
}

impl ReadError {
    /// The answer the server gives by itself for this error (code, version,
    /// reason) before it closes the connection; `None` when there is
    /// nothing to answer.
    fn refusal(self) -> Option<(u16, HTTPVersion, &'static str)> {
        Some(match self {
            // Where the next request would start is unknown: the
            // connection is closed after the answer, as for all of these.
            ReadError::WrongRequestLine => (
                400,
                HTTPVersion(1, 1),
                "malformed request line (lines end with CR LF)",
            ),
            ReadError::WrongHeader(version) => (
                400,
                version,
                "malformed header line (lines end with CR LF)",
            ),
            ReadError::SeveralHosts(version) => (400, version, "more than one Host header"),
            ReadError::BadFraming(version) => (
                400,
                version,
                "the body length is ambiguous: Content-Length with Transfer-Encoding, several or invalid Content-Length values, or a coding other than chunked",
            ),
            ReadError::RequestLineTooLong => (414, HTTPVersion(1, 1), "request line too long"),
            ReadError::HeadersTooLarge(version) => (431, version, "request head too large"),
            ReadError::ReadIoError(error) if error.kind() == ErrorKind::TimedOut => {
                (408, HTTPVersion(1, 1), "request not received in time")
            }
            ReadError::UnsupportedVersion => (
                505,
                HTTPVersion(1, 1),
                "only HTTP versions 1.0 and 1.1 are served",
            ),
            ReadError::ExpectationFailed(version) => (
                417,
                version,
                "unsupported Expect; only 100-continue is known",
            ),
            ReadError::Idle | ReadError::ReadIoError(_) => return None,
        })
    }
}

/// Empty lines skipped before a request line, at most.
const MAX_EMPTY_LINES: usize = 4;

/// Why a line could not be read.
enum LineError {
    /// Longer than allowed.
    TooLong,
    /// A CR or an LF alone: not a line end we take (RFC 9112 §2.2 allows
    /// a lone LF, but a proxy in front may not, and then the two would
    /// disagree on where a header ends).
    Bare,
    Io(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Arc<Limits>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();
        let state = Arc::new(ConnectionState::new(limits, read_socket.socket()));
        read_socket.watch(Arc::clone(&state));

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.new_reader();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            state,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source, at most `limit`
    /// bytes before its `CRLF`.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line. A lone CR or LF is
    /// [`LineError::Bare`], except, with `lone_lf_is_empty`, an LF that is
    /// the line's first byte: an empty line (one a client may leave after
    /// a body, RFC 9112 §2.2).
    fn read_next_line(
        &mut self,
        limit: usize,
        lone_lf_is_empty: bool,
    ) -> Result<Vec<u8>, LineError> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            // The source is a `BufReader`: a byte at a time costs no read.
            #[allow(clippy::unbuffered_bytes)]
            let byte = self.next_header_source.by_ref().bytes().next();

            let byte = match byte {
                Some(b) => b.map_err(LineError::Io)?,
                None => {
                    return Err(LineError::Io(IoError::new(
                        ErrorKind::ConnectionAborted,
                        "Unexpected EOF",
                    )))
                }
            };

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return Ok(buf);
            }
            if byte == b'\n' && buf.is_empty() && lone_lf_is_empty {
                return Ok(buf);
            }
            if byte == b'\n' || prev_byte_was_cr {
                return Err(LineError::Bare);
            }

            prev_byte_was_cr = byte == b'\r';

            // the CR of the line end may still come
            if buf.len() > limit {
                return Err(LineError::TooLong);
            }
            buf.push(byte);
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // The request before this one is done with the stream: what it left
        // of its body is skipped first.
        self.state.wait_for_room();
        self.next_header_source
            .wait_turn()
            .map_err(ReadError::ReadIoError)?;
        if self.state.closing() {
            return Err(ReadError::Idle);
        }
        let skip = self.state.take_skip();
        if skip > 0 {
            self.state.start_draining();
            let skipped = std::io::copy(
                &mut self.next_header_source.by_ref().take(skip),
                &mut std::io::sink(),
            );
            if !matches!(skipped, Ok(n) if n == skip) {
                self.state.close(false);
                return Err(ReadError::Idle);
            }
        }
        self.state.start_idle();
        let limits = Arc::clone(&self.state.limits);

        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                // A few empty lines before the request line are skipped
                // (RFC 9112 §2.2: e.g. a CRLF a client sent after a body).
                let mut skipped = 0;
                let line = loop {
                    match self.read_next_line(limits.max_request_line, true) {
                        Ok(line) if line.is_empty() && skipped < MAX_EMPTY_LINES => {
                            // Still waiting for a request: idle, not
                            // reading a head (no 408 at the head deadline).
                            self.state.start_idle();
                            skipped += 1;
                        }
                        Ok(line) => break line,
                        Err(LineError::TooLong) => return Err(ReadError::RequestLineTooLong),
                        Err(LineError::Bare) => return Err(ReadError::WrongRequestLine),
                        Err(LineError::Io(error)) => return Err(self.io_error(error)),
                    }
                };
                let line = String::from_utf8(line).map_err(|_| ReadError::WrongRequestLine)?;

                let (method, path, version) = parse_request_line(
                    line.trim(), // TODO: remove this conversion
                )?;
                if version > (1, 1) {
                    return Err(ReadError::UnsupportedVersion);
                }
                (method, origin_form(path), version)
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                let mut left = limits.max_header_bytes;
                loop {
                    let line = match self.read_next_line(left, false) {
                        Ok(line) => line,
                        Err(LineError::TooLong) => return Err(ReadError::HeadersTooLarge(version)),
                        Err(LineError::Bare) => return Err(ReadError::WrongHeader(version)),
                        Err(LineError::Io(error)) => return Err(self.io_error(error)),
                    };
                    left = left.saturating_sub(line.len() + 2);

                    if line.is_empty() {
                        break;
                    };
                    headers.push(match crate::Header::parse(&line) {
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            // RFC 9112 §3.2: several Hosts are a 400 (two layers could pick
            // different ones). A missing one is let through, as upstream
            // did: hand-written clients and scripts often leave it out, and
            // nothing here routes by host.
            if headers.iter().filter(|h| h.field.equiv("Host")).count() > 1 {
                return Err(ReadError::SeveralHosts(version));
            }

            (method, path, version, headers)
        };
        if self.state.closing() {
            return Err(ReadError::Idle);
        }

        // building the writer for the request
        let writer = self.sink.new_writer();

        // follow-up for next potential request
        let mut data_source = self.source.new_reader();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            self.remote_addr.as_ref().ok().copied().flatten(),
            data_source,
            writer,
            Some(Arc::clone(&self.state)),
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version.clone())
                }
                request::RequestCreationError::BadFraming => ReadError::BadFraming(version),
            }
        })?;

        // return the request
        Ok(request)
    }

    /// What a failed read while waiting for a request means: a timeout
    /// before its first byte ends an idle connection quietly.
    fn io_error(&self, error: IoError) -> ReadError {
        if self.state.idle() || self.state.closing() {
            ReadError::Idle
        } else {
            ReadError::ReadIoError(error)
        }
    }

    /// Answers a request that cannot be served with `code`, then drains the
    /// connection (for a bounded time and size, so that the client can read
    /// the answer rather than a reset) and ends it.
    fn refuse(&mut self, code: u16, version: HTTPVersion, reason: &str) {
        use crate::{Header, Response, StatusCode};
        let mut writer = self.sink.new_writer();
        let (content_type, body) = self.state.limits.refusal(reason);
        let mut response =
            Response::from_data(body.into_bytes()).with_status_code(StatusCode(code));
        if let Some(content_type) = content_type {
            if let Ok(header) = Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
                response.add_header(header);
            }
        }
        if let Ok(header) = Header::from_bytes(&b"Connection"[..], &b"close"[..]) {
            response.add_header(header);
        }
        let _ = response
            .raw_print(&mut writer, version, &[], false, None)
            .and_then(|()| writer.flush());
        self.state.close(true);
        self.linger();
    }

    /// Reads and drops what the client still sends, until it closes its
    /// side or the discard limits are reached.
    fn linger(&mut self) {
        self.state.close(true);
        self.state.start_draining();
        let limit = self.state.limits.max_discard_bytes;
        let _ = std::io::copy(
            &mut self.next_header_source.by_ref().take(limit),
            &mut std::io::sink(),
        );
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        let rq = match self.read() {
            Ok(rq) => rq,
            Err(error) => {
                match error.refusal() {
                    Some((code, version, reason)) => self.refuse(code, version, reason),
                    // Nothing to answer: idle, or the connection failed.
                    None => self.state.close(true),
                }
                return None;
            }
        };

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        Some(rq)
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// The request target in origin form: an absolute-form target
/// (`http://host/path?query`, which RFC 9112 §3.2.2 says a server must
/// accept) becomes its path and query; any other is kept as it is.
fn origin_form(target: String) -> String {
    let Some(scheme) = ["http://", "https://"].into_iter().find(|scheme| {
        target
            .get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    }) else {
        return target;
    };
    let rest = &target[scheme.len()..];
    match rest.find(['/', '?']).map(|start| &rest[start..]) {
        Some(path) if path.starts_with('/') => path.to_string(),
        Some(query) => format!("/{query}"),
        None => "/".to_string(),
    }
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn absolute_targets_become_origin_form() {
        for (target, origin) in [
            ("http://x/healthz", "/healthz"),
            ("HTTP://x:8080/a/b?c=d", "/a/b?c=d"),
            ("https://x", "/"),
            ("http://x?q=1", "/?q=1"),
            ("/plain?x", "/plain?x"),
            ("*", "*"),
            ("http:/x", "http:/x"),
            ("ht\u{e9}://x/y", "ht\u{e9}://x/y"),
        ] {
            assert_eq!(super::origin_form(target.to_string()), origin, "{target}");
        }
    }

    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
