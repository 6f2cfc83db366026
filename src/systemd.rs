//! systemd readiness notification (`Type=notify`): a datagram to
//! `$NOTIFY_SOCKET`, no libsystemd needed.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to systemd, if it asked for notifications.
/// Does nothing when `NOTIFY_SOCKET` is unset.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &address)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(error) = result {
        log::warn!("cannot notify systemd ({state}): {error}");
    }
}
