//! The HTTP layer's own counter for `/metrics`: answers by status code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Answers sent, by status code.
#[derive(Default)]
pub(crate) struct HttpMetrics {
    answers: Mutex<BTreeMap<u16, u64>>,
}

impl HttpMetrics {
    /// An answer with this status code was sent.
    pub fn answered(&self, code: u16) {
        let mut answers = self
            .answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *answers.entry(code).or_insert(0) += 1;
    }

    /// Appends `mailroom_http_requests_total` to an exposition text.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP mailroom_http_requests_total HTTP answers by status code.\n# TYPE mailroom_http_requests_total counter"
        );
        let answers = self
            .answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for (code, value) in answers {
            let _ = writeln!(
                out,
                "mailroom_http_requests_total{{code=\"{code}\"}} {value}"
            );
        }
    }
}
