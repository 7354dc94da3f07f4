//! Talking to OpenRouter (or Cloudflare AI Gateway in front of it): building the upstream request, bounding it
//! with a timeout, and turning upstream failures into [`ApiError`]s.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use wasm_bindgen::JsValue;
use worker::{AbortController, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::bindings::{log_error, within};
use crate::config::Config;
use crate::endpoint::Endpoint;
use crate::error::ApiError;

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

/// Sends a model API's body upstream (OpenRouter serves each at the same path as OpenAI) and returns the
/// response once its headers have arrived.
pub async fn post(config: &Config, endpoint: Endpoint, body: &str) -> Result<Upstream, ApiError> {
    let url = format!("{}/{}", config.upstream_base_url, endpoint.as_str());
    let headers = upstream_headers(config)?;
    set_header(&headers, "content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_headers(headers).with_body(Some(JsValue::from_str(body)));
    let request = Request::new_with_init(&url, &init).map_err(|e| internal("upstream_request_build", &e))?;
    send(request, config.upstream_timeout_secs).await
}

/// Fetches an upstream model list (OpenRouter's shape): `models` (text models) or `embeddings/models`.
pub async fn get_models(config: &Config, list: &str) -> Result<Vec<u8>, ApiError> {
    let url = format!("{}/{list}", config.upstream_base_url);
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
}
