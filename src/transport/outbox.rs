//! Outbox mode (no relay configured): each message becomes a `.eml` file,
//! written to a temporary name, synced, then renamed, so a reader never
//! sees half a message.
//!
//! The file is the message as it would follow `DATA`, preceded by the
//! envelope as header lines: `X-Envelope-From`, `X-Envelope-To` (the
//! recipients the message's `To` and `Cc` name) and, when there are Bcc
//! recipients, `X-Envelope-Bcc` with their number only: Bcc never appears
//! in a header (the SPEC), the file's included; the status's `recipients`
//! lists them all. Headers rather than a file beside it: one file, written
//! at once, that any mail client shows (its "show original" view) and
//! `grep` finds.

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
        file.write_all(envelope(&message.envelope_from, recipients, &message.content).as_bytes())?;
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
/// near 998 octets however many there are; Bcc recipients (those the
/// message's `To` and `Cc` do not name) only counted.
fn envelope(from: &str, recipients: &[String], content: &str) -> String {
    let visible = visible_recipients(content);
    let (shown, hidden): (Vec<&String>, Vec<&String>) = recipients
        .iter()
        .partition(|recipient| visible.contains(&recipient.to_ascii_lowercase()));
    let mut text = format!("X-Envelope-From: <{from}>\r\n");
    if !shown.is_empty() {
        text.push_str("X-Envelope-To:");
        for (index, recipient) in shown.iter().enumerate() {
            let separator = if index + 1 < shown.len() { "," } else { "" };
            text.push_str(&format!(" <{recipient}>{separator}\r\n"));
        }
    }
    match hidden.len() {
        0 => {}
        1 => text.push_str("X-Envelope-Bcc: 1 recipient, not named\r\n"),
        count => text.push_str(&format!(
            "X-Envelope-Bcc: {count} recipients, not named\r\n"
        )),
    }
    text
}

/// The addresses (lower case) in the `To` and `Cc` headers of a message as
/// built: each between `<` and `>`, or a bare address alone in its list item.
fn visible_recipients(content: &str) -> Vec<String> {
    let head = content.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let mut addresses = Vec::new();
    for line in unfolded.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !(name.eq_ignore_ascii_case("to") || name.eq_ignore_ascii_case("cc")) {
            continue;
        }
        for item in value.split(',') {
            let item = item.trim();
            let address = match (item.rfind('<'), item.ends_with('>')) {
                (Some(start), true) => &item[start + 1..item.len() - 1],
                _ => item,
            };
            addresses.push(address.to_ascii_lowercase());
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::envelope;

    #[test]
    fn the_envelope_is_folded_one_recipient_a_line() {
        let content = "From: a@b.c\r\nTo: D <d@e.f>,\r\n g@h.i\r\nSubject: x\r\n\r\nbody";
        assert_eq!(
            envelope("a@b.c", &["d@e.f".into(), "g@h.i".into()], content),
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-To: <d@e.f>,\r\n <g@h.i>\r\n"
        );
        assert_eq!(
            envelope("a@b.c", &["d@e.f".into()], content),
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-To: <d@e.f>\r\n"
        );
    }

    #[test]
    fn bcc_recipients_are_only_counted() {
        let content = "From: a@b.c\r\nTo: d@e.f\r\nCc: \"G, H\" <G@h.i>\r\n\r\nTo: body@x.y";
        let recipients: Vec<String> = ["d@e.f", "g@h.i", "secret@x.y", "body@x.y"]
            .into_iter()
            .map(String::from)
            .collect();
        let text = envelope("a@b.c", &recipients, content);
        assert_eq!(
            text,
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-To: <d@e.f>,\r\n <g@h.i>\r\nX-Envelope-Bcc: 2 recipients, not named\r\n"
        );
        assert!(!text.contains("secret") && !text.contains("body@"));
        assert_eq!(
            envelope("a@b.c", &["secret@x.y".into()], "From: a@b.c\r\n\r\n"),
            "X-Envelope-From: <a@b.c>\r\nX-Envelope-Bcc: 1 recipient, not named\r\n"
        );
    }
}
