//! Patch: at most `max_connections` connections are served at once (each
//! has a thread); further ones get `503` and are closed (0.12.0 started a
//! thread for every connection, without limit, and `num_connections`
//! panicked as unimplemented).

mod common;

use std::io::Write;
use std::time::Instant;

use common::*;

#[test]
fn connections_beyond_the_limit_get_503_and_the_server_keeps_serving() {
    let server = TestServer::ok(server_with(|limits| limits.max_connections = 3));
    // Three connections, each answered once and kept open.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (answer, reader) = exchange(server.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
            assert_eq!(answer.map(|answer| answer.code), Some(200));
            reader
        })
        .collect();
    assert_eq!(server.server.num_connections(), 3);
    let (answer, mut reader) = exchange(server.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let answer = answer.expect("an answer");
    assert_eq!(answer.code, 503);
    assert_eq!(answer.header("Connection"), Some("close"));
    assert!(answer.header("Retry-After").is_some());
    assert!(closed(&mut reader));
    // Once they leave, new connections are served again.
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut stream = connect(server.address);
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let answer = read_answer(&mut std::io::BufReader::new(stream)).expect("an answer");
        if answer.code == 200 {
            break;
        }
        assert_eq!(answer.code, 503);
        assert!(Instant::now() < deadline, "never served again");
        std::thread::yield_now();
    }
}
