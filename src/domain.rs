//! Domain names as mailroom compares them: IDNA (ASCII) form, lower case.
//! Shared by the configuration (allowed senders) and the message side
//! (suppressions, list filter), neither of which should import the other
//! for it.

/// `domain` as compared: `Bücher.example` and `xn--bcher-kva.EXAMPLE` are
/// the same domain. One without an IDNA form is only lower-cased.
pub(crate) fn comparable_domain(domain: &str) -> String {
    if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::comparable_domain;

    #[test]
    fn domains_compare_in_their_idna_form() {
        for same in ["Bücher.example", "xn--bcher-kva.EXAMPLE", "BÜCHER.example"] {
            assert_eq!(comparable_domain(same), "xn--bcher-kva.example", "{same}");
        }
        assert_eq!(comparable_domain("Example.COM"), "example.com");
    }
}
