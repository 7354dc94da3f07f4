//! Talking to OpenRouter (or Cloudflare AI Gateway in front of it): building the upstream request, bounding it
//! with a timeout, and turning upstream failures into [`ApiError`]s.

use std::time::Duration;

use futures_util::future::{select, Either};
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::JsValue;
use worker::{AbortController, Delay, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::bindings::log_error;
use crate::config::Config;
use crate::error::ApiError;
use crate::usage::Usage;

/// Upstream error bodies are read up to this size; the rest is not worth holding.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// An upstream response, and the means to abort it (its body included) later.
pub struct Upstream {
    pub response: Response,
    pub abort: AbortController,
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
    let Upstream { mut response, .. } = send(request, config.upstream_timeout_secs).await?;
    if !(200..300).contains(&response.status_code()) {
        return Err(upstream_error(&mut response).await);
    }
    with_timeout(response.bytes(), config.upstream_timeout_secs).await?.map_err(|_| ApiError::upstream_unreachable())
}

/// Reads a whole (non-streamed) upstream body within the timeout.
pub async fn read_body(response: &mut Response, timeout_secs: u64) -> Result<Vec<u8>, ApiError> {
    with_timeout(response.bytes(), timeout_secs).await?.map_err(|e| {
        log_error("upstream_body_read_failed", &e.to_string());
        ApiError::upstream_cut_off()
    })
}

/// Turns a non-2xx upstream response into the client's error, keeping its status and `Retry-After`.
pub async fn upstream_error(response: &mut Response) -> ApiError {
    let status = response.status_code();
    let retry_after = response.headers().get("retry-after").ok().flatten();
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(MAX_ERROR_BODY_BYTES)];
    error_from_upstream(status, body, retry_after.as_deref())
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
    pub usage: Option<Usage>,
    pub content: String,
    pub finish_reason: Option<String>,
}

/// Reads a 200 completion body: only the fields the gateway needs are decoded (not a whole JSON tree). An error
/// inside the body (OpenRouter reports some provider failures that way) or a body that is not a completion
/// object is the client's error.
pub fn read_completion(body: &[u8]) -> Result<Completion, ApiError> {
    #[derive(Deserialize)]
    struct Body<'a> {
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
    }
    // Odd shapes (a non-string content, a non-list of choices) are read loosely, as a JSON tree.
    let parsed = match serde_json::from_slice::<Body>(body) {
        Ok(parsed) => parsed,
        Err(_) => return read_completion_loosely(body),
    };
    if let Some(error) = error_in_body(parsed.error.as_ref()) {
        return Err(error);
    }
    let first = parsed.choices.into_iter().next();
    Ok(Completion {
        served_model: parsed.model.map(Cow::into_owned),
        usage: parsed.usage.as_ref().and_then(Usage::from_json),
        content: first.as_ref().and_then(|c| c.message.as_ref()?.content.as_deref()).unwrap_or_default().to_owned(),
        finish_reason: first.and_then(|c| c.finish_reason).map(Cow::into_owned),
    })
}

fn read_completion_loosely(body: &[u8]) -> Result<Completion, ApiError> {
    let parsed: Value = serde_json::from_slice(body).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = error_in_body(parsed.get("error")) {
        return Err(error);
    }
    if !parsed.is_object() {
        return Err(ApiError::upstream_malformed());
    }
    Ok(Completion {
        served_model: parsed.get("model").and_then(Value::as_str).map(str::to_owned),
        usage: parsed.get("usage").and_then(Usage::from_json),
        content: parsed.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or_default().to_owned(),
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
    let result = with_timeout(fetch.send_with_signal(&controller.signal()), timeout_secs).await;
    match result {
        Ok(Ok(response)) => Ok(Upstream { response, abort: controller }),
        Ok(Err(e)) => {
            log_error("upstream_fetch_failed", &e.to_string());
            Err(ApiError::upstream_unreachable())
        }
        Err(timeout) => {
            controller.abort();
            Err(timeout)
        }
    }
}

/// Runs `future`, or gives up with a 504 after `timeout_secs`.
pub async fn with_timeout<F: std::future::Future>(future: F, timeout_secs: u64) -> Result<F::Output, ApiError> {
    let future = std::pin::pin!(future);
    let timer = Delay::from(Duration::from_secs(timeout_secs));
    match select(future, timer).await {
        Either::Left((output, _)) => Ok(output),
        Either::Right(_) => Err(ApiError::upstream_timeout(timeout_secs)),
    }
}

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
