//! A real `redis-server` for the tests: started on a free loopback port in
//! a temporary directory, with the append-only file synced on every write
//! (so a restart from its AOF loses nothing), stopped when dropped.
//!
//! When no `redis-server` is installed, [`RedisServer::start`] says so
//! loudly and returns `None`; with `MAILROOM_REQUIRE_REDIS=1` (as in CI)
//! it fails instead, so a skipped test can never pass unnoticed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// A running Redis.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its working directory (the AOF lives here).
    pub directory: PathBuf,
}

fn binary() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

impl RedisServer {
    /// Starts a Redis, or returns `None` (after printing `SKIPPED: ...`)
    /// when none is installed and `MAILROOM_REQUIRE_REDIS` is not set.
    pub fn start(test: &str) -> Option<RedisServer> {
        if binary().is_none() {
            let required = std::env::var("MAILROOM_REQUIRE_REDIS").is_ok_and(|value| value == "1");
            assert!(
                !required,
                "{test}: redis-server is not installed, and MAILROOM_REQUIRE_REDIS=1"
            );
            // Straight to stderr: the test harness does not capture it.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: redis-server is not installed (apt-get install redis-server)"
            );
            return None;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        drop(listener);
        let mut server = RedisServer {
            child: None,
            port,
            directory: crate::temp_dir(&format!("redis-{test}")),
        };
        server.run();
        Some(server)
    }

    /// The URL for `MAILROOM_STORE`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn run(&mut self) {
        let binary = binary().expect("redis-server");
        let child = Command::new(binary)
            .current_dir(&self.directory)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", &self.directory.display().to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when it answers PING.
    pub fn answers(&self) -> bool {
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("+PONG")
    }

    /// Runs one command (arguments as given) and returns the first line of
    /// the answer, e.g. `:3` for an integer.
    pub fn command(&self, arguments: &[&str]) -> String {
        let mut request = format!("*{}\r\n", arguments.len());
        for argument in arguments {
            request.push_str(&format!("${}\r\n{argument}\r\n", argument.len()));
        }
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).expect("redis answers connections");
        stream
            .write_all(request.as_bytes())
            .expect("the command is sent");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("an answer");
        line.trim_end().to_string()
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port from the same directory (its AOF).
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
