//! A subset of what the API server does with a CRD's structural schema:
//! defaulting, pruning of unknown fields and the OpenAPI value checks
//! (type, enum, ranges, lengths, required). CEL rules are not evaluated.

use serde_json::{Map, Value};

/// Defaults, prunes and validates a custom resource against its schema.
pub(crate) fn prune_and_validate(obj: &mut Value, schema: &Value) -> Result<(), String> {
    let Some(top) = obj.as_object_mut() else {
        return Err("body: must be an object".to_string());
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = preserves(schema);
    let keys: Vec<String> = top.keys().cloned().collect();
    let mut errors = Vec::new();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                if let Some(v) = top.get_mut(&k) {
                    walk(v, sub, &k, &mut errors);
                }
                if top.get(&k).is_some_and(Value::is_null) && !nullable(sub) {
                    top.remove(&k);
                }
            }
            None if preserve => {}
            None => {
                top.remove(&k);
            }
        }
    }
    if let Some(props) = props {
        for (k, sub) in props {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if !top.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                let mut d = d.clone();
                walk(&mut d, sub, k, &mut errors);
                top.insert(k.clone(), d);
            }
        }
    }
    check_required(top, schema, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("[{}]", errors.join(", ")))
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn check_required(obj: &Map<String, Value>, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !obj.contains_key(r) {
                let p = if path.is_empty() {
                    r.to_string()
                } else {
                    format!("{path}.{r}")
                };
                errors.push(format!("{p}: Required value"));
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(v: &mut Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if v.is_null() {
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(v);
        let ok = actual == t
            || (t == "number" && actual == "integer")
            || (int_or_string && matches!(actual, "integer" | "string"));
        if !ok {
            errors.push(format!(
                "{path}: Invalid value: \"{actual}\": {path} in body must be of type {t}: \"{actual}\""
            ));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(v)
    {
        let allowed: Vec<String> = options.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{path}: Unsupported value: {v}: supported values: {}",
            allowed.join(", ")
        ));
    }
    if let Some(n) = v.as_f64() {
        let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
        let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && (n < min || (excl_min && n <= min))
        {
            let op = if excl_min {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be {op} {min}"
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && (n > max || (excl_max && n >= max))
        {
            let op = if excl_max {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be {op} {max}"
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errors.push(format!(
                "{path}: Invalid value: \"{s}\": {path} in body should be at least {min} chars long"
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            errors.push(format!(
                "{path}: Too long: may not be more than {max} bytes"
            ));
        }
    }
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = preserves(schema);
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child_path = format!("{path}.{k}");
                let sub = props.and_then(|p| p.get(&k)).or(additional);
                match sub {
                    Some(sub) => {
                        if let Some(child) = m.get_mut(&k) {
                            walk(child, sub, &child_path, errors);
                        }
                        if m.get(&k).is_some_and(Value::is_null) && !nullable(sub) {
                            m.remove(&k);
                        }
                    }
                    None if preserve
                        || (props.is_none() && schema.get("additionalProperties").is_some()) => {}
                    None => {
                        m.remove(&k);
                    }
                }
            }
            if let Some(props) = props {
                for (k, sub) in props {
                    if !m.contains_key(k)
                        && let Some(d) = sub.get("default")
                    {
                        let mut d = d.clone();
                        walk(&mut d, sub, &format!("{path}.{k}"), errors);
                        m.insert(k.clone(), d);
                    }
                }
            }
            check_required(m, schema, path, errors);
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                errors.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should have at least {min} items"
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                errors.push(format!(
                    "{path}: Too many: {n}: must have at most {max} items"
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item, item_schema, &format!("{path}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_pruned_and_ranges_checked() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["max"], "properties": {
                "min": {"type": "integer", "minimum": 0, "default": 1},
                "max": {"type": "integer", "maximum": 10},
                "mode": {"type": "string", "enum": ["auto", "advisory"]}
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
        }});
        let mut obj = json!({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "x"},
            "spec": {"max": 3, "bogus": true}, "status": {"anything": 1}, "extra": 2});
        prune_and_validate(&mut obj, &schema).unwrap();
        assert_eq!(obj["spec"], json!({"max": 3, "min": 1}));
        assert_eq!(obj["status"], json!({"anything": 1}));
        assert!(obj.get("extra").is_none());

        let mut bad = json!({"spec": {"max": 11, "mode": "fast"}});
        let err = prune_and_validate(&mut bad, &schema).unwrap_err();
        assert!(err.contains("spec.max"), "{err}");
        assert!(err.contains("spec.mode: Unsupported value"), "{err}");
    }
}
