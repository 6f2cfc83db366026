//! A webhook receiver: a small HTTP/1.1 server on loopback that records
//! every request it gets and checks its Standard Webhooks signature with
//! an HMAC of its own (the `hmac` and `sha2` crates, not the code under
//! test). Switches make it answer with another status, hold requests
//! without answering (hang), or go down (connections refused) and come
//! back on the same port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::PATIENCE;

/// A signing secret for tests, in the `whsec_` form (24 bytes).
pub const TEST_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    /// Request method and path.
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status it was answered with; `None` when it was held (hang).
    pub answered: Option<u16>,
    /// One of the `v1,` signatures in `webhook-signature` matches.
    pub signature_valid: bool,
    pub at: Instant,
}

impl ReceivedWebhook {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::http::header_in(&self.headers, name)
    }
    /// `webhook-id`.
    pub fn id(&self) -> String {
        self.header("webhook-id").unwrap_or_default().to_string()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "webhook body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// Answered 2xx: delivered.
    pub fn delivered(&self) -> bool {
        self.answered.is_some_and(|code| (200..300).contains(&code))
    }
}

/// Checks a `webhook-signature` header: some `v1,<base64>` in it is the
/// HMAC-SHA256 of `<id>.<timestamp>.<body>` with `secret` (`whsec_...`).
pub fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|encoded| engine.decode(encoded).ok())
    else {
        return false;
    };
    header.split(' ').any(|signature| {
        let Some(encoded) = signature.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = engine.decode(encoded) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// A `webhook-signature` value for `<id>.<timestamp>.<body>`, made with
/// the same independent HMAC (to forge requests at a receiver).
pub fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a whsec_ secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", engine.encode(mac.finalize().into_bytes()))
}

#[derive(Default)]
struct Switches {
    code: u16,
    hang: bool,
    down: bool,
    /// Requests whose body contains the text get this code instead.
    refused: Vec<(String, u16)>,
}

struct State {
    secret: String,
    switches: Mutex<Switches>,
    changed: Condvar,
    received: Mutex<Vec<ReceivedWebhook>>,
    arrived: Condvar,
    /// Open connections, to cut when going down.
    connections: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
}

/// The receiver; stops (and closes its connections) when dropped.
pub struct WebhookReceiver {
    address: SocketAddr,
    state: Arc<State>,
    acceptor: Mutex<Option<Acceptor>>,
}

struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WebhookReceiver {
    /// Listens on a free loopback port, answering 200, checking
    /// signatures made with `secret`.
    pub fn start(secret: &str) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let receiver = WebhookReceiver {
            address: listener.local_addr().expect("its address"),
            state: Arc::new(State {
                secret: secret.to_string(),
                switches: Mutex::new(Switches {
                    code: 200,
                    ..Switches::default()
                }),
                changed: Condvar::new(),
                received: Mutex::new(Vec::new()),
                arrived: Condvar::new(),
                connections: Mutex::new(Vec::new()),
                stopped: AtomicBool::new(false),
            }),
            acceptor: Mutex::new(None),
        };
        receiver.accept_on(listener);
        receiver
    }

    /// The URL to configure (`http://127.0.0.1:<port>/hooks/mail`).
    pub fn url(&self) -> String {
        format!("http://{}/hooks/mail", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Answers every request from now on with `code` (200 at start).
    pub fn answer(&self, code: u16) {
        lock(&self.state.switches).code = code;
    }

    /// Answers `code` to every request whose body contains `text` (a
    /// message id, say), whatever else is switched.
    pub fn refuse_containing(&self, text: &str, code: u16) {
        lock(&self.state.switches)
            .refused
            .push((text.to_string(), code));
    }

    /// While on, requests are recorded and held without an answer.
    pub fn hang(&self, on: bool) {
        lock(&self.state.switches).hang = on;
        self.state.changed.notify_all();
    }

    /// Stops listening and cuts every open connection: connections are
    /// refused until [`WebhookReceiver::up`].
    pub fn down(&self) {
        lock(&self.state.switches).down = true;
        self.state.changed.notify_all();
        if let Some(acceptor) = lock(&self.acceptor).take() {
            acceptor.stop.store(true, Ordering::SeqCst);
            // Wakes the blocked accept.
            let _ = TcpStream::connect(self.address);
            let _ = acceptor.thread.join();
        }
        for connection in lock(&self.state.connections).drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port.
    pub fn up(&self) {
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(self.address) {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot listen on {} again: {error}",
                        self.address
                    );
                    // Pacing the retries of bind; nothing to wait on.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        lock(&self.state.switches).down = false;
        self.accept_on(listener);
    }

    fn accept_on(&self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::clone(&self.state);
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) || state.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(copy) = stream.try_clone() {
                    lock(&state.connections).push(copy);
                }
                let state = Arc::clone(&state);
                std::thread::spawn(move || serve(&state, stream));
            }
        });
        *lock(&self.acceptor) = Some(Acceptor { stop, thread });
    }

    /// Every request so far, in the order they arrived.
    pub fn received(&self) -> Vec<ReceivedWebhook> {
        lock(&self.state.received).clone()
    }

    /// The requests answered 2xx.
    pub fn delivered(&self) -> Vec<ReceivedWebhook> {
        self.received()
            .into_iter()
            .filter(ReceivedWebhook::delivered)
            .collect()
    }

    /// Waits until `done` holds for the requests received (up to
    /// [`PATIENCE`]); returns them.
    pub fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[ReceivedWebhook]) -> bool,
    ) -> Vec<ReceivedWebhook> {
        let deadline = Instant::now() + PATIENCE;
        let mut received = lock(&self.state.received);
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "webhook receiver: waited in vain for {what}; got {} requests: {:?}",
                received.len(),
                received
                    .iter()
                    .map(|request| (request.id(), request.answered))
                    .collect::<Vec<_>>()
            );
            received = self
                .state
                .arrived
                .wait_timeout(received, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        received.clone()
    }

    /// Waits until `count` requests were answered 2xx; returns those.
    pub fn wait_for_delivered(&self, count: usize) -> Vec<ReceivedWebhook> {
        self.wait_until(&format!("{count} delivered webhooks"), |received| {
            received
                .iter()
                .filter(|request| request.delivered())
                .count()
                >= count
        })
        .into_iter()
        .filter(ReceivedWebhook::delivered)
        .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.hang(false);
        self.down();
    }
}

/// One connection: requests in turn (keep-alive) until it closes.
fn serve(state: &State, stream: TcpStream) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(mut request) = read_request(&mut reader) else {
            return;
        };
        let (code, hang) = {
            let switches = lock(&state.switches);
            let body = String::from_utf8_lossy(&request.body);
            match switches
                .refused
                .iter()
                .find(|(text, _)| body.contains(text.as_str()))
            {
                Some((_, code)) => (*code, false),
                None => (switches.code, switches.hang),
            }
        };
        request.signature_valid = verify(
            &state.secret,
            request.header("webhook-id").unwrap_or_default(),
            request.header("webhook-timestamp").unwrap_or_default(),
            &request.body,
            request.header("webhook-signature").unwrap_or_default(),
        );
        request.answered = (!hang).then_some(code);
        lock(&state.received).push(request);
        state.arrived.notify_all();
        if hang {
            // Held until the switch is turned off or the receiver goes
            // down, then closed without an answer.
            let mut switches = lock(&state.switches);
            while switches.hang && !switches.down {
                switches = state
                    .changed
                    .wait(switches)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let answer = format!(
            "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\n\r\n",
            if (200..300).contains(&code) {
                "OK"
            } else {
                "Failed"
            }
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads one request (Content-Length bodies only); `None` at the end of
/// the connection or on anything malformed.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<ReceivedWebhook> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
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
    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(ReceivedWebhook {
        method,
        path,
        headers,
        body,
        answered: None,
        signature_valid: false,
        at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_the_standard_webhooks_test_vector() {
        let (id, timestamp, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(verify(TEST_SECRET, id, timestamp, body, good));
        assert_eq!(sign(TEST_SECRET, id, timestamp, body), good);
        assert!(verify(
            TEST_SECRET,
            id,
            timestamp,
            body,
            &format!("v1,AAAA {good}")
        ));
        assert!(!verify(TEST_SECRET, id, "1614265331", body, good));
        assert!(!verify(TEST_SECRET, id, timestamp, b"{}", good));
        assert!(!verify(
            TEST_SECRET,
            id,
            timestamp,
            body,
            &good.replace("v1,", "v2,")
        ));
    }
}
