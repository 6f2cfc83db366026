//! Real-world messages: recipient lists, HTML, attachments, custom headers,
//! idempotency and sender rules. Each message is checked as a mail client
//! would show it, by parsing what the SMTP server received.

mod common;

use base64::Engine as _;
use common::*;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use mailroom::config::SenderRule;
use serde_json::json;

fn addresses(list: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    list.map(|list| {
        list.iter()
            .filter_map(|address| address.address().map(str::to_string))
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn recipients_fill_headers_and_envelope_and_bcc_stays_hidden() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let body = json!({
        "sender": "App <app@example.com>",
        "receiver": ["first@example.org", "Second Person <second@example.org>"],
        "to": ["third@example.org"],
        "cc": ["copy@example.org", "FIRST@example.org"],
        "bcc": ["hidden@example.net"],
        "subject": "Everyone",
        "message": "hi all",
    });
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let received = relay.wait_for(1);
    let mut envelope = received[0].recipients.clone();
    envelope.sort();
    assert_eq!(
        envelope,
        vec![
            "copy@example.org",
            "first@example.org",
            "hidden@example.net",
            "second@example.org",
            "third@example.org"
        ],
        "every recipient exactly once in the envelope"
    );
    let message = received[0].parsed();
    assert_eq!(
        addresses(message.to()),
        vec![
            "first@example.org",
            "second@example.org",
            "third@example.org"
        ]
    );
    assert_eq!(
        addresses(message.cc()),
        vec!["copy@example.org", "FIRST@example.org"]
    );
    assert!(message.bcc().is_none());
    let raw = String::from_utf8_lossy(&received[0].data).to_ascii_lowercase();
    assert!(
        !raw.contains("bcc:") && !raw.contains("hidden@example.net"),
        "Bcc leaked: {raw}"
    );
}

#[test]
fn text_and_html_make_multipart_alternative() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let body = json!({
        "sender": "app@example.com", "receiver": "u@example.org", "subject": "both",
        "message": "plain version", "html": "<p>HTML <b>version</b> ✓</p>",
    });
    assert_eq!(service.post("/api/mail", &body.to_string()).code, 202);
    let html_only = json!({
        "sender": "app@example.com", "receiver": "u@example.org", "subject": "html only",
        "html": "<p>only html</p>",
    });
    assert_eq!(service.post("/api/mail", &html_only.to_string()).code, 202);

    let received = relay.wait_for(2);
    let both = received
        .iter()
        .find(|message| message.parsed().subject() == Some("both"))
        .unwrap();
    let message = both.parsed();
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("multipart", Some("alternative"))
    );
    let leaves: Vec<(String, String)> = message
        .parts
        .iter()
        .filter_map(|part| {
            let kind = part.content_type()?;
            let text = match &part.body {
                PartType::Text(text) | PartType::Html(text) => text.to_string(),
                _ => return None,
            };
            Some((
                format!("{}/{}", kind.ctype(), kind.subtype().unwrap_or("")),
                text,
            ))
        })
        .collect();
    assert_eq!(leaves.len(), 2, "{leaves:?}");
    assert_eq!(leaves[0].0, "text/plain", "text first");
    assert_eq!(leaves[0].1.trim_end(), "plain version");
    assert_eq!(leaves[1].0, "text/html", "html second");
    assert!(leaves[1].1.contains("<b>version</b> ✓"));

    let html = received
        .iter()
        .find(|message| message.parsed().subject() == Some("html only"))
        .unwrap();
    let message = html.parsed();
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("text", Some("html"))
    );
    assert!(message.body_html(0).unwrap().contains("only html"));
}

fn pseudo_random_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn attachments_arrive_byte_for_byte_with_utf8_names() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let file = pseudo_random_bytes(200 * 1024);
    let body = json!({
        "sender": "app@example.com", "receiver": "u@example.org",
        "subject": "Rechnung für März ✓",
        "message": "see attached",
        "attachments": [
            {"filename": "Übersicht résumé ✓.bin", "content_type": "application/octet-stream",
             "content": base64::engine::general_purpose::STANDARD.encode(&file)},
            {"filename": "notes.txt", "content_type": "text/plain; charset=utf-8",
             "content": base64::engine::general_purpose::STANDARD.encode("hello ✓".as_bytes())},
        ],
    });
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let received = relay.wait_for(1);
    let message = received[0].parsed();
    assert_eq!(message.subject(), Some("Rechnung für März ✓"));
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("multipart", Some("mixed"))
    );
    assert_eq!(message.attachment_count(), 2);
    let binary = message.attachment(0).unwrap();
    assert_eq!(binary.attachment_name(), Some("Übersicht résumé ✓.bin"));
    assert_eq!(binary.contents(), &file[..], "attachment bytes identical");
    let text = message.attachment(1).unwrap();
    assert_eq!(text.attachment_name(), Some("notes.txt"));
    assert_eq!(text.contents(), "hello ✓".as_bytes());
    assert_eq!(message.body_text(0).unwrap().trim_end(), "see attached");
}

#[test]
fn reply_to_and_custom_headers_arrive() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let body = json!({
        "sender": "app@example.com", "receiver": "u@example.org", "subject": "headers",
        "reply_to": "Support <support@example.com>",
        "headers": {"X-Campaign": "winter-2026", "X-Note": "Grüße ✓", "List-Unsubscribe": "<mailto:unsub@example.com>"},
    });
    assert_eq!(service.post("/api/mail", &body.to_string()).code, 202);
    let received = relay.wait_for(1);
    let message = received[0].parsed();
    assert_eq!(addresses(message.reply_to()), vec!["support@example.com"]);
    assert_eq!(
        message
            .header("X-Campaign")
            .and_then(|value| value.as_text()),
        Some("winter-2026")
    );
    // Custom headers are kept raw by default; decode this one as text (RFC 2047).
    let decoding =
        MessageParser::default().header_text(mail_parser::HeaderName::Other("X-Note".into()));
    let decoded = decoding.parse(&received[0].data[..]).unwrap();
    assert_eq!(
        decoded.header("X-Note").and_then(|value| value.as_text()),
        Some("Grüße ✓")
    );
    assert!(message.header("List-Unsubscribe").is_some());
}

#[test]
fn malformed_features_are_refused_naming_the_problem() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let base = || json!({"sender": "app@example.com", "receiver": "u@example.org", "subject": "x"});
    let with = |key: &str, value: serde_json::Value| {
        let mut body = base();
        body[key] = value;
        body.to_string()
    };
    let cases = [
        (
            with(
                "attachments",
                json!([{"filename": "a.bin", "content_type": "application/pdf", "content": "!!not base64!!"}]),
            ),
            "attachments[0]",
        ),
        (
            with(
                "attachments",
                json!([{"filename": "a", "content": "aGk="}, {"content_type": "text/plain", "content": "aGk="}]),
            ),
            "attachments[1]",
        ),
        (
            with(
                "attachments",
                json!([{"filename": "a", "content_type": "no slash here", "content": "aGk="}]),
            ),
            "attachments[0]",
        ),
        (
            with(
                "attachments",
                json!([{"filename": "a\r\nX: y", "content_type": "text/plain", "content": "aGk="}]),
            ),
            "attachments[0]",
        ),
        (with("attachments", json!({"filename": "a"})), "attachments"),
        (with("headers", json!({"Subject": "override"})), "Subject"),
        (
            with("headers", json!({"content-type": "text/evil"})),
            "content-type",
        ),
        (with("headers", json!({"Bad Name": "v"})), "Bad Name"),
        (with("headers", json!({"X-Ok": "line\nX-Evil: 1"})), "X-Ok"),
        (with("headers", json!({"X-Num": 5})), "X-Num"),
        (with("to", json!(5)), "to"),
        (with("cc", json!([5])), "cc"),
        (with("cc", json!(["bad address"])), "cc[0]"),
        (with("bcc", json!(["ok@example.org", "also bad"])), "bcc[1]"),
        (with("reply_to", json!("nope")), "reply_to"),
        (with("html", json!(12)), "html"),
    ];
    for (body, named) in cases {
        let reply = service.post("/api/mail", &body);
        assert_eq!(reply.code, 400, "{body} → {}", reply.body_text());
        let error = reply.json()["data"]["error"].as_str().unwrap().to_string();
        assert!(
            error.contains(named),
            "{body}: error should name {named}: {error}"
        );
    }
    assert_eq!(relay.connections(), 0);
}

#[test]
fn partial_recipient_refusal_delivers_to_the_rest() {
    let relay = TestRelay::plain();
    relay.refuse_recipient("gone@example.org", 550, "No such mailbox");
    let service = Service::start(config_for(&relay));
    let body = json!({
        "sender": "app@example.com", "receiver": ["ok@example.org", "gone@example.org"], "subject": "partial",
    });
    let id = service.post("/api/mail", &body.to_string()).id();
    let status = service.wait_for_status(&id, "sent");
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains("gone@example.org") && error.contains("550"),
        "{error}"
    );
    assert!(!error.contains("ok@example.org"), "{error}");
    let received = relay.wait_for(1);
    assert_eq!(received[0].recipients, vec!["ok@example.org"]);

    relay.refuse_recipient("also-gone@example.org", 550, "No such mailbox");
    let body = json!({
        "sender": "app@example.com", "receiver": ["gone@example.org", "also-gone@example.org"], "subject": "none left",
    });
    let id = service.post("/api/mail", &body.to_string()).id();
    let status = service.wait_for_status(&id, "failed");
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains("gone@example.org") && error.contains("also-gone@example.org"),
        "{error}"
    );
    assert_eq!(status["attempts"], 1);
}

#[test]
fn idempotency_key_queues_once() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let post = |key: &str, subject: &str| {
        request(
            service.address,
            "POST",
            "/api/mail",
            &[("Idempotency-Key", key)],
            seed_body("u@example.org", subject).as_bytes(),
        )
    };
    let first = post("order-42-shipped", "shipped");
    assert_eq!(first.code, 202);
    let repeat = post("order-42-shipped", "shipped");
    assert_eq!(repeat.code, 202);
    assert_eq!(repeat.id(), first.id(), "same id for the repeat");
    service.wait_for_status(&first.id(), "sent");
    let again = post("order-42-shipped", "shipped");
    assert_eq!(again.id(), first.id(), "still the same after delivery");
    let other = post("order-43-shipped", "shipped");
    assert_ne!(other.id(), first.id());
    service.wait_for_status(&other.id(), "sent");
    assert_eq!(relay.received().len(), 2, "the repeats queued nothing");

    let long_key = "k".repeat(256);
    assert_eq!(post(&long_key, "too long").code, 400);
    assert_eq!(post(&"k".repeat(255), "just fits").code, 202);
}

#[test]
fn only_allowed_senders_may_send() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.allowed_senders = Some(vec![
        SenderRule::Address("alerts@example.com".into()),
        SenderRule::Domain("billing.example.com".into()),
    ]);
    let service = Service::start(config);
    let body = |sender: &str| {
        json!({"sender": sender, "receiver": "u@example.org", "subject": "x"}).to_string()
    };
    let reply = service.post("/api/mail", &body("intruder@evil.example"));
    assert_eq!(reply.code, 400);
    assert!(reply.json()["data"]["error"]
        .as_str()
        .unwrap()
        .contains("sender"));
    assert_eq!(
        service
            .post("/api/mail/v2", &body("intruder@evil.example"))
            .code,
        400
    );
    assert_eq!(
        service
            .post("/api/mail", &body("Alerts <ALERTS@example.com>"))
            .code,
        202
    );
    assert_eq!(
        service
            .post("/api/mail", &body("invoices@billing.example.com"))
            .code,
        202
    );
    assert_eq!(
        service
            .post("/api/mail", &body("x@sub.billing.example.com"))
            .code,
        400
    );
    relay.wait_for(2);
}

#[test]
fn parser_sanity_for_raw_bytes() {
    // Guards the helpers above: a hand-written message parses as expected.
    let raw = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n";
    let message = MessageParser::default().parse(&raw[..]).unwrap();
    assert_eq!(message.subject(), Some("s"));
}
