//! Kubernetes label selectors over workload labels.
//!
//! The syntax of `kubectl get -l` (`k8s.io/apimachinery/pkg/labels`):
//! requirements separated by commas, all of which must hold.
//!
//! | requirement | holds when |
//! |---|---|
//! | `key=value`, `key==value` | the label is present with that value |
//! | `key!=value` | the label is absent or has another value |
//! | `key in (a,b)` | the label is present with one of the values |
//! | `key notin (a,b)` | the label is absent or has none of the values |
//! | `key` | the label is present |
//! | `!key` | the label is absent |
//!
//! Keys are `[prefix/]name` (name: 1..=63 characters `[A-Za-z0-9_.-]`,
//! beginning and ending alphanumeric; prefix: a DNS subdomain); values are
//! empty or like a name. An empty selector selects everything. A malformed
//! selector is rejected with a message naming the problem and where it is.
//! Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest selector accepted, bytes.
pub const MAX_SELECTOR_BYTES: usize = 4096;

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// Why a selector does not parse: what is wrong and at which byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    pub selector: String,
    pub position: usize,
    pub problem: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "selector `{}`: {} (at byte {})",
            self.selector, self.problem, self.position
        )
    }
}

impl std::error::Error for SelectorError {}

impl LabelSelector {
    /// Selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses Kubernetes selector syntax (see the module docs).
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        if selector.len() > MAX_SELECTOR_BYTES {
            return Err(SelectorError {
                selector: selector.chars().take(64).collect::<String>() + "...",
                position: MAX_SELECTOR_BYTES,
                problem: format!(
                    "{} bytes is too long (at most {MAX_SELECTOR_BYTES})",
                    selector.len()
                ),
            });
        }
        Parser {
            input: selector,
            pos: 0,
        }
        .selector()
    }

    /// Whether every requirement holds for `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// A selector of these requirements (e.g. built from a
    /// `metav1.LabelSelector` object's `matchLabels` and `matchExpressions`).
    pub fn from_requirements(requirements: Vec<Requirement>) -> Self {
        Self { requirements }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// The string form, as the Kubernetes `/scale` subresource reports it in
/// `status.selector`; it parses back to the same selector.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    Comma,
    Open,
    Close,
    End,
}

impl Token<'_> {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("`{w}`"),
            Token::Not => "`!`".into(),
            Token::Equals => "`=`".into(),
            Token::DoubleEquals => "`==`".into(),
            Token::NotEquals => "`!=`".into(),
            Token::Comma => "`,`".into(),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
            Token::End => "the end".into(),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, position: usize, problem: impl Into<String>) -> SelectorError {
        SelectorError {
            selector: self.input.to_string(),
            position,
            problem: problem.into(),
        }
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.input[self.pos..].chars().next() {
            if c.is_whitespace() {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
    }

    /// The next token and where it starts, without consuming it.
    fn peek(&mut self) -> Result<(usize, Token<'a>), SelectorError> {
        self.skip_space();
        let start = self.pos;
        let rest = &self.input[start..];
        let Some(c) = rest.chars().next() else {
            return Ok((start, Token::End));
        };
        let token = match c {
            '!' if rest.starts_with("!=") => Token::NotEquals,
            '!' => Token::Not,
            '=' if rest.starts_with("==") => Token::DoubleEquals,
            '=' => Token::Equals,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            '>' | '<' => {
                return Err(self.error(
                    start,
                    format!(
                        "`{c}` is not supported here; use =, ==, !=, in, notin, `key` or `!key`"
                    ),
                ));
            }
            c if is_word_char(c) => {
                let len = rest
                    .char_indices()
                    .find(|(_, c)| !is_word_char(*c))
                    .map_or(rest.len(), |(i, _)| i);
                Token::Word(&rest[..len])
            }
            other => {
                return Err(self.error(
                    start,
                    format!(
                        "unexpected character `{other}`; keys and values are letters, digits, `-`, `_`, `.` (and `/` in keys)"
                    ),
                ));
            }
        };
        Ok((start, token))
    }

    fn next(&mut self) -> Result<(usize, Token<'a>), SelectorError> {
        let (start, token) = self.peek()?;
        self.pos = start
            + match &token {
                Token::Word(w) => w.len(),
                Token::NotEquals | Token::DoubleEquals => 2,
                Token::End => 0,
                _ => 1,
            };
        Ok((start, token))
    }

    fn selector(mut self) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if self.peek()?.1 == Token::End {
            return Ok(LabelSelector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            match self.next()? {
                (_, Token::End) => break,
                (_, Token::Comma) => {}
                (at, other) => {
                    return Err(self.error(
                        at,
                        format!(
                            "expected `,` or the end after a requirement, found {}",
                            other.describe()
                        ),
                    ));
                }
            }
        }
        Ok(LabelSelector { requirements })
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let (at, first) = self.next()?;
        let negated = first == Token::Not;
        let (key_at, key) = if negated { self.next()? } else { (at, first) };
        let key = match key {
            Token::Word(w) => {
                check_key(w).map_err(|p| self.error(key_at, p))?;
                w.to_string()
            }
            other => {
                return Err(self.error(
                    key_at,
                    format!("expected a label key, found {}", other.describe()),
                ));
            }
        };
        if negated {
            return Ok(Requirement::DoesNotExist(key));
        }
        let (op_at, op) = self.peek()?;
        match op {
            Token::End | Token::Comma => Ok(Requirement::Exists(key)),
            Token::Equals | Token::DoubleEquals | Token::NotEquals => {
                self.next()?;
                let value = self.value(&key)?;
                Ok(if op == Token::NotEquals {
                    Requirement::NotEquals(key, value)
                } else {
                    Requirement::Equals(key, value)
                })
            }
            Token::Word("in") | Token::Word("notin") => {
                self.next()?;
                let values = self.values(&key)?;
                Ok(if op == Token::Word("in") {
                    Requirement::In(key, values)
                } else {
                    Requirement::NotIn(key, values)
                })
            }
            other => Err(self.error(
                op_at,
                format!(
                    "expected an operator after `{key}` (=, ==, !=, in, notin) or `,`, found {}",
                    other.describe()
                ),
            )),
        }
    }

    /// A value after `=`/`==`/`!=`: possibly empty.
    fn value(&mut self, key: &str) -> Result<String, SelectorError> {
        let (at, token) = self.peek()?;
        match token {
            Token::Word(w) => {
                self.next()?;
                check_value(w).map_err(|p| self.error(at, p))?;
                Ok(w.to_string())
            }
            Token::End | Token::Comma => Ok(String::new()),
            other => Err(self.error(
                at,
                format!("expected a value for `{key}`, found {}", other.describe()),
            )),
        }
    }

    /// `( v1, v2, ... )` after `in`/`notin`.
    fn values(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        match self.next()? {
            (_, Token::Open) => {}
            (at, other) => {
                return Err(self.error(
                    at,
                    format!(
                        "expected `(` after `{key} in`/`notin`, found {}",
                        other.describe()
                    ),
                ));
            }
        }
        let mut values = BTreeSet::new();
        loop {
            let (at, token) = self.next()?;
            match token {
                Token::Word(w) => {
                    check_value(w).map_err(|p| self.error(at, p))?;
                    values.insert(w.to_string());
                }
                Token::Comma | Token::Close => {
                    // An empty value (`in (a,,b)`, `in ()`) is allowed, as in Kubernetes.
                    values.insert(String::new());
                    if token == Token::Close {
                        return Ok(values);
                    }
                    continue;
                }
                Token::End => {
                    return Err(self.error(at, format!("missing `)` after the values of `{key}`")));
                }
                other => {
                    return Err(self.error(
                        at,
                        format!("expected a value of `{key}`, found {}", other.describe()),
                    ));
                }
            }
            match self.next()? {
                (_, Token::Comma) => {}
                (_, Token::Close) => return Ok(values),
                (at, Token::End) => {
                    return Err(self.error(at, format!("missing `)` after the values of `{key}`")));
                }
                (at, other) => {
                    return Err(self.error(
                        at,
                        format!(
                            "expected `,` or `)` in the values of `{key}`, found {}",
                            other.describe()
                        ),
                    ));
                }
            }
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

/// A label name or value: 1..=63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok_ends = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if s.is_empty()
        || s.len() > 63
        || !ok_ends
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "`{s}` is not a valid label {what}: 1..=63 characters of letters, digits, `-`, `_`, `.`, beginning and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "`{key}` has an invalid prefix `{p}`: a DNS subdomain (lowercase letters, digits, `-`, `.`)"
            ));
        }
    }
    if name.contains('/') {
        return Err(format!("`{key}` is not a valid label key: at most one `/`"));
    }
    check_name("key", name)
}

fn check_value(value: &str) -> Result<(), String> {
    if value.contains('/') {
        return Err(format!(
            "`{value}` is not a valid label value: `/` is not allowed"
        ));
    }
    check_name("value", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_operator_matches_as_kubernetes_does() {
        let prod_chat = labels(&[("app", "chat"), ("tier", "prod")]);
        let dev_batch = labels(&[("app", "batch"), ("tier", "dev"), ("gpu", "h100")]);
        let cases: &[(&str, bool, bool)] = &[
            ("", true, true),
            ("app=chat", true, false),
            ("app==chat", true, false),
            ("app!=chat", false, true),
            ("owner!=x", true, true),
            ("tier in (prod, staging)", true, false),
            ("tier notin (prod)", false, true),
            ("owner notin (x)", true, true),
            ("owner in (x)", false, false),
            ("gpu", false, true),
            ("!gpu", true, false),
            ("app=chat,tier=prod", true, false),
            ("app=chat, tier=dev", false, false),
            ("  app  =  chat  ", true, false),
            ("example.com/team!=ml", true, true),
        ];
        for (s, a, b) in cases {
            let selector = sel(s);
            assert_eq!(selector.matches(&prod_chat), *a, "{s} on prod_chat");
            assert_eq!(selector.matches(&dev_batch), *b, "{s} on dev_batch");
        }
    }

    #[test]
    fn empty_values_are_allowed_where_kubernetes_allows_them() {
        assert!(sel("a=").matches(&labels(&[("a", "")])));
        assert!(sel("a in (x,)").matches(&labels(&[("a", "")])));
    }

    #[test]
    fn malformed_selectors_name_the_problem_and_the_position() {
        let cases: &[(&str, &str)] = &[
            ("a in (x", "missing `)` after the values of `a`"),
            ("a in x", "expected `(` after `a in`"),
            ("=b", "expected a label key, found `=`"),
            ("a=b=c", "expected `,` or the end"),
            ("a b", "expected an operator after `a`"),
            ("a>3", "`>` is not supported"),
            ("a=b,", "expected a label key, found the end"),
            ("-a=b", "not a valid label key"),
            ("a=@", "unexpected character `@`"),
            ("a=x/y", "`/` is not allowed"),
            ("Bad_Prefix/a=b", "invalid prefix"),
            ("a in (x y)", "expected `,` or `)`"),
            ("!", "expected a label key"),
            ("!a=b", "expected `,` or the end"),
        ];
        for (s, want) in cases {
            let e = LabelSelector::parse(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(e.contains(&format!("`{s}`")), "names the selector: {e}");
        }
        let long = "a=b,".repeat(2000);
        let e = LabelSelector::parse(&long)
            .expect_err("too long")
            .to_string();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn requirements_are_kept_in_order() {
        let s = sel("!x, y, z notin (b, a)");
        assert_eq!(
            s.requirements(),
            &[
                Requirement::DoesNotExist("x".into()),
                Requirement::Exists("y".into()),
                Requirement::NotIn("z".into(), ["a".to_string(), "b".to_string()].into()),
            ]
        );
    }

    #[test]
    fn the_string_form_parses_back_to_the_same_selector() {
        for text in [
            "app=llm,tier in (a,b)",
            "a!=b,c notin (x,y),d,!e",
            "example.com/role==gpu, zone in (b, a)",
            "",
        ] {
            let s = sel(text);
            let rendered = s.to_string();
            assert_eq!(sel(&rendered), s, "{text} -> {rendered}");
        }
        assert_eq!(sel("zone in (b, a),x==y").to_string(), "zone in (a,b),x=y");
    }
}
