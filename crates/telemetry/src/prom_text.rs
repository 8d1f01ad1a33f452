//! A small, strict parser of the Prometheus text exposition format (0.0.4).
//!
//! Handles what inference engines emit: `# HELP` / `# TYPE` lines, counters,
//! gauges, histograms and summaries as plain samples, labels with escaped
//! values (`\\`, `\"`, `\n`), `+Inf` / `-Inf` / `NaN` values (in any case,
//! with a sign: llama.cpp printed `-nan` until its first request) and
//! optional timestamps. Like Prometheus it rejects the whole scrape on the
//! first line that is not a sample (a half-parsed exposition could pair a
//! histogram's buckets wrongly); the caller counts the error and reports the
//! engine's metrics as missing this round.
//!
//! What is not read never fails a scrape: the value (and timestamp) of a
//! sample whose name the caller does not keep is not interpreted. A series
//! repeated with the same labels is kept once (the first), and the repeats
//! counted ([`Exposition::duplicates`]), instead of being summed twice. A
//! last line without its newline (as in files users commit) is read:
//! truncation is the transport's to detect (a body shorter than its
//! `Content-Length`, a chunked body without its last chunk), not the final
//! byte's. Pure code; never panics on any input.

use std::collections::{HashMap, HashSet};

use crate::error::TelemetryError;

/// The `# TYPE` of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    pub name: String,
    /// In the order of the line.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl PromSample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    samples: Vec<PromSample>,
    by_name: HashMap<String, Vec<usize>>,
    types: HashMap<String, MetricType>,
    /// Kept sample lines that repeated a series already read.
    duplicates: Vec<String>,
}

/// Lines shown in errors are cut to this many characters.
const SHOWN_LINE_CHARS: usize = 120;

fn shown(line: &str) -> String {
    if line.chars().count() <= SHOWN_LINE_CHARS {
        line.to_string()
    } else {
        let cut: String = line.chars().take(SHOWN_LINE_CHARS).collect();
        format!("{cut}…")
    }
}

impl Exposition {
    /// Parses every sample.
    pub fn parse(text: &str) -> Result<Self, TelemetryError> {
        Self::parse_filtered(text, &|_| true)
    }

    /// Parses and validates every line but keeps only samples whose name
    /// `keep` accepts (the agent reads a few dozen of the hundreds of series
    /// an engine exports).
    pub(crate) fn parse_filtered(
        text: &str,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Self, TelemetryError> {
        let mut exp = Exposition::default();
        let mut seen: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let line_no = i + 1;
            let parse_err = |message: &str| TelemetryError::Parse {
                line_no,
                message: message.to_string(),
                line: shown(line),
            };
            let trimmed = line.trim_start();
            if trimmed.is_empty() {
                continue;
            }
            if let Some(comment) = trimmed.strip_prefix('#') {
                exp.comment(comment).map_err(&parse_err)?;
                continue;
            }
            let sample = parse_sample(trimmed, keep).map_err(parse_err)?;
            if let Some(s) = sample {
                let mut labels = s.labels.clone();
                labels.sort();
                if !seen.insert((s.name.clone(), labels)) {
                    exp.duplicates.push(s.name);
                    continue;
                }
                let idx = exp.samples.len();
                exp.by_name.entry(s.name.clone()).or_default().push(idx);
                exp.samples.push(s);
            }
        }
        Ok(exp)
    }

    fn comment(&mut self, comment: &str) -> Result<(), &'static str> {
        let mut words = comment.split_whitespace();
        match words.next() {
            Some("TYPE") => {
                let name = words.next().ok_or("# TYPE without a metric name")?;
                if !is_metric_name(name) {
                    return Err("# TYPE with an invalid metric name");
                }
                let t = match words.next() {
                    Some("counter") => MetricType::Counter,
                    Some("gauge") => MetricType::Gauge,
                    Some("histogram") => MetricType::Histogram,
                    Some("summary") => MetricType::Summary,
                    Some("untyped") | Some("unknown") => MetricType::Untyped,
                    _ => return Err("# TYPE with an unknown type"),
                };
                self.types.insert(name.to_string(), t);
                Ok(())
            }
            Some("HELP") => match words.next() {
                Some(name) if is_metric_name(name) => Ok(()),
                _ => Err("# HELP without a valid metric name"),
            },
            // Any other comment (including OpenMetrics' `# EOF`).
            _ => Ok(()),
        }
    }

    /// Samples named exactly `name`.
    pub fn samples<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a PromSample> + 'a {
        self.by_name
            .get(name)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .filter_map(|i| self.samples.get(*i))
    }

    /// Whether any sample has this name.
    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The declared type of a family (by its `# TYPE` name).
    pub fn metric_type(&self, family: &str) -> Option<MetricType> {
        self.types.get(family).copied()
    }

    /// Names of the kept sample lines that repeated a series (same name and
    /// labels) already read; only the first of each series is kept.
    pub fn duplicates(&self) -> &[String] {
        &self.duplicates
    }

    /// Number of samples kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// Parses one sample line; `None` when its name is not kept.
fn parse_sample(
    line: &str,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Option<PromSample>, &'static str> {
    let name_end = line
        .char_indices()
        .find(|(_, c)| !is_name_char(*c))
        .map_or(line.len(), |(i, _)| i);
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("expected a metric name");
    }
    let kept = keep(name);
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, kept.then_some(&mut labels))?;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("expected whitespace before the value");
    }
    let mut fields = rest.split_whitespace();
    let value_text = fields.next().ok_or("missing value")?;
    let timestamp = fields.next();
    if fields.next().is_some() {
        return Err("unexpected text after the timestamp");
    }
    if !kept {
        // A value nobody reads never fails a scrape.
        return Ok(None);
    }
    let value = parse_value(value_text).ok_or("invalid value")?;
    if let Some(ts) = timestamp
        && ts.parse::<i64>().is_err()
    {
        return Err("invalid timestamp");
    }
    Ok(Some(PromSample {
        name: name.to_string(),
        labels,
        value,
    }))
}

/// Parses `name="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut s: &'a str,
    mut out: Option<&mut Vec<(String, String)>>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let name_end = s
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
            .map_or(s.len(), |(i, _)| i);
        let name = &s[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("expected a label name");
        }
        s = s[name_end..].trim_start();
        s = s
            .strip_prefix('=')
            .ok_or("expected `=` after a label name")?;
        s = s.trim_start();
        s = s.strip_prefix('"').ok_or("expected a quoted label value")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err("invalid escape in a label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if let Some(out) = out.as_deref_mut() {
            out.push((name.to_string(), value));
        }
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected `,` or `}` after a label");
        }
    }
}

/// A sample value: a decimal or exponent number, or NaN, Inf or Infinity in
/// any case with an optional sign (Go's `ParseFloat`, which Prometheus uses,
/// plus the `-nan` that C++ streams print). Hex floats, `_` separators and
/// other spellings are rejected.
fn parse_value(s: &str) -> Option<f64> {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let negative = s.starts_with('-');
    if unsigned.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    if unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity") {
        return Some(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if s.chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
    {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_parse_with_labels() {
        let text = "# HELP vllm:num_requests_running Number of requests.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 12.0\n\
            # TYPE vllm:prompt_tokens counter\n\
            vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 1.5e+06\n\
            vllm:ttft_bucket{le=\"0.1\"} 3\n\
            vllm:ttft_bucket{le=\"+Inf\"} 5 1700000000000\n";
        let exp = Exposition::parse(text).unwrap();
        assert_eq!(exp.len(), 4);
        let s = exp.samples("vllm:num_requests_running").next().unwrap();
        assert_eq!(s.value, 12.0);
        assert_eq!(s.label("model_name"), Some("m"));
        assert_eq!(
            exp.samples("vllm:prompt_tokens_total")
                .next()
                .unwrap()
                .value,
            1_500_000.0
        );
        assert_eq!(
            exp.metric_type("vllm:prompt_tokens"),
            Some(MetricType::Counter)
        );
        let inf = exp
            .samples("vllm:ttft_bucket")
            .find(|s| s.label("le") == Some("+Inf"))
            .unwrap();
        assert_eq!(inf.value, 5.0);
    }

    #[test]
    fn escaped_label_values_are_unescaped() {
        let text = "m{path=\"a\\\\b\",q=\"say \\\"hi\\\"\",nl=\"x\\ny\",} 1\n";
        let exp = Exposition::parse(text).unwrap();
        let s = exp.samples("m").next().unwrap();
        assert_eq!(s.label("path"), Some("a\\b"));
        assert_eq!(s.label("q"), Some("say \"hi\""));
        assert_eq!(s.label("nl"), Some("x\ny"));
    }

    #[test]
    fn special_values_parse() {
        let exp = Exposition::parse("a +Inf\nb -Inf\nc NaN\nd 0\n").unwrap();
        assert_eq!(exp.samples("a").next().unwrap().value, f64::INFINITY);
        assert_eq!(exp.samples("b").next().unwrap().value, f64::NEG_INFINITY);
        assert!(exp.samples("c").next().unwrap().value.is_nan());
    }

    #[test]
    fn a_last_line_without_its_newline_is_read() {
        // Files users commit often lack the final newline; truncation is the
        // transport's to detect.
        let exp = Exposition::parse("a 1\nvllm:num_requests_running 7").unwrap();
        assert_eq!(
            exp.samples("vllm:num_requests_running")
                .next()
                .unwrap()
                .value,
            7.0
        );
        // A line cut mid-name is still not a sample.
        let err = Exposition::parse("a 1\nvllm:num_requests_runn").unwrap_err();
        assert_eq!(err.kind(), "parse");
    }

    #[test]
    fn nan_and_infinity_parse_in_every_spelling_engines_print() {
        let exp = Exposition::parse(
            "a -nan\nb nan\nc NaN\nd +NaN\ne inf\nf -Inf\ng +Infinity\nh -infinity\n",
        )
        .unwrap();
        for n in ["a", "b", "c", "d"] {
            assert!(exp.samples(n).next().unwrap().value.is_nan(), "{n}");
        }
        for (n, v) in [
            ("e", f64::INFINITY),
            ("f", f64::NEG_INFINITY),
            ("g", f64::INFINITY),
            ("h", f64::NEG_INFINITY),
        ] {
            assert_eq!(exp.samples(n).next().unwrap().value, v, "{n}");
        }
    }

    #[test]
    fn a_value_that_is_not_read_never_fails_the_scrape() {
        let keep = |n: &str| n.starts_with("llamacpp:requests");
        let text = "llamacpp:n_busy_slots_per_decode -nan(ind)\n\
                    llamacpp:prompt_tokens_seconds 1.#QNAN 17x\n\
                    llamacpp:requests_processing 2\n";
        let exp = Exposition::parse_filtered(text, &keep).unwrap();
        assert_eq!(exp.len(), 1);
        // The same value in a series that is read is an error.
        let all = Exposition::parse(text).unwrap_err();
        assert_eq!(all.kind(), "parse");
    }

    #[test]
    fn a_repeated_series_is_kept_once_and_counted() {
        let text = "r{model_name=\"m\",engine=\"0\"} 162\n\
                    r{engine=\"0\",model_name=\"m\"} 162\n\
                    r{engine=\"1\",model_name=\"m\"} 5\n\
                    q 1\nq 1\n";
        let exp = Exposition::parse(text).unwrap();
        let values: Vec<f64> = exp.samples("r").map(|s| s.value).collect();
        assert_eq!(values, vec![162.0, 5.0]);
        assert_eq!(exp.samples("q").count(), 1);
        assert_eq!(exp.duplicates(), &["r".to_string(), "q".to_string()]);
    }

    #[test]
    fn garbage_lines_are_errors_naming_the_line() {
        for (text, line_no) in [
            ("a 1\n<html><body>Bad Gateway</body></html>\n", 2),
            ("a{x=\"1\" 2\n", 1),
            ("a{x=1} 2\n", 1),
            ("a 1 2 3\n", 1),
            ("a one\n", 1),
            ("a{x=\"unterminated} 1\n", 1),
            ("a{x=\"\\q\"} 1\n", 1),
            ("a\n", 1),
            ("# TYPE a sometype\n", 1),
            ("a 0x1p3\n", 1),
            ("a 1_000\n", 1),
        ] {
            let err = Exposition::parse(text).unwrap_err();
            assert_eq!(err.kind(), "parse", "{text:?}");
            match err {
                TelemetryError::Parse { line_no: n, .. } => assert_eq!(n, line_no, "{text:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn skipped_names_are_still_validated_but_not_kept() {
        let keep = |n: &str| n.starts_with("vllm:");
        let exp = Exposition::parse_filtered(
            "python_gc_objects_collected_total{generation=\"0\"} 1\nvllm:x 2\n",
            &keep,
        )
        .unwrap();
        assert_eq!(exp.len(), 1);
        assert!(Exposition::parse_filtered("python_gc{generation=0} 1\n", &keep).is_err());
    }

    #[test]
    fn empty_and_comment_only_bodies_are_empty() {
        assert!(Exposition::parse("").unwrap().is_empty());
        assert!(
            Exposition::parse("# just a comment\n\n# EOF\n")
                .unwrap()
                .is_empty()
        );
        assert!(Exposition::parse("a 1\r\n").unwrap().has("a"));
    }

    #[test]
    fn long_lines_are_cut_in_errors() {
        let line = format!("{} 1 2 3\n", "a".repeat(500));
        let msg = Exposition::parse(&line).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }
}
