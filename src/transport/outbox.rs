//! Outbox mode (no relay configured): each message becomes a `.eml` file,
//! written to a temporary name, synced, then renamed, so a reader never
//! sees half a message.
//!
//! The file is the message as it would follow `DATA`, preceded by the
//! envelope as two header lines, `X-Envelope-From` and `X-Envelope-To`
//! (every recipient, Bcc included). Headers rather than a file beside it:
//! one file, written at once, that any mail client shows (its "show
//! original" view) and `grep` finds; the message's own headers still never
//! name a Bcc recipient.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::{Delivered, DeliveryError, SmtpReply};
use crate::message::OutgoingMessage;

/// Writes `message` as `<id>.eml` in `dir`; every recipient counts as
/// accepted, and the reply names the file (it is logged with `sent`).
pub(super) fn write(
    dir: &Path,
    message: &OutgoingMessage,
    recipients: &[String],
) -> Result<Delivered, DeliveryError> {
    let path = dir.join(format!("{}.eml", message.id));
    let write = || -> std::io::Result<()> {
        let temporary = dir.join(format!(".{}.eml.tmp", message.id));
        let mut file = fs::File::create(&temporary)?;
        file.write_all(envelope(&message.envelope_from, recipients).as_bytes())?;
        file.write_all(message.content.as_bytes())?;
        // The message's last line, ended as SMTP would end it.
        if !message.content.ends_with("\r\n") {
            file.write_all(b"\r\n")?;
        }
        file.sync_all()?;
        fs::rename(&temporary, &path)
    };
    write()
        .map(|()| Delivered {
            accepted: recipients.to_vec(),
            reply: Some(SmtpReply {
                code: 250,
                text: format!("written to {}", path.display()),
            }),
            ..Delivered::default()
        })
        .map_err(|error| {
            DeliveryError::transient(
                format!("cannot write to outbox {}: {error}", dir.display()),
                true,
            )
        })
}

/// The envelope as header lines: one recipient per line, so no line comes
/// near 998 octets however many there are.
fn envelope(from: &str, recipients: &[String]) -> String {
    let mut text = format!("X-Envelope-From: <{from}>\r\nX-Envelope-To:");
    for (index, recipient) in recipients.iter().enumerate() {
        let separator = if index + 1 < recipients.len() {
            ","
        } else {
            ""
        };
        text.push_str(&format!(" <{recipient}>{separator}\r\n"));
    }
    if recipients.is_empty() {
        text.push_str("\r\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::envelope;

    #[test]
    fn the_envelope_is_folded_one_recipient_a_line() {
        assert_eq!(
            envelope("a@b.c", &["d@e.f".into(), "g@h.i".into()]),
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-To: <d@e.f>,\r\n <g@h.i>\r\n"
        );
        assert_eq!(
            envelope("a@b.c", &["d@e.f".into()]),
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-To: <d@e.f>\r\n"
        );
    }
}
