//! The model catalog: OpenRouter's model list in OpenAI's shape, cached in KV for `CACHE_TTL_SECONDS` (a stale
//! copy stands in while the upstream is down), and its prices, parsed once per isolate for USD reservations and
//! for pricing estimates.

use std::cell::RefCell;
use std::rc::Rc;

use worker::Env;

use crate::bindings::{self, log_error, now_ms};
use crate::config::Config;
use crate::error::ApiError;
use crate::forward;
use crate::models::{self, CachedModels};
use crate::pricing::{self, PriceTable};

/// Prices are re-read at most this often (model prices change rarely; the list's own TTL may be 0).
const MIN_PRICES_TTL_MS: u64 = 60_000;

thread_local! {
    static PRICES: RefCell<Option<(u64, Rc<PriceTable>)>> = const { RefCell::new(None) };
}

/// The OpenAI-shaped model list: fresh from KV, else from the upstream (and stored), else a stale copy.
pub async fn model_list(env: &Env, config: &Config) -> Result<String, ApiError> {
    let ttl = config.models_cache_ttl_secs;
    let cached = if ttl > 0 { bindings::cached_models(env).await } else { None };
    let now = now_ms();
    if let Some(fresh) = cached.as_ref().filter(|c| c.is_fresh(now, ttl)) {
        return Ok(fresh.body.clone());
    }
    let fetched = fetch_lists(config).await;
    match (fetched, cached) {
        (Ok(body), _) => {
            if ttl > 0 {
                bindings::store_models(env, &CachedModels { fetched_at_ms: now, body: body.clone() }, ttl).await;
            }
            Ok(body)
        }
        (Err(e), Some(stale)) => {
            log_error("models_served_stale", e.label);
            Ok(stale.body)
        }
        (Err(e), None) => Err(e),
    }
}

/// Every model's price, as this isolate last read them. `None` only when no list could be had at all.
/// OpenRouter lists text models at `/models` and embedding models at `/embeddings/models`; the gateway serves
/// (and prices) both as one list, as OpenAI's `/v1/models` does. Without the embeddings list (an upstream that
/// does not serve it, or fails to) the text models are served alone.
async fn fetch_lists(config: &Config) -> Result<String, ApiError> {
    let (models, embeddings) =
        futures_util::join!(forward::get_models(config, "models"), forward::get_models(config, "embeddings/models"));
    let models = models?;
    let embeddings = embeddings.map_err(|e| log_error("embedding_models_unavailable", e.label)).ok();
    let lists: Vec<&[u8]> = [Some(models.as_slice()), embeddings.as_deref()].into_iter().flatten().collect();
    models::to_openai_list(&lists).ok_or_else(ApiError::upstream_malformed)
}

pub async fn prices(env: &Env, config: &Config) -> Option<Rc<PriceTable>> {
    let now = now_ms();
    let ttl_ms = (config.models_cache_ttl_secs * 1000).max(MIN_PRICES_TTL_MS);
    let held = PRICES.with(|p| p.borrow().clone());
    if let Some((_, table)) = held.as_ref().filter(|(at, _)| now.saturating_sub(*at) < ttl_ms) {
        return Some(table.clone());
    }
    match model_list(env, config).await {
        Ok(body) => {
            let table = Rc::new(pricing::price_table(&body));
            PRICES.with(|p| *p.borrow_mut() = Some((now, table.clone())));
            Some(table)
        }
        Err(e) => {
            log_error("model_prices_unavailable", e.label);
            held.map(|(_, table)| table)
        }
    }
}
