//! Operations and safety over real HTTP: status, metrics, readiness, auth,
//! limits, rate limiting, hostile clients, and the binary's start-up checks.

mod common;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Barrier, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use mailroom::config::{Relay, SmtpSettings, VARIABLES};
use serde_json::Value;

/// Load tests and timing measurements run alone, so that their bounds
/// measure the service rather than the other tests; the rest share.
static TURNS: RwLock<()> = RwLock::new(());

fn heavy() -> RwLockWriteGuard<'static, ()> {
    TURNS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn light() -> RwLockReadGuard<'static, ()> {
    TURNS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The bound the issue sets for "not delayed": a liveness check.
const ONE_SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- helpers

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// What came back on a raw connection: an HTTP status, or the connection
/// closed (or reset) without one.
fn outcome(stream: TcpStream) -> Option<u16> {
    status_code(&mut BufReader::new(stream))
}

/// The status code on the answer's first line, if an answer came.
fn status_code(reader: &mut impl std::io::BufRead) -> Option<u16> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => line.split_whitespace().nth(1).and_then(|c| c.parse().ok()),
        _ => None,
    }
}

fn timed_post(address: SocketAddr, headers: &[(&str, &str)]) -> (HttpReply, Duration) {
    let started = Instant::now();
    let reply = request(
        address,
        "POST",
        "/api/mail",
        headers,
        seed_body("user@example.org", "normal").as_bytes(),
    );
    (reply, started.elapsed())
}

/// The slowest of `count` normal submissions, each of which must be accepted.
fn slowest_of_normal_posts(address: SocketAddr, count: usize) -> Duration {
    (0..count)
        .map(|_| {
            let (reply, took) = timed_post(address, &[]);
            assert_eq!(reply.code, 202, "{}", reply.body_text());
            took
        })
        .max()
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    status_number(pid, "VmRSS")
}

fn alive(child: &mut ChildService) {
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the service died: {}",
        child.log_text()
    );
    let reply = request(child.address, "GET", "/healthz", &[], b"");
    assert_eq!(reply.code, 200);
}

/// A `/proc/<pid>/status` figure in KiB: `VmRSS` now, `VmHWM` at its peak.
fn status_number(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn child_in(name: &str, variables: &[(&str, String)]) -> ChildService {
    let mut all = vec![("MAILROOM_SPOOL_DIR", "none".to_string())];
    all.extend(variables.iter().cloned());
    ChildService::start(&temp_dir(name), &all)
}

/// Runs the binary to completion with only these variables.
fn run_binary(directory: &Path, arguments: &[&str], variables: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    command
        .current_dir(directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(arguments);
    for (name, value) in variables {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Parses `2026-11-29T10:28:50.123Z` (the service's RFC 3339 form).
fn parse_time(value: &Value) -> SystemTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    assert_eq!(text.len(), 24, "{text}");
    assert!(text.ends_with('Z') && &text[10..11] == "T", "{text}");
    let number = |range: std::ops::Range<usize>| -> i64 { text[range].parse().unwrap() };
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    // Days from civil (Howard Hinnant), independent of the service's code.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
    UNIX_EPOCH + Duration::from_millis(seconds as u64 * 1000 + number(20..23) as u64)
}

fn near_now(time: SystemTime) {
    let now = SystemTime::now();
    let distance = now
        .duration_since(time)
        .or_else(|_| time.duration_since(now))
        .unwrap();
    assert!(distance < Duration::from_secs(120), "{time:?} is not now");
}

/// Waits until the relay has held `count` sessions at the end of DATA.
fn stalled_at_the_relay(relay: &TestRelay, count: usize) {
    let deadline = Instant::now() + PATIENCE;
    while relay.stalled_sessions() < count {
        assert!(
            Instant::now() < deadline,
            "the relay never held session {count}"
        );
        // Polling the test relay's counter, with a deadline.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status_of(service: &Service, id: &str) -> Value {
    let reply = service.get(&format!("/api/mail/{id}"));
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    reply.json()["data"].clone()
}

// ---------------------------------------------------------------- status

#[test]
fn status_follows_a_retried_delivery_through_every_state() {
    let _turn = light();
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.workers = 1;
    config.retry_base = Duration::from_millis(2_000);
    config.retry_max = Duration::from_millis(2_000);
    let service = Service::start(config);

    // The only worker is held by a first message stalled at the relay.
    relay.stall(true);
    let first = service
        .post("/api/mail", &seed_body("a@example.org", "first"))
        .id();
    stalled_at_the_relay(&relay, 1);
    let sending = status_of(&service, &first);
    assert_eq!(sending["status"], "sending");
    assert_eq!(sending["attempts"], 1);

    let id = service
        .post("/api/mail", &seed_body("b@example.org", "second"))
        .id();
    let queued = status_of(&service, &id);
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["id"], id.as_str());
    assert_eq!(queued["attempts"], 0);
    assert_eq!(queued["last_error"], Value::Null);
    assert_eq!(queued["next_attempt_at"], Value::Null);
    assert_eq!(queued["created_at"], queued["updated_at"]);
    let created = parse_time(&queued["created_at"]);
    near_now(created);

    // Its first attempt is refused for now (451), then retried.
    relay.reply_to_next_mail(&[(451, "4.3.0 try again later")]);
    relay.stall(false);
    let retrying = service.wait_for_status(&id, "retrying");
    assert_eq!(retrying["attempts"], 1);
    let last_error = retrying["last_error"].as_str().unwrap();
    assert!(last_error.contains("451"), "{last_error}");
    let updated = parse_time(&retrying["updated_at"]);
    let next = parse_time(&retrying["next_attempt_at"]);
    assert!(updated >= created);
    // Equal jitter: between half and all of the 2 s delay.
    let delay = next.duration_since(updated).unwrap();
    assert!(
        delay >= Duration::from_millis(900) && delay <= Duration::from_millis(2_100),
        "{delay:?}"
    );

    // The second attempt is held at the relay: sending, attempt 2.
    relay.stall(true);
    stalled_at_the_relay(&relay, 2);
    let again = status_of(&service, &id);
    assert_eq!(again["status"], "sending");
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["next_attempt_at"], Value::Null);
    relay.stall(false);
    let sent = service.wait_for_status(&id, "sent");
    assert_eq!(sent["attempts"], 2);
    assert_eq!(sent["next_attempt_at"], Value::Null);
    assert_eq!(sent["created_at"], queued["created_at"]);
    assert!(parse_time(&sent["updated_at"]) >= next - Duration::from_millis(5));
    service.wait_for_status(&first, "sent");
    assert_eq!(relay.wait_for(2).len(), 2);
    assert_eq!(service.get("/api/mail/no-such-id").code, 404);
}

#[test]
fn status_retention_forgets_the_oldest_finished_first() {
    let _turn = light();
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.status_retention = 5;
    let service = Service::start(config);
    let mut ids = Vec::new();
    for index in 0..8 {
        let status = service.send_and_wait("r@example.org", &format!("retained {index}"));
        ids.push(status["id"].as_str().unwrap().to_string());
    }
    for (index, id) in ids.iter().enumerate() {
        let code = service.get(&format!("/api/mail/{id}")).code;
        let expected = if index < 3 { 404 } else { 200 };
        assert_eq!(code, expected, "message {index} of 8 with retention 5");
    }
}

// ---------------------------------------------------------------- metrics

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A Prometheus text exposition, checked while parsed.
struct Exposition {
    samples: Vec<Sample>,
    types: std::collections::HashMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut types = std::collections::HashMap::new();
        let mut helped = std::collections::HashSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(!help.trim().is_empty(), "{line}");
                assert!(helped.insert(name.to_string()), "second HELP: {line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "second TYPE: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let labels = body
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, quoted) = pair.split_once('=').expect("label=value");
                            let value = quoted
                                .strip_prefix('"')
                                .and_then(|value| value.strip_suffix('"'))
                                .expect("quoted label value");
                            (key.to_string(), value.to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name: {line}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| types.get(*base).is_some_and(|kind| kind == "histogram"))
                })
                .unwrap_or(&name)
                .to_string();
            assert!(types.contains_key(&family), "no TYPE before: {line}");
            assert!(helped.contains(&family), "no HELP for: {line}");
            samples.push((name, labels, value));
        }
        let exposition = Exposition { samples, types };
        exposition.check_histograms();
        exposition
    }

    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let mut buckets: Vec<(f64, f64)> = self
                .samples
                .iter()
                .filter(|(name, _, _)| *name == format!("{family}_bucket"))
                .map(|(_, labels, value)| {
                    let le = &labels.iter().find(|(key, _)| key == "le").expect("le").1;
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    (bound, *value)
                })
                .collect();
            assert!(!buckets.is_empty(), "{family} has no buckets");
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            for pair in buckets.windows(2) {
                assert!(pair[0].1 <= pair[1].1, "{family} buckets not cumulative");
            }
            let last = buckets.last().unwrap();
            assert_eq!(last.0, f64::INFINITY, "{family} lacks le=\"+Inf\"");
            assert_eq!(
                last.1,
                self.value(&format!("{family}_count"), &[]),
                "+Inf == count"
            );
            assert!(self.value(&format!("{family}_sum"), &[]) >= 0.0);
        }
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|(sample, sample_labels, _)| {
                sample == name
                    && labels.iter().all(|(key, value)| {
                        sample_labels.iter().any(|(k, v)| k == key && v == value)
                    })
            })
            .map(|(_, _, value)| *value)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

#[test]
fn metrics_count_what_was_sent_in_exposition_format() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let before = service.get("/metrics");
    assert_eq!(before.code, 200);
    assert!(before
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let initial = Exposition::parse(&before.body_text());
    assert_eq!(initial.value("mailroom_messages_accepted_total", &[]), 0.0);

    for index in 0..3 {
        service.send_and_wait("m@example.org", &format!("ok {index}"));
    }
    relay.reply_to_next_mail(&[(550, "5.7.1 sender rejected")]);
    let refused = service
        .post("/api/mail", &seed_body("m@example.org", "refused"))
        .id();
    service.wait_for_status(&refused, "failed");
    relay.reply_to_next_mail(&[(451, "4.3.0 later")]);
    let retried = service
        .post("/api/mail", &seed_body("m@example.org", "retried"))
        .id();
    service.wait_for_status(&retried, "sent");
    assert_eq!(service.post("/api/mail", "{not json").code, 400);
    assert_eq!(service.get("/nowhere").code, 404);

    let reply = service.get("/metrics");
    let metrics = Exposition::parse(&reply.body_text());
    let counter = |name: &str| {
        assert_eq!(metrics.types[name], "counter", "{name}");
        metrics.value(name, &[])
    };
    assert_eq!(counter("mailroom_messages_accepted_total"), 5.0);
    assert_eq!(counter("mailroom_messages_sent_total"), 4.0);
    assert_eq!(counter("mailroom_messages_failed_total"), 1.0);
    let attempts =
        |result| metrics.value("mailroom_delivery_attempts_total", &[("result", result)]);
    assert_eq!(attempts("ok"), 4.0);
    assert_eq!(attempts("transient"), 1.0);
    assert_eq!(attempts("permanent"), 1.0);
    for gauge in ["mailroom_queue_depth", "mailroom_retry_depth"] {
        assert_eq!(metrics.types[gauge], "gauge");
        assert_eq!(metrics.value(gauge, &[]), 0.0);
    }
    let http = |code| metrics.value("mailroom_http_requests_total", &[("code", code)]);
    assert_eq!(http("202"), 5.0);
    assert_eq!(http("400"), 1.0);
    assert_eq!(http("404"), 1.0);
    assert!(http("200") >= 2.0, "the status polls and /metrics");
    assert_eq!(
        metrics.types["mailroom_delivery_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        metrics.value("mailroom_delivery_duration_seconds_count", &[]),
        6.0
    );
    assert_eq!(
        metrics.value(
            "mailroom_delivery_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        6.0
    );
}

#[test]
fn metrics_show_the_spools_commits_and_how_long_they_took() {
    let _turn = light();
    let relay = TestRelay::plain();
    let memory = Service::start(config_for(&relay));
    let text = memory.get("/metrics").body_text();
    assert!(
        !text.contains("mailroom_spool_"),
        "memory mode has no commits to show:\n{text}"
    );
    drop(memory);

    let mut config = config_for(&relay);
    config.spool = mailroom::config::SpoolSetting::Directory(temp_dir("commits").join("spool"));
    let service = Service::start(config);
    for index in 0..3 {
        service.send_and_wait("m@example.org", &format!("kept {index}"));
    }
    let metrics = Exposition::parse(&service.get("/metrics").body_text());
    assert_eq!(metrics.types["mailroom_spool_commits_total"], "counter");
    assert_eq!(metrics.types["mailroom_spool_records_total"], "counter");
    assert_eq!(metrics.types["mailroom_spool_commit_seconds"], "histogram");
    // Each message: its record at the 202, then its `sent` record.
    assert_eq!(metrics.value("mailroom_spool_records_total", &[]), 6.0);
    let commits = metrics.value("mailroom_spool_commits_total", &[]);
    assert!((2.0..=6.0).contains(&commits), "{commits} commits");
    assert_eq!(
        metrics.value("mailroom_spool_commit_seconds_count", &[]),
        commits
    );
}

// ---------------------------------------------------------------- readiness

#[test]
fn readyz_is_503_while_the_relay_refuses_every_login() {
    let _turn = light();
    let relay = TestRelay::starttls_with_auth("mailer", "right-password");
    let mut config = config_for(&relay);
    let mut settings: SmtpSettings = relay.settings();
    settings.credentials = Some((
        "mailer".into(),
        mailroom::config::Secret::new("wrong-password"),
    ));
    config.relay = Relay::Smtp(settings);
    config.max_attempts = 50;
    let service = Service::start(config);
    assert_eq!(service.get("/readyz").code, 200);

    let id = service
        .post("/api/mail", &seed_body("u@example.org", "login fails"))
        .id();
    let deadline = Instant::now() + PATIENCE;
    let reply = loop {
        let reply = service.get("/readyz");
        if reply.code == 503 {
            break reply;
        }
        assert!(Instant::now() < deadline, "never unready");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(reply.header("Retry-After").is_some());
    let detail = reply.json()["data"]["error"].as_str().unwrap().to_string();
    assert!(
        detail.contains("relay") && detail.contains("535"),
        "{detail}"
    );
    // The message is kept for later, not failed.
    let status = status_of(&service, &id);
    assert_ne!(status["status"], "failed");
    assert!(status["last_error"].as_str().unwrap().contains("535"));
    assert_eq!(service.get("/healthz").code, 200);
}

#[test]
fn readyz_is_503_while_the_relay_is_unreachable() {
    let _turn = light();
    let (mut config, _) = config_with_relay_down();
    config.max_attempts = 2;
    config.queue_capacity = 2;
    config.retry_max = Duration::from_millis(100);
    let service = Service::start(config);
    for n in 0..2 {
        let reply = service.post(
            "/api/mail",
            &seed_body("u@example.org", &format!("nobody home {n}")),
        );
        assert_eq!(reply.code, 202, "{}", reply.body_text());
    }
    // The queue fills with messages waiting for the relay (they never fail
    // for it); readyz names the cause, and the consequence.
    let deadline = Instant::now() + PATIENCE;
    let reply = loop {
        let reply = service.get("/readyz");
        if reply.code == 503 && reply.body_text().contains("relay") {
            break reply;
        }
        assert!(Instant::now() < deadline, "never unready for the relay");
        std::thread::sleep(Duration::from_millis(10));
    };
    let detail = reply.json()["data"]["error"].as_str().unwrap().to_string();
    assert!(detail.contains("the queue is full"), "{detail}");
    assert_eq!(
        service
            .post("/api/mail", &seed_body("u@example.org", "more"))
            .code,
        503
    );
}

// ---------------------------------------------------------------- auth

#[test]
fn every_api_path_needs_the_token_and_operations_paths_do_not() {
    let _turn = light();
    let relay = TestRelay::plain();
    let mut http = http_settings();
    http.api_token = Some(mailroom::config::Secret::new("s3cret-token"));
    let service = Service::start_with(config_for(&relay), http);
    let good = [("Authorization", "Bearer s3cret-token")];
    let body = seed_body("a@example.org", "auth");
    let id = request(service.address, "POST", "/api/mail", &good, body.as_bytes()).id();

    let status_path = format!("/api/mail/{id}");
    let paths: [(&str, &str); 6] = [
        ("POST", "/api/mail"),
        ("POST", "/api/mail/v2"),
        ("GET", &status_path),
        ("GET", "/api/mail/unknown-id"),
        ("GET", "/api"),
        ("DELETE", "/api/other"),
    ];
    let wrong: [&[(&str, &str)]; 6] = [
        &[],
        &[("Authorization", "Bearer not-the-token")],
        &[("Authorization", "Bearer s3cret-token-and-more")],
        &[("Authorization", "Bearer ")],
        &[("Authorization", "Basic czNjcmV0LXRva2Vu")],
        &[("Authorization", "s3cret-token")],
    ];
    for (method, path) in paths {
        for headers in wrong {
            let reply = request(service.address, method, path, headers, body.as_bytes());
            assert_eq!(reply.code, 401, "{method} {path} with {headers:?}");
            assert_eq!(reply.header("Content-Type"), Some("application/json"));
            assert_eq!(reply.json()["message"], "unauthorized");
            assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"));
        }
    }
    // With the token.
    assert_eq!(
        request(service.address, "GET", &status_path, &good, b"").code,
        200
    );
    let lower = [("Authorization", "bearer s3cret-token")];
    assert_eq!(
        request(service.address, "GET", &status_path, &lower, b"").code,
        200,
        "the scheme is case-insensitive"
    );
    let v2 = request(
        service.address,
        "POST",
        "/api/mail/v2",
        &good,
        body.as_bytes(),
    );
    assert_eq!(v2.code, 200, "{}", v2.body_text());
    // Health, readiness and metrics need none.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(service.get(path).code, 200, "{path}");
    }
}

// ---------------------------------------------------------------- body limits

#[test]
fn a_5_mb_body_over_the_limit_is_413_and_the_service_keeps_answering() {
    let _heavy = heavy();
    let mut child = child_in("413", &[("MAILROOM_MAX_BODY_BYTES", "1000".to_string())]);
    let body = vec![b'x'; 5 * 1024 * 1024];
    let mut stream = connect(child.address);
    let head = format!(
        "POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The service may stop reading once it has refused: a failed write is fine.
    let _ = stream.write_all(&body);
    let reply = read_reply(&mut BufReader::new(stream));
    assert_eq!(reply.code, 413);
    let detail = reply.json()["data"]["error"].as_str().unwrap().to_string();
    assert!(detail.contains("MAILROOM_MAX_BODY_BYTES"), "{detail}");

    // Without reading the body first: Expect: 100-continue.
    let mut stream = connect(child.address);
    stream
        .write_all(
            b"POST /api/mail HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5242880\r\n\r\n",
        )
        .unwrap();
    assert_eq!(outcome(stream), Some(413));

    // A chunked body over the limit.
    let mut stream = connect(child.address);
    stream
        .write_all(b"POST /api/mail HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..64 {
        if stream.write_all(b"400\r\n").is_err()
            || stream.write_all(&[b' '; 0x400]).is_err()
            || stream.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    assert_eq!(outcome(stream), Some(413));

    let (reply, _) = timed_post(child.address, &[]);
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    alive(&mut child);
}

#[test]
fn a_50_gb_content_length_is_refused_and_the_process_lives() {
    let _heavy = heavy();
    let mut child = child_in("giant", &[]);
    let declared = [
        "50000000000",
        "1099511627776",
        "9000000000000000000",
        "18446744073709551615",
    ];
    for length in declared {
        for (method, path, extra) in [
            ("POST", "/api/mail", ""),
            ("POST", "/api/mail/v2", ""),
            ("POST", "/api/mail", "Expect: 100-continue\r\n"),
            ("GET", "/healthz", ""),
        ] {
            let mut stream = connect(child.address);
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {length}\r\n\r\n{{\"sender\":"
            );
            stream.write_all(head.as_bytes()).unwrap();
            let answer = outcome(stream);
            assert!(
                matches!(answer, None | Some(413) | Some(200)),
                "{method} {path} declaring {length} bytes: {answer:?}"
            );
            if method == "POST" && length == "50000000000" && extra.is_empty() {
                assert_eq!(answer, Some(413), "a 50 GB declared body gets its 413");
            }
            alive(&mut child);
        }
    }
    let (reply, took) = timed_post(child.address, &[]);
    assert_eq!(reply.code, 202);
    assert!(took < ONE_SECOND, "{took:?}");
    let log = child.log_text();
    assert!(!log.contains("memory allocation"), "{log}");
}

#[test]
fn a_giant_content_length_does_not_kill_a_program_embedding_the_server() {
    let _turn = light();
    // In the test process itself, with the default allocator.
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    for length in ["50000000000", "9000000000000000000"] {
        let mut stream = connect(service.address);
        let head =
            format!("POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        assert!(matches!(outcome(stream), None | Some(413)));
    }
    assert_eq!(service.get("/healthz").code, 200);
}

#[test]
fn overlong_request_lines_and_headers_are_refused() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let long_path = format!("/api/mail/{}", "a".repeat(9 * 1024));
    let reply = service.get(&long_path);
    assert_eq!(reply.code, 414);
    let big = "b".repeat(70 * 1024);
    let reply = request(service.address, "GET", "/healthz", &[("X-Big", &big)], b"");
    assert_eq!(reply.code, 431);
    let many: Vec<(String, String)> = (0..40)
        .map(|index| (format!("X-Header-{index}"), "c".repeat(2000)))
        .collect();
    let headers: Vec<(&str, &str)> = many
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let reply = request(service.address, "GET", "/healthz", &headers, b"");
    assert_eq!(reply.code, 431);
    assert_eq!(service.get("/healthz").code, 200);
}

// ---------------------------------------------------------------- hostile clients

#[test]
fn keep_alive_clients_arriving_together_each_get_a_first_answer_within_a_second() {
    let _heavy = heavy();
    let child = child_in("burst", &[]);
    let clients = 64;
    let start = Arc::new(Barrier::new(clients));
    let done = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (start, done, address) = (Arc::clone(&start), Arc::clone(&done), child.address);
            std::thread::spawn(move || {
                const HEALTHZ: &[u8] =
                    b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n";
                start.wait();
                let began = Instant::now();
                let mut stream = connect(address);
                stream.write_all(HEALTHZ).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                // A failed read must still reach the barrier below, or the
                // other clients would wait forever: report it as code 0.
                let mut read_code = || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        read_reply(&mut reader).code
                    }))
                    .unwrap_or(0)
                };
                let first = read_code();
                let took = began.elapsed();
                // Stay connected until every client has its answer, then
                // ask again on the same connection.
                done.wait();
                let again = match stream.write_all(HEALTHZ) {
                    Ok(()) => read_code(),
                    Err(_) => 0,
                };
                (first, took, again)
            })
        })
        .collect();
    let results: Vec<(u16, Duration, u16)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let slowest = results.iter().map(|(_, took, _)| *took).max().unwrap();
    println!("64 keep-alive clients: slowest first answer {slowest:?}");
    assert!(
        results
            .iter()
            .all(|(first, _, again)| *first == 200 && *again == 200),
        "{results:?}"
    );
    assert!(slowest < ONE_SECOND, "{slowest:?}");
}

#[test]
fn idle_and_slowloris_connections_do_not_delay_a_normal_request() {
    let _heavy = heavy();
    let mut child = child_in("idle", &[]);
    let idle: Vec<TcpStream> = (0..300).map(|_| connect(child.address)).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slowloris: Vec<_> = (0..5)
        .map(|_| {
            let (stop, address) = (Arc::clone(&stop), child.address);
            std::thread::spawn(move || {
                let mut stream = connect(address);
                let _ = stream.write_all(b"POST /api/mail HTTP/1.1\r\nHost: t\r\nX-Slow: ");
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if stream.write_all(b"a").is_err() {
                        break;
                    }
                    // The attack is the pacing.
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let slowest = slowest_of_normal_posts(child.address, 5);
    println!("300 idle + 5 slowloris connections: slowest normal POST {slowest:?}");
    assert!(slowest < ONE_SECOND, "{slowest:?}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for thread in slowloris {
        thread.join().unwrap();
    }
    drop(idle);
    alive(&mut child);
}

/// A connection whose client reads nothing and keeps its receive buffer
/// tiny, so that the service's answers soon fill the socket.
fn connect_not_reading(address: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&address.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

#[test]
fn clients_that_stop_reading_their_answers_do_not_delay_a_normal_request() {
    let _heavy = heavy();
    let mut child = child_in("unread-answers", &[]);
    // Each connection asks for 30 metrics pages at once and reads none.
    // More such connections than the handlers started for quick requests.
    let pipelined = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(30);
    let stalled: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut stream = connect_not_reading(child.address);
            stream.write_all(&pipelined).unwrap();
            stream
        })
        .collect();
    let slowest = slowest_of_normal_posts(child.address, 5);
    println!("16 connections not reading their answers: slowest normal POST {slowest:?}");
    assert!(slowest < ONE_SECOND, "{slowest:?}");
    drop(stalled);
    alive(&mut child);
}

#[test]
/// The server reads a pipelining connection only while few of its answers
/// are pending (8): the flood is held back by TCP, not buffered, and holds
/// few threads; its answers come in order once the client reads them.
fn a_connection_pipelining_without_end_is_held_back_and_holds_few_threads() {
    let _heavy = heavy();
    let mut child = child_in("pipelining", &[]);
    let threads_before = status_number(child.child.id(), "Threads");
    let flood = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".repeat(100_000);
    let flooder = {
        let address = child.address;
        std::thread::spawn(move || {
            let mut stream = connect_not_reading(address);
            // Fails if the service closes the connection first.
            let _ = stream.write_all(&flood);
            // The answers given before the service closed it, then the end.
            let mut answers = Vec::new();
            let end = BufReader::new(stream).read_to_end(&mut answers);
            let count = answers.windows(8).filter(|w| w == b"HTTP/1.1").count();
            (end.map_err(|error| error.kind()), count)
        })
    };
    let slowest = slowest_of_normal_posts(child.address, 5);
    let (end, answered) = flooder.join().unwrap();
    let threads_after = status_number(child.child.id(), "Threads");
    println!(
        "a pipelining flood: {answered} of 100000 answered, then {end:?}; slowest normal POST \
         {slowest:?}; threads {threads_before} -> {threads_after}"
    );
    assert!(
        !matches!(end, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the flooding connection never ended"
    );
    assert!(answered <= 100_000, "{answered}");
    assert!(slowest < ONE_SECOND, "{slowest:?}");
    assert!(
        threads_after < threads_before + 20,
        "{threads_before} -> {threads_after}"
    );
    alive(&mut child);
}

#[test]
fn slowloris_and_idle_connections_are_cut_off() {
    let _heavy = heavy();
    let child = child_in("cutoff", &[]);
    let began = Instant::now();
    let idle = connect(child.address);
    let mut slow = connect(child.address);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let trickler = std::thread::spawn(move || {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if slow.write_all(b"X: y\r\n").is_err() {
                return Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("a slowloris client was never cut off");
    });
    // A keep-alive connection that idles after its answer.
    let mut kept = connect(child.address);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut kept = BufReader::new(kept);
    assert_eq!(read_reply(&mut kept).code, 200);
    let answered = Instant::now();
    assert_eq!(outcome(idle), None, "an idle connection is closed");
    let idle_closed = began.elapsed();
    let slow_closed = trickler.join().unwrap().duration_since(began);
    let mut rest = Vec::new();
    let kept_end = kept.read_to_end(&mut rest);
    let kept_closed = answered.elapsed();
    println!(
        "idle connection closed after {idle_closed:?}, slowloris after {slow_closed:?}, \
         idle keep-alive connection {kept_closed:?} after its answer"
    );
    assert!(idle_closed >= Duration::from_secs(9), "{idle_closed:?}");
    assert!(slow_closed <= Duration::from_secs(15), "{slow_closed:?}");
    assert!(
        matches!(kept_end, Ok(0) | Err(_)) && rest.is_empty(),
        "{kept_end:?}"
    );
    assert!(
        kept_closed >= Duration::from_secs(9) && kept_closed <= Duration::from_secs(15),
        "{kept_closed:?}"
    );
}

#[test]
fn a_long_keep_alive_session_is_not_mistaken_for_an_oversized_head() {
    let _turn = light();
    let mut child = child_in("long-session", &[]);
    let padding = "p".repeat(4000);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: {padding}\r\n\r\n");
    let stream = connect(child.address);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    // Twice one head's limit in all (76 KiB), with pauses between requests
    // so that the server sees the connection idle between requests.
    let began = Instant::now();
    let mut answered = 0;
    while answered < 40 {
        writer.write_all(request.as_bytes()).unwrap();
        assert_eq!(read_reply(&mut reader).code, 200, "request {answered}");
        answered += 1;
        // A client's think time, not synchronisation.
        std::thread::sleep(Duration::from_millis(25));
    }
    println!(
        "{answered} requests ({} KiB of heads) on one connection in {:?}",
        answered * request.len() / 1024,
        began.elapsed()
    );
    alive(&mut child);
}

#[test]
fn a_body_that_stops_arriving_gets_408() {
    let _turn = light();
    let mut child = child_in("stalled-body", &[]);
    let mut stream = connect(child.address);
    stream
        .write_all(
            b"POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n{\"sender\":",
        )
        .unwrap();
    let began = Instant::now();
    let reply = read_reply(&mut BufReader::new(stream));
    let waited = began.elapsed();
    println!("a stalled body was answered after {waited:?}");
    assert_eq!(reply.code, 408, "{}", reply.body_text());
    assert!(
        waited >= Duration::from_secs(5) && waited < PATIENCE,
        "{waited:?}"
    );
    alive(&mut child);
}

#[test]
fn clients_trickling_their_bodies_do_not_delay_a_normal_request() {
    let _heavy = heavy();
    let mut child = child_in("trickle", &[]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = seed_body("t@example.org", &"x".repeat(5000));
    let tricklers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, address, body) = (Arc::clone(&stop), child.address, body.clone());
            std::thread::spawn(move || {
                let mut stream = connect(address);
                let head = format!(
                    "POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                for byte in body.as_bytes() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst)
                        || stream.write_all(&[*byte]).is_err()
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    let slowest = slowest_of_normal_posts(child.address, 10);
    println!("3 clients trickling 5 KB bodies: slowest normal POST {slowest:?}");
    assert!(slowest < ONE_SECOND, "{slowest:?}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for thread in tricklers {
        thread.join().unwrap();
    }
    alive(&mut child);
}

#[test]
fn a_2_mb_header_line_neither_crashes_nor_bloats_the_process() {
    let _heavy = heavy();
    let mut child = child_in("header", &[]);
    // Warm up: threads and buffers of ordinary traffic.
    for _ in 0..20 {
        timed_post(child.address, &[]);
    }
    let before = rss_kib(child.child.id());
    let line = "a".repeat(2 * 1024 * 1024);
    for round in 0..10 {
        let mut stream = connect(child.address);
        let head = if round % 2 == 0 {
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {line}\r\n\r\n")
        } else {
            format!("GET /{line} HTTP/1.1\r\nHost: t\r\n\r\n")
        };
        let _ = stream.write_all(head.as_bytes());
        let answer = outcome(stream);
        assert!(
            matches!(answer, None | Some(414) | Some(431) | Some(400)),
            "{answer:?}"
        );
    }
    // A line that never ends is cut off: the service closes the
    // connection and stops taking data (the write blocks, then times out).
    let mut stream = connect(child.address);
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        .unwrap();
    let chunk = vec![b'e'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 1024 * 1024 * 1024 && stream.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    // Answered 431 (or just closed) by the service.
    let answer = outcome(stream);
    assert!(matches!(answer, None | Some(431)), "{answer:?}");
    let peak = status_number(child.child.id(), "VmHWM");
    alive(&mut child);
    let after = rss_kib(child.child.id());
    println!(
        "RSS before {before} KiB, after ten 2 MB lines and an endless one ({} MiB sent before the cut) {after} KiB (peak {peak} KiB)",
        sent / (1024 * 1024)
    );
    assert!(
        sent < 1024 * 1024 * 1024,
        "an endless header line was never cut off"
    );
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

#[test]
fn garbage_bytes_are_harmless() {
    let _heavy = heavy();
    let mut child = child_in("garbage", &[]);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        // xorshift64*: reproducible bytes.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
    };
    let samples: Vec<Vec<u8>> = vec![
        (0..65_536).map(|_| random()).collect(),
        (0..4096).map(|_| random() & 0x7f).collect(),
        b"\r\n\r\n\r\n\0\0\0GET\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"POST /api/mail HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
        b"POST /api/mail HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET /healthz HTTP/1.1\r\nBad Header Without Colon\r\n\r\n".to_vec(),
        b"\xff\xfe\xfd HTTP/1.1\r\n\r\n".to_vec(),
    ];
    for sample in &samples {
        let mut stream = connect(child.address);
        let _ = stream.write_all(sample);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let answer = outcome(stream);
        assert!(
            answer.is_none() || answer.is_some_and(|code| code >= 400),
            "{answer:?} for {:?}",
            String::from_utf8_lossy(&sample[..sample.len().min(40)])
        );
    }
    let (reply, took) = timed_post(child.address, &[]);
    assert_eq!(reply.code, 202);
    assert!(took < ONE_SECOND);
    alive(&mut child);
}

#[test]
fn an_accept_error_does_not_leave_the_service_deaf() {
    let _heavy = heavy();
    let mut child = child_in("emfile", &[]);
    let pid = child.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // A descriptor limit a little above what the service holds now.
    let limit = open + 12;
    let status = Command::new("prlimit")
        .args([format!("--nofile={limit}:{limit}"), format!("--pid={pid}")])
        .status()
        .unwrap();
    assert!(status.success());
    // Exhaust it: the accept fails with EMFILE (logged, retried).
    let flood: Vec<TcpStream> = (0..40).map(|_| connect(child.address)).collect();
    let deadline = Instant::now() + PATIENCE;
    while !child.log_text().contains("Error accepting new client") {
        assert!(
            Instant::now() < deadline,
            "no accept error: {}",
            child.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(flood);
    // Descriptors come back; the service answers again.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut stream = connect(child.address);
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        if outcome(stream) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "deaf: {}", child.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let (reply, _) = timed_post(child.address, &[]);
        assert_eq!(reply.code, 202);
    }
    alive(&mut child);
    let log = child.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

// ---------------------------------------------------------------- rate limit

#[test]
fn rate_limit_spaces_deliveries_evenly_without_an_initial_burst() {
    // Timing-sensitive: not next to the load tests.
    let _heavy = heavy();
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.rate_limit = 20.0;
    config.workers = 5;
    let service = Service::start(config);
    let interval = Duration::from_millis(50);
    let submitted = Instant::now();
    for index in 0..10 {
        let reply = service.post(
            "/api/mail",
            &seed_body("rate@example.org", &format!("paced {index}")),
        );
        assert_eq!(reply.code, 202);
    }
    let mut times: Vec<Instant> = relay
        .wait_for(10)
        .iter()
        .map(|message| message.at)
        .collect();
    times.sort();
    let gaps: Vec<Duration> = times.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let mean = (times[9] - times[0]) / 9;
    println!("rate 20/s: gaps between receipts {gaps:?}, mean {mean:?}");
    // No delivery starts before its turn, so the k-th message cannot reach
    // the relay earlier than k-1 intervals after the first was submitted,
    // however the machine's load delays single deliveries: an initial
    // burst, or any burst, breaks this. (A millisecond of slack for clocks.)
    for (index, at) in times.iter().enumerate() {
        let earliest = interval * index as u32;
        assert!(
            at.duration_since(submitted) + Duration::from_millis(1) >= earliest,
            "message {} arrived {:?} after submission, before its turn at {earliest:?}: {gaps:?}",
            index + 1,
            at.duration_since(submitted)
        );
    }
    // On average 1/rate apart (from the first submission: at least 9 intervals).
    let average = times[9].duration_since(submitted) / 9;
    assert!(average >= interval * 8 / 10, "{average:?}: {gaps:?}");
}

// ---------------------------------------------------------------- the binary

#[test]
fn start_up_refusals_exit_non_zero_naming_the_variable() {
    let _turn = light();
    let directory = temp_dir("refusals");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("MAILROOM_WORKERS", "many")], "MAILROOM_WORKERS"),
        (
            &[("MAILROOM_MAX_BODY_BYTES", "-1")],
            "MAILROOM_MAX_BODY_BYTES",
        ),
        (&[("MAILROOM_LISTEN", "0.0.0.0:8080")], "MAILROOM_API_TOKEN"),
        (
            &[(
                "MAILROOM_SMTP_URL",
                "smtp://mailer:pl41ntext-secret@relay.example.com:25",
            )],
            "MAILROOM_SMTP_URL",
        ),
    ];
    for (variables, named) in cases {
        let variables: Vec<(&str, String)> = variables
            .iter()
            .map(|(name, value)| (*name, value.to_string()))
            .collect();
        for arguments in [&[][..], &["--check"][..]] {
            let output = run_binary(&directory, arguments, &variables);
            let said = text(&output);
            assert!(!output.status.success(), "{variables:?}: {said}");
            assert!(
                said.contains(named),
                "{variables:?} should name {named}: {said}"
            );
            assert!(!said.contains("pl41ntext-secret"), "{said}");
        }
    }
}

#[test]
fn help_lists_every_variable_and_version_prints_the_version() {
    let _turn = light();
    let directory = temp_dir("help");
    let output = run_binary(&directory, &["--help"], &[]);
    assert!(output.status.success());
    let help = text(&output);
    for (name, _, _) in VARIABLES {
        assert!(help.contains(name), "--help lacks {name}");
    }
    for flag in ["--check", "--smtp", "--help", "--version"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let output = run_binary(&directory, &["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("mailroom {}", env!("CARGO_PKG_VERSION"))
    );
    let output = run_binary(&directory, &["--bogus"], &[]);
    assert!(!output.status.success());
    // Read by something that stops early (`mailroom --help | head`): the
    // pipe is closed before anything is written, and that is no crash.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .current_dir(&directory)
        .arg("--help")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn check_validates_the_configuration_and_smtp_logs_in_without_showing_the_password() {
    let _turn = light();
    let relay = TestRelay::starttls_with_auth("mailer", "hunter2-relay-password");
    let directory = temp_dir("check");
    let ca = relay
        .ca_file
        .as_ref()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let variables = vec![
        ("MAILROOM_SMTP_URL", relay.url()),
        ("MAILROOM_SMTP_CA_FILE", ca.clone()),
        ("MAILROOM_API_TOKEN", "api-token-value".to_string()),
    ];
    let output = run_binary(&directory, &["--check"], &variables);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("configuration ok"), "{said}");
    assert!(
        !said.contains("hunter2") && !said.contains("api-token-value"),
        "{said}"
    );

    let output = run_binary(&directory, &["--check", "--smtp"], &variables);
    let said = text(&output);
    println!("{said}");
    assert!(output.status.success(), "{said}");
    let steps = ["connected to localhost", "STARTTLS: ok", "AUTH: ok", "QUIT"];
    let mut position = 0;
    for step in steps {
        let found = said[position..]
            .find(step)
            .unwrap_or_else(|| panic!("step {step:?} missing or out of order: {said}"));
        position += found;
    }
    assert!(!said.contains("hunter2"), "{said}");

    // A wrong password: the AUTH step fails, named, without the password.
    let wrong = format!(
        "smtp://mailer:wrong-pa55word@localhost:{}?tls=required",
        relay.port
    );
    let output = run_binary(
        &directory,
        &["--check", "--smtp"],
        &[("MAILROOM_SMTP_URL", wrong), ("MAILROOM_SMTP_CA_FILE", ca)],
    );
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("STARTTLS: ok") && said.contains("AUTH"),
        "{said}"
    );
    assert!(said.contains("535"), "{said}");
    assert!(!said.contains("wrong-pa55word"), "{said}");
}

#[test]
fn secrets_never_reach_the_logs() {
    let _turn = light();
    let relay = TestRelay::starttls_with_auth("mailer", "hunter2-relay-password");
    let ca = relay
        .ca_file
        .as_ref()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut child = child_in(
        "secrets",
        &[
            ("MAILROOM_SMTP_URL", relay.url()),
            ("MAILROOM_SMTP_CA_FILE", ca),
            ("MAILROOM_API_TOKEN", "api-token-value".to_string()),
            ("RUST_LOG", "trace".to_string()),
        ],
    );
    let good = [("Authorization", "Bearer api-token-value")];
    let body = seed_body("s@example.org", "secret-free logs");
    let reply = request(child.address, "POST", "/api/mail", &good, body.as_bytes());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    relay.wait_for(1);
    let wrong = [("Authorization", "Bearer guessed-token-value")];
    assert_eq!(
        request(child.address, "POST", "/api/mail", &wrong, body.as_bytes()).code,
        401
    );
    child.signal("TERM");
    child.wait_exit(PATIENCE);
    let log = child.log_text();
    assert!(log.contains("sent"), "{log}");
    for secret in [
        "hunter2-relay-password",
        "api-token-value",
        "guessed-token-value",
        // AUTH PLAIN's base64 of "\0mailer\0hunter2-relay-password".
        "AG1haWxlcgBodW50ZXIy",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

// ---------------------------------------------------------------- framing

/// Sends raw bytes on a new connection; the answer's status, and whether
/// the service closed the connection after it.
fn raw_exchange(address: SocketAddr, bytes: &[u8]) -> (Option<u16>, bool) {
    let mut stream = connect(address);
    // A server that refuses the connection may close it before we are done.
    let _ = stream.write_all(bytes);
    let mut reader = BufReader::new(stream);
    let code = status_code(&mut reader);
    let mut rest = Vec::new();
    let end = reader.read_to_end(&mut rest);
    let closed = !matches!(&end, Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    (code, closed)
}

#[test]
fn a_request_smuggled_behind_content_length_and_chunked_never_runs() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let hidden_body = seed_body("victim@example.org", "smuggled");
    let hidden = format!(
        "POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{hidden_body}",
        hidden_body.len()
    );
    // The chunked body ends at once; a proxy framing by Content-Length
    // would see the hidden request as part of this one's body.
    let body = format!("0\r\n\r\n{hidden}");
    let smuggling = format!(
        "POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let (code, closed) = raw_exchange(service.address, smuggling.as_bytes());
    assert_eq!(code, Some(400));
    assert!(closed, "the connection stays open after the 400");
    // A marker sent afterwards arrives alone.
    let marker = service.post("/api/mail", &seed_body("m@example.org", "marker"));
    assert_eq!(marker.code, 202, "{}", marker.body_text());
    service.wait_for_status(&marker.id(), "sent");
    let subjects = subjects_of(&relay.received());
    assert_eq!(subjects, ["marker"]);
    let metrics = service.get("/metrics").body_text();
    assert!(
        metrics.contains("mailroom_messages_accepted_total 1\n"),
        "{metrics}"
    );
}

#[test]
fn requests_the_server_cannot_read_are_refused_in_json_too() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9 * 1024));
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
        "X-Big: yes\r\n".repeat(7_000)
    );
    let cases = [
        (
            400,
            "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_string(),
            "Host",
        ),
        (
            400,
            "POST /api/mail HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_string(),
            "Transfer-Encoding",
        ),
        (414, long_line, "request line too long"),
        (431, big_head, "request head too large"),
    ];
    for (code, request, says) in &cases {
        let mut stream = TcpStream::connect(service.address).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = stream.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).to_string();
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let json: Value = serde_json::from_str(body).expect("a JSON body");
        let error = json["data"]["error"].as_str().unwrap();
        assert!(error.contains(says), "{code}: {error}");
        assert_eq!(json["message"], error);
    }
}

#[test]
fn ambiguous_or_invalid_framing_is_a_400_and_closes_the_connection() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let body = seed_body("f@example.org", "framing");
    let cases = [
        format!(
            "Content-Length: {}\r\nContent-Length: 5\r\n\r\n{body}",
            body.len()
        ),
        format!("Content-Length: 12abc\r\n\r\n{body}"),
        format!("Content-Length: -{}\r\n\r\n{body}", body.len()),
        format!(
            "Transfer-Encoding: gzip\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
        format!(
            "Transfer-Encoding: gzip, chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
    ];
    for case in &cases {
        let request = format!("POST /api/mail HTTP/1.1\r\nHost: t\r\n{case}");
        let (code, closed) = raw_exchange(service.address, request.as_bytes());
        assert_eq!(code, Some(400), "{case:?}");
        assert!(closed, "{case:?}: the connection stays open");
    }
    assert_eq!(service.engine.unfinished(), 0);
    assert!(relay.received().is_empty());
    assert_eq!(service.get("/healthz").code, 200);
}

#[test]
fn obs_text_in_user_agent_and_idempotency_key_is_answered_normally() {
    let _turn = light();
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let (code, _) = raw_exchange(
        service.address,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nUser-Agent: aé\r\nConnection: close\r\n\r\n"
            .as_bytes(),
    );
    assert_eq!(code, Some(200));
    let body = seed_body("k@example.org", "unicode key");
    let headers = [("Idempotency-Key", "clé-42-✓"), ("User-Agent", "mailer/ü")];
    let first = request(
        service.address,
        "POST",
        "/api/mail",
        &headers,
        body.as_bytes(),
    );
    assert_eq!(first.code, 202, "{}", first.body_text());
    let again = request(
        service.address,
        "POST",
        "/api/mail",
        &headers,
        body.as_bytes(),
    );
    assert_eq!(again.code, 202, "{}", again.body_text());
    assert_eq!(again.id(), first.id(), "the same key is the same message");
    service.wait_for_status(&first.id(), "sent");
    assert_eq!(relay.received().len(), 1);
}

#[test]
fn connections_beyond_the_limit_get_503_and_the_service_keeps_serving() {
    let _heavy = heavy();
    let mut child = child_in(
        "connection-cap",
        &[("MAILROOM_HTTP_MAX_CONNECTIONS", "4".to_string())],
    );
    // Four keep-alive connections, each answered once and kept open.
    let held: Vec<BufReader<TcpStream>> = (0..4)
        .map(|_| {
            let mut stream = connect(child.address);
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let mut reader = BufReader::new(stream);
            assert_eq!(read_reply(&mut reader).code, 200);
            reader
        })
        .collect();
    let (code, closed) = raw_exchange(child.address, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(code, Some(503));
    assert!(closed);
    drop(held);
    // Until the server has seen the four close, a new connection may still
    // get the 503 (and a reset, so only the head is written here).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, _) = raw_exchange(
            child.address,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        if code == Some(200) {
            break;
        }
        assert!(matches!(code, Some(503) | None), "{code:?}");
        assert!(Instant::now() < deadline, "never served again");
        // Polling as a client would, with a deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(timed_post(child.address, &[]).0.code, 202);
    alive(&mut child);
    assert!(
        child.log_text().contains("refused with 503"),
        "{}",
        child.log_text()
    );
}

/// A handler thread takes the plain `POST /api/mail` requests waiting
/// behind the one it took and accepts them in one commit: each still gets
/// its own answer, in order, and a bad one among them (wrong token, broken
/// JSON) refuses only itself. Pipelined on one connection so that they are
/// all waiting at once.
#[test]
fn pipelined_submits_accepted_together_are_each_answered_in_order() {
    let _turn = light();
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.spool = mailroom::config::SpoolSetting::Directory(temp_dir("together").join("spool"));
    let mut http = http_settings();
    http.api_token = Some(mailroom::config::Secret::new("together-token"));
    let service = Service::start_with(config, http);
    let post = |body: &str, token: &str| {
        format!(
            "POST /api/mail HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let good = |subject: &str| seed_body("a@example.org", subject);
    let requests = [
        post(&good("one"), "together-token"),
        post(&good("two"), "wrong-token"),
        post("{\"sender\": ", "together-token"),
        post(&good("three"), "together-token"),
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        post(&good("four"), "together-token"),
    ];
    let mut stream = TcpStream::connect(service.address).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(requests.concat().as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let replies: Vec<HttpReply> = (0..requests.len())
        .map(|_| read_reply(&mut reader))
        .collect();
    let codes: Vec<u16> = replies.iter().map(|reply| reply.code).collect();
    assert_eq!(codes, [202, 401, 400, 202, 200, 202]);
    assert!(
        replies[2].body_text().contains("JSON"),
        "{}",
        replies[2].body_text()
    );
    let ids: Vec<String> = [0, 3, 5].iter().map(|at| replies[*at].id()).collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ids:?}");

    let mut subjects = subjects_of(&relay.wait_for(3));
    subjects.sort();
    assert_eq!(subjects, ["four", "one", "three"]);
    for id in &ids {
        let reply = request(
            service.address,
            "GET",
            &format!("/api/mail/{id}"),
            &[("Authorization", "Bearer together-token")],
            b"",
        );
        assert_eq!(reply.code, 200, "{}", reply.body_text());
    }
}

#[test]
fn a_shared_store_that_cannot_be_reached_at_start_is_named() {
    let (_, reserved) = unused_port();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let mut config = mailroom::Config::for_outbox(temp_dir("store-down-outbox"));
    config.store = Some(mailroom::config::RedisSettings::new(format!(
        "redis://{address}/0"
    )));
    let error = match mailroom::Engine::start(config) {
        Ok(_) => panic!("started without its store"),
        Err(error) => error.to_string(),
    };
    assert!(error.starts_with("MAILROOM_STORE: "), "{error}");
}
