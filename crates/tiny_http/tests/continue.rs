//! Patch: the `100 Continue` interim answer is the status line alone.
//! Upstream wrote it as a whole response, with `Content-Length: 0` (and
//! `Date`, `Server`), which RFC 9110 §8.6 forbids in a 1xx answer: a
//! strict client takes it for a final, empty answer.

mod common;

use std::io::{BufRead, BufReader, Read, Write};

use common::*;
use tiny_http::Response;

/// A server that answers `got <body>`, reading the body as a handler does.
fn echo_body() -> TestServer {
    TestServer::start(default_server(), 1, |mut request| {
        let mut body = String::new();
        let _ = request.as_reader().read_to_string(&mut body);
        let _ = request.respond(Response::from_string(format!("got {body}")));
    })
}

#[test]
fn continue_is_the_status_line_alone() {
    let server = echo_body();
    let mut stream = connect(server.address);
    stream
        .write_all(
            b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut line = Vec::new();
        assert!(reader.read_until(b'\n', &mut line).unwrap() > 0, "closed");
        interim.extend_from_slice(&line);
    }
    assert_eq!(
        String::from_utf8_lossy(&interim),
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    stream.write_all(b"hello").unwrap();
    let answer = read_answer(&mut reader).expect("the final answer");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.body, b"got hello");
}

#[test]
fn an_http_1_0_client_gets_no_interim_answer() {
    // RFC 9110 §15.2: a 1xx answer is never sent to an HTTP/1.0 client.
    let server = echo_body();
    let mut stream = connect(server.address);
    stream
        .write_all(b"POST /up HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let answer = read_answer(&mut reader).expect("an answer");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.body, b"got hello");
}
