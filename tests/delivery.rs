//! The core service against a real SMTP server over real HTTP: what arrives,
//! what the API answers, and how failures are retried or not.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mail_parser::MimeHeaders;
use mailroom::config::{Relay, SpoolSetting};
use mailroom::Config;

#[test]
fn seed_request_arrives_with_headers_and_body() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));

    let reply = service.post("/api/mail", &seed_body("user@example.org", "Welcome"));
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let json = reply.json();
    assert_eq!(json["message"], "ok");
    assert_eq!(json["data"]["status"], "queued");
    let id = reply.id();
    // The envelope's fields in the order the API reference shows them.
    assert_eq!(
        reply.body_text(),
        format!(r#"{{"message":"ok","data":{{"id":"{id}","status":"queued"}}}}"#)
    );
    let refused = service.post("/api/mail", "{}");
    assert!(
        refused
            .body_text()
            .starts_with(r#"{"message":"missing field"#),
        "{}",
        refused.body_text()
    );

    let received = relay.wait_for(1);
    assert_eq!(received[0].from, "app@example.com");
    assert_eq!(received[0].recipients, vec!["user@example.org"]);
    let message = received[0].parsed();
    let from = message.from().unwrap().first().unwrap();
    assert_eq!(from.name(), Some("App"));
    assert_eq!(from.address(), Some("app@example.com"));
    assert_eq!(
        message.to().unwrap().first().unwrap().address(),
        Some("user@example.org")
    );
    assert_eq!(message.subject(), Some("Welcome"));
    assert!(message.date().is_some(), "Date header");
    let message_id = message.message_id().expect("Message-ID header");
    assert!(
        message_id.starts_with(&id),
        "{message_id} should carry the id {id}"
    );
    assert_eq!(
        message.body_text(0).unwrap().trim_end(),
        "Hello from mailroom"
    );

    let status = service.wait_for_status(&id, "sent");
    assert_eq!(status["attempts"], 1);
    assert_eq!(status["last_error"], serde_json::Value::Null);
    assert_eq!(status["next_attempt_at"], serde_json::Value::Null);
    assert!(status["created_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn message_ids_are_unique_per_message() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    for index in 0..5 {
        assert_eq!(
            service
                .post(
                    "/api/mail",
                    &seed_body("u@example.org", &format!("m{index}"))
                )
                .code,
            202
        );
    }
    let received = relay.wait_for(5);
    let ids: std::collections::HashSet<String> = received
        .iter()
        .map(|message| message.parsed().message_id().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 5);
}

#[test]
fn utf8_subject_and_body_round_trip() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let subject =
        "Grüße aus Köln ✓ 日本語の件名 — a rather long subject line that must be folded properly";
    let body = serde_json::json!({
        "sender": "Zoë Café <zoe@example.com>",
        "receiver": "user@example.org",
        "subject": subject,
        "message": "Ünïcödé body ✓\nsecond line\n.starts with a dot",
    });
    assert_eq!(service.post("/api/mail", &body.to_string()).code, 202);
    let received = relay.wait_for(1);
    let message = received[0].parsed();
    assert_eq!(message.subject(), Some(subject));
    assert_eq!(
        message.from().unwrap().first().unwrap().name(),
        Some("Zoë Café")
    );
    let text = message.body_text(0).unwrap();
    assert!(text.contains("Ünïcödé body ✓"), "{text}");
    assert!(
        text.contains("\n.starts with a dot"),
        "dot-stuffing undone: {text}"
    );
    assert!(
        received[0].data.is_ascii(),
        "headers and body are encoded for 7-bit transport"
    );
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let cases = [
        ("{not json", "malformed JSON"),
        ("[1,2]", "JSON object"),
        (
            r#"{"receiver":"u@example.org","subject":"x","message":"m"}"#,
            "sender",
        ),
        (
            r#"{"sender":"a@example.com","subject":"x","message":"m"}"#,
            "receiver",
        ),
        (
            r#"{"sender":"a@example.com","receiver":"u@example.org","message":"m"}"#,
            "subject",
        ),
        (
            r#"{"sender":"a@example.com","receiver":"u@example.org","subject":"hi\r\nBcc: victim@example.net"}"#,
            "subject",
        ),
        (
            r#"{"sender":"a@example.com","receiver":"u@example.org","subject":"hi\nX-Injected: 1"}"#,
            "subject",
        ),
        (
            r#"{"sender":"not-an-address","receiver":"u@example.org","subject":"x"}"#,
            "sender",
        ),
        (
            r#"{"sender":"a@example.com","receiver":"u@example.org\r\nBcc: v@example.net","subject":"x"}"#,
            "receiver",
        ),
        (
            r#"{"sender":"a@example.com","receiver":42,"subject":"x"}"#,
            "receiver",
        ),
        (
            r#"{"sender":"a@example.com","receiver":"u@example.org","subject":"x","headers":{"X-A":"b\r\nBcc: v@example.net"}}"#,
            "X-A",
        ),
    ];
    for (body, named) in cases {
        let reply = service.post("/api/mail", body);
        assert_eq!(reply.code, 400, "{body} → {}", reply.body_text());
        let json = reply.json();
        let text = format!("{} {}", json["message"], json["data"]["error"]);
        assert!(
            text.contains(named),
            "{body}: answer should name {named}: {text}"
        );
        let reply = service.post("/api/mail/v2", body);
        assert_eq!(reply.code, 400, "v2 {body}");
    }
    assert_eq!(relay.connections(), 0, "nothing was sent");
}

#[test]
fn unknown_paths_and_methods_get_json_answers() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let reply = service.get("/nope");
    assert_eq!(reply.code, 404);
    assert_eq!(reply.json()["message"], "not found");
    let reply = request(service.address, "PUT", "/api/mail", &[], b"");
    assert_eq!(reply.code, 405);
    assert_eq!(reply.header("Allow"), Some("GET, HEAD, POST"));
    assert!(reply.json()["message"].is_string());
    let reply = service.get("/api/mail/0123456789");
    assert_eq!(reply.code, 404);
    assert_eq!(service.get("/healthz").code, 200);
    assert_eq!(service.get("/readyz").code, 200);
}

#[test]
fn transient_replies_are_retried_and_the_message_arrives_once() {
    let relay = TestRelay::plain();
    relay.reply_to_next_mail(&[(451, "Try again later"), (452, "Still busy")]);
    let service = Service::start(config_for(&relay));
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "retry me"))
        .id();

    let status = service.wait_for_status(&id, "sent");
    assert_eq!(status["attempts"], 3, "{status}");
    let received = relay.wait_for(1);
    assert_eq!(received.len(), 1);
    let metrics = service.get("/metrics").body_text();
    assert!(
        metrics.contains("mailroom_delivery_attempts_total{result=\"transient\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailroom_delivery_attempts_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailroom_messages_sent_total 1"),
        "{metrics}"
    );
}

#[test]
fn permanent_refusal_fails_without_retry() {
    let relay = TestRelay::plain();
    relay.refuse_recipient("nobody@example.org", 550, "No such user here");
    let service = Service::start(config_for(&relay));
    let id = service
        .post("/api/mail", &seed_body("nobody@example.org", "doomed"))
        .id();

    let status = service.wait_for_status(&id, "failed");
    assert_eq!(status["attempts"], 1);
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains("550") && error.contains("No such user"),
        "{error}"
    );
    assert!(relay.received().is_empty());
    let metrics = service.get("/metrics").body_text();
    assert!(
        metrics.contains("mailroom_delivery_attempts_total{result=\"permanent\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailroom_messages_failed_total 1"),
        "{metrics}"
    );
}

#[test]
fn attempts_run_out_after_max_attempts() {
    let relay = TestRelay::plain();
    relay.reply_to_next_mail(&[(451, "busy"); 10]);
    let mut config = config_for(&relay);
    config.max_attempts = 3;
    let service = Service::start(config);
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "never"))
        .id();
    let status = service.wait_for_status(&id, "failed");
    assert_eq!(status["attempts"], 3);
    assert!(status["last_error"].as_str().unwrap().contains("451"));
}

#[test]
fn relay_down_then_up_delivers_without_losing_anything() {
    let (mut config, relay_address) = config_with_relay_down();
    config.retry_base = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(200);
    // An unreachable relay never uses up a message's attempts.
    config.max_attempts = 2;
    let service = Service::start(config);

    let ids: Vec<String> = (0..3)
        .map(|index| {
            service
                .post(
                    "/api/mail",
                    &seed_body("user@example.org", &format!("down {index}")),
                )
                .id()
        })
        .collect();
    let status = service.wait_for_status(&ids[0], "retrying");
    assert!(
        status["last_error"].as_str().unwrap().contains("connect"),
        "{status}"
    );
    assert!(status["next_attempt_at"].is_string());
    // Every recent attempt failed to connect: not ready.
    let deadline = Instant::now() + PATIENCE;
    while service.get("/readyz").code != 503 {
        assert!(
            Instant::now() < deadline,
            "readyz should say the relay is failing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(service.get("/readyz").json()["data"]["error"]
        .as_str()
        .unwrap()
        .contains("relay"));
    for id in &ids {
        wait_for_retrying_beyond(service.address, id, 2);
    }

    // Back, but busy at first: a 451 after the outage is the message's
    // first counted attempt, not its last (the outage used up nothing).
    let relay = TestRelay::with_on(
        std::net::TcpListener::bind(relay_address).unwrap(),
        RelayOptions {
            gated: true,
            ..RelayOptions::default()
        },
    );
    relay.reply_to_next_mail(&[(451, "4.7.1 busy, try later")]);
    relay.open_gate();
    let received = relay.wait_for(3);
    assert_eq!(received.len(), 3);
    for id in &ids {
        service.wait_for_status(id, "sent");
    }
    assert_eq!(service.get("/readyz").code, 200);
}

#[test]
fn a_relay_that_never_greets_does_not_use_up_attempts() {
    // Connections are taken by the kernel and never answered: each attempt
    // ends at the SMTP deadline while connecting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut config, _) = config_with_relay_down();
    if let Relay::Smtp(settings) = &mut config.relay {
        settings.port = silent.local_addr().unwrap().port();
        settings.timeout = Duration::from_millis(200);
    }
    config.max_attempts = 2;
    let service = Service::start(config);
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "silent relay"))
        .id();
    let status = wait_for_retrying_beyond(service.address, &id, 3);
    assert!(
        status["last_error"].as_str().unwrap().contains("timed out"),
        "{status}"
    );
    drop(silent);
}

#[test]
fn full_queue_answers_503_at_once_and_never_blocks() {
    let (mut config, _) = config_with_relay_down();
    config.queue_capacity = 3;
    config.retry_base = Duration::from_secs(60);
    config.retry_max = Duration::from_secs(60);
    let service = Service::start(config);
    for index in 0..3 {
        assert_eq!(
            service
                .post(
                    "/api/mail",
                    &seed_body("u@example.org", &format!("{index}"))
                )
                .code,
            202
        );
    }
    let started = Instant::now();
    for _ in 0..20 {
        let reply = service.post("/api/mail", &seed_body("u@example.org", "one too many"));
        assert_eq!(reply.code, 503, "{}", reply.body_text());
        assert!(reply.header("Retry-After").is_some());
        assert_eq!(
            service
                .post("/api/mail/v2", &seed_body("u@example.org", "v2 too"))
                .code,
            503
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "503 must come at once"
    );
    assert_eq!(service.get("/readyz").code, 503);
    // Each of the three waits for its retry once its first attempt failed.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = service.get("/metrics").body_text();
        if metrics.contains("mailroom_retry_depth 3") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn v2_reports_success_and_failure() {
    let relay = TestRelay::plain();
    relay.refuse_recipient("gone@example.org", 550, "Mailbox unavailable");
    let service = Service::start(config_for(&relay));

    let reply = service.post("/api/mail/v2", &seed_body("user@example.org", "sync"));
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    assert_eq!(reply.json()["data"]["status"], "sent");
    let id = reply.id();
    assert_eq!(relay.received().len(), 1, "delivered before the answer");
    assert_eq!(
        service.get(&format!("/api/mail/{id}")).json()["data"]["status"],
        "sent"
    );

    let reply = service.post("/api/mail/v2", &seed_body("gone@example.org", "sync fail"));
    assert_eq!(reply.code, 502, "{}", reply.body_text());
    let json = reply.json();
    assert_eq!(json["message"], "failed to send email");
    assert_eq!(json["data"]["smtp_code"], 550);
    assert!(json["data"]["error"]
        .as_str()
        .unwrap()
        .contains("Mailbox unavailable"));

    // A transient failure is not retried for v2: the caller hears about it.
    relay.reply_to_next_mail(&[(451, "Greylisted")]);
    let reply = service.post(
        "/api/mail/v2",
        &seed_body("user@example.org", "sync transient"),
    );
    assert_eq!(reply.code, 502);
    assert_eq!(reply.json()["data"]["smtp_code"], 451);
}

#[test]
fn v2_without_smtp_reply_omits_the_code() {
    let (config, _) = config_with_relay_down();
    let service = Service::start(config);
    let reply = service.post(
        "/api/mail/v2",
        &seed_body("user@example.org", "nobody home"),
    );
    assert_eq!(reply.code, 502);
    assert!(
        reply.json()["data"].get("smtp_code").is_none(),
        "{}",
        reply.body_text()
    );
}

#[test]
fn v2_times_out_with_504() {
    let relay = TestRelay::plain();
    relay.stall(true);
    let mut config = config_for(&relay);
    config.sync_timeout = Duration::from_millis(300);
    let service = Service::start(config);
    let reply = service.post("/api/mail/v2", &seed_body("user@example.org", "slow"));
    assert_eq!(reply.code, 504, "{}", reply.body_text());
    let id = reply.id();
    relay.stall(false);
    service.wait_for_status(&id, "sent");
}

#[test]
fn workers_reuse_their_smtp_connections() {
    let relay = TestRelay::starttls_with_auth("mailer", "s3cret");
    let service = Service::start(config_for(&relay));
    let count = 1000;
    for index in 0..count {
        let reply = service.post(
            "/api/mail",
            &seed_body("user@example.org", &format!("bulk {index}")),
        );
        assert_eq!(reply.code, 202);
    }
    relay.wait_for(count);
    let connections = relay.connections();
    println!(
        "{count} messages over STARTTLS+AUTH used {connections} SMTP connections with 5 workers"
    );
    // One connection per worker; a little slack for a reconnect after a
    // read timeout on a heavily loaded machine, far below one per message.
    assert!(
        connections <= 8,
        "{count} messages used {connections} SMTP connections (5 workers)"
    );
    // The relay counts a message before the worker reads its 250: poll.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = service.get("/metrics").body_text();
        if metrics.contains(&format!("mailroom_messages_sent_total {count}")) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dead_pooled_connection_is_not_an_attempt() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.workers = 1;
    let service = Service::start(config);
    let first = service
        .post("/api/mail", &seed_body("user@example.org", "first"))
        .id();
    service.wait_for_status(&first, "sent");
    // The relay answers 421 on the reused connection and closes it.
    relay.reply_to_next_mail(&[(421, "Idle too long, closing")]);
    let second = service
        .post("/api/mail", &seed_body("user@example.org", "second"))
        .id();
    let status = service.wait_for_status(&second, "sent");
    assert_eq!(status["attempts"], 1, "{status}");
    assert_eq!(relay.wait_for(2).len(), 2);
    assert_eq!(relay.connections(), 2);
}

#[test]
fn wrong_credentials_keep_messages_retrying() {
    let relay = TestRelay::starttls_with_auth("mailer", "right");
    let mut config = config_for(&relay);
    let mut settings = relay.settings();
    settings.credentials = Some(("mailer".into(), mailroom::config::Secret::new("wrong")));
    config.relay = Relay::Smtp(settings);
    // Bad credentials are the configuration's fault, not the message's:
    // they never use up its attempts.
    config.max_attempts = 2;
    config.retry_max = Duration::from_millis(100);
    let service = Service::start(config);
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "auth"))
        .id();
    let status = wait_for_retrying_beyond(service.address, &id, 3);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("535"), "{error}");
    assert!(!error.contains("wrong"), "no password in errors: {error}");
}

#[test]
fn outbox_mode_writes_eml_files() {
    let outbox = temp_dir("outbox");
    let mut config = Config::for_outbox(&outbox);
    config.spool = SpoolSetting::Memory;
    let service = Service::start(config);
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "to the outbox"))
        .id();
    service.wait_for_status(&id, "sent");
    let path = outbox.join(format!("{id}.eml"));
    let data = std::fs::read(&path).unwrap();
    let message = mail_parser::MessageParser::default().parse(&data).unwrap();
    assert_eq!(message.subject(), Some("to the outbox"));
    assert_eq!(
        message.to().unwrap().first().unwrap().address(),
        Some("user@example.org")
    );
    assert!(message.content_type().is_some());
}

#[test]
fn the_outbox_keeps_the_envelope_and_says_where_each_message_went() {
    let directory = temp_dir("outbox-child");
    let service = ChildService::start(&directory, &[]);
    // Recipients as strings in every field, a Bcc among them.
    let body = serde_json::json!({
        "sender": "App <app@example.com>",
        "receiver": "to@example.org",
        "cc": "cc@example.org",
        "bcc": "hidden@example.org",
        "subject": "envelope",
    })
    .to_string();
    let id = service.post("/api/mail", &body).id();
    let status = wait_for_status(service.address, &id, "sent");
    let file = format!("./outbox/{id}.eml");
    let attempt = &status["events"][1];
    assert_eq!(attempt["smtp_code"], 250);
    assert_eq!(attempt["smtp_reply"], format!("written to {file}"));

    let data = std::fs::read_to_string(directory.join("outbox").join(format!("{id}.eml"))).unwrap();
    assert!(
        data.starts_with(
            "X-Envelope-From: <app@example.com>\r\nX-Envelope-To: <to@example.org>,\r\n <cc@example.org>\r\nX-Envelope-Bcc: 1 recipient, not named\r\nFrom: App <app@example.com>\r\n"
        ),
        "{data}"
    );
    let message = mail_parser::MessageParser::default()
        .parse(data.as_bytes())
        .unwrap();
    assert_eq!(message.subject(), Some("envelope"));
    assert_eq!(
        message.cc().unwrap().first().unwrap().address(),
        Some("cc@example.org")
    );
    assert!(message.bcc().is_none(), "no Bcc header");
    // Bcc never appears in a header, the file's included; the status
    // names every recipient.
    assert!(!data.contains("hidden@example.org"), "{data}");
    assert!(status["recipients"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("hidden@example.org")));

    // The log line of the change names the file.
    let deadline = Instant::now() + PATIENCE;
    let expected = format!("message {id}: sent, attempt 1: 250 written to {file}");
    while !service.log_text().contains(&expected) {
        assert!(
            Instant::now() < deadline,
            "no {expected:?} in {}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_body_that_is_not_json_is_told_to_be_json() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for path in ["/api/mail", "/api/mail/v2", "/api/mail/batch"] {
        let reply = request(
            service.address,
            "POST",
            path,
            &form,
            b"sender=a@b.c&subject=x",
        );
        assert_eq!(reply.code, 400, "{path}");
        let message = reply.json()["message"].as_str().unwrap().to_string();
        assert!(
            message.starts_with("malformed JSON: ")
                && message.ends_with(
                    "; the body must be JSON (Content-Type: application/json), and this request says Content-Type: application/x-www-form-urlencoded"
                ),
            "{path}: {message}"
        );
        let json = [("Content-Type", "application/json")];
        let reply = request(service.address, "POST", path, &json, b"{nope");
        let message = reply.json()["message"].as_str().unwrap().to_string();
        assert!(
            message.ends_with("; the body must be JSON (Content-Type: application/json)"),
            "{path}: {message}"
        );
    }
    // A JSON body is taken whatever its Content-Type says (curl -d sends a form's).
    let reply = request(
        service.address,
        "POST",
        "/api/mail",
        &form,
        seed_body("user@example.org", "json anyway").as_bytes(),
    );
    assert_eq!(reply.code, 202, "{}", reply.body_text());
}
