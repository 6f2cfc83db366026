//! Patch: `try_recv` leaves an `unblock` for the thread it was meant for.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// 0.12.0's `try_recv` took the wake-up that `unblock` queued, so a thread
/// blocked in `recv` (e.g. one of a server's handlers at shutdown) never
/// woke.
#[test]
fn try_recv_leaves_an_unblock_for_a_blocked_receiver() {
    let server = Arc::new(default_server());
    server.unblock();
    assert!(matches!(server.try_recv(), Ok(None)));
    let (woke, woken) = std::sync::mpsc::channel();
    let receiver = Arc::clone(&server);
    std::thread::spawn(move || {
        let _ = woke.send(receiver.recv().is_err());
    });
    assert_eq!(
        woken.recv_timeout(Duration::from_secs(30)),
        Ok(true),
        "recv must return the unblock at once"
    );
}
