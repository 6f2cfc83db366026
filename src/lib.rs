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
//! validated email), [`engine`] (the API), `pool` (workers), `retry`
//! (scheduler), [`transport`] (SMTP/outbox and error classification),
//! [`spool`] (durable queue), [`status`], [`metrics`], [`http`] (the API over
//! HTTP), [`connections`] (limits on HTTP connections that tiny_http lacks),
//! [`allocator`] (the binary's allocator, for huge declared bodies),
//! [`systemd`] (readiness notification).

pub mod allocator;
pub mod config;
pub mod connections;
pub mod engine;
pub mod http;
pub mod message;
pub mod metrics;
mod pool;
mod retry;
pub mod spool;
pub mod status;
pub mod systemd;
pub mod transport;

pub use config::{Config, ConfigError};
pub use engine::{Accepted, Engine, Readiness, SendError, ShutdownReport, StartError, SubmitError};
pub use message::{AttachmentRequest, MailRequest, MessageError, OutgoingMessage};
pub use pool::WORKER_NICENESS;
pub use status::{MessageStatus, State};
pub use transport::{
    Delivered, DeliveryError, FailureKind, RecipientRefusal, RelayCapabilities, SmtpReply,
};
