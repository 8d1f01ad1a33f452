//! Kubernetes name rules gpuscale checks in more than one place.

/// A DNS label (RFC 1123): 1..=63 lowercase letters, digits and '-', not
/// starting or ending with '-' (namespaces, most object names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A key in label-key form (a condition type, an annotation or label key):
/// an optional DNS subdomain prefix of at most 253 characters and '/', then
/// a name of 1..=63 letters, digits, '-', '_' and '.', starting and ending
/// with a letter or digit.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = s.rsplit_once('/').unwrap_or(("", s));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    let prefix_ok = prefix.len() <= 253
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("llama-3"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("Upper"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_label(&"a".repeat(63)));
    }

    #[test]
    fn label_keys() {
        assert!(is_label_key("gpuscale.dev/engine-warm"));
        assert!(is_label_key("Ready"));
        assert!(!is_label_key("gpuscale.dev/"));
        assert!(!is_label_key("gpuscale.dev/-warm"));
        assert!(!is_label_key("Gpuscale.dev/warm"));
        assert!(!is_label_key(&format!("x/{}", "a".repeat(64))));
    }
}
