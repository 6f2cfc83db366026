//! Composing over real HTTP against a real SMTP server: templates (render,
//! missing variables, preview, reload, a broken set), batches (per-item
//! answers, kill -9 right after the answer), scheduled sends (not before,
//! soon after, cancelled across a restart) and tags.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

fn write_template(directory: &Path, name: &str, subject: &str, text: &str, html: Option<&str>) {
    let folder = directory.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("subject.txt"), subject).unwrap();
    std::fs::write(folder.join("text.txt"), text).unwrap();
    match html {
        Some(html) => std::fs::write(folder.join("html.html"), html).unwrap(),
        None => {
            let _ = std::fs::remove_file(folder.join("html.html"));
        }
    }
}

fn service_with_templates(relay: &TestRelay, templates: &Path) -> Service {
    let mut config = config_for(relay);
    config.templates_dir = templates.to_path_buf();
    Service::start(config)
}

fn send(service: &Service, method: &str, path: &str, body: &str) -> HttpReply {
    request(service.address, method, path, &[], body.as_bytes())
}

fn text_part(received: &Received) -> String {
    received
        .parsed()
        .body_text(0)
        .map(|text| text.into_owned())
        .unwrap_or_default()
}

fn html_part(received: &Received) -> String {
    received
        .parsed()
        .body_html(0)
        .map(|html| html.into_owned())
        .unwrap_or_default()
}

#[test]
fn a_template_renders_text_as_is_and_escapes_html() {
    let relay = TestRelay::plain();
    let templates = temp_dir("templates-render");
    write_template(
        &templates,
        "receipt",
        "Receipt for {{ name }}",
        "Hello {{ name }}, you paid {{ amount }}.",
        Some("<p>Hello {{ name }}, you paid {{ amount }}.</p>"),
    );
    let service = service_with_templates(&relay, &templates);
    let body = json!({
        "sender": "shop@example.com",
        "receiver": "buyer@example.org",
        "template": "receipt",
        "data": {"name": "Tom & <Jerry>", "amount": "€ 12"},
        "tags": ["receipt"],
        "metadata": {"order": "42"},
    });
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    let id = reply.id();
    let arrived = relay.wait_for(1).pop().unwrap();
    let parsed = arrived.parsed();
    assert_eq!(parsed.subject(), Some("Receipt for Tom & <Jerry>"));
    assert!(text_part(&arrived).contains("Hello Tom & <Jerry>, you paid € 12."));
    let html = html_part(&arrived);
    assert!(
        html.contains("Hello Tom &amp; &lt;Jerry&gt;, you paid € 12."),
        "{html}"
    );
    // Tags and metadata stay with the status, never in the email.
    let raw = String::from_utf8_lossy(&arrived.data).to_string();
    assert!(
        !raw.contains("receipt\"") && !raw.contains("order"),
        "{raw}"
    );
    let status = service.wait_for_status(&id, "sent");
    assert_eq!(status["tags"], json!(["receipt"]));
    assert_eq!(status["metadata"], json!({"order": "42"}));
    let listed = service.get("/api/mail?tag=receipt").json();
    assert_eq!(listed["data"]["messages"][0]["id"], id.as_str());
}

#[test]
fn template_mistakes_are_400s_that_name_what_is_wrong() {
    let relay = TestRelay::plain();
    let templates = temp_dir("templates-mistakes");
    write_template(
        &templates,
        "welcome",
        "Welcome {{ name }}",
        "Open {{ link }}",
        None,
    );
    let service = service_with_templates(&relay, &templates);
    for (body, named) in [
        (
            json!({"sender": "a@example.com", "receiver": "b@example.org", "template": "welcome", "data": {"name": "Zoë"}}),
            "link",
        ),
        (
            json!({"sender": "a@example.com", "receiver": "b@example.org", "template": "nope", "data": {}}),
            "nope",
        ),
        (
            json!({"sender": "a@example.com", "receiver": "b@example.org", "template": "welcome", "subject": "x", "data": {"name": "a", "link": "b"}}),
            "subject",
        ),
        (
            json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": "x", "data": {"name": "a"}}),
            "template",
        ),
        (
            json!({"sender": "a@example.com", "receiver": "b@example.org", "template": "welcome", "data": {"name": "a\r\nBcc: x@y.z", "link": "b"}}),
            "line break",
        ),
    ] {
        let reply = service.post("/api/mail", &body.to_string());
        assert_eq!(reply.code, 400, "{body}: {}", reply.body_text());
        assert!(
            reply.body_text().contains(named),
            "{body}: the answer names {named}: {}",
            reply.body_text()
        );
    }
    assert_eq!(relay.connections(), 0, "nothing was sent");
}

#[test]
fn templates_are_listed_previewed_and_reloaded_without_sending() {
    let relay = TestRelay::plain();
    let templates = temp_dir("templates-reload");
    write_template(&templates, "note", "Note {{ n }}", "v1 {{ n }}", None);
    let service = service_with_templates(&relay, &templates);
    let list = service.get("/api/templates").json();
    assert_eq!(
        list["data"]["templates"],
        json!([{"name": "note", "variables": ["n"]}])
    );
    let preview = send(
        &service,
        "POST",
        "/api/templates/note/preview",
        r#"{"data":{"n":7}}"#,
    );
    assert_eq!(preview.code, 200, "{}", preview.body_text());
    assert_eq!(
        preview.json()["data"],
        json!({"subject": "Note 7", "text": "v1 7", "html": null})
    );
    let missing = send(
        &service,
        "POST",
        "/api/templates/note/preview",
        r#"{"data":{}}"#,
    );
    assert_eq!(missing.code, 400);
    assert!(missing.body_text().contains("\\\"n\\\"") || missing.body_text().contains("n"));
    assert_eq!(
        send(&service, "POST", "/api/templates/none/preview", "{}").code,
        404
    );

    // A broken set is refused and the old one kept.
    std::fs::write(templates.join("note").join("text.txt"), "v2 {{ n ").unwrap();
    let refused = send(&service, "POST", "/api/templates/reload", "");
    assert_eq!(refused.code, 422, "{}", refused.body_text());
    assert!(
        refused.body_text().contains("text.txt"),
        "{}",
        refused.body_text()
    );
    let still = send(
        &service,
        "POST",
        "/api/templates/note/preview",
        r#"{"data":{"n":1}}"#,
    );
    assert_eq!(still.json()["data"]["text"], "v1 1");
    std::fs::write(templates.join("note").join("text.txt"), "v2 {{ n }}").unwrap();
    let reloaded = send(&service, "POST", "/api/templates/reload", "");
    assert_eq!(reloaded.code, 200, "{}", reloaded.body_text());
    let now = send(
        &service,
        "POST",
        "/api/templates/note/preview",
        r#"{"data":{"n":1}}"#,
    );
    assert_eq!(now.json()["data"]["text"], "v2 1");
    assert_eq!(relay.connections(), 0, "previews send nothing");
}

/// While the set is swapped back and forth, every message is rendered from
/// one set: its subject and text carry the same version.
#[test]
fn a_sighup_reload_swaps_the_set_whole_for_requests_in_flight() {
    let relay = TestRelay::plain();
    let directory = temp_dir("templates-sighup");
    let templates = directory.join("templates");
    write_template(
        &templates,
        "versioned",
        "v1 subject {{ n }}",
        "v1 text",
        None,
    );
    let env = vec![
        ("MAILROOM_SMTP_URL", relay.url()),
        ("MAILROOM_SPOOL_DIR", "none".to_string()),
        ("MAILROOM_TEMPLATES_DIR", templates.display().to_string()),
    ];
    let service = ChildService::start(&directory, &env);
    let address = service.address;
    let sender = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for n in 0..150 {
            let body = json!({"sender": "a@example.com", "receiver": "b@example.org", "template": "versioned", "data": {"n": n}});
            let reply = request(
                address,
                "POST",
                "/api/mail",
                &[],
                body.to_string().as_bytes(),
            );
            assert_eq!(reply.code, 202, "{}", reply.body_text());
            ids.push(reply.id());
        }
        ids
    });
    for round in 0..10 {
        let version = if round % 2 == 0 { "v2" } else { "v1" };
        write_template(
            &templates,
            "versioned",
            &format!("{version} subject {{{{ n }}}}"),
            &format!("{version} text"),
            None,
        );
        service.signal("HUP");
        // Pacing the swaps so that requests land between them.
        std::thread::sleep(Duration::from_millis(20));
    }
    let ids = sender.join().unwrap();
    let arrived = relay.wait_for(ids.len());
    let mut versions = HashSet::new();
    for received in &arrived {
        let subject = received.parsed().subject().unwrap_or_default().to_string();
        let text = text_part(received);
        let version = &subject[..2];
        assert!(text.starts_with(version), "{subject:?} with {text:?}");
        versions.insert(version.to_string());
    }
    assert!(
        service.log_text().contains("reloaded"),
        "{}",
        service.log_text()
    );
    eprintln!("versions seen: {versions:?}");
}

#[test]
fn a_broken_template_stops_the_start_naming_file_and_line() {
    let directory = temp_dir("templates-broken");
    let templates = directory.join("templates");
    write_template(
        &templates,
        "bad",
        "Hi",
        "line one\n{% if x %}\nno end",
        None,
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .current_dir(&directory)
        .env_clear()
        .env("MAILROOM_TEMPLATES_DIR", &templates)
        .env("MAILROOM_LISTEN", "127.0.0.1:0")
        .env("MAILROOM_SPOOL_DIR", "none")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("text.txt") && text.contains("line"), "{text}");
}

#[test]
fn a_batch_of_500_with_two_bad_items_survives_kill_9_right_after_its_answer() {
    let (port, reserved) = unused_port();
    drop(reserved);
    let directory = temp_dir("batch-kill");
    let env = vec![
        ("MAILROOM_SMTP_URL", format!("smtp://127.0.0.1:{port}")),
        (
            "MAILROOM_SPOOL_DIR",
            directory.join("spool").display().to_string(),
        ),
        ("MAILROOM_RETRY_BASE_MS", "50".to_string()),
        ("MAILROOM_RETRY_MAX_MS", "200".to_string()),
    ];
    let mut service = ChildService::start(&directory, &env);
    let mut messages: Vec<Value> = (0..500)
        .map(|index| {
            json!({
                "sender": "app@example.com",
                "receiver": format!("r{index}@example.org"),
                "subject": format!("batch {index}"),
            })
        })
        .collect();
    messages[3] = json!({"sender": "app@example.com", "receiver": "r3@example.org"});
    messages[250] = json!({"sender": "app@example.com", "receiver": "r250@example.org", "subject": "x", "colour": "red"});
    let reply = request(
        service.address,
        "POST",
        "/api/mail/batch",
        &[],
        json!({ "messages": messages }).to_string().as_bytes(),
    );
    service.kill_hard();
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    let results = reply.json()["data"]["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 500);
    assert_eq!(results[3]["error"]["field"], "subject");
    assert_eq!(results[250]["error"]["field"], "colour");
    let unknown = results[250]["error"]["message"].as_str().unwrap();
    assert!(
        unknown.contains("idempotency_key"),
        "an item takes it too: {unknown}"
    );
    assert!(results[250]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("colour"));
    let ids: HashSet<String> = results
        .iter()
        .filter_map(|result| result["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 498);

    let relay = TestRelay::plain_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let service = ChildService::start(&directory, &env);
    let arrived = relay.wait_for(498);
    let subjects: HashSet<String> = subjects_of(&arrived).into_iter().collect();
    assert_eq!(subjects.len(), 498, "each once");
    assert!(!subjects.contains("batch 3") && !subjects.contains("batch 250"));
    for id in ids.iter().take(5) {
        wait_for_status(service.address, id, "sent");
    }
}

#[test]
fn a_message_scheduled_two_seconds_ahead_is_sent_then_and_not_before() {
    let relay = TestRelay::plain();
    let directory = temp_dir("scheduled");
    let env = vec![
        ("MAILROOM_SMTP_URL", relay.url()),
        (
            "MAILROOM_SPOOL_DIR",
            directory.join("spool").display().to_string(),
        ),
    ];
    let service = ChildService::start(&directory, &env);
    let send_time = SystemTime::now() + Duration::from_secs(2);
    let send_at = mailroom_testkit::time::rfc3339(send_time);
    let asked = Instant::now();
    let body = json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": "later", "send_at": send_at});
    let reply = service.post("/api/mail", &body.to_string());
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    assert_eq!(reply.json()["data"]["status"], "scheduled");
    let id = reply.id();
    let status = wait_for_status(service.address, &id, "scheduled");
    assert_eq!(status["next_attempt_at"].as_str().unwrap(), send_at);
    let arrived = relay.wait_for(1).pop().unwrap();
    let late = arrived.at.duration_since(asked);
    assert!(
        late >= Duration::from_millis(1900),
        "sent after {late:?}, before its time"
    );
    assert!(late <= Duration::from_millis(3500), "sent {late:?} after");
    // Dated when it was to be sent (mail clients sort by Date), not when
    // it was accepted.
    let dated = arrived
        .parsed()
        .date()
        .expect("a Date header")
        .to_timestamp();
    let due = send_time.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(dated, due, "Date {dated}, send_at {send_at}");
    wait_for_status(service.address, &id, "sent");

    // A time in the past is now; more than 30 days ahead is refused.
    let past = json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": "past", "send_at": "2020-01-01T00:00:00Z"});
    let reply = service.post("/api/mail", &past.to_string());
    assert_eq!(reply.json()["data"]["status"], "queued");
    let past_id = reply.id();
    // More than 30 days ahead is refused, naming the field; the message's
    // own fault comes first.
    for (sender, named) in [("not an address", "`sender`"), ("a@example.com", "send_at")] {
        let far = json!({"sender": sender, "receiver": "b@example.org", "subject": "far", "send_at": rfc3339_in(Duration::from_secs(31 * 86_400))});
        let reply = service.post("/api/mail", &far.to_string());
        assert_eq!(reply.code, 400);
        assert!(reply.body_text().contains(named), "{}", reply.body_text());
    }

    // /api/mail/v2 sends now: a time ahead is refused (naming the field),
    // not sent at once; a time in the past is now.
    wait_for_status(service.address, &past_id, "sent");
    let received = relay.received();
    let past = received
        .iter()
        .find(|message| message.parsed().subject() == Some("past"))
        .expect("the past message");
    let dated = past.parsed().date().expect("a Date header").to_timestamp();
    assert!(dated >= due, "a time in the past is dated now, not {dated}");
    let before = received.len();
    for ahead in [
        Duration::from_secs(3 * 3600),
        Duration::from_secs(31 * 86_400),
    ] {
        let later = json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": "v2 later", "send_at": rfc3339_in(ahead)});
        let reply = service.post("/api/mail/v2", &later.to_string());
        assert_eq!(reply.code, 400, "{}", reply.body_text());
        assert!(
            reply.json()["data"]["error"]
                .as_str()
                .unwrap()
                .contains("send_at"),
            "{}",
            reply.body_text()
        );
    }
    // A clock a little ahead of ours is now too.
    for (subject, send_at) in [
        ("v2 past", "2020-01-01T00:00:00Z".to_string()),
        ("v2 skewed", rfc3339_in(Duration::from_secs(20))),
    ] {
        let now = json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": subject, "send_at": send_at});
        let reply = service.post("/api/mail/v2", &now.to_string());
        assert_eq!(reply.code, 200, "{}", reply.body_text());
    }
    let received = relay.received();
    let subjects = subjects_of(&received[before..]);
    assert_eq!(subjects, ["v2 past", "v2 skewed"]);
    // Sent now, so dated now: not at the skewed clock's time.
    let skewed = received
        .last()
        .unwrap()
        .parsed()
        .date()
        .unwrap()
        .to_timestamp();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(skewed <= now, "dated {} s ahead", skewed - now);
}

#[test]
fn a_scheduled_message_cancelled_is_never_sent_also_across_a_restart() {
    let relay = TestRelay::plain();
    let directory = temp_dir("scheduled-cancel");
    let env = vec![
        ("MAILROOM_SMTP_URL", relay.url()),
        (
            "MAILROOM_SPOOL_DIR",
            directory.join("spool").display().to_string(),
        ),
    ];
    let mut service = ChildService::start(&directory, &env);
    let schedule = |address, subject: &str, seconds: u64| {
        let body = json!({"sender": "a@example.com", "receiver": "b@example.org", "subject": subject, "send_at": rfc3339_in(Duration::from_secs(seconds))});
        let reply = request(
            address,
            "POST",
            "/api/mail",
            &[],
            body.to_string().as_bytes(),
        );
        assert_eq!(reply.code, 202, "{}", reply.body_text());
        reply.id()
    };
    let cancelled = schedule(service.address, "cancelled", 3);
    // Due a second after the cancelled one: once it is sent, the cancelled
    // one's time has passed.
    let kept = schedule(service.address, "kept", 4);
    let reply = request(
        service.address,
        "DELETE",
        &format!("/api/mail/{cancelled}"),
        &[],
        b"",
    );
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    service.kill_hard();

    let service = ChildService::start(&directory, &env);
    let status = wait_for_status(service.address, &cancelled, "cancelled");
    assert_eq!(status["next_attempt_at"], Value::Null);
    assert_eq!(
        wait_for_status(service.address, &kept, "scheduled")["status"],
        "scheduled"
    );
    wait_for_status(service.address, &kept, "sent");
    let subjects = subjects_of(&relay.received());
    assert_eq!(subjects, ["kept"]);
}
