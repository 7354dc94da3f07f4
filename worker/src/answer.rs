//! Reading a non-streamed answer (a 200 body) for billing: what was used, what was generated, which model
//! answered, why it stopped. Only the fields the gateway needs are decoded (borrowed where possible), not a
//! whole JSON tree; the client gets the upstream's bytes as they came. Pure.
//!
//! An error inside the body (OpenRouter reports some provider failures that way; a Responses object may say
//! `"status": "failed"`) or a body that is not the endpoint's object is the client's error.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::usage::Usage;

/// What the gateway needs from a non-streamed answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BodySummary {
    pub served_model: Option<String>,
    /// OpenRouter's generation id (the body's `id`).
    pub generation_id: Option<String>,
    pub usage: Option<Usage>,
    /// The first answer's text (for content capture).
    pub content: String,
    /// Characters generated over every choice or output item (text, reasoning, tool calls), for an estimate if
    /// the body carries no usage.
    pub generated_chars: usize,
    /// Chat's vocabulary on every endpoint (`stop`, `length`, `tool_calls`, `content_filter`), so reports
    /// compare across them; see [`responses_finish_reason`].
    pub finish_reason: Option<String>,
}

pub fn read_body(endpoint: Endpoint, body: &[u8]) -> Result<BodySummary, ApiError> {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => read_choices(body),
        Endpoint::Responses => read_response(body),
        Endpoint::Embeddings => read_embeddings(body),
    }
}

/// A chat completion (`choices[].message`) or a legacy text completion (`choices[].text`).
fn read_choices(body: &[u8]) -> Result<BodySummary, ApiError> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        model: Option<Cow<'a, str>>,
        usage: Option<Value>,
        error: Option<Value>,
        #[serde(borrow, default)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow)]
        message: Option<Message<'a>>,
        /// Legacy completions.
        #[serde(borrow)]
        text: Option<Cow<'a, str>>,
        #[serde(borrow)]
        finish_reason: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(borrow)]
        reasoning: Option<Cow<'a, str>>,
        tool_calls: Option<Value>,
    }
    // Odd shapes (a non-string content, a non-list of choices) are read loosely, as a JSON tree.
    let parsed = match serde_json::from_slice::<Body>(body) {
        Ok(parsed) => parsed,
        Err(_) => return read_choices_loosely(body),
    };
    if let Some(error) = error_in_body(parsed.error.as_ref()) {
        return Err(error);
    }
    let generated_chars = parsed
        .choices
        .iter()
        .map(|c| {
            chars(c.text.as_deref())
                + c.message.as_ref().map_or(0, |m| {
                    chars(m.content.as_deref()) + chars(m.reasoning.as_deref()) + tool_call_chars(m.tool_calls.as_ref())
                })
        })
        .sum();
    let first = parsed.choices.into_iter().next();
    let content =
        first.as_ref().and_then(|c| c.message.as_ref().and_then(|m| m.content.as_deref()).or(c.text.as_deref()));
    Ok(BodySummary {
        served_model: parsed.model.map(Cow::into_owned),
        generation_id: parsed.id.map(Cow::into_owned),
        usage: parsed.usage.as_ref().and_then(Usage::from_json),
        content: content.unwrap_or_default().to_owned(),
        generated_chars,
        finish_reason: first.and_then(|c| c.finish_reason).map(Cow::into_owned),
    })
}

fn read_choices_loosely(body: &[u8]) -> Result<BodySummary, ApiError> {
    let parsed: Value = serde_json::from_slice(body).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = error_in_body(parsed.get("error")) {
        return Err(error);
    }
    if !parsed.is_object() {
        return Err(ApiError::upstream_malformed());
    }
    let content = parsed
        .pointer("/choices/0/message/content")
        .or_else(|| parsed.pointer("/choices/0/text"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(BodySummary {
        served_model: parsed.get("model").and_then(Value::as_str).map(str::to_owned),
        generation_id: parsed.get("id").and_then(Value::as_str).map(str::to_owned),
        usage: parsed.get("usage").and_then(Usage::from_json),
        generated_chars: content.chars().count(),
        content,
        finish_reason: parsed.pointer("/choices/0/finish_reason").and_then(Value::as_str).map(str::to_owned),
    })
}

/// A Responses object as billing reads it: a non-streamed answer, or the `response` of a stream's lifecycle
/// events (`response.created` … `response.completed`).
#[derive(Deserialize)]
pub struct ResponseObject<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub status: Option<Cow<'a, str>>,
    pub incomplete_details: Option<Value>,
    pub usage: Option<Value>,
    pub error: Option<Value>,
    #[serde(borrow, default)]
    pub output: Option<Vec<&'a serde_json::value::RawValue>>,
}

/// A Responses object: `output` items (messages of `output_text` parts, reasoning, function calls), `status`,
/// `usage` in the Responses API's names.
fn read_response(body: &[u8]) -> Result<BodySummary, ApiError> {
    let parsed: ResponseObject = serde_json::from_slice(body).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = error_in_body(parsed.error.as_ref()) {
        return Err(error);
    }
    if parsed.status.as_deref() == Some("failed") {
        return Err(ApiError::upstream(502, "The response failed upstream."));
    }
    let mut summary = BodySummary {
        served_model: parsed.model.map(Cow::into_owned),
        generation_id: parsed.id.map(Cow::into_owned),
        usage: parsed.usage.as_ref().and_then(Usage::from_json),
        ..BodySummary::default()
    };
    let mut called_a_tool = false;
    // An item of a shape billing does not know (a hosted tool's call) is skipped, not an error.
    for item in parsed.output.iter().flatten().filter_map(|raw| serde_json::from_str::<OutputItem>(raw.get()).ok()) {
        called_a_tool |= item.kind.as_deref() == Some("function_call");
        summary.generated_chars += item.generated_chars();
        if summary.content.is_empty() && item.kind.as_deref() == Some("message") {
            summary.content = item.text();
        }
    }
    summary.finish_reason =
        responses_finish_reason(parsed.status.as_deref(), parsed.incomplete_details.as_ref(), called_a_tool);
    Ok(summary)
}

/// One Responses output item, as far as billing reads it.
#[derive(Deserialize)]
pub struct OutputItem<'a> {
    #[serde(borrow, rename = "type")]
    pub kind: Option<Cow<'a, str>>,
    /// A message's parts (`output_text`, `refusal`) or a reasoning item's (`reasoning_text`).
    #[serde(borrow, default)]
    content: Option<Vec<Part<'a>>>,
    /// A reasoning item's summary parts.
    #[serde(borrow, default)]
    summary: Option<Vec<Part<'a>>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    refusal: Option<Cow<'a, str>>,
}

impl OutputItem<'_> {
    pub fn generated_chars(&self) -> usize {
        let parts = |parts: &Option<Vec<Part>>| {
            parts.iter().flatten().map(|p| chars(p.text.as_deref()) + chars(p.refusal.as_deref())).sum::<usize>()
        };
        parts(&self.content) + parts(&self.summary) + chars(self.name.as_deref()) + chars(self.arguments.as_deref())
    }

    fn text(&self) -> String {
        self.content.iter().flatten().filter_map(|p| p.text.as_deref()).collect()
    }
}

/// A Responses status in chat's vocabulary: `completed` is `stop` (`tool_calls` when the output calls a
/// function), `incomplete` is `length` for `max_output_tokens` and `content_filter` for a filter, `failed` is
/// `error`; anything else is kept as sent.
pub fn responses_finish_reason(
    status: Option<&str>,
    incomplete_details: Option<&Value>,
    called_a_tool: bool,
) -> Option<String> {
    let reason = match status? {
        "completed" if called_a_tool => "tool_calls",
        "completed" => "stop",
        "failed" => "error",
        "incomplete" => match incomplete_details.and_then(|d| d.get("reason")).and_then(Value::as_str) {
            Some("max_output_tokens") => "length",
            Some("content_filter") => "content_filter",
            Some(other) => return Some(other.to_owned()),
            None => "incomplete",
        },
        other => return Some(other.to_owned()),
    };
    Some(reason.to_owned())
}

/// An embeddings list: `usage` and `model` are read; the vectors (`data`) are skipped, not decoded.
fn read_embeddings(body: &[u8]) -> Result<BodySummary, ApiError> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        model: Option<Cow<'a, str>>,
        usage: Option<Value>,
        error: Option<Value>,
        data: Option<IgnoredAny>,
    }
    let parsed: Body = serde_json::from_slice(body).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = error_in_body(parsed.error.as_ref()) {
        return Err(error);
    }
    if parsed.data.is_none() {
        return Err(ApiError::upstream_malformed());
    }
    Ok(BodySummary {
        served_model: parsed.model.map(Cow::into_owned),
        generation_id: parsed.id.map(Cow::into_owned),
        usage: parsed.usage.as_ref().and_then(Usage::from_json),
        ..BodySummary::default()
    })
}

fn chars(text: Option<&str>) -> usize {
    text.map_or(0, |t| t.chars().count())
}

/// Names and arguments of a message's tool calls.
fn tool_call_chars(tool_calls: Option<&Value>) -> usize {
    let Some(calls) = tool_calls.and_then(Value::as_array) else { return 0 };
    calls
        .iter()
        .map(|c| {
            let field = |name: &str| c.pointer(&format!("/function/{name}")).and_then(Value::as_str);
            chars(field("name")) + chars(field("arguments"))
        })
        .sum()
}

/// An error that OpenRouter reports inside a 200 body (the body's `error` field).
fn error_in_body(error: Option<&Value>) -> Option<ApiError> {
    let error = error.filter(|e| !e.is_null())?;
    let message = error.get("message").and_then(Value::as_str).unwrap_or("upstream error");
    let status = error
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(502);
    Some(ApiError::upstream(status, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(body: Value) -> Result<BodySummary, ApiError> {
        read_body(Endpoint::ChatCompletions, body.to_string().as_bytes())
    }

    #[test]
    fn errors_inside_200_bodies_are_detected() {
        let e = read(json!({"error": {"code": 502, "message": "Provider returned error"}}));
        assert_eq!(e.err().map(|e| e.status), Some(502));
        assert_eq!(read(json!({"error": {"code": "weird"}})).err().map(|e| e.status), Some(502));
        assert!(read(json!({"choices": []})).is_ok());
        assert!(read(json!({"error": null, "choices": []})).is_ok());
    }

    #[test]
    fn every_choice_counts_towards_what_was_generated() {
        let body = json!({"id": "gen-7", "choices": [
            {"message": {"content": "abc", "reasoning": "hm"}},
            {"message": {"content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]});
        let c = read(body).expect("completion");
        assert_eq!(c.generated_chars, 3 + 2 + 1 + 7);
        assert_eq!(c.generation_id.as_deref(), Some("gen-7"));
    }

    #[test]
    fn completion_facts_are_read_strictly_or_loosely() {
        let body = json!({"id": "x", "model": "m/served", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": "héllo"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cost": 0.5}});
        let c = read(body).expect("completion");
        assert_eq!(c.served_model.as_deref(), Some("m/served"));
        assert_eq!(c.content, "héllo");
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        assert_eq!(c.usage.map(|u| u.total_tokens()), Some(5));
        // Tool calls: no content at all.
        let tools =
            read(json!({"choices": [{"message": {"content": null, "tool_calls": []}, "finish_reason": "tool_calls"}]}));
        assert_eq!(tools.expect("completion").finish_reason.as_deref(), Some("tool_calls"));
        // An odd shape is still read, loosely.
        let odd = read(json!({"model": "m", "choices": "not a list"})).expect("completion");
        assert_eq!(odd.served_model.as_deref(), Some("m"));
        for bad in [&b"<html>"[..], b"[1,2]", b"\"text\""] {
            assert_eq!(read_body(Endpoint::ChatCompletions, bad).err().map(|e| e.status), Some(502));
        }
    }

    #[test]
    fn legacy_completions_are_read_from_their_text() {
        let body = json!({"id": "gen-3", "object": "text_completion", "model": "m/x", "choices": [
            {"text": "héllo", "index": 0, "finish_reason": "length"}, {"text": "abc", "index": 1, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 4, "cost": 0.1}});
        let c = read_body(Endpoint::Completions, body.to_string().as_bytes()).expect("completion");
        assert_eq!((c.content.as_str(), c.generated_chars, c.finish_reason.as_deref()), ("héllo", 8, Some("length")));
        assert_eq!(c.usage.map(|u| u.total_tokens()), Some(6));
    }

    fn response(body: Value) -> Result<BodySummary, ApiError> {
        read_body(Endpoint::Responses, body.to_string().as_bytes())
    }

    #[test]
    fn responses_are_read_from_their_output_items_and_status() {
        let body = json!({"id": "gen-9", "object": "response", "model": "m/served", "status": "completed",
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}]},
                {"type": "message", "id": "msg_1", "role": "assistant", "content": [
                    {"type": "output_text", "text": "héllo", "annotations": []}, {"type": "output_text", "text": "!"}]}],
            "usage": {"input_tokens": 5, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1},
                "total_tokens": 8, "cost": 0.002}, "error": null, "incomplete_details": null});
        let r = response(body).expect("response");
        assert_eq!(r.content, "héllo!");
        assert_eq!(r.generated_chars, 2 + 6);
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(r.generation_id.as_deref(), Some("gen-9"));
        assert_eq!(r.usage.map(|u| (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens)), Some((5, 3, 1)));
        let call =
            json!({"status": "completed", "output": [{"type": "function_call", "name": "f", "arguments": "{}"}]});
        let r = response(call).expect("response");
        assert_eq!((r.finish_reason.as_deref(), r.generated_chars), (Some("tool_calls"), 3));
        let cut = json!({"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": []});
        assert_eq!(response(cut).expect("response").finish_reason.as_deref(), Some("length"));
        let failed = json!({"status": "failed", "error": {"code": "server_error", "message": "boom"}, "output": []});
        let e = response(failed).expect_err("failed");
        assert_eq!((e.status, e.message.contains("boom")), (502, true));
        assert_eq!(response(json!({"status": "failed", "error": null})).err().map(|e| e.status), Some(502));
        assert_eq!(response(json!({"error": {"code": 429, "message": "slow"}})).err().map(|e| e.status), Some(429));
        assert_eq!(read_body(Endpoint::Responses, b"<html>").err().map(|e| e.status), Some(502));
    }

    #[test]
    fn embeddings_are_read_without_decoding_the_vectors() {
        let body = json!({"object": "list", "model": "e/served", "id": "gen-e",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}, {"object": "embedding", "index": 1,
            "embedding": "AAAAAA=="}], "usage": {"prompt_tokens": 7, "total_tokens": 7, "cost": 0.0001}});
        let e = read_body(Endpoint::Embeddings, body.to_string().as_bytes()).expect("embeddings");
        assert_eq!(e.served_model.as_deref(), Some("e/served"));
        assert_eq!(e.usage.map(|u| (u.prompt_tokens, u.completion_tokens, u.cost)), Some((7, 0, Some(0.0001))));
        assert_eq!((e.generated_chars, e.finish_reason), (0, None));
        let error = json!({"error": {"code": 400, "message": "bad input"}});
        assert_eq!(read_body(Endpoint::Embeddings, error.to_string().as_bytes()).err().map(|e| e.status), Some(400));
        assert_eq!(read_body(Endpoint::Embeddings, b"{}").err().map(|e| e.status), Some(502));
    }
}
