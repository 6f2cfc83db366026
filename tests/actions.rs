//! Knowing and acting on messages over real HTTP: the event timeline, the
//! message list and its paging, cancel and retry, the suppression list.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use mailroom::config::SenderRule;
use serde_json::{json, Value};

fn get(service: &Service, path: &str) -> Value {
    let reply = service.get(path);
    assert_eq!(reply.code, 200, "GET {path}: {}", reply.body_text());
    reply.json()["data"].clone()
}

fn send(service: &Service, method: &str, path: &str, body: &str) -> HttpReply {
    request(service.address, method, path, &[], body.as_bytes())
}

fn event_types(status: &Value) -> Vec<String> {
    status["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_retried_message_has_its_whole_timeline() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    relay.reply_to_next_mail(&[(451, "4.3.0 try again later")]);
    let id = service
        .post("/api/mail", &seed_body("a@example.org", "timeline"))
        .id();
    let status = service.wait_for_status(&id, "sent");
    assert_eq!(
        event_types(&status),
        ["accepted", "attempt", "deferred", "attempt", "sent"]
    );
    let events = status["events"].as_array().unwrap();
    let first = &events[1];
    assert_eq!(first["smtp_code"], 451);
    assert!(first["smtp_reply"]
        .as_str()
        .unwrap()
        .contains("try again later"));
    assert_eq!(first["recipients"], json!(["a@example.org"]));
    assert!(first["duration_ms"].is_u64());
    assert!(events[2]["next_attempt_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(events[3]["smtp_code"], 250);
    for event in events {
        assert!(event["at"].as_str().unwrap().ends_with('Z'), "{event}");
    }
    assert_eq!(status["tags"], json!([]));
    assert_eq!(status["metadata"], json!({}));
}

#[test]
fn the_list_pages_newest_first_without_gaps_or_repeats_while_messages_arrive() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.queue_capacity = 100_000;
    let service = Service::start(config);
    let mut accepted = Vec::new();
    for round in 0..20 {
        let messages: Vec<Value> = (0..500)
            .map(|index| {
                json!({
                    "sender": "app@example.com",
                    "receiver": format!("user{}@example.org", index % 7),
                    "subject": format!("list {round}/{index}"),
                })
            })
            .collect();
        let reply = send(
            &service,
            "POST",
            "/api/mail/batch",
            &json!({ "messages": messages }).to_string(),
        );
        assert_eq!(reply.code, 200, "{}", reply.body_text());
        for result in reply.json()["data"]["results"].as_array().unwrap() {
            accepted.push(result["id"].as_str().expect("an id").to_string());
        }
    }
    assert_eq!(accepted.len(), 10_000);

    // Newer messages keep arriving while the list is paged through.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arriving = {
        let (address, stop) = (service.address, std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut count = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let body = seed_body("late@example.org", "arriving");
                assert_eq!(
                    request(address, "POST", "/api/mail", &[], body.as_bytes()).code,
                    202
                );
                count += 1;
            }
            count
        })
    };
    // Parameters left empty, as the SPEC writes the URL, are not given.
    let first = get(
        &service,
        "/api/mail?status=&recipient=&tag=&since=&until=&limit=1&cursor=",
    );
    assert_eq!(first["messages"].as_array().unwrap().len(), 1, "{first}");
    let newest = first["messages"][0]["id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let mut path = format!("/api/mail?limit=500&cursor={newest}");
    seen.push(newest);
    let started = Instant::now();
    loop {
        let page = get(&service, &path);
        for message in page["messages"].as_array().unwrap() {
            assert!(
                message.get("events").is_none(),
                "list items leave out events"
            );
            seen.push(message["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/mail?limit=500&cursor={cursor}"),
            None => break,
        }
        assert!(started.elapsed() < PATIENCE, "paging does not end");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let late = arriving.join().unwrap();
    assert!(late > 0);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no message is listed twice");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    for id in &accepted {
        assert!(unique.contains(id), "message {id} was skipped");
    }

    // Filters, combined with paging: user3 got 71 of every 500.
    let mut path = "/api/mail?recipient=USER3%40example.org&limit=500".to_string();
    let mut count = 0;
    loop {
        let page = get(&service, &path);
        let messages = page["messages"].as_array().unwrap();
        assert!(messages
            .iter()
            .all(|message| message["recipients"] == json!(["user3@example.org"])));
        count += messages.len();
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/mail?recipient=user3@example.org&limit=500&cursor={cursor}")
            }
            None => break,
        }
    }
    assert_eq!(count, 71 * 20);
    for (query, reason) in [
        ("status=bogus", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("since=yesterday", "since"),
        ("cursor=zzz", "cursor"),
        ("colour=red", "colour"),
    ] {
        let reply = service.get(&format!("/api/mail?{query}"));
        assert_eq!(reply.code, 400, "{query}: {}", reply.body_text());
        assert!(
            reply.body_text().contains(reason),
            "{query}: {}",
            reply.body_text()
        );
    }
}

#[test]
fn since_and_until_select_by_creation_time() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let before = service
        .post("/api/mail", &seed_body("a@example.org", "old"))
        .id();
    let created = get(&service, &format!("/api/mail/{before}"))["created_at"]
        .as_str()
        .unwrap()
        .to_string();
    // Ids and creation times have millisecond resolution.
    std::thread::sleep(Duration::from_millis(5));
    let after = service
        .post("/api/mail", &seed_body("a@example.org", "new"))
        .id();
    let until = get(&service, &format!("/api/mail?until={created}"));
    let ids: Vec<&str> = until["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [before.as_str()]);
    let since = get(
        &service,
        &format!("/api/mail?since={}", created.replace(".", "%2E")),
    );
    let ids: Vec<&str> = since["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [after.as_str(), before.as_str()]);
}

#[test]
fn cancel_racing_a_worker_ends_in_exactly_one_of_sent_and_cancelled() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut cancelled = HashSet::new();
    let mut ids = Vec::new();
    for round in 0..100 {
        let id = service
            .post(
                "/api/mail",
                &seed_body("race@example.org", &format!("race {round}")),
            )
            .id();
        let reply = send(&service, "DELETE", &format!("/api/mail/{id}"), "");
        match reply.code {
            200 => {
                assert_eq!(reply.json()["data"]["status"], "cancelled");
                cancelled.insert(id.clone());
            }
            409 => {
                let state = reply.json()["data"]["status"].as_str().unwrap().to_string();
                assert!(
                    state == "sending" || state == "sent",
                    "{}",
                    reply.body_text()
                );
                assert!(reply.json()["message"].as_str().unwrap().contains(&state));
            }
            other => panic!("DELETE answered {other}: {}", reply.body_text()),
        }
        ids.push(id);
    }
    let sent: Vec<&String> = ids.iter().filter(|id| !cancelled.contains(*id)).collect();
    for id in &sent {
        service.wait_for_status(id, "sent");
    }
    relay.wait_for(sent.len());
    let subjects: HashSet<String> = subjects_of(&relay.received()).into_iter().collect();
    for (round, id) in ids.iter().enumerate() {
        let arrived = subjects.contains(&format!("race {round}"));
        assert_eq!(
            arrived,
            !cancelled.contains(id),
            "message {id}: cancelled {}, arrived {arrived}",
            cancelled.contains(id)
        );
        let state = get(&service, &format!("/api/mail/{id}"))["status"].clone();
        assert_eq!(state, if arrived { "sent" } else { "cancelled" });
    }
    // Finished messages cannot be cancelled; unknown ones are 404.
    if let Some(id) = sent.first() {
        let reply = send(&service, "DELETE", &format!("/api/mail/{id}"), "");
        assert_eq!(reply.code, 409);
        assert_eq!(reply.json()["data"]["status"], "sent");
    }
    assert_eq!(
        send(
            &service,
            "DELETE",
            "/api/mail/0123456789abcdef0123456789ab",
            ""
        )
        .code,
        404
    );
}

#[test]
fn a_queued_message_cancelled_is_never_sent() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.workers = 1;
    let service = Service::start(config);
    // The only worker is held by a first message stalled at the relay.
    relay.stall(true);
    let first = service
        .post("/api/mail", &seed_body("a@example.org", "holds"))
        .id();
    let deadline = Instant::now() + PATIENCE;
    while relay.stalled_sessions() < 1 {
        assert!(Instant::now() < deadline, "the relay never stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let id = service
        .post("/api/mail", &seed_body("b@example.org", "never"))
        .id();
    let reply = send(&service, "DELETE", &format!("/api/mail/{id}"), "");
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    let again = send(&service, "DELETE", &format!("/api/mail/{id}"), "");
    assert_eq!(again.code, 409);
    assert_eq!(again.json()["data"]["status"], "cancelled");
    relay.stall(false);
    service.wait_for_status(&first, "sent");
    let third = service
        .post("/api/mail", &seed_body("c@example.org", "after"))
        .id();
    service.wait_for_status(&third, "sent");
    let subjects = subjects_of(&relay.received());
    assert!(!subjects.contains(&"never".to_string()), "{subjects:?}");
    let status = get(&service, &format!("/api/mail/{id}"));
    assert_eq!(status["status"], "cancelled");
    assert_eq!(event_types(&status), ["accepted", "cancelled"]);
}

#[test]
fn a_dead_letter_is_sent_when_retried_after_a_restart() {
    let relay = TestRelay::plain();
    let directory = temp_dir("retry-dead-letter");
    let env = vec![
        ("MAILROOM_SMTP_URL", relay.url()),
        (
            "MAILROOM_SPOOL_DIR",
            directory.join("spool").display().to_string(),
        ),
    ];
    let mut service = ChildService::start(&directory, &env);
    relay.reply_to_next_mail(&[(550, "5.7.1 relaying denied")]);
    let id = service
        .post("/api/mail", &seed_body("a@example.org", "dead letter"))
        .id();
    let failed = wait_for_status(service.address, &id, "failed");
    assert!(failed["last_error"].as_str().unwrap().contains("5.7.1"));
    // Not failed: cannot be cancelled; queued: cannot be retried.
    service.kill_hard();

    let service = ChildService::start(&directory, &env);
    let reply = request(
        service.address,
        "POST",
        &format!("/api/mail/{id}/retry"),
        &[],
        b"",
    );
    assert_eq!(reply.code, 202, "{}", reply.body_text());
    assert_eq!(reply.json()["data"]["id"], id.as_str());
    let sent = wait_for_status(service.address, &id, "sent");
    assert_eq!(sent["attempts"], 1, "a fresh attempt budget");
    let types = event_types(&sent);
    assert_eq!(
        types,
        ["accepted", "attempt", "failed", "requeued", "attempt", "sent"]
    );
    let arrived = relay.wait_for(1);
    assert_eq!(arrived[0].parsed().subject(), Some("dead letter"));
    let again = request(
        service.address,
        "POST",
        &format!("/api/mail/{id}/retry"),
        &[],
        b"",
    );
    assert_eq!(again.code, 409);
    assert!(again.body_text().contains("sent"), "{}", again.body_text());
    drop(service);
    // Still sent after another restart; the dead letter is gone.
    let service = ChildService::start(&directory, &env);
    assert_eq!(wait_for_status(service.address, &id, "sent")["attempts"], 1);
    assert_eq!(relay.received().len(), 1);
}

#[test]
fn an_unknown_recipient_is_suppressed_and_the_next_message_to_it_never_reaches_the_relay() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    relay.refuse_recipient("gone@example.org", 550, "5.1.1 no such user");
    let body = json!({
        "sender": "app@example.com",
        "receiver": ["gone@example.org", "here@example.org"],
        "subject": "first",
    });
    let first = service.post("/api/mail", &body.to_string()).id();
    let status = service.wait_for_status(&first, "sent");
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("gone@example.org"));

    let list = get(&service, "/api/suppressions");
    let entries = list["suppressions"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["address"], "gone@example.org");
    assert!(entries[0]["reason"].as_str().unwrap().contains("5.1.1"));
    assert!(entries[0]["created_at"].as_str().unwrap().ends_with('Z'));

    let received_before = relay.received().len();
    let connections_before = relay.connections();
    let only_gone = json!({
        "sender": "app@example.com",
        // The domain compares case-insensitively.
        "receiver": "gone@EXAMPLE.org",
        "subject": "second",
    });
    let second = service.post("/api/mail", &only_gone.to_string()).id();
    let status = service.wait_for_status(&second, "suppressed");
    assert_eq!(status["attempts"], 0);
    assert_eq!(event_types(&status), ["accepted", "suppressed"]);
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("suppression list"));
    assert_eq!(relay.received().len(), received_before);
    assert_eq!(relay.connections(), connections_before);

    // A mixed message reaches the others; the suppressed one is named.
    let mixed = service.post("/api/mail", &body.to_string()).id();
    let status = service.wait_for_status(&mixed, "sent");
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("gone@example.org: on the suppression list"));
    let last = relay.wait_for(received_before + 1).pop().unwrap();
    assert_eq!(last.recipients, ["here@example.org"]);

    // Operators manage the list.
    let reply = send(
        &service,
        "PUT",
        "/api/suppressions/ops%40Example.COM",
        r#"{"reason":"asked to stop"}"#,
    );
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    assert_eq!(reply.json()["data"]["reason"], "asked to stop");
    let reply = send(&service, "PUT", "/api/suppressions/bare@example.com", "");
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    assert_eq!(
        send(&service, "PUT", "/api/suppressions/not-an-address", "").code,
        400
    );
    assert_eq!(
        send(
            &service,
            "PUT",
            "/api/suppressions/x@example.com",
            r#"{"why":1}"#
        )
        .code,
        400
    );
    let page = get(&service, "/api/suppressions?cursor=&limit=2");
    assert_eq!(page["suppressions"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let rest = get(
        &service,
        &format!("/api/suppressions?limit=2&cursor={cursor}"),
    );
    assert_eq!(rest["suppressions"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null());
    assert_eq!(
        send(&service, "DELETE", "/api/suppressions/gone@EXAMPLE.ORG", "").code,
        200
    );
    assert_eq!(
        send(&service, "DELETE", "/api/suppressions/gone@example.org", "").code,
        404
    );
    let exact = json!({
        "sender": "app@example.com",
        "receiver": "gone@example.org",
        "subject": "third",
    });
    let third = service.post("/api/mail", &exact.to_string()).id();
    // Refused again by the relay (5.1.1), so failed, not suppressed.
    service.wait_for_status(&third, "failed");
}

#[test]
fn a_domain_is_the_same_in_unicode_and_in_punycode() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    // Senders are allowed by domain whichever form the client writes.
    config.allowed_senders = Some(vec![SenderRule::Domain("xn--bcher-kva.example".into())]);
    let service = Service::start(config);
    for sender in ["app@bücher.example", "app@xn--bcher-kva.example"] {
        let body = json!({"sender": sender, "receiver": "a@example.org", "subject": "from"});
        let id = service.post("/api/mail", &body.to_string()).id();
        service.wait_for_status(&id, "sent");
    }
    let stranger =
        json!({"sender": "app@example.com", "receiver": "a@example.org", "subject": "no"});
    assert_eq!(
        send(&service, "POST", "/api/mail", &stranger.to_string()).code,
        400
    );
    let sent = relay.received().len();
    // Suppressed in one form, a message to the other is suppressed too.
    let reply = send(
        &service,
        "PUT",
        "/api/suppressions/x%40b%C3%BCcher.example",
        "",
    );
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    for receiver in [
        "x@bücher.example",
        "x@xn--bcher-kva.example",
        "x@BÜCHER.example",
    ] {
        let body = json!({"sender": "app@bücher.example", "receiver": receiver, "subject": "idna"});
        let id = service.post("/api/mail", &body.to_string()).id();
        service.wait_for_status(&id, "suppressed");
    }
    assert_eq!(relay.received().len(), sent);
    // The list filter finds a message by either form.
    let body = json!({"sender": "app@bücher.example", "receiver": "c@xn--bcher-kva.example", "subject": "to c"});
    let id = service.post("/api/mail", &body.to_string()).id();
    for filter in ["c%40b%C3%BCcher.example", "c%40xn--bcher-kva.example"] {
        let page = get(&service, &format!("/api/mail?recipient={filter}"));
        let ids: Vec<&str> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [id.as_str()], "{filter}: {page}");
    }
    // Taken off the list in the other form.
    let reply = send(
        &service,
        "DELETE",
        "/api/suppressions/x%40xn--bcher-kva.example",
        "",
    );
    assert_eq!(reply.code, 200, "{}", reply.body_text());
}

#[test]
fn batches_answer_per_item_and_wrong_methods_name_the_allowed_ones() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    let mut messages: Vec<Value> = (0..500)
        .map(|index| {
            json!({
                "sender": "app@example.com",
                "receiver": format!("b{index}@example.org"),
                "subject": format!("batch {index}"),
            })
        })
        .collect();
    messages[17] =
        json!({"sender": "app@example.com", "receiver": "not an address", "subject": "bad"});
    messages[420] = json!({"sender": "app@example.com", "subject": "no receiver"});
    messages[421]["idempotency_key"] = json!("batch-key");
    messages[422] = messages[421].clone();
    let reply = send(
        &service,
        "POST",
        "/api/mail/batch",
        &json!({ "messages": messages }).to_string(),
    );
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    let results = reply.json()["data"]["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 500);
    assert_eq!(results[17]["error"]["field"], "receiver");
    assert!(results[17]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not an address"));
    assert_eq!(results[420]["error"]["field"], "receiver");
    assert_eq!(
        results[421]["id"], results[422]["id"],
        "one key, one message"
    );
    let ids: Vec<&str> = results.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 498);
    relay.wait_for(497);
    // A field given twice in an item (raw text: a JSON value cannot hold
    // it) refuses that item, naming the field; `messages` twice, all.
    let twice = r#"{"messages":[
        {"sender":"app@example.com","receiver":"ok@example.org","subject":"kept"},
        {"sender":"app@example.com","receiver":"a@example.org","receiver":"b@example.org","subject":"twice"},
        {"sender":"app@example.com","receiver":"c@example.org","subject":"key twice","idempotency_key":"k1","idempotency_key":5},
        7]}"#;
    let reply = send(&service, "POST", "/api/mail/batch", twice);
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    let results = reply.json()["data"]["results"].as_array().unwrap().clone();
    assert!(results[0]["id"].is_string(), "{results:?}");
    for (index, field) in [(1, "receiver"), (2, "idempotency_key")] {
        let error = &results[index]["error"];
        assert_eq!(error["field"], field, "{results:?}");
        assert!(error["message"]
            .as_str()
            .unwrap()
            .contains("more than once"));
    }
    assert!(results[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("must be a JSON object"));
    let received = relay.wait_for(498);
    assert_eq!(subjects_of(&received[497..]), ["kept"]);
    let item = r#"{"sender":"app@example.com","receiver":"d@example.org","subject":"s"}"#;
    let reply = send(
        &service,
        "POST",
        "/api/mail/batch",
        &format!(r#"{{"messages":[{item}],"messages":[{item}]}}"#),
    );
    assert_eq!(reply.code, 400);
    assert!(reply.body_text().contains("more than once"));
    for (body, status) in [
        ("[]", 400),
        (r#"{"messages": []}"#, 400),
        (r#"{"messages": [], "extra": 1}"#, 400),
        ("not json", 400),
        // Malformed inside an item that is not a request: still malformed.
        (r#"{"messages": [["\ud800"], {"sender": "a@b.c"}]}"#, 400),
    ] {
        assert_eq!(
            send(&service, "POST", "/api/mail/batch", body).code,
            status,
            "{body}"
        );
    }
    let malformed = send(&service, "POST", "/api/mail/batch", "[x");
    assert!(
        malformed.body_text().contains("malformed JSON"),
        "{}",
        malformed.body_text()
    );
    let too_many: Vec<Value> = (0..501).map(|_| json!({})).collect();
    let reply = send(
        &service,
        "POST",
        "/api/mail/batch",
        &json!({ "messages": too_many }).to_string(),
    );
    assert_eq!(reply.code, 400);
    assert!(reply.body_text().contains("500"));
    for (method, path, allow) in [
        ("PUT", "/api/mail", "GET, HEAD, POST"),
        ("GET", "/api/mail/batch", "POST"),
        ("POST", "/api/suppressions", "GET, HEAD"),
        ("GET", "/api/mail/abc/retry", "POST"),
        ("POST", "/api/stats", "GET, HEAD"),
    ] {
        let reply = send(&service, method, path, "");
        assert_eq!(reply.code, 405, "{method} {path}");
        assert_eq!(reply.header("Allow"), Some(allow), "{method} {path}");
    }
}

#[test]
fn stats_count_what_happened_this_hour() {
    let relay = TestRelay::plain();
    let service = Service::start(config_for(&relay));
    relay.reply_to_next_mail(&[(550, "5.7.1 no")]);
    let failed = service
        .post("/api/mail", &seed_body("a@example.org", "f"))
        .id();
    service.wait_for_status(&failed, "failed");
    let sent = service
        .post("/api/mail", &seed_body("a@example.org", "s"))
        .id();
    service.wait_for_status(&sent, "sent");
    let stats = get(&service, "/api/stats");
    let hour = stats["last_hour"].as_array().unwrap();
    assert_eq!(hour.len(), 60);
    let total = |field: &str| hour.iter().map(|m| m[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!((total("sent"), total("failed")), (1, 1));
    assert_eq!(stats["by_state"]["sent"], 1);
    assert_eq!(stats["by_state"]["failed"], 1);
    assert_eq!(stats["relay"]["status"], "ok");
    assert_eq!(stats["queue_depth"], 0);
}

#[test]
fn a_message_that_failed_through_v2_can_be_retried_with_a_spool() {
    let relay = TestRelay::plain();
    let mut config = config_for(&relay);
    config.spool = mailroom::config::SpoolSetting::Directory(temp_dir("v2-retry").join("spool"));
    let service = Service::start(config);
    relay.reply_to_next_mail(&[(550, "5.7.1 not now")]);
    let reply = service.post("/api/mail/v2", &seed_body("a@example.org", "v2 then retry"));
    assert_eq!(reply.code, 502, "{}", reply.body_text());
    let id = reply.json()["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        get(&service, &format!("/api/mail/{id}"))["status"],
        "failed"
    );
    let retried = send(&service, "POST", &format!("/api/mail/{id}/retry"), "");
    assert_eq!(retried.code, 202, "{}", retried.body_text());
    service.wait_for_status(&id, "sent");
    assert_eq!(
        relay.wait_for(1)[0].parsed().subject(),
        Some("v2 then retry")
    );
}
