//! The only code that touches the Workers runtime's bindings and globals: env, D1, KV, Queues, clock,
//! randomness, timers, and the per-isolate state (validated config, auth cache). The key's Durable Object is
//! `limiter`'s, the Hyperdrive connection `store::postgres`'. Every wait on a binding has a deadline.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use wasm_bindgen::prelude::*;
use worker::{Env, Error};

use crate::auth::AuthCache;
use crate::cache;
use crate::config::{Config, ConfigError};
use crate::error::ApiError;
use crate::keys::KeyRecord;
use crate::models::{CachedModels, KV_MIN_TTL_SECS};

pub const DB: &str = "DB";
pub const CACHE: &str = "CACHE";

const MODELS_CACHE_KEY: &str = "models:v1";

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(buf: &mut [u8]);
}

pub fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

/// Runs `future`, or gives up after `limit` (`None`). Dropping the future abandons the wait; whoever needs the
/// work itself stopped (an upstream request) aborts it.
pub async fn within<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    let future = std::pin::pin!(future);
    match select(future, worker::Delay::from(limit)).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(_) => None,
    }
}

/// D1, Postgres, KV and Queue calls: generous for a busy platform, short enough that nothing waits forever.
const BINDING_TIMEOUT: Duration = Duration::from_secs(10);

/// A binding call bounded by [`BINDING_TIMEOUT`]; a timeout is an error like any other.
async fn bounded<T, F: Future<Output = Result<T, Error>>>(what: &str, future: F) -> Result<T, Error> {
    within(BINDING_TIMEOUT, future)
        .await
        .unwrap_or_else(|| Err(Error::RustError(format!("{what} timed out after {} s", BINDING_TIMEOUT.as_secs()))))
}

/// Cryptographically secure random bytes (`crypto.getRandomValues`).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    get_random_values(&mut buf);
    buf
}

thread_local! {
    static CONFIG: RefCell<Option<Rc<Config>>> = const { RefCell::new(None) };
    static AUTH_CACHE: RefCell<Option<AuthCache>> = const { RefCell::new(None) };
    /// Usage events waiting for this isolate's next queue batch.
    static PENDING_EVENTS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The validated configuration, parsed once per isolate (vars and secrets do not change under a running isolate).
pub fn config(env: &Env) -> Result<Rc<Config>, ApiError> {
    if let Some(config) = CONFIG.with(|c| c.borrow().clone()) {
        return Ok(config);
    }
    let config = Config::from_lookup(|name| env_string(env, name)).map_err(|e: ConfigError| {
        log_error("config_invalid", &e.to_string());
        ApiError::internal("config_invalid")
    })?;
    let config = Rc::new(config);
    CONFIG.with(|c| *c.borrow_mut() = Some(config.clone()));
    Ok(config)
}

/// A var or secret as a string (numbers given with `--var` arrive as JS numbers).
fn env_string(env: &Env, name: &str) -> Option<String> {
    let value = js_sys::Reflect::get(env.as_ref(), &JsValue::from_str(name)).ok()?;
    value
        .as_string()
        .or_else(|| value.as_f64().map(|n| n.to_string()))
        .or_else(|| value.as_bool().map(|b| b.to_string()))
}

/// The active key with this hash, through the isolate's auth cache.
pub async fn find_active_key(env: &Env, config: &Config, hash: &str) -> Result<Option<KeyRecord>, ApiError> {
    let now = now_ms();
    let cached = AUTH_CACHE.with(|c| c.borrow().as_ref().and_then(|cache| cache.get(hash, now)));
    if let Some(answer) = cached {
        return Ok(answer);
    }
    let found = find_active_key_uncached(env, config, hash).await?;
    AUTH_CACHE.with(|c| {
        c.borrow_mut()
            .get_or_insert_with(|| AuthCache::new(config.auth_cache_ttl_secs, config.auth_cache_max_entries))
            .put(hash.to_owned(), found.clone(), now)
    });
    Ok(found)
}

/// The active key with this hash, read from the key store now (what the request path uses when the key's
/// Durable Object, which knows of revocations first, cannot be asked).
pub async fn find_active_key_uncached(env: &Env, config: &Config, hash: &str) -> Result<Option<KeyRecord>, ApiError> {
    crate::store::Store::open(env, config).active_key(hash).await.map_err(|e| {
        log_error("key_lookup_failed", &e.to_string());
        ApiError::unavailable("auth_unavailable", "API key verification")
    })
}

/// The cached model list, fresh or not (the caller decides; a stale list beats an error when upstream is down).
pub async fn cached_models(env: &Env) -> Option<CachedModels> {
    let kv = env.kv(CACHE).ok()?;
    match bounded("KV read", async { kv.get(MODELS_CACHE_KEY).json::<CachedModels>().await.map_err(Error::from) }).await
    {
        Ok(found) => found,
        Err(e) => {
            log_error("kv_read_failed", &e.to_string());
            None
        }
    }
}

pub async fn store_models(env: &Env, models: &CachedModels, ttl_secs: u64) {
    let Ok(kv) = env.kv(CACHE) else { return };
    let Ok(body) = serde_json::to_string(models) else { return };
    // Keep the entry past its freshness so it can stand in while the upstream is down.
    let expiration = ttl_secs.max(KV_MIN_TTL_SECS) + 3600;
    let put = match kv.put(MODELS_CACHE_KEY, body) {
        Ok(put) => {
            bounded("KV write", async { put.expiration_ttl(expiration).execute().await.map_err(Error::from) }).await
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = put {
        log_error("kv_write_failed", &e.to_string());
    }
}

/// How long a response-cache lookup may take; a slower one is a miss (the request goes upstream).
const CACHE_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The response cache's entry under `kv_key`, if KV has one. A read that fails, is slow or finds something
/// unreadable is a miss (and logged): the cache never fails a request.
pub async fn cached_answer(env: &Env, kv_key: &str) -> Option<cache::Entry> {
    let kv = env.kv(CACHE).ok()?;
    let read = async { kv.get(kv_key).json::<cache::Entry>().await.map_err(Error::from) };
    match within(CACHE_READ_TIMEOUT, read).await {
        Some(Ok(found)) => found,
        Some(Err(e)) => {
            log_error("cache_read_failed", &e.to_string());
            None
        }
        None => {
            log_error("cache_read_failed", &format!("no answer within {} ms", CACHE_READ_TIMEOUT.as_millis()));
            None
        }
    }
}

/// Stores an encoded entry for `ttl_secs` (KV keeps anything at least 60 s; the entry carries its own expiry).
/// Returns whether KV took it.
pub async fn store_answer(env: &Env, kv_key: &str, entry: String, ttl_secs: u64) -> bool {
    let Ok(kv) = env.kv(CACHE) else { return false };
    let put = match kv.put(kv_key, entry) {
        Ok(put) => {
            let expiration = ttl_secs.max(KV_MIN_TTL_SECS);
            bounded("KV write", async { put.expiration_ttl(expiration).execute().await.map_err(Error::from) }).await
        }
        Err(e) => Err(e.into()),
    };
    put.map_err(|e| log_error("cache_write_failed", &e.to_string())).is_ok()
}

/// One structured error line for operators (`wrangler tail`); `detail` must never hold a secret.
pub fn log_error(label: &str, detail: &str) {
    let line = serde_json::json!({"level": "error", "event": label, "detail": detail});
    worker::console_error!("{line}");
}

/// Runs one D1 statement; returns the rows it wrote, as D1 bills them (indexes included). Every statement the gateway writes with is
/// idempotent (ledger inserts ignore conflicts, updates set values, a key's id is chosen before the insert), so a
/// transient failure is tried again like a read's.
pub async fn d1_run(env: &Env, sql: &str, params: &[JsValue]) -> Result<u64, Error> {
    let run = || async {
        let result = env.d1(DB)?.prepare(sql).bind(params)?.run().await?;
        if let Some(error) = result.error() {
            return Err(Error::RustError(error));
        }
        Ok(result.meta()?.and_then(|m| m.rows_written).map_or(0, |c| c as u64))
    };
    retried("D1 statement", run).await
}

/// Runs a D1 query and decodes every row.
pub async fn d1_rows<T: serde::de::DeserializeOwned>(
    env: &Env,
    sql: &str,
    params: &[JsValue],
) -> Result<Vec<T>, Error> {
    let query = || async { env.d1(DB)?.prepare(sql).bind(params)?.all().await?.results::<T>() };
    retried("D1 query", query).await
}

/// Pauses before the second and third try of a store call.
const STORE_RETRIES_MS: [u64; 2] = [25, 150];

/// A store call (D1 or Postgres), each try bounded, tried again after a transient failure (a busy database, a
/// lost connection: the next try does not meet it). Only for idempotent statements.
pub async fn retried<T, F, Fut>(what: &str, call: F) -> Result<T, Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut result = bounded(what, call()).await;
    for pause_ms in STORE_RETRIES_MS {
        let Err(e) = &result else { break };
        log_error("store_call_retried", &format!("{what}: {e}"));
        worker::Delay::from(Duration::from_millis(pause_ms)).await;
        result = bounded(what, call()).await;
    }
    result
}

/// A D1 parameter: a string, or NULL.
pub fn text_param(value: Option<&str>) -> JsValue {
    value.map_or(JsValue::NULL, JsValue::from_str)
}

/// A D1 parameter: a number, or NULL.
pub fn number_param(value: Option<f64>) -> JsValue {
    value.map_or(JsValue::NULL, JsValue::from_f64)
}

/// The current time as RFC 3339 with milliseconds — the format of every timestamp column.
pub fn iso_time(ms: u64) -> String {
    js_sys::Date::new(&JsValue::from_f64(ms as f64)).to_iso_string().into()
}

pub const USAGE_EVENTS: &str = "USAGE_EVENTS";

/// How long the first event of a batch waits for others from this isolate before the batch is sent.
const EVENT_BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(20);
/// `sendBatch` takes at most 100 messages and 256 KB.
const MAX_BATCH_MESSAGES: usize = 100;
const MAX_BATCH_BYTES: usize = 200 * 1024;

/// Enqueues a usage event (a JSON string). Events from one isolate travel in batches: the first event of a batch
/// waits briefly for others, then sends them all with one `sendBatch` (retried a few times). Returns the events
/// that could not be sent, for the caller to log in full — nothing is lost silently.
pub async fn enqueue_usage(env: &Env, event_json: String) -> Result<(), (Error, Vec<String>)> {
    let first = PENDING_EVENTS.with(|p| {
        let mut pending = p.borrow_mut();
        pending.push(event_json);
        pending.len() == 1
    });
    if !first {
        return Ok(()); // the batch's first event sends it
    }
    worker::Delay::from(EVENT_BATCH_DELAY).await;
    let events = PENDING_EVENTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let queue = match env.queue(USAGE_EVENTS) {
        Ok(queue) => queue,
        Err(e) => return Err((e, events)),
    };
    let mut failed = Vec::new();
    let mut last_error = None;
    for batch in batches(&events) {
        if let Err(e) = send_batch(&queue, batch, 0).await {
            failed.extend(batch.iter().cloned());
            last_error = Some(e);
        }
    }
    match last_error {
        None => Ok(()),
        Some(e) => Err((e, failed)),
    }
}

/// Splits events into `sendBatch`-sized groups.
fn batches(events: &[String]) -> Vec<&[String]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, event) in events.iter().enumerate() {
        if i > start && (i - start == MAX_BATCH_MESSAGES || bytes + event.len() > MAX_BATCH_BYTES) {
            groups.push(&events[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += event.len();
    }
    if start < events.len() {
        groups.push(&events[start..]);
    }
    groups
}

/// Sends messages to the usage queue now, to be delivered after `delay_secs` (the consumer's reconciliation jobs).
pub async fn send_delayed(env: &Env, messages: &[String], delay_secs: u32) -> Result<(), Error> {
    let queue = env.queue(USAGE_EVENTS)?;
    for batch in batches(messages) {
        send_batch(&queue, batch, delay_secs).await?;
    }
    Ok(())
}

/// One `sendBatch` (tried three times), delivered after `delay_secs`.
async fn send_batch(queue: &worker::Queue, events: &[String], delay_secs: u32) -> Result<(), Error> {
    let mut last_error = None;
    for delay_ms in [0u64, 100, 500] {
        if delay_ms > 0 {
            worker::Delay::from(std::time::Duration::from_millis(delay_ms)).await;
        }
        let messages: Vec<_> = events
            .iter()
            .map(|e| {
                worker::RawMessageBuilder::new(JsValue::from_str(e))
                    .delay_seconds(delay_secs)
                    .build_with_content_type(worker::QueueContentType::Text)
            })
            .collect();
        match bounded("queue send", queue.send_raw_batch(messages)).await {
            Ok(()) => return Ok(()),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| Error::RustError("queue send failed".into())))
}
