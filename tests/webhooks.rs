//! Webhooks end to end: the service (in-process or the binary as a child
//! process) delivers mail through a real SMTP relay and POSTs signed
//! webhooks over real HTTP to a receiver (testkit) that checks each
//! signature with its own HMAC implementation.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use mailroom::webhooks::WebhookSettings;
use mailroom_testkit::webhooks::sign;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

/// The value of one series in a metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|value| value.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

fn deliveries(text: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("mailroom_webhook_deliveries_total{{result=\"{result}\"}}"),
    )
}

fn pending(text: &str) -> f64 {
    metric(text, "mailroom_webhooks_pending")
}

/// Polls `metrics` (as a user polls `/metrics`) until `done` holds.
fn wait_for_metrics(what: &str, metrics: impl Fn() -> String, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = metrics();
        if done(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn http_metrics(address: SocketAddr) -> impl Fn() -> String {
    move || request(address, "GET", "/metrics", &[], b"").body_text()
}

/// Distinct `webhook-id`s, in the order they first came.
fn distinct_ids(requests: &[ReceivedWebhook]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    requests
        .iter()
        .map(ReceivedWebhook::id)
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

fn delivered_ids(requests: &[ReceivedWebhook]) -> BTreeSet<String> {
    requests
        .iter()
        .filter(|request| request.delivered())
        .map(ReceivedWebhook::id)
        .collect()
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn submit(address: SocketAddr, receiver: &str, subject: &str) -> String {
    let reply = request(
        address,
        "POST",
        "/api/mail",
        &[],
        seed_body(receiver, subject).as_bytes(),
    );
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    reply.id()
}

/// What a webhook of `kind` for the message whose status (the API's
/// `data`) is `status` must carry, from the status endpoint's own events.
fn expected_payload(kind: &str, status: &Value) -> Value {
    let events = status["events"].as_array().expect("events");
    let event = events
        .iter()
        .rev()
        .find(|event| event["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} event in {status}"));
    let attempt = events
        .iter()
        .rev()
        .find(|event| event["type"] == "attempt")
        .cloned()
        .unwrap_or(json!({"smtp_code": null, "smtp_reply": null}));
    json!({
        "type": format!("message.{kind}"),
        "timestamp": event["at"],
        "data": {
            "id": status["id"],
            "status": status["status"],
            "recipients": status["recipients"],
            "attempts": status["attempts"],
            "smtp_code": attempt["smtp_code"],
            "smtp_reply": attempt["smtp_reply"],
            "tags": [],
            "metadata": {},
        }
    })
}

/// The Standard Webhooks headers as a receiver checks them.
fn check_headers(request: &ReceivedWebhook) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hooks/mail");
    assert_eq!(request.header("content-type"), Some("application/json"));
    let id = request.id();
    assert!(
        id.starts_with("msg_") && !id.contains('.') && id.len() > 4,
        "webhook-id {id:?}"
    );
    let timestamp: u64 = request
        .header("webhook-timestamp")
        .expect("webhook-timestamp")
        .parse()
        .expect("webhook-timestamp is Unix seconds");
    // Receivers refuse timestamps more than 5 minutes off.
    assert!(timestamp.abs_diff(now_seconds()) < 300, "{timestamp}");
    let signature = request.header("webhook-signature").expect("signature");
    assert!(signature.starts_with("v1,"), "{signature}");
    assert!(request.signature_valid, "bad signature on {request:?}");
}

/// Runs the binary in `directory` until it exits (killed after
/// [`PATIENCE`]); returns whether it succeeded and what it printed.
fn run_to_exit(directory: &Path, arguments: &[&str], variables: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    command
        .current_dir(directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILROOM_LISTEN", "127.0.0.1:0")
        .args(arguments)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in variables {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mailroom {arguments:?} with {variables:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The base64 part of the test secret: it must never be printed.
fn secret_part() -> &'static str {
    TEST_SECRET.trim_start_matches("whsec_")
}

// ---------------------------------------------------------------- tests

#[test]
fn a_sent_and_a_failed_message_each_make_one_signed_webhook() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    let directory = temp_dir("webhook-payload");
    let mut variables = webhook_variables(&receiver);
    variables.push(("MAILROOM_SMTP_URL", relay.url()));
    variables.push((
        "MAILROOM_SPOOL_DIR",
        directory.join("spool").display().to_string(),
    ));
    let service = ChildService::start(&directory, &variables);

    relay.reply_to_next_mail(&[(550, "5.7.1 sender not allowed here")]);
    let failed = submit(service.address, "refused@example.org", "Refused");
    let failed_status = wait_for_status(service.address, &failed, "failed");
    let sent = submit(service.address, "user@example.org", "Welcome");
    let sent_status = wait_for_status(service.address, &sent, "sent");

    wait_for_metrics(
        "two webhooks delivered",
        http_metrics(service.address),
        |text| deliveries(text, "ok") == 2.0 && pending(text) == 0.0,
    );
    let received = receiver.received();
    assert_eq!(
        received.len(),
        2,
        "one webhook each, nothing else: {received:?}"
    );
    let by_message: BTreeMap<String, &ReceivedWebhook> = received
        .iter()
        .map(|request| {
            (
                request.json()["data"]["id"].as_str().unwrap().to_string(),
                request,
            )
        })
        .collect();
    for (id, status, kind, code, recipient) in [
        (
            &failed,
            &failed_status,
            "failed",
            550,
            "refused@example.org",
        ),
        (&sent, &sent_status, "sent", 250, "user@example.org"),
    ] {
        let request = by_message
            .get(id.as_str())
            .unwrap_or_else(|| panic!("no webhook for {id}"));
        check_headers(request);
        assert_eq!(request.answered, Some(200));
        let body = request.json();
        assert_eq!(body, expected_payload(kind, status), "message {id}");
        assert_eq!(body["data"]["smtp_code"], code, "{body}");
        assert_eq!(body["data"]["recipients"], json!([recipient]));
        assert_eq!(body["data"]["attempts"], 1);
    }
    assert!(by_message[failed.as_str()].json()["data"]["smtp_reply"]
        .as_str()
        .unwrap()
        .contains("sender not allowed here"));
    assert_ne!(received[0].id(), received[1].id());

    let log = service.log_text();
    for request in &received {
        let line = log
            .lines()
            .find(|line| line.contains(&format!("webhook {}: delivered", request.id())))
            .unwrap_or_else(|| panic!("no delivery logged for {}:\n{log}", request.id()));
        assert!(line.contains("HTTP 200"), "{line}");
    }
    assert!(
        !log.contains(secret_part()),
        "the secret was logged:\n{log}"
    );
}

#[test]
fn a_receiver_down_then_up_gets_every_event_and_repeats_keep_their_id() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    receiver.down();
    let mut config = config_for(&relay);
    config.webhook = Some(webhook_settings(&receiver));
    let service = Service::start(config);
    let metrics = || service.engine.metrics_text();

    let ids: BTreeSet<String> = (0..20)
        .map(|n| submit(service.address, &format!("user{n}@example.org"), "Hi"))
        .collect();
    relay.wait_for(20);
    wait_for_metrics("every webhook failing and retried", metrics, |text| {
        pending(text) == 20.0 && deliveries(text, "retry") >= 40.0
    });

    // Back, but failing: every webhook is tried again and refused.
    receiver.answer(500);
    receiver.up();
    let refused = receiver.wait_until("every webhook refused once", |received| {
        distinct_ids(received).len() >= 20
    });
    receiver.answer(200);
    let received = receiver.wait_until("every webhook delivered", |received| {
        delivered_ids(received).len() >= 20
    });
    wait_for_metrics("nothing pending", metrics, |text| pending(text) == 0.0);

    let refused_ids: BTreeSet<String> = distinct_ids(&refused).into_iter().collect();
    assert_eq!(refused_ids.len(), 20);
    assert_eq!(delivered_ids(&received), refused_ids, "the same ids again");
    let mut bodies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut last_timestamp: BTreeMap<String, u64> = BTreeMap::new();
    for request in &received {
        check_headers(request);
        let body = bodies
            .entry(request.id())
            .or_insert_with(|| request.body.clone());
        assert_eq!(body, &request.body, "a repeat carries the same body");
        let timestamp = request
            .header("webhook-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        let last = last_timestamp.entry(request.id()).or_insert(timestamp);
        assert!(timestamp >= *last, "each attempt is signed anew");
        *last = timestamp;
    }
    let messages: BTreeMap<String, String> = bodies
        .iter()
        .map(|(webhook, body)| {
            let body: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(body["type"], "message.sent");
            (
                body["data"]["id"].as_str().unwrap().to_string(),
                webhook.clone(),
            )
        })
        .collect();
    assert_eq!(
        messages.keys().cloned().collect::<BTreeSet<_>>(),
        ids,
        "one webhook per message, none lost"
    );
    let text = service.engine.metrics_text();
    assert_eq!(deliveries(&text, "ok"), 20.0, "each delivered once");
    assert_eq!(deliveries(&text, "failed"), 0.0);
    assert_eq!(deliveries(&text, "dropped"), 0.0);
}

#[test]
fn a_webhook_that_keeps_failing_does_not_hold_up_the_others() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    let mut config = config_for(&relay);
    config.webhook = Some(webhook_settings(&receiver));
    let service = Service::start(config);
    let metrics = || service.engine.metrics_text();

    let stuck = submit(service.address, "stuck@example.org", "Stuck");
    receiver.refuse_containing(&stuck, 500);
    receiver.wait_until("the stuck webhook refused twice", |received| {
        received
            .iter()
            .filter(|request| request.answered == Some(500))
            .count()
            >= 2
    });
    let others: BTreeSet<String> = (0..20)
        .map(|n| submit(service.address, &format!("user{n}@example.org"), "Hi"))
        .collect();
    let received = receiver.wait_until("the others delivered", |received| {
        delivered_ids(received).len() >= 20
    });
    let delivered: BTreeSet<String> = received
        .iter()
        .filter(|request| request.delivered())
        .map(|request| request.json()["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, others);
    // (An answer reaches the receiver a moment before the sender notes it.)
    wait_for_metrics("only the stuck one pending", metrics, |text| {
        pending(text) == 1.0 && deliveries(text, "ok") == 20.0
    });
    assert!(deliveries(&metrics(), "retry") >= 2.0);
}

#[test]
fn pending_webhooks_survive_a_stop_and_a_kill_9_with_their_ids() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    receiver.answer(503);
    let directory = temp_dir("webhook-restart");
    let mut variables = webhook_variables(&receiver);
    variables.push(("MAILROOM_SMTP_URL", relay.url()));
    variables.push((
        "MAILROOM_SPOOL_DIR",
        directory.join("spool").display().to_string(),
    ));

    let mut service = ChildService::start(&directory, &variables);
    let ids: BTreeSet<String> = (0..3)
        .map(|n| submit(service.address, &format!("user{n}@example.org"), "Hi"))
        .collect();
    relay.wait_for(3);
    let tried = receiver.wait_until("three webhooks tried", |received| {
        distinct_ids(received).len() >= 3
    });
    let webhooks: BTreeSet<String> = distinct_ids(&tried).into_iter().collect();

    // A graceful stop keeps them.
    service.signal("TERM");
    assert!(service.wait_exit(PATIENCE).success());
    let log = service.log_text();
    assert!(
        log.contains("webhooks: stopped; 3 pending kept in the spool"),
        "{log}"
    );

    // After the restart they are tried again, under the same ids; then a kill -9.
    let mut service = ChildService::start(&directory, &variables);
    let before = receiver.received().len();
    receiver.wait_until("the same webhooks tried after the restart", |received| {
        received.len() > before
            && distinct_ids(&received[before..])
                .into_iter()
                .collect::<BTreeSet<_>>()
                == webhooks
    });
    service.kill_hard();

    receiver.answer(200);
    let service = ChildService::start(&directory, &variables);
    let received = receiver.wait_until("every webhook delivered", |received| {
        delivered_ids(received).len() >= 3
    });
    wait_for_metrics("nothing pending", http_metrics(service.address), |text| {
        pending(text) == 0.0
    });
    assert_eq!(
        delivered_ids(&received),
        webhooks,
        "delivered under the first ids"
    );
    assert_eq!(
        distinct_ids(&received).len(),
        3,
        "no webhook was made twice"
    );
    let messages: BTreeSet<String> = received
        .iter()
        .filter(|request| request.delivered())
        .map(|request| request.json()["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(messages, ids);
    assert!(received.iter().all(|request| request.signature_valid));
    assert_eq!(relay.received().len(), 3, "no mail was sent again");
    assert!(!service.log_text().contains(secret_part()));
}

#[test]
fn a_hanging_receiver_does_not_slow_mail_delivery() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    let mut config = config_for(&relay);
    config.webhook = Some(webhook_settings(&receiver));
    let service = Service::start(config);
    let count = 100;

    let started = Instant::now();
    for n in 0..count {
        submit(service.address, &format!("before{n}@example.org"), "Hi");
    }
    relay.wait_for(count);
    let answering = started.elapsed();
    receiver.wait_for_delivered(count);
    // The receiver has a request a moment before the sender counts its answer.
    wait_for_metrics(
        "every first webhook counted",
        || service.engine.metrics_text(),
        |text| deliveries(text, "ok") == count as f64,
    );

    receiver.hang(true);
    let started = Instant::now();
    for n in 0..count {
        submit(service.address, &format!("during{n}@example.org"), "Hi");
    }
    relay.wait_for(2 * count);
    let hanging = started.elapsed();
    // Every message went out while none of its webhooks was delivered.
    let text = service.engine.metrics_text();
    assert_eq!(deliveries(&text, "ok"), count as f64, "{text}");
    // (The relay has the last message a moment before its status, and so
    // its webhook, is recorded.)
    wait_for_metrics(
        "every new webhook pending",
        || service.engine.metrics_text(),
        |text| pending(text) == count as f64 && deliveries(text, "ok") == count as f64,
    );
    receiver.wait_until("requests held by the receiver", |received| {
        received.iter().any(|request| request.answered.is_none())
    });
    eprintln!(
        "{count} messages accepted and delivered in {answering:?} with the webhook receiver answering, \
         {hanging:?} with it hanging"
    );

    receiver.hang(false);
    let received = receiver.wait_until("every webhook delivered", |received| {
        delivered_ids(received).len() >= 2 * count
    });
    assert!(received.iter().all(|request| request.signature_valid));
}

#[test]
fn the_event_filter_chooses_the_events_sent() {
    /// Types, statuses and SMTP codes of the webhooks of one message that
    /// was deferred once (451) and then sent.
    fn webhooks_of(extra: &[(&'static str, String)]) -> Vec<(String, String, Value)> {
        let relay = TestRelay::plain();
        let receiver = WebhookReceiver::start(TEST_SECRET);
        let directory = temp_dir("webhook-filter");
        let mut variables = webhook_variables(&receiver);
        variables.push(("MAILROOM_SMTP_URL", relay.url()));
        variables.push(("MAILROOM_RETRY_BASE_MS", "50".into()));
        variables.push((
            "MAILROOM_SPOOL_DIR",
            directory.join("spool").display().to_string(),
        ));
        variables.extend_from_slice(extra);
        let service = ChildService::start(&directory, &variables);
        relay.reply_to_next_mail(&[(451, "4.3.0 try again later")]);
        let id = submit(service.address, "user@example.org", "Later");
        wait_for_status(service.address, &id, "sent");
        receiver.wait_until("the sent webhook", |received| {
            received
                .iter()
                .any(|request| request.delivered() && request.json()["type"] == "message.sent")
        });
        // A deferred webhook would have been queued before the sent one.
        wait_for_metrics("nothing pending", http_metrics(service.address), |text| {
            pending(text) == 0.0
        });
        let mut webhooks: Vec<(String, String, Value)> = receiver
            .received()
            .iter()
            .map(|request| {
                check_headers(request);
                let body = request.json();
                assert_eq!(body["data"]["id"], id.as_str());
                (
                    body["type"].as_str().unwrap().to_string(),
                    body["data"]["status"].as_str().unwrap().to_string(),
                    body["data"]["smtp_code"].clone(),
                )
            })
            .collect();
        webhooks.sort_by(|a, b| a.0.cmp(&b.0));
        webhooks
    }

    assert_eq!(
        webhooks_of(&[("MAILROOM_WEBHOOK_EVENTS", "deferred,sent".into())]),
        [
            ("message.deferred".into(), "retrying".into(), json!(451)),
            ("message.sent".into(), "sent".into(), json!(250)),
        ]
    );
    assert_eq!(
        webhooks_of(&[]),
        [("message.sent".into(), "sent".into(), json!(250))],
        "by default only outcomes"
    );
}

#[test]
fn bad_webhook_settings_stop_the_start_naming_the_variable() {
    let directory = temp_dir("webhook-settings");
    let url = ("MAILROOM_WEBHOOK_URL", "https://hooks.example.com/mail");
    let secret = ("MAILROOM_WEBHOOK_SECRET", TEST_SECRET);
    for (variables, named) in [
        (vec![url], "MAILROOM_WEBHOOK_SECRET"),
        (
            vec![url, ("MAILROOM_WEBHOOK_SECRET", secret_part())],
            "MAILROOM_WEBHOOK_SECRET",
        ),
        (vec![secret], "MAILROOM_WEBHOOK_URL"),
        (
            vec![
                ("MAILROOM_WEBHOOK_URL", "http://hooks.example.com/mail"),
                secret,
            ],
            "MAILROOM_WEBHOOK_URL",
        ),
        (
            vec![url, secret, ("MAILROOM_WEBHOOK_EVENTS", "sent,bounced")],
            "MAILROOM_WEBHOOK_EVENTS",
        ),
        (
            vec![url, secret, ("MAILROOM_WEBHOOK_RETRY_HOURS", "a day")],
            "MAILROOM_WEBHOOK_RETRY_HOURS",
        ),
    ] {
        let (succeeded, said) = run_to_exit(&directory, &[], &variables);
        assert!(!succeeded, "{variables:?} started: {said}");
        assert!(
            said.contains(named),
            "{variables:?} should name {named}: {said}"
        );
        assert!(
            !said.contains(secret_part()),
            "the secret was shown: {said}"
        );
    }
    // Plain http beyond loopback only when allowed; loopback always.
    for variables in [
        vec![
            ("MAILROOM_WEBHOOK_URL", "http://hooks.example.com/mail"),
            secret,
            ("MAILROOM_WEBHOOK_ALLOW_HTTP", "1"),
        ],
        vec![("MAILROOM_WEBHOOK_URL", "http://127.0.0.1:9/mail"), secret],
    ] {
        let (succeeded, said) = run_to_exit(&directory, &["--check"], &variables);
        assert!(succeeded, "{variables:?}: {said}");
        assert!(
            !said.contains(secret_part()),
            "the secret was shown: {said}"
        );
    }
}

#[test]
fn the_pending_cap_drops_the_oldest_and_counts_them() {
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    receiver.down();
    let mut config = config_for(&relay);
    // One worker: messages are sent, and their webhooks queued, in order.
    config.workers = 1;
    let mut settings = webhook_settings(&receiver);
    settings.max_pending = 5;
    config.webhook = Some(settings);
    let service = Service::start(config);
    let metrics = || service.engine.metrics_text();

    let ids: Vec<String> = (0..12)
        .map(|n| submit(service.address, &format!("user{n}@example.org"), "Hi"))
        .collect();
    relay.wait_for(12);
    wait_for_metrics("7 dropped, 5 pending", metrics, |text| {
        deliveries(text, "dropped") == 7.0 && pending(text) == 5.0
    });

    receiver.up();
    wait_for_metrics("the 5 kept delivered", metrics, |text| {
        pending(text) == 0.0 && deliveries(text, "ok") == 5.0
    });
    let messages: BTreeSet<String> = receiver
        .delivered()
        .iter()
        .map(|request| request.json()["data"]["id"].as_str().unwrap().to_string())
        .collect();
    let newest: BTreeSet<String> = ids[7..].iter().cloned().collect();
    // A dropped webhook whose attempt was under way when it was dropped may
    // still arrive (that attempt goes on; nothing retries it).
    assert!(
        messages.is_superset(&newest) && messages.len() <= 5 + WebhookSettings::DEFAULT_THREADS,
        "the newest kept, the oldest dropped: {messages:?}, newest {newest:?}"
    );
    assert_eq!(deliveries(&metrics(), "dropped"), 7.0);
}

#[test]
fn the_readme_receiver_verifies_a_real_webhook() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Webhooks").expect("a Webhooks section")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let snippet = &section[start..start + section[start..].find("```").unwrap()];
    let directory = temp_dir("webhook-readme");
    let script = directory.join("receiver.py");
    std::fs::write(&script, snippet).unwrap();

    let (port, reserved) = unused_port();
    drop(reserved);
    let mut python = Command::new("python3")
        .arg(&script)
        .env("WEBHOOK_SECRET", TEST_SECRET)
        .env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = python.stdout.take().unwrap();
    let _python = Kill(python);
    let (lines, printed) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(address).is_err() {
        assert!(
            Instant::now() < deadline,
            "the README receiver did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A real webhook from the service.
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.webhook = Some(webhook_settings_to(&format!("http://{address}/")));
    let service = Service::start(config);
    let id = submit(service.address, "user@example.org", "Hi");
    let line = printed
        .recv_deadline(deadline)
        .expect("the README receiver printed the webhook");
    assert_eq!(line, format!("message.sent {id} sent"));
    wait_for_metrics(
        "delivered",
        || service.engine.metrics_text(),
        |text| deliveries(text, "ok") == 1.0,
    );

    // It refuses what is not signed right, or too old.
    let body = br#"{"type":"message.sent","timestamp":"2026-01-01T00:00:00.000Z","data":{"id":"forged","status":"sent"}}"#;
    let now = now_seconds().to_string();
    let old = (now_seconds() - 600).to_string();
    let signed_now = sign(TEST_SECRET, "msg_x", &now, body);
    let signed_old = sign(TEST_SECRET, "msg_x", &old, body);
    for (timestamp, signature, code) in [
        (now.as_str(), signed_now.as_str(), 204),
        (
            now.as_str(),
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            401,
        ),
        (old.as_str(), signed_old.as_str(), 401),
    ] {
        let headers = [
            ("content-type", "application/json"),
            ("webhook-id", "msg_x"),
            ("webhook-timestamp", timestamp),
            ("webhook-signature", signature),
        ];
        let reply = request(address, "POST", "/", &headers, body);
        assert_eq!(
            reply.code, code,
            "timestamp {timestamp}, signature {signature}"
        );
    }
    let line = printed.recv_deadline(deadline).unwrap();
    assert_eq!(
        line, "message.sent forged sent",
        "only the well-signed one was taken"
    );
}
