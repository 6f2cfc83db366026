//! Peers that mailroom's tests and benchmarks talk to over real sockets,
//! written once and shared: certificates for TLS, a small HTTP/1.1 client,
//! the HTTP load generator of the benchmarks, a latency proxy that makes
//! loopback behave like a distant link, a webhook receiver that checks
//! signatures, a real browser (headless Chromium over WebDriver), a strict
//! SMTP relay with fault injection, RFC 3339 times, temporary directories.
//!
//! Nothing here imports mailroom: the tests turn these peers into
//! mailroom configuration themselves (see `tests/common`).

pub mod certs;
pub mod http;
pub mod latency;
pub mod load;
pub mod redis;
pub mod smtp;
pub mod time;
pub mod webdriver;
pub mod webhooks;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long a test waits for something that should happen quickly.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh, empty directory under the system's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let directory = std::env::temp_dir().join(format!(
        "mailroom-test-{}-{name}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("a temporary directory can be created");
    directory
}
