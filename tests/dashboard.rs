//! The dashboard at `/`: its page and assets over plain HTTP (headers,
//! methods, caching, no token needed), and the page itself in a real
//! headless Chromium driven over WebDriver, against the service with a
//! real SMTP relay in-process.
//!
//! The browser tests (module `browser`) print `SKIPPED: ...` and pass when
//! Chromium or ChromeDriver is missing, unless `MAILROOM_REQUIRE_BROWSER=1`
//! (as in CI), which makes that a failure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;
use serde_json::{json, Value};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

fn with_token(config: mailroom::Config, token: &str) -> Service {
    let mut http = http_settings();
    http.api_token = Some(mailroom::config::Secret::new(token));
    Service::start_with(config, http)
}

#[test]
fn page_and_assets_need_no_token_and_carry_strict_headers() {
    let relay = TestRelay::plain();
    let service = with_token(config_for(&relay), "s3cret-dashboard");
    assert_eq!(
        service.get("/api/stats").code,
        401,
        "the API still needs it"
    );

    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "<!doctype html>"),
        (
            "/dashboard/app.js",
            "text/javascript; charset=utf-8",
            "'use strict'",
        ),
        ("/dashboard/style.css", "text/css; charset=utf-8", ":root"),
    ] {
        let reply = service.get(path);
        assert_eq!(reply.code, 200, "GET {path}: {}", reply.body_text());
        assert_eq!(reply.header("Content-Type"), Some(content_type), "{path}");
        assert_eq!(reply.header("Content-Security-Policy"), Some(CSP), "{path}");
        assert_eq!(reply.header("X-Content-Type-Options"), Some("nosniff"));
        assert_eq!(reply.header("X-Frame-Options"), Some("DENY"));
        assert_eq!(reply.header("Referrer-Policy"), Some("no-referrer"));
        assert_eq!(reply.header("Cache-Control"), Some("no-cache"));
        assert!(reply.body_text().contains(marker), "{path}");
        assert!(!reply.body_text().contains("s3cret"), "{path}");

        // Revalidation: the same tag is a 304 without a body.
        let etag = reply.header("ETag").expect("an ETag").to_string();
        let again = request(
            service.address,
            "GET",
            path,
            &[("If-None-Match", &etag)],
            b"",
        );
        assert_eq!(again.code, 304, "{path}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("ETag"), Some(etag.as_str()));
        let stale = request(
            service.address,
            "GET",
            path,
            &[("If-None-Match", "\"0000000000000000\"")],
            b"",
        );
        assert_eq!(stale.code, 200);

        for method in ["POST", "PUT", "DELETE"] {
            let refused = request(service.address, method, path, &[], b"");
            assert_eq!(refused.code, 405, "{method} {path}");
            assert_eq!(refused.header("Allow"), Some("GET, HEAD"));
            assert_eq!(refused.json()["data"]["error"], "allowed: GET, HEAD");
        }
    }

    let (head, body) = head_request(service.address, "/");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Security-Policy: "), "{head}");
    assert!(body.is_empty(), "HEAD has no body: {} bytes", body.len());

    let missing = service.get("/dashboard/missing.js");
    assert_eq!(missing.code, 404);
    assert_eq!(missing.header("Content-Type"), Some("application/json"));
}

/// A HEAD request; its head and whatever came after it (nothing, if right).
fn head_request(address: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "HEAD {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete head");
    (
        String::from_utf8_lossy(&answer[..split]).into_owned(),
        answer[split + 4..].to_vec(),
    )
}

mod browser {
    use std::io::Write as _;
    use std::path::PathBuf;

    use mailroom_testkit::webdriver::{self, Browser, ENTER, ESCAPE};

    use super::*;

    /// The browser, or `None` (after a `SKIPPED:` line) when it is not
    /// installed and not required.
    fn browser(width: u32, height: u32) -> Option<Browser> {
        let Some(missing) = webdriver::missing() else {
            return Some(Browser::start(width, height));
        };
        let advice = "install Debian's chromium and chromium-driver";
        if std::env::var("MAILROOM_REQUIRE_BROWSER").is_ok_and(|value| value == "1") {
            panic!("MAILROOM_REQUIRE_BROWSER=1 but {missing}: {advice}");
        }
        // Straight to stderr: libtest would swallow a println! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: dashboard browser test: {missing} ({advice})"
        );
        None
    }

    /// Screenshots go next to the build, for a person to look at.
    fn screenshot_path(name: &str) -> PathBuf {
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        target.parent().unwrap_or(&target).join(name)
    }

    fn api(service: &Service, path: &str) -> Value {
        let reply = service.get(path);
        assert_eq!(reply.code, 200, "GET {path}: {}", reply.body_text());
        reply.json()["data"].clone()
    }

    fn page_url(service: &Service) -> String {
        format!("http://{}/", service.address)
    }

    fn wait_loaded(browser: &Browser) {
        browser.wait_until("the dashboard to load its figures", |browser| {
            Ok(browser
                .execute("return document.body.dataset.loaded === 'true';", json!([]))?
                .as_bool()
                .filter(|loaded| *loaded))
        });
    }

    /// What the page shows at a glance, read from the DOM as displayed.
    fn page_figures(browser: &Browser) -> Value {
        browser
            .execute(
                "const text = (id) => document.getElementById(id).textContent;\
                 return {\
                   queue_depth: text('queue-depth'), retry_depth: text('retry-depth'),\
                   scheduled: text('scheduled'), webhooks_pending: text('webhooks-pending'),\
                   sent_hour: text('sent-hour'), failed_hour: text('failed-hour'),\
                   relay_status: text('relay-status'), relay_error: text('relay-error'),\
                   minutes: [...document.querySelectorAll('#chart g.minute')].map((g) => ({\
                     minute: g.dataset.minute, sent: Number(g.dataset.sent),\
                     failed: Number(g.dataset.failed) })),\
                 };",
                json!([]),
            )
            .expect("the figures can be read")
    }

    /// The number a figure shows (digits only: the page groups thousands).
    fn shown_number(figures: &Value, name: &str) -> u64 {
        let digits: String = figures[name]
            .as_str()
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("{name} shows {}", figures[name]))
    }

    fn assert_figures_match(figures: &Value, stats: &Value) {
        for name in ["queue_depth", "retry_depth", "scheduled"] {
            assert_eq!(
                shown_number(figures, name),
                stats[name].as_u64().unwrap(),
                "{name}: page {figures} API {stats}"
            );
        }
        match stats.get("webhooks_pending").and_then(Value::as_u64) {
            Some(pending) => assert_eq!(shown_number(figures, "webhooks_pending"), pending),
            None => assert_eq!(figures["webhooks_pending"], "unknown"),
        }
        let minutes = stats["last_hour"].as_array().unwrap();
        let total = |field: &str| -> u64 {
            minutes
                .iter()
                .map(|minute| minute[field].as_u64().unwrap())
                .sum()
        };
        assert_eq!(shown_number(figures, "sent_hour"), total("sent"));
        assert_eq!(shown_number(figures, "failed_hour"), total("failed"));
        assert_eq!(figures["relay_status"], stats["relay"]["status"]);
        assert_eq!(
            figures["relay_error"].as_str().unwrap(),
            stats["relay"]["last_error"].as_str().unwrap_or("none")
        );
        // The chart has the API's 60 minutes; a minute may have turned
        // between the two reads, so compare the minutes both have.
        let drawn = figures["minutes"].as_array().unwrap();
        assert_eq!(drawn.len(), minutes.len(), "one bar group per minute");
        let mut common = 0;
        for minute in minutes {
            if let Some(bar) = drawn.iter().find(|bar| bar["minute"] == minute["minute"]) {
                assert_eq!(bar["sent"], minute["sent"], "{}", minute["minute"]);
                assert_eq!(bar["failed"], minute["failed"], "{}", minute["minute"]);
                common += 1;
            }
        }
        assert!(common >= minutes.len() - 1, "chart minutes {drawn:?}");
    }

    fn submit(service: &Service, body: Value) -> String {
        let reply = service.post("/api/mail", &body.to_string());
        assert_eq!(reply.code, 202, "{}", reply.body_text());
        reply.id()
    }

    fn mail(receiver: &str, subject: &str, tags: &[&str]) -> Value {
        json!({
            "sender": "App <app@example.com>",
            "receiver": receiver,
            "subject": subject,
            "message": "Hello from the dashboard test",
            "tags": tags,
        })
    }

    fn detail_status(browser: &Browser, status: &str) {
        let selector = format!("#detail[open] #detail-fields[data-status=\"{status}\"]");
        browser.wait_until(&format!("the detail to show {status}"), |browser| {
            Ok(browser.visible_text(&selector)?.map(drop))
        });
    }

    fn timeline(browser: &Browser) -> Vec<String> {
        browser
            .execute(
                "return [...document.querySelectorAll('#timeline li')].map((li) => li.dataset.type);",
                json!([]),
            )
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|kind| kind.as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn row_ids(browser: &Browser, table: &str) -> Vec<String> {
        browser
            .execute(
                "return [...document.querySelectorAll(arguments[0] + ' tbody tr')].map((tr) => tr.dataset.id);",
                json!([table]),
            )
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The console has nothing but the API's refusals that the test
    /// provoked (`expected`): no script error, no CSP refusal.
    fn console_clean(browser: &Browser, expected: &[&str]) {
        let unexpected: Vec<String> = browser
            .console()
            .into_iter()
            .filter(|line| line.starts_with("SEVERE") || line.starts_with("WARNING"))
            .filter(|line| !expected.iter().any(|code| line.contains(code)))
            .collect();
        assert!(unexpected.is_empty(), "console: {unexpected:#?}");
    }

    fn no_horizontal_overflow(browser: &Browser) {
        let sizes = browser
            .execute(
                "return [document.documentElement.scrollWidth, window.innerWidth];",
                json!([]),
            )
            .unwrap();
        assert!(
            sizes[0].as_u64() <= sizes[1].as_u64(),
            "the page is wider than the screen: {sizes}"
        );
    }

    #[test]
    fn dashboard_shows_the_figures_and_failures_and_acts_on_messages() {
        let Some(browser) = browser(1280, 900) else {
            return;
        };
        let relay = TestRelay::plain();
        let mut config = config_for(&relay);
        // One worker: a message stalled at the relay keeps the next queued.
        config.workers = 1;
        let service = Service::start(config);

        relay.reply_to_next_mail(&[
            (550, "5.7.1 relaying denied for retry@example.org"),
            // Markup in a reply is text to the page, never elements.
            (
                554,
                "5.7.1 Message rejected: <b>no SPF record</b> allows this host <img src=x>",
            ),
        ]);
        let failed = submit(&service, mail("retry@example.org", "will fail", &["dash"]));
        service.wait_for_status(&failed, "failed");
        let other = submit(&service, mail("stays@example.org", "fails for good", &[]));
        service.wait_for_status(&other, "failed");
        let sent = submit(&service, mail("ok@example.org", "goes through", &["dash"]));
        service.wait_for_status(&sent, "sent");
        relay.wait_for(1);

        // The per-minute counters are settled once the API shows them.
        let stats = browser.wait_until("the API to count the outcomes", |_| {
            let stats = api(&service, "/api/stats");
            let sum = |field: &str| -> u64 {
                stats["last_hour"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|minute| minute[field].as_u64().unwrap())
                    .sum()
            };
            Ok((sum("sent") == 1 && sum("failed") == 2).then_some(stats))
        });

        browser.goto(&page_url(&service));
        wait_loaded(&browser);
        assert_figures_match(&page_figures(&browser), &stats);
        // And again after a refresh, against the API's answer then.
        browser.click("#refresh");
        assert_figures_match(&page_figures(&browser), &api(&service, "/api/stats"));

        // Both failures are listed with the relay's reply.
        let row = format!("#failures tbody tr[data-id=\"{failed}\"]");
        let reply = browser.wait_for_text(&format!("{row} .reply"), |text| {
            text.contains("5.7.1 relaying denied for retry@example.org")
        });
        assert!(reply.contains("550"), "the SMTP code too: {reply}");
        assert_eq!(
            row_ids(&browser, "#failures"),
            [other.clone(), failed.clone()]
        );
        browser.wait_for_text(
            &format!("#failures tr[data-id=\"{other}\"] .reply"),
            |text| text.contains("<b>no SPF record</b> allows this host <img src=x>"),
        );
        let elements = browser
            .execute(
                "return document.querySelectorAll('#failures b, #failures img').length;",
                json!([]),
            )
            .unwrap();
        assert_eq!(elements, 0, "the reply's markup was not parsed");
        browser.wait_for_text(&format!("{row} td[data-label=Recipients]"), |text| {
            text == "retry@example.org"
        });
        no_horizontal_overflow(&browser);
        browser.screenshot_full_page(&screenshot_path("dashboard.png"));

        // Keyboard: Enter on the message's button opens it, Escape closes it
        // and gives the focus back.
        let open = format!("{row} button.open");
        browser
            .execute(
                "document.querySelector(arguments[0]).focus();",
                json!([open]),
            )
            .unwrap();
        let focused = browser.active_element().unwrap();
        browser.send_keys(&focused, ENTER).unwrap();
        detail_status(&browser, "failed");
        assert_eq!(browser.visible_text("#detail-id").unwrap().unwrap(), failed);
        assert_eq!(timeline(&browser), ["accepted", "attempt", "failed"]);
        let attempt = browser.wait_for_text("#timeline li[data-type=attempt]", |text| {
            text.contains("550")
        });
        assert!(attempt.contains("relaying denied"), "{attempt}");
        assert!(browser.visible_text("#retry").unwrap().is_some());
        assert!(
            browser.visible_text("#cancel").unwrap().is_none(),
            "failed: no cancel"
        );
        browser.screenshot(&screenshot_path("dashboard-detail.png"));
        let focused = browser.active_element().unwrap();
        browser.send_keys(&focused, ESCAPE).unwrap();
        browser.wait_until("the detail to close", |browser| {
            Ok(browser.visible_text("#detail")?.is_none().then_some(()))
        });
        let focus = browser
            .execute(
                "return document.activeElement.dataset.id || null;",
                json!([]),
            )
            .unwrap();
        assert_eq!(focus, failed.as_str(), "focus back on the message's button");

        // Retry: the page shows the answer, then follows the message to sent.
        browser.click(&open);
        detail_status(&browser, "failed");
        browser.click("#retry");
        let answer = browser.wait_for_text("#action-result", |text| !text.is_empty());
        assert!(answer.contains("Retry accepted (202)"), "{answer}");
        detail_status(&browser, "sent");
        let received = relay.wait_for(2);
        assert!(received.iter().any(|mail| {
            mail.parsed().subject() == Some("will fail") && mail.recipients == ["retry@example.org"]
        }));
        assert_eq!(
            api(&service, &format!("/api/mail/{failed}"))["status"],
            "sent"
        );
        assert_eq!(
            timeline(&browser),
            ["accepted", "attempt", "failed", "requeued", "attempt", "sent"]
        );
        browser.click("#close-detail");
        browser.wait_until("the retried message to leave the failures", |browser| {
            Ok((row_ids(browser, "#failures") == [other.clone()]).then_some(()))
        });

        // Cancel a queued message, found by its id.
        relay.stall(true);
        let holder = submit(&service, mail("hold@example.org", "holds the worker", &[]));
        browser.wait_until("the relay to hold the only worker", |_| {
            Ok((relay.stalled_sessions() >= 1).then_some(()))
        });
        let queued = submit(&service, mail("never@example.org", "cancel me", &["later"]));
        assert_eq!(
            api(&service, &format!("/api/mail/{queued}"))["status"],
            "queued"
        );
        browser.fill("#q-id", &queued);
        browser.click("#search-form button[type=submit]");
        detail_status(&browser, "queued");
        browser.click("#cancel");
        let answer = browser.wait_for_text("#action-result", |text| !text.is_empty());
        assert!(answer.contains("Cancelled (200)"), "{answer}");
        detail_status(&browser, "cancelled");
        assert_eq!(
            api(&service, &format!("/api/mail/{queued}"))["status"],
            "cancelled"
        );
        browser.click("#close-detail");

        // A cancel that comes too late shows the API's 409.
        let late = submit(
            &service,
            mail("late@example.org", "cancelled elsewhere", &[]),
        );
        browser.click("#search-form button[type=reset]");
        let status = browser.find("#q-status").unwrap().unwrap();
        browser.send_keys(&status, "queued").unwrap();
        browser.click("#search-form button[type=submit]");
        browser.wait_until("the queued message in the results", |browser| {
            Ok((row_ids(browser, "#results") == [late.clone()]).then_some(()))
        });
        browser.click(&format!("#results tr[data-id=\"{late}\"] button.open"));
        detail_status(&browser, "queued");
        let elsewhere = request(
            service.address,
            "DELETE",
            &format!("/api/mail/{late}"),
            &[],
            b"",
        );
        assert_eq!(elsewhere.code, 200);
        browser.click("#cancel");
        let answer = browser.wait_for_text("#action-result", |text| !text.is_empty());
        assert!(answer.contains("409"), "{answer}");
        assert!(answer.contains("cancelled"), "{answer}");
        detail_status(&browser, "cancelled");
        browser.click("#close-detail");
        relay.stall(false);
        service.wait_for_status(&holder, "sent");

        // Search by recipient, page by page (25 a page).
        let items: Vec<Value> = (0..30)
            .map(|index| mail("bulk@example.org", &format!("bulk {index}"), &["bulk"]))
            .collect();
        let batch = service.post("/api/mail/batch", &json!({ "messages": items }).to_string());
        assert_eq!(batch.code, 200, "{}", batch.body_text());
        browser.click("#search-form button[type=reset]");
        browser.fill("#q-recipient", "bulk@example.org");
        browser.click("#search-form button[type=submit]");
        browser.wait_for_text("#results-count", |text| {
            text == "25 messages, more available"
        });
        assert!(browser.visible_text("#more").unwrap().is_some());
        browser.click("#more");
        browser.wait_for_text("#results-count", |text| text == "30 messages");
        let mut ids = row_ids(&browser, "#results");
        let mut expected: Vec<String> = batch.json()["data"]["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        expected.sort();
        assert_eq!(ids, expected, "each message once");
        assert!(browser.visible_text("#more").unwrap().is_none());

        // By tag and status: the rows the API gives for the same query.
        browser.click("#search-form button[type=reset]");
        browser.fill("#q-tag", "dash");
        let status = browser.find("#q-status").unwrap().unwrap();
        browser.send_keys(&status, "sent").unwrap();
        browser.click("#search-form button[type=submit]");
        browser.wait_for_text("#results-count", |text| !text.is_empty());
        let listed: Vec<String> = api(&service, "/api/mail?tag=dash&status=sent&limit=25")
            ["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(row_ids(&browser, "#results"), listed);

        // By recipient, and an unknown id.
        browser.click("#search-form button[type=reset]");
        browser.fill("#q-recipient", "retry@example.org");
        browser.click("#search-form button[type=submit]");
        browser.wait_until("the recipient's message", |browser| {
            Ok((row_ids(browser, "#results") == [failed.clone()]).then_some(()))
        });
        browser.click("#search-form button[type=reset]");
        browser.fill("#q-id", "0123456789abcdef0123456789ab");
        browser.click("#search-form button[type=submit]");
        browser.wait_for_text("#search-error", |text| {
            text == "No message with id 0123456789abcdef0123456789ab."
        });

        // A phone's width: one column, nothing wider than the screen.
        browser.set_viewport(390, 844, true);
        browser.goto(&page_url(&service));
        wait_loaded(&browser);
        browser.wait_for_text(
            &format!("#failures tr[data-id=\"{other}\"] .reply"),
            |text| text.contains("SPF"),
        );
        no_horizontal_overflow(&browser);
        browser.screenshot_full_page(&screenshot_path("dashboard-phone.png"));
        browser.click(&format!("#failures tr[data-id=\"{other}\"] button.open"));
        detail_status(&browser, "failed");
        no_horizontal_overflow(&browser);
        browser.screenshot(&screenshot_path("dashboard-phone-detail.png"));
        console_clean(&browser, &["409 (Conflict)", "404 (Not Found)"]);
    }

    #[test]
    fn dashboard_asks_for_the_token_and_refuses_a_wrong_one() {
        let Some(browser) = browser(1000, 700) else {
            return;
        };
        // The relay is down: the message keeps retrying (an unreachable
        // relay never uses up its attempts), and the relay counts as failing.
        let (config, _) = config_with_relay_down();
        let service = with_token(config, "s3cret-dashboard");
        let bearer = [("Authorization", "Bearer s3cret-dashboard")];
        let authorized = |path: &str| {
            let reply = request(service.address, "GET", path, &bearer, b"");
            assert_eq!(reply.code, 200, "GET {path}: {}", reply.body_text());
            reply.json()["data"].clone()
        };
        let reply = request(
            service.address,
            "POST",
            "/api/mail",
            &bearer,
            mail("down@example.org", "relay down", &[])
                .to_string()
                .as_bytes(),
        );
        assert_eq!(reply.code, 202, "{}", reply.body_text());
        let id = reply.id();
        browser.wait_until("the message to be retrying with the relay down", |_| {
            let status = authorized(&format!("/api/mail/{id}"));
            Ok(
                (status["status"] == "retrying" && status["attempts"].as_u64() > Some(1))
                    .then_some(()),
            )
        });

        browser.goto(&page_url(&service));
        browser.wait_for_text("#login", |text| text.contains("API token"));
        assert!(browser.visible_text("#dashboard").unwrap().is_none());
        assert!(
            browser.visible_text("#token-error").unwrap().is_none(),
            "no error yet"
        );
        let shown = browser
            .execute(
                "return document.getElementById('queue-depth').textContent;",
                json!([]),
            )
            .unwrap();
        assert_eq!(shown, "–", "no figures without the token");

        browser.fill("#token", "not-the-token");
        browser.click("#token-form button[type=submit]");
        let error = browser.wait_for_text("#token-error", |text| !text.is_empty());
        assert!(error.contains("refused this token"), "{error}");
        assert!(error.contains("401: wrong bearer token"), "{error}");
        assert!(browser.visible_text("#dashboard").unwrap().is_none());
        browser.screenshot(&screenshot_path("dashboard-token.png"));

        browser.fill("#token", "s3cret-dashboard");
        // The keyboard submits the form too.
        let input = browser.find("#token").unwrap().unwrap();
        browser.send_keys(&input, ENTER).unwrap();
        wait_loaded(&browser);
        assert!(browser.visible_text("#login").unwrap().is_none());
        assert!(browser.visible_text("#token-error").unwrap().is_none());
        // The message goes from retrying to sending and back at every
        // attempt: compare the page with the API's answers from just
        // before and just after its refresh, once those two agree.
        let (figures, stats) = browser.wait_until("the page and the API to agree", |browser| {
            let before = authorized("/api/stats");
            browser.execute("document.body.dataset.loaded = 'false';", json!([]))?;
            browser.click("#refresh");
            wait_loaded(browser);
            let figures = page_figures(browser);
            let after = authorized("/api/stats");
            let settled = ["queue_depth", "retry_depth", "scheduled"]
                .into_iter()
                .all(|name| before[name] == after[name]);
            Ok(settled.then_some((figures, after)))
        });
        assert_eq!(stats["relay"]["status"], "failing", "{stats}");
        assert_figures_match(&figures, &stats);
        // Retrying is not failed: the failures table does not list it.
        let listed = row_ids(&browser, "#failures");
        assert!(!listed.contains(&id), "{listed:?}");
        browser.screenshot(&screenshot_path("dashboard-relay-down.png"));

        console_clean(&browser, &["401 (Unauthorized)"]);

        // Kept for the tab: a reload does not ask again; "Forget token" does.
        browser.goto(&page_url(&service));
        wait_loaded(&browser);
        browser.click("#forget-token");
        browser.wait_for_text("#login", |text| text.contains("API token"));
        let kept = browser
            .execute("return sessionStorage.length;", json!([]))
            .unwrap();
        assert_eq!(kept, 0, "the token is forgotten");
    }
}
