//! A real browser for tests: Debian's headless Chromium driven through
//! ChromeDriver with the W3C WebDriver protocol (JSON over HTTP/1.1 on
//! loopback), synchronously, with [`crate::http::read_reply`] as the HTTP
//! client. No browser is downloaded: the system's binaries are used.
//!
//! Waits poll the page with a deadline ([`crate::PATIENCE`]) and never
//! sleep a fixed time.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::read_reply;
use crate::{temp_dir, PATIENCE};

/// Debian's Chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The WebDriver key code for Enter.
pub const ENTER: &str = "\u{E007}";
/// The WebDriver key code for Escape.
pub const ESCAPE: &str = "\u{E00C}";

/// What is missing for [`Browser::start`], if anything.
pub fn missing() -> Option<String> {
    let absent: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    (!absent.is_empty()).then(|| format!("{} not found", absent.join(" and ")))
}

/// An error the WebDriver answered with (W3C error code and message).
#[derive(Debug, Clone)]
pub struct WebDriverError {
    /// The HTTP status.
    pub status: u16,
    /// The W3C error code, e.g. `no such element`, `stale element reference`.
    pub error: String,
    /// ChromeDriver's explanation.
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.error, self.status, self.message)
    }
}

impl std::error::Error for WebDriverError {}

/// An element of the page (a WebDriver element reference).
#[derive(Debug, Clone)]
pub struct Element(String);

/// One headless Chromium with its ChromeDriver; both end when dropped.
pub struct Browser {
    driver: Child,
    address: SocketAddr,
    session: String,
    /// ChromeDriver's log, for failure messages.
    pub log: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver on a free loopback port and a headless Chromium
    /// session with a fresh profile, its window `width`×`height` pixels.
    /// The flags keep Chromium off the network (the machine has none) and
    /// let it run as root.
    pub fn start(width: u32, height: u32) -> Browser {
        let directory = temp_dir("browser");
        let log = directory.join("chromedriver.log");
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("its address").port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {CHROMEDRIVER}: {error}"));
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut browser = Browser {
            driver,
            address,
            session: String::new(),
            log,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if TcpStream::connect(address).is_ok()
                && browser
                    .call("GET", "/status", None)
                    .is_ok_and(|value| value["ready"] == true)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ChromeDriver did not get ready: {}",
                browser.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let profile = directory.join("profile");
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                // Keeps the console for [`Browser::console`].
                "goog:loggingPrefs": { "browser": "ALL" },
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--disable-quic",
                        "--no-first-run",
                        "--no-default-browser-check",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--disable-extensions",
                        "--hide-scrollbars",
                        "--lang=en-US",
                        format!("--window-size={width},{height}"),
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }},
        });
        let created = browser
            .call("POST", "/session", Some(capabilities))
            .unwrap_or_else(|error| panic!("no browser session: {error}\n{}", browser.log_text()));
        browser.session = created["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser
    }

    /// ChromeDriver's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One WebDriver command; its `value`, or the error it answered.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let body = body.map(|body| body.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(self.address).map_err(|error| WebDriverError {
            status: 0,
            error: "cannot connect".into(),
            message: error.to_string(),
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("a read timeout");
        // ChromeDriver refuses Host names other than localhost or an IP.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            self.address,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .expect("the request is written to ChromeDriver");
        let reply = read_reply(&mut BufReader::new(stream));
        let value: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let value = value.get("value").cloned().unwrap_or(Value::Null);
        if reply.code == 200 {
            Ok(value)
        } else {
            Err(WebDriverError {
                status: reply.code,
                error: value["error"].as_str().unwrap_or("unknown").to_string(),
                message: value["message"].as_str().unwrap_or("").to_string(),
            })
        }
    }

    fn session_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|error| panic!("cannot open {url}: {error}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn execute(&self, script: &str, args: Value) -> Result<Value, WebDriverError> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching the CSS `selector`, if any.
    pub fn find(&self, selector: &str) -> Result<Option<Element>, WebDriverError> {
        match self.session_call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": selector })),
        ) {
            Ok(value) => Ok(value
                .as_object()
                .and_then(|object| object.values().next())
                .and_then(Value::as_str)
                .map(|id| Element(id.to_string()))),
            Err(error) if error.error == "no such element" => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Clicks the element, as a mouse would (it must be visible and enabled).
    pub fn click_element(&self, element: &Element) -> Result<(), WebDriverError> {
        self.session_call(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .map(drop)
    }

    /// Types `text` into the element (WebDriver key codes allowed).
    pub fn send_keys(&self, element: &Element, text: &str) -> Result<(), WebDriverError> {
        self.session_call(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// Empties an input.
    pub fn clear(&self, element: &Element) -> Result<(), WebDriverError> {
        self.session_call(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(json!({})),
        )
        .map(drop)
    }

    /// The element that has the keyboard focus.
    pub fn active_element(&self) -> Result<Element, WebDriverError> {
        self.session_call("GET", "/element/active", None)
            .map(|value| {
                Element(
                    value
                        .as_object()
                        .and_then(|object| object.values().next())
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                )
            })
    }

    /// Waits until `probe` gives a value; panics naming `what` at the deadline.
    /// WebDriver errors inside the probe (an element not there yet, or
    /// redrawn meanwhile) count as "not yet".
    pub fn wait_until<T>(
        &self,
        what: &str,
        mut probe: impl FnMut(&Browser) -> Result<Option<T>, WebDriverError>,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        let mut last = String::new();
        loop {
            match probe(self) {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(error) => last = error.to_string(),
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {what} (last error: {last})"
            );
            // Polling the page as a person looking at it would.
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The text content of the first element matching `selector`, once it is shown.
    pub fn visible_text(&self, selector: &str) -> Result<Option<String>, WebDriverError> {
        let value = self.execute(
            "const node = document.querySelector(arguments[0]);\
             return node && node.checkVisibility() ? node.textContent : null;",
            json!([selector]),
        )?;
        Ok(value.as_str().map(str::to_string))
    }

    /// Waits until an element matching `selector` is shown and its text
    /// satisfies `check`; returns the text.
    pub fn wait_for_text(&self, selector: &str, check: impl Fn(&str) -> bool) -> String {
        self.wait_until(
            &format!("{selector} to show the expected text"),
            |browser| {
                match browser.visible_text(selector)? {
                    Some(text) if check(&text) => Ok(Some(text)),
                    // Not an error: it tells the panic what was shown last.
                    shown => Err(WebDriverError {
                        status: 200,
                        error: "not yet".into(),
                        message: format!("shows {shown:?}"),
                    }),
                }
            },
        )
    }

    /// Waits until an element matching `selector` is shown, then clicks it.
    pub fn click(&self, selector: &str) {
        self.wait_until(&format!("{selector} to be clickable"), |browser| {
            let Some(element) = browser.find(selector)? else {
                return Ok(None);
            };
            browser.click_element(&element)?;
            Ok(Some(()))
        });
    }

    /// Replaces the content of the input matching `selector` with `text`.
    pub fn fill(&self, selector: &str, text: &str) {
        self.wait_until(&format!("{selector} to take input"), |browser| {
            let Some(element) = browser.find(selector)? else {
                return Ok(None);
            };
            browser.clear(&element)?;
            browser.send_keys(&element, text)?;
            Ok(Some(()))
        });
    }

    /// The console messages since the last call (ChromeDriver's browser
    /// log: errors, warnings, Content-Security-Policy refusals).
    pub fn console(&self) -> Vec<String> {
        self.session_call("POST", "/se/log", Some(json!({ "type": "browser" })))
            .unwrap_or_else(|error| panic!("cannot read the console: {error}"))
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|entry| {
                        format!(
                            "{} {}",
                            entry["level"].as_str().unwrap_or_default(),
                            entry["message"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A Chrome DevTools Protocol command, through ChromeDriver.
    pub fn devtools(&self, command: &str, params: Value) -> Result<Value, WebDriverError> {
        self.session_call(
            "POST",
            "/goog/cdp/execute",
            Some(json!({ "cmd": command, "params": params })),
        )
    }

    /// Makes the page's viewport `width`×`height` CSS pixels; `mobile`
    /// also emulates a phone (the viewport meta tag, touch-size scrollbars).
    pub fn set_viewport(&self, width: u32, height: u32, mobile: bool) {
        self.devtools(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .unwrap_or_else(|error| panic!("cannot set the viewport: {error}"));
    }

    /// A PNG of the viewport (what a person sees, a modal dialog with its
    /// backdrop included), written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let shot = self
            .session_call("GET", "/screenshot", None)
            .unwrap_or_else(|error| panic!("no screenshot: {error}"));
        write_png(path, shot.as_str().unwrap_or_default());
    }

    /// A PNG of the whole page, beyond the viewport, written to `path`.
    pub fn screenshot_full_page(&self, path: &Path) {
        let size = self
            .execute(
                "const root = document.documentElement;\
                 return [Math.max(root.scrollWidth, window.innerWidth),\
                         Math.max(root.scrollHeight, window.innerHeight)];",
                json!([]),
            )
            .expect("the page's size");
        let (width, height) = (
            size[0].as_f64().unwrap_or(800.0),
            size[1].as_f64().unwrap_or(600.0),
        );
        let shot = self
            .devtools(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 },
                }),
            )
            .unwrap_or_else(|error| panic!("no screenshot: {error}"));
        write_png(path, shot["data"].as_str().unwrap_or_default());
    }
}

fn write_png(path: &Path, base64: &str) {
    let png = base64::engine::general_purpose::STANDARD
        .decode(base64)
        .expect("the screenshot is base64");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("the screenshot's directory");
    }
    std::fs::write(path, png).expect("the screenshot is written");
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Closes Chromium; ChromeDriver would leave it running otherwise.
            let _ = self.session_call("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
