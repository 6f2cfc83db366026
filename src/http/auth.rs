//! The bearer token on `/api/`.

use tiny_http::Request;

use super::reply::Reply;
use crate::config::Secret;

/// `None` when the request may go on; else the `401` to send.
pub(crate) fn check_token(expected: Option<&Secret>, request: &Request) -> Option<Reply> {
    let expected = expected?;
    let Some(header) = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Authorization"))
    else {
        return Some(unauthorized("missing header Authorization: Bearer <token>"));
    };
    let given = header
        .value
        .as_str()
        .trim()
        .split_once(' ')
        // The scheme name is case-insensitive (RFC 9110 section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(token) if constant_time_equal(token.as_bytes(), expected.expose().as_bytes()) => None,
        Some(_) => Some(unauthorized("wrong bearer token")),
        None => Some(unauthorized(
            "header Authorization must be `Bearer <token>` (the word Bearer, a space, then the token)",
        )),
    }
}

fn unauthorized(detail: &str) -> Reply {
    Reply::error(401, "unauthorized", detail).with_header("WWW-Authenticate", "Bearer")
}

/// Compares without stopping at the first difference, so the time taken
/// does not reveal how much of a guessed token is right.
fn constant_time_equal(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(index).copied().unwrap_or(0));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_equal;

    #[test]
    fn token_comparison() {
        assert!(constant_time_equal(b"secret", b"secret"));
        assert!(!constant_time_equal(b"secreT", b"secret"));
        assert!(!constant_time_equal(b"secret1", b"secret"));
        assert!(!constant_time_equal(b"", b"secret"));
    }
}
