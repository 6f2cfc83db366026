//! Patches: obs-text (bytes from 0x80) is accepted in request header
//! values (0.12.0 closed the connection without an answer); header names
//! and values with CR, LF or other control characters are refused when
//! the server builds a response (0.12.0 wrote them verbatim: header
//! injection).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};

use common::*;
use tiny_http::{Header, Response};

#[test]
fn obs_text_in_a_header_value_is_accepted_and_kept() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&seen);
    let server = TestServer::start(default_server(), 2, move |request| {
        for name in ["User-Agent", "Idempotency-Key", "X-Latin-1"] {
            let value = request
                .headers()
                .iter()
                .find(|header| header.field.equiv(name))
                .map(|header| header.value.as_bytes().to_vec());
            keep.lock().unwrap().push(value);
        }
        let _ = request.respond(Response::from_string("ok"));
    });
    let mut request = b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\xc3\xa9\r\nIdempotency-Key: cl\xc3\xa9-\xe2\x9c\x93\r\nX-Latin-1: caf\xe9\r\n\r\n".to_vec();
    request.extend_from_slice(b"");
    let (answer, _) = exchange(server.address, &request);
    assert_eq!(answer.map(|answer| answer.code), Some(200));
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].as_deref(), Some("aé".as_bytes()));
    assert_eq!(seen[1].as_deref(), Some("clé-✓".as_bytes()));
    assert_eq!(seen[2].as_deref(), Some(&b"caf\xe9"[..]));
}

#[test]
fn control_characters_in_request_headers_are_a_400() {
    let server = TestServer::ok(default_server());
    for line in [&b"X-A: a\x00b"[..], b"X-A: a\x0bb", b"X A: b", b" X-A: b"] {
        let mut request = b"GET / HTTP/1.1\r\nHost: t\r\n".to_vec();
        request.extend_from_slice(line);
        request.extend_from_slice(b"\r\n\r\n");
        let (answer, mut reader) = exchange(server.address, &request);
        assert_eq!(answer.map(|answer| answer.code), Some(400), "{line:?}");
        assert!(closed(&mut reader));
    }
}

#[test]
fn a_response_header_with_cr_or_lf_is_refused() {
    for (name, value) in [
        (&b"X-Echo"[..], &b"a\r\nSet-Cookie: session=attacker"[..]),
        (b"X-Echo", b"a\nb"),
        (b"X-Echo", b"a\rb"),
        (b"X-Echo", b"a\x00b"),
        (b"X-Echo\r\nSet-Cookie", b"b"),
        (b"X Echo", b"b"),
        (b"X-Echo:", b"b"),
        (b"", b"b"),
    ] {
        assert!(
            Header::from_bytes(name, value).is_err(),
            "{name:?} {value:?}"
        );
    }
    assert!("X-Echo: a\r\nSet-Cookie: b".parse::<Header>().is_err());
    assert!(Header::from_bytes(&b"X-Echo"[..], &b"caf\xc3\xa9\tok"[..]).is_ok());
}

#[test]
fn what_a_client_sends_cannot_inject_a_response_header() {
    // A handler echoing a (query) value into a header, as applications do.
    let server = TestServer::start(default_server(), 2, |request| {
        let echoed = request
            .url()
            .trim_start_matches("/?v=")
            .replace("%0D%0A", "\r\n");
        let mut response = Response::from_string("ok");
        if let Ok(header) = Header::from_bytes(&b"X-Echo"[..], echoed.as_bytes()) {
            response.add_header(header);
        }
        let _ = request.respond(response);
    });
    let mut stream = connect(server.address);
    stream
        .write_all(b"GET /?v=a%0D%0ASet-Cookie:%20session=attacker HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let head: Vec<String> = BufReader::new(stream)
        .lines()
        .map_while(Result::ok)
        .take_while(|line| !line.is_empty())
        .collect();
    assert!(head[0].starts_with("HTTP/1.1 200"), "{head:?}");
    assert!(
        !head.iter().any(|line| line.starts_with("Set-Cookie")),
        "{head:?}"
    );
}
