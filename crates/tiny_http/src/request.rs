use std::io::Error as IoError;
use std::io::{self, Cursor, ErrorKind, Read, Write};

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use std::sync::mpsc::Sender;

use crate::util::ConnectionState;
use crate::{HTTPVersion, Header, Method, Response, StatusCode};
use chunked_transfer::Decoder;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Represents an HTTP request made by a client.
///
/// A `Request` object is what is produced by the server, and is your what
/// your code must analyse and answer.
///
/// This object implements the `Send` trait, therefore you can dispatch your requests to
/// worker threads.
///
/// # Pipelining
///
/// If a client sends multiple requests in a row (without waiting for the response), then you will
/// get multiple `Request` objects simultaneously. This is called *requests pipelining*.
/// Tiny-http automatically reorders the responses so that you don't need to worry about the order
/// in which you call `respond` or `into_writer`.
///
/// This mechanic is disabled if:
///
///  - The body of a request is large enough (handling requires pipelining requires storing the
///    body of the request in a buffer ; if the body is too big, tiny-http will avoid doing that)
///  - A request sends a `Expect: 100-continue` header (which means that the client waits to
///    know whether its body will be processed before sending it)
///  - A request sends a `Connection: close` header or `Connection: upgrade` header (used for
///    websockets), which indicates that this is the last request that will be received on this
///    connection
///
/// # Automatic cleanup
///
/// If a `Request` object is destroyed without `into_writer` or `respond` being called,
/// an empty response with a 500 status code (internal server error) will automatically be
/// sent back to the client.
/// This means that if your code fails during the handling of a request, this "internal server
/// error" response will automatically be sent during the stack unwinding.
///
/// # Testing
///
/// If you want to build fake requests to test your server, use [`TestRequest`](crate::test::TestRequest).
pub struct Request {
    // where to read the body from
    data_reader: Option<Box<dyn Read + Send + 'static>>,

    // if this writer is empty, then the request has been answered
    response_writer: Option<Box<dyn Write + Send + 'static>>,

    remote_addr: Option<SocketAddr>,

    // true if HTTPS, false if HTTP
    secure: bool,

    method: Method,

    path: String,

    http_version: HTTPVersion,

    headers: Vec<Header>,

    body_length: Option<usize>,

    // true if a `100 Continue` response must be sent when `as_reader()` is called
    must_send_continue: bool,

    // If Some, a message must be sent after responding
    notify_when_responded: Option<Sender<()>>,

    // the connection it came from (None for a `TestRequest`)
    state: Option<Arc<ConnectionState>>,

    // bytes of the body not read yet (u64::MAX: unknown, an unfinished chunked body)
    unread: Arc<AtomicU64>,

    // the client said `Connection: close`
    client_closes: bool,
}

struct NotifyOnDrop<R> {
    sender: Sender<()>,
    inner: R,
}

impl<R: Read> Read for NotifyOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
impl<R: Write> Write for NotifyOnDrop<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
impl<R> Drop for NotifyOnDrop<R> {
    fn drop(&mut self) {
        self.sender.send(()).unwrap();
    }
}

/// Error that can happen when building a `Request` object.
#[derive(Debug)]
pub enum RequestCreationError {
    /// The client sent an `Expect` header that was not recognized by tiny-http.
    ExpectationFailed,

    /// Error while reading data from the socket during the creation of the `Request`.
    CreationIoError(IoError),

    /// The length of the body cannot be known for sure (RFC 9112 section 6).
    BadFraming,
}

impl From<IoError> for RequestCreationError {
    fn from(err: IoError) -> RequestCreationError {
        RequestCreationError::CreationIoError(err)
    }
}

/// What a body tells its connection: that its first read began (the body
/// deadline starts), and what it left unread.
struct BodyProgress {
    state: Option<Arc<ConnectionState>>,
    started: bool,
}

impl BodyProgress {
    fn new(state: Option<Arc<ConnectionState>>) -> BodyProgress {
        BodyProgress {
            state,
            started: false,
        }
    }

    fn start(&mut self) {
        if !self.started {
            self.started = true;
            if let Some(state) = &self.state {
                state.start_body();
            }
        }
    }

    fn leave_unread(&self, bytes: u64) {
        if let Some(state) = &self.state {
            state.leave_unread(bytes);
        }
    }
}

/// A request body of known length, read from the connection's stream.
///
/// What the handler leaves unread is not read here: it is reported to the
/// connection, which skips it (with a fixed buffer, within its limits)
/// before the next request, or closes.
struct LengthBody<R> {
    inner: Option<R>,
    remaining: u64,
    progress: Arc<AtomicU64>,
    connection: BodyProgress,
}

impl<R: Read> Read for LengthBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.connection.start();
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let wanted = buf.len().min(
            <usize as std::convert::TryFrom<u64>>::try_from(self.remaining).unwrap_or(usize::MAX),
        );
        let read = inner.read(&mut buf[..wanted])?;
        self.remaining -= read as u64;
        self.progress.store(self.remaining, Ordering::Relaxed);
        if self.remaining == 0 {
            // The stream goes on to the next request at once.
            self.inner = None;
        }
        Ok(read)
    }
}

impl<R> Drop for LengthBody<R> {
    fn drop(&mut self) {
        if self.remaining > 0 && self.inner.is_some() {
            self.connection.leave_unread(self.remaining);
        }
    }
}

/// A chunked request body; one left unfinished closes the connection.
struct ChunkedBody<R: Read> {
    inner: Option<Decoder<R>>,
    progress: Arc<AtomicU64>,
    connection: BodyProgress,
}

impl<R: Read> Read for ChunkedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.connection.start();
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let read = inner.read(buf)?;
        if read == 0 && !buf.is_empty() {
            self.progress.store(0, Ordering::Relaxed);
            self.inner = None;
        }
        Ok(read)
    }
}

impl<R: Read> Drop for ChunkedBody<R> {
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.connection.leave_unread(u64::MAX);
        }
    }
}

/// The writer of an answer: its end (written, or given up) is reported to
/// the connection.
struct AnswerWriter<W> {
    inner: W,
    state: Arc<ConnectionState>,
}

impl<W: Write> Write for AnswerWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Drop for AnswerWriter<W> {
    fn drop(&mut self) {
        self.state.answer_finished();
    }
}

/// How the body of a request is delimited (RFC 9112 section 6.3), or
/// `BadFraming` when that cannot be known for sure: `Transfer-Encoding`
/// with `Content-Length`, in HTTP/1.0, or with another coding than a
/// single `chunked`; several or invalid `Content-Length` values. A server
/// must then answer 400 and close the connection, or a proxy in front and
/// this server could disagree on where the next request starts (request
/// smuggling).
fn framing(
    headers: &[Header],
    version: &HTTPVersion,
) -> Result<(bool, Option<usize>), RequestCreationError> {
    let transfer_encodings: Vec<&Header> = headers
        .iter()
        .filter(|h| h.field.equiv("Transfer-Encoding"))
        .collect();
    let content_lengths: Vec<&Header> = headers
        .iter()
        .filter(|h| h.field.equiv("Content-Length"))
        .collect();
    if !transfer_encodings.is_empty() {
        if !content_lengths.is_empty() || *version < (1, 1) {
            return Err(RequestCreationError::BadFraming);
        }
        let codings: Vec<String> = transfer_encodings
            .iter()
            .flat_map(|h| h.value.as_str().split(','))
            .map(|coding| coding.trim().to_ascii_lowercase())
            .filter(|coding| !coding.is_empty())
            .collect();
        if codings != ["chunked"] {
            return Err(RequestCreationError::BadFraming);
        }
        return Ok((true, None));
    }
    match content_lengths.as_slice() {
        [] => Ok((false, None)),
        [one] => {
            let value = one.value.as_str().trim();
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RequestCreationError::BadFraming);
            }
            let length = value
                .parse::<usize>()
                .map_err(|_| RequestCreationError::BadFraming)?;
            Ok((false, Some(length)))
        }
        _ => Err(RequestCreationError::BadFraming),
    }
}

/// Builds a new request.
///
/// After the request line and headers have been read from the socket, a new `Request` object
/// is built.
///
/// You must pass a `Read` that will allow the `Request` object to read from the incoming data.
/// It is the responsibility of the `Request` to read only the data of the request and not further.
///
/// The `Write` object will be used by the `Request` to write the response.
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_request<R, W>(
    secure: bool,
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    remote_addr: Option<SocketAddr>,
    mut source_data: R,
    writer: W,
    state: Option<Arc<ConnectionState>>,
) -> Result<Request, RequestCreationError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let (chunked, content_length) = framing(&headers, &version)?;

    // true if the client sent a `Expect: 100-continue` header
    let expects_continue = {
        match headers
            .iter()
            .find(|h: &&Header| h.field.equiv("Expect"))
            .map(|h| h.value.as_str())
        {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
            _ => return Err(RequestCreationError::ExpectationFailed),
        }
    };

    // true if the client sent a `Connection: upgrade` header
    let connection_upgrade = {
        match headers
            .iter()
            .find(|h: &&Header| h.field.equiv("Connection"))
            .map(|h| h.value.as_str())
        {
            Some(v) if v.to_ascii_lowercase().contains("upgrade") => true,
            _ => false,
        }
    };

    // the rest of the body still to be read (u64::MAX: unknown)
    let progress = Arc::new(AtomicU64::new(0));

    // we wrap `source_data` around a reading whose nature depends on the transfer-encoding and
    // content-length headers
    let reader = if connection_upgrade {
        // if we have a `Connection: upgrade`, always keeping the whole reader
        Box::new(source_data) as Box<dyn Read + Send + 'static>
    } else if let Some(content_length) = content_length {
        if content_length == 0 {
            Box::new(io::empty()) as Box<dyn Read + Send + 'static>
        } else if content_length <= 1024 && !expects_continue {
            // if the content-length is small enough, we just read everything into a buffer
            if let Some(state) = &state {
                state.start_body();
            }

            let mut buffer = vec![0; content_length];
            let mut offset = 0;

            while offset != content_length {
                let read = source_data.read(&mut buffer[offset..])?;
                if read == 0 {
                    // the socket returned EOF, but we were before the expected content-length
                    // aborting
                    let info = "Connection has been closed before we received enough data";
                    let err = IoError::new(ErrorKind::ConnectionAborted, info);
                    return Err(RequestCreationError::CreationIoError(err));
                }

                offset += read;
            }

            Box::new(Cursor::new(buffer)) as Box<dyn Read + Send + 'static>
        } else {
            progress.store(content_length as u64, Ordering::Relaxed);
            Box::new(LengthBody {
                inner: Some(source_data),
                remaining: content_length as u64,
                progress: Arc::clone(&progress),
                connection: BodyProgress::new(state.clone()),
            }) as Box<dyn Read + Send + 'static>
        }
    } else if chunked {
        progress.store(u64::MAX, Ordering::Relaxed);
        Box::new(ChunkedBody {
            inner: Some(Decoder::new(source_data)),
            progress: Arc::clone(&progress),
            connection: BodyProgress::new(state.clone()),
        }) as Box<dyn Read + Send + 'static>
    } else {
        // if we have neither a Content-Length nor a Transfer-Encoding,
        // assuming that we have no data
        // TODO: could also be multipart/byteranges
        Box::new(io::empty()) as Box<dyn Read + Send + 'static>
    };

    let client_closes = headers
        .iter()
        .filter(|h| h.field.equiv("Connection"))
        .any(|h| h.value.as_str().to_ascii_lowercase().contains("close"));

    let response_writer = match &state {
        Some(state) => {
            state.request_started();
            Box::new(AnswerWriter {
                inner: writer,
                state: Arc::clone(state),
            }) as Box<dyn Write + Send + 'static>
        }
        None => Box::new(writer) as Box<dyn Write + Send + 'static>,
    };

    // RFC 9110 §15.2: no 1xx answer to an HTTP/1.0 client.
    let must_send_continue = expects_continue && version >= HTTPVersion(1, 1);
    Ok(Request {
        data_reader: Some(reader),
        response_writer: Some(response_writer),
        remote_addr,
        secure,
        method,
        path,
        http_version: version,
        headers,
        body_length: content_length,
        must_send_continue,
        notify_when_responded: None,
        state,
        unread: progress,
        client_closes,
    })
}

impl Request {
    /// Returns true if the request was made through HTTPS.
    #[inline]
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// Returns the length of the body in bytes.
    ///
    /// Returns `None` if the length is unknown.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        self.body_length
    }

    /// Returns the address of the client that sent this request.
    ///
    /// The address is always `Some` for TCP listeners, but always `None` for UNIX listeners
    /// (as the remote address of a UNIX client is almost always unnamed).
    ///
    /// Note that this is gathered from the socket. If you receive the request from a proxy,
    /// this function will return the address of the proxy and not the address of the actual
    /// user.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// Sends a response with a `Connection: upgrade` header, then turns the `Request` into a `Stream`.
    ///
    /// The main purpose of this function is to support websockets.
    /// If you detect that the request wants to use some kind of protocol upgrade, you can
    ///  call this function to obtain full control of the socket stream.
    ///
    /// If you call this on a non-websocket request, tiny-http will wait until this `Stream` object
    ///  is destroyed before continuing to read or write on the socket. Therefore you should always
    ///  destroy it as soon as possible.
    pub fn upgrade<R: Read>(
        mut self,
        protocol: &str,
        response: Response<R>,
    ) -> Box<dyn ReadWrite + Send> {
        use crate::util::CustomStream;

        response
            .raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                false,
                Some(protocol),
            )
            .ok(); // TODO: unused result

        self.response_writer.as_mut().unwrap().flush().ok(); // TODO: unused result

        let stream = CustomStream::new(self.extract_reader_impl(), self.extract_writer_impl());
        if let Some(sender) = self.notify_when_responded.take() {
            let stream = NotifyOnDrop {
                sender,
                inner: stream,
            };
            Box::new(stream) as Box<dyn ReadWrite + Send>
        } else {
            Box::new(stream) as Box<dyn ReadWrite + Send>
        }
    }

    /// Allows to read the body of the request.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::io::Read;
    /// # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
    /// let mut request = server.recv().unwrap();
    ///
    /// let mut content = String::new();
    /// request.as_reader().read_to_string(&mut content).unwrap();
    /// ```
    ///
    /// If the client sent a `Expect: 100-continue` header with the request, calling this
    ///  function will send back a `100 Continue` response.
    #[inline]
    pub fn as_reader(&mut self) -> &mut dyn Read {
        if self.must_send_continue {
            // The status line alone: a 1xx answer carries no Content-Length
            // (RFC 9110 §8.6) and needs no other header.
            if let Some(writer) = self.response_writer.as_mut() {
                let _ = writer
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .and_then(|()| writer.flush());
            }
            self.must_send_continue = false;
        }

        self.data_reader.as_mut().unwrap()
    }

    /// Turns the `Request` into a writer.
    ///
    /// The writer has a raw access to the stream to the user.
    /// This function is useful for things like CGI.
    ///
    /// Note that the destruction of the `Writer` object may trigger
    /// some events. For exemple if a client has sent multiple requests and the requests
    /// have been processed in parallel, the destruction of a writer will trigger
    /// the writing of the next response.
    /// Therefore you should always destroy the `Writer` as soon as possible.
    #[inline]
    pub fn into_writer(mut self) -> Box<dyn Write + Send + 'static> {
        let writer = self.extract_writer_impl();
        if let Some(sender) = self.notify_when_responded.take() {
            let writer = NotifyOnDrop {
                sender,
                inner: writer,
            };
            Box::new(writer) as Box<dyn Write + Send + 'static>
        } else {
            writer
        }
    }

    /// Extract the response `Writer` object from the Request, dropping this `Writer` has the same side effects
    /// as the object returned by `into_writer` above.
    ///
    /// This may only be called once on a single request.
    fn extract_writer_impl(&mut self) -> Box<dyn Write + Send + 'static> {
        use std::mem;

        assert!(self.response_writer.is_some());

        let mut writer = None;
        mem::swap(&mut self.response_writer, &mut writer);
        writer.unwrap()
    }

    /// Extract the body `Reader` object from the Request.
    ///
    /// This may only be called once on a single request.
    fn extract_reader_impl(&mut self) -> Box<dyn Read + Send + 'static> {
        use std::mem;

        assert!(self.data_reader.is_some());

        let mut reader = None;
        mem::swap(&mut self.data_reader, &mut reader);
        reader.unwrap()
    }

    /// Sends a response to this request.
    #[inline]
    pub fn respond<R>(mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let res = self.respond_impl(response);
        if let Some(sender) = self.notify_when_responded.take() {
            sender.send(()).unwrap();
        }
        res
    }

    fn respond_impl<R>(&mut self, mut response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let mut writer = self.extract_writer_impl();

        let do_not_send_body = self.method == Method::Head;

        // The connection closes after this answer when the handler says so,
        // when the client did, or when the rest of the body cannot be
        // skipped within the limits (or was never asked for, with
        // `Expect: 100-continue`).
        let closes = match &self.state {
            Some(state) => {
                let unread = self.unread.load(Ordering::Relaxed);
                response.closes_connection()
                    || self.client_closes
                    || state.closing()
                    || (unread > 0
                        && (unread > state.limits.max_discard_bytes || self.must_send_continue))
            }
            None => response.closes_connection(),
        };
        if closes && !response.closes_connection() {
            response.add_header(Header::from_bytes(&b"Connection"[..], &b"close"[..]).unwrap());
        }

        let written = Self::ignore_client_closing_errors(response.raw_print(
            writer.by_ref(),
            self.http_version.clone(),
            &self.headers,
            do_not_send_body,
            None,
        ))
        .and_then(|()| Self::ignore_client_closing_errors(writer.flush()));

        if let Some(state) = &self.state {
            if written.is_err() {
                // Later answers cannot be written in step: the connection ends.
                state.abort();
            } else if closes {
                state.close(true);
            }
        }
        written
    }

    fn ignore_client_closing_errors(result: io::Result<()>) -> io::Result<()> {
        result.or_else(|err| match err.kind() {
            ErrorKind::BrokenPipe => Ok(()),
            ErrorKind::ConnectionAborted => Ok(()),
            ErrorKind::ConnectionRefused => Ok(()),
            ErrorKind::ConnectionReset => Ok(()),
            _ => Err(err),
        })
    }

    pub(crate) fn with_notify_sender(mut self, sender: Sender<()>) -> Self {
        self.notify_when_responded = Some(sender);
        self
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.response_writer.is_some() {
            let response = Response::empty(500);
            let _ = self.respond_impl(response); // ignoring any potential error
            if let Some(sender) = self.notify_when_responded.take() {
                sender.send(()).unwrap();
            }
        }
    }
}

/// Dummy trait that regroups the `Read` and `Write` traits.
///
/// Automatically implemented on all types that implement both `Read` and `Write`.
pub trait ReadWrite: Read + Write {}
impl<T> ReadWrite for T where T: Read + Write {}

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn must_be_send() {
        #![allow(dead_code)]
        fn f<T: Send>(_: &T) {}
        fn bar(rq: &Request) {
            f(rq);
        }
    }
}
