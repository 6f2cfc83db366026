//! Several mailroom processes (the real binary) sharing one real
//! `redis-server`: every message delivered once, a replica killed while it
//! holds messages, the same answers from every replica, idempotency across
//! replicas, the group-wide rate limit, and Redis stopped under load.
//!
//! Without `redis-server` these tests print `SKIPPED: ...` and pass, unless
//! `MAILROOM_REQUIRE_REDIS=1` (as in CI), which makes that a failure.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mailroom_testkit::redis::RedisServer;
use serde_json::{json, Value};

fn replica(
    name: &str,
    redis: &RedisServer,
    relay: &TestRelay,
    extra: &[(&str, &str)],
) -> ChildService {
    let directory = temp_dir(name);
    let mut variables: Vec<(&str, String)> = vec![
        ("MAILROOM_STORE", redis.url()),
        ("MAILROOM_SMTP_URL", relay.url()),
        ("MAILROOM_RETRY_BASE_MS", "100".to_string()),
        ("MAILROOM_RETRY_MAX_MS", "400".to_string()),
    ];
    for (name, value) in extra {
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        variables.retain(|(known, _)| *known != name);
        variables.push((name, value.to_string()));
    }
    ChildService::start(&directory, &variables)
}

fn post(address: SocketAddr, body: &Value, headers: &[(&str, &str)]) -> HttpReply {
    request(
        address,
        "POST",
        "/api/mail",
        headers,
        body.to_string().as_bytes(),
    )
}

fn message(subject: &str) -> Value {
    json!({"sender": "app@example.com", "receiver": "user@example.org", "subject": subject})
}

fn get(address: SocketAddr, path: &str) -> HttpReply {
    request(address, "GET", path, &[], b"")
}

fn subjects(relay: &TestRelay) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for received in relay.received() {
        let subject = received.parsed().subject().unwrap_or_default().to_string();
        *counts.entry(subject).or_insert(0) += 1;
    }
    counts
}

#[test]
fn three_replicas_deliver_every_message_exactly_once() {
    let Some(redis) = RedisServer::start("three-replicas") else {
        return;
    };
    let relay = TestRelay::plain();
    let replicas: Vec<ChildService> = (0..3)
        .map(|n| replica(&format!("replica-{n}"), &redis, &relay, &[]))
        .collect();
    let mut ids = Vec::new();
    for n in 0..300 {
        let reply = post(replicas[n % 3].address, &message(&format!("once {n}")), &[]);
        assert_eq!(reply.code, 202, "{}", reply.body_text());
        ids.push(reply.id());
    }
    relay.wait_for(300);
    for id in &ids {
        wait_for_status(replicas[0].address, id, "sent");
    }
    let counts = subjects(&relay);
    assert_eq!(counts.len(), 300);
    assert!(counts.values().all(|count| *count == 1), "{counts:?}");
    // Who delivered: more than one replica took part.
    let logs: Vec<usize> = replicas
        .iter()
        .map(|replica| replica.log_text().matches(": sent, attempt").count())
        .collect();
    assert_eq!(logs.iter().sum::<usize>(), 300, "{logs:?}");
    assert!(
        logs.iter().filter(|sent| **sent > 0).count() >= 2,
        "{logs:?}"
    );
}

#[test]
fn every_replica_gives_the_same_answers() {
    let Some(redis) = RedisServer::start("same-answers") else {
        return;
    };
    let relay = TestRelay::plain();
    let a = replica("same-a", &redis, &relay, &[]);
    let b = replica("same-b", &redis, &relay, &[]);
    relay.reply_to_next_mail(&[(550, "5.7.1 not today")]);
    let failed = post(a.address, &message("dead letter"), &[]).id();
    wait_for_status(b.address, &failed, "failed");
    let sent = post(b.address, &json!({"sender": "app@example.com", "receiver": "user@example.org", "subject": "tagged", "tags": ["t1"]}), &[]).id();
    wait_for_status(a.address, &sent, "sent");
    for path in [
        format!("/api/mail/{failed}"),
        format!("/api/mail/{sent}"),
        "/api/mail?limit=10".to_string(),
        "/api/mail?tag=t1".to_string(),
        "/api/mail?status=failed".to_string(),
        "/api/mail?recipient=USER%40example.org".to_string(),
    ] {
        let from_a = get(a.address, &path);
        let from_b = get(b.address, &path);
        assert_eq!(from_a.code, 200, "{path}: {}", from_a.body_text());
        assert_eq!(from_a.json(), from_b.json(), "{path}");
    }
    let tagged = get(a.address, "/api/mail?tag=t1").json();
    assert_eq!(tagged["data"]["messages"][0]["id"], sent.as_str());
    // Retry from the other replica; cancel a scheduled one from the other.
    let retried = request(
        b.address,
        "POST",
        &format!("/api/mail/{failed}/retry"),
        &[],
        b"",
    );
    assert_eq!(retried.code, 202, "{}", retried.body_text());
    wait_for_status(a.address, &failed, "sent");
    let again = request(
        a.address,
        "POST",
        &format!("/api/mail/{failed}/retry"),
        &[],
        b"",
    );
    assert_eq!(again.code, 409);
    let later = json!({"sender": "app@example.com", "receiver": "user@example.org", "subject": "never", "send_at": rfc3339_in(Duration::from_secs(30))});
    let scheduled = post(a.address, &later, &[]);
    assert_eq!(scheduled.json()["data"]["status"], "scheduled");
    let id = scheduled.id();
    let cancelled = request(b.address, "DELETE", &format!("/api/mail/{id}"), &[], b"");
    assert_eq!(cancelled.code, 200, "{}", cancelled.body_text());
    assert_eq!(
        wait_for_status(a.address, &id, "cancelled")["status"],
        "cancelled"
    );
    // The suppression list is the group's.
    let put = request(
        a.address,
        "PUT",
        "/api/suppressions/gone%40Example.org",
        &[],
        br#"{"reason":"asked"}"#,
    );
    assert_eq!(put.code, 200, "{}", put.body_text());
    let listed = get(b.address, "/api/suppressions").json();
    assert_eq!(
        listed["data"]["suppressions"][0]["address"],
        "gone@Example.org"
    );
    let to_gone =
        json!({"sender": "app@example.com", "receiver": "gone@example.ORG", "subject": "not sent"});
    let suppressed = post(b.address, &to_gone, &[]).id();
    assert_eq!(
        wait_for_status(a.address, &suppressed, "suppressed")["attempts"],
        0
    );
    assert_eq!(
        request(
            b.address,
            "DELETE",
            "/api/suppressions/gone@example.org",
            &[],
            b""
        )
        .code,
        200
    );
    assert_eq!(
        request(
            a.address,
            "DELETE",
            "/api/suppressions/gone@example.org",
            &[],
            b""
        )
        .code,
        404
    );
    let metrics = get(a.address, "/metrics").body_text();
    assert!(
        metrics.contains("mailroom_store_operation_seconds_count"),
        "{metrics}"
    );
    assert!(metrics.contains("mailroom_store_up 1"), "{metrics}");
    let stats_a = get(a.address, "/api/stats").json();
    let stats_b = get(b.address, "/api/stats").json();
    assert_eq!(stats_a["data"]["by_state"], stats_b["data"]["by_state"]);
    assert_eq!(stats_a["data"]["scheduled"], 0);
}

#[test]
fn an_idempotency_key_posted_to_one_replica_and_repeated_to_another_gets_the_same_id() {
    let Some(redis) = RedisServer::start("idempotency") else {
        return;
    };
    let relay = TestRelay::plain();
    let a = replica("key-a", &redis, &relay, &[]);
    let b = replica("key-b", &redis, &relay, &[]);
    let headers = [("Idempotency-Key", "order-7")];
    let first = post(a.address, &message("keyed"), &headers);
    let repeat = post(b.address, &message("keyed"), &headers);
    assert_eq!(first.code, 202);
    assert_eq!(repeat.code, 202);
    assert_eq!(first.id(), repeat.id());
    let conflict = post(b.address, &message("another body"), &headers);
    assert_eq!(conflict.code, 409, "{}", conflict.body_text());
    assert!(conflict.body_text().contains("order-7"));
    relay.wait_for(1);
    assert_eq!(subjects(&relay).get("keyed"), Some(&1));
}

#[test]
fn messages_a_killed_replica_held_are_delivered_by_another_after_the_claim_timeout() {
    let Some(redis) = RedisServer::start("takeover") else {
        return;
    };
    let relay = TestRelay::plain();
    let claim = [
        ("MAILROOM_CLAIM_TIMEOUT_MS", "1500"),
        ("MAILROOM_WORKERS", "2"),
    ];
    let mut doomed = replica("takeover-doomed", &redis, &relay, &claim);
    // The doomed replica takes the messages and is held at the relay.
    relay.stall(true);
    let ids: Vec<String> = (0..6)
        .map(|n| post(doomed.address, &message(&format!("held {n}")), &[]).id())
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while relay.stalled_sessions() < 2 {
        assert!(
            Instant::now() < deadline,
            "the relay never held the deliveries"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let survivor = replica("takeover-survivor", &redis, &relay, &claim);
    doomed.kill_hard();
    relay.stall(false);
    let started = Instant::now();
    for id in &ids {
        wait_for_status(survivor.address, id, "sent");
    }
    let counts = subjects(&relay);
    for n in 0..6 {
        let count = counts.get(&format!("held {n}")).copied().unwrap_or(0);
        // At least once; only the two in flight at the death may go twice.
        assert!((1..=2).contains(&count), "held {n}: {count} times");
    }
    let twice = counts.values().filter(|count| **count == 2).count();
    assert!(twice <= 2, "{counts:?}");
    assert!(
        survivor.log_text().contains("took over"),
        "{}",
        survivor.log_text()
    );
    eprintln!(
        "taken over and delivered {:?} after the kill",
        started.elapsed()
    );
}

#[test]
fn the_rate_limit_counts_for_the_whole_group() {
    let Some(redis) = RedisServer::start("rate") else {
        return;
    };
    let relay = TestRelay::plain();
    let rate = [("MAILROOM_RATE_LIMIT", "20")];
    let a = replica("rate-a", &redis, &relay, &rate);
    let b = replica("rate-b", &redis, &relay, &rate);
    for n in 0..30 {
        let address = if n % 2 == 0 { a.address } else { b.address };
        assert_eq!(
            post(address, &message(&format!("paced {n}")), &[]).code,
            202
        );
    }
    let arrived = relay.wait_for(30);
    let mut times: Vec<Instant> = arrived.iter().map(|received| received.at).collect();
    times.sort();
    let span = times[29].duration_since(times[0]);
    // 20 a second over both replicas: 29 gaps of 50 ms. (A lower bound
    // only: a loaded machine can only stretch it.)
    assert!(span >= Duration::from_millis(29 * 50 * 9 / 10), "{span:?}");
    let gaps: Vec<Duration> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .collect();
    eprintln!(
        "30 messages over two replicas at 20/s: span {span:?}, shortest gap {:?}",
        gaps.iter().min()
    );
}

#[test]
fn redis_stopped_under_load_gives_503s_loses_no_202_and_recovers_from_its_aof() {
    let Some(mut redis) = RedisServer::start("outage") else {
        return;
    };
    let relay = TestRelay::plain();
    let service = replica(
        "outage",
        &redis,
        &relay,
        &[("MAILROOM_CLAIM_TIMEOUT_MS", "2000")],
    );
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (accepted, refused, stop) = (
            Arc::clone(&accepted),
            Arc::clone(&refused),
            Arc::clone(&stop),
        );
        let address = service.address;
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let reply = post(address, &message(&format!("load {n}")), &[]);
                match reply.code {
                    202 => accepted.lock().unwrap().push(reply.id()),
                    503 => {
                        // At once, not after waiting on Redis.
                        assert!(
                            started.elapsed() < Duration::from_secs(3),
                            "{:?}",
                            started.elapsed()
                        );
                        *refused.lock().unwrap() += 1;
                    }
                    other => panic!("answered {other}: {}", reply.body_text()),
                }
                n += 1;
            }
        })
    };
    let wait_until = |what: &str, condition: &dyn Fn() -> bool| {
        let deadline = Instant::now() + PATIENCE;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_until("some are accepted", &|| {
        accepted.lock().unwrap().len() >= 20
    });
    redis.kill();
    wait_until("requests are refused", &|| *refused.lock().unwrap() >= 5);
    let ready = get(service.address, "/readyz");
    assert_eq!(ready.code, 503);
    assert!(ready.body_text().contains("Redis"), "{}", ready.body_text());
    // A batch too is refused as a whole, not answered 200 item by item.
    let batch = json!({ "messages": [message("batch while down")] });
    let reply = service.post("/api/mail/batch", &batch.to_string());
    assert_eq!(reply.code, 503, "{}", reply.body_text());
    assert!(reply.header("Retry-After").is_some());
    let before_restart = accepted.lock().unwrap().len();
    redis.restart();
    wait_until("requests are accepted again", &|| {
        accepted.lock().unwrap().len() >= before_restart + 20
    });
    stop.store(true, Ordering::SeqCst);
    poster.join().unwrap();
    let ids: Vec<String> = accepted.lock().unwrap().clone();
    for id in &ids {
        wait_for_status(service.address, id, "sent");
    }
    let delivered: HashSet<String> = subjects(&relay).into_keys().collect();
    assert!(delivered.len() >= ids.len());
    assert_eq!(get(service.address, "/readyz").code, 200);
    eprintln!(
        "{} accepted, {} refused while Redis was down; every accepted one delivered",
        ids.len(),
        refused.lock().unwrap()
    );
}

#[test]
fn each_webhook_is_delivered_by_one_replica() {
    let Some(redis) = RedisServer::start("webhooks") else {
        return;
    };
    let relay = TestRelay::plain();
    let receiver = WebhookReceiver::start(TEST_SECRET);
    let hooks: Vec<(String, String)> = webhook_variables(&receiver)
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let hooks: Vec<(&str, &str)> = hooks
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let a = replica("hooks-a", &redis, &relay, &hooks);
    let b = replica("hooks-b", &redis, &relay, &hooks);
    let ids: Vec<String> = (0..20)
        .map(|n| {
            let address = if n % 2 == 0 { a.address } else { b.address };
            post(address, &message(&format!("hooked {n}")), &[]).id()
        })
        .collect();
    let delivered = receiver.wait_for_delivered(20);
    let about: Vec<String> = delivered
        .iter()
        .map(|webhook| webhook.json()["data"]["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = about.iter().collect();
    assert_eq!(unique.len(), 20, "one sent webhook each");
    for id in &ids {
        assert!(unique.contains(id), "no webhook for {id}");
    }
    assert!(delivered.iter().all(|webhook| webhook.signature_valid));
}
