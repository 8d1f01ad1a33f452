//! Label and field selectors, in the string syntax of the `labelSelector` and
//! `fieldSelector` query parameters and as `metav1.LabelSelector` objects.

use std::collections::{BTreeMap, BTreeSet};

use gpuscale_core::selector::{self as core, Requirement};
use serde_json::Value;

/// A parsed label selector: all requirements must hold (an empty selector
/// matches everything). The parser is the scaler's own
/// ([`gpuscale_core::selector`]), which follows the API server's syntax and
/// validation; this adds the `metav1.LabelSelector` object form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(core::LabelSelector);

impl LabelSelector {
    /// Parses the string form: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub(crate) fn parse(input: &str) -> Result<Self, String> {
        core::LabelSelector::parse(input)
            .map(Self)
            .map_err(|e| format!("unable to parse requirement: {e}"))
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
                let values: BTreeSet<String> = e
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
        Ok(Self(core::LabelSelector::from_requirements(requirements)))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_everything()
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.matches(labels)
    }

    pub(crate) fn matches_object(&self, obj: &Value) -> bool {
        self.matches(&labels_of(obj))
    }

    /// The string form, as `/scale` reports it in `status.selector`.
    pub(crate) fn render(&self) -> String {
        self.0.to_string()
    }
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
