//! Test fixtures: a real SMTP server in-process (mailin-embedded, with
//! STARTTLS and AUTH when asked), a minimal HTTP client over loopback, and
//! helpers to start the service in-process or as a child process.
#![allow(dead_code, unused_imports)]

use std::collections::{HashMap, VecDeque};

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use mailin_embedded::{AuthMechanism, Handler, Response, Server, SslConfig};
use mailroom::config::{Relay, SmtpSettings, TlsMode};
use mailroom::{Config, Engine, HttpServer, HttpSettings};

pub use mailroom_testkit::certs::{certificates, TestCertificates};
pub use mailroom_testkit::http::{read_reply, request, HttpReply};
pub use mailroom_testkit::{temp_dir, PATIENCE};

/// One message as the relay received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub recipients: Vec<String>,
    pub data: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("the relay received a parsable message")
    }
}

#[derive(Default)]
struct Faults {
    /// Replies to the next MAIL FROM commands, in order.
    mail_replies: VecDeque<(u16, String)>,
    /// Recipients refused with this reply.
    refused_recipients: HashMap<String, (u16, String)>,
    /// While true, the end of DATA waits (a stalled relay).
    stall_data_end: bool,
}

#[derive(Default)]
struct RelayState {
    received: Mutex<Vec<Received>>,
    arrived: Condvar,
    connections: AtomicUsize,
    faults: Mutex<Faults>,
    unstalled: Condvar,
    stalled_sessions: AtomicUsize,
    credentials: Option<(String, String)>,
}

#[derive(Clone)]
struct RelayHandler {
    state: Arc<RelayState>,
    counted: bool,
    from: String,
    recipients: Vec<String>,
    data: Vec<u8>,
}

impl Handler for RelayHandler {
    fn helo(&mut self, _ip: IpAddr, _domain: &str) -> Response {
        // The handler is cloned per connection; EHLO comes again after STARTTLS.
        if !self.counted {
            self.counted = true;
            self.state.connections.fetch_add(1, Ordering::SeqCst);
        }
        mailin_embedded::response::OK
    }

    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        self.from = from.to_string();
        self.recipients.clear();
        if let Some((code, text)) = self.state.faults.lock().unwrap().mail_replies.pop_front() {
            return Response::custom(code, text);
        }
        mailin_embedded::response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        if let Some((code, text)) = self.state.faults.lock().unwrap().refused_recipients.get(to) {
            return Response::custom(*code, text.clone());
        }
        self.recipients.push(to.to_string());
        mailin_embedded::response::OK
    }

    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        self.data.clear();
        mailin_embedded::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let mut faults = self.state.faults.lock().unwrap();
        if faults.stall_data_end {
            self.state.stalled_sessions.fetch_add(1, Ordering::SeqCst);
            while faults.stall_data_end {
                faults = self.state.unstalled.wait(faults).unwrap();
            }
        }
        drop(faults);
        let mut received = self.state.received.lock().unwrap();
        received.push(Received {
            from: self.from.clone(),
            recipients: self.recipients.clone(),
            data: std::mem::take(&mut self.data),
            at: Instant::now(),
        });
        self.state.arrived.notify_all();
        mailin_embedded::response::OK
    }

    fn auth_plain(&mut self, _authorization_id: &str, user: &str, password: &str) -> Response {
        self.check_login(user, password)
    }

    fn auth_login(&mut self, user: &str, password: &str) -> Response {
        self.check_login(user, password)
    }
}

impl RelayHandler {
    fn check_login(&self, user: &str, password: &str) -> Response {
        match &self.state.credentials {
            Some((expected_user, expected_password))
                if user == expected_user && password == expected_password =>
            {
                mailin_embedded::response::AUTH_OK
            }
            _ => mailin_embedded::response::INVALID_CREDENTIALS,
        }
    }
}

/// A real SMTP server on a loopback port, running until the test process ends.
pub struct TestRelay {
    pub port: u16,
    state: Arc<RelayState>,
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<(String, String)>,
}

static CRYPTO: Once = Once::new();

impl TestRelay {
    /// Plain SMTP, no AUTH.
    pub fn plain() -> TestRelay {
        TestRelay::start(TcpListener::bind("127.0.0.1:0").unwrap(), false, None)
    }

    /// Plain SMTP on a given listener (e.g. a port reserved earlier).
    pub fn plain_on(listener: TcpListener) -> TestRelay {
        TestRelay::start(listener, false, None)
    }

    /// STARTTLS with a certificate for `localhost`, and AUTH PLAIN/LOGIN.
    pub fn starttls_with_auth(user: &str, password: &str) -> TestRelay {
        TestRelay::start(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            true,
            Some((user.to_string(), password.to_string())),
        )
    }

    fn start(listener: TcpListener, tls: bool, credentials: Option<(String, String)>) -> TestRelay {
        CRYPTO.call_once(|| {
            // Test builds see two rustls providers (ring for lettre,
            // aws-lc-rs from mailin's defaults): choose one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(RelayState {
            credentials: credentials.clone(),
            ..RelayState::default()
        });
        let handler = RelayHandler {
            state: Arc::clone(&state),
            counted: false,
            from: String::new(),
            recipients: Vec::new(),
            data: Vec::new(),
        };
        let mut server = Server::new(handler);
        server
            .with_name("relay.test")
            .with_num_threads(64)
            .with_tcp_listener(listener);
        let mut ca_file = None;
        if tls {
            let certificates = certificates();
            server
                .with_ssl(SslConfig::Trusted {
                    cert_path: certificates.cert_file.to_string_lossy().into_owned(),
                    key_path: certificates.key_file.to_string_lossy().into_owned(),
                    chain_path: certificates.ca_file.to_string_lossy().into_owned(),
                })
                .unwrap();
            server
                .with_auth(AuthMechanism::Plain)
                .with_auth(AuthMechanism::Login);
            ca_file = Some(certificates.ca_file);
        }
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        TestRelay {
            port,
            state,
            ca_file,
            credentials,
        }
    }

    /// Relay settings for the service's config.
    pub fn settings(&self) -> SmtpSettings {
        let tls = self.ca_file.is_some();
        SmtpSettings {
            host: if tls {
                "localhost".into()
            } else {
                "127.0.0.1".into()
            },
            port: self.port,
            tls: if tls {
                TlsMode::Required
            } else {
                TlsMode::None
            },
            credentials: self
                .credentials
                .clone()
                .map(|(user, password)| (user, mailroom::config::Secret::new(password))),
            hello_name: None,
            extra_root_pem: self
                .ca_file
                .as_ref()
                .map(|file| std::fs::read(file).unwrap()),
            timeout: Duration::from_secs(30),
        }
    }

    /// `MAILROOM_SMTP_URL` for a child process.
    pub fn url(&self) -> String {
        match (&self.ca_file, &self.credentials) {
            (Some(_), Some((user, password))) => format!(
                "smtp://{user}:{password}@localhost:{}?tls=required",
                self.port
            ),
            _ => format!("smtp://127.0.0.1:{}", self.port),
        }
    }

    /// Waits until at least `count` messages arrived; returns all of them.
    pub fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE;
        let mut received = self.state.received.lock().unwrap();
        while received.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "expected {count} messages at the relay, got {}",
                received.len()
            );
            received = self.state.arrived.wait_timeout(received, left).unwrap().0;
        }
        received.clone()
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The next MAIL FROM commands get these replies (then 250 again).
    pub fn reply_to_next_mail(&self, replies: &[(u16, &str)]) {
        let mut faults = self.state.faults.lock().unwrap();
        faults
            .mail_replies
            .extend(replies.iter().map(|(code, text)| (*code, text.to_string())));
    }

    pub fn refuse_recipient(&self, address: &str, code: u16, text: &str) {
        let mut faults = self.state.faults.lock().unwrap();
        faults
            .refused_recipients
            .insert(address.to_string(), (code, text.to_string()));
    }

    /// While stalled, sessions wait at the end of DATA without answering.
    pub fn stall(&self, stalled: bool) {
        self.state.faults.lock().unwrap().stall_data_end = stalled;
        if !stalled {
            self.state.unstalled.notify_all();
        }
    }

    pub fn stalled_sessions(&self) -> usize {
        self.state.stalled_sessions.load(Ordering::SeqCst)
    }
}

/// A free loopback port with nothing listening (connections are refused).
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
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.stop();
        self.engine.shutdown();
    }
}

pub fn wait_for_status(address: SocketAddr, id: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = request(address, "GET", &format!("/api/mail/{id}"), &[], b"");
        if reply.code == 200 && reply.json()["data"]["status"] == status {
            return reply.json()["data"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "message {id} never reached {status}: {}",
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
    /// Starts `mailroom` in `directory` with `variables`, on a free port,
    /// and waits until it answers `/healthz`.
    pub fn start(directory: &Path, variables: &[(&str, String)]) -> ChildService {
        let (port, reserved) = unused_port();
        drop(reserved);
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = directory.join(format!("service-{port}.log"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
        command
            .current_dir(directory)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MAILROOM_LISTEN", address.to_string())
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for (name, value) in variables {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let service = ChildService {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(address).is_err() {
            assert!(
                Instant::now() < deadline,
                "service did not start: {}",
                service.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        service
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
