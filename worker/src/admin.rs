//! The admin API (`/admin/*`, behind `ADMIN_API_KEY`) and the key owner's `GET /v1/usage`.
//!
//! Changes to a key are written to the key store (`store`) and then pushed to the key's Durable Object, which
//! every admission consults: a revocation or a new limit applies to the next request everywhere, without waiting
//! for any cache. When the object cannot be told (after a few tries), the caller gets a 503 saying so: the change
//! is saved, and repeating the request is safe.

use key_limiter::protocol::{KeyControl, Period, StateResponse};
use serde_json::{json, Value};
use worker::{Env, Request};

use crate::admit;
use crate::bindings::{self, log_error, now_ms, random_bytes};
use crate::config::Config;
use crate::error::ApiError;
use crate::keys::{self, KeyFields, KeyRecord, KeyRow, KeyView};
use crate::limiter;
use crate::routes::AdminRoute;
use crate::store::Store;
use crate::usage_report::{self, GroupBy, UsageFilter, UsageRow};

const MAX_PAGE: u64 = 100;
const DEFAULT_PAGE: u64 = 20;

/// What an admin handler answers: a status and a body (JSON, or CSV for billing exports).
pub enum AdminReply {
    Json(u16, Value),
    Csv(String),
}

/// Checks the admin key, then runs the admin route. Without `ADMIN_API_KEY` the admin API does not exist (404).
pub async fn handle(
    route: &AdminRoute,
    req: &mut Request,
    env: &Env,
    config: &Config,
    path: &str,
) -> Result<AdminReply, ApiError> {
    let Some(admin_key) = &config.admin_api_key else {
        return Err(ApiError::not_found(path));
    };
    let presented = req.headers().get("authorization").ok().flatten();
    let presented = presented.as_deref().and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
    if !keys::admin_key_matches(presented.unwrap_or_default(), admin_key.expose()) {
        return Err(ApiError::invalid_api_key("Invalid admin API key."));
    }
    let store = Store::open(env, config);
    match route {
        AdminRoute::CreateKey => create_key(&body(req, config).await?, &store).await,
        AdminRoute::ListKeys => list_keys(&query(req)?, &store).await,
        AdminRoute::GetKey(id) => Ok(AdminReply::Json(200, json!(load_key(&store, checked_id(id)?).await?))),
        AdminRoute::UpdateKey(id) => {
            let fields = keys::parse_fields(&body(req, config).await?, false)?;
            apply_update(checked_id(id)?, fields, &store, env, config).await
        }
        AdminRoute::RevokeKey(id) => {
            let fields = KeyFields { active: Some(false), ..KeyFields::default() };
            apply_update(checked_id(id)?, fields, &store, env, config).await
        }
        AdminRoute::Usage => usage(&query(req)?, &store).await,
    }
}

/// Creates a key; its plaintext is in this response only. (Its Durable Object learns its limits at first use.)
async fn create_key(raw: &[u8], store: &Store) -> Result<AdminReply, ApiError> {
    let fields = keys::parse_fields(raw, true)?;
    let (id, plaintext) = keys::new_key(random_bytes(), random_bytes());
    store
        .insert_key(&id, &crate::auth::key_hash(&plaintext), &fields, now_ms())
        .await
        .map_err(|e| storage_error("key_create_failed", &e))?;
    let mut view = load_key(store, &id).await?;
    view.key = Some(plaintext);
    Ok(AdminReply::Json(201, json!(view)))
}

/// Writes the changed columns, then tells the key's Durable Object (see the module docs).
async fn apply_update(
    id: &str,
    fields: KeyFields,
    store: &Store,
    env: &Env,
    config: &Config,
) -> Result<AdminReply, ApiError> {
    load_key(store, id).await?;
    store.update_key(id, &fields, now_ms()).await.map_err(|e| storage_error("key_update_failed", &e))?;

    let row = load_row(store, id).await?;
    tell_limiter(env, config, &row).await?;
    Ok(AdminReply::Json(200, json!(KeyView::from_row(row))))
}

/// Pushes the key's new control to its Durable Object; an error if it could not be told.
async fn tell_limiter(env: &Env, config: &Config, row: &KeyRow) -> Result<(), ApiError> {
    let control = KeyControl { revoked: row.active != 1, ..admit::control_for(&row.record(), config) };
    limiter::configure(env, &row.id, &control, config.limiter_timeout_ms).await.map_err(|e| {
        log_error("limiter_configure_failed", &format!("key {}: {e}", row.id));
        ApiError::limiter_not_told(&row.id)
    })
}

async fn list_keys(query: &[(String, String)], store: &Store) -> Result<AdminReply, ApiError> {
    let limit = match param(query, "limit") {
        None => DEFAULT_PAGE,
        Some(raw) => raw.parse::<u64>().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| {
            ApiError::invalid_param("limit", format!("'limit' must be an integer from 1 to {MAX_PAGE}."))
        })?,
    };
    let cursor = match param(query, "cursor") {
        Some(c) => Some(checked_id(c)?),
        None => None,
    };
    let user_id = param(query, "user_id");
    let mut rows = store.keys(cursor, user_id, limit + 1).await.map_err(|e| storage_error("key_list_failed", &e))?;
    let has_more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if has_more { rows.last().map(|r| r.id.clone()) } else { None };
    let data: Vec<KeyView> = rows.into_iter().map(KeyView::from_row).collect();
    Ok(AdminReply::Json(200, json!({"object": "list", "data": data, "has_more": has_more, "next_cursor": next_cursor})))
}

async fn usage(query: &[(String, String)], store: &Store) -> Result<AdminReply, ApiError> {
    let group_by = GroupBy::parse(param(query, "group_by"))?;
    let filter = UsageFilter {
        user_id: param(query, "user_id").map(str::to_owned),
        key_id: param(query, "key_id").map(|id| checked_id(id).map(str::to_owned)).transpose()?,
        from: usage_report::parse_time_bound("from", param(query, "from"))?,
        to: usage_report::parse_time_bound("to", param(query, "to"))?,
    };
    let csv = match param(query, "format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid_param("format", "'format' must be json or csv.")),
    };
    let rows = aggregate(store, group_by, &filter).await?;
    if csv {
        return Ok(AdminReply::Csv(usage_report::to_csv(group_by, &rows)));
    }
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({group_by.column_name(): r.grp, "requests": r.requests, "input_tokens": r.input_tokens,
                   "output_tokens": r.output_tokens, "cached_tokens": r.cached_tokens, "cost_usd": r.cost_usd,
                   "cache_hits": r.cache_hits, "saved_cost_usd": r.saved_cost_usd})
        })
        .collect();
    Ok(AdminReply::Json(200, json!({"object": "usage_report", "group_by": group_by.column_name(), "data": data})))
}

async fn aggregate(store: &Store, group_by: GroupBy, filter: &UsageFilter) -> Result<Vec<UsageRow>, ApiError> {
    store.usage(group_by, filter).await.map_err(|e| storage_error("usage_query_failed", &e))
}

/// `GET /v1/usage` for the key in the request: its limits, where its windows stand (from its Durable Object) and
/// its usage in the current budget period (from the ledger).
pub async fn own_usage(key: &KeyRecord, env: &Env, config: &Config) -> Result<Value, ApiError> {
    let state = key_state(env, config, key).await?;
    let limits = &state.limits;
    let period = limits.budget.as_ref().map_or(Period::Lifetime, |b| b.period);
    let period_key = key_limiter::quota::period_key(now_ms(), period);
    let from = (period != Period::Lifetime).then_some(period_key.clone());
    let filter = UsageFilter { key_id: Some(key.id.clone()), from, ..UsageFilter::default() };
    let totals = aggregate(&Store::open(env, config), GroupBy::Total, &filter).await?.into_iter().next();
    let window = |w: &key_limiter::protocol::WindowState| json!({"limit": w.limit, "remaining": w.remaining, "reset_seconds": w.reset_ms as f64 / 1000.0});
    Ok(json!({
        "object": "key_usage",
        "key_id": key.id,
        "user_id": key.user_id,
        "limits": {
            "requests_per_window": limits.requests_per_window,
            "tokens_per_window": limits.tokens_per_window,
            "window_seconds": limits.window_ms / 1000,
            "max_concurrency": limits.max_concurrency,
            "budget": limits.budget.as_ref().map(|b| json!({"period": b.period, "tokens": b.tokens, "usd": b.usd})),
        },
        "current": {
            "requests": window(&state.state.requests),
            "tokens": state.state.tokens.as_ref().map(window),
            "in_flight": state.state.in_flight,
            "budget_used": {"tokens": state.state.budget_used.tokens, "usd": state.state.budget_used.usd},
        },
        "period": {"name": period, "key": period_key},
        "usage_this_period": {
            "requests": totals.as_ref().map_or(0, |t| t.requests),
            "input_tokens": totals.as_ref().map_or(0, |t| t.input_tokens),
            "output_tokens": totals.as_ref().map_or(0, |t| t.output_tokens),
            "cost_usd": totals.as_ref().map_or(0.0, |t| t.cost_usd),
            "cache_hits": totals.as_ref().map_or(0, |t| t.cache_hits),
            "saved_cost_usd": totals.as_ref().map_or(0.0, |t| t.saved_cost_usd),
        },
    }))
}

/// Where the key stands in its Durable Object; a revoked key is refused here even while caches still know it.
pub async fn key_state(env: &Env, config: &Config, key: &KeyRecord) -> Result<StateResponse, ApiError> {
    let control = admit::control_for(key, config);
    let state = limiter::state(env, &key.id, control, config.limiter_timeout_ms).await.map_err(|e| {
        log_error(e.label(), &e.to_string());
        ApiError::unavailable(e.label(), "The rate limiter")
    })?;
    if state.revoked {
        return Err(ApiError::invalid_api_key("This API key has been revoked."));
    }
    Ok(state)
}

async fn load_key(store: &Store, id: &str) -> Result<KeyView, ApiError> {
    load_row(store, id).await.map(KeyView::from_row)
}

async fn load_row(store: &Store, id: &str) -> Result<KeyRow, ApiError> {
    let row = store.key(id).await.map_err(|e| storage_error("key_read_failed", &e))?;
    row.ok_or_else(|| ApiError::key_not_found(id))
}

fn checked_id(id: &str) -> Result<&str, ApiError> {
    if keys::valid_key_id(id) {
        Ok(id)
    } else {
        Err(ApiError::invalid_param("id", "A key id has 1 to 64 letters, digits, '-' or '_'."))
    }
}

async fn body(req: &mut Request, config: &Config) -> Result<Vec<u8>, ApiError> {
    let timeout = std::time::Duration::from_secs(config.client_body_timeout_secs);
    match bindings::within(timeout, req.bytes()).await {
        Some(Ok(bytes)) => Ok(bytes),
        Some(Err(_)) => Err(ApiError::invalid_request("The request body could not be read.")),
        None => Err(ApiError::body_timeout(config.client_body_timeout_secs)),
    }
}

fn query(req: &Request) -> Result<Vec<(String, String)>, ApiError> {
    let url = req.url().map_err(|_| ApiError::invalid_request("The request URL could not be parsed."))?;
    Ok(url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn storage_error(label: &'static str, e: &worker::Error) -> ApiError {
    log_error(label, &e.to_string());
    ApiError::unavailable(label, "The key store")
}
