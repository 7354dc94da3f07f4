//! Talking to OpenRouter (or Cloudflare AI Gateway in front of it): building the upstream request, bounding it
//! with a timeout, and turning upstream failures into [`ApiError`]s.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::JsValue;
use worker::{AbortController, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::bindings::{log_error, within};
use crate::config::Config;
use crate::error::ApiError;
use crate::usage::Usage;

/// Upstream error bodies are read up to this size; the rest is not worth holding.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// An upstream response, and the means to abort it (its body included) later.
pub struct Upstream {
    pub response: Response,
    /// Taken when used (aborting consumes it).
    pub abort: Option<AbortController>,
}

impl Upstream {
    /// Aborts the upstream request: it stops generating, and its connection is released.
    pub fn abort(&mut self) {
        if let Some(abort) = self.abort.take() {
            abort.abort();
        }
    }
}

/// Sends the chat body upstream and returns the response once its headers have arrived.
pub async fn post_chat(config: &Config, body: &str) -> Result<Upstream, ApiError> {
    let url = format!("{}/chat/completions", config.upstream_base_url);
    let headers = upstream_headers(config)?;
    set_header(&headers, "content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_headers(headers).with_body(Some(JsValue::from_str(body)));
    let request = Request::new_with_init(&url, &init).map_err(|e| internal("upstream_request_build", &e))?;
    send(request, config.upstream_timeout_secs).await
}

/// Fetches the upstream model list (OpenRouter's shape).
pub async fn get_models(config: &Config) -> Result<Vec<u8>, ApiError> {
    let url = format!("{}/models", config.upstream_base_url);
    let mut init = RequestInit::new();
    init.with_method(Method::Get).with_headers(upstream_headers(config)?);
    let request = Request::new_with_init(&url, &init).map_err(|e| internal("upstream_request_build", &e))?;
    let mut upstream = send(request, config.upstream_timeout_secs).await?;
    if !(200..300).contains(&upstream.response.status_code()) {
        return Err(upstream_error(&mut upstream, config.upstream_timeout_secs).await);
    }
    read_body(&mut upstream, config.upstream_timeout_secs).await
}

/// Reads a whole (non-streamed) upstream body within the timeout; on timeout the upstream request is aborted
/// (so it stops generating, and its connection is released).
pub async fn read_body(upstream: &mut Upstream, timeout_secs: u64) -> Result<Vec<u8>, ApiError> {
    let bytes = within(Duration::from_secs(timeout_secs), upstream.response.bytes()).await;
    match bytes {
        Some(Ok(bytes)) => Ok(bytes),
        Some(Err(e)) => {
            log_error("upstream_body_read_failed", &e.to_string());
            Err(ApiError::upstream_cut_off())
        }
        None => {
            upstream.abort();
            Err(ApiError::upstream_timeout(timeout_secs))
        }
    }
}

/// Turns a non-2xx upstream response into the client's error, keeping its status and `Retry-After`. Its body is
/// read up to [`MAX_ERROR_BODY_BYTES`] and within the timeout; the rest is not waited for (the request is
/// aborted).
pub async fn upstream_error(upstream: &mut Upstream, timeout_secs: u64) -> ApiError {
    let status = upstream.response.status_code();
    let retry_after = upstream.response.headers().get("retry-after").ok().flatten();
    let mut body = Vec::new();
    if let Ok(mut stream) = upstream.response.stream() {
        let read = async {
            while let Some(Ok(chunk)) = stream.next().await {
                body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY_BYTES - body.len())]);
                if body.len() >= MAX_ERROR_BODY_BYTES {
                    return false;
                }
            }
            true
        };
        let read_whole = within(Duration::from_secs(timeout_secs), read).await.unwrap_or(false);
        if !read_whole {
            upstream.abort();
        }
    }
    error_from_upstream(status, &body, retry_after.as_deref())
}

/// Pure mapping of an upstream error response (OpenRouter: `{"error":{"code","message","metadata"}}`).
pub fn error_from_upstream(status: u16, body: &[u8], retry_after: Option<&str>) -> ApiError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {status}"));
    let error = ApiError::upstream(status, &message);
    match retry_after.and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(secs) => error.with_retry_after_ms(secs.saturating_mul(1000)),
        None => error,
    }
}

/// What the gateway needs from a non-streamed completion body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    pub served_model: Option<String>,
    /// OpenRouter's generation id (the body's `id`).
    pub generation_id: Option<String>,
    pub usage: Option<Usage>,
    /// The first choice's text (for content capture).
    pub content: String,
    /// Characters generated over every choice (content, reasoning, tool calls), for an estimate if the body
    /// carries no usage.
    pub generated_chars: usize,
    pub finish_reason: Option<String>,
}

/// Reads a 200 completion body: only the fields the gateway needs are decoded (not a whole JSON tree). An error
/// inside the body (OpenRouter reports some provider failures that way) or a body that is not a completion
/// object is the client's error.
pub fn read_completion(body: &[u8]) -> Result<Completion, ApiError> {
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
        Err(_) => return read_completion_loosely(body),
    };
    if let Some(error) = error_in_body(parsed.error.as_ref()) {
        return Err(error);
    }
    let generated_chars = parsed
        .choices
        .iter()
        .filter_map(|c| c.message.as_ref())
        .map(|m| chars(m.content.as_deref()) + chars(m.reasoning.as_deref()) + tool_call_chars(m.tool_calls.as_ref()))
        .sum();
    let first = parsed.choices.into_iter().next();
    Ok(Completion {
        served_model: parsed.model.map(Cow::into_owned),
        generation_id: parsed.id.map(Cow::into_owned),
        usage: parsed.usage.as_ref().and_then(Usage::from_json),
        content: first.as_ref().and_then(|c| c.message.as_ref()?.content.as_deref()).unwrap_or_default().to_owned(),
        generated_chars,
        finish_reason: first.and_then(|c| c.finish_reason).map(Cow::into_owned),
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

fn read_completion_loosely(body: &[u8]) -> Result<Completion, ApiError> {
    let parsed: Value = serde_json::from_slice(body).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = error_in_body(parsed.get("error")) {
        return Err(error);
    }
    if !parsed.is_object() {
        return Err(ApiError::upstream_malformed());
    }
    let content = parsed.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(Completion {
        served_model: parsed.get("model").and_then(Value::as_str).map(str::to_owned),
        generation_id: parsed.get("id").and_then(Value::as_str).map(str::to_owned),
        usage: parsed.get("usage").and_then(Usage::from_json),
        generated_chars: content.chars().count(),
        content,
        finish_reason: parsed.pointer("/choices/0/finish_reason").and_then(Value::as_str).map(str::to_owned),
    })
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

fn upstream_headers(config: &Config) -> Result<Headers, ApiError> {
    let headers = Headers::new();
    let key = config.openrouter_api_key.as_ref().ok_or_else(|| {
        log_error("config_missing", "OPENROUTER_API_KEY is not set");
        ApiError::internal("config_missing_provider_key")
    })?;
    set_header(&headers, "authorization", &format!("Bearer {}", key.expose()))?;
    if !config.referer.is_empty() {
        set_header(&headers, "http-referer", &config.referer)?;
    }
    set_header(&headers, "x-openrouter-title", &config.title)?;
    set_header(&headers, "x-title", &config.title)?;
    Ok(headers)
}

fn set_header(headers: &Headers, name: &str, value: &str) -> Result<(), ApiError> {
    headers.set(name, value).map_err(|e| internal("upstream_header_invalid", &e))
}

async fn send(request: Request, timeout_secs: u64) -> Result<Upstream, ApiError> {
    let controller = AbortController::default();
    let fetch = Fetch::Request(request);
    match within(Duration::from_secs(timeout_secs), fetch.send_with_signal(&controller.signal())).await {
        Some(Ok(response)) => Ok(Upstream { response, abort: Some(controller) }),
        Some(Err(e)) => {
            log_error("upstream_fetch_failed", &e.to_string());
            Err(ApiError::upstream_unreachable())
        }
        None => {
            controller.abort();
            Err(ApiError::upstream_timeout(timeout_secs))
        }
    }
}

/// Looks a generation up (`GET /generation?id=…`, OpenRouter's account of its tokens and cost) and returns the
/// status and body, or `None` when the upstream could not be reached in time.
pub async fn get_generation(config: &Config, generation_id: &str) -> Option<(u16, Vec<u8>)> {
    let mut url = worker::Url::parse(&format!("{}/generation", config.upstream_base_url)).ok()?;
    url.query_pairs_mut().append_pair("id", generation_id);
    let mut init = RequestInit::new();
    init.with_method(Method::Get).with_headers(upstream_headers(config).ok()?);
    let request = Request::new_with_init(url.as_str(), &init).ok()?;
    let mut upstream = send(request, GENERATION_TIMEOUT_SECS).await.ok()?;
    let status = upstream.response.status_code();
    let body = read_body(&mut upstream, GENERATION_TIMEOUT_SECS).await.ok()?;
    Some((status, body))
}

const GENERATION_TIMEOUT_SECS: u64 = 10;

fn internal(label: &'static str, e: &worker::Error) -> ApiError {
    log_error(label, &e.to_string());
    ApiError::internal(label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openrouter_error_body_keeps_status_message_and_retry_after() {
        let body = br#"{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-min","metadata":{}}}"#;
        let e = error_from_upstream(429, body, Some("7"));
        assert_eq!(e.status, 429);
        assert!(e.message.contains("free-models-per-min"));
        assert_eq!(e.retry_after_ms, Some(7000));
    }

    #[test]
    fn non_json_error_bodies_still_give_an_openai_error() {
        let e = error_from_upstream(503, b"<html>down</html>", Some("soon"));
        assert_eq!(e.status, 503);
        assert_eq!(e.retry_after_ms, None);
        assert!(e.message.contains("HTTP 503"));
    }

    fn read(body: Value) -> Result<Completion, ApiError> {
        read_completion(body.to_string().as_bytes())
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
            assert_eq!(read_completion(bad).err().map(|e| e.status), Some(502));
        }
    }
}
