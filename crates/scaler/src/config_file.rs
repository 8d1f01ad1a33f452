//! Reading the configuration file safely: a bound on its size, a linear
//! check of its nesting before the YAML parser sees it, unknown fields
//! named with their closest known name, and bad values echoed only as a
//! bounded prefix.

use std::io::Read;
use std::path::Path;

pub use gpuscale_core::config_text::{
    MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_ECHO_CHARS, bound_message, bounded, bounded_text,
    check_nesting,
};
use gpuscale_policy::WorkloadSpec;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Reads at most `limit` bytes of `path` ([`gpuscale_core::config_text`]);
/// a longer file is refused without reading the rest.
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    bounded_text(bytes, limit)
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
