//! Label and field selectors, in the string syntax of the `labelSelector` and
//! `fieldSelector` query parameters and as `metav1.LabelSelector` objects.

use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }

    fn render(&self) -> String {
        match self {
            Requirement::Equals(k, v) => format!("{k}={v}"),
            Requirement::NotEquals(k, v) => format!("{k}!={v}"),
            Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
            Requirement::Exists(k) => k.clone(),
            Requirement::DoesNotExist(k) => format!("!{k}"),
        }
    }
}

/// A parsed label selector: all requirements must hold (an empty selector matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses the string form: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub(crate) fn parse(input: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(input) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(Self { requirements })
    }

    /// Builds a selector from a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub(crate) fn from_object(obj: &Value) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if let Some(map) = obj.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("matchLabels[{k}]: must be a string"))?;
                requirements.push(Requirement::Equals(k.clone(), v.to_string()));
            }
        }
        if let Some(exprs) = obj.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or("matchExpressions[].key: Required value")?
                    .to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let op = e.get("operator").and_then(Value::as_str).unwrap_or("");
                requirements.push(match op {
                    "In" => Requirement::In(key, values),
                    "NotIn" => Requirement::NotIn(key, values),
                    "Exists" => Requirement::Exists(key),
                    "DoesNotExist" => Requirement::DoesNotExist(key),
                    other => {
                        return Err(format!(
                            "matchExpressions[].operator: Unsupported value: \"{other}\": supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
                        ));
                    }
                });
            }
        }
        Ok(Self { requirements })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub(crate) fn matches_object(&self, obj: &Value) -> bool {
        self.matches(&labels_of(obj))
    }

    /// The string form, as `/scale` reports it in `status.selector`.
    pub(crate) fn render(&self) -> String {
        self.requirements
            .iter()
            .map(Requirement::render)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&input[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(key: &str, rest: &str, part: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: \"{part}\": expected a set in parentheses for key \"{key}\""))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.iter().any(|v| !valid_value(v)) {
        return Err(format!(
            "unable to parse requirement: \"{part}\": invalid label value"
        ));
    }
    Ok(values)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: \"{part}\"");
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Requirement::DoesNotExist(key.to_string()))
        } else {
            Err(bad())
        };
    }
    if let Some((k, v)) = part.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        return if valid_key(k) && valid_value(v) {
            Ok(Requirement::NotEquals(k.to_string(), v.to_string()))
        } else {
            Err(bad())
        };
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        let (k, v) = (k.trim(), v.trim());
        return if valid_key(k) && valid_value(v) {
            Ok(Requirement::Equals(k.to_string(), v.to_string()))
        } else {
            Err(bad())
        };
    }
    let mut words = part.split_whitespace();
    let key = words.next().ok_or_else(bad)?;
    if !valid_key(key) {
        return Err(bad());
    }
    let after_key = part[part.find(key).map_or(0, |i| i + key.len())..].trim_start();
    if after_key.is_empty() {
        return Ok(Requirement::Exists(key.to_string()));
    }
    if let Some(rest) = after_key.strip_prefix("notin") {
        return Ok(Requirement::NotIn(
            key.to_string(),
            parse_set(key, rest, part)?,
        ));
    }
    if let Some(rest) = after_key.strip_prefix("in") {
        return Ok(Requirement::In(
            key.to_string(),
            parse_set(key, rest, part)?,
        ));
    }
    Err(bad())
}

/// The labels of an object as a map (missing = empty).
pub(crate) fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A parsed field selector: `metadata.name=x,spec.nodeName!=y`.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub(crate) fn parse(input: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in input.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, negate, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            let supported = matches!(
                field,
                "metadata.name"
                    | "metadata.namespace"
                    | "spec.nodeName"
                    | "status.phase"
                    | "involvedObject.name"
                    | "involvedObject.kind"
                    | "involvedObject.namespace"
                    | "regarding.name"
                    | "regarding.kind"
                    | "reason"
                    | "type"
            );
            if !supported {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), negate, value.trim().to_string()));
        }
        Ok(Self { terms })
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|(field, negate, want)| {
            let mut cur = obj;
            let mut found = true;
            for part in field.split('.') {
                match cur.get(part) {
                    Some(v) => cur = v,
                    None => {
                        found = false;
                        break;
                    }
                }
            }
            let actual = if found {
                cur.as_str().unwrap_or_default()
            } else {
                ""
            };
            (actual == want) != *negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn set_based_selector_parses_and_matches() {
        let s = LabelSelector::parse("app=web, tier in (a, b),env notin (prod),gpu,!legacy,x!=y")
            .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("gpu", ""),
            ("legacy", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("gpu", ""),
            ("x", "y")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("gpu", ""),
            ("env", "prod")
        ])));
    }

    #[test]
    fn malformed_selector_is_rejected() {
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn object_selector_renders_as_a_string() {
        let s = LabelSelector::from_object(&serde_json::json!({
            "matchLabels": {"app": "llm"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
        }))
        .unwrap();
        assert_eq!(s.render(), "app=llm,tier in (a,b)");
        assert_eq!(LabelSelector::parse(&s.render()).unwrap(), s);
    }
}
