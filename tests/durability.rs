//! Durability against the real binary as a child process: kill -9 and
//! SIGTERM with messages queued, in flight and waiting for retry; corrupt
//! spool data; dead letters; systemd notification; memory mode.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The child's environment: this relay, this spool, plus `extra`.
fn variables(relay_url: &str, spool: &Path, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut variables = vec![
        ("MAILROOM_SMTP_URL", relay_url.to_string()),
        ("MAILROOM_SPOOL_DIR", spool.display().to_string()),
        ("MAILROOM_RETRY_BASE_MS", "50".to_string()),
        ("MAILROOM_RETRY_MAX_MS", "200".to_string()),
    ];
    for (name, value) in extra {
        // Leaked once per test: the names are 'static in ChildService's API.
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        variables.retain(|(existing, _)| *existing != name);
        variables.push((name, value.to_string()));
    }
    variables
}

/// Posts `count` seed requests; every one must get a 202.
fn accept(address: SocketAddr, count: usize, subject: &str) -> Vec<String> {
    (0..count)
        .map(|index| {
            let body = seed_body("user@example.org", &format!("{subject} {index}"));
            let reply = request(address, "POST", "/api/mail", &[], body.as_bytes());
            assert_eq!(reply.code, 202, "{}", reply.body_text());
            reply.id()
        })
        .collect()
}

fn status(address: SocketAddr, id: &str) -> serde_json::Value {
    let reply = request(address, "GET", &format!("/api/mail/{id}"), &[], b"");
    assert_eq!(reply.code, 200, "status of {id}: {}", reply.body_text());
    reply.json()["data"].clone()
}

/// Polls `condition` until it holds (a liveness check with a generous deadline).
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many times the relay received each message id.
fn delivered_counts(relay: &TestRelay) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for received in relay.received() {
        let message_id = received
            .parsed()
            .message_id()
            .expect("Message-ID")
            .to_string();
        let id = message_id.split('@').next().unwrap_or_default().to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Every id arrived; the ones that arrived twice were in flight at the
/// crash (`in_flight`), and none arrived more than twice.
fn assert_delivered_at_least_once(
    relay: &TestRelay,
    ids: &[String],
    in_flight: &HashSet<String>,
) -> usize {
    let counts = delivered_counts(relay);
    for id in ids {
        assert!(
            counts.get(id).is_some_and(|n| *n >= 1),
            "{id} never arrived"
        );
    }
    let duplicated: Vec<&String> = counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(id, _)| id)
        .collect();
    for id in &duplicated {
        assert!(
            in_flight.contains(*id),
            "{id} arrived {} times but was not in flight at the crash",
            counts[*id]
        );
        assert_eq!(counts[*id], 2, "{id}");
    }
    duplicated.len()
}

fn ids_in_state(address: SocketAddr, ids: &[String], state: &str) -> HashSet<String> {
    ids.iter()
        .filter(|id| status(address, id)["status"] == state)
        .cloned()
        .collect()
}

/// A service (real binary) whose `workers` workers each hold one of
/// `messages` accepted messages at a stalled relay.
struct InFlight {
    relay: TestRelay,
    directory: PathBuf,
    env: Vec<(&'static str, String)>,
    service: ChildService,
    ids: Vec<String>,
    in_flight: HashSet<String>,
}

fn start_with_deliveries_in_flight(
    name: &str,
    workers: usize,
    messages: usize,
    extra: &[(&str, &str)],
) -> InFlight {
    let relay = TestRelay::plain();
    relay.stall(true);
    let directory = temp_dir(name);
    let workers_text = workers.to_string();
    let mut settings = vec![("MAILROOM_WORKERS", workers_text.as_str())];
    settings.extend_from_slice(extra);
    let env = variables(&relay.url(), &directory.join("spool"), &settings);
    let service = ChildService::start(&directory, &env);
    let ids = accept(service.address, messages, name);
    wait_until("every worker holds a message at the stalled relay", || {
        relay.stalled_sessions() >= workers
    });
    let in_flight = ids_in_state(service.address, &ids, "sending");
    assert_eq!(in_flight.len(), workers, "one message per worker in flight");
    InFlight {
        relay,
        directory,
        env,
        service,
        ids,
        in_flight,
    }
}

#[test]
fn kill_9_with_queued_and_in_flight_messages_loses_nothing() {
    let InFlight {
        relay,
        directory,
        env,
        mut service,
        ids,
        in_flight,
    } = start_with_deliveries_in_flight("kill9", 3, 20, &[]);
    service.kill_hard();
    // The stalled sessions now complete: the relay got the in-flight
    // messages, but the dead process never learnt it.
    relay.stall(false);

    let restarted = ChildService::start(&directory, &env);
    for id in &ids {
        wait_for_status(restarted.address, id, "sent");
    }
    let duplicates = assert_delivered_at_least_once(&relay, &ids, &in_flight);
    assert!(duplicates <= 3, "{duplicates} duplicates with 3 workers");
    assert!(
        restarted
            .log_text()
            .contains("recovered 20 unfinished messages"),
        "{}",
        restarted.log_text()
    );
}

#[test]
fn sigterm_finishes_deliveries_in_flight_and_keeps_the_rest() {
    let InFlight {
        relay,
        directory,
        env,
        mut service,
        ids,
        in_flight,
    } = start_with_deliveries_in_flight("sigterm", 2, 10, &[]);

    service.signal("TERM");
    wait_until("/readyz says 503", || {
        request(service.address, "GET", "/readyz", &[], b"").code == 503
    });
    let refused = service.post("/api/mail", &seed_body("user@example.org", "too late"));
    assert_eq!(refused.code, 503, "{}", refused.body_text());
    assert!(refused.header("Retry-After").is_some());
    // The relay answers: the two deliveries in flight finish, then it exits.
    relay.stall(false);
    let exit = service.wait_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "{}", service.log_text());
    assert_eq!(relay.wait_for(2).len(), 2);
    assert!(
        service.log_text().contains("8 unfinished messages kept"),
        "{}",
        service.log_text()
    );
    // The sent log is written by a clean stop (not left to the next start).
    let sent_log = std::fs::read_to_string(directory.join("spool").join("sent.log")).unwrap();
    for id in &in_flight {
        assert!(sent_log.contains(id.as_str()), "{id} not in sent.log");
    }

    let restarted = ChildService::start(&directory, &env);
    // Statuses of messages sent before the stop are not kept across it.
    for id in ids.iter().filter(|id| !in_flight.contains(*id)) {
        wait_for_status(restarted.address, id, "sent");
    }
    // A clean stop sends nothing twice.
    let counts = delivered_counts(&relay);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
    assert_eq!(relay.received().len(), 10);
}

#[test]
fn sigterm_with_a_stuck_relay_exits_at_the_shutdown_timeout() {
    let InFlight {
        relay,
        directory,
        env,
        mut service,
        ids,
        in_flight,
    } = start_with_deliveries_in_flight("stuck", 2, 6, &[("MAILROOM_SHUTDOWN_TIMEOUT_MS", "1000")]);

    let signalled = Instant::now();
    service.signal("TERM");
    let exit = service.wait_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "{}", service.log_text());
    assert!(
        signalled.elapsed() >= Duration::from_millis(1000),
        "it waited for the deliveries in flight"
    );
    assert!(service.log_text().contains("shutdown timeout reached"));
    relay.stall(false);

    let restarted = ChildService::start(&directory, &env);
    for id in &ids {
        wait_for_status(restarted.address, id, "sent");
    }
    assert!(assert_delivered_at_least_once(&relay, &ids, &in_flight) <= 2);
}

#[test]
fn retry_schedule_survives_a_restart() {
    let relay = TestRelay::plain();
    relay.reply_to_next_mail(&[(451, "4.3.0 Try again later"); 2]);
    let directory = temp_dir("retry");
    let env = variables(
        &relay.url(),
        &directory.join("spool"),
        &[
            // Long enough for a kill and a restart between the attempts.
            ("MAILROOM_RETRY_BASE_MS", "8000"),
            ("MAILROOM_RETRY_MAX_MS", "8000"),
            ("MAILROOM_MAX_ATTEMPTS", "2"),
        ],
    );
    let mut service = ChildService::start(&directory, &env);
    let id = accept(service.address, 1, "retry")[0].clone();
    let before = wait_for_status(service.address, &id, "retrying");
    assert_eq!(before["attempts"], 1);
    service.kill_hard();

    let restarted = ChildService::start(&directory, &env);
    let after = status(restarted.address, &id);
    if after["status"] == "retrying" {
        assert_eq!(after["attempts"], 1, "{after}");
        assert_eq!(
            after["next_attempt_at"], before["next_attempt_at"],
            "{after}"
        );
        assert!(after["last_error"].as_str().unwrap().contains("451"));
    }
    // The second attempt is the last one (MAILROOM_MAX_ATTEMPTS=2): had the
    // count restarted, it would be retried and sent instead.
    let last = wait_for_status(restarted.address, &id, "failed");
    assert_eq!(last["attempts"], 2, "{last}");
    assert!(
        last["last_error"].as_str().unwrap().contains("451"),
        "{last}"
    );
    assert!(relay.received().is_empty());
}

/// What became of one keyed message across a kill -9 and a restart.
struct AfterRestart {
    id: String,
    /// Its status before the kill and after the restart.
    before: serde_json::Value,
    after: serde_json::Value,
    /// The same request with the same `Idempotency-Key`, after the restart.
    repeat: HttpReply,
    spool: PathBuf,
}

/// Posts one message to `receiver` with an `Idempotency-Key`, waits until
/// its status is `state`, kills the service (-9), starts it again on the same
/// spool and posts the same request again.
fn finish_then_restart(relay: &TestRelay, name: &str, receiver: &str, state: &str) -> AfterRestart {
    finish_then_restart_through(relay, ("/api/mail", 202), name, receiver, state)
}

/// As [`finish_then_restart`], posting (both times) to `path`, whose first
/// answer is `first_code`.
fn finish_then_restart_through(
    relay: &TestRelay,
    (path, first_code): (&str, u16),
    name: &str,
    receiver: &str,
    state: &str,
) -> AfterRestart {
    let directory = temp_dir(name);
    let spool = directory.join("spool");
    let env = variables(&relay.url(), &spool, &[]);
    let body = seed_body(receiver, name);
    let headers = [("Idempotency-Key", name)];
    let mut service = ChildService::start(&directory, &env);
    let reply = request(service.address, "POST", path, &headers, body.as_bytes());
    assert_eq!(reply.code, first_code, "{}", reply.body_text());
    let id = reply.id();
    wait_for_status(service.address, &id, state);
    let before = status(service.address, &id);
    service.kill_hard();

    let restarted = ChildService::start(&directory, &env);
    let after = status(restarted.address, &id);
    let repeat = request(restarted.address, "POST", path, &headers, body.as_bytes());
    AfterRestart {
        id,
        before,
        after,
        repeat,
        spool,
    }
}

#[test]
fn dead_letters_stay_readable_after_a_restart() {
    let relay = TestRelay::plain();
    relay.refuse_recipient("nobody@example.org", 550, "5.1.1 No such user here");
    let outcome = finish_then_restart(&relay, "dead-letter-1", "nobody@example.org", "failed");
    let (id, dead) = (&outcome.id, &outcome.after);
    assert!(outcome
        .spool
        .join("dead")
        .join(format!("{id}.json"))
        .is_file());
    assert_eq!(dead["status"], "failed", "{dead}");
    assert_eq!(dead["attempts"], 1);
    assert!(
        dead["last_error"].as_str().unwrap().contains("550"),
        "{dead}"
    );
    // The idempotency key survived too: the repeat queues nothing new.
    assert_eq!(outcome.repeat.code, 202);
    assert_eq!(&outcome.repeat.id(), id);
    assert!(relay.received().is_empty());
}

#[test]
fn sent_statuses_and_their_idempotency_keys_survive_a_restart() {
    let relay = TestRelay::plain();
    let outcome = finish_then_restart(&relay, "sent-before-restart", "user@example.org", "sent");
    let (before, after) = (&outcome.before, &outcome.after);
    assert_eq!(after["status"], "sent", "{after}");
    for field in ["attempts", "created_at", "last_error", "next_attempt_at"] {
        assert_eq!(after[field], before[field], "{field}: {before} / {after}");
    }
    // A client retrying after the restart gets the same id, and nothing is
    // sent twice.
    assert_eq!(outcome.repeat.code, 202, "{}", outcome.repeat.body_text());
    assert_eq!(outcome.repeat.id(), outcome.id);
    assert_eq!(relay.received().len(), 1);
}

#[test]
fn v2_statuses_and_their_idempotency_keys_survive_a_restart() {
    let relay = TestRelay::plain();
    relay.refuse_recipient("nobody@example.org", 553, "5.1.3 Bad recipient address");
    let sent = finish_then_restart_through(
        &relay,
        ("/api/mail/v2", 200),
        "v2-sent",
        "user@example.org",
        "sent",
    );
    assert_eq!(sent.after["status"], "sent", "{}", sent.after);
    assert_eq!(sent.after["created_at"], sent.before["created_at"]);
    // The repeat after the restart is answered from the first send.
    assert_eq!(sent.repeat.code, 200, "{}", sent.repeat.body_text());
    assert_eq!(sent.repeat.id(), sent.id);
    assert_eq!(relay.received().len(), 1);

    let failed = finish_then_restart_through(
        &relay,
        ("/api/mail/v2", 502),
        "v2-failed",
        "nobody@example.org",
        "failed",
    );
    assert_eq!(failed.after["status"], "failed", "{}", failed.after);
    // Kept as a dead letter, as every permanently failed message.
    assert!(failed
        .spool
        .join("dead")
        .join(format!("{}.json", failed.id))
        .is_file());
    assert!(
        failed.after["last_error"].as_str().unwrap().contains("553"),
        "{}",
        failed.after
    );
    assert_eq!(failed.repeat.code, 502, "{}", failed.repeat.body_text());
    assert_eq!(failed.repeat.id(), failed.id);
    assert_eq!(relay.received().len(), 1, "nothing more was sent");
}

#[test]
fn notify_socket_gets_ready_then_stopping() {
    let relay = TestRelay::plain();
    let directory = temp_dir("notify");
    let socket_path = directory.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut env = variables(&relay.url(), &directory.join("spool"), &[]);
    env.push(("NOTIFY_SOCKET", socket_path.display().to_string()));
    let mut service = ChildService::start(&directory, &env);

    let mut buffer = [0u8; 256];
    let length = socket
        .recv(&mut buffer)
        .expect("READY=1 within the deadline");
    assert_eq!(&buffer[..length], b"READY=1");
    // Ready means ready: the API answers.
    assert_eq!(accept(service.address, 1, "notify").len(), 1);

    service.signal("TERM");
    let length = socket
        .recv(&mut buffer)
        .expect("STOPPING=1 within the deadline");
    assert_eq!(&buffer[..length], b"STOPPING=1");
    assert_eq!(service.wait_exit(PATIENCE).code(), Some(0));
}

#[test]
fn memory_mode_sigterm_reports_dropped_messages() {
    let (port, reserved) = unused_port();
    drop(reserved); // nothing listens: every attempt fails to connect
    let directory = temp_dir("memory");
    let env = variables(
        &format!("smtp://127.0.0.1:{port}"),
        Path::new("none"),
        &[
            ("MAILROOM_RETRY_BASE_MS", "60000"),
            ("MAILROOM_RETRY_MAX_MS", "60000"),
            ("MAILROOM_SHUTDOWN_TIMEOUT_MS", "2000"),
        ],
    );
    let mut service = ChildService::start(&directory, &env);
    let ids = accept(service.address, 4, "undeliverable");
    for id in &ids {
        wait_for_status(service.address, id, "retrying");
    }
    service.signal("TERM");
    let exit = service.wait_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "{}", service.log_text());
    let log = service.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("MAILROOM_SPOOL_DIR=none") && line.contains("WARN")),
        "a warning at start: {log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("4 messages dropped") && line.contains("WARN")),
        "{log}"
    );
    assert!(
        !directory.join("none").exists(),
        "no spool directory named none"
    );
}

/// Accepts 5 messages with the relay stalled, kills the service, and
/// returns the ids and the newest journal segment.
fn crash_with_five_queued(relay: &TestRelay, directory: &Path) -> (Vec<String>, PathBuf) {
    relay.stall(true);
    let env = variables(
        &relay.url(),
        &directory.join("spool"),
        &[("MAILROOM_WORKERS", "1")],
    );
    let mut service = ChildService::start(directory, &env);
    let ids = accept(service.address, 5, "corrupt");
    wait_until("the worker holds a message", || {
        relay.stalled_sessions() >= 1
    });
    service.kill_hard();
    relay.stall(false);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(directory.join("spool").join("journal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    segments.sort();
    (ids, segments.pop().expect("a journal segment"))
}

/// Where the records of a journal segment end (zero-filled space follows).
fn data_end(segment: &[u8]) -> usize {
    segment.iter().rposition(|byte| *byte != 0).unwrap() + 1
}

fn set_aside(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory.join("spool").join("corrupt"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_torn_write_at_the_journal_tail_loses_nothing() {
    let relay = TestRelay::plain();
    let directory = temp_dir("torn");
    let (ids, segment) = crash_with_five_queued(&relay, &directory);
    // What a crash in the middle of writing a record (never acknowledged)
    // leaves after the last one: the start of a frame, then zeros.
    let mut data = std::fs::read(&segment).unwrap();
    let end = data_end(&data);
    let torn = b"mrj1\x00\x02\x00\x00\x12\x34\x56\x78{\"store\":{\"mess";
    data.truncate(end);
    data.extend_from_slice(torn);
    data.extend_from_slice(&[0; 300]);
    std::fs::write(&segment, &data).unwrap();

    let env = variables(&relay.url(), &directory.join("spool"), &[]);
    let restarted = ChildService::start(&directory, &env);
    for id in &ids {
        wait_for_status(restarted.address, id, "sent");
    }
    assert_eq!(
        set_aside(&directory).len(),
        1,
        "{:?}",
        set_aside(&directory)
    );
    assert!(
        restarted.log_text().contains("unreadable"),
        "{}",
        restarted.log_text()
    );
    assert!(restarted
        .log_text()
        .contains("recovered 5 unfinished messages"));
}

#[test]
fn truncated_and_garbage_spool_data_is_set_aside_and_the_rest_delivered() {
    let relay = TestRelay::plain();
    let directory = temp_dir("corrupt");
    let (ids, segment) = crash_with_five_queued(&relay, &directory);
    let spool = directory.join("spool");
    // The last record cut short (as if the disk lost acknowledged data),
    // a garbage segment, a stray file and a garbage dead letter.
    let end = data_end(&std::fs::read(&segment).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(end as u64 - 10)
        .unwrap();
    std::fs::write(
        spool.join("journal").join("0000000000000000.journal"),
        b"\0\x01 this is not a journal",
    )
    .unwrap();
    std::fs::write(spool.join("journal").join("notes.txt"), b"hello").unwrap();
    std::fs::write(spool.join("dead").join("0123.json"), b"{\"message\":").unwrap();

    let env = variables(&relay.url(), &spool, &[]);
    let restarted = ChildService::start(&directory, &env);
    for id in &ids[..4] {
        wait_for_status(restarted.address, id, "sent");
    }
    assert_eq!(
        set_aside(&directory).len(),
        4,
        "{:?}",
        set_aside(&directory)
    );
    let counts = delivered_counts(&relay);
    assert!(
        !counts.contains_key(&ids[4]),
        "a torn message is never sent"
    );
    assert_eq!(
        request(
            restarted.address,
            "GET",
            &format!("/api/mail/{}", ids[4]),
            &[],
            b""
        )
        .code,
        404
    );
    // Set aside once: the next start finds a clean spool.
    drop(restarted);
    let again = ChildService::start(&directory, &env);
    assert!(
        !again.log_text().contains("unreadable"),
        "{}",
        again.log_text()
    );
    assert_eq!(set_aside(&directory).len(), 4);
}

/// One POST on a fresh connection; the id when a whole 202 answer arrived,
/// `None` when the service is gone (or answered anything else).
fn try_post(address: SocketAddr, body: &str) -> Option<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let head = format!(
        "POST /api/mail HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8(answer).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 202") {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json["data"]["id"].as_str().map(str::to_string)
}

#[test]
fn random_kills_during_a_burst_lose_no_accepted_message() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    const ROUNDS: usize = 4;
    const CLIENTS: usize = 16;
    const WORKERS: usize = 4;
    let relay = TestRelay::plain();
    let directory = temp_dir("random-kill");
    let env = variables(
        &relay.url(),
        &directory.join("spool"),
        &[("MAILROOM_WORKERS", &WORKERS.to_string())],
    );
    let mut accepted: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let mut service = ChildService::start(&directory, &env);
        let address = service.address;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for index in 0..1000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let subject = format!("round {round} client {client} #{index}");
                        match try_post(address, &seed_body("user@example.org", &subject)) {
                            Some(id) => {
                                ids.push(id);
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            None => break,
                        }
                    }
                    ids
                })
            })
            .collect();
        // A random point of the burst: after 20 to 1000 accepted messages.
        let kill_after = 20 + (mailroom::message::random_u64() % 980) as usize;
        wait_until("enough messages are accepted", || {
            count.load(Ordering::SeqCst) >= kill_after
        });
        service.kill_hard();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            accepted.extend(client.join().unwrap());
        }
    }

    let restarted = ChildService::start(&directory, &env);
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        let counts = delivered_counts(&relay);
        let missing = accepted
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} accepted messages never arrived: {}",
            accepted.len(),
            restarted.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let counts = delivered_counts(&relay);
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    // Only messages in flight at a kill may go twice: at most two per
    // worker, the one it is sending and the one whose `sent` record is
    // being written (docs/durability.md).
    assert!(
        duplicates <= 2 * WORKERS * ROUNDS,
        "{duplicates} duplicates over {ROUNDS} kills with {WORKERS} workers"
    );
    assert!(counts.values().all(|count| *count <= 1 + ROUNDS));
    eprintln!(
        "{} accepted over {ROUNDS} kills, {duplicates} delivered twice",
        accepted.len()
    );
}

#[test]
fn sigterm_during_a_burst_keeps_every_accepted_message() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let relay = TestRelay::plain();
    let directory = temp_dir("sigterm-burst");
    let env = variables(
        &relay.url(),
        &directory.join("spool"),
        &[("MAILROOM_SHUTDOWN_TIMEOUT_MS", "5000")],
    );
    let mut service = ChildService::start(&directory, &env);
    let address = service.address;
    let count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|client| {
            let count = Arc::clone(&count);
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                // Until the service refuses (503) or is gone.
                for index in 0..2000 {
                    let subject = format!("client {client} #{index}");
                    match try_post(address, &seed_body("user@example.org", &subject)) {
                        Some(id) => {
                            ids.push(id);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        None => break,
                    }
                }
                ids
            })
        })
        .collect();
    wait_until("a few hundred messages are accepted", || {
        count.load(Ordering::SeqCst) >= 300
    });
    service.signal("TERM");
    let exit = service.wait_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "{}", service.log_text());
    let accepted: Vec<String> = clients
        .into_iter()
        .flat_map(|client| client.join().unwrap())
        .collect();

    let _restarted = ChildService::start(&directory, &env);
    let deadline = Instant::now() + PATIENCE;
    let counts = loop {
        let counts = delivered_counts(&relay);
        if accepted.iter().all(|id| counts.contains_key(id)) {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "an accepted message never arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A clean stop finishes what it started: nothing goes twice.
    assert!(
        counts.values().all(|count| *count == 1),
        "duplicates after SIGTERM"
    );
}

#[test]
fn a_second_process_on_the_same_spool_refuses_to_start() {
    let relay = TestRelay::plain();
    let directory = temp_dir("second");
    let spool = directory.join("spool");
    let first = ChildService::start(&directory, &variables(&relay.url(), &spool, &[]));
    let (port, reserved) = unused_port();
    drop(reserved);
    let log = directory.join("second.log");
    // Killed on drop, should it start after all.
    struct Second(std::process::Child);
    impl Drop for Second {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .current_dir(&directory)
        .env_clear()
        .env("MAILROOM_LISTEN", format!("127.0.0.1:{port}"))
        .env("MAILROOM_SMTP_URL", relay.url())
        .env("MAILROOM_SPOOL_DIR", &spool)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut second = Second(child);
    let mut status = None;
    wait_until("the second process exits", || {
        status = second.0.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(1));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("MAILROOM_SPOOL_DIR") && stderr.contains("in use by another mailroom"),
        "{stderr}"
    );
    // The first one is unharmed.
    assert_eq!(accept(first.address, 1, "still here").len(), 1);
}
