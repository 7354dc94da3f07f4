//! The request path, as a straight line of named stages:
//!
//! ```text
//! route → authenticate → read body → validate (per endpoint) → look up the response cache (a usable entry
//!       is admitted reserving nothing, and is the reply) → price → admit (`limiter`: the isolate's lease of
//!       the key, else the key's Durable Object) → forward
//!       → reply (JSON, or a relayed stream) → decorate (security, CORS, rate-limit and cache headers, request id)
//!       → finish, after the response is handed over: relay the stream, settle the reservation,
//!         enqueue the usage event (→ the ledger + PostHog, see `consumer`), store a whole answer the cache
//!         planned for, report the key's leases, log
//! ```
//!
//! Each stage either passes the request on or returns an [`ApiError`]; `handle` renders errors in one place, so
//! every failure is an OpenAI-shaped error. [`Exchange`] holds what the stages learn: who asked (`key`), what
//! admission granted (`admitted`), and what the answer taught billing (`answer`). `finish` always runs, and
//! nothing in it waits without a deadline or on the client, so every admitted request is settled and billed and
//! every request is logged exactly once, however the client behaves.
//!
//! Every request gets the gateway's own id (`x-request-id`): it names the reservation, the usage event, the
//! ledger row and the PostHog event. An id the client sends (`x-client-request-id`, or `x-request-id`) is
//! echoed back in `x-client-request-id`, logged and recorded, and keys nothing.

use std::rc::Rc;
use std::time::Duration;

use futures_util::StreamExt;
use key_limiter::protocol::{Amount, Candidate};
use serde_json::Value;
use worker::{Context, Env, Headers, Request, Response, ResponseBuilder};

use crate::admin::{self, AdminReply};
use crate::admit;
use crate::answer;
use crate::auth;
use crate::bindings::{self, log_error, now_ms, random_bytes, within};
use crate::cache::{self, replay, Entry, Plan, Stored};
use crate::catalog;
use crate::config::{Config, UnpricedModel};
use crate::cors;
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::forward::{self, Upstream};
use crate::keys::KeyRecord;
use crate::limiter::{self, Admission, Reservation};
use crate::log::RequestLog;
use crate::models;
use crate::pricing;
use crate::relay::{Delivery, Relay, RelayOutcome, StreamEnd};
use crate::respond::{self, SECURITY_HEADERS};
use crate::routes::{route, Route};
use crate::sse::SseScanner;
use crate::usage::Usage;
use crate::usage_event::{self, Estimate, UsageEvent, UsageSource};
use crate::validate::{self, ModelRequest};

/// What one request has learned so far; read by `finish` for settling, billing and the log line.
struct Exchange {
    started_ms: u64,
    log: RequestLog,
    /// The key that authenticated the request, and the hash it was found by.
    key: Option<(KeyRecord, String)>,
    /// Set once the request passed admission (or the limiter failed open): from here on it is billed.
    admitted: Option<Admitted>,
    /// Headers describing the key's windows (from the limiter's exact state).
    rate_headers: Vec<(&'static str, String)>,
    answer: Answer,
    /// What the response cache did for the request, when it was in play.
    cache: Option<CacheUse>,
    /// Calls this request made to its key's object, and the rows they wrote.
    limiter_traffic: limiter::Traffic,
}

/// The response cache's part in a request.
enum CacheUse {
    /// Answered from the cache: billed $0, with the original answer's tokens.
    Hit { age_secs: u64, saved_cost_usd: f64 },
    /// Answered by the upstream: a whole answer (kept here once known) is stored as the plan says.
    Miss { plan: Plan, answer: Option<Value> },
}

/// What admission granted, and what billing needs to know about the request.
struct Admitted {
    /// `None` when the limiter could not be asked and the gateway failed open.
    reservation: Option<Reservation>,
    prompt_estimate: u64,
    asked: Asked,
    /// What the model read (messages, input, prompt), kept only with content capture on.
    captured_input: Option<Value>,
}

/// What the usage event records of the request itself.
#[derive(Debug, Clone, Copy)]
struct Asked {
    endpoint: Endpoint,
    temperature: Option<f64>,
    max_tokens: u32,
}

impl Asked {
    fn of(request: &ModelRequest) -> Asked {
        Asked { endpoint: request.endpoint, temperature: request.temperature, max_tokens: request.max_tokens }
    }
}

/// What the upstream's answer taught billing.
#[derive(Default)]
struct Answer {
    usage: Option<Usage>,
    /// Whether the upstream produced an answer whose work must be paid for even without a usage report.
    generated: bool,
    generated_chars: usize,
    finish_reason: Option<String>,
    generation_id: Option<String>,
    /// The answer's text, kept only with content capture on.
    completion_text: Option<String>,
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
    drain: Option<Duration>,
}

pub async fn handle(req: Request, env: Env, ctx: Context) -> Response {
    let started_ms = now_ms();
    // The method as sent: the `worker` crate maps methods it does not know to GET.
    let method = req.inner().method();
    let path = req.path();
    let client_request_id = header(&req, "x-client-request-id")
        .or_else(|| header(&req, "x-request-id"))
        .and_then(|id| respond::sane_request_id(Some(&id)).map(str::to_owned));
    let origin = header(&req, "origin");
    let preflight_headers = header(&req, "access-control-request-headers");
    let mut exchange = Exchange {
        started_ms,
        log: RequestLog {
            request_id: respond::new_request_id(random_bytes()),
            client_request_id,
            method,
            path,
            ..Default::default()
        },
        key: None,
        admitted: None,
        rate_headers: Vec::new(),
        answer: Answer::default(),
        cache: None,
        limiter_traffic: limiter::Traffic::default(),
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
        Route::Model(endpoint) => model_request(endpoint, req, env, config, exchange).await,
        Route::Models => list_models(&req, env, config, exchange).await,
        Route::ModelInfo(id) => model_info(&id, &req, env, config, exchange).await,
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
        Route::MethodNotAllowed { allowed } => Err(ApiError::method_not_allowed(&exchange.log.method, allowed)),
        Route::NotFound => Err(ApiError::not_found(&exchange.log.path)),
    }
}

/// A model API (chat completions, completions, responses, embeddings): the same stages for each.
async fn model_request(
    endpoint: Endpoint,
    mut req: Request,
    env: &Env,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<Reply, ApiError> {
    let key = authenticate(&req, env, config, exchange).await?;
    let client_signal = req.inner().signal();
    let cache_control = header(&req, "cache-control");
    let raw = read_body(&mut req, config.max_request_bytes, config.client_body_timeout_secs).await?;
    let request = validate::validate(endpoint, &raw, config)?;
    exchange.log.model = Some(request.model.clone());
    exchange.log.streamed = request.stream;
    let cache_plan = cache::plan(&request, &key, cache_control.as_deref(), config.response_cache_max_ttl_secs);
    if let Some(plan) = &cache_plan {
        if let Some(hit) = answer_from_cache(env, config, &key, &request, plan, exchange).await? {
            return Ok(hit);
        }
    }
    let prompt_estimate = admit::estimate_prompt_tokens(&request);
    let reserve = reservation_for(env, config, &key, &request, prompt_estimate).await?;
    admit(env, config, &key, &request, prompt_estimate, reserve, exchange).await?;
    if let Some(plan) = cache_plan {
        exchange.log.cache = Some("miss");
        exchange.cache = Some(CacheUse::Miss { plan, answer: None });
    }

    let mut upstream = forward::post(config, endpoint, &request.forward_body).await?;
    let status = upstream.response.status_code();
    exchange.log.upstream_status = Some(status);
    exchange.answer.generation_id = upstream.response.headers().get("x-generation-id").ok().flatten();
    if !(200..300).contains(&status) {
        return Err(forward::upstream_error(&mut upstream, config.upstream_timeout_secs).await);
    }
    exchange.answer.generated = true;
    if request.stream {
        let assemble = exchange.cache.is_some();
        stream_reply(upstream, client_signal, &request, config, exchange.started_ms, assemble)
    } else {
        body_reply(endpoint, &mut upstream, config, exchange).await
    }
}

/// Answers from the response cache when it holds a usable entry: the request is admitted like any other (its
/// rate limit, revocation, allowed models) but reserves nothing, and the stored answer is the reply — as stored,
/// or replayed as a stream. `Ok(None)`: a miss.
async fn answer_from_cache(
    env: &Env,
    config: &Config,
    key: &KeyRecord,
    request: &ModelRequest,
    plan: &Plan,
    exchange: &mut Exchange,
) -> Result<Option<Reply>, ApiError> {
    let Some(max_age_secs) = plan.policy.max_age_secs else { return Ok(None) };
    let now = now_ms();
    let Some(entry) = bindings::cached_answer(env, &plan.kv_key).await.filter(|e| e.usable(now, max_age_secs)) else {
        return Ok(None);
    };
    let served = entry.served();
    let body = served.to_string();
    let Ok(summary) = answer::read_body(request.endpoint, body.as_bytes()) else { return Ok(None) };
    exchange.cache = Some(CacheUse::Hit { age_secs: entry.age_secs(now), saved_cost_usd: entry.original_cost() });
    if let Err(refused) = admit(env, config, key, request, 0, Amount::default(), exchange).await {
        exchange.cache = None;
        return Err(refused);
    }
    exchange.log.cache = Some("hit");
    exchange.log.served_model = summary.served_model;
    let answer = &mut exchange.answer;
    answer.usage = summary.usage;
    answer.finish_reason = summary.finish_reason;
    if capture_content(config) {
        answer.completion_text = Some(summary.content);
    }
    if !request.stream {
        return Ok(Some(Reply::now(json_response(200, body))));
    }
    exchange.log.ttft_ms = Some(now_ms().saturating_sub(exchange.started_ms));
    let replayed = replay::stream(&served, request.include_usage);
    Ok(Some(Reply::now(
        ResponseBuilder::new().with_status(200).with_headers(sse_headers()).fixed(replayed.into_bytes()),
    )))
}

/// What the request may consume at most: its prompt estimate plus its output bound (`max_tokens × n`) in
/// tokens, and — for a key with a USD budget — that worst case priced at the dearest model that may serve it.
async fn reservation_for(
    env: &Env,
    config: &Config,
    key: &KeyRecord,
    request: &ModelRequest,
    prompt: u64,
) -> Result<Amount, ApiError> {
    let output = admit::output_bound(request);
    let tokens = prompt.saturating_add(output);
    if key.usd_limit.is_none() {
        return Ok(Amount { tokens, usd: 0.0 });
    }
    let prices = catalog::prices(env, config).await.unwrap_or_default();
    let usd = match (pricing::worst_case_usd(&prices, &request.models, prompt, output), config.unpriced_model) {
        (Ok(usd), _) => usd,
        (Err(_), UnpricedModel::Reserve(usd)) => usd,
        (Err(model), UnpricedModel::Refuse) => return Err(ApiError::model_price_unknown(model)),
    };
    Ok(Amount { tokens, usd })
}

/// Asks the key's Durable Object to reserve the request's worst case against every limit.
async fn admit(
    env: &Env,
    config: &Config,
    key: &KeyRecord,
    request: &ModelRequest,
    prompt_estimate: u64,
    reserve: Amount,
    exchange: &mut Exchange,
) -> Result<(), ApiError> {
    let unsettled = unsettled_event(exchange, key, request, prompt_estimate, reserve);
    let request_id = exchange.log.request_id.clone();
    let ask = limiter::Ask {
        control: admit::control_for(key, config),
        lease_id: request_id.replacen("req_", "lease_", 1),
        candidate: Candidate { request_id, models: request.models.clone(), reserve, unsettled_event: None },
        unsettled_event: Box::new(move |id, error| {
            serde_json::to_string(&UsageEvent {
                request_id: id.to_owned(),
                error: Some(error.to_owned()),
                ..unsettled.clone()
            })
            .ok()
        }),
    };
    let settings = limiter::Settings { timeout_ms: config.limiter_timeout_ms, lease_ms: config.admission_lease_ms };
    let asked_at = now_ms();
    let (answer, route, traffic) = limiter::admit(env, &key.id, ask, settings).await;
    exchange.log.limiter_ms = Some(now_ms().saturating_sub(asked_at));
    exchange.log.admission = Some(route.label());
    exchange.limiter_traffic.add(traffic);
    let reservation = match answer {
        Ok(Admission::Admitted { reservation, state, limits }) => {
            exchange.rate_headers = admit::rate_limit_headers(&state, limits.window_ms);
            Some(reservation)
        }
        Ok(Admission::Denied { reason, retry_after_ms, state, limits, model }) => {
            exchange.rate_headers = admit::rate_limit_headers(&state, limits.window_ms);
            return Err(admit::denial_error(
                reason,
                retry_after_ms,
                &limits,
                reserve,
                model.as_deref(),
                request.endpoint,
            ));
        }
        Err(e) => {
            log_error(e.label(), &e.to_string());
            if !config.limiter_fail_open {
                return Err(ApiError::unavailable(e.label(), "The rate limiter"));
            }
            admit_without_limiter(env, config, request, exchange).await?;
            None
        }
    };
    exchange.admitted = Some(Admitted {
        reservation,
        prompt_estimate,
        asked: Asked::of(request),
        captured_input: capture_content(config).then(|| serde_json::from_str(&request.input_json).ok()).flatten(),
    });
    Ok(())
}

/// `LIMITER_FAIL_OPEN`: quotas are not enforced while the key's object cannot be asked, but revocation and the
/// key's allowed models still are, from the key's row read now (not from the isolate's auth cache).
async fn admit_without_limiter(
    env: &Env,
    config: &Config,
    request: &ModelRequest,
    exchange: &Exchange,
) -> Result<(), ApiError> {
    let Some((_, hash)) = &exchange.key else { return Err(auth::invalid_key()) };
    let fresh = bindings::find_active_key_uncached(env, config, hash)
        .await?
        .ok_or_else(|| ApiError::invalid_api_key("This API key has been revoked."))?;
    match admit::control_for(&fresh, config).forbidden_model(&request.models) {
        Some(model) => Err(ApiError::model_not_allowed(model)),
        None => Ok(()),
    }
}

/// The usage event the key's object bills if this request is never settled: charged as reserved.
fn unsettled_event(
    exchange: &Exchange,
    key: &KeyRecord,
    request: &ModelRequest,
    prompt_estimate: u64,
    reserve: Amount,
) -> UsageEvent {
    let usage = Usage {
        prompt_tokens: prompt_estimate,
        completion_tokens: reserve.tokens.saturating_sub(prompt_estimate),
        cost: Some(reserve.usd),
        ..Usage::default()
    };
    UsageEvent {
        error: Some("unsettled".to_owned()),
        status: 0,
        ..usage_event(exchange, key, Asked::of(request), usage, UsageSource::Reserved, None)
    }
}

fn capture_content(config: &Config) -> bool {
    config.posthog.as_ref().is_some_and(|p| p.capture_content)
}

/// Non-streamed: read the whole answer, learn its usage, hand the same bytes to the client.
async fn body_reply(
    endpoint: Endpoint,
    upstream: &mut Upstream,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<Reply, ApiError> {
    let bytes = forward::read_body(upstream, config.upstream_timeout_secs).await?;
    let completion = answer::read_body(endpoint, &bytes)?;
    exchange.log.served_model = completion.served_model;
    let answer = &mut exchange.answer;
    answer.usage = completion.usage;
    answer.generated_chars = completion.generated_chars;
    answer.finish_reason = completion.finish_reason;
    answer.generation_id = answer.generation_id.take().or(completion.generation_id);
    if capture_content(config) {
        answer.completion_text = Some(completion.content);
    }
    if let Some(CacheUse::Miss { answer, .. }) = &mut exchange.cache {
        *answer = serde_json::from_slice(&bytes).ok();
    }
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    copy_generation_id(&upstream.response, &headers);
    Ok(Reply::now(ResponseBuilder::new().with_status(200).with_headers(headers).fixed(bytes)))
}

/// Streamed: answer at once with the client side of a relay; the relay itself runs in `finish`.
fn stream_reply(
    upstream: Upstream,
    client_signal: web_sys::AbortSignal,
    request: &ModelRequest,
    config: &Config,
    started_ms: u64,
    assemble: bool,
) -> Result<Reply, ApiError> {
    let Upstream { response, abort } = upstream;
    let worker::ResponseBody::Stream(body) = response.body() else {
        return Err(ApiError::upstream_malformed());
    };
    let scanner = SseScanner::new(request.endpoint, request.include_usage, capture_content(config));
    let scanner = if assemble { scanner.assembling() } else { scanner };
    // A chat or legacy stream that needs no edit (the client asked for the usage chunk) goes on the runtime's
    // own pipe. A Responses stream is never edited, but is relayed by the gateway all the same: only that
    // relay can end a cut-off stream with `response.failed`, which its SDKs need to tell it from a whole one.
    let native = request.include_usage && request.endpoint != Endpoint::Responses;
    let delivery = if native { Delivery::Native } else { Delivery::Edited };
    let relay = Relay::new(body, delivery, abort, client_signal, scanner, started_ms)?;
    let headers = sse_headers();
    copy_generation_id(&response, &headers);
    let client = ResponseBuilder::new().with_status(200).with_headers(headers).stream(relay.client_body.clone());
    let job = StreamJob {
        relay,
        idle_timeout_secs: config.upstream_timeout_secs,
        drain: config.drain_on_client_abort.then(|| Duration::from_secs(config.drain_timeout_secs)),
    };
    Ok(Reply { response: client, stream: Some(job) })
}

/// After the response is handed over: relay the stream (if any), settle the reservation, enqueue the usage
/// event, write the log line. Runs for every request, whatever happened to it; every wait in it is bounded.
async fn finish(env: Env, config: Rc<Config>, mut exchange: Exchange, stream: Option<StreamJob>) {
    if let Some(job) = stream {
        exchange.log.relay = Some(job.relay.delivery.label());
        let outcome = job.relay.run(job.idle_timeout_secs, job.drain).await;
        record_stream(&mut exchange, outcome);
    }
    if let Some(usage) = &exchange.answer.usage {
        exchange.log.prompt_tokens = Some(usage.prompt_tokens);
        exchange.log.completion_tokens = Some(usage.completion_tokens);
    }
    exchange.log.latency_ms = now_ms().saturating_sub(exchange.started_ms);
    if let (Some((key, _)), Some(admitted)) = (exchange.key.take(), exchange.admitted.take()) {
        let (usage, source) = billed_usage(&env, &config, &exchange, &admitted).await;
        let mut event = usage_event(&exchange, &key, admitted.asked, usage, source, admitted.captured_input.as_ref());
        if let Some(reservation) = admitted.reservation {
            event.admitted_at_ms = reservation.admitted_at_ms;
            // A cache hit reserved nothing and used nothing of the key's tokens or budget.
            let used = if event.cache_hit { Amount::default() } else { admit::actual_amount(&usage) };
            let traffic = reservation.settle(&env, used, config.limiter_timeout_ms).await;
            exchange.limiter_traffic.add(traffic);
        }
        enqueue(&env, &event).await;
        store_in_cache(&env, &mut exchange).await;
        let traffic = limiter::report_leases(&env, &key.id, config.limiter_timeout_ms).await;
        exchange.limiter_traffic.add(traffic);
    }
    if exchange.limiter_traffic != limiter::Traffic::default() {
        exchange.log.limiter_calls = Some(exchange.limiter_traffic.calls);
        exchange.log.limiter_rows = Some(exchange.limiter_traffic.rows_written);
    }
    worker::console_log!("{}", exchange.log.to_line());
}

/// Stores a miss's answer, if the request was whole (complete, successful, with its usage) and fits in KV.
async fn store_in_cache(env: &Env, exchange: &mut Exchange) {
    let Some(CacheUse::Miss { plan, answer }) = &mut exchange.cache else { return };
    let stored = match answer.take().filter(|answer| cache::storable(plan.endpoint, answer)) {
        None => Stored::Incomplete,
        Some(answer) => match Entry::new(answer, now_ms(), plan.policy.ttl_secs).encode() {
            None => Stored::TooLarge,
            Some(entry) => match bindings::store_answer(env, &plan.kv_key, entry, plan.policy.ttl_secs).await {
                true => Stored::Stored,
                false => Stored::WriteFailed,
            },
        },
    };
    exchange.log.cache_store = Some(stored.label());
}

/// What the request is billed: the upstream's usage report, else an estimate of what was generated (priced at
/// the serving model's price when known; reconciliation corrects it later), else nothing if the upstream never
/// answered.
async fn billed_usage(env: &Env, config: &Config, exchange: &Exchange, admitted: &Admitted) -> (Usage, UsageSource) {
    let answer = &exchange.answer;
    if answer.usage.is_some() || !answer.generated {
        return usage_event::usage_for(answer.usage.as_ref(), None);
    }
    let model = exchange.log.served_model.as_deref().or(exchange.log.model.as_deref()).unwrap_or_default();
    let price = catalog::prices(env, config).await.and_then(|prices| prices.get(model).copied());
    let estimate = Estimate {
        prompt_tokens: admitted.prompt_estimate,
        completion_tokens: admit::estimate_completion_tokens(answer.generated_chars),
        price,
    };
    usage_event::usage_for(None, Some(estimate))
}

fn usage_event(
    exchange: &Exchange,
    key: &KeyRecord,
    asked: Asked,
    usage: Usage,
    source: UsageSource,
    captured_input: Option<&Value>,
) -> UsageEvent {
    let answer = &exchange.answer;
    let content =
        captured_input.map(|input| usage_event::capture(input, answer.completion_text.as_deref().unwrap_or_default()));
    let saved_cost_usd = match exchange.cache {
        Some(CacheUse::Hit { saved_cost_usd, .. }) => Some(saved_cost_usd),
        _ => None,
    };
    UsageEvent {
        request_id: exchange.log.request_id.clone(),
        client_request_id: exchange.log.client_request_id.clone(),
        generation_id: answer.generation_id.clone(),
        admitted_at_ms: 0,
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
        finish_reason: answer.finish_reason.clone(),
        error: exchange.log.error.map(str::to_owned),
        timestamp_ms: exchange.started_ms,
        endpoint: asked.endpoint,
        temperature: asked.temperature,
        max_tokens: asked.max_tokens,
        cache_hit: saved_cost_usd.is_some(),
        saved_cost_usd: saved_cost_usd.unwrap_or(0.0),
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
    Ok(Reply::now(json_response(200, catalog::model_list(env, config).await?)))
}

/// `GET /v1/models/{id}`: one model of the same (cached) list, or OpenAI's 404 `model_not_found`.
async fn model_info(
    id: &str,
    req: &Request,
    env: &Env,
    config: &Config,
    exchange: &mut Exchange,
) -> Result<Reply, ApiError> {
    let key = authenticate(req, env, config, exchange).await?;
    admin::key_state(env, config, &key).await?;
    let list = catalog::model_list(env, config).await?;
    let model = models::find(&list, id).ok_or_else(|| ApiError::model_not_found(id))?;
    Ok(Reply::now(json_response(200, model)))
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
    exchange.key = Some((record.clone(), hash));
    Ok(record)
}

/// Reads the body within `timeout_secs`, refusing early (by `Content-Length`) or as soon as it grows past the
/// limit.
async fn read_body(req: &mut Request, limit: usize, timeout_secs: u64) -> Result<Vec<u8>, ApiError> {
    let declared = header(req, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut stream = req.stream().map_err(|_| ApiError::invalid_request("The request body could not be read."))?;
    let read = async {
        let mut body = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| ApiError::invalid_request("The request body could not be read."))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::payload_too_large(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    within(Duration::from_secs(timeout_secs), read).await.unwrap_or_else(|| Err(ApiError::body_timeout(timeout_secs)))
}

fn record_stream(exchange: &mut Exchange, outcome: RelayOutcome) {
    if let Some(CacheUse::Miss { answer, .. }) = &mut exchange.cache {
        *answer = outcome.answer;
    }
    let summary = outcome.summary;
    let log = &mut exchange.log;
    log.served_model = summary.served_model;
    log.ttft_ms = outcome.ttft_ms;
    log.stream_end = Some(outcome.end.label());
    log.wasm_bytes_in = Some(outcome.bytes_in);
    log.wasm_bytes_out = Some(outcome.bytes_rewritten);
    log.copy_reads = Some(outcome.reads);
    if outcome.end != StreamEnd::Done {
        log.error = Some(outcome.end.label());
    }
    let answer = &mut exchange.answer;
    answer.usage = summary.usage;
    answer.generated_chars = summary.completion_chars;
    answer.finish_reason = summary.finish_reason;
    answer.completion_text = summary.completion_text;
    answer.generation_id = answer.generation_id.take().or(summary.generation_id);
}

/// An error as an OpenAI error body, with every header it implies (`Retry-After`, `x-should-retry`, `Allow`).
fn error_response(error: &ApiError) -> Response {
    let mut response = json_response(error.status, error.body_json());
    set_headers(response.headers_mut(), &error.headers());
    response
}

fn json_response(status: u16, body: String) -> Response {
    let headers = Headers::new();
    set_headers(&headers, &[("content-type", "application/json".to_owned())]);
    ResponseBuilder::new().with_status(status).with_headers(headers).fixed(body.into_bytes())
}

/// Adds what every response carries: security headers, CORS, rate-limit state, the request ids, no HTTP caching,
/// and what the response cache did (`x-cache: HIT` with `age`, or `x-cache: MISS`).
fn decorate(mut response: Response, exchange: &Exchange, cors_headers: &[(&'static str, String)]) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        let _ = headers.set(name, value);
    }
    if !headers.has("cache-control").unwrap_or(false) {
        let _ = headers.set("cache-control", "no-store");
    }
    let _ = headers.set("x-request-id", &exchange.log.request_id);
    if let Some(client_id) = &exchange.log.client_request_id {
        let _ = headers.set("x-client-request-id", client_id);
    }
    set_headers(headers, cors_headers);
    set_headers(headers, &exchange.rate_headers);
    match &exchange.cache {
        Some(CacheUse::Hit { age_secs, .. }) => {
            set_headers(headers, &[("x-cache", "HIT".to_owned()), ("age", age_secs.to_string())])
        }
        Some(CacheUse::Miss { .. }) => set_headers(headers, &[("x-cache", "MISS".to_owned())]),
        None => {}
    }
    response
}

/// The headers of an SSE stream (relayed or replayed).
fn sse_headers() -> Headers {
    let headers = Headers::new();
    set_headers(
        &headers,
        &[("content-type", "text/event-stream; charset=utf-8".to_owned()), ("cache-control", "no-cache".to_owned())],
    );
    headers
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
