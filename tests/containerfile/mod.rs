//! The top-level `Containerfile`, parsed as far as the tests need it:
//! stages (`FROM image AS name`) and their instructions, `ARG` defaults,
//! `LABEL` pairs, exec-form (`["…"]`) instructions and `COPY --from`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

/// One instruction: its keyword (upper case) and its text, line
/// continuations joined.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub keyword: String,
    pub text: String,
}

/// One build stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub from: String,
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
    /// `ARG` defaults in scope: the global ones (before the first `FROM`)
    /// and the stage's own.
    pub args: BTreeMap<String, String>,
}

/// `COPY [--from=STAGE] SRC DST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub from: Option<String>,
    pub src: String,
    pub dst: String,
}

pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Containerfile")
}

/// The stages of the repository's `Containerfile`.
pub fn stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(path()).expect("the top-level Containerfile exists");
    parse(&text)
}

/// The last stage: what the image is.
pub fn runtime() -> Stage {
    stages().pop().expect("the Containerfile has a stage")
}

pub fn parse(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.is_empty(),
        "the Containerfile ends inside a continued line"
    );

    let mut global_args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, text) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let text = text.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = text.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_string()),
                [_] => None,
                _ => panic!("FROM {text}: expected `FROM image [AS name]`"),
            };
            stages.push(Stage {
                from: words[0].to_string(),
                name,
                instructions: Vec::new(),
                args: global_args.clone(),
            });
            continue;
        }
        match stages.last_mut() {
            None if keyword == "ARG" => {
                let (k, v) = arg_default(&text);
                global_args.insert(k, v);
            }
            None => panic!("{keyword} before the first FROM"),
            Some(stage) => {
                if keyword == "ARG" {
                    let (k, v) = arg_default(&text);
                    // `ARG NAME` alone re-declares a global one.
                    let v = if v.is_empty() {
                        global_args.get(&k).cloned().unwrap_or_default()
                    } else {
                        v
                    };
                    stage.args.insert(k, v);
                }
                stage.instructions.push(Instruction { keyword, text });
            }
        }
    }
    stages
}

fn arg_default(text: &str) -> (String, String) {
    match text.split_once('=') {
        Some((k, v)) => (k.trim().to_string(), unquote(v.trim())),
        None => (text.trim().to_string(), String::new()),
    }
}

fn unquote(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

/// Splits on whitespace outside double quotes; quotes are kept.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in `{text}`");
    if !word.is_empty() {
        out.push(word);
    }
    out
}

impl Stage {
    /// The texts of every `keyword` instruction.
    pub fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.text.as_str())
            .collect()
    }

    /// The text of the one `keyword` instruction (it is an error to have
    /// none or several: the last one would silently win).
    pub fn one(&self, keyword: &str) -> &str {
        match self.all(keyword).as_slice() {
            [one] => one,
            other => panic!(
                "the stage FROM {} has {} {keyword} instructions, expected one",
                self.from,
                other.len()
            ),
        }
    }

    /// The one `keyword` instruction in exec form (a JSON array).
    pub fn exec_form(&self, keyword: &str) -> Vec<String> {
        let text = self.one(keyword);
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{keyword} {text}: not in exec form (a JSON array): {e}"))
    }

    /// `${NAME}` and `$NAME` replaced by the stage's `ARG` defaults.
    pub fn expand(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (k, v) in &self.args {
            out = out
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        out
    }

    /// Every `LABEL key="value"` pair, `ARG` defaults substituted.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for text in self.all("LABEL") {
            for word in words(text) {
                let (k, v) = word
                    .split_once('=')
                    .unwrap_or_else(|| panic!("LABEL {text}: `{word}` is not key=value"));
                labels.insert(unquote(k), self.expand(&unquote(v)));
            }
        }
        labels
    }

    pub fn copies(&self) -> Vec<Copy> {
        self.all("COPY")
            .into_iter()
            .map(|text| {
                let mut from = None;
                let mut rest = Vec::new();
                for w in words(text) {
                    if let Some(f) = w.strip_prefix("--from=") {
                        from = Some(f.to_string());
                    } else if w.starts_with("--") {
                        panic!("COPY {text}: option {w} is not understood by the tests");
                    } else {
                        rest.push(w);
                    }
                }
                match rest.as_slice() {
                    [src, dst] => Copy {
                        from,
                        src: src.clone(),
                        dst: dst.clone(),
                    },
                    _ => panic!("COPY {text}: expected one source and one destination"),
                }
            })
            .collect()
    }
}
