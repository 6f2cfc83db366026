//! Limits on the HTTP connections tiny_http accepts, applied from outside
//! it, through the sockets' file descriptors (Linux).
//!
//! tiny_http 0.12 reads each connection on a thread of its own pool with
//! no timeout and no limit on the request head, and gives its user no
//! handle on the socket. So a janitor thread looks at the process's open
//! sockets every [`JANITOR_INTERVAL`] (`/proc/self/fd`), picks those
//! accepted on our listening address, and:
//! - gives each a read and a write timeout ([`READ_TIMEOUT`],
//!   [`WRITE_TIMEOUT`]), so a silent client releases its thread;
//! - shuts down a connection that has not delivered a complete request
//!   head within [`HEAD_DEADLINE`] of connecting or of its last answer
//!   (idle keep-alive and slowloris clients), or that sent more than
//!   [`MAX_HEAD_BYTES`] without one (endless header lines, garbage);
//! - shuts down a connection at a deadline a handler asked for;
//! - when a connection's request waits unread (tiny_http's pool queued it
//!   behind busy threads), shuts down the connections that hold threads
//!   without sending: silent ones and heads, once older than
//!   [`CROWDED_HEAD_DEADLINE`].
//!
//! tiny_http serves a keep-alive connection on one thread of its pool until
//! the client leaves; its pool starts a thread for every connection that
//! finds none idle (with the fix in vendor/tiny_http), so a new connection
//! does not wait behind keep-alive ones, and the crowded case above is a
//! last resort for when the system refuses threads.
//!
//! Every action goes through a duplicate of the descriptor whose inode was
//! checked first, so a descriptor number that tiny_http closed and the
//! kernel reused for something else is never acted on.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// A read on an accepted connection fails after this long without data.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to an accepted connection fails after this long without progress.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has, from connecting, to send its request line and headers.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes a client may send before its request head is complete: an 8 KiB
/// request line and 64 KiB of headers, with some slack.
pub const MAX_HEAD_BYTES: u64 = 8 * 1024 + 64 * 1024 + 4 * 1024;
/// While requests wait for a tiny_http thread, the time a client has to
/// send its request head.
pub const CROWDED_HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// How often the janitor looks at the connections.
pub const JANITOR_INTERVAL: Duration = Duration::from_millis(100);

/// The accepted connections of one listening address.
pub struct Connections {
    listen: SocketAddr,
    registry: Mutex<Registry>,
    /// What each peer's connection is doing, as handlers report it. Apart
    /// from the registry so that the accept loop never waits for a scan;
    /// taken after the registry when both are needed.
    requests: Mutex<HashMap<SocketAddr, Activity>>,
    /// Set by [`Connections::stop`] before the listening socket closes:
    /// its port may then belong to someone else, whose sockets must not be
    /// touched.
    stopped: AtomicBool,
}

#[derive(Default)]
struct Registry {
    /// Accepted sockets by inode.
    sockets: HashMap<u64, Socket>,
    /// Other sockets of the process (relay connections, the listening
    /// socket...), by inode, with the scan that last saw them.
    foreign: HashMap<u64, u64>,
    /// Peers to shut down at a given time.
    deadlines: HashMap<SocketAddr, Instant>,
    /// Scans done, to tell which sockets the last one saw.
    scans: u64,
    /// When the last scan began: a connection older than that and not
    /// found is closed.
    last_scan: Option<Instant>,
    /// Connections closed because requests waited, not yet logged, and
    /// when that was last logged (at most every [`HEAD_DEADLINE`]).
    crowded_cuts: usize,
    crowded_logged: Option<Instant>,
}

/// A connection's requests, as the handlers report them.
#[derive(Clone, Copy)]
struct Activity {
    /// A handler holds a request from it.
    handling: bool,
    /// When its current request arrived, or its last one was answered.
    since: Instant,
    /// Requests answered on it.
    answered: u64,
}

struct Socket {
    inode: u64,
    peer: SocketAddr,
    /// tiny_http's descriptors for it (it keeps two per connection).
    fds: Vec<i32>,
    first_seen: Instant,
    seen_in: u64,
    /// Bytes received before its current request head began (as of the
    /// first pass after its last answer).
    head_start: u64,
    /// Answers counted when `head_start` was taken.
    answers_seen: u64,
    /// Consecutive passes that found the head limit exceeded.
    over_limit: u8,
    /// Consecutive passes that found received bytes nobody read.
    unread: u8,
    /// Already shut down by the janitor; waiting for tiny_http to close it.
    cut: bool,
}

impl Connections {
    /// Watches the connections accepted on `listen` until the returned
    /// value is dropped or stopped; `each_pass` runs after every pass (the
    /// HTTP server checks its acceptor there). Not on Linux, it does nothing.
    pub fn start(listen: SocketAddr, each_pass: impl Fn() + Send + 'static) -> Arc<Connections> {
        let connections = Arc::new(Connections {
            listen,
            registry: Mutex::new(Registry::default()),
            requests: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
        });
        if cfg!(target_os = "linux") {
            let watched = Arc::downgrade(&connections);
            let spawned = std::thread::Builder::new()
                .name("http-janitor".into())
                .stack_size(256 * 1024)
                .spawn(move || janitor(&watched, each_pass));
            if let Err(error) = spawned {
                log::error!("cannot start the HTTP connection janitor: {error}; slow or idle clients are not cut off");
            }
        }
        connections
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn requests(&self) -> MutexGuard<'_, HashMap<SocketAddr, Activity>> {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops watching and acting, for good: call before the listening
    /// socket closes.
    pub fn stop(&self) {
        // Under the lock: a pass in progress finishes first.
        let _registry = self.lock();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// A request from `peer` was handed to a handler: its head is complete.
    pub fn request_arrived(&self, peer: SocketAddr) {
        let now = Instant::now();
        self.requests()
            .entry(peer)
            .and_modify(|activity| {
                activity.handling = true;
                activity.since = now;
            })
            .or_insert(Activity {
                handling: true,
                since: now,
                answered: 0,
            });
    }

    /// The request from `peer` has been answered; the connection may carry
    /// another one, whose head has [`HEAD_DEADLINE`] from now.
    pub fn answered(&self, peer: SocketAddr) {
        if let Some(activity) = self.requests().get_mut(&peer) {
            activity.handling = false;
            activity.since = Instant::now();
            activity.answered += 1;
        }
    }

    /// Makes sure the connection from `peer` is watched and has its
    /// timeouts, before a handler reads from it.
    pub fn track(&self, peer: SocketAddr) {
        let mut registry = self.lock();
        if !self.stopped() {
            self.find_or_scan(&mut registry, peer);
        }
    }

    /// Shut the connection down at `at` if it is still open then (bounds
    /// how long reading or discarding a body may take).
    pub fn close_at(&self, peer: SocketAddr, at: Instant) {
        self.lock().deadlines.insert(peer, at);
    }

    /// Cancels [`Connections::close_at`].
    pub fn keep_open(&self, peer: SocketAddr) {
        self.lock().deadlines.remove(&peer);
    }

    /// Makes reads on the connection return end-of-file now; writing still
    /// works. False when the socket was not found.
    pub fn shut_read(&self, peer: SocketAddr) -> bool {
        self.shutdown(peer, Shutdown::Read)
    }

    /// Closes the connection from `peer` now.
    pub fn finish(&self, peer: SocketAddr) {
        self.shutdown(peer, Shutdown::Both);
        self.lock().deadlines.remove(&peer);
        self.requests().remove(&peer);
    }

    fn shutdown(&self, peer: SocketAddr, how: Shutdown) -> bool {
        let mut registry = self.lock();
        if self.stopped() {
            return false;
        }
        match self.find_or_scan(&mut registry, peer) {
            Some((inode, fds)) => sys::shutdown(fds.into_iter(), Some(inode), how),
            None => false,
        }
    }

    /// The socket connected to `peer` (inode and descriptors), scanning
    /// if it is new since the last scan (a request usually arrives right
    /// after its connection) unless a scan that began after the request
    /// arrived missed it (then it is gone).
    fn find_or_scan(&self, registry: &mut Registry, peer: SocketAddr) -> Option<(u64, Vec<i32>)> {
        if find(registry, peer).is_none() {
            let arrived = self.requests().get(&peer).map(|activity| activity.since);
            let scanned_since = match (registry.last_scan, arrived) {
                (Some(scan), Some(arrived)) => scan > arrived,
                _ => false,
            };
            if !scanned_since {
                self.scan(registry);
            }
        }
        find(registry, peer).map(|(inode, socket)| (inode, socket.fds.clone()))
    }

    /// Brings the registry up to date with the open descriptors; new
    /// sockets of ours get their timeouts.
    fn scan(&self, registry: &mut Registry) {
        let started = Instant::now();
        let Some(fds) = sys::open_descriptors() else {
            return;
        };
        registry.scans += 1;
        let scan = registry.scans;
        for fd in fds {
            let Some(inode) = sys::socket_inode(fd) else {
                continue;
            };
            if let Some(socket) = registry.sockets.get_mut(&inode) {
                if socket.seen_in != scan {
                    socket.seen_in = scan;
                    socket.fds.clear();
                }
                socket.fds.push(fd);
                continue;
            }
            if let Some(seen_in) = registry.foreign.get_mut(&inode) {
                *seen_in = scan;
                continue;
            }
            let (inode, peer) = match sys::accepted_on(fd, self.listen) {
                Found::Ours(inode, peer) => (inode, peer),
                Found::Foreign => {
                    registry.foreign.insert(inode, scan);
                    continue;
                }
                Found::Unknown => continue,
            };
            registry.sockets.insert(
                inode,
                Socket {
                    inode,
                    peer,
                    fds: vec![fd],
                    first_seen: started,
                    seen_in: scan,
                    head_start: 0,
                    answers_seen: 0,
                    over_limit: 0,
                    unread: 0,
                    cut: false,
                },
            );
        }
        registry.sockets.retain(|_, socket| socket.seen_in == scan);
        registry.foreign.retain(|_, seen_in| *seen_in == scan);
        // Forget requests and deadlines of connections that are gone.
        let live: std::collections::HashSet<SocketAddr> = registry
            .sockets
            .values()
            .map(|socket| socket.peer)
            .collect();
        self.requests()
            .retain(|peer, activity| live.contains(peer) || activity.since >= started);
        registry.deadlines.retain(|peer, _| live.contains(peer));
        registry.last_scan = Some(started);
    }

    /// One janitor pass: scan, then cut off what is over its limits.
    fn pass(&self) {
        let mut registry = self.lock();
        if self.stopped() {
            return;
        }
        self.scan(&mut registry);
        let requests = self.requests().clone();
        let now = Instant::now();
        let Registry {
            sockets,
            deadlines,
            crowded_cuts,
            crowded_logged,
            ..
        } = &mut *registry;
        let mut crowded = false;
        let mut idle = std::collections::HashSet::new();
        for socket in sockets.values_mut().filter(|socket| !socket.cut) {
            let activity = requests.get(&socket.peer);
            // Waiting for a request head since it connected or since its
            // last answer (a keep-alive connection between requests).
            let waiting_since = activity.map_or(socket.first_seen, |activity| {
                activity.since.max(socket.first_seen)
            });
            let age = now.duration_since(waiting_since);
            let reason = if deadlines.get(&socket.peer).is_some_and(|at| now >= *at) {
                "its deadline passed"
            } else if activity.is_some_and(|activity| activity.handling) {
                continue;
            } else if age > HEAD_DEADLINE {
                "no complete request head in time"
            } else {
                let (received, unread) = socket
                    .fds
                    .iter()
                    .find_map(|fd| sys::reading(*fd))
                    .unwrap_or((0, 0));
                let answered = activity.map_or(0, |activity| activity.answered);
                if answered != socket.answers_seen {
                    // A new head begins after the last answer; what it has
                    // sent by now counts as already in its limit's slack.
                    socket.answers_seen = answered;
                    socket.head_start = received;
                    socket.over_limit = 0;
                }
                let head_bytes = received.saturating_sub(socket.head_start);
                // Twice in a row, for these two: a request head that just
                // arrived may not have reached a handler yet.
                socket.unread = if unread > 0 { socket.unread + 1 } else { 0 };
                crowded |= socket.unread >= 2;
                socket.over_limit = if head_bytes > MAX_HEAD_BYTES {
                    socket.over_limit + 1
                } else {
                    0
                };
                if socket.over_limit < 2 {
                    // A connection that has sent nothing yet gets the same
                    // second as a partial head: a client thread can be
                    // descheduled between connect and write on a busy host.
                    // An idle keep-alive connection is one of these.
                    if unread == 0 && age > CROWDED_HEAD_DEADLINE {
                        idle.insert(socket.inode);
                    }
                    continue;
                }
                "request head too large"
            };
            cut(socket, deadlines, reason);
        }
        if crowded {
            // Requests wait for a thread: free the threads that silent and
            // slow clients hold (already a pass old, so not just connected).
            let idle: Vec<&mut Socket> = sockets
                .values_mut()
                .filter(|socket| idle.contains(&socket.inode))
                .filter(|socket| now.duration_since(socket.first_seen) >= JANITOR_INTERVAL)
                .collect();
            *crowded_cuts += idle.len();
            if *crowded_cuts > 0 && crowded_logged.is_none_or(|at| now >= at + HEAD_DEADLINE) {
                log::warn!(
                    "HTTP requests were waiting for a thread: closed {crowded_cuts} silent or slow connections"
                );
                *crowded_cuts = 0;
                *crowded_logged = Some(now);
            }
            for socket in idle {
                cut(socket, deadlines, "silent or slow while requests wait");
            }
        }
    }
}

/// Shuts a connection down for `reason`; tiny_http then closes it.
fn cut(socket: &mut Socket, deadlines: &mut HashMap<SocketAddr, Instant>, reason: &str) {
    socket.cut = true;
    deadlines.remove(&socket.peer);
    sys::shutdown(
        socket.fds.iter().copied(),
        Some(socket.inode),
        Shutdown::Both,
    );
    log::debug!("HTTP connection from {} closed: {reason}", socket.peer);
}

/// What a descriptor turned out to be.
enum Found {
    /// A connection accepted on our address: its inode and peer.
    Ours(u64, SocketAddr),
    /// A socket on another address.
    Foreign,
    /// Not known yet (closed meanwhile, or no descriptor to spare).
    Unknown,
}

/// The socket connected to `peer`, with its inode.
fn find(registry: &Registry, peer: SocketAddr) -> Option<(u64, &Socket)> {
    registry
        .sockets
        .iter()
        .find(|(_, socket)| socket.peer == peer)
        .map(|(inode, socket)| (*inode, socket))
}

fn janitor(watched: &Weak<Connections>, each_pass: impl Fn()) {
    loop {
        // Pacing a periodic check, not synchronisation.
        std::thread::sleep(JANITOR_INTERVAL);
        match watched.upgrade() {
            Some(connections) if !connections.stopped() => connections.pass(),
            _ => return,
        }
        each_pass();
    }
}

/// The inode of the socket behind descriptor `fd`, if it is one (Linux).
pub fn socket_inode(fd: i32) -> Option<u64> {
    sys::socket_inode(fd)
}

#[cfg(target_os = "linux")]
mod sys {
    //! The descriptor-level operations, each through a checked duplicate.

    use std::net::{Shutdown, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use socket2::SockRef;

    use super::{Found, READ_TIMEOUT, WRITE_TIMEOUT};

    /// The process's open descriptor numbers.
    pub fn open_descriptors() -> Option<Vec<i32>> {
        let entries = std::fs::read_dir("/proc/self/fd").ok()?;
        Some(
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
        )
    }

    /// The inode of the socket behind `fd`, if it is one.
    pub fn socket_inode(fd: i32) -> Option<u64> {
        // SAFETY: fstat only reads the file's metadata into `status` (plain
        // integers, for which all zeroes is valid); a closed `fd` makes it
        // fail, a reused one describes the new file (identified by inode).
        unsafe {
            let mut status: libc::stat = std::mem::zeroed();
            (libc::fstat(fd, &mut status) == 0 && status.st_mode & libc::S_IFMT == libc::S_IFSOCK)
                .then_some(status.st_ino)
        }
    }

    /// A descriptor of our own for whatever `fd` refers to now, with its inode.
    fn duplicate(fd: i32) -> Option<(OwnedFd, u64)> {
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; if `fd`
        // was closed it fails, if it was reused we get (and then identify)
        // the new file. Nothing else owns the new descriptor.
        let owned = unsafe {
            let duplicate = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
            if duplicate < 0 {
                return None;
            }
            OwnedFd::from_raw_fd(duplicate)
        };
        let inode = socket_inode(owned.as_raw_fd())?;
        Some((owned, inode))
    }

    /// A duplicate of the first of `fds` that is still the socket `inode`.
    fn checked(fds: impl Iterator<Item = i32>, inode: Option<u64>) -> Option<OwnedFd> {
        let inode = inode?;
        fds.filter_map(duplicate)
            .find(|(_, found)| *found == inode)
            .map(|(owned, _)| owned)
    }

    /// Whether `fd` is a connection accepted on `listen`; if so, gives it
    /// its timeouts.
    pub fn accepted_on(fd: i32, listen: SocketAddr) -> Found {
        let Some((owned, inode)) = duplicate(fd) else {
            return Found::Unknown;
        };
        let socket = SockRef::from(&owned);
        let Some(local) = socket.local_addr().ok().and_then(|local| local.as_socket()) else {
            return Found::Foreign;
        };
        let ours = local.port() == listen.port()
            && (listen.ip().is_unspecified() || local.ip() == listen.ip());
        if !ours {
            return Found::Foreign;
        }
        // The listening socket itself, or a connection already reset.
        let Some(peer) = socket.peer_addr().ok().and_then(|peer| peer.as_socket()) else {
            return Found::Unknown;
        };
        if let Err(error) = socket
            .set_read_timeout(Some(READ_TIMEOUT))
            .and_then(|()| socket.set_write_timeout(Some(WRITE_TIMEOUT)))
        {
            log::debug!("cannot set timeouts on the connection from {peer}: {error}");
        }
        Found::Ours(inode, peer)
    }

    /// Shuts the socket down; false when it is gone.
    pub fn shutdown(fds: impl Iterator<Item = i32>, inode: Option<u64>, how: Shutdown) -> bool {
        match checked(fds, inode) {
            // Not connected any more is fine: the goal is reached.
            Some(owned) => {
                let _ = SockRef::from(&owned).shutdown(how);
                true
            }
            None => false,
        }
    }

    /// Bytes received on the connection behind `fd` since it was
    /// accepted, and bytes received but not read yet. Only a reading: if
    /// `fd` was just reused the figures are another socket's, which is why
    /// the janitor acts only on two passes in a row.
    pub fn reading(fd: i32) -> Option<(u64, u64)> {
        // SAFETY: getsockopt and ioctl(FIONREAD) only read the socket's
        // state into `info` (plain integers, for which all zeroes is valid;
        // at most `length` bytes) and `unread`; a stale `fd` makes them fail
        // or read another socket.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut length = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let result = libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut length,
            );
            // Older kernels fill a shorter structure without the counter.
            let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
            if result != 0 || (length as usize) < needed {
                return None;
            }
            let mut unread: libc::c_int = 0;
            if libc::ioctl(fd, libc::FIONREAD, &mut unread) != 0 {
                return None;
            }
            Some((info.tcpi_bytes_received, unread.max(0) as u64))
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    //! Elsewhere the connections are left to tiny_http alone.

    use std::net::{Shutdown, SocketAddr};

    pub fn open_descriptors() -> Option<Vec<i32>> {
        None
    }
    pub fn socket_inode(_fd: i32) -> Option<u64> {
        None
    }
    pub fn accepted_on(_fd: i32, _listen: SocketAddr) -> super::Found {
        super::Found::Unknown
    }
    pub fn shutdown(_fds: impl Iterator<Item = i32>, _inode: Option<u64>, _how: Shutdown) -> bool {
        false
    }
    pub fn reading(_fd: i32) -> Option<(u64, u64)> {
        None
    }
}
