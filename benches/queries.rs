//! List queries over many retained statuses: N messages (100,000, the
//! default `MAILROOM_STATUS_RETENTION`) go through the engine to the bench
//! sink, one in ten to a recipient it refuses (so some end `failed`), each
//! with one of 10 tags and one of 100 recipients; then `Engine::list` (what
//! `GET /api/mail` calls) by filter: none, status, recipient, tag; the first
//! page and a page deep in (half way through the matching messages,
//! reached by following cursors). Prints latencies (medians of
//! repetitions); asserts nothing.
//!
//! `cargo bench --bench queries`; BENCH_RETAINED (100000), BENCH_ROUNDS.

mod common;

use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{config_for, env_number, heading, median_duration, ms, rounds};
use mailroom::{Engine, ListQuery, MailRequest, State};

fn request(index: u64) -> MailRequest {
    let receiver = if index % 10 == 9 {
        "refused@example.org".to_string()
    } else {
        format!("user{}@example.org", index % 100)
    };
    MailRequest::from_json(
        serde_json::json!({
            "sender": "App <app@example.com>",
            "receiver": receiver,
            "subject": "Welcome",
            "message": "Hello from mailroom",
            "tags": [format!("tag{}", index % 10)],
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid request")
}

/// The cursor of the page `pages` pages into `query`'s results.
fn cursor_after(engine: &Engine, query: &ListQuery, pages: usize) -> Option<String> {
    let mut cursor = None;
    for _ in 0..pages {
        let mut next = query.clone();
        next.cursor = cursor.clone();
        let page = engine.list(&next).expect("a page");
        cursor = page.next_cursor;
        cursor.as_ref()?;
    }
    cursor
}

fn time(engine: &Engine, query: &ListQuery, repeat: usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(repeat);
    let mut found = 0;
    for _ in 0..repeat {
        let started = Instant::now();
        let page = engine.list(query).expect("a page");
        times.push(started.elapsed());
        found = page.messages.len();
    }
    (median_duration(&times), found)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    heading("queries: GET /api/mail's list through the engine, many retained statuses");
    let count = env_number("BENCH_RETAINED", 100_000);
    let sink = Sink::start(SinkOptions::default());
    sink.relay()
        .refuse_recipient("refused@example.org", 550, "5.7.1 refused");
    let mut config = config_for(&sink, 5, count as usize + 16);
    config.status_retention = count as usize;
    config.suppress_on_bounce = false;
    let engine = Engine::start(config).expect("the engine starts");
    let started = Instant::now();
    for index in 0..count {
        engine.submit(&request(index), None).expect("accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while engine.unfinished() > 0 && Instant::now() < deadline {
        // Polling the engine's count, as a user polls /api/stats.
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{count} messages submitted and finished in {:.1} s ({} left unfinished); page size {}",
        started.elapsed().as_secs_f64(),
        engine.unfinished(),
        ListQuery::DEFAULT_LIMIT
    );
    let with = |change: &dyn Fn(&mut ListQuery)| {
        let mut query = ListQuery::new();
        change(&mut query);
        query
    };
    let filters: Vec<(&str, ListQuery, u64)> = vec![
        ("none", ListQuery::new(), count),
        (
            "status=failed",
            with(&|query| query.state = Some(State::Failed)),
            count / 10,
        ),
        (
            "status=sent",
            with(&|query| query.state = Some(State::Sent)),
            count - count / 10,
        ),
        (
            "recipient=user7@example.org",
            with(&|query| query.recipient = Some("user7@example.org".into())),
            count / 100,
        ),
        (
            "tag=tag3",
            with(&|query| query.tag = Some("tag3".into())),
            count / 10,
        ),
    ];
    let repeat = 20 * rounds();
    println!(
        "{:<30} {:>9} {:>14} {:>22}",
        "filter", "matching", "first page ms", "page half way in ms"
    );
    for (name, query, matching) in filters {
        let (first, found) = time(&engine, &query, repeat);
        let pages = (matching as usize / ListQuery::DEFAULT_LIMIT / 2).max(1);
        let deep = match cursor_after(&engine, &query, pages) {
            Some(cursor) => {
                let mut deep_query = query.clone();
                deep_query.cursor = Some(cursor);
                format!(
                    "{} (page {})",
                    ms(time(&engine, &deep_query, repeat).0),
                    pages + 1
                )
            }
            None => "-".into(),
        };
        println!(
            "{name:<30} {matching:>9} {:>14} {deep:>22}{}",
            ms(first),
            if found == 0 { "  (no results!)" } else { "" }
        );
    }
    engine.shutdown();
}
