//! Test fixtures: the strict SMTP relay from `mailroom-testkit` turned into
//! mailroom settings, the testkit's HTTP client over loopback, and helpers
//! to start the service in-process or as a child process.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::config::{Relay, SmtpSettings, TlsMode};
use mailroom::{Config, Engine, HttpServer, HttpSettings};

pub use mailroom_testkit::certs::{certificates, TestCertificates};
pub use mailroom_testkit::http::{read_reply, request, HttpReply};
pub use mailroom_testkit::smtp::{
    AfterMessage, Login, Received, RelayOptions, Security, StrictRelay,
};
pub use mailroom_testkit::{temp_dir, PATIENCE};

/// Parsing what the relay received, as a mail client would.
pub trait Parsed {
    /// The message, parsed by mail-parser.
    fn parsed(&self) -> mail_parser::Message<'_>;
}

impl Parsed for Received {
    fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("the relay received a parsable message")
    }
}

/// The testkit's strict relay on a loopback port, with what mailroom needs
/// to reach it. Fault switches of [`StrictRelay`] are reachable through it.
pub struct TestRelay {
    pub server: StrictRelay,
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<(String, String)>,
    security: Security,
}

impl std::ops::Deref for TestRelay {
    type Target = StrictRelay;

    fn deref(&self) -> &StrictRelay {
        &self.server
    }
}

impl TestRelay {
    /// Plain SMTP, no AUTH.
    pub fn plain() -> TestRelay {
        TestRelay::with(RelayOptions::default())
    }

    /// Plain SMTP on a given listener (e.g. a port reserved earlier).
    pub fn plain_on(listener: TcpListener) -> TestRelay {
        TestRelay::with_on(listener, RelayOptions::default())
    }

    /// STARTTLS with a certificate for `localhost`, and AUTH PLAIN/LOGIN.
    pub fn starttls_with_auth(user: &str, password: &str) -> TestRelay {
        TestRelay::with(RelayOptions {
            security: Security::StartTls,
            login: Login::Only {
                user: user.to_string(),
                password: password.to_string(),
            },
            ..RelayOptions::default()
        })
    }

    /// A relay with these options on a new port.
    pub fn with(options: RelayOptions) -> TestRelay {
        TestRelay::with_on(TcpListener::bind("127.0.0.1:0").unwrap(), options)
    }

    /// A relay with these options on a given listener.
    pub fn with_on(listener: TcpListener, options: RelayOptions) -> TestRelay {
        let credentials = match &options.login {
            Login::Only { user, password } => Some((user.clone(), password.clone())),
            _ => None,
        };
        let security = options.security;
        let server = StrictRelay::start_on(listener, options);
        let ca_file = server.ca_pem.as_ref().map(|pem| {
            let file = temp_dir("relay-ca").join("ca.pem");
            std::fs::write(&file, pem).unwrap();
            file
        });
        TestRelay {
            port: server.port,
            server,
            ca_file,
            credentials,
            security,
        }
    }

    /// Relay settings for the service's config.
    pub fn settings(&self) -> SmtpSettings {
        let tls = self.security != Security::None;
        SmtpSettings {
            host: if tls {
                "localhost".into()
            } else {
                "127.0.0.1".into()
            },
            port: self.port,
            tls: match self.security {
                Security::None => TlsMode::None,
                Security::StartTls => TlsMode::Required,
                Security::Implicit => TlsMode::Implicit,
            },
            credentials: self
                .credentials
                .clone()
                .map(|(user, password)| (user, mailroom::config::Secret::new(password))),
            hello_name: None,
            extra_root_pem: self.server.ca_pem.clone(),
            timeout: Duration::from_secs(30),
        }
    }

    /// `MAILROOM_SMTP_URL` for a child process.
    pub fn url(&self) -> String {
        match (self.security, &self.credentials) {
            (Security::StartTls, Some((user, password))) => format!(
                "smtp://{user}:{password}@localhost:{}?tls=required",
                self.port
            ),
            _ => format!("smtp://127.0.0.1:{}", self.port),
        }
    }

    /// Waits until at least `count` messages arrived; returns all of them.
    pub fn wait_for(&self, count: usize) -> Vec<Received> {
        let arrived = self.server.wait_for_count(count as u64, PATIENCE);
        assert!(
            arrived.is_some(),
            "expected {count} messages at the relay, got {}",
            self.server.messages()
        );
        self.server.received()
    }

    pub fn received(&self) -> Vec<Received> {
        self.server.received()
    }

    pub fn connections(&self) -> usize {
        self.server.connections()
    }
}

/// A free loopback port with nothing listening (connections are refused).
/// The subjects of `received` messages, in order.
pub fn subjects_of(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|received| received.parsed().subject().unwrap_or_default().to_string())
        .collect()
}

pub fn unused_port() -> (u16, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    (listener.local_addr().unwrap().port(), listener)
}

/// Test configuration: the given relay, memory spool, quick retries.
pub fn config_for(relay: &TestRelay) -> Config {
    let mut config = Config::for_outbox(temp_dir("unused-outbox"));
    config.relay = Relay::Smtp(relay.settings());
    config.retry_base = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    config
}

/// Test configuration pointing at a loopback port where nothing listens
/// (connections are refused), with quick retries; returns that address so
/// a test can start a relay there later.
pub fn config_with_relay_down() -> (Config, SocketAddr) {
    let (_, reserved) = unused_port();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let mut config = Config::for_outbox(temp_dir("unused-outbox"));
    config.relay = Relay::Smtp(SmtpSettings {
        host: "127.0.0.1".into(),
        port: address.port(),
        tls: TlsMode::None,
        credentials: None,
        hello_name: None,
        extra_root_pem: None,
        timeout: Duration::from_secs(30),
    });
    config.retry_base = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    (config, address)
}

/// The service running in this process, on a loopback port.
pub struct Service {
    pub engine: Engine,
    pub server: Arc<HttpServer>,
    pub address: SocketAddr,
}

/// HTTP settings for a service on a free loopback port.
pub fn http_settings() -> HttpSettings {
    let mut settings = HttpSettings::default();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings
}

impl Service {
    pub fn start(config: Config) -> Service {
        Service::start_with(config, http_settings())
    }

    pub fn start_with(config: Config, http: HttpSettings) -> Service {
        let engine = Engine::start(config).expect("engine starts");
        let server = Arc::new(HttpServer::bind(engine.clone(), http).unwrap());
        let address = server.local_addr();
        let runner = Arc::clone(&server);
        std::thread::spawn(move || runner.run());
        Service {
            engine,
            server,
            address,
        }
    }

    pub fn post(&self, path: &str, body: &str) -> HttpReply {
        request(self.address, "POST", path, &[], body.as_bytes())
    }

    pub fn get(&self, path: &str) -> HttpReply {
        request(self.address, "GET", path, &[], b"")
    }

    /// Polls the status endpoint until `status` is reached.
    pub fn wait_for_status(&self, id: &str, status: &str) -> serde_json::Value {
        wait_for_status(self.address, id, status)
    }

    /// POSTs the seed body to `receiver` with `subject` and waits until the
    /// message is sent; its status then.
    pub fn send_and_wait(&self, receiver: &str, subject: &str) -> serde_json::Value {
        let id = self.post("/api/mail", &seed_body(receiver, subject)).id();
        self.wait_for_status(&id, "sent")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.stop();
        self.engine.shutdown();
    }
}

pub fn wait_for_status(address: SocketAddr, id: &str, status: &str) -> serde_json::Value {
    wait_for_status_where(address, id, &format!("reached {status}"), |data| {
        data["status"] == status
    })
}

/// Waits until message `id` has had more than `attempts` attempts and is
/// still `retrying` then (never `failed` on the way).
pub fn wait_for_retrying_beyond(address: SocketAddr, id: &str, attempts: u64) -> serde_json::Value {
    let what = format!("retried beyond {attempts} attempts");
    wait_for_status_where(address, id, &what, |data| {
        assert_ne!(data["status"], "failed", "{data}");
        data["status"] == "retrying" && data["attempts"].as_u64() > Some(attempts)
    })
}

/// Polls message `id`'s status until `done` says so; returns its `data`.
fn wait_for_status_where(
    address: SocketAddr,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = request(address, "GET", &format!("/api/mail/{id}"), &[], b"");
        if reply.code == 200 {
            let data = reply.json()["data"].clone();
            if done(&data) {
                return data;
            }
        }
        assert!(
            Instant::now() < deadline,
            "message {id} never {what}: {}",
            reply.body_text()
        );
        // Polling an HTTP endpoint, as a user would; not synchronisation.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The seed's request body.
pub fn seed_body(receiver: &str, subject: &str) -> String {
    serde_json::json!({
        "sender": "App <app@example.com>",
        "receiver": receiver,
        "subject": subject,
        "message": "Hello from mailroom",
    })
    .to_string()
}

/// The service binary as a child process, with its own environment.
pub struct ChildService {
    pub child: std::process::Child,
    pub address: SocketAddr,
    pub log: PathBuf,
}

impl ChildService {
    /// Starts `mailroom` in `directory` with `variables`, on a port it
    /// picks itself (no race with other tests for a port chosen here), and
    /// waits until it says where it listens.
    pub fn start(directory: &Path, variables: &[(&str, String)]) -> ChildService {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = directory.join(format!(
            "service-{}-{}.log",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::SeqCst)
        ));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
        command
            .current_dir(directory)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MAILROOM_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for (name, value) in variables {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + PATIENCE;
        let address = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text
                .lines()
                .find_map(|line| line.split("listening on http://").nth(1))
                .and_then(|address| address.trim().parse::<SocketAddr>().ok());
            if let Some(address) = listening {
                break address;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("service exited ({status}) before listening: {text}");
            }
            assert!(Instant::now() < deadline, "service did not start: {text}");
            // Polling its log, as a person starting it would watch it.
            std::thread::sleep(Duration::from_millis(10));
        };
        ChildService {
            child,
            address,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn post(&self, path: &str, body: &str) -> HttpReply {
        request(self.address, "POST", path, &[], body.as_bytes())
    }

    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "service did not exit in {limit:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use mailroom_testkit::webhooks::{ReceivedWebhook, WebhookReceiver, TEST_SECRET};

/// Webhook settings for the engine: every event `receiver` should get,
/// signed with [`TEST_SECRET`], retried quickly (the defaults otherwise).
pub fn webhook_settings(receiver: &WebhookReceiver) -> mailroom::webhooks::WebhookSettings {
    webhook_settings_to(&receiver.url())
}

/// As [`webhook_settings`], to any URL.
pub fn webhook_settings_to(url: &str) -> mailroom::webhooks::WebhookSettings {
    let url = url::Url::parse(url).unwrap();
    let secret = mailroom::webhooks::WebhookSecret::parse(TEST_SECRET).unwrap();
    let mut settings = mailroom::webhooks::WebhookSettings::new(url, secret);
    settings.first_retry = Duration::from_millis(20);
    settings.max_retry_delay = Duration::from_millis(200);
    settings
}

/// The variables that send webhooks to `receiver` from a child process.
pub fn webhook_variables(receiver: &WebhookReceiver) -> Vec<(&'static str, String)> {
    vec![
        ("MAILROOM_WEBHOOK_URL", receiver.url()),
        ("MAILROOM_WEBHOOK_SECRET", TEST_SECRET.to_string()),
    ]
}

/// The RFC 3339 UTC time `offset` from now, as the API writes times.
pub fn rfc3339_in(offset: Duration) -> String {
    mailroom_testkit::time::rfc3339(std::time::SystemTime::now() + offset)
}
