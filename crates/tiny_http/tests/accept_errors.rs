//! Patch: an accept error is logged and retried after a pause instead of
//! ending the accept loop, and a connection needs one descriptor only
//! (0.12.0 panicked copying it when none was left).
//!
//! One test in its own binary: it exhausts the process's descriptors.

mod common;

use std::fs::File;
use std::io::{BufReader, Write};
use std::sync::Mutex;
use std::time::Instant;

use common::*;

/// Keeps the log lines of the server, to see the accept errors it met.
struct Recorder(Mutex<Vec<String>>);

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

static RECORDER: Recorder = Recorder(Mutex::new(Vec::new()));

/// Opens files until the process has no descriptor left.
fn exhaust_descriptors() -> Vec<File> {
    let mut files = Vec::new();
    while let Ok(file) = File::open("/dev/null") {
        files.push(file);
        assert!(files.len() < 1_000_000, "no descriptor limit");
    }
    files
}

fn healthy(address: std::net::SocketAddr) -> bool {
    let (answer, _) = exchange(
        address,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    answer.is_some_and(|answer| answer.code == 200)
}

#[test]
fn running_out_of_descriptors_pauses_the_server_but_never_ends_it() {
    log::set_logger(&RECORDER).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    // A small limit, so that exhausting it is quick (the soft one only).
    let _ = std::process::Command::new("prlimit")
        .args([
            format!("--pid={}", std::process::id()),
            "--nofile=512:".into(),
        ])
        .status();
    let server = TestServer::ok(default_server());
    assert!(healthy(server.address));

    // One descriptor for the client's socket, one for the accepted one:
    // 0.12.0 then panicked making a second descriptor for the connection.
    let mut files = exhaust_descriptors();
    files.truncate(files.len() - 2);
    let mut stream = connect(server.address);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let answer = read_answer(&mut reader);
    assert_eq!(answer.map(|answer| answer.code), Some(200));
    // Its descriptors are released before the next step counts on them.
    assert!(closed(&mut reader));
    drop(reader);
    drop(files);

    // None left for the accepted socket: accept fails with EMFILE until
    // descriptors are freed; 0.12.0 ended its accept loop at the first
    // failure and never answered again.
    let mut files = exhaust_descriptors();
    files.pop();
    let mut waiting = connect(server.address);
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !RECORDER
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains("Error accepting new client"))
    {
        assert!(Instant::now() < deadline, "accept never failed");
        std::thread::yield_now();
    }
    drop(files);
    let answer = read_answer(&mut BufReader::new(waiting));
    assert_eq!(answer.map(|answer| answer.code), Some(200));
    assert!(healthy(server.address));
}
