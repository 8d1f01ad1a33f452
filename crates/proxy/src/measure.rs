//! Each request measured as the SLO defines it, from the bytes that pass
//! through, without holding a body.
//!
//! * **TTFT**: from the request's arrival at the proxy (so the time it
//!   queued counts) to the first server-sent event whose `data:` carries
//!   content (a token: OpenAI `choices[].delta.content`, `.text`,
//!   reasoning or tool-call deltas; llama.cpp's native `content`; TGI's
//!   `token`; SGLang's `text`; any `data:` that is not JSON), or, for a
//!   response that is not `text/event-stream`, to its first body byte.
//! * **TPOT**: `(end − first token) / (output tokens − 1)`, the end being
//!   the end of the response body, for streamed responses with at least two
//!   output tokens. Output tokens come from the response's own count
//!   (`usage.completion_tokens`, TGI's `details.generated_tokens`,
//!   llama.cpp's `tokens_predicted` or `timings.predicted_n`, SGLang's
//!   `meta_info.completion_tokens`; the last one seen wins), else the
//!   content events are counted. A
//!   non-streamed response has no observable decode time: no TPOT.
//! * **Queue time**: from arrival to admission, separately.
//!
//! Only requests answered 2xx and read to the end contribute latencies;
//! the rest are counted by how they ended.
//!
//! [`SseScanner`] splits a byte stream into events across arbitrary chunk
//! boundaries (lines end in LF or CRLF; a line longer than
//! [`MAX_EVENT_BYTES`] is not parsed, its event counts as content);
//! [`TailScanner`] keeps the last bytes of a non-streamed body to read its
//! token counts.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gpuscale_core::Histogram;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::time::Instant;

use crate::admission::Refusal;

/// Largest SSE event parsed; longer ones count as content unparsed.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Bytes of a non-streamed body kept to find its token counts.
const TAIL_BYTES: usize = 2048;

/// Buckets of the queue-time histogram: the TTFT layout.
pub fn queue_histogram() -> Histogram {
    Histogram::ttft()
}

/// What one event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventInfo {
    /// It carries at least one generated token.
    pub content: bool,
    /// The response's own count of output tokens so far, if it has one.
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    // llama.cpp's native /completion stream.
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tokens_predicted: Option<u64>,
    #[serde(default)]
    tokens_evaluated: Option<u64>,
    // llama.cpp's OpenAI-compatible streams: `timings` in the last chunk.
    #[serde(default)]
    timings: Option<LlamaTimings>,
    // TGI's native /generate_stream.
    #[serde(default)]
    token: Option<IgnoredAny>,
    #[serde(default)]
    details: Option<TgiDetails>,
    // SGLang's native /generate stream.
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    meta_info: Option<SglangMeta>,
}

#[derive(Deserialize, Default)]
struct Choice<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize, Default)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct LlamaTimings {
    #[serde(default)]
    predicted_n: Option<u64>,
    #[serde(default)]
    prompt_n: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TgiDetails {
    #[serde(default)]
    generated_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct SglangMeta {
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
}

fn non_empty(s: &Option<Cow<'_, str>>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

/// Classifies one event's data (its `data:` lines joined by LF).
pub fn classify(data: &[u8]) -> EventInfo {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" || trimmed.is_empty() {
        return EventInfo::default();
    }
    let Ok(c) = serde_json::from_slice::<Chunk<'_>>(trimmed) else {
        // Not an object we know: a data event of a token stream.
        return EventInfo {
            content: true,
            ..EventInfo::default()
        };
    };
    let choice_content = c.choices.iter().any(|ch| {
        non_empty(&ch.text)
            || ch.delta.as_ref().is_some_and(|d| {
                non_empty(&d.content)
                    || non_empty(&d.reasoning_content)
                    || non_empty(&d.reasoning)
                    || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
            })
    });
    let content =
        choice_content || non_empty(&c.content) || c.token.is_some() || non_empty(&c.text);
    let usage = c.usage.as_ref();
    let meta = c.meta_info.as_ref();
    EventInfo {
        content,
        completion_tokens: usage
            .and_then(|u| u.completion_tokens)
            .or(c.details.as_ref().and_then(|d| d.generated_tokens))
            .or(c.tokens_predicted)
            .or(meta.and_then(|m| m.completion_tokens))
            .or(c.timings.as_ref().and_then(|t| t.predicted_n)),
        prompt_tokens: usage
            .and_then(|u| u.prompt_tokens)
            .or(c.tokens_evaluated)
            .or(meta.and_then(|m| m.prompt_tokens))
            .or(c.timings.as_ref().and_then(|t| t.prompt_n)),
    }
}

/// Splits server-sent events out of a byte stream; see the module docs.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// The current line, when it spans chunks.
    line: Vec<u8>,
    /// The current event's data.
    data: Vec<u8>,
    has_data: bool,
    /// The current event is too long to parse.
    oversized: bool,
    /// When the current event's first data line arrived.
    started: Option<Instant>,
}

impl SseScanner {
    /// Feeds bytes that arrived at `at`; `on_event` gets each complete
    /// event's data and the time its first data line arrived.
    pub fn feed(&mut self, bytes: &[u8], at: Instant, on_event: &mut impl FnMut(&[u8], Instant)) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (part, after) = rest.split_at(i);
            rest = &after[1..];
            if self.line.is_empty() {
                self.line_done(part, at, on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(part);
                self.line_done(&line, at, on_event);
                line.clear();
                self.line = line;
            }
        }
        if !rest.is_empty() {
            if self.line.len() + rest.len() > MAX_EVENT_BYTES {
                self.oversized = true;
                self.line.clear();
                // Keep the start of the line: a `data:` prefix still counts.
                if self.started.is_none() {
                    self.started = Some(at);
                }
                self.has_data = true;
            } else {
                self.line.extend_from_slice(rest);
            }
        }
    }

    fn line_done(&mut self, line: &[u8], at: Instant, on_event: &mut impl FnMut(&[u8], Instant)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(at, on_event);
            return;
        }
        let Some(value) = line.strip_prefix(b"data:") else {
            // `event:`, `id:`, `retry:` and `:` comments carry no tokens.
            return;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if self.started.is_none() {
            self.started = Some(at);
        }
        if self.oversized || self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
            self.oversized = true;
            self.data.clear();
        } else {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
        self.has_data = true;
    }

    fn dispatch(&mut self, at: Instant, on_event: &mut impl FnMut(&[u8], Instant)) {
        if self.has_data {
            let started = self.started.unwrap_or(at);
            if self.oversized {
                // Too long to parse: a token-bearing event all the same.
                on_event(b"\x00oversized", started);
            } else {
                on_event(&self.data, started);
            }
        }
        self.data.clear();
        self.has_data = false;
        self.oversized = false;
        self.started = None;
    }

    /// The stream ended: an event without its closing blank line still counts.
    pub fn finish(&mut self, at: Instant, on_event: &mut impl FnMut(&[u8], Instant)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, at, on_event);
        }
        self.dispatch(at, on_event);
    }
}

/// The last bytes of a body, to read the token counts at its end.
#[derive(Debug, Default)]
pub struct TailScanner {
    tail: Vec<u8>,
}

impl TailScanner {
    pub fn feed(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
            return;
        }
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * TAIL_BYTES {
            let cut = self.tail.len() - TAIL_BYTES;
            self.tail.drain(..cut);
        }
    }

    /// `(completion tokens, prompt tokens)` as the body's end states them.
    pub fn counts(&self) -> (Option<u64>, Option<u64>) {
        let completion = last_number(&self.tail, b"\"completion_tokens\"")
            .or_else(|| last_number(&self.tail, b"\"generated_tokens\""))
            .or_else(|| last_number(&self.tail, b"\"tokens_predicted\""));
        let prompt = last_number(&self.tail, b"\"prompt_tokens\"")
            .or_else(|| last_number(&self.tail, b"\"tokens_evaluated\""));
        (completion, prompt)
    }
}

/// The number after the last `key:` in `hay`.
fn last_number(hay: &[u8], key: &[u8]) -> Option<u64> {
    let pos = hay.windows(key.len()).rposition(|w| w == key)?;
    let rest = hay[pos + key.len()..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Read to the end.
    Complete,
    /// The upstream connection failed mid-body.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
}

/// One request in flight, measured; see the module docs.
#[derive(Debug)]
pub struct Exchange {
    arrived: Instant,
    queued_for: Duration,
    success: bool,
    kind: BodyKind,
    tokens: Tokens,
}

/// What the events of one response said so far.
#[derive(Debug, Default)]
struct Tokens {
    first: Option<Instant>,
    content_events: u64,
    completion: Option<u64>,
    prompt: Option<u64>,
}

impl Tokens {
    fn on_event(&mut self, info: EventInfo, at: Instant) {
        if info.content {
            self.first.get_or_insert(at);
            self.content_events += 1;
        }
        if info.completion_tokens.is_some() {
            self.completion = info.completion_tokens;
        }
        if info.prompt_tokens.is_some() {
            self.prompt = info.prompt_tokens;
        }
    }
}

#[derive(Debug)]
enum BodyKind {
    Sse(SseScanner),
    Plain(TailScanner),
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub end: End,
    /// 2xx from the upstream.
    pub success: bool,
    pub queued_for: Duration,
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
    pub output_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
}

impl Exchange {
    /// A response to a request that arrived at `arrived` and waited
    /// `queued_for`; `streaming` for `text/event-stream`.
    pub fn new(arrived: Instant, queued_for: Duration, success: bool, streaming: bool) -> Self {
        Self {
            arrived,
            queued_for,
            success,
            kind: if streaming {
                BodyKind::Sse(SseScanner::default())
            } else {
                BodyKind::Plain(TailScanner::default())
            },
            tokens: Tokens::default(),
        }
    }

    /// Body bytes that arrived at `at`.
    pub fn on_data(&mut self, bytes: &[u8], at: Instant) {
        if bytes.is_empty() {
            return;
        }
        let tokens = &mut self.tokens;
        match &mut self.kind {
            BodyKind::Sse(sse) => {
                sse.feed(bytes, at, &mut |data, t| tokens.on_event(classify(data), t));
            }
            BodyKind::Plain(tail) => {
                tokens.first.get_or_insert(at);
                tail.feed(bytes);
            }
        }
    }

    /// The body ended at `at`, as `end` says.
    pub fn finish(mut self, at: Instant, end: End) -> Measured {
        let streaming = matches!(self.kind, BodyKind::Sse(_));
        let tokens = &mut self.tokens;
        match &mut self.kind {
            BodyKind::Sse(sse) => {
                sse.finish(at, &mut |data, t| tokens.on_event(classify(data), t));
            }
            BodyKind::Plain(tail) => {
                (tokens.completion, tokens.prompt) = tail.counts();
            }
        }
        let measured = self.success && end == End::Complete;
        let output_tokens = if streaming {
            tokens.completion.or(Some(tokens.content_events))
        } else {
            tokens.completion
        };
        let ttft = tokens.first.filter(|_| measured).map(|t| t - self.arrived);
        let tpot = match (tokens.first, output_tokens) {
            (Some(first), Some(n)) if measured && streaming && n >= 2 => {
                Some((at - first).div_f64((n - 1) as f64))
            }
            _ => None,
        };
        Measured {
            end,
            success: self.success,
            queued_for: self.queued_for,
            ttft,
            tpot,
            output_tokens,
            prompt_tokens: tokens.prompt,
        }
    }
}

/// Everything the proxy counted since it started (cumulative).
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// Requests that arrived to be admitted (admitted or not).
    pub arrived: u64,
    /// Requests admitted and answered 2xx to the end.
    pub finished: u64,
    /// Admitted requests the upstream failed (unreachable, non-2xx, broken body).
    pub failed: u64,
    /// Admitted requests whose client went away before the end.
    pub client_gone: u64,
    pub refused_queue_full: u64,
    pub refused_timeout: u64,
    pub refused_draining: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub queue: Histogram,
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            arrived: 0,
            finished: 0,
            failed: 0,
            client_gone: 0,
            refused_queue_full: 0,
            refused_timeout: 0,
            refused_draining: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            ttft: Histogram::ttft(),
            tpot: Histogram::tpot(),
            queue: queue_histogram(),
        }
    }
}

/// The proxy's request statistics; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct RequestStats {
    totals: Arc<Mutex<Totals>>,
}

impl RequestStats {
    fn lock(&self) -> MutexGuard<'_, Totals> {
        // Only counters are changed under the lock.
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn arrived(&self) {
        self.lock().arrived += 1;
    }

    pub fn refused(&self, r: &Refusal) {
        let mut t = self.lock();
        match r {
            Refusal::QueueFull { .. } => t.refused_queue_full += 1,
            Refusal::Timeout { .. } => t.refused_timeout += 1,
            Refusal::Draining => t.refused_draining += 1,
        }
    }

    /// An admitted request that got no response (upstream unreachable).
    pub fn upstream_failed(&self, queued_for: Duration) {
        let mut t = self.lock();
        t.failed += 1;
        t.queue.observe(queued_for.as_secs_f64());
    }

    pub fn record(&self, m: &Measured) {
        let mut t = self.lock();
        t.queue.observe(m.queued_for.as_secs_f64());
        match (m.end, m.success) {
            (End::Complete, true) => t.finished += 1,
            (End::ClientGone, _) => t.client_gone += 1,
            _ => t.failed += 1,
        }
        if let Some(ttft) = m.ttft {
            t.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(tpot) = m.tpot {
            t.tpot.observe(tpot.as_secs_f64());
        }
        if m.success {
            t.generation_tokens += m.output_tokens.unwrap_or(0);
            t.prompt_tokens += m.prompt_tokens.unwrap_or(0);
        }
    }

    /// A copy of the totals.
    pub fn totals(&self) -> Totals {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&str]) -> Vec<String> {
        let mut s = SseScanner::default();
        let mut out = Vec::new();
        let t = Instant::now();
        for c in chunks {
            s.feed(c.as_bytes(), t, &mut |d, _| {
                out.push(String::from_utf8_lossy(d).into_owned())
            });
        }
        s.finish(t, &mut |d, _| {
            out.push(String::from_utf8_lossy(d).into_owned())
        });
        out
    }

    #[test]
    fn events_are_split_across_any_chunk_boundary() {
        let stream = "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(whole, ["{\"a\":1}", "two\nlines", "[DONE]"]);
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(events(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(events(&refs), whole, "one byte at a time");
    }

    #[test]
    fn an_unterminated_last_event_counts() {
        assert_eq!(events(&["data: a\n\ndata: b"]), ["a", "b"]);
    }

    #[test]
    fn content_is_recognised_in_every_stream_dialect() {
        let yes = [
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"index":0,"text":"Hi"}]}"#,
            r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"content":"Hi","stop":false}"#,
            r#"{"token":{"id":1,"text":"Hi","special":false}}"#,
            r#"{"text":"Hi","meta_info":{"completion_tokens":1}}"#,
            "plain text token",
        ];
        for y in yes {
            assert!(classify(y.as_bytes()).content, "{y}");
        }
        let no = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":16}}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ];
        for n in no {
            assert!(!classify(n.as_bytes()).content, "{n}");
        }
        let usage =
            classify(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":16}}"#);
        assert_eq!(
            (usage.completion_tokens, usage.prompt_tokens),
            (Some(16), Some(3))
        );
        let tgi = classify(br#"{"token":{"text":"."},"details":{"generated_tokens":7}}"#);
        assert_eq!(tgi.completion_tokens, Some(7));
        let llama = classify(
            br#"{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":{"prompt_n":29,"predicted_n":5}}"#,
        );
        assert_eq!(
            (llama.content, llama.completion_tokens, llama.prompt_tokens),
            (false, Some(5), Some(29))
        );
    }

    #[test]
    fn the_tail_of_a_plain_body_gives_its_token_counts() {
        let mut t = TailScanner::default();
        let padding = "x".repeat(10_000);
        t.feed(format!("{{\"choices\":[{{\"text\":\"{padding}\"}}],").as_bytes());
        t.feed(b"\"usage\":{\"prompt_tokens\": 12,\"completion_tokens\":");
        t.feed(b"34,\"total_tokens\":46},\"timings\":{}}");
        assert_eq!(t.counts(), (Some(34), Some(12)));
    }

    #[tokio::test(start_paused = true)]
    async fn ttft_and_tpot_of_a_stream() {
        let t0 = Instant::now();
        let mut x = Exchange::new(t0, Duration::from_millis(40), true, true);
        let ms = |n| t0 + Duration::from_millis(n);
        x.on_data(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            ms(50),
        );
        for i in 0..5u64 {
            x.on_data(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"t\"}}]}\n\n",
                ms(100 + 20 * i),
            );
        }
        let m = x.finish(ms(190), End::Complete);
        assert_eq!(m.ttft, Some(Duration::from_millis(100)));
        // Counted chunks: (190 - 100) / (5 - 1).
        assert_eq!(m.tpot, Some(Duration::from_micros(22_500)));
        assert_eq!(m.output_tokens, Some(5));

        let mut x = Exchange::new(t0, Duration::ZERO, true, true);
        x.on_data(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"ab\"}}]}\n\n",
            ms(10),
        );
        x.on_data(
            b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":11}}\n\ndata: [DONE]\n\n",
            ms(110),
        );
        let m = x.finish(ms(110), End::Complete);
        assert_eq!(m.tpot, Some(Duration::from_millis(10)), "usage wins");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_contribute_no_latency() {
        let t0 = Instant::now();
        let mut x = Exchange::new(t0, Duration::ZERO, true, true);
        x.on_data(b"data: {\"content\":\"a\"}\n\n", t0);
        let m = x.finish(t0, End::ClientGone);
        assert_eq!((m.ttft, m.tpot), (None, None));
        let mut x = Exchange::new(t0, Duration::ZERO, false, false);
        x.on_data(b"{\"error\":\"bad\"}", t0);
        assert_eq!(x.finish(t0, End::Complete).ttft, None);
    }
}
