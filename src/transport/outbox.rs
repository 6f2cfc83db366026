//! Outbox mode (no relay configured): each message becomes a `.eml` file,
//! written to a temporary name, synced, then renamed, so a reader never
//! sees half a message.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::{Delivered, DeliveryError};
use crate::message::OutgoingMessage;

/// Writes `message` as `<id>.eml` in `dir`; every recipient counts as accepted.
pub(super) fn write(
    dir: &Path,
    message: &OutgoingMessage,
    recipients: &[String],
) -> Result<Delivered, DeliveryError> {
    let write = || -> std::io::Result<()> {
        let temporary = dir.join(format!(".{}.eml.tmp", message.id));
        let mut file = fs::File::create(&temporary)?;
        file.write_all(message.content.as_bytes())?;
        // The message's last line, ended as SMTP would end it.
        if !message.content.ends_with("\r\n") {
            file.write_all(b"\r\n")?;
        }
        file.sync_all()?;
        fs::rename(&temporary, dir.join(format!("{}.eml", message.id)))
    };
    write()
        .map(|()| Delivered {
            accepted: recipients.to_vec(),
            ..Delivered::default()
        })
        .map_err(|error| {
            DeliveryError::transient(
                format!("cannot write to outbox {}: {error}", dir.display()),
                true,
            )
        })
}
