//! mailroom: takes "send this email" requests and delivers them through an
//! SMTP relay from a fixed pool of OS threads, retrying what can be retried.
//! No async runtime.
//!
//! The engine is usable without HTTP:
//!
//! ```no_run
//! use mailroom::{Config, Engine, MailRequest};
//!
//! let engine = Engine::start(Config::for_outbox("./outbox"))?;
//! let request = MailRequest {
//!     sender: "App <app@example.com>".into(),
//!     receiver: vec!["user@example.org".into()],
//!     subject: "Hello".into(),
//!     message: Some("It works.".into()),
//!     ..MailRequest::default()
//! };
//! let accepted = engine.submit(&request, None)?;
//! println!("{:?}", engine.status(&accepted.id));
//! engine.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules, one job each: [`config`] (variables), [`message`] (request →
//! validated email), [`engine`] (the API), `job` (the unit of work and the
//! decision after an attempt), `pool` (workers), `dispatch` and `schedule`
//! (getting jobs to workers, now or when due), `transport` (SMTP/outbox and
//! error classification), `store` (statuses, events, indexes and the
//! durable journal), [`status`] (what the API shows), `metrics`,
//! [`webhooks`] (signed webhooks of message events), `dashboard` (the web
//! page at `/`),
//! [`http`] (the API over HTTP, on our tiny_http fork, with its own
//! [`HttpSettings`]), [`systemd`] (readiness notification), [`templates`]
//! (stored message templates).

pub mod config;
mod dashboard;
mod dispatch;
mod domain;
pub mod engine;
mod health;
pub mod http;

mod job;
pub mod message;
mod metrics;
mod pool;
mod schedule;
pub mod status;
mod store;
#[doc(hidden)] // the service's readiness notification, not the engine's
pub mod systemd;
pub mod templates;
mod time;
mod transport;
pub mod webhooks;

pub use config::{Config, ConfigError};
pub use engine::{
    Accepted, ActionError, BatchItem, Engine, ListError, ListQuery, MessagePage, Readiness,
    SendError, ShutdownReport, StartError, Stats, SubmitError, Suppression, SuppressionError,
    SuppressionPage,
};
pub use http::{BindError, HttpServer, HttpSettings};
pub use message::{AttachmentRequest, MailRequest, MessageError, OutgoingMessage};
pub use metrics::Minute;
pub use status::{Event, EventKind, MessageStatus, State};
pub use templates::{
    RenderError, Rendered, TemplateError, TemplateInfo, TemplateSnapshot, Templates,
};
pub use transport::{
    check_relay, Delivered, DeliveryError, FailureKind, RecipientRefusal, RelayCapabilities,
    SmtpReply,
};

/// The README's library example, compiled as a doctest so it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
