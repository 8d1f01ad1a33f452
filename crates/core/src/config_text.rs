//! Configuration text, checked before a parser sees it: a bound on its
//! size, UTF-8, and a linear check of its nesting (a YAML parser's time
//! grows faster than linearly with flow nesting), plus bounded echoes of bad
//! values for error messages. Pure: the callers read the file (at most
//! [`MAX_CONFIG_BYTES`] + 1 bytes) and hand the bytes to [`bounded_text`].
//! The scaler's `--config`, `--auth-file` and profile files and the
//! agent's `--fake-config` all go through it.

/// Largest configuration file read, bytes. A file naming hundreds of
/// workloads with inline profiles is well under 100 KiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Deepest nesting of flow collections (`[`, `{`) accepted. The deepest
/// legitimate configuration nests about eight levels.
pub const MAX_CONFIG_DEPTH: usize = 64;

/// Longest part of a value echoed in an error, characters.
pub const MAX_ECHO_CHARS: usize = 120;

/// The text of `bytes`, read from a file with at most `limit` + 1 bytes
/// taken: more than `limit` is refused, as is text that is not UTF-8 (with
/// the offset of the first bad byte).
pub fn bounded_text(bytes: Vec<u8>, limit: u64) -> Result<String, String> {
    if bytes.len() as u64 > limit {
        return Err(format!(
            "the file is larger than {limit} bytes, the most a configuration file may be"
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Rejects text whose flow collections nest deeper than `max_depth`.
///
/// One linear pass counts `[`/`{` against `]`/`}` everywhere, quoted strings
/// and comments included, so nothing can hide nesting from it; a file with
/// more than `max_depth` unclosed brackets in strings or comments is refused
/// too, which no real configuration has. The YAML parser's time grows
/// faster than linearly with flow nesting; this check runs before it.
pub fn check_nesting(text: &str, max_depth: usize) -> Result<(), String> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    for c in text.chars() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
            }
            '[' | '{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(format!(
                        "nesting depth exceeds {max_depth} at line {line} column {column} \
                         (more than {max_depth} unclosed `[` or `{{`)"
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Shortens `value` to at most [`MAX_ECHO_CHARS`] characters, saying how
/// much was left out.
pub fn bounded(value: &str) -> String {
    bounded_to(value, MAX_ECHO_CHARS)
}

fn bounded_to(value: &str, max: usize) -> String {
    match value.char_indices().nth(max) {
        None => value.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &value[..cut], value.len()),
    }
}

/// Bounds a parser's message, which may quote a whole bad value: long runs
/// between quotes are shortened and the whole message is capped, keeping
/// its end (the line and column).
pub fn bound_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`', '\'']) {
        let quote = rest[open..].chars().next().expect("invariant: found above");
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) => {
                out.push_str(&bounded(&after[..close]));
                out.push(quote);
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&bounded(after));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    let cap = 4 * MAX_ECHO_CHARS;
    if out.chars().count() > cap {
        let tail: String = {
            let chars: Vec<char> = out.chars().collect();
            chars[chars.len() - MAX_ECHO_CHARS..].iter().collect()
        };
        let head: String = out.chars().take(cap - MAX_ECHO_CHARS).collect();
        out = format!("{head} … {tail}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_past_the_limit_is_refused_with_its_position() {
        let deep = "[".repeat(200 * 1024);
        let err = check_nesting(&deep, MAX_CONFIG_DEPTH).unwrap_err();
        assert!(err.contains("nesting depth exceeds 64"), "{err}");
        assert!(err.contains("line 1 column 65"), "{err}");
        // Balanced nesting within the limit passes, however long the file.
        let ok = "[1, {a: [2]}]\n".repeat(10_000);
        check_nesting(&ok, MAX_CONFIG_DEPTH).expect("shallow");
        // Closing brackets do not bank depth for later.
        let text = format!("{}{}", "]".repeat(100), "[".repeat(65));
        assert!(check_nesting(&text, MAX_CONFIG_DEPTH).is_err());
    }

    #[test]
    fn echoes_are_bounded() {
        let long = "x".repeat(10 * 1024 * 1024);
        let b = bounded(&long);
        assert!(b.len() < 200, "{}", b.len());
        assert!(b.contains("10485760 bytes in all"), "{b}");
        assert_eq!(bounded("short"), "short");
        let msg = format!("invalid type: string \"{long}\", expected u32 at line 3 column 7");
        let m = bound_message(&msg);
        assert!(m.len() < 1000, "{}", m.len());
        assert!(m.ends_with("at line 3 column 7"), "{m}");
    }

    #[test]
    fn text_past_the_limit_or_not_utf8_is_refused() {
        assert_eq!(
            bounded_text(b"tick: 2s".to_vec(), 8).as_deref(),
            Ok("tick: 2s")
        );
        let err = bounded_text(b"tick: 2s\n".to_vec(), 8).unwrap_err();
        assert!(err.contains("larger than 8 bytes"), "{err}");
        let err = bounded_text(b"ok\xff".to_vec(), 8).unwrap_err();
        assert!(
            err.contains("not UTF-8") && err.contains("offset 2"),
            "{err}"
        );
    }
}
