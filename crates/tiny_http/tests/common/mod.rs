//! Test peers for the fork's patches: a server answering on a few handler
//! threads, and a raw HTTP/1.1 client over loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tiny_http::{Request, Response, Server};

/// How long a client waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A server with `threads` handler threads, each answering every request
/// with `handler`; stopped when dropped.
pub struct TestServer {
    pub server: Arc<Server>,
    pub address: SocketAddr,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(
        server: Server,
        threads: usize,
        handler: impl Fn(Request) + Send + Sync + 'static,
    ) -> TestServer {
        let server = Arc::new(server);
        let address = server.server_addr().to_ip().expect("an IP listener");
        let handler = Arc::new(handler);
        let threads = (0..threads)
            .map(|_| {
                let (server, handler) = (Arc::clone(&server), Arc::clone(&handler));
                std::thread::spawn(move || {
                    while let Ok(request) = server.recv() {
                        handler(request);
                    }
                })
            })
            .collect();
        TestServer {
            server,
            address,
            threads,
        }
    }

    /// Answers every request `200 ok` without reading its body.
    pub fn ok(server: Server) -> TestServer {
        TestServer::start(server, 4, |request| {
            let _ = request.respond(Response::from_string("ok"));
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A server on a free loopback port with the default configuration.
pub fn default_server() -> Server {
    Server::http("127.0.0.1:0").expect("bind")
}

pub fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream
}

/// One answer as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Reads one answer (Content-Length or chunked body); `None` when the
/// connection ended (or timed out) before a status line.
pub fn read_answer(reader: &mut impl BufRead) -> Option<Answer> {
    let mut status = String::new();
    if reader.read_line(&mut status).ok()? == 0 {
        return None;
    }
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut answer = Answer {
        code,
        headers,
        body: Vec::new(),
    };
    if let Some(length) = answer.header("Content-Length") {
        let mut body = vec![0; length.parse().ok()?];
        reader.read_exact(&mut body).ok()?;
        answer.body = body;
    } else if answer
        .header("Transfer-Encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            answer.body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(answer)
}

/// Sends `bytes` on a new connection and reads one answer.
pub fn exchange(address: SocketAddr, bytes: &[u8]) -> (Option<Answer>, BufReader<TcpStream>) {
    let mut stream = connect(address);
    stream.write_all(bytes).expect("write");
    let mut reader = BufReader::new(stream);
    (read_answer(&mut reader), reader)
}

/// True when the server closed the connection (end of file or reset)
/// within [`PATIENCE`], with nothing more to read.
pub fn closed(reader: &mut impl Read) -> bool {
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(error) => matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

/// A server on a free loopback port held to `limits` (changed by `tune`
/// from the defaults).
pub fn server_with(tune: impl FnOnce(&mut tiny_http::Limits)) -> Server {
    let mut limits = tiny_http::Limits::default();
    tune(&mut limits);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    Server::from_listener_with_limits(listener, None, limits).expect("server")
}
