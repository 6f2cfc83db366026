//! The HTTP server's settings, apart from the engine's: where it listens,
//! who may use the API, and what it allows its clients.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{flag, millis, number, parse_listen, ConfigError, Secret};

/// How the HTTP API is served. [`HttpSettings::default`] holds every
/// default; [`HttpSettings::from_env`] reads the `MAILROOM_*` variables.
/// Embedders change the fields they need:
///
/// ```
/// let mut http = mailroom::HttpSettings::default();
/// http.listen = "127.0.0.1:0".parse().unwrap();
/// http.max_connections = 64;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpSettings {
    /// Listen address (`MAILROOM_LISTEN`).
    pub listen: SocketAddr,
    /// Bearer token required on `/api/` (`MAILROOM_API_TOKEN`).
    pub api_token: Option<Secret>,
    /// A non-loopback listen address without a token is allowed
    /// (`MAILROOM_ALLOW_NO_AUTH`).
    pub allow_no_auth: bool,
    /// Largest request body (`MAILROOM_MAX_BODY_BYTES`).
    pub max_body_bytes: u64,
    /// Longest pause in a read from or a write to a client
    /// (`MAILROOM_HTTP_IO_TIMEOUT_MS`).
    pub io_timeout: Duration,
    /// Time to send a request head from its first byte
    /// (`MAILROOM_HTTP_HEAD_TIMEOUT_MS`).
    pub head_timeout: Duration,
    /// How long a connection may wait for its next request
    /// (`MAILROOM_HTTP_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
    /// Time to send a request body (`MAILROOM_HTTP_BODY_TIMEOUT_MS`).
    pub body_timeout: Duration,
    /// Connections served at once (`MAILROOM_HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Longest request line (SPEC: 8 KiB; `414` beyond).
    pub max_request_line: usize,
    /// Largest request head without its request line (SPEC: 64 KiB; `431`).
    pub max_header_bytes: usize,
    /// Requests of one connection waiting for their answers (pipelining).
    pub max_pipelined: usize,
    /// An unread body up to this size is skipped to keep the connection.
    pub max_discard_bytes: u64,
    /// Time allowed for skipping an unread body or draining a closing
    /// connection.
    pub discard_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> HttpSettings {
        HttpSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_token: None,
            allow_no_auth: false,
            max_body_bytes: 10_485_760,
            io_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_request_line: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_pipelined: 8,
            max_discard_bytes: 64 * 1024 * 1024,
            discard_timeout: Duration::from_secs(2),
        }
    }
}

impl HttpSettings {
    /// Reads the process environment (call `dotenvy` first to include `.env`).
    pub fn from_env() -> Result<HttpSettings, ConfigError> {
        HttpSettings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parses the settings from any variable lookup (tests use a map).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<HttpSettings, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let defaults = HttpSettings::default();
        let ms = |duration: Duration| duration.as_millis() as u64;
        let listen = match get("MAILROOM_LISTEN") {
            Some(value) => parse_listen(&value)?,
            None => defaults.listen,
        };
        let settings = HttpSettings {
            listen,
            api_token: get("MAILROOM_API_TOKEN").map(|token| Secret::new(token.trim())),
            allow_no_auth: flag(&get, "MAILROOM_ALLOW_NO_AUTH")?,
            max_body_bytes: number(
                &get,
                "MAILROOM_MAX_BODY_BYTES",
                defaults.max_body_bytes,
                1,
                u64::MAX,
            )?,
            io_timeout: millis(
                &get,
                "MAILROOM_HTTP_IO_TIMEOUT_MS",
                ms(defaults.io_timeout),
                1,
            )?,
            head_timeout: millis(
                &get,
                "MAILROOM_HTTP_HEAD_TIMEOUT_MS",
                ms(defaults.head_timeout),
                1,
            )?,
            idle_timeout: millis(
                &get,
                "MAILROOM_HTTP_IDLE_TIMEOUT_MS",
                ms(defaults.idle_timeout),
                1,
            )?,
            body_timeout: millis(
                &get,
                "MAILROOM_HTTP_BODY_TIMEOUT_MS",
                ms(defaults.body_timeout),
                1,
            )?,
            max_connections: number(
                &get,
                "MAILROOM_HTTP_MAX_CONNECTIONS",
                defaults.max_connections as u64,
                1,
                1_000_000,
            )? as usize,
            ..defaults
        };
        settings.check()?;
        Ok(settings)
    }

    /// Refuses a listen address reachable from other machines without a
    /// token (an open relay), unless `allow_no_auth`.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && self.api_token.is_none() && !self.allow_no_auth {
            return Err(ConfigError::Refused {
                variable: "MAILROOM_API_TOKEN",
                reason: format!(
                    "MAILROOM_LISTEN={} is reachable from other machines and no token is set: \
                     anyone could send mail through this relay. Set MAILROOM_API_TOKEN, listen on \
                     127.0.0.1, or set MAILROOM_ALLOW_NO_AUTH=1 if something in front authenticates",
                    self.listen
                ),
            });
        }
        Ok(())
    }

    /// The limits the server holds its connections to.
    pub(crate) fn limits(&self) -> tiny_http::Limits {
        let mut limits = tiny_http::Limits::default();
        limits.io_timeout = self.io_timeout;
        limits.head_timeout = self.head_timeout;
        limits.idle_timeout = self.idle_timeout;
        limits.body_timeout = self.body_timeout;
        limits.max_connections = self.max_connections;
        limits.max_request_line = self.max_request_line;
        limits.max_header_bytes = self.max_header_bytes;
        limits.max_pipelined = self.max_pipelined;
        limits.max_discard_bytes = self.max_discard_bytes;
        limits.discard_timeout = self.discard_timeout;
        // The server's own refusals (a request it cannot read, a slow or
        // oversized head, too many connections) in the API's envelope too.
        limits.refusal_body = Some(tiny_http::RefusalBody::new(
            "application/json",
            r#"{"message":"{reason}","data":{"error":"{reason}"}}"#,
        ));
        limits
    }

    /// A human summary for the start-up log and `--check` (no secrets).
    pub fn summary(&self) -> String {
        format!(
            "listen {}, auth token {}, max body {} bytes, at most {} connections",
            self.listen,
            if self.api_token.is_some() {
                "set"
            } else {
                "not set"
            },
            self.max_body_bytes,
            self.max_connections
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::documented_default as default;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<HttpSettings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        HttpSettings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_what_help_says() {
        let parsed = settings(&[]).unwrap();
        assert_eq!(parsed.listen, "127.0.0.1:8080".parse().unwrap());
        let ms = |duration: Duration| duration.as_millis().to_string();
        assert_eq!(default("MAILROOM_LISTEN"), parsed.listen.to_string());
        assert_eq!(
            default("MAILROOM_MAX_BODY_BYTES"),
            parsed.max_body_bytes.to_string()
        );
        assert_eq!(
            default("MAILROOM_HTTP_IO_TIMEOUT_MS"),
            ms(parsed.io_timeout)
        );
        assert_eq!(
            default("MAILROOM_HTTP_HEAD_TIMEOUT_MS"),
            ms(parsed.head_timeout)
        );
        assert_eq!(
            default("MAILROOM_HTTP_IDLE_TIMEOUT_MS"),
            ms(parsed.idle_timeout)
        );
        assert_eq!(
            default("MAILROOM_HTTP_BODY_TIMEOUT_MS"),
            ms(parsed.body_timeout)
        );
        assert_eq!(
            default("MAILROOM_HTTP_MAX_CONNECTIONS"),
            parsed.max_connections.to_string()
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("MAILROOM_LISTEN", "nowhere"),
            ("MAILROOM_MAX_BODY_BYTES", "-1"),
            ("MAILROOM_HTTP_HEAD_TIMEOUT_MS", "soon"),
            ("MAILROOM_HTTP_MAX_CONNECTIONS", "0"),
        ] {
            let error = settings(&[(name, value)]).unwrap_err();
            assert!(error.to_string().contains(name), "{error}");
        }
        let parsed = settings(&[("MAILROOM_HTTP_IDLE_TIMEOUT_MS", "2500")]).unwrap();
        assert_eq!(parsed.idle_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn refuses_an_open_relay() {
        let error = settings(&[("MAILROOM_LISTEN", "0.0.0.0:8080")]).unwrap_err();
        assert!(error.to_string().contains("MAILROOM_API_TOKEN"), "{error}");
        assert!(settings(&[
            ("MAILROOM_LISTEN", "0.0.0.0:8080"),
            ("MAILROOM_ALLOW_NO_AUTH", "1")
        ])
        .is_ok());
        let with_token = settings(&[
            ("MAILROOM_LISTEN", "0.0.0.0:8080"),
            ("MAILROOM_API_TOKEN", "t0ken-value"),
        ])
        .unwrap();
        assert!(!format!("{with_token:?} {}", with_token.summary()).contains("t0ken-value"));
    }
}
