//! PIPELINING (RFC 2920): against the strict relay with PIPELINING offered
//! and not, each case must end the same way (statuses, events, what
//! arrived), and without the offer mailroom must send one command at a
//! time (the relay refuses and counts anything else). Round trips are
//! counted by the testkit's latency proxy (at RTT 0: only counting).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mailroom::config::Relay;
use mailroom_testkit::latency::LatencyProxy;
use serde_json::{json, Value};

fn relay(pipelining: bool) -> TestRelay {
    TestRelay::with(RelayOptions {
        pipelining,
        ..RelayOptions::default()
    })
}

fn body_to(to: &[&str], subject: &str) -> String {
    json!({
        "sender": "App <app@example.com>",
        "to": to,
        "subject": subject,
        "message": "Hello from mailroom",
    })
    .to_string()
}

/// A status as a user compares it: no times, ids or durations.
fn outcome(status: &Value) -> Value {
    let events: Vec<Value> = status["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|event| {
                    let mut event = event.clone();
                    if let Some(map) = event.as_object_mut() {
                        for key in [
                            "at",
                            "at_ms",
                            "next_attempt_at",
                            "next_attempt_at_ms",
                            "duration_ms",
                        ] {
                            map.remove(key);
                        }
                    }
                    event
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "status": status["status"],
        "attempts": status["attempts"],
        "last_error": status["last_error"],
        "recipients": status["recipients"],
        "events": events,
    })
}

/// The relay's view: each message's recipients, in order of arrival.
/// Runs `case` against a relay without PIPELINING, then with it: what it
/// returns (what a client sees of the outcome) must be the same both ways.
fn same_with_and_without_pipelining<T: PartialEq + std::fmt::Debug>(case: impl Fn(bool) -> T) {
    let without = case(false);
    let with = case(true);
    assert_eq!(without, with);
}

fn arrived(relay: &TestRelay) -> Vec<Vec<String>> {
    relay
        .received()
        .into_iter()
        .map(|received| received.recipients)
        .collect()
}

/// The service pointed at `address` instead of the relay itself.
fn via(mut config: mailroom::Config, address: SocketAddr) -> mailroom::Config {
    if let Relay::Smtp(settings) = &mut config.relay {
        settings.port = address.port();
    }
    config
}

#[test]
fn refused_and_deferred_recipients_in_one_group_end_as_one_at_a_time() {
    same_with_and_without_pipelining(|pipelining| {
        let relay = relay(pipelining);
        relay.refuse_recipient("gone@example.org", 550, "5.1.1 no such user");
        relay.refuse_recipient("busy@example.org", 450, "4.2.1 mailbox busy");
        let mut config = config_for(&relay);
        config.max_attempts = 2;
        let service = Service::start(config);
        let id = service
            .post(
                "/api/mail",
                &body_to(
                    &[
                        "a@example.org",
                        "gone@example.org",
                        "busy@example.org",
                        "b@example.org",
                    ],
                    "mixed",
                ),
            )
            .id();
        // Two attempts: the second to the deferred one alone, still deferred.
        let status = service.wait_for_status(&id, "failed");
        let error = status["last_error"].as_str().unwrap();
        assert!(
            error.contains("busy@example.org") && error.contains("450"),
            "{error}"
        );
        assert_eq!(
            arrived(&relay),
            vec![vec!["a@example.org", "b@example.org"]]
        );
        assert_eq!(relay.improper_pipelining(), 0);
        outcome(&service.get(&format!("/api/mail/{id}")).json()["data"])
    });
}

#[test]
fn a_refused_sender_in_a_group_fails_or_retries_as_one_at_a_time() {
    same_with_and_without_pipelining(|pipelining| {
        let relay = relay(pipelining);
        relay.reply_to_next_mail(&[(451, "4.3.0 try later"), (550, "5.7.1 sender rejected")]);
        let mut config = config_for(&relay);
        config.workers = 1;
        let service = Service::start(config);
        let id = service
            .post(
                "/api/mail",
                &body_to(&["a@example.org", "b@example.org"], "sender"),
            )
            .id();
        let status = service.wait_for_status(&id, "failed");
        assert_eq!(status["attempts"], 2, "{status}");
        assert!(status["last_error"]
            .as_str()
            .unwrap()
            .contains("sender rejected"));
        // The session goes on: the next message is delivered on it.
        let next = service
            .post("/api/mail", &seed_body("c@example.org", "after"))
            .id();
        service.wait_for_status(&next, "sent");
        assert_eq!(arrived(&relay), vec![vec!["c@example.org"]]);
        assert_eq!(relay.connections(), 1);
        assert_eq!(relay.improper_pipelining(), 0);
        outcome(&service.get(&format!("/api/mail/{id}")).json()["data"])
    });
}

#[test]
fn a_recipient_limit_splits_pipelined_groups_into_transactions() {
    for pipelining in [false, true] {
        let relay = relay(pipelining);
        relay.limit_recipients(Some(100));
        let service = Service::start(config_for(&relay));
        let to: Vec<String> = (0..250).map(|i| format!("r{i:03}@example.org")).collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        let id = service.post("/api/mail", &body_to(&to, "many")).id();
        let status = service.wait_for_status(&id, "sent");
        assert_eq!(status["attempts"], 1);
        assert_eq!(status["last_error"], Value::Null);
        let sizes: Vec<usize> = arrived(&relay).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![100, 100, 50], "pipelining {pipelining}");
        assert_eq!(relay.improper_pipelining(), 0);
    }
}

#[test]
fn a_relay_dropping_the_connection_mid_group() {
    same_with_and_without_pipelining(|pipelining| {
        let relay = relay(pipelining);
        let mut config = config_for(&relay);
        config.workers = 1;
        let service = Service::start(config);
        let to = ["a@example.org", "b@example.org", "c@example.org"];
        // On a fresh connection the cut is an attempt (retried later).
        relay.close_after_recipients(1);
        let first = service.post("/api/mail", &body_to(&to, "fresh")).id();
        let status = service.wait_for_status(&first, "sent");
        assert_eq!(status["attempts"], 2, "{status}");
        // On a reused connection it is a dead pooled connection: tried
        // again at once on a fresh one, not an attempt.
        relay.close_after_recipients(2);
        let second = service.post("/api/mail", &body_to(&to, "reused")).id();
        let status = service.wait_for_status(&second, "sent");
        assert_eq!(status["attempts"], 1, "{status}");
        assert_eq!(arrived(&relay), vec![to.to_vec(), to.to_vec()]);
        assert_eq!(relay.connections(), 3);
        assert_eq!(relay.improper_pipelining(), 0);
        (
            outcome(&service.get(&format!("/api/mail/{first}")).json()["data"]),
            outcome(&service.get(&format!("/api/mail/{second}")).json()["data"]),
        )
    });
}

#[test]
fn smtputf8_goes_on_mail_from_in_a_pipelined_group() {
    let relay = TestRelay::with(RelayOptions {
        pipelining: true,
        smtputf8: true,
        ..RelayOptions::default()
    });
    let service = Service::start(config_for(&relay));
    let id = service
        .post(
            "/api/mail",
            &body_to(&["jörg@example.org", "b@example.org"], "utf8"),
        )
        .id();
    service.wait_for_status(&id, "sent");
    let received = relay.wait_for(1);
    assert!(received[0].smtputf8);
    assert_eq!(
        received[0].recipients,
        vec!["jörg@example.org", "b@example.org"]
    );
}

#[test]
fn ten_recipients_cost_the_round_trips_of_one() {
    // Flights the client waited for, per message on a warm connection.
    let mut flights = Vec::new();
    for pipelining in [false, true] {
        let relay = relay(pipelining);
        let proxy = LatencyProxy::start(
            SocketAddr::from(([127, 0, 0, 1], relay.port)),
            Duration::ZERO,
        );
        let mut config = via(
            config_for(&relay),
            SocketAddr::from(([127, 0, 0, 1], proxy.port)),
        );
        config.workers = 1;
        let service = Service::start(config);
        let warm = service
            .post("/api/mail", &seed_body("w@example.org", "warm"))
            .id();
        service.wait_for_status(&warm, "sent");
        let ten: Vec<String> = (0..10).map(|i| format!("t{i}@example.org")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        let mut per_message = Vec::new();
        for to in [&["one@example.org"][..], &ten[..]] {
            let before = proxy.flights();
            let id = service.post("/api/mail", &body_to(to, "count")).id();
            service.wait_for_status(&id, "sent");
            per_message.push(proxy.flights() - before);
        }
        assert_eq!(relay.improper_pipelining(), 0);
        flights.push(per_message);
    }
    // One at a time: MAIL, each RCPT, DATA, the body.
    assert_eq!(flights[0], vec![4, 13]);
    // Pipelined: the envelope, the body.
    assert_eq!(flights[1], vec![2, 2]);
}

#[test]
fn a_backlog_sends_each_envelope_with_the_body_before_it() {
    same_with_and_without_pipelining(|pipelining| {
        let relay = relay(pipelining);
        // 5.7.1, not 5.1.1: no suppression list entry, every message asks.
        relay.refuse_recipient("gone@example.org", 550, "5.7.1 not here");
        relay.refuse_recipient("busy@example.org", 450, "4.2.1 busy");
        let proxy = LatencyProxy::start(
            SocketAddr::from(([127, 0, 0, 1], relay.port)),
            Duration::ZERO,
        );
        let mut config = via(
            config_for(&relay),
            SocketAddr::from(([127, 0, 0, 1], proxy.port)),
        );
        config.workers = 1;
        config.max_attempts = 1;
        let service = Service::start(config);
        // Held before the greeting: every message is queued when it opens.
        relay.close_gate();
        let mut ids = Vec::new();
        for index in 0..40 {
            let to: Vec<String> = match index % 5 {
                0 => vec![format!("m{index}@example.org"), "gone@example.org".into()],
                1 => vec!["gone@example.org".into()],
                2 => vec!["busy@example.org".into(), format!("m{index}@example.org")],
                _ => vec![format!("m{index}@example.org")],
            };
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            ids.push(
                service
                    .post("/api/mail", &body_to(&to, &format!("m{index}")))
                    .id(),
            );
        }
        relay.open_gate();
        let mut statuses = Vec::new();
        for (index, id) in ids.iter().enumerate() {
            let expected = match index % 5 {
                1 => "failed",
                2 => "failed",
                _ => "sent",
            };
            statuses.push(outcome(&service.wait_for_status(id, expected)));
        }
        let mut got = arrived(&relay);
        got.sort();
        let mut wanted: Vec<Vec<String>> = (0..40)
            .filter(|index| index % 5 != 1)
            .map(|index| vec![format!("m{index}@example.org")])
            .collect();
        wanted.sort();
        assert_eq!(got, wanted, "each arrived once, to its own recipients");
        assert_eq!(relay.improper_pipelining(), 0);
        let flights = proxy.flights();
        println!("pipelining {pipelining}: {flights} flights for 40 messages");
        if pipelining {
            // EHLO twice, the first envelope, then each body with the next
            // envelope (RSETs after groups nobody took add one each).
            assert!(
                flights <= 40 + 3 + 8 + 2,
                "{flights} flights for 40 messages"
            );
        } else {
            assert!(flights >= 40 * 3, "{flights} flights for 40 messages");
        }
        statuses
    });
}

#[test]
fn a_stall_after_a_body_with_the_next_envelope_frees_the_worker() {
    for pipelining in [false, true] {
        let relay = relay(pipelining);
        let mut config = config_for(&relay);
        config.workers = 1;
        if let Relay::Smtp(settings) = &mut config.relay {
            settings.timeout = Duration::from_millis(1_000);
        }
        // Long enough to see each message retrying.
        config.retry_base = Duration::from_secs(2);
        config.retry_max = Duration::from_secs(2);
        let service = Service::start(config);
        relay.close_gate();
        relay.stall(true);
        let first = service
            .post("/api/mail", &seed_body("a@example.org", "one"))
            .id();
        let second = service
            .post("/api/mail", &seed_body("b@example.org", "two"))
            .id();
        relay.open_gate();
        for id in [&first, &second] {
            let status = service.wait_for_status(id, "retrying");
            let error = status["last_error"].as_str().unwrap();
            assert!(error.contains("timed out"), "{error}");
        }
        relay.stall(false);
        service.wait_for_status(&first, "sent");
        service.wait_for_status(&second, "sent");
        assert_eq!(relay.improper_pipelining(), 0);
    }
}

#[test]
fn a_message_delivered_before_the_next_ones_reconnect_hangs_goes_once() {
    // The relay takes the first message and closes the connection; the
    // second message's pipelined envelope finds it dead, and the reconnect
    // meets a relay that does not greet: the worker is given up at its
    // deadline holding the first message's outcome, which must count as
    // sent (not timed out, to go again).
    let relay = relay(true);
    let mut config = config_for(&relay);
    config.workers = 1;
    if let Relay::Smtp(settings) = &mut config.relay {
        settings.timeout = Duration::from_millis(500);
    }
    config.retry_base = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(100);
    let service = Service::start(config);
    let warm = service
        .post("/api/mail", &seed_body("w@example.org", "warm"))
        .id();
    service.wait_for_status(&warm, "sent");
    relay.after_message(AfterMessage::Close);
    relay.close_gate();
    let batch = json!({ "messages": [
        json!({"sender": "app@example.com", "receiver": "x@example.org", "subject": "first"}),
        json!({"sender": "app@example.com", "receiver": "n@example.org", "subject": "second"}),
    ]});
    let reply = service.post("/api/mail/batch", &batch.to_string());
    assert_eq!(reply.code, 200, "{}", reply.body_text());
    let ids: Vec<String> = reply.json()["data"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["id"].as_str().unwrap().to_string())
        .collect();
    service.wait_for_status(&ids[0], "sent");
    relay.after_message(AfterMessage::Keep);
    relay.open_gate();
    service.wait_for_status(&ids[1], "sent");
    let subjects = subjects_of(&relay.received());
    assert_eq!(subjects, ["warm", "first", "second"]);
}
