//! A private Postfix instance as the other peer on the WAN benchmark's
//! link, never touching a system Postfix:
//!
//! - its own configuration directory, queue directory and data directory
//!   under a fresh temporary directory (`main.cf` and `master.cf` written
//!   here, nothing read from `/etc/postfix` but the package's
//!   `postfix-files` list through `meta_directory`); no chroot; logs to
//!   `maillog` in that directory (postlogd); the data directory is given
//!   to the `postfix` user the package created;
//! - `smtpd` on its own loopback port (127.0.0.1 only), relaying for
//!   127.0.0.0/8 to `relayhost = [127.0.0.1]:<proxy port>`;
//! - as many connections to the relay as mailroom has workers
//!   (`initial_destination_concurrency` and the destination concurrency
//!   limit), connections cached and reused (`smtp_connection_cache_on_demand`,
//!   and for TLS `smtp_tls_connection_reuse` through `tlsproxy`);
//! - TLS: `smtp_tls_security_level = encrypt` (the sink's certificate is
//!   not verified; mailroom does verify it), AUTH with the bench login
//!   (`smtp_sasl_password_maps` as an inline table);
//! - started with `postfix -c <dir> start`, stopped with `postfix -c <dir>
//!   stop` and the directory removed; messages injected by `smtp-source`
//!   (`-s` sessions in parallel, `-m` messages, 256-byte bodies) into its
//!   smtpd while the sink holds its greeting; timed, like mailroom's
//!   backlog, from opening the sink's gate to the sink's count.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailroom_testkit::latency::LatencyProxy;

use super::sink::Sink;
use super::{LinkRun, PASSWORD, USER};

const POSTFIX: &str = "/usr/sbin/postfix";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// A Postfix installation found on this machine.
pub struct Postfix;

impl Postfix {
    /// `None` unless `postfix` and `smtp-source` are installed (and
    /// BENCH_POSTFIX is not 0).
    pub fn available() -> Option<Postfix> {
        if super::env_number("BENCH_POSTFIX", 1) == 0 {
            return None;
        }
        (Path::new(POSTFIX).is_file() && Path::new(SMTP_SOURCE).is_file()).then_some(Postfix)
    }

    /// A fresh instance relaying to `proxy` with `connections` connections
    /// delivers `count` messages; `None` when it could not be set up.
    pub fn run(
        &self,
        sink: &Sink,
        proxy: &LatencyProxy,
        tls: bool,
        connections: usize,
        count: u64,
    ) -> LinkRun {
        match Instance::start(sink, proxy.port, tls, connections) {
            Ok(instance) => {
                let run = instance.deliver(sink, proxy, count);
                instance.stop();
                run
            }
            Err(error) => {
                println!("  Postfix: cannot start a private instance: {error}");
                LinkRun::default()
            }
        }
    }
}

struct Instance {
    directory: PathBuf,
    config: PathBuf,
    port: u16,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Instance {
    fn start(
        sink: &Sink,
        relay_port: u16,
        tls: bool,
        connections: usize,
    ) -> Result<Instance, String> {
        let directory = std::env::temp_dir().join(format!(
            "mailroom-bench-postfix-{}-{relay_port}-{connections}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&directory);
        let config = directory.join("etc");
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(directory.join(sub)).map_err(|e| e.to_string())?;
        }
        let port = free_port().map_err(|e| e.to_string())?;
        let dir = directory.display().to_string();
        let relay = format!("[127.0.0.1]:{relay_port}");
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
in_flow_delay = 0s
relayhost = {relay}
smtp_host_lookup = native
smtp_dns_support_level = disabled
default_process_limit = {processes}
default_destination_concurrency_limit = {connections}
smtp_destination_concurrency_limit = {connections}
initial_destination_concurrency = {connections}
smtp_connection_cache_on_demand = yes
smtp_connection_cache_destinations = {relay}
smtp_helo_name = postfix.bench.test
delay_warning_time = 0h
biff = no
",
            processes = connections + 100,
        );
        if tls {
            let ca = directory.join("ca.pem");
            std::fs::write(&ca, sink.ca_pem.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            main.push_str(&format!(
                "smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_tls_connection_reuse = yes
smtp_tls_session_cache_database = btree:{dir}/data/smtp_scache
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = inline:{{ {relay}={USER}:{PASSWORD} }}
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
",
                ca = ca.display()
            ));
        } else {
            main.push_str("smtp_tls_security_level = none\n");
        }
        let master = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
scache unix - - n - 1 scache
tlsproxy unix - - n - 0 tlsproxy
anvil unix - - n - 1 anvil
postlog unix-dgram n - n - 1 postlogd
"
        );
        std::fs::write(config.join("main.cf"), main).map_err(|e| e.to_string())?;
        std::fs::write(config.join("master.cf"), master).map_err(|e| e.to_string())?;
        let instance = Instance {
            directory,
            config,
            port,
        };
        // Postfix's own files live there (the master lock, TLS caches).
        let owned = Command::new("chown")
            .arg("postfix")
            .arg(instance.directory.join("data"))
            .status()
            .map_err(|e| e.to_string())?;
        if !owned.success() {
            return Err("cannot give the data directory to the postfix user".into());
        }
        instance.postfix(&["check"])?;
        instance.postfix(&["start"])?;
        // Ready once smtpd answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("smtpd never listened; see {dir}/maillog"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(instance)
    }

    fn postfix(&self, arguments: &[&str]) -> Result<(), String> {
        let output = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.config)
            .args(arguments)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "postfix {}: {}{}",
                arguments.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Injects `count` messages while the sink holds its greeting, then
    /// times their delivery.
    fn deliver(&self, sink: &Sink, proxy: &LatencyProxy, count: u64) -> LinkRun {
        sink.close_gate();
        let (flights, connections) = (proxy.flights(), proxy.connections());
        let before = sink.messages();
        let injected = Command::new(SMTP_SOURCE)
            .args([
                "-c",
                "-s",
                "20",
                "-l",
                "256",
                "-f",
                "app@example.com",
                "-t",
                "user@example.org",
            ])
            .arg("-m")
            .arg(count.to_string())
            .arg(format!("127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match injected {
            Ok(output) if output.status.success() => {}
            Ok(output) => println!(
                "  Postfix: smtp-source: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => println!("  Postfix: smtp-source: {error}"),
        }
        let started = Instant::now();
        sink.open_gate();
        let done = sink.wait_for(before + count, Duration::from_secs(600));
        if done.is_none() {
            println!(
                "  Postfix: only {} of {count} arrived; see {}/maillog",
                sink.messages() - before,
                self.directory.display()
            );
        }
        LinkRun {
            messages: sink.messages() - before,
            elapsed: done.unwrap_or_else(Instant::now) - started,
            flights: proxy.flights() - flights,
            connections: proxy.connections() - connections,
        }
    }

    fn stop(self) {
        let _ = self.postfix(&["stop"]);
        if super::env_number("BENCH_POSTFIX_KEEP", 0) == 0 {
            let _ = std::fs::remove_dir_all(&self.directory);
        }
    }
}
