//! Configuration: every `MAILROOM_*` variable is parsed once, at start, into
//! typed values. A bad value is an error that names the variable.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::comparable_domain;
use crate::webhooks::{WebhookEvent, WebhookSecret, WebhookSettings, DEFAULT_RETRY_HOURS};

/// Every variable the service reads, with its default (`None`: unset) and
/// a one-line description. `--help` and `.env.example` are written from it.
pub const VARIABLES: &[(&str, Option<&str>, &str)] = &[
    ("MAILROOM_LISTEN", Some("127.0.0.1:8080"), "address:port the HTTP API listens on"),
    ("MAILROOM_SMTP_URL", None, "relay, e.g. smtps://user:pass@host:465, smtp://user:pass@host:587?tls=required, smtp://host:25"),
    ("GOOGLE_MAIL", None, "Gmail address; with GOOGLE_APP_PASSWORD, relays through smtp.gmail.com:587 (STARTTLS)"),
    ("GOOGLE_APP_PASSWORD", None, "Gmail app password (not the account password)"),
    ("MAILROOM_SMTP_CA_FILE", None, "PEM file of extra trusted root certificates for the relay"),
    ("MAILROOM_SMTP_TIMEOUT_MS", Some("30000"), "connect/read/write timeout towards the relay"),
    ("MAILROOM_OUTBOX_DIR", Some("./outbox"), "where messages are written as .eml files when no relay is configured"),
    ("MAILROOM_WORKERS", Some("5"), "delivery threads, each with its own reused SMTP connection"),
    ("MAILROOM_QUEUE_CAPACITY", Some("10000"), "unfinished messages held (queued, sending, waiting for retry) before 503"),
    ("MAILROOM_MAX_ATTEMPTS", Some("5"), "delivery attempts before a message is failed"),
    ("MAILROOM_RETRY_BASE_MS", Some("2000"), "first retry delay; doubles each attempt"),
    ("MAILROOM_RETRY_MAX_MS", Some("600000"), "longest retry delay"),
    ("MAILROOM_SPOOL_DIR", Some("$STATE_DIRECTORY or ./spool"), "durable queue directory; 'none' keeps messages in memory only"),
    ("MAILROOM_API_TOKEN", None, "when set, /api/ requires 'Authorization: Bearer <token>'"),
    ("MAILROOM_ALLOW_NO_AUTH", Some("0"), "1 allows a non-loopback listen address without a token"),
    ("MAILROOM_ALLOWED_SENDERS", None, "comma list of sender addresses and @domain entries (default: any)"),
    ("MAILROOM_MAX_BODY_BYTES", Some("10485760"), "largest accepted request body"),
    ("MAILROOM_HTTP_IO_TIMEOUT_MS", Some("10000"), "longest pause in a read from or a write to an HTTP client"),
    ("MAILROOM_HTTP_HEAD_TIMEOUT_MS", Some("10000"), "time a client has to send a request line and headers, from their first byte"),
    ("MAILROOM_HTTP_IDLE_TIMEOUT_MS", Some("10000"), "how long a connection may wait for its next request (keep-alive)"),
    ("MAILROOM_HTTP_BODY_TIMEOUT_MS", Some("30000"), "time a client has to send a request body"),
    ("MAILROOM_HTTP_MAX_CONNECTIONS", Some("512"), "HTTP connections served at once (each has a thread); more get 503"),
    ("MAILROOM_RATE_LIMIT", Some("0"), "deliveries per second over the whole pool (0: unlimited)"),
    ("MAILROOM_SYNC_TIMEOUT_MS", Some("60000"), "how long POST /api/mail/v2 waits for an outcome"),
    ("MAILROOM_SHUTDOWN_TIMEOUT_MS", Some("30000"), "how long a stop waits for deliveries in flight"),
    ("MAILROOM_STATUS_RETENTION", Some("100000"), "finished message statuses kept for GET /api/mail/{id}"),
    ("MAILROOM_SCHEDULED_CAPACITY", Some("1000000"), "messages waiting for their send_at before 503"),
    ("MAILROOM_STORE", None, "redis://[user:password@]host:port/db (or rediss://) to share one queue among replicas; unset: the local spool"),
    ("MAILROOM_REDIS_WAIT_REPLICAS", Some("0"), "with MAILROOM_STORE, a 202 waits until this many Redis replicas have the message (WAIT)"),
    ("MAILROOM_CLAIM_TIMEOUT_MS", Some("60000"), "with MAILROOM_STORE, how long a silent replica keeps the messages it holds before another takes them"),
    ("MAILROOM_SUPPRESS_ON_BOUNCE", Some("1"), "add addresses refused with 5.1.x (no such user) to the suppression list"),
    ("MAILROOM_TEMPLATES_DIR", Some(DEFAULT_TEMPLATES_DIR), "message templates, one folder each (subject.txt, text.txt, html.html); only the default may be absent"),
    ("MAILROOM_WEBHOOK_URL", None, "where message events are POSTed as signed webhooks (https://, or http:// to loopback)"),
    ("MAILROOM_WEBHOOK_SECRET", None, "webhook signing secret, whsec_ + base64 of 24 to 64 random bytes (required with a URL)"),
    ("MAILROOM_WEBHOOK_EVENTS", Some("sent,failed,suppressed,cancelled"), "comma list of events sent as webhooks; also deferred and accepted"),
    ("MAILROOM_WEBHOOK_RETRY_HOURS", Some("24"), "how long after its event a webhook is retried before it is given up"),
    ("MAILROOM_WEBHOOK_ALLOW_HTTP", Some("0"), "1 allows a plain http:// webhook URL to a host that is not loopback"),
    ("RUST_LOG", Some("info"), "log level (error, warn, info, debug, trace)"),
];

/// Where templates are read from unless `MAILROOM_TEMPLATES_DIR` says
/// otherwise; the one location that may be absent (no templates).
pub const DEFAULT_TEMPLATES_DIR: &str = "./templates";

/// A configuration value that could not be used; names the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The variable is set to something that does not parse.
    Invalid {
        variable: &'static str,
        value: String,
        reason: String,
    },
    /// The combination of variables is unsafe or contradictory.
    Refused {
        variable: &'static str,
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                variable,
                value,
                reason,
            } => write!(f, "{variable}={value:?} is invalid: {reason}"),
            ConfigError::Refused { variable, reason } => write!(f, "{variable}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A string that must never be printed: `Debug` shows `"***"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain SMTP (`smtp://host`).
    None,
    /// STARTTLS when the relay offers it (`?tls=opportunistic`).
    Opportunistic,
    /// STARTTLS or fail (`?tls=required`).
    Required,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// Where and how to reach the SMTP relay.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Relay host name (also the TLS server name).
    pub host: String,
    /// Relay port.
    pub port: u16,
    /// Transport security.
    pub tls: TlsMode,
    /// Login, when the relay wants AUTH.
    pub credentials: Option<(String, Secret)>,
    /// Name sent in EHLO (URL path), else the machine's host name.
    pub hello_name: Option<String>,
    /// Extra trusted roots (PEM), read at start.
    pub extra_root_pem: Option<Vec<u8>>,
    /// Connect, read and write timeout.
    pub timeout: Duration,
}

impl SmtpSettings {
    /// `host:port`, for logs and errors (never includes credentials).
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Where delivered messages go.
#[derive(Debug, Clone)]
pub enum Relay {
    /// Through an SMTP relay.
    Smtp(SmtpSettings),
    /// Written as `.eml` files into a directory (no relay configured).
    Outbox(PathBuf),
}

/// Where accepted messages are kept until delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolSetting {
    /// A directory on disk: survives crashes and restarts.
    Directory(PathBuf),
    /// Memory only (`MAILROOM_SPOOL_DIR=none`): lost on exit.
    Memory,
}

/// A shared store several replicas use (`MAILROOM_STORE=redis://…`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port/db` or `rediss://…`; it may hold a
    /// password, so `Debug` and logs show only [`RedisSettings::endpoint`].
    pub url: Secret,
    /// After each accepted message, `WAIT` until this many Redis replicas
    /// have it (`MAILROOM_REDIS_WAIT_REPLICAS`; 0: do not wait).
    pub wait_replicas: u32,
    /// A replica that holds messages and stops renewing its claims on them
    /// for this long is taken to be dead; another delivers them
    /// (`MAILROOM_CLAIM_TIMEOUT_MS`).
    pub claim_timeout: Duration,
}

impl RedisSettings {
    /// The default claim timeout.
    pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_millis(60_000);

    /// Settings for `url` with the defaults.
    pub fn new(url: impl Into<String>) -> RedisSettings {
        RedisSettings {
            url: Secret::new(url),
            wait_replicas: 0,
            claim_timeout: RedisSettings::DEFAULT_CLAIM_TIMEOUT,
        }
    }

    /// `host:port/db`, without credentials.
    pub fn endpoint(&self) -> String {
        match url::Url::parse(self.url.expose()) {
            Ok(url) => format!(
                "{}://{}:{}{}",
                url.scheme(),
                url.host_str().unwrap_or("?"),
                url.port().unwrap_or(6379),
                url.path()
            ),
            Err(_) => "(unparsable URL, not shown)".into(),
        }
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("endpoint", &self.endpoint())
            .field("wait_replicas", &self.wait_replicas)
            .field("claim_timeout", &self.claim_timeout)
            .finish()
    }
}

fn parse_store(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<RedisSettings>, ConfigError> {
    // Checked with or without a store: a bad value is a mistake either way.
    let wait_replicas = number(get, "MAILROOM_REDIS_WAIT_REPLICAS", 0, 0, 100)? as u32;
    let claim_timeout = millis(
        get,
        "MAILROOM_CLAIM_TIMEOUT_MS",
        RedisSettings::DEFAULT_CLAIM_TIMEOUT.as_millis() as u64,
        100,
    )?;
    let Some(value) = get("MAILROOM_STORE") else {
        return Ok(None);
    };
    let value = value.trim().to_string();
    let invalid = |reason: String| ConfigError::Invalid {
        variable: "MAILROOM_STORE",
        value: mask_password(&value),
        reason,
    };
    let url = url::Url::parse(&value)
        .map_err(|error| invalid(format!("expected redis://host:port/db ({error})")))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(invalid(format!(
            "{}:// is not a store: leave MAILROOM_STORE unset for the local spool, or use redis:// or rediss://",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("the URL names no host".into()));
    }
    let mut settings = RedisSettings::new(value.clone());
    settings.wait_replicas = wait_replicas;
    settings.claim_timeout = claim_timeout;
    Ok(Some(settings))
}

/// Who may appear as `sender`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderRule {
    /// Exactly this address (lower-cased).
    Address(String),
    /// Any address at this domain (lower-cased, without the `@`).
    Domain(String),
}

/// The engine's configuration, parsed and checked (the HTTP server's is
/// [`crate::http::HttpSettings`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// SMTP relay or outbox.
    pub relay: Relay,
    /// Delivery threads.
    pub workers: usize,
    /// Unfinished messages held before refusing with 503.
    pub queue_capacity: usize,
    /// Attempts before a message is failed.
    pub max_attempts: u32,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Durable spool or memory.
    pub spool: SpoolSetting,
    /// A shared store (Redis) instead of the spool; `None`: the spool.
    pub store: Option<RedisSettings>,
    /// Allowed senders; `None` allows any.
    pub allowed_senders: Option<Vec<SenderRule>>,
    /// Deliveries per second over the pool; 0 is unlimited.
    pub rate_limit: f64,
    /// How long `/api/mail/v2` waits.
    pub sync_timeout: Duration,
    /// How long a stop waits for work in flight.
    pub shutdown_timeout: Duration,
    /// Finished statuses kept.
    pub status_retention: usize,
    /// How much lower than the rest of the process the workers run (Linux
    /// nice steps; 0 leaves them alone). When the CPU is saturated,
    /// answering clients comes first and the queue absorbs the burst;
    /// deliveries catch up as soon as CPU is free. A relay that is not on
    /// this machine leaves the workers waiting on the network, where
    /// priority does not matter. See docs/performance.md.
    pub worker_niceness: i32,
    /// Addresses refused with a permanent 5.1.x reply join the suppression list.
    pub suppress_on_bounce: bool,
    /// Messages waiting for their `send_at` before refusing with 503.
    pub scheduled_capacity: usize,
    /// Message templates (see [`crate::templates`]).
    pub templates_dir: PathBuf,
    /// Signed webhooks of message events; `None` when no URL is set.
    pub webhook: Option<WebhookSettings>,
}

/// The workers' default niceness (see [`Config::worker_niceness`]).
pub const DEFAULT_WORKER_NICENESS: i32 = 15;
/// The spool's default directory (without systemd's `$STATE_DIRECTORY`).
pub const DEFAULT_SPOOL_DIR: &str = "./spool";
/// The outbox's default directory.
pub const DEFAULT_OUTBOX_DIR: &str = "./outbox";
/// `MAILROOM_SMTP_TIMEOUT_MS` unless set.
pub const DEFAULT_SMTP_TIMEOUT_MS: u64 = 30_000;

/// The service's defaults: each written here once. The relay is the outbox
/// (no relay configured), the spool `./spool`.
impl Default for Config {
    fn default() -> Config {
        Config {
            relay: Relay::Outbox(PathBuf::from(DEFAULT_OUTBOX_DIR)),
            workers: 5,
            queue_capacity: 10_000,
            max_attempts: 5,
            retry_base: Duration::from_millis(2_000),
            retry_max: Duration::from_millis(600_000),
            spool: SpoolSetting::Directory(PathBuf::from(DEFAULT_SPOOL_DIR)),
            store: None,
            allowed_senders: None,
            rate_limit: 0.0,
            sync_timeout: Duration::from_millis(60_000),
            shutdown_timeout: Duration::from_millis(30_000),
            status_retention: 100_000,
            worker_niceness: DEFAULT_WORKER_NICENESS,
            suppress_on_bounce: true,
            scheduled_capacity: 1_000_000,
            templates_dir: PathBuf::from(DEFAULT_TEMPLATES_DIR),
            webhook: None,
        }
    }
}

impl Config {
    /// Reads the process environment (call `dotenvy` first to include `.env`).
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parses the configuration from any variable lookup (tests use a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        // An empty value means unset, as in most .env conventions.
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let defaults = Config::default();
        let ms = |duration: Duration| duration.as_millis() as u64;

        let timeout = millis(&get, "MAILROOM_SMTP_TIMEOUT_MS", DEFAULT_SMTP_TIMEOUT_MS, 1)?;
        let relay = parse_relay(&get, timeout)?;
        let workers = number(&get, "MAILROOM_WORKERS", defaults.workers as u64, 1, 1024)? as usize;
        let queue_capacity = number(
            &get,
            "MAILROOM_QUEUE_CAPACITY",
            defaults.queue_capacity as u64,
            1,
            100_000_000,
        )? as usize;
        let max_attempts = number(
            &get,
            "MAILROOM_MAX_ATTEMPTS",
            u64::from(defaults.max_attempts),
            1,
            1000,
        )? as u32;
        let retry_base = millis(&get, "MAILROOM_RETRY_BASE_MS", ms(defaults.retry_base), 1)?;
        let retry_max = millis(&get, "MAILROOM_RETRY_MAX_MS", ms(defaults.retry_max), 1)?;
        if retry_max < retry_base {
            return Err(ConfigError::Refused {
                variable: "MAILROOM_RETRY_MAX_MS",
                reason: "must not be smaller than MAILROOM_RETRY_BASE_MS".into(),
            });
        }
        let spool = match get("MAILROOM_SPOOL_DIR") {
            Some(value) if value.trim().eq_ignore_ascii_case("none") => SpoolSetting::Memory,
            Some(value) => SpoolSetting::Directory(PathBuf::from(value.trim())),
            None => match get("STATE_DIRECTORY") {
                // systemd may pass several directories separated by ':'.
                Some(dirs) => SpoolSetting::Directory(PathBuf::from(
                    dirs.split(':').next().unwrap_or(DEFAULT_SPOOL_DIR),
                )),
                None => defaults.spool.clone(),
            },
        };
        let allowed_senders = get("MAILROOM_ALLOWED_SENDERS")
            .map(|list| parse_sender_rules(&list))
            .transpose()?;
        let rate_limit = match get("MAILROOM_RATE_LIMIT") {
            None => defaults.rate_limit,
            Some(value) => match value.trim().parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate >= 0.0 => rate,
                _ => {
                    return Err(ConfigError::Invalid {
                        variable: "MAILROOM_RATE_LIMIT",
                        value,
                        reason: "expected messages per second, 0 or more".into(),
                    })
                }
            },
        };
        let sync_timeout = millis(
            &get,
            "MAILROOM_SYNC_TIMEOUT_MS",
            ms(defaults.sync_timeout),
            1,
        )?;
        let shutdown_timeout = millis(
            &get,
            "MAILROOM_SHUTDOWN_TIMEOUT_MS",
            ms(defaults.shutdown_timeout),
            0,
        )?;
        let status_retention = number(
            &get,
            "MAILROOM_STATUS_RETENTION",
            defaults.status_retention as u64,
            0,
            100_000_000,
        )? as usize;
        let webhook = parse_webhook(&get)?;
        let store = parse_store(&get)?;

        Ok(Config {
            relay,
            workers,
            queue_capacity,
            max_attempts,
            retry_base,
            retry_max,
            spool,
            allowed_senders,
            rate_limit,
            sync_timeout,
            shutdown_timeout,
            status_retention,
            worker_niceness: defaults.worker_niceness,
            suppress_on_bounce: match get("MAILROOM_SUPPRESS_ON_BOUNCE") {
                None => defaults.suppress_on_bounce,
                Some(_) => flag(&get, "MAILROOM_SUPPRESS_ON_BOUNCE")?,
            },
            scheduled_capacity: number(
                &get,
                "MAILROOM_SCHEDULED_CAPACITY",
                defaults.scheduled_capacity as u64,
                0,
                1_000_000_000,
            )? as usize,
            templates_dir: get("MAILROOM_TEMPLATES_DIR")
                .map_or(defaults.templates_dir, |dir| PathBuf::from(dir.trim())),
            webhook,
            store,
        })
    }

    /// A configuration for tests and embedding: outbox in `outbox`, memory
    /// spool, everything else at its default.
    pub fn for_outbox(outbox: impl Into<PathBuf>) -> Config {
        Config {
            relay: Relay::Outbox(outbox.into()),
            spool: SpoolSetting::Memory,
            ..Config::default()
        }
    }

    /// A human summary for the start-up log and `--check` (no secrets).
    pub fn summary(&self) -> String {
        let relay = match &self.relay {
            Relay::Smtp(smtp) => format!(
                "relay {} (tls: {:?}, auth: {})",
                smtp.endpoint(),
                smtp.tls,
                if smtp.credentials.is_some() {
                    "yes"
                } else {
                    "no"
                }
            ),
            Relay::Outbox(dir) => format!("outbox {}", dir.display()),
        };
        let spool = match (&self.store, &self.spool) {
            (Some(redis), _) => format!("store {}", redis.endpoint()),
            (None, SpoolSetting::Directory(dir)) => format!("spool {}", dir.display()),
            (None, SpoolSetting::Memory) => "spool none (memory only)".to_string(),
        };
        format!(
            "{relay}, {spool}, {} workers, queue capacity {}, max attempts {}",
            self.workers, self.queue_capacity, self.max_attempts,
        )
    }
}

pub(crate) fn parse_listen(value: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        variable: "MAILROOM_LISTEN",
        value: value.to_string(),
        reason,
    };
    match value.trim().to_socket_addrs() {
        Ok(mut addresses) => addresses
            .next()
            .ok_or_else(|| invalid("resolves to no address".into())),
        Err(error) => Err(invalid(format!("expected address:port ({error})"))),
    }
}

pub(crate) fn number(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(value) = get(variable) else {
        return Ok(default);
    };
    match value.trim().parse::<u64>() {
        Ok(number) if (min..=max).contains(&number) => Ok(number),
        Ok(_) => Err(ConfigError::Invalid {
            variable,
            value,
            reason: format!("must be between {min} and {max}"),
        }),
        Err(_) => Err(ConfigError::Invalid {
            variable,
            value,
            reason: "expected a whole number".into(),
        }),
    }
}

pub(crate) fn millis(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: u64,
    min: u64,
) -> Result<Duration, ConfigError> {
    number(get, variable, default, min, 365 * 24 * 3600 * 1000).map(Duration::from_millis)
}

pub(crate) fn flag(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<bool, ConfigError> {
    match get(variable).as_deref().map(str::trim) {
        None | Some("0") | Some("false") | Some("no") => Ok(false),
        Some("1") | Some("true") | Some("yes") => Ok(true),
        Some(other) => Err(ConfigError::Invalid {
            variable,
            value: other.to_string(),
            reason: "expected 1 or 0".into(),
        }),
    }
}

fn parse_sender_rules(list: &str) -> Result<Vec<SenderRule>, ConfigError> {
    let mut rules = Vec::new();
    for entry in list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
    {
        // Domains in IDNA form: a sender's domain is compared in that form
        // whichever one the client writes.
        let entry = match entry.rsplit_once('@') {
            Some((local, domain)) => {
                format!("{}@{}", local.to_lowercase(), comparable_domain(domain))
            }
            None => entry.to_lowercase(),
        };
        let rule = match entry.strip_prefix('@') {
            Some(domain) if !domain.is_empty() && !domain.contains('@') => {
                SenderRule::Domain(domain.to_string())
            }
            None if entry.parse::<lettre::Address>().is_ok() => SenderRule::Address(entry),
            _ => {
                return Err(ConfigError::Invalid {
                    variable: "MAILROOM_ALLOWED_SENDERS",
                    value: list.to_string(),
                    reason: format!("{entry:?} is neither an address nor @domain"),
                })
            }
        };
        rules.push(rule);
    }
    Ok(rules)
}

fn parse_relay(
    get: &impl Fn(&str) -> Option<String>,
    timeout: Duration,
) -> Result<Relay, ConfigError> {
    let extra_root_pem = match get("MAILROOM_SMTP_CA_FILE") {
        None => None,
        Some(path) => match std::fs::read(path.trim()) {
            Ok(pem) => Some(pem),
            Err(error) => {
                return Err(ConfigError::Invalid {
                    variable: "MAILROOM_SMTP_CA_FILE",
                    value: path,
                    reason: format!("cannot read it: {error}"),
                })
            }
        },
    };
    if let Some(url) = get("MAILROOM_SMTP_URL") {
        let settings = parse_smtp_url(url.trim(), timeout, extra_root_pem)?;
        return Ok(Relay::Smtp(settings));
    }
    match (get("GOOGLE_MAIL"), get("GOOGLE_APP_PASSWORD")) {
        (Some(user), Some(password)) => Ok(Relay::Smtp(SmtpSettings {
            host: "smtp.gmail.com".into(),
            port: 587,
            tls: TlsMode::Required,
            // Gmail shows app passwords in groups of four; the spaces are not part of it.
            credentials: Some((
                user.trim().to_string(),
                Secret::new(password.replace(' ', "")),
            )),
            hello_name: None,
            extra_root_pem,
            timeout,
        })),
        (Some(_), None) => Err(ConfigError::Refused {
            variable: "GOOGLE_APP_PASSWORD",
            reason: "GOOGLE_MAIL is set but GOOGLE_APP_PASSWORD is not".into(),
        }),
        (None, Some(_)) => Err(ConfigError::Refused {
            variable: "GOOGLE_MAIL",
            reason: "GOOGLE_APP_PASSWORD is set but GOOGLE_MAIL is not".into(),
        }),
        (None, None) => Ok(Relay::Outbox(PathBuf::from(
            get("MAILROOM_OUTBOX_DIR").unwrap_or_else(|| DEFAULT_OUTBOX_DIR.into()),
        ))),
    }
}

/// Parses lettre's URL form (`smtp://`, `smtps://`, `?tls=required|opportunistic`,
/// percent-encoded user and password, EHLO name as the path).
/// Parses a URL that must name a host; the host comes without the brackets
/// of an IPv6 literal. The error is the reason only: callers name the
/// variable and mask the value.
fn parse_url_with_host(value: &str) -> Result<(url::Url, String), String> {
    let url = url::Url::parse(value).map_err(|error| error.to_string())?;
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| "no host".to_string())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((url, host))
}

fn parse_smtp_url(
    value: &str,
    timeout: Duration,
    extra_root_pem: Option<Vec<u8>>,
) -> Result<SmtpSettings, ConfigError> {
    // The value holds a password: errors show it with the password masked.
    let masked = mask_password(value);
    let invalid = |reason: String| ConfigError::Invalid {
        variable: "MAILROOM_SMTP_URL",
        value: masked.clone(),
        reason,
    };
    let (url, host) = parse_url_with_host(value).map_err(invalid)?;
    let tls_parameter = url
        .query_pairs()
        .find(|(key, _)| key == "tls")
        .map(|(_, value)| value.into_owned());
    let (tls, default_port) = match (url.scheme(), tls_parameter.as_deref()) {
        ("smtp", None) => (TlsMode::None, 25),
        ("smtp", Some("required")) => (TlsMode::Required, 587),
        ("smtp", Some("opportunistic")) => (TlsMode::Opportunistic, 587),
        ("smtps", None) => (TlsMode::Implicit, 465),
        ("smtp" | "smtps", Some(other)) => {
            return Err(invalid(format!(
                "?tls={other} is not a TLS mode: use ?tls=required or ?tls=opportunistic with smtp://, and nothing with smtps://"
            )))
        }
        (scheme, _) => {
            return Err(invalid(format!(
                "{scheme}:// is not an SMTP URL: use smtp://host:25, smtp://user:pass@host:587?tls=required or smtps://user:pass@host:465"
            )))
        }
    };
    let decode = |text: &str| {
        percent_decode(text)
            .ok_or_else(|| invalid("user or password is not valid percent-encoded UTF-8".into()))
    };
    let credentials = match url.password() {
        Some(password) => Some((decode(url.username())?, Secret::new(decode(password)?))),
        None if !url.username().is_empty() => {
            return Err(invalid("a user name without a password".into()))
        }
        None => None,
    };
    let path = url.path().trim_matches('/');
    let settings = SmtpSettings {
        host,
        port: url.port().unwrap_or(default_port),
        tls,
        credentials,
        hello_name: (!path.is_empty()).then(|| path.to_string()),
        extra_root_pem,
        timeout,
    };
    if settings.credentials.is_some()
        && settings.tls == TlsMode::None
        && !is_loopback_host(&settings.host)
    {
        return Err(ConfigError::Refused {
            variable: "MAILROOM_SMTP_URL",
            reason: format!(
                "credentials would cross an unencrypted connection to {}; use smtps:// or ?tls=required",
                settings.endpoint()
            ),
        });
    }
    Ok(settings)
}

/// The default [`VARIABLES`] gives for `name` (tests check the parsed
/// defaults against it, so `--help` cannot drift from the code).
#[cfg(test)]
pub(crate) fn documented_default(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|(variable, _, _)| *variable == name)
        .and_then(|(_, default, _)| *default)
        .unwrap_or_else(|| panic!("{name} is not in VARIABLES"))
}

/// Variables read that are not in [`VARIABLES`] (set by systemd, or the
/// general ones every program reads).
const OTHER_KNOWN: &[&str] = &["STATE_DIRECTORY", "NOTIFY_SOCKET", "MAILROOM_ALLOW_NO_AUTH"];

/// The `MAILROOM_*` names among `names` that mailroom does not know, each
/// with the closest known name (a likely typo) when there is one.
pub fn unknown_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Option<&'static str>)> {
    let known: Vec<&'static str> = VARIABLES
        .iter()
        .map(|(name, _, _)| *name)
        .chain(OTHER_KNOWN.iter().copied())
        .collect();
    names
        .into_iter()
        .filter(|name| name.starts_with("MAILROOM_") && !known.contains(name))
        .map(|name| {
            let closest = known
                .iter()
                .map(|candidate| (edit_distance(name, candidate), *candidate))
                .min()
                .filter(|(distance, _)| *distance <= 3.max(name.len() / 4))
                .map(|(_, candidate)| candidate);
            (name.to_string(), closest)
        })
        .collect()
}

/// Levenshtein distance, by bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &left) in a.as_bytes().iter().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, &right) in b.iter().enumerate() {
            let substitution = previous + usize::from(left != right);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// True for `localhost` and loopback IP addresses.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn mask_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password only fails for URLs without a host, which have no password.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "(unparsable URL, not shown)".to_string(),
    }
}

/// The `MAILROOM_WEBHOOK_*` variables; `None` when no URL is set.
fn parse_webhook(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<WebhookSettings>, ConfigError> {
    let events = match get("MAILROOM_WEBHOOK_EVENTS") {
        None => WebhookEvent::DEFAULT.to_vec(),
        Some(list) => parse_webhook_events(&list)?,
    };
    let retry_hours = number(
        get,
        "MAILROOM_WEBHOOK_RETRY_HOURS",
        DEFAULT_RETRY_HOURS,
        0,
        24 * 365,
    )?;
    let allow_http = flag(get, "MAILROOM_WEBHOOK_ALLOW_HTTP")?;
    let secret = get("MAILROOM_WEBHOOK_SECRET");
    let Some(url) = get("MAILROOM_WEBHOOK_URL") else {
        if secret.is_some() {
            return Err(ConfigError::Refused {
                variable: "MAILROOM_WEBHOOK_URL",
                reason: "MAILROOM_WEBHOOK_SECRET is set but MAILROOM_WEBHOOK_URL is not".into(),
            });
        }
        return Ok(None);
    };
    let url = parse_webhook_url(url.trim(), allow_http)?;
    let secret = match secret {
        Some(secret) => WebhookSecret::parse(secret.trim())?,
        None => {
            return Err(ConfigError::Refused {
                variable: "MAILROOM_WEBHOOK_SECRET",
                reason: "required with MAILROOM_WEBHOOK_URL: whsec_ followed by base64 of 24 to 64 random bytes".into(),
            })
        }
    };
    let mut settings = WebhookSettings::new(url, secret);
    settings.events = events;
    settings.retry_window = Duration::from_secs(retry_hours * 3600);
    Ok(Some(settings))
}

fn parse_webhook_events(list: &str) -> Result<Vec<WebhookEvent>, ConfigError> {
    let mut events = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let Some(event) = WebhookEvent::parse(&name.to_ascii_lowercase()) else {
            return Err(ConfigError::Invalid {
                variable: "MAILROOM_WEBHOOK_EVENTS",
                value: list.to_string(),
                reason: format!(
                    "unknown event {name:?}; the events are {}",
                    WebhookEvent::ALL.map(WebhookEvent::as_str).join(", ")
                ),
            });
        };
        if !events.contains(&event) {
            events.push(event);
        }
    }
    if events.is_empty() {
        return Err(ConfigError::Invalid {
            variable: "MAILROOM_WEBHOOK_EVENTS",
            value: list.to_string(),
            reason: "names no event; leave it unset for the default".into(),
        });
    }
    Ok(events)
}

fn parse_webhook_url(value: &str, allow_http: bool) -> Result<url::Url, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        variable: "MAILROOM_WEBHOOK_URL",
        value: mask_password(value),
        reason,
    };
    let (url, host) = parse_url_with_host(value).map_err(invalid)?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http || is_loopback_host(&host) => {}
        "http" => {
            return Err(ConfigError::Refused {
                variable: "MAILROOM_WEBHOOK_URL",
                reason: format!(
                    "http:// to {host} would send message events unencrypted; use https://, \
                     or set MAILROOM_WEBHOOK_ALLOW_HTTP=1 if the network is trusted"
                ),
            })
        }
        scheme => {
            return Err(invalid(format!(
                "scheme {scheme:?}: use https:// (or http:// to loopback)"
            )))
        }
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_write_to_the_outbox() {
        let config = config(&[]).unwrap();
        assert!(
            matches!(config.relay, Relay::Outbox(ref dir) if dir == &PathBuf::from("./outbox"))
        );
        assert_eq!(config.workers, 5);
        assert_eq!(config.queue_capacity, 10_000);
        assert_eq!(config.spool, SpoolSetting::Directory("./spool".into()));
    }

    #[test]
    fn defaults_match_what_help_says() {
        let default = documented_default;
        let parsed = config(&[]).unwrap();
        let ms = |duration: Duration| duration.as_millis().to_string();
        for (name, value) in [
            ("MAILROOM_WORKERS", parsed.workers.to_string()),
            ("MAILROOM_QUEUE_CAPACITY", parsed.queue_capacity.to_string()),
            ("MAILROOM_MAX_ATTEMPTS", parsed.max_attempts.to_string()),
            ("MAILROOM_RETRY_BASE_MS", ms(parsed.retry_base)),
            ("MAILROOM_RETRY_MAX_MS", ms(parsed.retry_max)),
            ("MAILROOM_RATE_LIMIT", parsed.rate_limit.to_string()),
            ("MAILROOM_SYNC_TIMEOUT_MS", ms(parsed.sync_timeout)),
            ("MAILROOM_SHUTDOWN_TIMEOUT_MS", ms(parsed.shutdown_timeout)),
            (
                "MAILROOM_STATUS_RETENTION",
                parsed.status_retention.to_string(),
            ),
            (
                "MAILROOM_SCHEDULED_CAPACITY",
                parsed.scheduled_capacity.to_string(),
            ),
            (
                "MAILROOM_SMTP_TIMEOUT_MS",
                DEFAULT_SMTP_TIMEOUT_MS.to_string(),
            ),
            ("MAILROOM_OUTBOX_DIR", DEFAULT_OUTBOX_DIR.to_string()),
            (
                "MAILROOM_TEMPLATES_DIR",
                parsed.templates_dir.display().to_string(),
            ),
            (
                "MAILROOM_SUPPRESS_ON_BOUNCE",
                u8::from(parsed.suppress_on_bounce).to_string(),
            ),
        ] {
            assert_eq!(default(name), value, "{name}");
        }
        assert_eq!(parsed.rate_limit, 0.0);
    }

    #[test]
    fn unknown_variables_are_named_with_the_closest_known_one() {
        let found = unknown_variables([
            "MAILROOM_WORKER",
            "MAILROOM_WORKERS",
            "MAILROOM_SPOOL_DIRECTORY",
            "MAILROOM_NOTHING_LIKE_IT_AT_ALL",
            "PATH",
        ]);
        assert_eq!(
            found,
            vec![
                ("MAILROOM_WORKER".to_string(), Some("MAILROOM_WORKERS")),
                (
                    "MAILROOM_SPOOL_DIRECTORY".to_string(),
                    Some("MAILROOM_SPOOL_DIR")
                ),
                ("MAILROOM_NOTHING_LIKE_IT_AT_ALL".to_string(), None),
            ]
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let error = config(&[("MAILROOM_WORKERS", "many")]).unwrap_err();
        assert!(error.to_string().contains("MAILROOM_WORKERS"), "{error}");
        let error = config(&[("MAILROOM_WORKERS", "0")]).unwrap_err();
        assert!(error.to_string().contains("MAILROOM_WORKERS"), "{error}");
        let error = config(&[("MAILROOM_SMTP_URL", "http://x")]).unwrap_err();
        assert!(error.to_string().contains("MAILROOM_SMTP_URL"), "{error}");
        // Also without a shared store, where they do nothing yet.
        for variable in ["MAILROOM_REDIS_WAIT_REPLICAS", "MAILROOM_CLAIM_TIMEOUT_MS"] {
            let error = config(&[(variable, "x")]).unwrap_err();
            assert!(error.to_string().contains(variable), "{error}");
        }
    }

    #[test]
    fn smtp_urls_follow_lettre() {
        let config =
            config(&[("MAILROOM_SMTP_URL", "smtps://me%40x.org:p%40ss@mail.x.org")]).unwrap();
        let Relay::Smtp(smtp) = config.relay else {
            panic!("not smtp")
        };
        assert_eq!(
            (smtp.host.as_str(), smtp.port, smtp.tls),
            ("mail.x.org", 465, TlsMode::Implicit)
        );
        let (user, password) = smtp.credentials.unwrap();
        assert_eq!((user.as_str(), password.expose()), ("me@x.org", "p@ss"));

        let config = config_ok("smtp://u:p@relay:2525?tls=required");
        let Relay::Smtp(smtp) = config.relay else {
            panic!("not smtp")
        };
        assert_eq!((smtp.port, smtp.tls), (2525, TlsMode::Required));
    }

    fn config_ok(url: &str) -> Config {
        config(&[("MAILROOM_SMTP_URL", url)]).unwrap()
    }

    #[test]
    fn refuses_plaintext_credentials() {
        let error = config(&[(
            "MAILROOM_SMTP_URL",
            "smtp://u:secretpw@relay.example.com:25",
        )])
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("MAILROOM_SMTP_URL") && !text.contains("secretpw"),
            "{text}"
        );
        assert!(config(&[("MAILROOM_SMTP_URL", "smtp://u:p@127.0.0.1:25")]).is_ok());
    }

    #[test]
    fn secrets_are_masked() {
        let error = config(&[("MAILROOM_SMTP_URL", "ftp://u:secretpw@host")]).unwrap_err();
        assert!(!error.to_string().contains("secretpw"));
        let config = config(&[
            ("GOOGLE_MAIL", "a@gmail.com"),
            ("GOOGLE_APP_PASSWORD", "abcd efgh ijkl mnop"),
        ])
        .unwrap();
        let text = format!("{config:?} {}", config.summary());
        assert!(!text.contains("abcd"), "{text}");
        let Relay::Smtp(smtp) = config.relay else {
            panic!("not smtp")
        };
        assert_eq!(
            (smtp.host.as_str(), smtp.port, smtp.tls),
            ("smtp.gmail.com", 587, TlsMode::Required)
        );
        assert_eq!(smtp.credentials.unwrap().1.expose(), "abcdefghijklmnop");
    }

    #[test]
    fn sender_rules() {
        let ascii = config(&[("MAILROOM_ALLOWED_SENDERS", "ops@x.org, @Example.com")]).unwrap();
        assert_eq!(
            ascii.allowed_senders.unwrap(),
            vec![
                SenderRule::Address("ops@x.org".into()),
                SenderRule::Domain("example.com".into())
            ]
        );
        // Domains in IDNA form, as senders' domains are compared.
        let unicode = config(&[(
            "MAILROOM_ALLOWED_SENDERS",
            "Ops@Bücher.example, @BÜCHER.org",
        )])
        .unwrap();
        assert_eq!(
            unicode.allowed_senders.unwrap(),
            vec![
                SenderRule::Address("ops@xn--bcher-kva.example".into()),
                SenderRule::Domain("xn--bcher-kva.org".into())
            ]
        );
    }
}
