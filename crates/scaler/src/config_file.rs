//! Reading the configuration file safely: a bound on its size, a linear
//! check of its nesting before the YAML parser sees it, unknown fields
//! named with their closest known name, and bad values echoed only as a
//! bounded prefix.

use std::io::Read;
use std::path::Path;

use gpuscale_policy::WorkloadSpec;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Largest configuration file read, bytes. A file naming hundreds of
/// workloads with inline profiles is well under 100 KiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Deepest nesting of flow collections (`[`, `{`) accepted. The deepest
/// legitimate configuration nests about eight levels.
pub const MAX_CONFIG_DEPTH: usize = 64;

/// Longest part of a value echoed in an error, characters.
pub const MAX_ECHO_CHARS: usize = 120;

/// Reads at most [`MAX_CONFIG_BYTES`] of `path`; a longer file is refused
/// without reading the rest.
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
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

/// Parses YAML or JSON `text` into `T` after the nesting check; a field that
/// `T` ignores (a misspelling under `policy:`, whose type accepts unknown
/// fields so that the API server's objects keep parsing) is an error naming
/// its path and the closest known name, as are the unknown fields `T`
/// denies itself.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    check_nesting(text, MAX_CONFIG_DEPTH)?;
    let mut ignored: Vec<String> = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_yaml::Deserializer::from_str(text);
    let mut note = |path: serde_ignored::Path<'_>| {
        if ignored.is_empty() {
            ignored.push(path.to_string());
        }
    };
    let de = serde_ignored::Deserializer::new(de, &mut note);
    let result = T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
    let value = result.map_err(|e| {
        let message = with_suggestion(&e.to_string());
        // serde_yaml names the path of most errors itself; a custom error
        // (a bad duration) gets the tracked path.
        let path = track.path().to_string();
        let path = display_path(&path.split('.').filter(|s| *s != "?").collect::<Vec<_>>());
        let message = if path.is_empty() || message.starts_with(&path) {
            message
        } else {
            format!("{path}: {message}")
        };
        bound_message(&message)
    })?;
    if let Some(path) = ignored.first() {
        return Err(unknown_policy_field(path));
    }
    Ok(value)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" with
/// "; did you mean `a`?" added when one known name is close.
fn with_suggestion(message: &str) -> String {
    const MARK: &str = "unknown field `";
    let Some(start) = message.find(MARK) else {
        return message.to_string();
    };
    let after = &message[start + MARK.len()..];
    let Some(end) = after.find('`') else {
        return message.to_string();
    };
    let unknown = &after[..end];
    let rest = &after[end + 1..];
    // The expected names: every backquoted word after "expected".
    let Some(exp) = rest.find("expected") else {
        return message.to_string();
    };
    let names: Vec<&str> = rest[exp..]
        .split('`')
        .skip(1)
        .step_by(2)
        .take_while(|n| !n.contains(' '))
        .collect();
    match closest(unknown, names.iter().copied()) {
        Some(best) => {
            // Keep the location serde_yaml appends (" at line L column C").
            let (head, location) = match message.rfind(" at line ") {
                Some(i) => message.split_at(i),
                None => (message, ""),
            };
            format!("{head}; did you mean `{best}`?{location}")
        }
        None => message.to_string(),
    }
}

/// The known name closest to `unknown`, when it is close enough to be a
/// likely misspelling.
pub fn closest<'a>(unknown: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lower = unknown.to_ascii_lowercase();
    known
        .map(|k| {
            let score = strsim::jaro_winkler(&lower, &k.to_ascii_lowercase());
            (k, score)
        })
        .filter(|(_, s)| *s >= 0.8)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k)
}

/// The error for an ignored field at `path` (serde_ignored's dotted form,
/// e.g. `workloads.0.policy.maxReplica`).
fn unknown_policy_field(path: &str) -> String {
    // `?` stands for an `Option` or newtype layer, not a field.
    let segments: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
    let shown = display_path(&segments);
    let Some((unknown, parent)) = segments.split_last() else {
        return format!("unknown field `{}`", bounded(path));
    };
    let known = parent
        .iter()
        .position(|s| *s == "policy")
        .map(|p| known_fields(&parent[p + 1..]))
        .unwrap_or_default();
    let mut message = format!(
        "unknown field `{}` at {}",
        bounded(unknown),
        bounded(&shown)
    );
    if let Some(best) = closest(unknown, known.iter().map(String::as_str)) {
        message.push_str(&format!("; did you mean `{best}`?"));
    } else if !known.is_empty() {
        message.push_str(&format!("; known fields here: {}", known.join(", ")));
    }
    message
}

fn display_path(segments: &[&str]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

/// The field names the policy spec knows at `path` below `policy`, read
/// from its JSON schema.
fn known_fields(path: &[&str]) -> Vec<String> {
    let schema = schemars::schema_for!(WorkloadSpec).to_value();
    let mut nodes = expand(&schema, &schema);
    for segment in path {
        let is_index = segment.chars().all(|c| c.is_ascii_digit());
        nodes = nodes
            .into_iter()
            .filter_map(|n| {
                if is_index {
                    n.get("items")
                } else {
                    n.get("properties")
                        .and_then(|p| p.get(*segment))
                        .or_else(|| n.get("additionalProperties").filter(|a| a.is_object()))
                }
            })
            .flat_map(|n| expand(n, &schema))
            .collect();
    }
    let mut names: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.get("properties").and_then(Value::as_object))
        .flat_map(|p| p.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A schema node with its `$ref`, `allOf`, `anyOf` and `oneOf` followed.
fn expand<'a>(node: &'a Value, root: &'a Value) -> Vec<&'a Value> {
    let mut out = Vec::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if out.len() > 64 {
            break;
        }
        if let Some(r) = n.get("$ref").and_then(Value::as_str)
            && let Some(pointer) = r.strip_prefix('#')
            && let Some(target) = root.pointer(pointer)
        {
            stack.push(target);
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(list) = n.get(key).and_then(Value::as_array) {
                stack.extend(list.iter());
            }
        }
        out.push(n);
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
    fn closest_names_a_likely_misspelling_only() {
        let known = ["maxReplicas", "minReplicas", "target"];
        assert_eq!(
            closest("maxReplica", known.into_iter()),
            Some("maxReplicas")
        );
        assert_eq!(
            closest("MaxReplicas", known.into_iter()),
            Some("maxReplicas")
        );
        assert_eq!(closest("zzz", known.into_iter()), None);
    }

    #[test]
    fn known_fields_follow_the_policy_schema() {
        let top = known_fields(&[]);
        assert!(top.contains(&"maxReplicas".to_string()), "{top:?}");
        let slo = known_fields(&["slo"]);
        assert!(!slo.is_empty(), "{slo:?}");
        assert!(!slo.contains(&"maxReplicas".to_string()), "{slo:?}");
    }
}
