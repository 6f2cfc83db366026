//! The benchmarks' SMTP peer: the testkit's strict relay (the one the
//! tests use), set up as a fast sink: it keeps counts, not messages,
//! offers PIPELINING (unless told not to) and 8BITMIME, and with TLS, STARTTLS and AUTH
//! PLAIN/LOGIN accepting any login. Optionally slow (a delay per message)
//! or gated (sessions held before the greeting until the gate opens).

use std::time::{Duration, Instant};

use mailroom_testkit::smtp::{Login, RelayOptions, Security, StrictRelay};

/// How the sink behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkOptions {
    /// Offer STARTTLS (and AUTH PLAIN/LOGIN).
    pub tls: bool,
    /// Wait this long before accepting each message.
    pub delay: Duration,
    /// Hold new sessions before the greeting until [`Sink::open_gate`].
    pub gated: bool,
    /// Do not offer PIPELINING (it is offered by default).
    pub no_pipelining: bool,
}

/// A running sink on a loopback port; it lives until the process ends.
pub struct Sink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed its `localhost` certificate (TLS sinks).
    pub ca_pem: Option<Vec<u8>>,
    relay: StrictRelay,
}

impl Sink {
    /// Starts a sink.
    pub fn start(options: SinkOptions) -> Sink {
        let relay = StrictRelay::start(RelayOptions {
            security: if options.tls {
                Security::StartTls
            } else {
                Security::None
            },
            login: if options.tls {
                Login::Anyone
            } else {
                Login::Off
            },
            pipelining: !options.no_pipelining,
            eightbitmime: true,
            record: false,
            delay: options.delay,
            gated: options.gated,
            ..RelayOptions::default()
        });
        Sink {
            port: relay.port,
            ca_pem: relay.ca_pem.clone(),
            relay,
        }
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> u64 {
        self.relay.messages()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.relay.connections() as u64
    }

    /// Commands the sink refused as pipelined without PIPELINING offered.
    pub fn improper_pipelining(&self) -> usize {
        self.relay.improper_pipelining()
    }

    /// The relay itself (its port, its switches).
    pub fn relay(&self) -> &StrictRelay {
        &self.relay
    }

    /// Lets held sessions (and later ones) proceed.
    pub fn open_gate(&self) {
        self.relay.open_gate();
    }

    /// Holds new sessions before the greeting again.
    pub fn close_gate(&self) {
        self.relay.close_gate();
    }

    /// Waits until `count` messages have been accepted in all, or `limit`
    /// passes; returns when the count was reached, or `None`.
    pub fn wait_for(&self, count: u64, limit: Duration) -> Option<Instant> {
        self.relay.wait_for_count(count, limit)
    }
}
