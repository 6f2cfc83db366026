//! How records sit in a journal segment: `magic (4) | length (u32 LE) |
//! CRC-32 of length and payload (u32 LE) | payload (JSON)`, back to back.
//!
//! Reading never fails: bytes that are not a valid frame (a torn write at
//! the tail, garbage in the middle) come out as a [`Piece::Garbage`] run up
//! to the next valid frame, so everything around them is still read. Runs
//! of zeros are [`Piece::Unused`]: segments are zero-filled ahead of the
//! writes (see `committer`).

use std::io;

/// Marks the start of every frame.
const MAGIC: [u8; 4] = *b"mrj1";
/// Bytes before the payload.
pub(super) const HEADER: usize = 12;
/// The largest payload. Every byte of JSON text is at least 0x20 (serde_json
/// escapes control characters), so a length field read from inside a
/// payload is at least 0x2020_2020: with this cap, no text a client sends
/// can ever be mistaken for a frame when scanning past garbage.
pub(super) const MAX_PAYLOAD: usize = 0x2020_2020 - 1;

/// Builds one frame; `write_payload` appends the JSON.
pub(super) fn encode(
    write_payload: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(1024);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&[0; HEADER - 4]);
    write_payload(&mut frame)?;
    let length = frame.len() - HEADER;
    if length > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a spool record of {length} bytes is larger than the journal allows ({MAX_PAYLOAD})"),
        ));
    }
    frame[4..8].copy_from_slice(&(length as u32).to_le_bytes());
    let checksum = crc32(&frame[4..8], &frame[HEADER..]);
    frame[8..12].copy_from_slice(&checksum.to_le_bytes());
    Ok(frame)
}

/// The payload of a valid frame starting at `at`, if there is one.
pub(super) fn frame_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let header = data.get(at..at.checked_add(HEADER)?)?;
    if header[..4] != MAGIC {
        return None;
    }
    let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if length > MAX_PAYLOAD {
        return None;
    }
    let payload = data.get(at + HEADER..at + HEADER + length)?;
    let checksum = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    (crc32(&header[4..8], payload) == checksum).then_some(payload)
}

/// One part of a segment, in order.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece<'a> {
    /// A valid frame at `offset`, `length` bytes long in all.
    Frame {
        offset: usize,
        length: usize,
        payload: &'a [u8],
    },
    /// Bytes `start..end` that are not frames.
    Garbage { start: usize, end: usize },
    /// Zeros `start..end`: space written ahead of use, holding nothing.
    Unused { start: usize, end: usize },
}

/// Splits a segment into frames and garbage runs.
pub(super) fn pieces(data: &[u8]) -> impl Iterator<Item = Piece<'_>> {
    let mut position = 0;
    std::iter::from_fn(move || {
        if position >= data.len() {
            return None;
        }
        let start = position;
        if data[start] == 0 {
            // Frames never start with a zero byte.
            let zeros = data[start..].iter().take_while(|byte| **byte == 0).count();
            position = start + zeros;
            return Some(Piece::Unused {
                start,
                end: position,
            });
        }
        if let Some(payload) = frame_at(data, position) {
            let piece = Piece::Frame {
                offset: position,
                length: HEADER + payload.len(),
                payload,
            };
            position += HEADER + payload.len();
            return Some(piece);
        }
        // Resynchronise on the next magic that starts a valid frame.
        let mut next = start + 1;
        while next < data.len() {
            match data[next..].windows(MAGIC.len()).position(|w| w == MAGIC) {
                Some(found) if frame_at(data, next + found).is_some() => {
                    next += found;
                    break;
                }
                Some(found) => next += found + 1,
                None => next = data.len(),
            }
        }
        let mut end = next.min(data.len());
        // Trailing zeros are unused space, not part of the garbage.
        while end > start + 1 && data[end - 1] == 0 {
            end -= 1;
        }
        position = end;
        Some(Piece::Garbage { start, end })
    })
}

/// CRC-32 (IEEE, as in zlib) of `a` followed by `b`.
fn crc32(a: &[u8], b: &[u8]) -> u32 {
    !crc32_update(crc32_update(!0, a), b)
}

/// Slicing-by-8: eight table look-ups per 8 bytes instead of one per byte
/// (records are kilobytes, and each is checksummed on every commit).
fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 8]> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut tables = [[0u32; 256]; 8];
        for (index, entry) in tables[0].iter_mut().enumerate() {
            let mut value = index as u32;
            for _ in 0..8 {
                value = if value & 1 == 1 {
                    0xEDB8_8320 ^ (value >> 1)
                } else {
                    value >> 1
                };
            }
            *entry = value;
        }
        for index in 0..256 {
            for slice in 1..8 {
                let previous = tables[slice - 1][index];
                tables[slice][index] = (previous >> 8) ^ tables[0][(previous & 0xff) as usize];
            }
        }
        tables
    });
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let low = crc ^ u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let high = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        crc = tables[7][(low & 0xff) as usize]
            ^ tables[6][((low >> 8) & 0xff) as usize]
            ^ tables[5][((low >> 16) & 0xff) as usize]
            ^ tables[4][(low >> 24) as usize]
            ^ tables[3][(high & 0xff) as usize]
            ^ tables[2][((high >> 8) & 0xff) as usize]
            ^ tables[1][((high >> 16) & 0xff) as usize]
            ^ tables[0][(high >> 24) as usize];
    }
    for byte in chunks.remainder() {
        crc = tables[0][((crc ^ u32::from(*byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Vec<u8> {
        encode(|buffer| {
            buffer.extend_from_slice(text.as_bytes());
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"1234", b"56789"), 0xCBF4_3926);
        assert_eq!(crc32(b"", b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"", b""), 0);
    }

    #[test]
    fn crc32_by_eight_bytes_matches_byte_by_byte() {
        let bytes: Vec<u8> = (0..1000u32).map(|n| (n * 7 + n / 13) as u8).collect();
        for length in [0, 1, 7, 8, 9, 15, 16, 17, 999, 1000] {
            let mut crc = !0u32;
            for byte in &bytes[..length] {
                crc ^= u32::from(*byte);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        0xEDB8_8320 ^ (crc >> 1)
                    } else {
                        crc >> 1
                    };
                }
            }
            assert_eq!(crc32(&bytes[..length], b""), !crc, "length {length}");
            assert_eq!(
                crc32(&bytes[..length / 2], &bytes[length / 2..length]),
                !crc
            );
        }
    }

    #[test]
    fn frames_round_trip_and_garbage_is_isolated() {
        let mut data = frame("{\"a\":1}");
        let garbage_start = data.len();
        data.extend_from_slice(b"\x01\x02garbage mrj1 more");
        let second = data.len();
        data.extend_from_slice(&frame("{\"b\":2}"));
        let torn = data.len();
        data.extend_from_slice(&frame("{\"c\":3}")[..9]);
        let found: Vec<Piece> = pieces(&data).collect();
        assert_eq!(
            found,
            vec![
                Piece::Frame {
                    offset: 0,
                    length: garbage_start,
                    payload: b"{\"a\":1}"
                },
                Piece::Garbage {
                    start: garbage_start,
                    end: second
                },
                Piece::Frame {
                    offset: second,
                    length: torn - second,
                    payload: b"{\"b\":2}"
                },
                Piece::Garbage {
                    start: torn,
                    end: data.len()
                },
            ]
        );
    }

    #[test]
    fn zeros_are_unused_space_and_not_garbage() {
        let mut data = frame("{}");
        let first = data.len();
        data.extend_from_slice(&[0; 5]);
        data.extend_from_slice(&frame("{}"));
        let torn = data.len();
        data.extend_from_slice(&frame("{\"torn\":1}")[..10]);
        let zeros = data.len();
        data.extend_from_slice(&[0; 100]);
        let kinds: Vec<(usize, usize, &str)> = pieces(&data)
            .map(|piece| match piece {
                Piece::Frame { offset, length, .. } => (offset, offset + length, "frame"),
                Piece::Garbage { start, end } => (start, end, "garbage"),
                Piece::Unused { start, end } => (start, end, "unused"),
            })
            .collect();
        // The torn header ends in zero bytes (its length's high bytes):
        // they count as unused, the rest as garbage.
        let header_zeros = data[..zeros].iter().rev().take_while(|b| **b == 0).count();
        assert_eq!(
            kinds,
            vec![
                (0, first, "frame"),
                (first, first + 5, "unused"),
                (first + 5, torn, "frame"),
                (torn, zeros - header_zeros, "garbage"),
                (zeros - header_zeros, data.len(), "unused"),
            ]
        );
    }

    #[test]
    fn a_frame_inside_json_text_is_never_valid() {
        // A client puts a whole frame into a message; serde_json escapes
        // its control bytes, and the printable rest cannot form a length
        // the reader accepts.
        let inner = frame("{}");
        let text = String::from_utf8_lossy(&inner).into_owned();
        let outer =
            encode(|buffer| serde_json::to_writer(&mut *buffer, &text).map_err(io::Error::other))
                .unwrap();
        let mut data = b"junk".to_vec();
        data.extend_from_slice(&outer[HEADER..]);
        assert!(pieces(&data).all(|piece| matches!(piece, Piece::Garbage { .. })));
    }
}
