//! Reading an OpenRouter SSE stream as it passes through, without holding it: chat completion chunks, legacy
//! text completion chunks (`choices[].text`), or the Responses API's typed events (`event:` + `data:`,
//! `response.created` … `response.completed`).
//!
//! [`SseScanner`] is fed the upstream's byte chunks in order. For each chunk it says what the client gets —
//! usually the very same chunk (so the relay forwards the original buffer without copying it back out of wasm),
//! sometimes a rewrite — and it keeps a [`StreamSummary`] of what billing needs: the usage chunk, the serving
//! model, the finish reason, when the first token arrived, and how the stream ended.
//!
//! Rewrites happen only when the client must not see what the upstream sent:
//! - OpenRouter always sends a usage-only chunk (`choices: []`); without `stream_options.include_usage` a client
//!   may index `choices[0]`, so that event is dropped.
//! - An event whose data is not JSON would make the SDKs raise a parse error; it becomes an OpenAI error event
//!   and the stream ends (the answer is no longer trustworthy).
//! - A stream that ends without its end (`[DONE]`; for Responses `response.completed` or `response.incomplete`)
//!   or an error event gets an error event, so a truncated answer is never mistaken for a complete one. For
//!   Responses that is the event its SDKs expect: `response.failed` (the created response, failed, with the
//!   gateway's error) once a response was created, else an `error` event.
//!
//! Events that straddle chunks are held back until complete, so dropping one never tears another.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde_json::Value;

use crate::answer::{responses_finish_reason, OutputItem, ResponseObject};
use crate::cache::assemble::Assembly;
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::usage::Usage;

/// An incomplete event larger than this is treated as a broken stream rather than buffered forever.
const MAX_PENDING_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSummary {
    pub usage: Option<Usage>,
    pub served_model: Option<String>,
    pub finish_reason: Option<String>,
    /// Characters generated so far, over every choice: content, reasoning, and tool calls' names and
    /// arguments — for estimating the usage of a stream that ended without a usage report.
    pub completion_chars: usize,
    /// The chunks' `id`: OpenRouter's generation id.
    pub generation_id: Option<String>,
    /// The generated content, kept only when content capture is on.
    pub completion_text: Option<String>,
    pub first_token_seen: bool,
    pub done: bool,
    /// The upstream's own mid-stream error message, passed on to the client as sent.
    pub upstream_error: Option<String>,
    /// Set when the gateway ended the stream itself.
    pub gateway_stop: Option<GatewayStop>,
}

/// Why the gateway, not the upstream, ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayStop {
    /// The upstream sent data that is not a JSON event.
    Malformed,
    /// The upstream closed or broke before `[DONE]`.
    CutOff,
}

impl GatewayStop {
    fn error(self) -> ApiError {
        match self {
            GatewayStop::Malformed => ApiError::upstream_malformed(),
            GatewayStop::CutOff => ApiError::upstream_cut_off(),
        }
    }
}

impl StreamSummary {
    /// The stream reached its natural end (its end event or the upstream's own error event).
    pub fn ended_by_upstream(&self) -> bool {
        self.done || self.upstream_error.is_some()
    }
}

/// What the client receives for one upstream chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Forward the chunk exactly as received.
    Same,
    /// Forward these bytes instead (possibly empty: nothing to send yet).
    Rewritten(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub output: Output,
    /// This chunk carried the first generated token (time-to-first-token is measured here).
    pub first_token: bool,
    /// The gateway ended the stream: send `output`, then close the client stream and cancel the upstream.
    pub stop: bool,
}

#[derive(Debug)]
pub struct SseScanner {
    endpoint: Endpoint,
    include_usage: bool,
    pending: Vec<u8>,
    stopped: bool,
    summary: StreamSummary,
    responses: ResponsesState,
    /// The answer put back together, while the response cache may store it (chat completions only).
    assembly: Option<Assembly>,
}

/// What a Responses stream's failure ending needs: the created response and the last sequence number.
#[derive(Debug, Default)]
struct ResponsesState {
    /// The `response` object of the latest `response.created` / `response.in_progress`, as sent.
    snapshot: Option<String>,
    last_sequence: Option<u64>,
    called_a_tool: bool,
}

enum Verdict {
    Keep,
    Drop,
    Malformed,
}

impl SseScanner {
    /// `capture_text`: keep the generated content (for analytics with content capture on).
    pub fn new(endpoint: Endpoint, include_usage: bool, capture_text: bool) -> Self {
        let summary = StreamSummary { completion_text: capture_text.then(String::new), ..StreamSummary::default() };
        let responses = ResponsesState::default();
        Self { endpoint, include_usage, pending: Vec::new(), stopped: false, summary, responses, assembly: None }
    }

    /// Also puts a chat completion stream back together, for the response cache (see [`Self::take_answer`]).
    pub fn assembling(mut self) -> Self {
        if self.endpoint == Endpoint::ChatCompletions {
            self.assembly = Some(Assembly::new());
        }
        self
    }

    /// The whole answer as a `chat.completion`, if it was assembled and the stream reached its `[DONE]` with no
    /// error (the gateway's or the upstream's).
    pub fn take_answer(&mut self) -> Option<Value> {
        let summary = &self.summary;
        let whole = summary.done && summary.upstream_error.is_none() && summary.gateway_stop.is_none();
        self.assembly.take().filter(|_| whole).and_then(Assembly::finish)
    }

    pub fn summary(&self) -> &StreamSummary {
        &self.summary
    }

    pub fn into_summary(self) -> StreamSummary {
        self.summary
    }

    pub fn push(&mut self, chunk: &[u8]) -> Step {
        if self.stopped {
            return Step { output: Output::Rewritten(Vec::new()), first_token: false, stop: true };
        }
        let had_pending = !self.pending.is_empty();
        self.pending.extend_from_slice(chunk);
        let first_token_before = self.summary.first_token_seen;

        let mut out = Vec::new();
        let mut changed = had_pending;
        let mut consumed = 0;
        let mut failed = false;
        while let Some(len) = next_event_len(&self.pending[consumed..]) {
            let event = &self.pending[consumed..consumed + len];
            consumed += len;
            if let Some(assembly) = self.assembly.as_mut() {
                if let Some(data) = event_data(event).filter(|d| d.as_ref() != b"[DONE]") {
                    assembly.push(&data);
                }
            }
            let verdict = match self.endpoint {
                Endpoint::Responses => classify_response_event(event, &mut self.summary, &mut self.responses),
                _ => classify(event, self.include_usage, &mut self.summary),
            };
            match verdict {
                Verdict::Keep => out.extend_from_slice(event),
                Verdict::Drop => changed = true,
                Verdict::Malformed => {
                    failed = true;
                    break;
                }
            }
        }
        let first_token = !first_token_before && self.summary.first_token_seen;

        if failed {
            out.extend_from_slice(self.fail(GatewayStop::Malformed).as_bytes());
            return Step { output: Output::Rewritten(out), first_token, stop: true };
        }
        self.pending.drain(..consumed);
        if self.pending.len() > MAX_PENDING_BYTES {
            out.extend_from_slice(self.fail(GatewayStop::Malformed).as_bytes());
            return Step { output: Output::Rewritten(out), first_token, stop: true };
        }
        let output = if changed || !self.pending.is_empty() { Output::Rewritten(out) } else { Output::Same };
        Step { output, first_token, stop: false }
    }

    /// The upstream body ended (or broke: `interrupted`). Returns bytes still owed to the client, if any.
    pub fn finish(&mut self, interrupted: bool) -> Option<Vec<u8>> {
        if self.stopped {
            return None;
        }
        // A trailing event without its blank line is still complete data when the upstream closed cleanly.
        let mut out = Vec::new();
        if !interrupted && !self.pending.is_empty() {
            let mut tail = std::mem::take(&mut self.pending);
            tail.extend_from_slice(b"\n\n");
            out = match self.push(&tail).output {
                Output::Same => tail,
                Output::Rewritten(bytes) => bytes,
            };
            if self.stopped {
                return Some(out);
            }
        }
        if !self.summary.ended_by_upstream() {
            out.extend_from_slice(self.fail(GatewayStop::CutOff).as_bytes());
        }
        (!out.is_empty()).then_some(out)
    }

    /// Ends the stream on the gateway's side: the client's last event is this error.
    fn fail(&mut self, stop: GatewayStop) -> String {
        self.stopped = true;
        self.pending.clear();
        self.summary.gateway_stop = Some(stop);
        match self.endpoint {
            Endpoint::Responses => self.responses.failure_event(&stop.error()),
            _ => stop.error().sse_event(),
        }
    }
}

/// Length of the first complete event in `buf` (up to and including its blank line), if there is one.
fn next_event_len(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Decides what happens to one complete event and records what it says.
fn classify(event: &[u8], include_usage: bool, summary: &mut StreamSummary) -> Verdict {
    let Some(data) = event_data(event) else { return Verdict::Keep }; // comments and keep-alives
    if data.as_ref() == b"[DONE]" {
        summary.done = true;
        return Verdict::Keep;
    }
    if record_content_chunk(&data, summary) {
        return Verdict::Keep;
    }
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(&data) else {
        return Verdict::Malformed;
    };
    if summary.generation_id.is_none() {
        summary.generation_id = chunk.get("id").and_then(Value::as_str).map(str::to_owned);
    }
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        let message = error.get("message").and_then(Value::as_str).unwrap_or("upstream error");
        summary.upstream_error = Some(message.to_owned());
        summary.finish_reason = Some("error".to_owned());
        return Verdict::Keep;
    }
    if let Some(model) = chunk.get("model").and_then(Value::as_str) {
        if summary.served_model.as_deref() != Some(model) {
            summary.served_model = Some(model.to_owned());
        }
    }
    if let Some(usage) = chunk.get("usage").and_then(Usage::from_json) {
        summary.usage = Some(usage);
    }
    let choices = chunk.get("choices").and_then(Value::as_array);
    match choices {
        Some(choices) if !choices.is_empty() => {
            for choice in choices {
                record_choice(choice, summary);
            }
            Verdict::Keep
        }
        // The usage-only chunk (empty or absent `choices`): for clients that asked for it only.
        _ if chunk.contains_key("usage") && !include_usage => Verdict::Drop,
        _ => Verdict::Keep,
    }
}

impl ResponsesState {
    /// `response.failed` with the created response (status `failed`, the gateway's error), or OpenAI's `error`
    /// event when no response was created yet.
    fn failure_event(&self, error: &ApiError) -> String {
        let sequence_number = self.last_sequence.map_or(0, |n| n + 1);
        let code = error.code.unwrap_or(error.kind);
        let snapshot = self.snapshot.as_deref().and_then(|s| serde_json::from_str::<Value>(s).ok());
        match snapshot {
            Some(Value::Object(mut response)) => {
                response.insert("status".into(), "failed".into());
                response.insert("error".into(), serde_json::json!({"code": code, "message": error.message.as_ref()}));
                let data = serde_json::json!({"type": "response.failed", "sequence_number": sequence_number,
                    "response": response});
                format!("event: response.failed\ndata: {data}\n\n")
            }
            _ => {
                let data = serde_json::json!({"type": "error", "code": code, "message": error.message.as_ref(),
                    "param": null, "sequence_number": sequence_number});
                format!("event: error\ndata: {data}\n\n")
            }
        }
    }
}

/// One Responses event: deltas are counted as generated text, lifecycle events give the response's id, model,
/// usage and end. Every event reaches the client as sent.
fn classify_response_event(event: &[u8], summary: &mut StreamSummary, state: &mut ResponsesState) -> Verdict {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow)]
        delta: Option<Cow<'a, str>>,
        sequence_number: Option<u64>,
        #[serde(borrow)]
        response: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        item: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        message: Option<Cow<'a, str>>,
        /// OpenRouter documents `error` events both flat (`message`) and nested (`error.message`).
        error: Option<Value>,
    }
    let Some(data) = event_data(event) else { return Verdict::Keep };
    if data.as_ref() == b"[DONE]" {
        summary.done = true;
        return Verdict::Keep;
    }
    let Ok(parsed) = serde_json::from_slice::<Event>(&data) else {
        // An event of a shape billing does not read (a field of another type) is still the upstream's JSON.
        let json = serde_json::from_slice::<serde_json::Map<String, Value>>(&data).is_ok();
        return if json { Verdict::Keep } else { Verdict::Malformed };
    };
    let kind = parsed.kind.as_deref().map(Cow::Borrowed).or_else(|| event_name(event)).unwrap_or_default();
    if let Some(n) = parsed.sequence_number {
        state.last_sequence = Some(state.last_sequence.map_or(n, |last| last.max(n)));
    }
    let delta = parsed.delta.as_deref();
    match kind.as_ref() {
        "response.output_text.delta" | "response.refusal.delta" => record_delta(summary, None, delta, None, None),
        "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => {
            record_delta(summary, None, None, delta, None)
        }
        "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta" => {
            record_delta(summary, None, None, None, Some(chars(delta)))
        }
        "response.output_item.added" => {
            let item = parsed.item.and_then(|raw| serde_json::from_str::<OutputItem>(raw.get()).ok());
            if item.is_some_and(|i| i.kind.as_deref() == Some("function_call")) {
                state.called_a_tool = true;
            }
        }
        "error" | "response.error" => {
            let nested = parsed.error.as_ref().and_then(|e| e.get("message")).and_then(Value::as_str);
            summary.upstream_error = Some(parsed.message.as_deref().or(nested).unwrap_or("upstream error").to_owned());
            summary.finish_reason = Some("error".to_owned());
        }
        "response.created"
        | "response.in_progress"
        | "response.completed"
        | "response.incomplete"
        | "response.failed" => {
            // A lifecycle event whose response billing cannot read still ends the stream as it says.
            let response =
                parsed.response.and_then(|raw| Some((raw, serde_json::from_str::<ResponseObject>(raw.get()).ok()?)));
            if let Some((_, response)) = &response {
                if summary.generation_id.is_none() {
                    summary.generation_id = response.id.as_deref().map(str::to_owned);
                }
                if let Some(model) = &response.model {
                    summary.served_model = Some(model.to_string());
                }
            }
            match kind.as_ref() {
                "response.created" | "response.in_progress" => {
                    if let Some((raw, _)) = response {
                        state.snapshot = Some(raw.get().to_owned());
                    }
                }
                "response.failed" => {
                    let error = response.as_ref().and_then(|(_, r)| r.error.as_ref());
                    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
                    summary.upstream_error = Some(message.unwrap_or("The response failed upstream.").to_owned());
                    summary.finish_reason = Some("error".to_owned());
                }
                _ => {
                    if let Some((_, response)) = &response {
                        summary.usage = response.usage.as_ref().and_then(Usage::from_json);
                        summary.finish_reason = responses_finish_reason(
                            response.status.as_deref(),
                            response.incomplete_details.as_ref(),
                            state.called_a_tool,
                        );
                    }
                    summary.done = true;
                }
            }
        }
        _ => {}
    }
    Verdict::Keep
}

/// The event's `event:` name, when its data carries no `type`.
fn event_name(event: &[u8]) -> Option<Cow<'static, str>> {
    event.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let name = line.strip_prefix(b"event:")?;
        let name = std::str::from_utf8(name).ok()?.trim();
        Some(Cow::Owned(name.to_owned()))
    })
}

/// The common event — a content delta — read without building a JSON tree: only the fields the summary needs are
/// decoded (borrowed where possible), the rest is skipped. Returns false for anything else (usage, errors, odd
/// shapes), which the full reading handles.
fn record_content_chunk(data: &[u8], summary: &mut StreamSummary) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        model: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        choices: Vec<Choice<'a>>,
        usage: Option<IgnoredAny>,
        error: Option<IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Choice<'a> {
        #[serde(borrow)]
        delta: Option<Delta<'a>>,
        /// Legacy text completions.
        #[serde(borrow)]
        text: Option<Cow<'a, str>>,
        #[serde(borrow)]
        finish_reason: Option<Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Delta<'a> {
        #[serde(borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(borrow)]
        reasoning: Option<Cow<'a, str>>,
        #[serde(borrow)]
        tool_calls: Option<Vec<ToolCall<'a>>>,
    }
    #[derive(serde::Deserialize)]
    struct ToolCall<'a> {
        #[serde(borrow)]
        function: Option<Function<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Function<'a> {
        #[serde(borrow)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow)]
        arguments: Option<Cow<'a, str>>,
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else { return false };
    if chunk.choices.is_empty() || chunk.usage.is_some() || chunk.error.is_some() {
        return false;
    }
    if summary.generation_id.is_none() {
        summary.generation_id = chunk.id.map(Cow::into_owned);
    }
    if let Some(model) = chunk.model {
        if summary.served_model.as_deref() != Some(model.as_ref()) {
            summary.served_model = Some(model.into_owned());
        }
    }
    for choice in chunk.choices {
        let delta = choice.delta.as_ref();
        let tool_calls = delta.and_then(|d| d.tool_calls.as_ref());
        let tool_chars = tool_calls.map_or(0, |calls| {
            calls
                .iter()
                .filter_map(|c| c.function.as_ref())
                .map(|f| chars(f.name.as_deref()) + chars(f.arguments.as_deref()))
                .sum()
        });
        record_delta(
            summary,
            choice.finish_reason.as_deref(),
            delta.and_then(|d| d.content.as_deref()).or(choice.text.as_deref()),
            delta.and_then(|d| d.reasoning.as_deref()),
            tool_calls.map(|_| tool_chars),
        );
    }
    true
}

fn chars(text: Option<&str>) -> usize {
    text.map_or(0, |t| t.chars().count())
}

fn record_choice(choice: &Value, summary: &mut StreamSummary) {
    let delta = choice.get("delta");
    let text = |field: &str| delta.and_then(|d| d.get(field)).and_then(Value::as_str);
    let tool_calls = delta.and_then(|d| d.get("tool_calls")).and_then(Value::as_array);
    let tool_chars = tool_calls.map(|calls| {
        calls
            .iter()
            .map(|c| {
                let field = |name: &str| c.get("function").and_then(|f| f.get(name)).and_then(Value::as_str);
                chars(field("name")) + chars(field("arguments"))
            })
            .sum()
    });
    record_delta(
        summary,
        choice.get("finish_reason").and_then(Value::as_str),
        text("content").or_else(|| choice.get("text").and_then(Value::as_str)),
        text("reasoning"),
        tool_chars,
    );
}

/// What one choice of a chunk tells the summary, however the chunk was read. `tool_call_chars` is `Some` when
/// the delta carries tool calls (their names' and arguments' characters).
fn record_delta(
    summary: &mut StreamSummary,
    finish_reason: Option<&str>,
    content: Option<&str>,
    reasoning: Option<&str>,
    tool_call_chars: Option<usize>,
) {
    if let Some(reason) = finish_reason {
        summary.finish_reason = Some(reason.to_owned());
    }
    if let (Some(text), Some(content)) = (summary.completion_text.as_mut(), content) {
        text.push_str(content);
    }
    let generated = chars(content) + chars(reasoning) + tool_call_chars.unwrap_or(0);
    summary.completion_chars += generated;
    if generated > 0 || tool_call_chars.is_some() {
        summary.first_token_seen = true;
    }
}

/// The event's `data` (multiple `data:` lines joined by `\n`), or `None` for an event without data. A single
/// `data:` line — the usual case — is borrowed, not copied.
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(rest) = line.strip_prefix(b"data:") else { continue };
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        match data.as_mut() {
            Some(d) => {
                let d = d.to_mut();
                d.push(b'\n');
                d.extend_from_slice(rest);
            }
            None => data = Some(Cow::Borrowed(rest)),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn content(text: &str) -> String {
        let chunk = json!({"id": "gen-1", "object": "chat.completion.chunk", "model": "m/served",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
        format!("data: {chunk}\n\n")
    }

    fn finish(reason: &str) -> String {
        let chunk = json!({"id": "gen-1", "model": "m/served",
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]});
        format!("data: {chunk}\n\n")
    }

    fn usage_chunk() -> String {
        let chunk = json!({"id": "gen-1", "model": "m/served", "choices": [], "usage": {
            "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "cost": 0.0042,
            "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 0}}});
        format!("data: {chunk}\n\n")
    }

    const DONE: &str = "data: [DONE]\n\n";

    /// Feeds the chunks and returns what the client would receive, plus the summary.
    fn run(include_usage: bool, chunks: &[&[u8]]) -> (Vec<u8>, StreamSummary) {
        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, include_usage, false);
        let mut client = Vec::new();
        for chunk in chunks {
            let step = scanner.push(chunk);
            match step.output {
                Output::Same => client.extend_from_slice(chunk),
                Output::Rewritten(bytes) => client.extend_from_slice(&bytes),
            }
            if step.stop {
                return (client, scanner.into_summary());
            }
        }
        if let Some(tail) = scanner.finish(false) {
            client.extend_from_slice(&tail);
        }
        (client, scanner.into_summary())
    }

    fn full_stream() -> String {
        [
            ": OPENROUTER PROCESSING\n\n".to_owned(),
            content("Hel"),
            content("lo"),
            finish("stop"),
            usage_chunk(),
            DONE.to_owned(),
        ]
        .concat()
    }

    #[test]
    fn whole_events_pass_unchanged_and_usage_is_recorded() {
        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, true, false);
        for piece in [content("Hi"), finish("stop"), usage_chunk(), DONE.to_owned()] {
            assert_eq!(scanner.push(piece.as_bytes()).output, Output::Same);
        }
        assert_eq!(scanner.finish(false), None);
        let s = scanner.into_summary();
        let usage = s.usage.expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens), (12, 3, 4));
        assert_eq!(usage.cost, Some(0.0042));
        assert_eq!(s.served_model.as_deref(), Some("m/served"));
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert!(s.done && s.first_token_seen);
        assert_eq!(s.completion_chars, 2);
    }

    #[test]
    fn a_whole_stream_is_put_back_together_for_the_cache_and_a_cut_one_is_not() {
        let stream = full_stream();
        let feed = |bytes: &[u8], finish: bool| {
            let mut scanner = SseScanner::new(Endpoint::ChatCompletions, false, false).assembling();
            for piece in bytes.chunks(7) {
                scanner.push(piece);
            }
            if finish {
                scanner.finish(false);
            }
            scanner.take_answer()
        };
        let answer = feed(stream.as_bytes(), true).expect("assembled");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["usage"]["total_tokens"], 15);
        let cut = stream.replace(DONE, "");
        assert_eq!(feed(cut.as_bytes(), true), None, "no [DONE]: cut off");
        let failed =
            [content("Hel"), "data: {\"error\":{\"message\":\"boom\"}}\n\n".to_owned(), DONE.to_owned()].concat();
        assert_eq!(feed(failed.as_bytes(), true), None, "the upstream's error");
        let mut plain = SseScanner::new(Endpoint::ChatCompletions, false, false);
        plain.push(stream.as_bytes());
        assert_eq!(plain.take_answer(), None, "not assembled unless asked");
    }

    #[test]
    fn usage_only_chunk_is_dropped_unless_the_client_asked_for_it() {
        let stream = full_stream();
        let (without, summary) = run(false, &[stream.as_bytes()]);
        let expected = stream.replace(&usage_chunk(), "");
        assert_eq!(String::from_utf8_lossy(&without), expected);
        assert!(summary.usage.is_some(), "usage is still seen by the gateway");
        let (with, _) = run(true, &[stream.as_bytes()]);
        assert_eq!(with, stream.as_bytes());
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_client_bytes_and_summary() {
        let stream = full_stream();
        let bytes = stream.as_bytes();
        let (reference, reference_summary) = run(false, &[bytes]);
        for split in 1..bytes.len() {
            let (a, b) = bytes.split_at(split);
            let (client, summary) = run(false, &[a, b]);
            assert_eq!(client, reference, "split at {split}");
            assert_eq!(summary, reference_summary, "split at {split}");
        }
        let one_byte_chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(false, &one_byte_chunks).0, reference);
    }

    #[test]
    fn crlf_line_endings_and_multiline_data_are_understood() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\r\ndata: \"model\":\"m\"}\r\n\r\ndata: [DONE]\r\n\r\n";
        let (client, summary) = run(false, &[stream.as_bytes()]);
        assert_eq!(client, stream.as_bytes());
        assert!(summary.done);
        assert_eq!(summary.served_model.as_deref(), Some("m"));
    }

    #[test]
    fn first_token_is_reported_once_on_the_chunk_that_carries_it() {
        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, false, false);
        let role_only = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert!(!scanner.push(b": OPENROUTER PROCESSING\n\n").first_token);
        assert!(!scanner.push(role_only.as_bytes()).first_token);
        assert!(scanner.push(content("a").as_bytes()).first_token);
        assert!(!scanner.push(content("b").as_bytes()).first_token);
    }

    #[test]
    fn content_is_kept_only_when_capturing() {
        let mut capturing = SseScanner::new(Endpoint::ChatCompletions, false, true);
        let mut plain = SseScanner::new(Endpoint::ChatCompletions, false, false);
        for piece in [content("Hel"), content("lo"), finish("stop")] {
            capturing.push(piece.as_bytes());
            plain.push(piece.as_bytes());
        }
        assert_eq!(capturing.summary().completion_text.as_deref(), Some("Hello"));
        assert_eq!(plain.summary().completion_text, None);
    }

    #[test]
    fn tool_call_deltas_count_as_first_token() {
        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, false, false);
        let tool =
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\"}}]}}]}\n\n";
        assert!(scanner.push(tool.as_bytes()).first_token);
    }

    #[test]
    fn the_output_estimate_counts_reasoning_tool_calls_and_every_choice() {
        let chunks = [
            r#"{"id":"gen-9","choices":[{"index":0,"delta":{"content":null,"reasoning":"think"}}]}"#,
            r#"{"id":"gen-9","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"id":"gen-9","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
            r#"{"id":"gen-9","choices":[{"index":0,"delta":{"content":"ab"}},{"index":1,"delta":{"content":"cde"}}]}"#,
        ];
        let stream: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
        let (_, summary) = run(false, &[stream.as_bytes()]);
        assert_eq!(summary.completion_chars, 5 + "get_weather".len() + r#"{"city":"#.len() + 2 + 3);
        assert_eq!(summary.generation_id.as_deref(), Some("gen-9"));
        assert!(summary.first_token_seen);
        // The same read loosely (an odd field elsewhere in the chunk forces the JSON-tree path).
        let odd: String = chunks.iter().map(|c| format!("data: {}\n\n", c.replacen('{', "{\"model\":5,", 1))).collect();
        let (_, loose) = run(false, &[odd.as_bytes()]);
        assert_eq!(loose.completion_chars, summary.completion_chars);
        assert_eq!(loose.generation_id.as_deref(), Some("gen-9"));
    }

    #[test]
    fn malformed_data_becomes_an_error_event_and_stops_the_stream() {
        let stream = format!("{}data: {{not json\n\n{}", content("ok"), content("never"));
        let (client, summary) = run(false, &[stream.as_bytes()]);
        let text = String::from_utf8_lossy(&client);
        assert!(text.starts_with(&content("ok")));
        assert!(!text.contains("never"));
        let last = text.trim_end().rsplit("\n\n").next().unwrap_or_default();
        let payload: Value = serde_json::from_str(last.trim_start_matches("data: ")).expect("error event is JSON");
        assert_eq!(payload["error"]["code"], "upstream_malformed_response");
        assert_eq!(summary.gateway_stop, Some(GatewayStop::Malformed));
    }

    #[test]
    fn upstream_error_event_passes_through_and_is_recorded() {
        let err = "data: {\"id\":\"gen-1\",\"error\":{\"code\":\"server_error\",\"message\":\"Provider disconnected\"},\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}\n\n";
        let stream = format!("{}{err}", content("partial"));
        let (client, summary) = run(false, &[stream.as_bytes()]);
        assert_eq!(client, stream.as_bytes(), "no gateway error is appended after the upstream's own");
        assert_eq!(summary.upstream_error.as_deref(), Some("Provider disconnected"));
        assert_eq!(summary.finish_reason.as_deref(), Some("error"));
        assert!(summary.ended_by_upstream());
    }

    #[test]
    fn a_stream_cut_off_before_done_ends_with_an_error_event() {
        let (client, summary) = run(false, &[content("half").as_bytes()]);
        let text = String::from_utf8_lossy(&client);
        assert!(text.starts_with(&content("half")));
        assert!(text.contains("\"error\""));
        assert_eq!(summary.gateway_stop, Some(GatewayStop::CutOff));

        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, false, false);
        let partial = content("torn");
        let step = scanner.push(&partial.as_bytes()[..10]);
        assert_eq!(step.output, Output::Rewritten(Vec::new()));
        let tail = scanner.finish(true).expect("error event owed");
        assert!(String::from_utf8_lossy(&tail).contains("closed the stream"));
    }

    #[test]
    fn a_final_event_without_its_blank_line_is_still_delivered() {
        let stream = format!("{}{}data: [DONE]", content("a"), finish("stop"));
        let (client, summary) = run(true, &[stream.as_bytes()]);
        assert!(summary.done);
        assert!(String::from_utf8_lossy(&client).ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn endless_event_without_newlines_is_bounded() {
        let mut scanner = SseScanner::new(Endpoint::ChatCompletions, false, false);
        let blob = vec![b'a'; 64 * 1024];
        let mut stopped = false;
        for _ in 0..40 {
            if scanner.push(&blob).stop {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert!(scanner.push(b"data: [DONE]\n\n").stop, "nothing more is forwarded after a stop");
    }

    /// Feeds whole events of any endpoint; returns the client's bytes and the summary.
    fn run_at(endpoint: Endpoint, events: &[String], interrupted: bool) -> (String, StreamSummary) {
        let mut scanner = SseScanner::new(endpoint, false, true);
        let mut client = Vec::new();
        for event in events {
            let step = scanner.push(event.as_bytes());
            match step.output {
                Output::Same => client.extend_from_slice(event.as_bytes()),
                Output::Rewritten(bytes) => client.extend_from_slice(&bytes),
            }
            if step.stop {
                return (String::from_utf8_lossy(&client).into_owned(), scanner.into_summary());
            }
        }
        if let Some(tail) = scanner.finish(interrupted) {
            client.extend_from_slice(&tail);
        }
        (String::from_utf8_lossy(&client).into_owned(), scanner.into_summary())
    }

    fn typed(kind: &str, sequence_number: u64, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence_number);
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn response_object(status: &str) -> Value {
        json!({"id": "gen-r", "object": "response", "model": "m/served", "status": status, "output": [],
            "usage": null, "instructions": "be brief"})
    }

    fn responses_stream() -> Vec<String> {
        let mut completed = response_object("completed");
        completed["usage"] = json!({"input_tokens": 9, "output_tokens": 2, "total_tokens": 11, "cost": 0.5,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
        vec![
            ": OPENROUTER PROCESSING\n\n".to_owned(),
            typed("response.created", 0, json!({"response": response_object("in_progress")})),
            typed("response.in_progress", 1, json!({"response": response_object("in_progress")})),
            typed(
                "response.output_item.added",
                2,
                json!({"output_index": 0, "item": {"type": "message", "id": "m1",
                "role": "assistant", "content": []}}),
            ),
            typed(
                "response.output_text.delta",
                3,
                json!({"item_id": "m1", "output_index": 0, "content_index": 0,
                "delta": "Hé"}),
            ),
            typed(
                "response.output_text.delta",
                4,
                json!({"item_id": "m1", "output_index": 0, "content_index": 0,
                "delta": "llo"}),
            ),
            typed("response.output_text.done", 5, json!({"text": "Héllo"})),
            typed("response.completed", 6, json!({"response": completed})),
        ]
    }

    #[test]
    fn responses_events_pass_as_sent_and_usage_comes_from_response_completed() {
        let events = responses_stream();
        let (client, s) = run_at(Endpoint::Responses, &events, false);
        assert_eq!(client, events.concat(), "nothing is edited");
        assert!(s.done && s.first_token_seen && s.gateway_stop.is_none());
        let usage = s.usage.expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.cost), (9, 2, Some(0.5)));
        assert_eq!((s.completion_chars, s.completion_text.as_deref()), (5, Some("Héllo")));
        assert_eq!((s.generation_id.as_deref(), s.served_model.as_deref()), (Some("gen-r"), Some("m/served")));
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        // OpenRouter may add [DONE] after the end: passed on, harmless.
        let mut with_done = events.clone();
        with_done.push(DONE.to_owned());
        assert!(run_at(Endpoint::Responses, &with_done, false).1.done);
    }

    #[test]
    fn a_cut_responses_stream_ends_with_response_failed_or_an_error_event() {
        let events = responses_stream();
        // Cut after the first delta: the created response comes back failed, numbered after the last event.
        let (client, s) = run_at(Endpoint::Responses, &events[..5], true);
        assert_eq!(s.gateway_stop, Some(GatewayStop::CutOff));
        assert!(!s.done && s.usage.is_none());
        let tail = client.strip_prefix(&events[..5].concat()).expect("the events as sent, then the ending").to_owned();
        assert!(tail.starts_with("event: response.failed\ndata: "), "{tail}");
        let data: Value =
            serde_json::from_str(tail.trim_end().trim_start_matches("event: response.failed\ndata: ")).expect("json");
        assert_eq!((data["type"].as_str(), data["sequence_number"].as_u64()), (Some("response.failed"), Some(4)));
        assert_eq!(
            (data["response"]["status"].as_str(), data["response"]["id"].as_str()),
            (Some("failed"), Some("gen-r"))
        );
        assert_eq!(data["response"]["error"]["code"], "upstream_cut_off");
        assert_eq!(data["response"]["instructions"], "be brief", "the created response, as sent");
        // Cut before any event: OpenAI's error event.
        let (client, s) = run_at(Endpoint::Responses, &events[..1], true);
        assert_eq!(s.gateway_stop, Some(GatewayStop::CutOff));
        assert!(client.contains("event: error\ndata: {"), "{client}");
        assert!(client.contains(r#""type":"error""#) && client.contains(r#""sequence_number":0"#), "{client}");
        // A clean close without response.completed is a cut too.
        assert_eq!(run_at(Endpoint::Responses, &events[..7], false).1.gateway_stop, Some(GatewayStop::CutOff));
        // Garbage ends the stream the same way.
        let mut garbage = events[..4].to_vec();
        garbage.push("data: {not json\n\n".to_owned());
        let (client, s) = run_at(Endpoint::Responses, &garbage, false);
        assert_eq!(s.gateway_stop, Some(GatewayStop::Malformed));
        assert!(client.ends_with("\n\n") && client.contains("event: response.failed"));
        assert!(!client.contains("not json"));
    }

    #[test]
    fn upstream_failures_and_incomplete_responses_are_natural_ends() {
        let events = responses_stream();
        let mut failed = response_object("failed");
        failed["error"] = json!({"code": "server_error", "message": "Provider disconnected"});
        let mut stream = events[..5].to_vec();
        stream.push(typed("response.failed", 5, json!({"response": failed})));
        let (client, s) = run_at(Endpoint::Responses, &stream, false);
        assert_eq!(client, stream.concat());
        assert_eq!((s.upstream_error.as_deref(), s.gateway_stop), (Some("Provider disconnected"), None));
        assert_eq!(s.finish_reason.as_deref(), Some("error"));
        let mut stream = events[..5].to_vec();
        stream.push(typed("error", 5, json!({"code": "rate_limit", "message": "slow down", "param": null})));
        assert_eq!(run_at(Endpoint::Responses, &stream, false).1.upstream_error.as_deref(), Some("slow down"));
        // OpenRouter's nested form, on a data-only event.
        let mut stream = events[..5].to_vec();
        stream.push(format!("data: {}\n\n", json!({"type": "error", "error": {"code": 502, "message": "nested"}})));
        assert_eq!(run_at(Endpoint::Responses, &stream, false).1.upstream_error.as_deref(), Some("nested"));
        let mut incomplete = response_object("incomplete");
        incomplete["incomplete_details"] = json!({"reason": "max_output_tokens"});
        incomplete["usage"] = json!({"input_tokens": 9, "output_tokens": 1});
        let mut stream = events[..5].to_vec();
        stream.push(typed("response.incomplete", 5, json!({"response": incomplete})));
        let s = run_at(Endpoint::Responses, &stream, false).1;
        assert!(s.done);
        assert_eq!((s.finish_reason.as_deref(), s.usage.map(|u| u.completion_tokens)), (Some("length"), Some(1)));
    }

    #[test]
    fn responses_events_of_unread_shapes_pass_and_still_end_the_stream() {
        let events = responses_stream();
        let mut stream = events[..5].to_vec();
        // A field of a type billing does not expect, then a completed event whose response is not an object.
        stream.push(typed("response.output_text.delta", 5, json!({"delta": {"structured": true}})));
        stream.push(typed("response.completed", 6, json!({"response": "opaque"})));
        let (client, s) = run_at(Endpoint::Responses, &stream, false);
        assert_eq!(client, stream.concat());
        assert!(s.done && s.gateway_stop.is_none() && s.usage.is_none(), "billed by estimate, not cut");
        assert_eq!(s.completion_chars, 2, "what was read before");
    }

    #[test]
    fn responses_tool_calls_and_reasoning_count_as_generated() {
        let mut completed = response_object("completed");
        completed["usage"] = json!({"input_tokens": 1, "output_tokens": 1});
        let stream = vec![
            typed("response.created", 0, json!({"response": response_object("in_progress")})),
            typed("response.reasoning_summary_text.delta", 1, json!({"delta": "hmm"})),
            typed(
                "response.output_item.added",
                2,
                json!({"output_index": 1, "item": {"type": "function_call",
                "name": "f", "arguments": "", "call_id": "c"}}),
            ),
            typed("response.function_call_arguments.delta", 3, json!({"delta": "{\"a\":1}"})),
            typed("response.completed", 4, json!({"response": completed})),
        ];
        let s = run_at(Endpoint::Responses, &stream, false).1;
        assert_eq!((s.completion_chars, s.finish_reason.as_deref()), (3 + 7, Some("tool_calls")));
        assert_eq!(s.completion_text.as_deref(), Some(""), "only output text is captured");
    }

    #[test]
    fn legacy_completion_chunks_are_read_from_their_text_and_lose_the_usage_chunk() {
        let chunk = |text: &str, finish: Value| {
            let chunk = json!({"id": "gen-c", "object": "text_completion", "model": "m/served",
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]});
            format!("data: {chunk}\n\n")
        };
        let events = vec![chunk("Hel", Value::Null), chunk("lo", json!("stop")), usage_chunk(), DONE.to_owned()];
        let (client, s) = run_at(Endpoint::Completions, &events, false);
        assert_eq!(client, [events[0].as_str(), &events[1], DONE].concat(), "the usage chunk was not asked for");
        assert_eq!((s.completion_chars, s.completion_text.as_deref()), (5, Some("Hello")));
        assert_eq!((s.finish_reason.as_deref(), s.done, s.usage.is_some()), (Some("stop"), true, true));
        let (client, s) = run_at(Endpoint::Completions, &events[..1], true);
        assert_eq!(s.gateway_stop, Some(GatewayStop::CutOff));
        assert!(client.contains("closed the stream"));
    }
}
