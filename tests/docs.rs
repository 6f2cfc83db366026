//! The documentation, checked against the service it describes:
//!
//! - docs/openapi.json and the router's table (`mailroom::http::ROUTES`)
//!   list the same routes, and each answers (not a 404 "no such path", not
//!   a 405) on a running service; the document is served at /openapi.json.
//! - Every fenced block of README.md and docs/*.md says what it is. `sh`
//!   blocks are run, as pasted, against the real binary started for the
//!   file in a directory of its own, and the answers they promise (`# →`
//!   lines, see `docs/run.rs`) are checked; `sh no-test` blocks (sudo,
//!   systemd, benchmarks, the test suite itself) are counted against the
//!   table below, so none is skipped unnoticed. `dotenv` blocks must read
//!   the same in mailroom and in `sh` (`set -a; . file`) and pass
//!   `mailroom --check`; `json schema=Name` blocks must validate.
//! - Every answer given during those runs, every promised answer and every
//!   request body of a successful request validates against the document's
//!   schemas, and its status code is documented for its operation; so do
//!   the document's own examples.
//! - .env.example and the README's configuration table name every variable;
//!   relative links resolve.

mod common;
#[path = "docs/markdown.rs"]
mod markdown;
#[path = "docs/run.rs"]
mod run;
#[path = "docs/schema.rs"]
mod schema;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::*;
use mailroom::Config;
use markdown::Block;
use run::{contains, without_ellipses, Exchange, Promise, Segment};

/// `sh no-test` blocks per file: each needs what a test cannot have
/// (sudo, systemd, a release build, the test suite itself).
const NOT_RUN: &[(&str, usize)] = &[
    ("README.md", 4),
    ("docs/api.md", 0),
    ("docs/dashboard.md", 1),
    ("docs/deliverability.md", 0),
    ("docs/durability.md", 3),
    ("docs/operations.md", 0),
    ("docs/performance.md", 1),
    ("docs/scaling.md", 1),
    ("docs/templates.md", 0),
];

/// What a block may be.
const LANGUAGES: &[&str] = &[
    "sh", "json", "dotenv", "python", "rust", "text", "http", "nginx",
];

/// The API token of docs/api.md's service (the page says so).
const API_MD_TOKEN: &str = "s3cret";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn openapi() -> Value {
    let text = std::fs::read_to_string(root().join("docs/openapi.json")).unwrap();
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// The `{name}` values of `template` in `path`, when it matches.
fn match_template(template: &str, path: &str) -> Option<usize> {
    let (mut given, mut count) = (path.split('/'), 0);
    for expected in template.split('/') {
        let segment = given.next()?;
        if expected.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            count += 1;
        } else if expected != segment {
            return None;
        }
    }
    given.next().is_none().then_some(count)
}

/// The documented operation for a request, as the router finds routes:
/// the path templates with the fewest parameters, then the method.
fn operation<'a>(document: &'a Value, method: &str, path: &str) -> Option<(&'a str, &'a Value)> {
    let method = if method == "HEAD" {
        "get".to_string()
    } else {
        method.to_lowercase()
    };
    let paths = document["paths"].as_object()?;
    let matched: Vec<(&String, &Value, usize)> = paths
        .iter()
        .filter_map(|(template, item)| match_template(template, path).map(|n| (template, item, n)))
        .collect();
    let fewest = matched.iter().map(|(_, _, n)| *n).min()?;
    matched
        .into_iter()
        .filter(|(_, _, n)| *n == fewest)
        .find_map(|(template, item, _)| item.get(&method).map(|op| (template.as_str(), op)))
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The JSON schema of an operation's answer with `code`: `Err` when the
/// code is not documented, `Ok(None)` when the answer is not JSON.
fn answer_schema<'a>(
    document: &'a Value,
    op: &'a Value,
    code: u16,
) -> Result<Option<&'a Value>, String> {
    let response = op["responses"]
        .get(code.to_string())
        .ok_or_else(|| format!("status {code} is not documented"))?;
    let response = schema::resolve(document, response);
    Ok(response
        .get("content")
        .and_then(|content| content.get("application/json"))
        .and_then(|media| media.get("schema")))
}

/// Problems with one exchange made while running a file's blocks.
fn check_exchange(document: &Value, exchange: &Exchange, place: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let what = format!("{place}: {} {}", exchange.method, exchange.path);
    let Some(code) = exchange.code else {
        return vec![format!("{what}: no answer (curl {:?})", exchange.args)];
    };
    let Some((template, op)) = operation(document, &exchange.method, &exchange.path) else {
        if ![404, 405].contains(&code) {
            problems.push(format!(
                "{what}: answered {code} but not in docs/openapi.json"
            ));
        }
        return problems;
    };
    let response = match op["responses"].get(code.to_string()) {
        Some(response) => schema::resolve(document, response),
        None => {
            problems.push(format!(
                "{what}: status {code} is not documented for {template}"
            ));
            return problems;
        }
    };
    let documented: Vec<String> = response
        .get("content")
        .and_then(Value::as_object)
        .map(|content| content.keys().map(|key| essence(key)).collect())
        .unwrap_or_default();
    let given = exchange.content_type.as_deref().map(essence);
    if !documented.is_empty() && exchange.method != "HEAD" {
        match &given {
            Some(given) if documented.contains(given) => {}
            _ => problems.push(format!(
                "{what}: Content-Type {given:?}, documented {documented:?}"
            )),
        }
    }
    if given.as_deref() == Some("application/json") && exchange.method != "HEAD" {
        if let Ok(Some(schema)) = answer_schema(document, op, code) {
            match serde_json::from_slice::<Value>(&exchange.answer) {
                Ok(answer) => {
                    if let Err(error) = schema::validate(document, schema, &answer, "answer") {
                        problems.push(format!("{what} answered {code}: {error}"));
                    }
                }
                Err(error) => problems.push(format!("{what}: answer is not JSON: {error}")),
            }
        }
    }
    // A request that succeeded must be a valid one (a batch answered 200
    // with refused items excepted).
    let refused_items = serde_json::from_slice::<Value>(&exchange.answer)
        .is_ok_and(|answer| mentions_error(&answer));
    if (200..300).contains(&code) && !refused_items {
        if let (Some(body), Some(schema)) = (
            &exchange.body,
            op.pointer("/requestBody/content/application~1json/schema"),
        ) {
            match serde_json::from_str::<Value>(body) {
                Ok(body) => {
                    if let Err(error) = schema::validate(document, schema, &body, "request") {
                        problems.push(format!("{what}: the request body {error}"));
                    }
                }
                Err(error) => problems.push(format!("{what}: the body is not JSON: {error}")),
            }
        }
    }
    problems
}

/// Whether an answer has an `error` member anywhere.
fn mentions_error(value: &Value) -> bool {
    match value {
        Value::Object(members) => members
            .iter()
            .any(|(name, member)| name == "error" || mentions_error(member)),
        Value::Array(items) => items.iter().any(mentions_error),
        _ => false,
    }
}

/// Problems with a segment's promises, given what it did.
fn check_promises(
    document: &Value,
    segment: &Segment,
    output: &(String, i32),
    last: Option<&Exchange>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (text, code) = output;
    let exit = segment
        .promises
        .iter()
        .find_map(|(_, promise)| match promise {
            Promise::Exit(code) => Some(*code),
            _ => None,
        });
    if *code != exit.unwrap_or(0) {
        problems.push(format!(
            "{}: exit status {code}, expected {}; output:\n{text}",
            segment.place,
            exit.unwrap_or(0)
        ));
    }
    let mut alternatives = Vec::new();
    for (place, promise) in &segment.promises {
        match promise {
            Promise::Exit(_) => {}
            Promise::Output(expected) => {
                if !run::glob(&format!("…{expected}…"), text) {
                    problems.push(format!("{place}: the output lacks {expected:?}:\n{text}"));
                }
            }
            Promise::Http { code, json, text } => {
                alternatives.push((place, *code, json, text));
                // The promise itself must be a documented answer.
                let Some(exchange) = last else { continue };
                let Some((template, op)) = operation(document, &exchange.method, &exchange.path)
                else {
                    continue;
                };
                match answer_schema(document, op, *code) {
                    Err(error) => problems.push(format!("{place}: {template}: {error}")),
                    Ok(Some(schema)) => {
                        if let Some(json) = json {
                            if let Err(error) = schema::validate_promise(
                                document,
                                schema,
                                &without_ellipses(json),
                                "promise",
                            ) {
                                problems.push(format!("{place}: the promised answer {error}"));
                            }
                        }
                    }
                    Ok(None) => {}
                }
            }
        }
    }
    if alternatives.is_empty() {
        return problems;
    }
    let Some(exchange) = last else {
        problems.push(format!(
            "{}: an HTTP promise but no curl above it",
            segment.place
        ));
        return problems;
    };
    let answer_text = String::from_utf8_lossy(&exchange.answer).into_owned();
    let answer_json = serde_json::from_slice::<Value>(&exchange.answer).ok();
    let kept = alternatives.iter().any(|(_, code, json, text)| {
        exchange.code == Some(*code)
            && json.as_ref().is_none_or(|json| {
                answer_json
                    .as_ref()
                    .is_some_and(|answer| contains(json, answer))
            })
            && text
                .as_ref()
                .is_none_or(|text| run::glob(&format!("…{text}…"), &answer_text))
    });
    if !kept {
        problems.push(format!(
            "{}: {} {} answered {:?} {answer_text}\nwhich is none of the promised:\n{}",
            alternatives[0].0,
            exchange.method,
            exchange.path,
            exchange.code,
            alternatives
                .iter()
                .map(|(_, code, json, text)| format!(
                    "  {code} {}",
                    json.as_ref()
                        .map_or_else(|| (*text).clone().unwrap_or_default(), Value::to_string)
                ))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    problems
}

/// A working directory like a clone's: the templates, nothing else.
fn working_directory(name: &str) -> PathBuf {
    let directory = temp_dir(name);
    let source = root().join("templates");
    for template in std::fs::read_dir(&source).unwrap().filter_map(Result::ok) {
        let target = directory.join("templates").join(template.file_name());
        std::fs::create_dir_all(&target).unwrap();
        for file in std::fs::read_dir(template.path())
            .unwrap()
            .filter_map(Result::ok)
        {
            std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
        }
    }
    directory
}

/// Runs `file`'s `sh` blocks against its own service and checks them.
fn run_file(file: &str) {
    let document = openapi();
    let blocks = markdown::blocks(&root(), file);
    let runnable: Vec<&Block> = blocks
        .iter()
        .filter(|block| block.language() == "sh" && block.attributes().is_empty())
        .collect();
    if runnable.is_empty() {
        return;
    }
    let segments = run::segments(&runnable);
    let work = working_directory("docs-work");
    // docs/api.md shows a relay that knows no nobody@example.org, and a token.
    let relay = TestRelay::plain();
    let mut variables = Vec::new();
    if file == "docs/api.md" {
        relay.refuse_recipient(
            "nobody@example.org",
            550,
            "5.1.1 <nobody@example.org>: no such user",
        );
        variables.push(("MAILROOM_SMTP_URL", relay.url()));
        variables.push(("MAILROOM_API_TOKEN", API_MD_TOKEN.to_string()));
    }
    let service = ChildService::start(&work, &variables);
    let binary = Path::new(env!("CARGO_BIN_EXE_mailroom"));
    let outcome = run::run(
        &segments,
        &work,
        &service.address.to_string(),
        binary,
        Duration::from_secs(120),
    );
    let mut problems = Vec::new();
    for (index, segment) in segments.iter().enumerate() {
        let exchanges: Vec<&Exchange> = outcome
            .exchanges
            .iter()
            .filter(|exchange| exchange.segment == index)
            .collect();
        for exchange in &exchanges {
            problems.extend(check_exchange(&document, exchange, &segment.place));
        }
        problems.extend(check_promises(
            &document,
            segment,
            &outcome.outputs[index],
            exchanges.last().copied(),
        ));
    }
    let promised = segments
        .iter()
        .map(|segment| segment.promises.len())
        .sum::<usize>();
    println!(
        "{file}: {} blocks run, {} commands segments, {} requests, {promised} promises",
        runnable.len(),
        segments.len(),
        outcome.exchanges.len()
    );
    assert!(
        problems.is_empty(),
        "{file}:\n{}\n\nservice log:\n{}",
        problems.join("\n\n"),
        service.log_text()
    );
}

#[test]
fn the_readme_works_as_pasted() {
    run_file("README.md");
}

#[test]
fn the_api_reference_works_as_pasted() {
    run_file("docs/api.md");
}

#[test]
fn the_other_docs_work_as_pasted() {
    for file in markdown::files(&root()) {
        if file != "README.md" && file != "docs/api.md" {
            run_file(&file);
        }
    }
}

/// Checks a `.env` text: the same values in mailroom (dotenvy) and in
/// `sh`, and `mailroom --check` takes it.
fn check_dotenv(text: &str, place: &str) {
    let directory = temp_dir("dotenv");
    let path = directory.join(".env");
    std::fs::write(&path, text).unwrap();
    let parsed: Vec<(String, String)> = dotenvy::from_path_iter(&path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|error| panic!("{place}: mailroom cannot read it: {error}"));
    let check = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .arg("--check")
        .current_dir(&directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{place}: mailroom --check refuses it: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let sourced = Command::new("sh")
        .args(["-c", "set -a; . ./.env; env -0"])
        .current_dir(&directory)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        sourced.status.success(),
        "{place}: sh cannot read it: {}",
        String::from_utf8_lossy(&sourced.stderr)
    );
    let environment = String::from_utf8_lossy(&sourced.stdout).into_owned();
    for (name, value) in parsed {
        assert!(
            environment
                .split('\0')
                .any(|line| line == format!("{name}={value}")),
            "{place}: sh does not read {name} as mailroom does ({value:?})"
        );
    }
}

#[test]
fn every_block_says_what_it_is() {
    let document = openapi();
    for file in markdown::files(&root()) {
        let blocks = markdown::blocks(&root(), &file);
        let mut not_run = Vec::new();
        for block in &blocks {
            let place = block.place();
            let language = block.language();
            assert!(
                LANGUAGES.contains(&language),
                "{place}: the block's info string {:?} is not one of {LANGUAGES:?} (`sh no-test` for commands a test cannot run)",
                block.info
            );
            match (language, block.attributes().as_slice()) {
                ("sh", []) => {}
                ("sh", ["no-test"]) => not_run.push(format!(
                    "{place}: {}",
                    block.text.lines().next().unwrap_or("")
                )),
                ("json", [attribute]) if attribute.starts_with("schema=") => {
                    let name = &attribute["schema=".len()..];
                    let schema = document["components"]["schemas"]
                        .get(name)
                        .unwrap_or_else(|| panic!("{place}: no schema {name}"));
                    let value: Value = serde_json::from_str(&block.text)
                        .unwrap_or_else(|error| panic!("{place}: not JSON: {error}"));
                    schema::validate_promise(&document, schema, &without_ellipses(&value), name)
                        .unwrap_or_else(|error| panic!("{place}: {error}"));
                }
                ("dotenv", []) => check_dotenv(&block.text, &place),
                // Compiled (not run) as a doctest of the library: src/lib.rs.
                ("rust", ["no_run"]) => {}
                (_, []) if !["sh", "json", "dotenv"].contains(&language) => {}
                (_, attributes) => {
                    panic!("{place}: unknown attributes {attributes:?} for {language}")
                }
            }
        }
        let expected = NOT_RUN
            .iter()
            .find(|(name, _)| *name == file)
            .map(|(_, count)| *count)
            .unwrap_or_else(|| panic!("{file} is not in NOT_RUN"));
        println!(
            "{file}: {} blocks, {} not run:",
            blocks.len(),
            not_run.len()
        );
        for line in &not_run {
            println!("  {line}");
        }
        assert_eq!(
            not_run.len(),
            expected,
            "{file}: `sh no-test` blocks: {not_run:#?}; update NOT_RUN only if none can run"
        );
    }
}

#[test]
fn links_resolve() {
    for file in markdown::files(&root()) {
        let text = std::fs::read_to_string(root().join(&file)).unwrap();
        let base = root().join(&file).parent().unwrap().to_path_buf();
        for (line, target) in markdown::relative_links(&text) {
            let resolved = base.join(&target);
            assert!(
                resolved.exists() && resolved.starts_with(root()),
                "{file}:{line}: the link {target} leads nowhere in the repository"
            );
        }
    }
}

#[test]
fn the_env_example_and_the_readme_name_every_variable() {
    let example = std::fs::read_to_string(root().join(".env.example")).unwrap();
    check_dotenv(&example, ".env.example");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (name, _, _) in mailroom::config::VARIABLES {
        assert!(
            example.lines().any(|line| line
                .trim_start_matches("# ")
                .starts_with(&format!("{name}="))),
            ".env.example lacks {name}"
        );
        assert!(
            readme
                .lines()
                .any(|line| line.starts_with('|') && line.contains(&format!("`{name}`"))),
            "the README's configuration table lacks {name}"
        );
    }
}

/// Fills a route's `{name}` segments with values that exist.
fn fill(path: &str, id: &str) -> String {
    path.replace("{id}", id)
        .replace("{address}", "nobody@example.org")
        .replace("{name}", "welcome")
}

#[test]
fn the_openapi_document_and_the_router_agree() {
    let document = openapi();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    let routes = mailroom::http::ROUTES;
    for route in routes {
        assert!(
            document["paths"][route.path]
                .get(route.method.to_lowercase())
                .is_some(),
            "{} {} is not in docs/openapi.json",
            route.method,
            route.path
        );
    }
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            assert!(
                routes
                    .iter()
                    .any(|route| route.path == path && route.method.eq_ignore_ascii_case(method)),
                "docs/openapi.json documents {method} {path}, which the router does not have"
            );
        }
    }

    let mut config = Config::for_outbox(temp_dir("openapi-outbox"));
    config.templates_dir = root().join("templates");
    let mut http = http_settings();
    http.api_token = Some(mailroom::config::Secret::new("t0ken"));
    let service = Service::start_with(config, http);
    let bearer = [("Authorization", "Bearer t0ken")];
    let send = |method: &str, path: &str, body: &str| {
        request(service.address, method, path, &bearer, body.as_bytes())
    };
    let id = send(
        "POST",
        "/api/mail",
        &seed_body("user@example.org", "routes"),
    )
    .id();
    assert_eq!(
        send("PUT", "/api/suppressions/nobody@example.org", "").code,
        200
    );
    for route in routes {
        let path = fill(route.path, &id);
        let body = if route.path.ends_with("/preview") {
            r#"{"data":{"name":"Zo","link":"https://example.com/"}}"#
        } else if route.method == "POST" && route.path.starts_with("/api/mail") {
            "{}"
        } else {
            ""
        };
        let reply = send(route.method, &path, body);
        let routed_away = reply.code == 404
            && reply.json()["data"]["error"]
                .as_str()
                .is_some_and(|error| error.starts_with("no such path"));
        assert!(
            reply.code != 405 && !routed_away,
            "{} {path}: {} {}",
            route.method,
            reply.code,
            reply.body_text()
        );
        let (_, op) = operation(&document, route.method, &path).unwrap();
        assert!(
            op["responses"].get(reply.code.to_string()).is_some(),
            "{} {path} answered {}, not documented",
            route.method,
            reply.code
        );
    }

    // Served as it is, without a token.
    let served = request(service.address, "GET", "/openapi.json", &[], b"");
    assert_eq!(served.code, 200);
    assert_eq!(served.header("Content-Type"), Some("application/json"));
    assert_eq!(
        served.body,
        std::fs::read(root().join("docs/openapi.json")).unwrap()
    );
    assert_eq!(
        request(service.address, "GET", "/api/stats", &[], b"").code,
        401
    );
}

#[test]
fn the_openapi_examples_validate() {
    let document = openapi();
    let mut checked = 0;
    let mut walk = vec![(String::new(), &document)];
    while let Some((at, value)) = walk.pop() {
        let Some(object) = value.as_object() else {
            if let Some(items) = value.as_array() {
                for (index, item) in items.iter().enumerate() {
                    walk.push((format!("{at}/{index}"), item));
                }
            }
            continue;
        };
        // A media type or a parameter: `schema` with `example`.
        if let (Some(schema), Some(example)) = (object.get("schema"), object.get("example")) {
            schema::validate(&document, schema, example, &at)
                .unwrap_or_else(|error| panic!("example at {at}: {error}"));
            checked += 1;
        }
        // A schema with `examples`.
        if let (Some(Value::Array(examples)), false) =
            (object.get("examples"), object.contains_key("schema"))
        {
            for example in examples {
                schema::validate(&document, value, example, &at)
                    .unwrap_or_else(|error| panic!("example at {at}: {error}"));
                checked += 1;
            }
        }
        for (name, member) in object {
            if name != "example" && name != "examples" {
                walk.push((format!("{at}/{name}"), member));
            }
        }
    }
    println!("{checked} examples in docs/openapi.json validate");
    assert!(checked >= 20, "only {checked} examples");
}

#[test]
fn the_packaged_unit_is_the_contrib_unit_for_usr_bin() {
    let body = |path: &str| {
        let text = std::fs::read_to_string(root().join(path)).unwrap();
        text[text.find("[Unit]").expect("a [Unit] section")..].to_string()
    };
    let by_hand = body("contrib/mailroom.service");
    let packaged = body("contrib/debian/mailroom.service");
    assert!(by_hand.contains("ExecStart=/usr/local/bin/mailroom\n"));
    assert_eq!(
        packaged,
        by_hand.replace("ExecStart=/usr/local/bin/mailroom", "ExecStart=/usr/bin/mailroom"),
        "contrib/debian/mailroom.service must stay contrib/mailroom.service with the binary in /usr/bin"
    );
}
