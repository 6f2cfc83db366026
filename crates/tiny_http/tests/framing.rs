//! Patch: RFC 9112 framing. A request whose body length cannot be known
//! for sure gets 400 and the connection is closed, so that nothing after
//! it is ever read as a request (0.12.0 used `Transfer-Encoding` and
//! ignored `Content-Length`, took the first of several `Content-Length`s,
//! read an invalid one as no body, and decoded any coding as chunked), and
//! a request with several `Host`s (RFC 9112 §3.2) gets 400 as well.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use tiny_http::Response;

/// A server that records the path of every request it is handed.
fn recording() -> (TestServer, Arc<Mutex<Vec<String>>>) {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&paths);
    let server = TestServer::start(default_server(), 2, move |request| {
        seen.lock().unwrap().push(request.url().to_string());
        let _ = request.respond(Response::from_string("ok"));
    });
    (server, paths)
}

fn refused(head: &str, rest: &str) {
    let (server, paths) = recording();
    let request = format!("{head}\r\n{rest}");
    let (answer, mut reader) = exchange(server.address, request.as_bytes());
    let answer = answer.unwrap_or_else(|| panic!("no answer to {head:?}"));
    assert_eq!(answer.code, 400, "{head:?}");
    assert_eq!(answer.header("Connection"), Some("close"), "{head:?}");
    assert!(closed(&mut reader), "{head:?}: the connection stays open");
    assert!(paths.lock().unwrap().is_empty(), "{head:?}: {paths:?}");
}

const HIDDEN: &str = "GET /hidden HTTP/1.1\r\nHost: t\r\n\r\n";

#[test]
fn transfer_encoding_with_content_length_is_refused() {
    // The chunked body ends early; a proxy framing by Content-Length would
    // pass the hidden request inside the body.
    let body = format!("0\r\n\r\n{HIDDEN}");
    refused(
        &format!(
            "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        &body,
    );
}

#[test]
fn several_or_invalid_content_lengths_are_refused() {
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 40\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: abc\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 99999999999999999999999\r\n",
        "Content-Length: \r\n",
    ] {
        refused(
            &format!("POST /a HTTP/1.1\r\nHost: t\r\n{lengths}"),
            &format!("hello{HIDDEN}"),
        );
    }
}

#[test]
fn unknown_transfer_codings_are_refused() {
    for codings in [
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
    ] {
        refused(
            &format!("POST /a HTTP/1.1\r\nHost: t\r\n{codings}"),
            &format!("5\r\nhello\r\n0\r\n\r\n{HIDDEN}"),
        );
    }
}

#[test]
fn transfer_encoding_in_http_1_0_is_refused() {
    refused(
        "POST /a HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n",
        &format!("5\r\nhello\r\n0\r\n\r\n{HIDDEN}"),
    );
}

#[test]
fn a_plain_chunked_body_still_works_and_keeps_the_connection() {
    let (server, paths) = recording();
    let (answer, mut reader) = exchange(
        server.address,
        format!("POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{HIDDEN}").as_bytes(),
    );
    assert_eq!(answer.map(|answer| answer.code), Some(200));
    // The body was not read by the handler: unfinished chunked bodies close.
    let _ = read_answer(&mut reader);
    let paths = paths.lock().unwrap().clone();
    assert_eq!(paths.first().map(String::as_str), Some("/a"));
}

#[test]
fn several_hosts_are_refused_and_none_is_let_through() {
    // RFC 9112 §3.2: more than one in any version is a 400.
    refused("GET /a HTTP/1.1\r\nHost: t\r\nHost: u\r\n", "");
    refused("GET /a HTTP/1.0\r\nHost: t\r\nHost: u\r\n", "");
    // None (the RFC wants a 400 in HTTP/1.1) is served, as upstream did.
    let (server, paths) = recording();
    let (answer, _) = exchange(server.address, b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(answer.expect("an answer").code, 200);
    let (answer, _) = exchange(
        server.address,
        b"GET /new HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(answer.expect("an answer").code, 200);
    assert_eq!(*paths.lock().unwrap(), ["/old", "/new"]);
}

#[test]
fn a_lone_lf_or_cr_in_the_head_is_refused_at_once() {
    // A 400 at once, not a 408 after waiting for a CR LF until the head's
    // deadline (upstream read on, taking the LF as part of the line).
    let (server, paths) = recording();
    for head in [
        "GET /a HTTP/1.1\nHost: t\n\n",
        "GET /a HTTP/1.1\r\nHost: t\n\n",
        "GET /a HTTP/1.1\r\nHost: t\r\n\n",
        "GET /a HTTP/1.1\r\nHost: t\rX-B: 1\r\n\r\n",
    ] {
        let (answer, mut reader) = exchange(server.address, head.as_bytes());
        let answer = answer.unwrap_or_else(|| panic!("no answer to {head:?}"));
        assert_eq!(answer.code, 400, "{head:?}");
        assert!(closed(&mut reader), "{head:?}: the connection stays open");
    }
    assert!(paths.lock().unwrap().is_empty(), "{paths:?}");
}

#[test]
fn an_absolute_form_target_is_served_by_its_path() {
    // RFC 9112 §3.2.2: a server must accept it (proxies send it).
    let (server, paths) = recording();
    let (answer, _) = exchange(
        server.address,
        b"GET http://t/abs?x=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(answer.expect("an answer").code, 200);
    assert_eq!(*paths.lock().unwrap(), ["/abs?x=1"]);
}

#[test]
fn empty_lines_before_a_request_line_are_skipped() {
    // RFC 9112 §2.2: e.g. a CRLF (or a lone LF) a client sends after a body.
    let (server, paths) = recording();
    let (answer, mut reader) = exchange(
        server.address,
        b"POST /one HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab\r\n\nGET /two HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(answer.expect("an answer").code, 200);
    let second = read_answer(&mut reader).expect("the second answer");
    assert_eq!(second.code, 200);
    assert_eq!(*paths.lock().unwrap(), ["/one", "/two"]);
}

/// Patch: a request line naming HTTP/2.0 or later got a 505 written behind
/// the request's own (never answered) writer, so the connection's thread
/// waited for good; it is now refused like any request it cannot serve.
#[test]
fn a_version_above_1_1_is_505_and_the_connection_closed() {
    let (server, paths) = recording();
    for version in ["HTTP/2.0", "HTTP/3.0"] {
        let request = format!("GET /a {version}\r\nHost: t\r\n\r\n");
        let (answer, mut reader) = exchange(server.address, request.as_bytes());
        let answer = answer.unwrap_or_else(|| panic!("no answer to {version}"));
        assert_eq!(answer.code, 505, "{version}");
        assert_eq!(answer.header("Connection"), Some("close"), "{version}");
        assert!(closed(&mut reader), "{version}: the connection stays open");
    }
    assert!(paths.lock().unwrap().is_empty(), "{paths:?}");
    // And the server still serves.
    let (answer, _) = exchange(server.address, HIDDEN.as_bytes());
    assert_eq!(answer.map(|answer| answer.code), Some(200));
}
