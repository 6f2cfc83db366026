//! Every 202 is deliverable (issue 11): each defect found against a strict
//! relay, as a named test through the real HTTP API and the testkit's
//! strict relay (1,000-octet lines, ASCII unless SMTPUTF8, no bare CR or
//! LF, faults), and a property test that whatever is accepted arrives and
//! parses back to what was sent.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{json, Value};

fn addresses(list: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    list.map(|list| {
        list.iter()
            .filter_map(|address| address.address().map(str::to_string))
            .collect()
    })
    .unwrap_or_default()
}

/// Posts `body`, expects 202, waits for `sent` and the relay's copy.
fn sent_and_received(service: &Service, relay: &TestRelay, body: &Value) -> (Value, Received) {
    let before = relay.messages() as usize;
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let status = service.wait_for_status(&reply.id(), "sent");
    let received = relay.wait_for(before + 1);
    (status, received[before].clone())
}

/// Every line of what the relay recorded ends in CRLF and fits the limit.
fn assert_wire_clean(received: &Received) {
    for line in received.data.split_inclusive(|&byte| byte == b'\n') {
        let line = line.strip_suffix(b"\r\n").expect("CRLF line ends only");
        assert!(line.len() <= 998, "a line of {} octets", line.len());
        assert!(!line.contains(&b'\r') && !line.contains(&0));
    }
}

fn base_body() -> Value {
    json!({"sender": "App <app@example.com>", "receiver": "user@example.org", "subject": "s", "message": "hi"})
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn fifty_addresses_in_to_are_folded_and_all_delivered() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let to: Vec<String> = (0..50)
        .map(|i| format!("person{i:02}@example.org"))
        .collect();
    let mut body = base_body();
    body["receiver"] = json!(to.clone());
    let (status, received) = sent_and_received(&service, &relay, &body);
    assert_eq!(status["last_error"], Value::Null);
    assert_wire_clean(&received);
    assert_eq!(received.recipients, to);
    assert_eq!(addresses(received.parsed().to()), to);
}

#[test]
fn a_995_character_subject_without_spaces_arrives_whole() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let subject = "x".repeat(995);
    let mut body = base_body();
    body["subject"] = json!(subject);
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    assert_eq!(received.parsed().subject(), Some(subject.as_str()));
}

#[test]
fn a_1200_character_display_name_arrives_whole() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let name = "N".repeat(1200);
    let mut body = base_body();
    body["sender"] = json!(format!("{name} <app@example.com>"));
    body["cc"] = json!([format!(
        "{} <copy@example.org>",
        "Long Name ".repeat(120).trim_end()
    )]);
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    let message = received.parsed();
    let from = message.from().unwrap().first().unwrap();
    assert_eq!(from.name(), Some(name.as_str()));
    assert_eq!(from.address(), Some("app@example.com"));
    let copy = message.cc().unwrap().first().unwrap();
    assert_eq!(copy.name(), Some("Long Name ".repeat(120).trim_end()));
}

#[test]
fn a_long_custom_header_value_without_spaces_arrives_whole() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let value = "v".repeat(3000);
    let mut body = base_body();
    body["headers"] = json!({"X-Long": value});
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    let parser =
        MessageParser::default().header_text(mail_parser::HeaderName::Other("X-Long".into()));
    let message = parser.parse(&received.data[..]).unwrap();
    assert_eq!(
        message.header("X-Long").and_then(|value| value.as_text()),
        Some(value.as_str())
    );
}

#[test]
fn ten_thousand_recipients_are_delivered() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let to: Vec<String> = (0..10_000).map(|i| format!("u{i}@example.org")).collect();
    let mut body = base_body();
    body["to"] = json!(to.clone());
    body["receiver"] = Value::Null;
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    assert_eq!(received.recipients.len(), 10_000);
    assert_eq!(addresses(received.parsed().to()), to);
}

#[test]
fn an_idn_domain_goes_out_as_punycode() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut body = base_body();
    body["receiver"] = json!("Bücherwurm <user@bücher.de>");
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_eq!(received.recipients, vec!["user@xn--bcher-kva.de"]);
    assert!(!received.smtputf8);
    assert!(received.data.is_ascii());
    let message = received.parsed();
    let to = message.to().unwrap().first().unwrap();
    assert_eq!(to.address(), Some("user@xn--bcher-kva.de"));
    assert_eq!(to.name(), Some("Bücherwurm"));
}

#[test]
fn a_non_ascii_local_part_goes_with_smtputf8_when_offered() {
    let relay = TestRelay::with(RelayOptions {
        smtputf8: true,
        eightbitmime: true,
        ..RelayOptions::default()
    });
    let service = Service::start(config_for(&relay));
    let mut body = base_body();
    body["receiver"] = json!("Jörg <jörg@bücher.de>");
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert!(received.smtputf8, "SMTPUTF8 given on MAIL FROM");
    assert_eq!(received.recipients, vec!["jörg@xn--bcher-kva.de"]);
    let to = received.parsed().to().unwrap().first().unwrap().clone();
    assert_eq!(to.address(), Some("jörg@xn--bcher-kva.de"));
}

#[test]
fn a_non_ascii_local_part_without_smtputf8_is_refused_clearly() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut body = base_body();
    body["receiver"] = json!("jörg@example.com");
    // Nothing is known about the relay yet: accepted, then failed with a
    // reason, without retries and without reaching the relay's RCPT.
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let status = service.wait_for_status(&reply.id(), "failed");
    assert_eq!(status["attempts"], 1);
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains("SMTPUTF8") && error.contains("jörg@example.com"),
        "{error}"
    );
    // Now the relay's capabilities are known: refused at submit time.
    for path in ["/api/mail", "/api/mail/v2"] {
        let reply = service.post(path, &body.to_string());
        assert_eq!(reply.code, 400, "{path}: {}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(error.contains("SMTPUTF8"), "{error}");
    }
    assert!(relay.received().is_empty());
}

#[test]
fn a_message_over_the_relays_size_limit_is_refused_clearly() {
    let relay = TestRelay::with(RelayOptions {
        max_size: Some(4000),
        ..RelayOptions::default()
    });
    let service = Service::start(config_for(&relay));
    let mut big = base_body();
    big["message"] = json!("line of text\n".repeat(400));
    // Nothing is known about the relay yet: accepted, then failed without
    // retries, the body never sent; the relay's limit named.
    let reply = service.post("/api/mail", &big.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let status = service.wait_for_status(&reply.id(), "failed");
    assert_eq!(status["attempts"], 1);
    let error = status["last_error"].as_str().unwrap().to_string();
    assert!(error.contains("SIZE") && error.contains("4000"), "{error}");
    // A message within the limit goes (with SIZE= on MAIL FROM, which the
    // relay checks too).
    let (_, received) = sent_and_received(&service, &relay, &base_body());
    assert!(received.data.len() < 4000);
    // Now the limit is known: refused at submit time.
    for path in ["/api/mail", "/api/mail/v2"] {
        let reply = service.post(path, &big.to_string());
        assert_eq!(reply.code, 400, "{path}: {}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(
            error.contains("SIZE limit") && error.contains("4000"),
            "{error}"
        );
    }
    assert_eq!(relay.received().len(), 1);
}

#[test]
fn a_non_ascii_sender_domain_gives_a_valid_message_id() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut body = base_body();
    body["sender"] = json!("Verlag <info@bücher.de>");
    let (status, received) = sent_and_received(&service, &relay, &body);
    assert_eq!(received.from, "info@xn--bcher-kva.de");
    let message = received.parsed();
    let id = status["id"].as_str().unwrap();
    assert_eq!(
        message.message_id(),
        Some(format!("{id}@xn--bcher-kva.de").as_str())
    );
    let raw = String::from_utf8_lossy(&received.data);
    assert!(
        raw.contains(&format!("\r\nMessage-ID: <{id}@xn--bcher-kva.de>\r\n")),
        "{raw}"
    );
}

#[test]
fn an_smtp_smuggling_shape_in_the_body_does_not_reach_the_wire() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut body = base_body();
    body["message"] =
        json!("hi\r.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nowned\r\n.\r\n");
    let (status, received) = sent_and_received(&service, &relay, &body);
    assert_eq!(status["last_error"], Value::Null);
    assert_wire_clean(&received);
    // One transaction from the real sender; the rest is body text.
    assert_eq!(relay.received().len(), 1);
    assert_eq!(received.from, "app@example.com");
    assert_eq!(received.recipients, vec!["user@example.org"]);
    let text = received
        .parsed()
        .body_text(0)
        .unwrap()
        .replace("\r\n", "\n");
    assert!(
        text.starts_with(
            "hi\n.\nMAIL FROM:<evil@example.net>\nRCPT TO:<victim@example.net>\nDATA\nowned\n.\n"
        ),
        "{text:?}"
    );
}

#[test]
fn a_text_attachment_with_bare_line_feeds_arrives_byte_for_byte() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let files: [&[u8]; 3] = [b"a\n.\nb", b"a\r\n.\r\nb\r\n", b"\r\rx\n\r\n.."];
    let mut body = base_body();
    body["attachments"] = json!(files
        .iter()
        .enumerate()
        .map(|(index, file)| json!({"filename": format!("{index}.txt"), "content_type": "text/plain", "content": b64(file)}))
        .collect::<Vec<_>>());
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    let message = received.parsed();
    assert_eq!(message.attachment_count(), 3);
    for (index, file) in files.iter().enumerate() {
        assert_eq!(
            message.attachment(index as u32).unwrap().contents(),
            *file,
            "attachment {index}"
        );
    }
}

#[test]
fn nul_and_control_characters_in_a_body_are_encoded() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let text = "before\0after \u{1}\u{7f} tab\tend";
    let mut body = base_body();
    body["message"] = json!(text);
    let (_, received) = sent_and_received(&service, &relay, &body);
    assert_wire_clean(&received);
    assert_eq!(received.parsed().body_text(0).unwrap().trim_end(), text);
}

#[test]
fn a_relay_taking_100_recipients_per_transaction_gets_all_250() {
    let relay = TestRelay::plain();
    relay.limit_recipients(Some(100));
    let service = Service::start(config_for(&relay));
    let to: Vec<String> = (0..250).map(|i| format!("r{i:03}@example.org")).collect();
    let mut body = base_body();
    body["to"] = json!(to.clone());
    body["receiver"] = Value::Null;
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let status = service.wait_for_status(&reply.id(), "sent");
    assert_eq!(status["attempts"], 1);
    assert_eq!(status["last_error"], Value::Null);
    let received = relay.wait_for(3);
    let sizes: Vec<usize> = received.iter().map(|r| r.recipients.len()).collect();
    assert_eq!(sizes, vec![100, 100, 50], "three transactions");
    assert!(
        received
            .iter()
            .all(|r| r.connection == received[0].connection),
        "on one connection"
    );
    let mut all: Vec<String> = received.iter().flat_map(|r| r.recipients.clone()).collect();
    all.sort();
    assert_eq!(all, to);
    assert!(received.windows(2).all(|pair| pair[0].data == pair[1].data));
}

#[test]
fn a_trickling_greeting_frees_the_worker_at_the_smtp_timeout() {
    let relay = TestRelay::plain();
    // A 60-odd byte greeting at one byte a second: a minute without a deadline.
    relay.trickle_greeting(Some(Duration::from_secs(1)));
    let mut config = config_for(&relay);
    config.workers = 1;
    if let mailroom::config::Relay::Smtp(settings) = &mut config.relay {
        settings.timeout = Duration::from_millis(3_000);
    }
    config.retry_base = Duration::from_millis(500);
    config.retry_max = Duration::from_millis(500);
    let service = Service::start(config);
    let started = Instant::now();
    let first = service
        .post("/api/mail", &seed_body("user@example.org", "first"))
        .id();
    let status = service.wait_for_status(&first, "retrying");
    let freed = started.elapsed();
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains("timed out") && error.contains("3000 ms"),
        "{error}"
    );
    println!("the only worker was free again after {freed:?} (MAILROOM_SMTP_TIMEOUT_MS=3000)");
    // The relay greets normally again: the same worker delivers both.
    relay.trickle_greeting(None);
    let second = service
        .post("/api/mail", &seed_body("user@example.org", "second"))
        .id();
    service.wait_for_status(&second, "sent");
    let sent = service.wait_for_status(&first, "sent");
    assert!(sent["attempts"].as_u64().unwrap() >= 2);
    assert_eq!(relay.wait_for(2).len(), 2);
}

#[test]
fn a_stalled_end_of_data_frees_the_worker_at_the_smtp_timeout() {
    let relay = TestRelay::plain();
    relay.stall(true);
    let mut config = config_for(&relay);
    config.workers = 1;
    if let mailroom::config::Relay::Smtp(settings) = &mut config.relay {
        settings.timeout = Duration::from_millis(1_000);
    }
    let service = Service::start(config);
    let id = service
        .post("/api/mail", &seed_body("user@example.org", "stalled"))
        .id();
    let status = service.wait_for_status(&id, "retrying");
    assert!(status["last_error"].as_str().unwrap().contains("timed out"));
    relay.stall(false);
    service.wait_for_status(&id, "sent");
}

#[test]
fn connections_closed_while_idle_or_421_on_reuse_are_not_attempts() {
    for behaviour in [AfterMessage::Close, AfterMessage::Reply421] {
        let relay = TestRelay::plain();
        relay.after_message(behaviour);
        let mut config = config_for(&relay);
        config.workers = 1;
        let service = Service::start(config);
        for index in 0..3 {
            let status = service.send_and_wait("user@example.org", &format!("m{index}"));
            assert_eq!(status["attempts"], 1, "{behaviour:?}: {status}");
        }
        assert_eq!(relay.wait_for(3).len(), 3);
        assert_eq!(
            relay.connections(),
            3,
            "{behaviour:?}: a fresh connection each"
        );
        let metrics = service.get("/metrics").body_text();
        assert!(
            !metrics.contains("mailroom_delivery_attempts_total{result=\"transient\"} 1"),
            "{metrics}"
        );
    }
}

#[test]
fn implicit_tls_and_starttls_relays_take_messages() {
    for security in [Security::Implicit, Security::StartTls] {
        let relay = TestRelay::with(RelayOptions {
            security,
            login: Login::Only {
                user: "mailer".into(),
                password: "secret".into(),
            },
            ..RelayOptions::default()
        });
        let service = Service::start(config_for(&relay));
        let (_, received) = sent_and_received(&service, &relay, &base_body());
        assert_eq!(received.recipients, vec!["user@example.org"]);
    }
}

#[test]
fn an_unknown_top_level_field_is_refused_naming_it_and_the_valid_ones() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let body =
        r#"{"sender":"app@example.com","receiver":"u@example.org","subject":"x","text":"hi"}"#;
    for path in ["/api/mail", "/api/mail/v2"] {
        let reply = service.post(path, body);
        assert_eq!(reply.code, 400, "{}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(error.contains("`text`"), "{error}");
        for field in [
            "sender",
            "receiver",
            "subject",
            "message",
            "to",
            "cc",
            "bcc",
            "html",
            "reply_to",
            "headers",
            "attachments",
            "tags",
            "metadata",
            "template",
            "data",
            "send_at",
        ] {
            assert!(error.contains(field), "{error} should list {field}");
        }
    }
    assert_eq!(relay.connections(), 0);
}

#[test]
fn headers_set_by_relays_are_refused() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    for name in ["Return-Path", "Received", "return-path"] {
        let mut body = base_body();
        body["headers"] = json!({ name: "<bounce@example.com>" });
        let reply = service.post("/api/mail", &body.to_string());
        assert_eq!(reply.code, 400, "{name}: {}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(error.contains(name), "{error}");
    }
    assert_eq!(relay.connections(), 0);
}

#[test]
fn address_headers_in_headers_are_validated_and_encoded() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    for (name, value) in [
        ("Reply-To", "not an address"),
        ("Reply-To", "a@example.com, nonsense"),
        ("Sender", "a@example.com, b@example.com"),
    ] {
        let mut body = base_body();
        body["headers"] = json!({ name: value });
        let reply = service.post("/api/mail", &body.to_string());
        assert_eq!(reply.code, 400, "{name}: {value}: {}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(error.contains(name), "{error}");
    }
    let mut body = base_body();
    body["headers"] = json!({"Reply-To": "Zoë Café <help@bücher.de>, other@example.org"});
    let (_, received) = sent_and_received(&service, &relay, &body);
    let message = received.parsed();
    assert_eq!(
        addresses(message.reply_to()),
        vec!["help@xn--bcher-kva.de", "other@example.org"]
    );
    assert_eq!(
        message.reply_to().unwrap().first().unwrap().name(),
        Some("Zoë Café")
    );
}

mod round_trip {
    //! Whatever gets a 202 arrives at the strict relay and parses back to
    //! what was sent.
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestRunner};

    /// Domains with their IDNA form.
    const DOMAINS: &[(&str, &str)] = &[
        ("example.org", "example.org"),
        ("mail.example.com", "mail.example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("münchen.example", "xn--mnchen-3ya.example"),
    ];

    #[derive(Debug, Clone)]
    struct Person {
        name: Option<String>,
        local: String,
        domain: usize,
    }

    impl Person {
        fn request_form(&self) -> String {
            let address = format!("{}@{}", self.local, DOMAINS[self.domain].0);
            match &self.name {
                Some(name) => format!("\"{name}\" <{address}>"),
                None => address,
            }
        }

        fn wire_address(&self) -> String {
            format!("{}@{}", self.local, DOMAINS[self.domain].1)
        }
    }

    #[derive(Debug, Clone)]
    struct Case {
        subject: String,
        sender: Person,
        to: Vec<Person>,
        cc: Vec<Person>,
        bcc: Vec<Person>,
        text: String,
        attachments: Vec<(String, &'static str, Vec<u8>)>,
    }

    fn name() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            2 => Just(None),
            3 => "[A-Za-z][A-Za-z0-9 .'äöüßé✓日本-]{0,40}[A-Za-z0-9äöü日]".prop_map(Some),
            1 => "[a-z]{100,1300}".prop_map(Some),
        ]
        // Names as clients write them: no doubled spaces to be read back.
        .prop_map(|name| name.map(|name| name.split_whitespace().collect::<Vec<_>>().join(" ")))
    }

    fn person() -> impl Strategy<Value = Person> {
        (name(), "[a-z0-9][a-z0-9_+-]{0,15}", 0..DOMAINS.len()).prop_map(|(name, local, domain)| {
            Person {
                name,
                local,
                domain,
            }
        })
    }

    fn subject() -> impl Strategy<Value = String> {
        prop_oneof![
            "[^\r\n]{0,120}",
            "[a-zA-Z0-9]{900,1200}",
            "( ?[a-zA-Zäöü✓日本=?_]{1,30}){1,80}",
            "[\\PC&&[^\r\n]]{1,300}",
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[a-zA-Z ]{1,80}",
            1 => "[äöüß✓日本語]{1,20}",
            2 => prop_oneof![Just("\n"), Just("\r\n"), Just("\r")].prop_map(str::to_string),
            1 => prop_oneof![Just("\0"), Just("\u{1}"), Just("\t"), Just("\u{b}"), Just("\u{c}"), Just("\u{7f}"), Just("."), Just("\n.\n"), Just("=")].prop_map(str::to_string),
            1 => "[x]{990,1100}",
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    fn attachment() -> impl Strategy<Value = (String, &'static str, Vec<u8>)> {
        let bytes = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..3000),
            "[a-z\r\n.]{0,200}".prop_map(String::into_bytes),
        ];
        (
            "[A-Za-z0-9äöü✓ _.-]{1,80}",
            prop_oneof![
                Just("application/octet-stream"),
                Just("text/plain"),
                Just("text/csv; charset=utf-8"),
                Just("image/png")
            ],
            bytes,
        )
            .prop_filter("a file name with something visible", |(name, _, _)| {
                !name.trim().is_empty()
            })
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            subject(),
            person(),
            proptest::collection::vec(person(), 1..300),
            proptest::collection::vec(person(), 0..5),
            proptest::collection::vec(person(), 0..3),
            text(),
            proptest::collection::vec(attachment(), 0..3),
        )
            .prop_map(|(subject, sender, to, cc, bcc, text, attachments)| Case {
                subject,
                sender,
                to,
                cc,
                bcc,
                text,
                attachments,
            })
    }

    /// An attachment's bytes as a mail client saves them: mail-parser
    /// turns `text/*` parts into UTF-8 text, so base64 parts are decoded
    /// from the raw message here.
    fn file_bytes(data: &[u8], part: &mail_parser::MessagePart<'_>) -> Vec<u8> {
        if part.encoding != mail_parser::Encoding::Base64 {
            return part.contents().to_vec();
        }
        let raw: Vec<u8> = data[part.offset_body as usize..part.offset_end as usize]
            .iter()
            .copied()
            .filter(|byte| !byte.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .expect("base64 body")
    }

    fn normalise(text: &str) -> String {
        text.replace("\r\n", "\n")
            .replace('\r', "\n")
            .trim_end_matches('\n')
            .to_string()
    }

    fn check(service: &Service, relay: &TestRelay, case: &Case) -> Result<(), TestCaseError> {
        let body = json!({
            "sender": case.sender.request_form(),
            "receiver": case.to.iter().map(Person::request_form).collect::<Vec<_>>(),
            "cc": case.cc.iter().map(Person::request_form).collect::<Vec<_>>(),
            "bcc": case.bcc.iter().map(Person::request_form).collect::<Vec<_>>(),
            "subject": case.subject,
            "message": case.text,
            "attachments": case.attachments.iter().map(|(filename, content_type, bytes)| json!({
                "filename": filename, "content_type": content_type, "content": b64(bytes),
            })).collect::<Vec<_>>(),
        });
        let before = relay.messages() as usize;
        let reply = service.post("/api/mail", &body.to_string());
        // Every generated request is valid: it must be accepted.
        prop_assert_eq!(reply.code, 202, "{}", reply.body_text());
        let status = service.wait_for_status(&reply.id(), "sent");
        prop_assert_eq!(&status["last_error"], &Value::Null);
        let received = relay.wait_for(before + 1)[before].clone();
        assert_wire_clean(&received);
        let message = received.parsed();

        prop_assert_eq!(message.subject().unwrap_or(""), case.subject.as_str());
        let sender = message.from().and_then(|from| from.first());
        let sender_address = case.sender.wire_address();
        prop_assert_eq!(
            sender.and_then(|from| from.address()),
            Some(sender_address.as_str())
        );
        prop_assert_eq!(
            sender.and_then(|from| from.name()),
            case.sender.name.as_deref()
        );
        for (header, people) in [(message.to(), &case.to), (message.cc(), &case.cc)] {
            let got: Vec<(Option<String>, Option<String>)> = header
                .map(|list| {
                    list.iter()
                        .map(|a| {
                            (
                                a.name().map(str::to_string),
                                a.address().map(str::to_string),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let expected: Vec<(Option<String>, Option<String>)> = people
                .iter()
                .map(|p| (p.name.clone(), Some(p.wire_address())))
                .collect();
            prop_assert_eq!(got, expected);
        }
        let mut envelope: Vec<String> = Vec::new();
        for person in case.to.iter().chain(&case.cc).chain(&case.bcc) {
            let address = person.wire_address();
            if !envelope
                .iter()
                .any(|known| known.eq_ignore_ascii_case(&address))
            {
                envelope.push(address);
            }
        }
        prop_assert_eq!(&received.recipients, &envelope);
        prop_assert!(message.bcc().is_none());

        let text = message
            .body_text(0)
            .map(|text| text.to_string())
            .unwrap_or_default();
        prop_assert_eq!(normalise(&text), normalise(&case.text));
        prop_assert_eq!(message.attachment_count(), case.attachments.len());
        for (index, (filename, _, bytes)) in case.attachments.iter().enumerate() {
            let part = message.attachment(index as u32).unwrap();
            prop_assert_eq!(part.attachment_name(), Some(filename.as_str()));
            prop_assert_eq!(file_bytes(&received.data, part), bytes.clone());
        }
        Ok(())
    }

    #[test]
    fn whatever_is_accepted_arrives_as_sent() {
        let relay = TestRelay::plain();
        let service = Service::start(config_for(&relay));
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(48);
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let result = runner.run(&case(), |case| check(&service, &relay, &case));
        if let Err(error) = result {
            panic!("{error}");
        }
    }
}
