//! The D1 store (SQLite, `migrations/`): every statement runs through `bindings`' D1 calls, bounded and retried
//! (every statement here is idempotent).
//!
//! A ledger batch is bound as a single JSON parameter and expanded with `json_each`, so a queue batch of up to 100
//! events is one INSERT (D1 allows 100 bound parameters per statement; binding columns one by one would need
//! five statements per 100 events).

use serde_json::json;
use wasm_bindgen::JsValue;
use worker::{Env, Error};

use super::{group_expression, ledger::RowState, AGGREGATES, KEY_COLUMNS, RECORD_COLUMNS};
use crate::bindings::{self, iso_time, number_param, text_param};
use crate::keys::{KeyFields, KeyRecord, KeyRow};
use crate::usage_event::UsageEvent;
use crate::usage_report::{GroupBy, UsageFilter, UsageRow};

// ---------------------------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------------------------

/// The active key with this hash, as authentication needs it.
pub async fn active_key(env: &Env, hash: &str) -> Result<Option<KeyRecord>, Error> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM api_keys WHERE key_hash = ?1 AND active = 1");
    let rows: Vec<KeyRecord> = bindings::d1_rows(env, &sql, &[JsValue::from_str(hash)]).await?;
    Ok(rows.into_iter().next())
}

/// Inserts a new key (its id chosen before, so a retried insert is the same row); `now` is its creation time.
pub async fn insert_key(env: &Env, id: &str, hash: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
    let now = iso_time(now_ms);
    let models = fields.allowed_models.clone().flatten().map(|m| json!(m).to_string());
    let params = [
        JsValue::from_str(id),
        JsValue::from_str(hash),
        text_param(fields.user_id.as_deref()),
        text_param(fields.name.clone().flatten().as_deref()),
        number_param(fields.rpm.flatten().map(|n| n as f64)),
        number_param(fields.tpm.flatten().map(|n| n as f64)),
        number_param(fields.usage_limit.flatten().map(|n| n as f64)),
        JsValue::from_str(fields.budget_period.as_deref().unwrap_or("lifetime")),
        number_param(fields.usd_limit.flatten()),
        number_param(fields.max_concurrency.flatten().map(|n| n as f64)),
        text_param(models.as_deref()),
        JsValue::from_str(&now),
        number_param(fields.cache_ttl_seconds.flatten().map(|n| n as f64)),
        JsValue::from_str(fields.cache_scope.as_deref().unwrap_or("key")),
        JsValue::from_f64(if fields.cache_sampled == Some(true) { 1.0 } else { 0.0 }),
    ];
    bindings::d1_run(
        env,
        "INSERT INTO api_keys (id, key_hash, user_id, name, rpm, tpm, usage_limit, budget_period, usd_limit, \
         max_concurrency, allowed_models, created_at, updated_at, cache_ttl_seconds, cache_scope, cache_sampled) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?15)",
        &params,
    )
    .await
    .map(drop)
}

/// Writes the fields that are set (`Some(None)` clears a limit); `active: false` also stamps `revoked_at`.
pub async fn update_key(env: &Env, id: &str, fields: &KeyFields, now_ms: u64) -> Result<(), Error> {
    let now = iso_time(now_ms);
    let mut sets = vec!["updated_at = ?1".to_owned()];
    let mut params = vec![JsValue::from_str(&now)];
    let mut set = |column: &str, value: JsValue| {
        params.push(value);
        sets.push(format!("{column} = ?{}", params.len()));
    };
    if let Some(name) = &fields.name {
        set("name", text_param(name.as_deref()));
    }
    for (column, value) in [
        ("rpm", fields.rpm),
        ("tpm", fields.tpm),
        ("usage_limit", fields.usage_limit),
        ("max_concurrency", fields.max_concurrency),
        ("cache_ttl_seconds", fields.cache_ttl_seconds),
    ] {
        if let Some(value) = value {
            set(column, number_param(value.map(|n| n as f64)));
        }
    }
    if let Some(period) = &fields.budget_period {
        set("budget_period", JsValue::from_str(period));
    }
    if let Some(usd) = fields.usd_limit {
        set("usd_limit", number_param(usd));
    }
    if let Some(models) = &fields.allowed_models {
        let json = models.as_ref().map(|m| json!(m).to_string());
        set("allowed_models", text_param(json.as_deref()));
    }
    if let Some(scope) = &fields.cache_scope {
        set("cache_scope", JsValue::from_str(scope));
    }
    if let Some(sampled) = fields.cache_sampled {
        set("cache_sampled", JsValue::from_f64(if sampled { 1.0 } else { 0.0 }));
    }
    if let Some(active) = fields.active {
        set("active", JsValue::from_f64(if active { 1.0 } else { 0.0 }));
        set("revoked_at", if active { JsValue::NULL } else { JsValue::from_str(&now) });
    }
    params.push(JsValue::from_str(id));
    let sql = format!("UPDATE api_keys SET {} WHERE id = ?{}", sets.join(", "), params.len());
    bindings::d1_run(env, &sql, &params).await.map(drop)
}

/// One key's row, by its public id.
pub async fn key(env: &Env, id: &str) -> Result<Option<KeyRow>, Error> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1");
    let rows: Vec<KeyRow> = bindings::d1_rows(env, &sql, &[JsValue::from_str(id)]).await?;
    Ok(rows.into_iter().next())
}

/// Up to `limit` keys after the id `after`, of one user or all, ordered by id.
pub async fn keys(env: &Env, after: Option<&str>, user_id: Option<&str>, limit: u64) -> Result<Vec<KeyRow>, Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE (?1 IS NULL OR id > ?1) AND (?2 IS NULL OR user_id = ?2) \
         ORDER BY id LIMIT ?3"
    );
    let params = [text_param(after), text_param(user_id), JsValue::from_f64(limit as f64)];
    bindings::d1_rows(env, &sql, &params).await
}

// ---------------------------------------------------------------------------------------------------------------
// The usage ledger
// ---------------------------------------------------------------------------------------------------------------

/// Requests, tokens and cost from the ledger, filtered and grouped.
pub async fn usage(env: &Env, group_by: GroupBy, filter: &UsageFilter) -> Result<Vec<UsageRow>, Error> {
    let params = [
        text_param(filter.user_id.as_deref()),
        text_param(filter.key_id.as_deref()),
        text_param(filter.from.as_deref()),
        text_param(filter.to.as_deref()),
    ];
    bindings::d1_rows(env, &aggregate_sql(group_by), &params).await
}

/// The aggregate query and its four parameters (`user_id`, `key_id`, `from`, `to`; null = no filter).
pub fn aggregate_sql(group_by: GroupBy) -> String {
    format!(
        "SELECT {} AS grp, {AGGREGATES} FROM usage_logs WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR key_id = ?2) \
         AND (?3 IS NULL OR created_at >= ?3) AND (?4 IS NULL OR created_at < ?4) \
         GROUP BY grp ORDER BY grp",
        group_expression(group_by)
    )
}

/// Writes a batch of ledger rows ([`ledger::rows_json`]); returns the rows D1 wrote (as it bills them, indexes
/// included).
pub async fn insert_ledger_rows(env: &Env, rows_json: &str) -> Result<u64, Error> {
    bindings::d1_run(env, INSERT_BATCH, &[rows_json.into()]).await
}

/// Where these requests' rows stand (PostHog's verdict, reconciliation).
pub async fn ledger_states(env: &Env, ids_json: &str) -> Result<Vec<RowState>, Error> {
    bindings::d1_rows(env, ROW_STATES, &[ids_json.into()]).await
}

/// Records PostHog's verdict (`sent` or `rejected`) for these requests.
pub async fn mark_posthog(env: &Env, ids_json: &str, state: &str) -> Result<(), Error> {
    bindings::d1_run(env, MARK_POSTHOG, &[ids_json.into(), state.into()]).await.map(drop)
}

/// Replaces a pending row's estimate with the reconciled event's counts and cost.
pub async fn reconcile_done(env: &Env, reconciled: &UsageEvent, now_ms: u64) -> Result<(), Error> {
    let params = [
        reconciled.request_id.as_str().into(),
        JsValue::from_f64(reconciled.input_tokens as f64),
        JsValue::from_f64(reconciled.output_tokens as f64),
        JsValue::from_f64(reconciled.cached_tokens as f64),
        JsValue::from_f64(reconciled.reasoning_tokens as f64),
        JsValue::from_f64(reconciled.cost_usd),
        iso_time(now_ms).into(),
    ];
    bindings::d1_run(env, RECONCILE_DONE, &params).await.map(drop)
}

/// Gives a pending row's reconciliation up: its estimate stands.
pub async fn reconcile_failed(env: &Env, request_id: &str, now_ms: u64) -> Result<(), Error> {
    let params = [request_id.into(), iso_time(now_ms).into()];
    bindings::d1_run(env, RECONCILE_FAILED, &params).await.map(drop)
}

/// One row per element of the JSON array `?1`; a request id already there is skipped (redelivery).
pub const INSERT_BATCH: &str = "INSERT INTO usage_logs (request_id, client_request_id, generation_id, key_id, \
user_id, model, served_model, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost, usage_source, \
status, streamed, finish_reason, error, latency_ms, ttft_ms, created_at, reconcile_state, endpoint, cache_hit, \
saved_cost) SELECT json_extract(value, '$.request_id'), json_extract(value, '$.client_request_id'), \
json_extract(value, '$.generation_id'), json_extract(value, '$.key_id'), json_extract(value, '$.user_id'), \
json_extract(value, '$.model'), json_extract(value, '$.served_model'), json_extract(value, '$.input_tokens'), \
json_extract(value, '$.output_tokens'), json_extract(value, '$.cached_tokens'), \
json_extract(value, '$.reasoning_tokens'), json_extract(value, '$.cost'), json_extract(value, '$.usage_source'), \
json_extract(value, '$.status'), json_extract(value, '$.streamed'), json_extract(value, '$.finish_reason'), \
json_extract(value, '$.error'), json_extract(value, '$.latency_ms'), json_extract(value, '$.ttft_ms'), \
json_extract(value, '$.created_at'), json_extract(value, '$.reconcile_state'), json_extract(value, '$.endpoint'), \
json_extract(value, '$.cache_hit'), json_extract(value, '$.saved_cost') FROM json_each(?1) WHERE true ON CONFLICT (request_id) DO NOTHING";

/// Where the batch's rows stand: PostHog's verdict and reconciliation.
pub const ROW_STATES: &str = "SELECT request_id, posthog_state, reconcile_state FROM usage_logs \
WHERE request_id IN (SELECT value FROM json_each(?1))";

/// Replaces a pending row's estimate with OpenRouter's account (`?1` request id, then the counts, the cost and
/// the time). Changes nothing once the row is reconciled, so a repeated job is harmless.
pub const RECONCILE_DONE: &str = "UPDATE usage_logs SET input_tokens = ?2, output_tokens = ?3, cached_tokens = ?4, \
reasoning_tokens = ?5, cost = ?6, usage_source = 'reconciled', reconcile_state = 'done', reconciled_at = ?7 \
WHERE request_id = ?1 AND reconcile_state = 'pending'";

/// Gives a pending row up: its estimate stands (`?1` request id, `?2` the time).
pub const RECONCILE_FAILED: &str = "UPDATE usage_logs SET reconcile_state = 'failed', reconciled_at = ?2 \
WHERE request_id = ?1 AND reconcile_state = 'pending'";

/// Records PostHog's verdict (`sent` or `rejected`) for these request ids.
pub const MARK_POSTHOG: &str = "UPDATE usage_logs SET posthog_state = ?2 \
WHERE request_id IN (SELECT value FROM json_each(?1))";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ledger::COLUMNS;

    #[test]
    fn reports_group_on_fixed_expressions() {
        assert!(aggregate_sql(GroupBy::Day).contains("substr(created_at, 1, 10) AS grp"));
        assert!(aggregate_sql(GroupBy::Endpoint).contains("SELECT endpoint AS grp"));
        assert!(aggregate_sql(GroupBy::Total).contains("SELECT 'total' AS grp"));
    }

    #[test]
    fn the_batch_insert_writes_every_ledger_column() {
        let columns = INSERT_BATCH.split(" SELECT ").next().unwrap_or_default();
        for column in COLUMNS {
            assert!(columns.contains(column), "insert lacks {column}");
            assert!(INSERT_BATCH.contains(&format!("'$.{column}'")), "insert does not read {column}");
        }
    }
}
