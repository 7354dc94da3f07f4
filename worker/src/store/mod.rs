//! The key store and the usage ledger: every SQL statement the Worker runs lives here (the ledger's in
//! [`ledger`]), each behind a typed operation, so the request path, the admin API and the queue consumer never
//! see SQL or a binding. The store is D1 (SQLite, `migrations/`); its statements run through `bindings`' D1
//! calls (bounded, and retried: every statement here is idempotent).

pub mod ledger;

use serde_json::json;
use wasm_bindgen::JsValue;
use worker::{Env, Error};

use crate::auth::KeyRecord;
use crate::bindings::{self, iso_time, number_param, text_param};
use crate::keys::{KeyFields, KeyRow};
use crate::usage_event::UsageEvent;
use crate::usage_report::{GroupBy, UsageFilter, UsageRow};
use ledger::RowState;

// ---------------------------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------------------------

/// The active key with this hash, as authentication needs it.
pub async fn active_key(env: &Env, hash: &str) -> Result<Option<KeyRecord>, Error> {
    let rows: Vec<KeyRecord> = bindings::d1_rows(
        env,
        "SELECT id, user_id, rpm, tpm, usage_limit, budget_period, usd_limit, max_concurrency, allowed_models, \
         updated_at FROM api_keys WHERE key_hash = ?1 AND active = 1",
        &[JsValue::from_str(hash)],
    )
    .await?;
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
    ];
    bindings::d1_run(
        env,
        "INSERT INTO api_keys (id, key_hash, user_id, name, rpm, tpm, usage_limit, budget_period, usd_limit, \
         max_concurrency, allowed_models, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
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
    if let Some(active) = fields.active {
        set("active", JsValue::from_f64(if active { 1.0 } else { 0.0 }));
        set("revoked_at", if active { JsValue::NULL } else { JsValue::from_str(&now) });
    }
    params.push(JsValue::from_str(id));
    let sql = format!("UPDATE api_keys SET {} WHERE id = ?{}", sets.join(", "), params.len());
    bindings::d1_run(env, &sql, &params).await.map(drop)
}

/// The columns of a [`KeyRow`]: every admin read selects these (never `key_hash`).
const KEY_COLUMNS: &str = "id, user_id, name, active, rpm, tpm, usage_limit, budget_period, usd_limit, \
max_concurrency, allowed_models, created_at, updated_at, revoked_at";

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
        "SELECT {} AS grp, COUNT(*) AS requests, COALESCE(SUM(input_tokens), 0) AS input_tokens, \
         COALESCE(SUM(output_tokens), 0) AS output_tokens, COALESCE(SUM(cached_tokens), 0) AS cached_tokens, \
         COALESCE(SUM(cost), 0) AS cost_usd FROM usage_logs \
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR key_id = ?2) \
         AND (?3 IS NULL OR created_at >= ?3) AND (?4 IS NULL OR created_at < ?4) \
         GROUP BY grp ORDER BY grp",
        group_expression(group_by)
    )
}

/// The SQL expression a report groups on (fixed strings only: never built from input).
fn group_expression(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Total => "'total'",
        GroupBy::Day => "substr(created_at, 1, 10)",
        GroupBy::Model => "model",
        GroupBy::Key => "key_id",
        GroupBy::User => "user_id",
        GroupBy::Endpoint => "endpoint",
    }
}

/// Writes the events' rows, one per request id (a redelivered event changes nothing); returns the rows D1
/// wrote. `reconcile` says which rows await reconciliation.
pub async fn insert_ledger_rows(
    env: &Env,
    events: &[&UsageEvent],
    reconcile: impl Fn(&UsageEvent) -> bool,
) -> Result<u64, Error> {
    let rows = ledger::rows_json(events.iter().copied(), iso_time, reconcile);
    bindings::d1_run(env, ledger::INSERT_BATCH, &[rows.as_str().into()]).await
}

/// Where these requests' rows stand (PostHog's verdict, reconciliation).
pub async fn ledger_states<'a>(env: &Env, ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<RowState>, Error> {
    let ids = ledger::ids_json(ids);
    bindings::d1_rows(env, ledger::ROW_STATES, &[ids.as_str().into()]).await
}

/// Records PostHog's verdict (`sent` or `rejected`) for these requests.
pub async fn mark_posthog<'a>(env: &Env, ids: impl IntoIterator<Item = &'a str>, state: &str) -> Result<(), Error> {
    let ids = ledger::ids_json(ids);
    bindings::d1_run(env, ledger::MARK_POSTHOG, &[ids.as_str().into(), state.into()]).await.map(drop)
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
    bindings::d1_run(env, ledger::RECONCILE_DONE, &params).await.map(drop)
}

/// Gives a pending row's reconciliation up: its estimate stands.
pub async fn reconcile_failed(env: &Env, request_id: &str, now_ms: u64) -> Result<(), Error> {
    let params = [request_id.into(), iso_time(now_ms).into()];
    bindings::d1_run(env, ledger::RECONCILE_FAILED, &params).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_group_on_fixed_expressions() {
        assert!(aggregate_sql(GroupBy::Day).contains("substr(created_at, 1, 10) AS grp"));
        assert!(aggregate_sql(GroupBy::Endpoint).contains("SELECT endpoint AS grp"));
        assert!(aggregate_sql(GroupBy::Total).contains("SELECT 'total' AS grp"));
    }
}
