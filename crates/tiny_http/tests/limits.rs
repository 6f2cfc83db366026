//! Patches: timeouts on every accepted socket; deadlines for a request
//! head, an idle connection and a body; caps on the request line and the
//! headers (414/431, then close); unread bodies skipped with a fixed buffer
//! within limits, else the connection closes; `Connection: close` from the
//! handler honoured; pipelined requests read ahead only so far.
//!
//! On 0.12.0 each of these connections stayed open (or the process
//! aborted allocating the declared body), as the comments say.

mod common;

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tiny_http::{Header, Response};

fn quick(limits: &mut tiny_http::Limits) {
    limits.io_timeout = Duration::from_millis(500);
    limits.head_timeout = Duration::from_millis(500);
    limits.idle_timeout = Duration::from_millis(500);
    limits.body_timeout = Duration::from_millis(800);
    limits.discard_timeout = Duration::from_millis(500);
}

#[test]
fn a_silent_connection_is_closed_without_an_answer_after_the_idle_timeout() {
    // 0.12.0: no timeout at all; the connection stays open for good.
    let server = TestServer::ok(server_with(quick));
    let began = Instant::now();
    let mut stream = connect(server.address);
    assert!(closed(&mut stream));
    assert!(began.elapsed() >= Duration::from_millis(400));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_but_not_while_its_answer_is_prepared() {
    // The handler takes twice the idle timeout to answer.
    let server = TestServer::start(server_with(quick), 2, |request| {
        // A slow handler, not synchronisation.
        std::thread::sleep(Duration::from_millis(1000));
        let _ = request.respond(Response::from_string("late"));
    });
    let (answer, mut reader) = exchange(server.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(answer.map(|answer| answer.code), Some(200));
    let answered = Instant::now();
    assert!(closed(&mut reader));
    assert!(answered.elapsed() >= Duration::from_millis(400));
}

#[test]
fn a_slowloris_head_is_cut_at_the_head_deadline() {
    let server = TestServer::ok(server_with(quick));
    let mut stream = connect(server.address);
    stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let began = Instant::now();
    // One header line every 100 ms: each read makes progress, so only the
    // head's deadline stops it (0.12.0 read such a head for ever).
    let mut cut = false;
    while began.elapsed() < PATIENCE {
        if stream.write_all(b"X-Slow: y\r\n").is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut probe = [0u8; 64];
        stream.set_nonblocking(true).unwrap();
        let read = stream.read(&mut probe);
        stream.set_nonblocking(false).unwrap();
        if let Ok(n) = read {
            let text = String::from_utf8_lossy(&probe[..n]).to_string();
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
            cut = true;
            break;
        }
    }
    assert!(cut, "never cut off");
}

#[test]
fn a_body_that_stops_arriving_fails_the_read_with_a_timeout() {
    let outcome = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&outcome);
    let server = TestServer::start(server_with(quick), 2, move |mut request| {
        let mut body = Vec::new();
        let read = request.as_reader().read_to_end(&mut body);
        *seen.lock().unwrap() = Some(read.map_err(|error| error.kind()));
        let _ = request.respond(Response::empty(408));
    });
    let (answer, _reader) = exchange(
        server.address,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\nonly this",
    );
    assert_eq!(answer.map(|answer| answer.code), Some(408));
    assert_eq!(
        *outcome.lock().unwrap(),
        Some(Err(std::io::ErrorKind::TimedOut))
    );
}

#[test]
fn a_body_trickled_past_its_deadline_fails_the_read() {
    let outcome = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&outcome);
    let server = TestServer::start(server_with(quick), 2, move |mut request| {
        let mut body = Vec::new();
        let read = request.as_reader().read_to_end(&mut body);
        *seen.lock().unwrap() = Some(read.map_err(|error| error.kind()));
        let _ = request.respond(Response::empty(408));
    });
    let mut stream = connect(server.address);
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
        .unwrap();
    // A byte every 100 ms: never a pause over the I/O timeout.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(3) && stream.write_all(b"x").is_ok() {
        if outcome.lock().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = read_answer(&mut BufReader::new(stream));
    assert_eq!(answer.map(|answer| answer.code), Some(408));
    assert_eq!(
        *outcome.lock().unwrap(),
        Some(Err(std::io::ErrorKind::TimedOut))
    );
}

#[test]
fn an_overlong_request_line_gets_414_and_the_connection_closes() {
    let server = TestServer::ok(default_server());
    let request = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9 * 1024));
    let (answer, mut reader) = exchange(server.address, request.as_bytes());
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 414);
    assert_eq!(answer.header("Connection"), Some("close"));
    assert!(closed(&mut reader));
}

#[test]
fn headers_over_64_kib_in_all_get_431_and_the_connection_closes() {
    let server = TestServer::ok(default_server());
    let mut request = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for index in 0..40 {
        request.push_str(&format!("X-Header-{index}: {}\r\n", "c".repeat(2000)));
    }
    request.push_str("\r\n");
    let (answer, mut reader) = exchange(server.address, request.as_bytes());
    assert_eq!(answer.map(|answer| answer.code), Some(431));
    assert!(closed(&mut reader));
}

#[test]
fn an_endless_header_line_is_cut_off() {
    // 0.12.0 kept it all in memory until the process ran out.
    let server = TestServer::ok(default_server());
    let mut stream = connect(server.address);
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nX-Endless: ").unwrap();
    let chunk = vec![b'e'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 256 * 1024 * 1024 && stream.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    assert!(sent < 256 * 1024 * 1024, "never cut off");
}

#[test]
fn a_huge_declared_body_left_unread_closes_the_connection_and_costs_nothing() {
    // 0.12.0 allocated the declared size to discard it: 50 GB aborted the
    // process.
    let server = TestServer::ok(default_server());
    let (answer, mut reader) = exchange(
        server.address,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000000\r\n\r\n{\"a\":",
    );
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.header("Connection"), Some("close"));
    drop(answer);
    assert!(closed(&mut reader));
    let (again, _) = exchange(server.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(again.map(|answer| answer.code), Some(200));
}

#[test]
fn a_small_unread_body_is_skipped_and_the_connection_kept() {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&paths);
    let server = TestServer::start(default_server(), 1, move |request| {
        seen.lock().unwrap().push(request.url().to_string());
        let _ = request.respond(Response::from_string("ok"));
    });
    let body = "b".repeat(10_000);
    let pipelined = format!(
        "POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}GET /second HTTP/1.1\r\nHost: t\r\n\r\n",
        body.len()
    );
    let mut stream = connect(server.address);
    stream.write_all(pipelined.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..2 {
        let answer = read_answer(&mut reader).expect("an answer");
        assert_eq!(answer.code, 200);
        assert_eq!(answer.header("Connection"), None);
    }
    assert_eq!(*paths.lock().unwrap(), ["/first", "/second"]);
}

#[test]
fn connection_close_set_by_the_handler_is_sent_and_honoured() {
    // 0.12.0 dropped the header and kept the connection open.
    let server = TestServer::start(default_server(), 2, |request| {
        let close = Header::from_bytes(&b"Connection"[..], &b"close"[..]).unwrap();
        let _ = request.respond(Response::from_string("bye").with_header(close));
    });
    let (answer, mut reader) = exchange(
        server.address,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\nGET /more HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    let answer = answer.expect("an answer");
    assert_eq!(answer.header("Connection"), Some("close"));
    assert!(closed(&mut reader), "nothing after the closing answer");
}

#[test]
fn pipelined_requests_are_read_ahead_only_up_to_the_limit() {
    // 0.12.0 read and handed out every request a client sent at once.
    let server = server_with(|limits| limits.max_pipelined = 4);
    let address = server.server_addr().to_ip().unwrap();
    let total = 100;
    let mut stream = connect(address);
    let flood = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".repeat(total);
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(&flood))
    };
    let answered = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    let mut most = 0;
    let mut taken = 0;
    while taken < total {
        // Take what the server hands out until it waits for answers.
        match server.recv_timeout(Duration::from_millis(200)).unwrap() {
            Some(request) => {
                held.push(request);
                taken += 1;
                most = most.max(held.len());
            }
            None => {
                assert!(!held.is_empty(), "the server stopped handing out requests");
                for request in held.drain(..) {
                    request.respond(Response::from_string("ok")).unwrap();
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    for request in held.drain(..) {
        request.respond(Response::from_string("ok")).unwrap();
    }
    writer.join().unwrap().unwrap();
    let mut reader = BufReader::new(&mut stream);
    for _ in 0..total {
        assert_eq!(
            read_answer(&mut reader).map(|answer| answer.code),
            Some(200)
        );
    }
    assert!(most <= 4, "{most} requests handed out at once");
}

#[test]
fn refusals_carry_the_configured_body() {
    let json = server_with(|limits| {
        limits.refusal_body = Some(tiny_http::RefusalBody::new(
            "application/json",
            r#"{"error":"{reason}"}"#,
        ));
    });
    let server = TestServer::ok(json);
    let long = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9 * 1024));
    let (answer, _) = exchange(server.address, long.as_bytes());
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 414);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert_eq!(answer.body, br#"{"error":"request line too long"}"#);
    let (answer, _) = exchange(
        server.address,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    );
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 400);
    assert_eq!(answer.body, br#"{"error":"more than one Host header"}"#);
    let (answer, _) = exchange(server.address, b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n");
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 400);
    assert_eq!(
        answer.body,
        br#"{"error":"malformed header line (lines end with CR LF)"}"#
    );
    // By default, none.
    let plain = TestServer::ok(default_server());
    let (answer, _) = exchange(plain.address, long.as_bytes());
    let answer = answer.expect("an answer");
    assert_eq!((answer.code, answer.body.len()), (414, 0));
    assert_eq!(answer.header("Content-Type"), None);
}
