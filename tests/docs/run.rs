//! Running a file's `sh` blocks as a person would paste them: in one bash
//! session, in the service's working directory, with `curl` and `cargo` on
//! the PATH as small wrappers. The `curl` wrapper runs the real curl with
//! the same arguments (`localhost:8080` pointed at the test's service) and
//! records each exchange; the `cargo` one runs `cargo run [--release] --
//! ARGS` as the mailroom binary built for the tests and refuses anything
//! else. The text promises answers with lines starting `# →`:
//!
//! - `# → 202 {"message":"ok",…}`: the last HTTP exchange of the commands
//!   above it answered 202 with JSON that contains this (objects may have
//!   more members; the string `"…"` matches any value, and `…` in a string
//!   any text in its place; an array ending with `"…"` may have more
//!   items). Several such
//!   lines in a row are alternatives. `# → 200` checks the code only; text
//!   that is not JSON after the code must be in the body. Lines that follow
//!   starting with `#` and two spaces continue it.
//! - `# → exit 2`: the exit status of the commands above (else it must be 0).
//! - `# → text`: what the commands above printed contains the text.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::markdown::Block;

/// What a `# →` line promises.
#[derive(Debug, Clone)]
pub enum Promise {
    /// An HTTP answer: the code, and JSON it contains or text in its body.
    Http {
        code: u16,
        json: Option<Value>,
        text: Option<String>,
    },
    /// The exit status.
    Exit(i32),
    /// Text in the output.
    Output(String),
}

/// A run of commands and the promises after it.
#[derive(Debug, Clone)]
pub struct Segment {
    /// `file:line` of its first line.
    pub place: String,
    pub script: String,
    /// With the `file:line` of each.
    pub promises: Vec<(String, Promise)>,
}

fn parse_promise(text: &str) -> Promise {
    let text = text.trim();
    if let Some(code) = text.strip_prefix("exit ") {
        return Promise::Exit(code.trim().parse().expect("# → exit N"));
    }
    let code = text.get(..3).and_then(|code| code.parse::<u16>().ok());
    let rest = text.get(3..).unwrap_or("");
    match code {
        Some(code) if (100..600).contains(&code) && (rest.is_empty() || rest.starts_with(' ')) => {
            let rest = rest.trim();
            if rest.starts_with('{') || rest.starts_with('[') {
                let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                let json = values
                    .next()
                    .unwrap_or_else(|| panic!("no JSON in {rest}"))
                    .unwrap_or_else(|error| panic!("bad JSON in `# → {text}`: {error}"));
                Promise::Http {
                    code,
                    json: Some(json),
                    text: None,
                }
            } else {
                Promise::Http {
                    code,
                    json: None,
                    text: (!rest.is_empty()).then(|| rest.to_string()),
                }
            }
        }
        _ => Promise::Output(text.to_string()),
    }
}

/// The segments of a file's runnable blocks, in order.
pub fn segments(blocks: &[&Block]) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for block in blocks {
        let mut current: Option<Segment> = None;
        let mut lines = block.text.lines().enumerate().peekable();
        while let Some((index, line)) = lines.next() {
            let place = format!("{}:{}", block.file, block.line + 1 + index);
            if let Some(promise) = line.trim_start().strip_prefix("# →") {
                let mut promise = promise.to_string();
                while let Some((_, next)) = lines.peek() {
                    let continued = next.strip_prefix('#').filter(|rest| {
                        rest.starts_with("  ") && !rest.trim_start().starts_with('→')
                    });
                    let Some(rest) = continued else { break };
                    promise.push(' ');
                    promise.push_str(rest.trim());
                    lines.next();
                }
                let promise = parse_promise(&promise);
                match current.take() {
                    Some(segment) => segments.push(segment),
                    None => assert!(
                        segments
                            .last()
                            .is_some_and(|last| last.place.starts_with(&block.file)),
                        "{place}: a promise with no command above it"
                    ),
                }
                let last = segments.last_mut().unwrap();
                last.promises.push((place, promise));
                continue;
            }
            let segment = current.get_or_insert_with(|| Segment {
                place: place.clone(),
                script: String::new(),
                promises: Vec::new(),
            });
            segment.script.push_str(line);
            segment.script.push('\n');
        }
        if let Some(segment) = current {
            segments.push(segment);
        }
    }
    segments
}

/// One request curl made, and its answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The segment it was made in.
    pub segment: usize,
    /// curl's arguments, `localhost:8080` already replaced.
    pub args: Vec<String>,
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The request body given with `-d` and the like (not `@file`).
    pub body: Option<String>,
    /// None when no answer came.
    pub code: Option<u16>,
    pub content_type: Option<String>,
    pub answer: Vec<u8>,
}

/// What running the segments gave.
#[derive(Debug)]
pub struct Run {
    /// Output and exit status of each segment.
    pub outputs: Vec<(String, i32)>,
    pub exchanges: Vec<Exchange>,
}

/// A program on the PATH, or a clear failure.
pub fn program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|directory| directory.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("the docs test needs `{name}` (apt-get install {name}); .ci/run installs it")
        })
}

const CURL_WRAPPER: &str = r#"#!/bin/bash
# The docs test's curl: the real one, pointed at the test's service, with
# each exchange recorded.
n=$(( $(cat "$DOCLOG/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$DOCLOG/count"
args=()
for arg in "$@"; do
  arg="${arg//localhost:8080/$DOCADDR}"
  args+=("${arg//127.0.0.1:8080/$DOCADDR}")
done
printf '%s\0' "${args[@]}" > "$DOCLOG/$n.args"
echo "$DOCSEG" > "$DOCLOG/$n.seg"
"$DOCCURL" "${args[@]}" -D "$DOCLOG/$n.head" | tee "$DOCLOG/$n.body"
exit "${PIPESTATUS[0]}"
"#;

const CARGO_WRAPPER: &str = r#"#!/bin/bash
# The docs test's cargo: `cargo run [--release] [-- ARGS]` is the mailroom
# binary built for the tests; nothing else may run here.
if [ "$1" != run ]; then
  echo "docs test: only 'cargo run' can run in a tested block, not: cargo $*" >&2
  exit 99
fi
shift
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  case "$1" in
    --release|-q|--quiet) shift ;;
    *) echo "docs test: cargo run $1 is not supported here" >&2; exit 99 ;;
  esac
done
[ "$1" = -- ] && shift
exec "$DOCBIN" "$@"
"#;

fn parse_curl(args: &[String]) -> (String, String, Option<String>) {
    const VALUED: &[&str] = &[
        "-d",
        "--data",
        "--data-raw",
        "--data-binary",
        "--data-urlencode",
        "-H",
        "--header",
        "-X",
        "--request",
        "-o",
        "--output",
        "-w",
        "--write-out",
        "-u",
        "--user",
        "-D",
        "--dump-header",
        "-m",
        "--max-time",
        "--connect-timeout",
        "-K",
        "--config",
        "-T",
        "--upload-file",
        "-F",
        "--form",
        "--oauth2-bearer",
        "-A",
        "--user-agent",
        "-e",
        "--referer",
        "-b",
        "--cookie",
        "-c",
        "--cookie-jar",
        "--retry",
    ];
    let mut method = None;
    let mut head = false;
    let mut body = None;
    let mut url = None;
    let mut index = 0;
    while index < args.len() {
        let arg = &args[index];
        if VALUED.contains(&arg.as_str()) {
            let value = args.get(index + 1).cloned().unwrap_or_default();
            match arg.as_str() {
                "-X" | "--request" => method = Some(value),
                "-d" | "--data" | "--data-raw" | "--data-binary" | "--data-urlencode" => {
                    body = Some(value)
                }
                _ => {}
            }
            index += 2;
            continue;
        }
        if arg == "-I" || arg == "--head" {
            head = true;
        } else if !arg.starts_with('-') && url.is_none() {
            url = Some(arg.clone());
        }
        index += 1;
    }
    let method = method.unwrap_or_else(|| {
        if head {
            "HEAD".into()
        } else if body.is_some() {
            "POST".into()
        } else {
            "GET".into()
        }
    });
    let url = url.unwrap_or_default();
    let without_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let path = without_scheme
        .find('/')
        .map_or("/", |start| &without_scheme[start..]);
    let path = path.split(['?', '#']).next().unwrap_or("/").to_string();
    let body = body.filter(|body| !body.starts_with('@'));
    (method, path, body)
}

/// Runs `segments` in one bash session in `work`, against the service at
/// `address`, within `limit`.
pub fn run(
    segments: &[Segment],
    work: &Path,
    address: &str,
    binary: &Path,
    limit: Duration,
) -> Run {
    let scratch = mailroom_testkit::temp_dir("docs-run");
    let log = scratch.join("log");
    let wrappers = scratch.join("bin");
    let home = scratch.join("home");
    for directory in [&log, &wrappers, &home] {
        std::fs::create_dir_all(directory).unwrap();
    }
    for (name, text) in [("curl", CURL_WRAPPER), ("cargo", CARGO_WRAPPER)] {
        let path = wrappers.join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut script = String::from("cd \"$DOCWORK\" || exit 97\n");
    for (index, segment) in segments.iter().enumerate() {
        script.push_str(&format!(
            "export DOCSEG={index}\n{{ :\n{}\n}} > \"$DOCLOG/seg-{index}.out\" 2>&1 < /dev/null\necho $? > \"$DOCLOG/seg-{index}.rc\"\n",
            segment.script
        ));
    }
    let script_path = scratch.join("script.sh");
    std::fs::write(&script_path, &script).unwrap();
    let path = format!(
        "{}:{}",
        wrappers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(program("bash"))
        .arg(&script_path)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("DOCWORK", work)
        .env("DOCLOG", &log)
        .env("DOCADDR", address)
        .env("DOCCURL", program("curl"))
        .env("DOCBIN", binary)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(scratch.join("bash.out")).unwrap())
        .stderr(std::fs::File::create(scratch.join("bash.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "the docs script failed: {}\n{}",
                std::fs::read_to_string(scratch.join("bash.err")).unwrap_or_default(),
                script
            );
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the docs script ran longer than {limit:?}; see {}",
                scratch.display()
            );
        }
        // Waiting for a child process, as a person would.
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = |name: String| std::fs::read_to_string(log.join(name)).unwrap_or_default();
    let outputs = (0..segments.len())
        .map(|index| {
            let code = read(format!("seg-{index}.rc")).trim().parse().unwrap_or(-1);
            (read(format!("seg-{index}.out")), code)
        })
        .collect();
    let count: usize = read("count".into()).trim().parse().unwrap_or(0);
    let exchanges = (1..=count)
        .map(|n| {
            let args: Vec<String> = read(format!("{n}.args"))
                .split('\0')
                .filter(|arg| !arg.is_empty())
                .map(str::to_string)
                .collect();
            let (method, path, body) = parse_curl(&args);
            let head = read(format!("{n}.head"));
            // The last answer's head (after any 100 Continue).
            let last = head
                .split("\r\n\r\n")
                .filter(|part| part.starts_with("HTTP/"))
                .last()
                .unwrap_or("");
            let code = last
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok());
            let content_type = last.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            });
            Exchange {
                segment: read(format!("{n}.seg"))
                    .trim()
                    .parse()
                    .unwrap_or(usize::MAX),
                args,
                method,
                path,
                body,
                code,
                content_type,
                answer: std::fs::read(log.join(format!("{n}.body"))).unwrap_or_default(),
            }
        })
        .collect();
    Run { outputs, exchanges }
}

/// `text` matched by `pattern`, where `…` stands for any text.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (index, part) in parts.iter().enumerate() {
        if index + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether `actual` holds what `expected` shows (see the module's rules).
pub fn contains(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(any), _) if any == "…" => true,
        (Value::Object(expected), Value::Object(actual)) => expected.iter().all(|(name, value)| {
            actual
                .get(name)
                .is_some_and(|member| contains(value, member))
        }),
        (Value::Array(expected), Value::Array(actual)) => {
            let open = expected.last() == Some(&Value::String("…".into()));
            let shown = if open {
                &expected[..expected.len() - 1]
            } else {
                &expected[..]
            };
            (if open {
                actual.len() >= shown.len()
            } else {
                actual.len() == shown.len()
            }) && shown.iter().zip(actual).all(|(e, a)| contains(e, a))
        }
        (Value::String(pattern), Value::String(text)) if pattern.contains('…') => {
            glob(pattern, text)
        }
        _ => expected == actual,
    }
}

/// `value` without the `"…"` that end open arrays (for schema checks).
pub fn without_ellipses(value: &Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(name, member)| (name.clone(), without_ellipses(member)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|item| **item != Value::String("…".into()))
                .map(without_ellipses)
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn promises_and_matching() {
    assert!(glob("a…c", "abbbc") && glob("…", "x") && glob("a…", "ab") && !glob("a…c", "ab"));
    assert!(glob(
        "written to ./outbox/….eml",
        "written to ./outbox/01.eml"
    ));
    let expected = serde_json::json!({"a": "x…", "b": [1, "…"]});
    assert!(contains(
        &expected,
        &serde_json::json!({"a": "xy", "b": [1, 2], "c": 3})
    ));
    assert!(!contains(
        &expected,
        &serde_json::json!({"a": "y", "b": [1]})
    ));
    assert!(!contains(
        &serde_json::json!([1]),
        &serde_json::json!([1, 2])
    ));
    assert!(matches!(parse_promise(" exit 2"), Promise::Exit(2)));
    assert!(matches!(
        parse_promise("200"),
        Promise::Http {
            code: 200,
            json: None,
            text: None
        }
    ));
    assert!(matches!(
        parse_promise("404 {\"a\":1} (comment)"),
        Promise::Http {
            code: 404,
            json: Some(_),
            ..
        }
    ));
    assert!(matches!(parse_promise("relay ok"), Promise::Output(_)));
    assert!(matches!(parse_promise("ok"), Promise::Output(_)));
    assert!(matches!(parse_promise("Zoë"), Promise::Output(_)));
    assert!(matches!(parse_promise("2000 ms"), Promise::Output(_)));
    let (method, path, body) = parse_curl(&[
        "-s".into(),
        "-X".into(),
        "PUT".into(),
        "http://127.0.0.1:1/api/x?y=1".into(),
        "-d".into(),
        "{}".into(),
    ]);
    assert_eq!(
        (method.as_str(), path.as_str(), body.as_deref()),
        ("PUT", "/api/x", Some("{}"))
    );
}
