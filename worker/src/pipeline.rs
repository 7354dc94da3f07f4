//! The request path, as a straight line of named stages:
//!
//! ```text
//! route → authenticate → read body → validate → admit (key's Durable Object) → forward
//!       → reply (JSON, or a relayed stream) → decorate (security, CORS, rate-limit headers, request id)
//!       → finish, after the response is handed over: relay the stream, settle the reservation,
//!         enqueue the usage event (→ D1 ledger + PostHog, see `consumer`), log
//! ```
//!
//! Each stage either passes the request on or returns an [`ApiError`]; `handle` renders errors in one place, so
//! every failure is an OpenAI-shaped error. The per-request [`Exchange`] collects what the stages learn; `finish`
//! always runs, so every admitted request is settled and every request is logged exactly once.

use std::rc::Rc;

use futures_util::StreamExt;
use key_limiter::protocol::{AdmitRequest, AdmitResponse, Amount, SettleBatch, SettleRequest, SettleResponse};
use serde_json::Value;
use worker::{Context, Env, Headers, Request, Response, ResponseBuilder};

use crate::admin::{self, AdminReply};
use crate::admit;
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
use crate::usage_event::{self, UsageEvent, UsageSource};
use crate::validate::{validate_chat, ChatRequest};

/// What one request has learned so far; read by `finish` for settling, billing and the log line.
struct Exchange {
    started_ms: u64,
    log: RequestLog,
    key: Option<KeyRecord>,
    /// Set once the request passed admission (or the limiter failed open): from here on it is billed.
    chat: Option<ChatFacts>,
    /// Whether the limiter holds a reservation for this request that must be settled.
    reserved: bool,
    /// Headers describing the key's windows (from the limiter's exact state).
    rate_headers: Vec<(&'static str, String)>,
    usage: Option<Usage>,
    /// Whether the upstream produced an answer whose work must be paid for even without a usage report.
    generated: bool,
    completion_chars: usize,
    finish_reason: Option<String>,
    /// The answer's text, kept only with content capture on.
    completion_text: Option<String>,
}

/// What billing needs to know about an admitted chat request.
struct ChatFacts {
    prompt_estimate: u64,
    max_tokens: u32,
    temperature: Option<f64>,
    /// The request's messages, kept only with content capture on.
    captured_input: Option<Value>,
}

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
    idle_timeout_secs: u64,
    drain_on_abort: bool,
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
    let mut exchange = Exchange {
        started_ms,
        log: RequestLog { request_id, method, path, ..Default::default() },
        key: None,
        chat: None,
        reserved: false,
        rate_headers: Vec::new(),
        usage: None,
        generated: false,
        completion_chars: 0,
        finish_reason: None,
        completion_text: None,
    };

    let config = match bindings::config(&env) {
        Ok(config) => config,
        Err(e) => {
            exchange.log.error = Some(e.label);
            let response = decorate(error_response(&e), &exchange, &[]);
            exchange.log.status = response.status_code();
            exchange.log.latency_ms = now_ms().saturating_sub(started_ms);
            worker::console_log!("{}", exchange.log.to_line());
            return response;
        }
    };
    let reply = dispatch(req, &env, &config, &mut exchange).await;
    let Reply { response, stream } = reply.unwrap_or_else(|e| {
        exchange.log.error = Some(e.label);
        Reply::now(error_response(&e))
    });

    let cors_headers = if exchange.log.method == "OPTIONS" {
        cors::preflight_headers(origin.as_deref(), preflight_headers.as_deref(), &config.allowed_origins)
    } else {
        cors::response_headers(origin.as_deref(), &config.allowed_origins)
    };
    let response = decorate(response, &exchange, &cors_headers);
    exchange.log.status = response.status_code();
    ctx.wait_until(finish(env, config, exchange, stream));
    response
}

async fn dispatch(mut req: Request, env: &Env, config: &Config, exchange: &mut Exchange) -> Result<Reply, ApiError> {
    match route(&exchange.log.method, &exchange.log.path) {
        Route::ChatCompletions => chat_completions(req, env, config, exchange).await,
        Route::Models => list_models(&req, env, config, exchange).await,
        Route::OwnUsage => {
            let key = authenticate(&req, env, config, exchange).await?;
            let usage = admin::own_usage(&key, env, config).await?;
            Ok(Reply::now(json_response(200, usage.to_string())))
        }
        Route::Admin(admin_route) => match admin::handle(&admin_route, &mut req, env, config, &exchange.log.path)
            .await?
        {
            AdminReply::Json(status, body) => Ok(Reply::now(json_response(status, body.to_string()))),
            AdminReply::Csv(csv) => {
                let headers = Headers::new();
                set_headers(
                    &headers,
                    &[
                        ("content-type", "text/csv; charset=utf-8".to_owned()),
                        ("content-disposition", "attachment; filename=\"usage.csv\"".to_owned()),
                    ],
                );
                Ok(Reply::now(ResponseBuilder::new().with_status(200).with_headers(headers).fixed(csv.into_bytes())))
            }
        },
        Route::Health => Ok(Reply::now(json_response(200, r#"{"status":"ok"}"#.to_owned()))),
        // The CORS headers that make a preflight are added by `decorate`, like every response's.
        Route::Preflight => Ok(Reply::now(ResponseBuilder::new().with_status(204).empty())),
        Route::MethodNotAllowed { allowed } => {
            let mut response = error_response(&ApiError::method_not_allowed(&exchange.log.method, allowed));
            set_headers(response.headers_mut(), &[("allow", allowed.to_owned())]);
            Ok(Reply::now(response))
        }
        Route::NotFound => Err(ApiError::not_found(&exchange.log.path)),
    }
}

async fn chat_completions(
    mut req: Request,
    env: &Env,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<Reply, ApiError> {
    let key = authenticate(&req, env, config, exchange).await?;
    let raw = read_body(&mut req, config.max_request_bytes).await?;
    let chat = validate_chat(&raw, config)?;
    exchange.log.model = Some(chat.model.clone());
    exchange.log.streamed = chat.stream;
    admit(env, config, &key, &chat, exchange).await?;

    let forward::Upstream { response: mut upstream, abort } = forward::post_chat(config, &chat.forward_body).await?;
    let status = upstream.status_code();
    exchange.log.upstream_status = Some(status);
    if !(200..300).contains(&status) {
        return Err(forward::upstream_error(&mut upstream).await);
    }
    exchange.generated = true;
    if chat.stream {
        stream_reply(&upstream, abort, &chat, config, capture_content(config), exchange.started_ms)
    } else {
        completion_reply(&mut upstream, config, exchange).await
    }
}

/// Asks the key's Durable Object to reserve the request's worst case against every limit.
async fn admit(
    env: &Env,
    config: &Config,
    key: &KeyRecord,
    chat: &ChatRequest,
    exchange: &mut Exchange,
) -> Result<(), ApiError> {
    let control = admit::control_for(key, config);
    let prompt_estimate = admit::estimate_prompt_tokens(chat);
    let reserve = Amount { tokens: prompt_estimate + u64::from(chat.max_tokens), usd: 0.0 };
    let settle = bindings::take_settles(&key.id);
    let message = AdmitRequest {
        request_id: exchange.log.request_id.clone(),
        control,
        models: chat.models.clone(),
        reserve,
        settle,
    };
    let asked_at = now_ms();
    let answer = bindings::limiter_call::<_, AdmitResponse>(env, &key.id, "/admit", &message).await;
    exchange.log.limiter_ms = Some(now_ms().saturating_sub(asked_at));
    let admitted = match answer {
        Ok(AdmitResponse::Admitted { state, limits }) => {
            exchange.rate_headers = admit::rate_limit_headers(&state, limits.window_ms);
            exchange.reserved = true;
            Ok(())
        }
        Ok(AdmitResponse::Denied { reason, retry_after_ms, state, limits, model }) => {
            exchange.rate_headers = admit::rate_limit_headers(&state, limits.window_ms);
            Err(admit::denial_error(reason, retry_after_ms, &limits, reserve, model.as_deref()))
        }
        Err(e) => {
            log_error("limiter_unreachable", &e.to_string());
            // The settlements it carried were not applied: keep them for the next call.
            for settle in message.settle {
                bindings::defer_settle(&key.id, settle);
            }
            if config.limiter_fail_open {
                Ok(())
            } else {
                Err(ApiError::unavailable("limiter_unavailable", "The rate limiter"))
            }
        }
    };
    admitted?;
    exchange.chat = Some(ChatFacts {
        prompt_estimate,
        max_tokens: chat.max_tokens,
        temperature: chat.temperature,
        captured_input: capture_content(config).then(|| serde_json::from_str(&chat.messages_json).ok()).flatten(),
    });
    Ok(())
}

fn capture_content(config: &Config) -> bool {
    config.posthog.as_ref().is_some_and(|p| p.capture_content)
}

/// Non-streamed: read the whole answer, learn its usage, hand the same bytes to the client.
async fn completion_reply(
    upstream: &mut Response,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<Reply, ApiError> {
    let bytes = forward::read_body(upstream, config.upstream_timeout_secs).await?;
    let completion = forward::read_completion(&bytes)?;
    exchange.log.served_model = completion.served_model;
    exchange.usage = completion.usage;
    exchange.completion_chars = completion.content.chars().count();
    exchange.finish_reason = completion.finish_reason;
    if capture_content(config) {
        exchange.completion_text = Some(completion.content);
    }
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    copy_generation_id(upstream, &headers);
    Ok(Reply::now(ResponseBuilder::new().with_status(200).with_headers(headers).fixed(bytes)))
}

/// Streamed: answer at once with the client side of a relay; the relay itself runs in `finish`.
fn stream_reply(
    upstream: &Response,
    abort: worker::AbortController,
    chat: &ChatRequest,
    config: &Config,
    capture: bool,
    started_ms: u64,
) -> Result<Reply, ApiError> {
    let worker::ResponseBody::Stream(body) = upstream.body() else {
        return Err(ApiError::upstream_malformed());
    };
    let relay = Relay::new(body, abort, SseScanner::new(chat.include_usage, capture), started_ms)?;
    let headers = Headers::new();
    set_headers(
        &headers,
        &[("content-type", "text/event-stream; charset=utf-8".to_owned()), ("cache-control", "no-cache".to_owned())],
    );
    copy_generation_id(upstream, &headers);
    let response = ResponseBuilder::new().with_status(200).with_headers(headers).stream(relay.client_body.clone());
    let job = StreamJob {
        relay,
        idle_timeout_secs: config.upstream_timeout_secs,
        drain_on_abort: config.drain_on_client_abort,
    };
    Ok(Reply { response, stream: Some(job) })
}

/// After the response is handed over: relay the stream (if any), settle the reservation, enqueue the usage
/// event, write the log line. Runs for every request, whatever happened to it.
async fn finish(env: Env, config: Rc<Config>, mut exchange: Exchange, stream: Option<StreamJob>) {
    if let Some(job) = stream {
        let outcome = job.relay.run(job.idle_timeout_secs, job.drain_on_abort).await;
        record_stream(&mut exchange, outcome);
    }
    if let Some(usage) = &exchange.usage {
        exchange.log.prompt_tokens = Some(usage.prompt_tokens);
        exchange.log.completion_tokens = Some(usage.completion_tokens);
    }
    exchange.log.latency_ms = now_ms().saturating_sub(exchange.started_ms);
    if let (Some(key), Some(chat)) = (&exchange.key, &exchange.chat) {
        // What was generated, when no usage report arrived (a cut stream); nothing if the upstream never answered.
        let estimate = exchange
            .generated
            .then(|| (chat.prompt_estimate, admit::estimate_completion_tokens(exchange.completion_chars)));
        let (usage, source) = usage_event::tokens_for(exchange.usage.as_ref(), estimate);
        if exchange.reserved {
            settle(&env, key, &exchange.log.request_id, admit::actual_amount(&usage)).await;
        }
        let event = usage_event(&exchange, key, chat, usage, source, &config);
        enqueue(&env, &event).await;
    }
    worker::console_log!("{}", exchange.log.to_line());
}

/// Replaces the reservation with what was used. The settlement first waits briefly for the key's next admission
/// from this isolate to carry it (under load it almost always does); otherwise it is sent on its own.
async fn settle(env: &Env, key: &KeyRecord, request_id: &str, actual: Amount) {
    bindings::defer_settle(&key.id, SettleRequest { request_id: request_id.to_owned(), actual });
    worker::Delay::from(SETTLE_DEFERRAL).await;
    let settle = bindings::take_settles(&key.id);
    if settle.is_empty() {
        return;
    }
    let batch = SettleBatch { settle };
    if let Err(e) = bindings::limiter_call::<_, SettleResponse>(env, &key.id, "/settle", &batch).await {
        // The reservations' leases will charge them as reserved: the key is over-charged, never under-charged.
        log_error("limiter_settle_failed", &e.to_string());
    }
}

/// How long a settlement waits for an admission to ride with (it holds the reservation that much longer).
const SETTLE_DEFERRAL: std::time::Duration = std::time::Duration::from_millis(50);

fn usage_event(
    exchange: &Exchange,
    key: &KeyRecord,
    chat: &ChatFacts,
    usage: Usage,
    source: UsageSource,
    config: &Config,
) -> UsageEvent {
    let content = match (&chat.captured_input, &exchange.completion_text) {
        (Some(input), output) if capture_content(config) => {
            Some(usage_event::capture(input, output.as_deref().unwrap_or_default()))
        }
        _ => None,
    };
    UsageEvent {
        request_id: exchange.log.request_id.clone(),
        key_id: key.id.clone(),
        user_id: key.user_id.clone(),
        model: exchange.log.model.clone().unwrap_or_default(),
        served_model: exchange.log.served_model.clone(),
        input_tokens: usage.prompt_tokens,
        output_tokens: usage.completion_tokens,
        cached_tokens: usage.cached_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        cost_usd: usage.cost.unwrap_or(0.0),
        usage_source: source,
        latency_ms: exchange.log.latency_ms,
        ttft_ms: exchange.log.ttft_ms,
        status: exchange.log.status,
        streamed: exchange.log.streamed,
        finish_reason: exchange.finish_reason.clone(),
        error: exchange.log.error.map(str::to_owned),
        timestamp_ms: exchange.started_ms,
        temperature: chat.temperature,
        max_tokens: chat.max_tokens,
        content,
    }
}

/// Hands the event to the queue; if that keeps failing, the event is written to the log in full, so it can be
/// recovered from `wrangler tail` rather than lost silently.
async fn enqueue(env: &Env, event: &UsageEvent) {
    let Ok(json) = serde_json::to_string(event) else { return };
    if let Err((e, lost)) = bindings::enqueue_usage(env, json).await {
        for event in lost {
            let Ok(mut event) = serde_json::from_str::<Value>(&event) else { continue };
            if let Some(fields) = event.as_object_mut() {
                fields.remove("content");
            }
            let line = serde_json::json!({"level": "error", "event": "usage_event_not_enqueued", "detail": e.to_string(),
                "usage_event": event});
            worker::console_error!("{line}");
        }
    }
}

async fn list_models(req: &Request, env: &Env, config: &Config, exchange: &mut Exchange) -> Result<Reply, ApiError> {
    let key = authenticate(req, env, config, exchange).await?;
    // Revocation is known to the key's Durable Object before any auth cache expires.
    admin::key_state(env, config, &key).await?;
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

async fn authenticate(
    req: &Request,
    env: &Env,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<KeyRecord, ApiError> {
    let authorization = header(req, "authorization");
    let key = auth::bearer_key(authorization.as_deref())?;
    let hash = auth::key_hash(key);
    let record = bindings::find_active_key(env, config, &hash).await?.ok_or_else(auth::invalid_key)?;
    exchange.log.key_id = Some(record.id.clone());
    exchange.key = Some(record.clone());
    Ok(record)
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

fn record_stream(exchange: &mut Exchange, outcome: RelayOutcome) {
    let summary = outcome.summary;
    let log = &mut exchange.log;
    log.served_model = summary.served_model;
    log.ttft_ms = outcome.ttft_ms;
    log.stream_end = Some(outcome.end.label());
    log.wasm_bytes_in = Some(outcome.bytes_in);
    log.wasm_bytes_out = Some(outcome.bytes_rewritten);
    if outcome.end != StreamEnd::Done {
        log.error = Some(outcome.end.label());
    }
    exchange.usage = summary.usage;
    exchange.completion_chars = summary.completion_chars;
    exchange.finish_reason = summary.finish_reason;
    exchange.completion_text = summary.completion_text;
}

fn error_response(error: &ApiError) -> Response {
    let mut response = json_response(error.status, error.body_json());
    let headers = response.headers_mut();
    if let Some(ms) = error.retry_after_ms {
        let secs = error.retry_after_secs().unwrap_or_default();
        set_headers(headers, &[("retry-after", secs.to_string()), ("retry-after-ms", ms.to_string())]);
    }
    if let Some(should_retry) = error.should_retry {
        set_headers(headers, &[("x-should-retry", should_retry.to_string())]);
    }
    response
}

fn json_response(status: u16, body: String) -> Response {
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    ResponseBuilder::new().with_status(status).with_headers(headers).fixed(body.into_bytes())
}

/// Adds what every response carries: security headers, CORS, rate-limit state, the request id, and no caching.
fn decorate(mut response: Response, exchange: &Exchange, cors_headers: &[(&'static str, String)]) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        let _ = headers.set(name, value);
    }
    if !headers.has("cache-control").unwrap_or(false) {
        let _ = headers.set("cache-control", "no-store");
    }
    let _ = headers.set("x-request-id", &exchange.log.request_id);
    set_headers(headers, cors_headers);
    set_headers(headers, &exchange.rate_headers);
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
