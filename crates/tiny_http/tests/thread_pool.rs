//! Patch: the thread pool starts a thread for a new connection unless an
//! idle thread is free for it.

mod common;

use std::io::{BufReader, Write};
use std::sync::{Arc, Barrier};

use common::*;

/// 0.12.0 queued a burst of connections behind a single idle thread; each
/// thread serves its keep-alive connection until the client leaves, so the
/// queued ones were never answered while the others stayed connected.
#[test]
fn keep_alive_clients_arriving_together_are_each_answered_while_all_stay_connected() {
    let server = TestServer::ok(default_server());
    let clients = 32;
    let arrive = Arc::new(Barrier::new(clients));
    let answered = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (arrive, answered, address) =
                (Arc::clone(&arrive), Arc::clone(&answered), server.address);
            std::thread::spawn(move || {
                arrive.wait();
                let mut stream = connect(address);
                let asked = stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
                let mut reader = BufReader::new(stream);
                let code = asked.ok().and_then(|()| read_answer(&mut reader));
                // Everybody stays connected until everybody has an answer
                // (or gave up waiting for one).
                answered.wait();
                code.map(|answer| answer.code)
            })
        })
        .collect();
    let codes: Vec<Option<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.iter().all(|code| *code == Some(200)), "{codes:?}");
}
