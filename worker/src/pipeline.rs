//! The request path, as a straight line of named stages:
//!
//! ```text
//! route → authenticate → read body → validate → forward → reply (JSON, or a relayed stream)
//!       → decorate (security headers, CORS, request id) → log (after the stream ends, for streams)
//! ```
//!
//! Each stage either passes the request on or returns an [`ApiError`]; `handle` renders errors in one place, so
//! every failure is an OpenAI-shaped error and the log line is always written.

use futures_util::StreamExt;
use serde_json::Value;
use worker::{Context, Env, Headers, Request, Response, ResponseBuilder};

use crate::auth::{self, KeyRecord};
use crate::bindings::{self, log_error, now_ms, random_bytes};
use crate::config::Config;
use crate::cors;
use crate::error::ApiError;
use crate::forward;
use crate::log::RequestLog;
use crate::models::{self, CachedModels};
use crate::relay::{Relay, RelayOutcome, StreamEnd};
use crate::respond::{self, SECURITY_HEADERS};
use crate::routes::{route, Route};
use crate::sse::SseScanner;
use crate::usage::Usage;
use crate::validate::{validate_chat, ChatRequest};

/// A response, and the stream still to relay once it has been handed to the runtime.
struct Reply {
    response: Response,
    stream: Option<StreamJob>,
}

impl Reply {
    fn now(response: Response) -> Self {
        Self { response, stream: None }
    }
}

struct StreamJob {
    relay: Relay,
    scanner: SseScanner,
    started_ms: u64,
    idle_timeout_secs: u64,
}

pub async fn handle(req: Request, env: Env, ctx: Context) -> Response {
    let started_ms = now_ms();
    let method = req.method().to_string();
    let path = req.path();
    let request_id = match respond::sane_request_id(header(&req, "x-request-id").as_deref()) {
        Some(id) => id.to_owned(),
        None => respond::new_request_id(random_bytes()),
    };
    let origin = header(&req, "origin");
    let preflight_headers = header(&req, "access-control-request-headers");
    let mut log = RequestLog { request_id, method, path, ..Default::default() };

    let config = bindings::config(&env);
    let reply = match &config {
        Ok(config) => dispatch(req, &env, config, started_ms, &mut log).await,
        Err(e) => Err(e.clone()),
    };
    let Reply { response, stream } = reply.unwrap_or_else(|e| {
        log.error = Some(e.label);
        Reply::now(error_response(&e))
    });

    let cors_headers = match (&config, log.method.as_str()) {
        (Ok(config), "OPTIONS") => {
            cors::preflight_headers(origin.as_deref(), preflight_headers.as_deref(), &config.allowed_origins)
        }
        (Ok(config), _) => cors::response_headers(origin.as_deref(), &config.allowed_origins),
        (Err(_), _) => Vec::new(),
    };
    let response = decorate(response, &log.request_id, &cors_headers);
    log.status = response.status_code();

    match stream {
        None => {
            log.latency_ms = now_ms().saturating_sub(started_ms);
            worker::console_log!("{}", log.to_line());
        }
        Some(job) => ctx.wait_until(async move {
            let outcome = job.relay.run(job.scanner, job.started_ms, job.idle_timeout_secs).await;
            record_stream(&mut log, &outcome);
            log.latency_ms = now_ms().saturating_sub(started_ms);
            worker::console_log!("{}", log.to_line());
        }),
    }
    response
}

async fn dispatch(req: Request, env: &Env, config: &Config, started_ms: u64, log: &mut RequestLog) -> Result<Reply, ApiError> {
    match route(&log.method, &log.path) {
        Route::ChatCompletions => chat_completions(req, env, config, started_ms, log).await,
        Route::Models => list_models(&req, env, config, log).await,
        Route::Health => Ok(Reply::now(json_response(200, r#"{"status":"ok"}"#.to_owned()))),
        // The CORS headers that make a preflight are added by `decorate`, like every response's.
        Route::Preflight => Ok(Reply::now(ResponseBuilder::new().with_status(204).empty())),
        Route::MethodNotAllowed { allowed } => {
            let mut response = error_response(&ApiError::method_not_allowed(&log.method, allowed));
            set_headers(response.headers_mut(), &[("allow", allowed.to_owned())]);
            Ok(Reply::now(response))
        }
        Route::NotFound => Err(ApiError::not_found(&log.path)),
    }
}

async fn chat_completions(
    mut req: Request,
    env: &Env,
    config: &Config,
    started_ms: u64,
    log: &mut RequestLog,
) -> Result<Reply, ApiError> {
    let key = authenticate(&req, env, config).await?;
    log.key_id = Some(key.id);
    let raw = read_body(&mut req, config.max_request_bytes).await?;
    let chat = validate_chat(&raw, config)?;
    log.model = Some(chat.model.clone());
    log.streamed = chat.stream;

    let body = serde_json::to_string(&chat.body).map_err(|_| ApiError::internal("body_serialize_failed"))?;
    let mut upstream = forward::post_chat(config, &body).await?;
    let status = upstream.status_code();
    log.upstream_status = Some(status);
    if !(200..300).contains(&status) {
        return Err(forward::upstream_error(&mut upstream).await);
    }
    if chat.stream {
        stream_reply(&upstream, &chat, config, started_ms)
    } else {
        completion_reply(&mut upstream, config, log).await
    }
}

/// Non-streamed: read the whole answer, learn its usage, hand the same bytes to the client.
async fn completion_reply(upstream: &mut Response, config: &Config, log: &mut RequestLog) -> Result<Reply, ApiError> {
    let bytes = forward::read_body(upstream, config.upstream_timeout_secs).await?;
    let parsed: Value = serde_json::from_slice(&bytes).map_err(|_| ApiError::upstream_malformed())?;
    if let Some(error) = forward::error_in_body(&parsed) {
        return Err(error);
    }
    if !parsed.is_object() {
        return Err(ApiError::upstream_malformed());
    }
    log.served_model = parsed.get("model").and_then(Value::as_str).map(str::to_owned);
    if let Some(usage) = parsed.get("usage").and_then(Usage::from_json) {
        record_usage(log, &usage);
    }
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    copy_generation_id(upstream, &headers);
    Ok(Reply::now(ResponseBuilder::new().with_status(200).with_headers(headers).fixed(bytes)))
}

/// Streamed: answer at once with the client side of a relay; the relay itself runs after the response is sent.
fn stream_reply(upstream: &Response, chat: &ChatRequest, config: &Config, started_ms: u64) -> Result<Reply, ApiError> {
    let worker::ResponseBody::Stream(body) = upstream.body() else {
        return Err(ApiError::upstream_malformed());
    };
    let relay = Relay::new(body)?;
    let headers = Headers::new();
    set_headers(
        &headers,
        &[
            ("content-type", "text/event-stream; charset=utf-8".to_owned()),
            ("cache-control", "no-cache".to_owned()),
        ],
    );
    copy_generation_id(upstream, &headers);
    let response = ResponseBuilder::new().with_status(200).with_headers(headers).stream(relay.client_body.clone());
    let job = StreamJob {
        relay,
        scanner: SseScanner::new(chat.include_usage),
        started_ms,
        idle_timeout_secs: config.upstream_timeout_secs,
    };
    Ok(Reply { response, stream: Some(job) })
}

async fn list_models(req: &Request, env: &Env, config: &Config, log: &mut RequestLog) -> Result<Reply, ApiError> {
    let key = authenticate(req, env, config).await?;
    log.key_id = Some(key.id);
    let ttl = config.models_cache_ttl_secs;
    let cached = if ttl > 0 { bindings::cached_models(env).await } else { None };
    let now = now_ms();
    if let Some(fresh) = cached.as_ref().filter(|c| c.is_fresh(now, ttl)) {
        return Ok(Reply::now(json_response(200, fresh.body.clone())));
    }
    let fetched = forward::get_models(config)
        .await
        .and_then(|raw| models::to_openai_list(&raw).ok_or_else(ApiError::upstream_malformed));
    match (fetched, cached) {
        (Ok(body), _) => {
            if ttl > 0 {
                bindings::store_models(env, &CachedModels { fetched_at_ms: now, body: body.clone() }, ttl).await;
            }
            Ok(Reply::now(json_response(200, body)))
        }
        (Err(e), Some(stale)) => {
            log_error("models_served_stale", e.label);
            Ok(Reply::now(json_response(200, stale.body)))
        }
        (Err(e), None) => Err(e),
    }
}

async fn authenticate(req: &Request, env: &Env, config: &Config) -> Result<KeyRecord, ApiError> {
    let authorization = header(req, "authorization");
    let key = auth::bearer_key(authorization.as_deref())?;
    let hash = auth::key_hash(key);
    bindings::find_active_key(env, config, &hash).await?.ok_or_else(auth::invalid_key)
}

/// Reads the body, refusing early (by `Content-Length`) or as soon as it grows past the limit.
async fn read_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = header(req, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut stream = req.stream().map_err(|_| ApiError::invalid_request("The request body could not be read."))?;
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid_request("The request body could not be read."))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn record_usage(log: &mut RequestLog, usage: &Usage) {
    log.prompt_tokens = Some(usage.prompt_tokens);
    log.completion_tokens = Some(usage.completion_tokens);
}

fn record_stream(log: &mut RequestLog, outcome: &RelayOutcome) {
    let summary = &outcome.summary;
    log.served_model = summary.served_model.clone();
    log.ttft_ms = outcome.ttft_ms;
    log.stream_end = Some(outcome.end.label());
    if let Some(usage) = &summary.usage {
        record_usage(log, usage);
    }
    if outcome.end != StreamEnd::Done {
        log.error = Some(outcome.end.label());
    }
}

fn error_response(error: &ApiError) -> Response {
    let mut response = json_response(error.status, error.body_json());
    if let Some(ms) = error.retry_after_ms {
        let secs = error.retry_after_secs().unwrap_or_default();
        set_headers(response.headers_mut(), &[("retry-after", secs.to_string()), ("retry-after-ms", ms.to_string())]);
    }
    response
}

fn json_response(status: u16, body: String) -> Response {
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    ResponseBuilder::new().with_status(status).with_headers(headers).fixed(body.into_bytes())
}

/// Adds what every response carries: security headers, CORS, the request id, and no caching.
fn decorate(mut response: Response, request_id: &str, cors_headers: &cors::HeaderList) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        let _ = headers.set(name, value);
    }
    if !headers.has("cache-control").unwrap_or(false) {
        let _ = headers.set("cache-control", "no-store");
    }
    let _ = headers.set("x-request-id", request_id);
    set_headers(headers, cors_headers);
    response
}

fn copy_generation_id(upstream: &Response, headers: &Headers) {
    if let Ok(Some(id)) = upstream.headers().get("x-generation-id") {
        set_headers(headers, &[("x-generation-id", id)]);
    }
}

fn set_headers(headers: &Headers, list: &[(&'static str, String)]) {
    for (name, value) in list {
        if let Err(e) = headers.set(name, value) {
            log_error("header_set_failed", &format!("{name}: {e}"));
        }
    }
}

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers().get(name).ok().flatten()
}
