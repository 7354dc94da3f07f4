//! The D1 billing ledger: one `usage_logs` row per request id, written a whole batch per statement.
//!
//! A batch is bound as a single JSON parameter and expanded with `json_each`, so a queue batch of up to 100
//! events is one INSERT (D1 allows 100 bound parameters per statement; binding columns one by one would need
//! five statements per 100 events). `ON CONFLICT DO NOTHING` on the request id makes redelivery harmless.
//! `posthog_state` tracks the other sink: a retried batch only re-sends what PostHog has not accepted yet.
//! `reconcile_state` tracks reconciliation (see `reconcile`): a row awaiting it holds its PostHog event back.

use serde_json::{json, Value};

use crate::usage_event::UsageEvent;

pub const INSERT_BATCH: &str = "INSERT INTO usage_logs (request_id, client_request_id, generation_id, key_id, \
user_id, model, served_model, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost, usage_source, \
status, streamed, finish_reason, error, latency_ms, ttft_ms, created_at, reconcile_state, endpoint) \
SELECT json_extract(value, '$.request_id'), json_extract(value, '$.client_request_id'), \
json_extract(value, '$.generation_id'), json_extract(value, '$.key_id'), json_extract(value, '$.user_id'), \
json_extract(value, '$.model'), json_extract(value, '$.served_model'), json_extract(value, '$.input_tokens'), \
json_extract(value, '$.output_tokens'), json_extract(value, '$.cached_tokens'), \
json_extract(value, '$.reasoning_tokens'), json_extract(value, '$.cost'), json_extract(value, '$.usage_source'), \
json_extract(value, '$.status'), json_extract(value, '$.streamed'), json_extract(value, '$.finish_reason'), \
json_extract(value, '$.error'), json_extract(value, '$.latency_ms'), json_extract(value, '$.ttft_ms'), \
json_extract(value, '$.created_at'), json_extract(value, '$.reconcile_state'), json_extract(value, '$.endpoint') \
FROM json_each(?1) WHERE true ON CONFLICT (request_id) DO NOTHING";

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

/// A row's state as [`ROW_STATES`] reads it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct RowState {
    pub request_id: String,
    pub posthog_state: Option<String>,
    pub reconcile_state: Option<String>,
}

impl RowState {
    /// PostHog is owed this row's event: not sent yet, and not held back for reconciliation.
    pub fn owes_posthog(&self) -> bool {
        self.posthog_state.is_none() && self.reconcile_state.as_deref() != Some("pending")
    }

    pub fn reconcile_pending(&self) -> bool {
        self.reconcile_state.as_deref() == Some("pending")
    }
}

/// Records PostHog's verdict (`sent` or `rejected`) for these request ids.
pub const MARK_POSTHOG: &str = "UPDATE usage_logs SET posthog_state = ?2 \
WHERE request_id IN (SELECT value FROM json_each(?1))";

/// The rows to insert, as the JSON array bound to [`INSERT_BATCH`]. `created_at` formats a timestamp (RFC 3339);
/// `reconcile` says which rows await reconciliation.
pub fn rows_json<'a>(
    events: impl IntoIterator<Item = &'a UsageEvent>,
    created_at: impl Fn(u64) -> String,
    reconcile: impl Fn(&UsageEvent) -> bool,
) -> String {
    let rows: Vec<Value> = events
        .into_iter()
        .map(|e| {
            json!({
                "request_id": e.request_id,
                "client_request_id": e.client_request_id,
                "generation_id": e.generation_id,
                "key_id": e.key_id,
                "user_id": e.user_id,
                "model": e.model,
                "served_model": e.served_model,
                "input_tokens": e.input_tokens,
                "output_tokens": e.output_tokens,
                "cached_tokens": e.cached_tokens,
                "reasoning_tokens": e.reasoning_tokens,
                "cost": e.cost_usd,
                "usage_source": e.usage_source.as_str(),
                "status": e.status,
                "streamed": u8::from(e.streamed),
                "finish_reason": e.finish_reason,
                "error": e.error,
                "latency_ms": e.latency_ms,
                "ttft_ms": e.ttft_ms,
                "created_at": created_at(e.timestamp_ms),
                "reconcile_state": reconcile(e).then_some("pending"),
                "endpoint": e.endpoint.as_str(),
            })
        })
        .collect();
    Value::Array(rows).to_string()
}

/// A JSON array of ids, bound to the statements that take a set of request ids.
pub fn ids_json<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    Value::Array(ids.into_iter().map(|id| Value::String(id.to_owned())).collect()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::usage_event::UsageSource;

    #[test]
    fn rows_carry_every_inserted_column() {
        let event = UsageEvent {
            request_id: "r".into(),
            client_request_id: Some("c".into()),
            generation_id: Some("g".into()),
            admitted_at_ms: 7,
            key_id: "k".into(),
            user_id: "u".into(),
            model: "m".into(),
            served_model: None,
            input_tokens: 1,
            output_tokens: 2,
            cached_tokens: 3,
            reasoning_tokens: 4,
            cost_usd: 0.5,
            usage_source: UsageSource::Estimated,
            latency_ms: 6,
            ttft_ms: None,
            status: 200,
            streamed: true,
            finish_reason: None,
            error: Some("client_abort".into()),
            timestamp_ms: 7,
            endpoint: Endpoint::ChatCompletions,
            temperature: None,
            max_tokens: 8,
            content: None,
        };
        let rows: Value = serde_json::from_str(&rows_json([&event], |ms| format!("t{ms}"), |_| true)).expect("json");
        let row = &rows[0];
        let columns = INSERT_BATCH.split(" SELECT ").next().unwrap_or_default();
        for column in [
            "request_id",
            "client_request_id",
            "generation_id",
            "reconcile_state",
            "key_id",
            "user_id",
            "model",
            "served_model",
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "reasoning_tokens",
            "cost",
            "usage_source",
            "status",
            "streamed",
            "finish_reason",
            "error",
            "latency_ms",
            "ttft_ms",
            "created_at",
            "endpoint",
        ] {
            assert!(row.get(column).is_some(), "row lacks {column}");
            assert!(columns.contains(column), "insert lacks {column}");
            assert!(INSERT_BATCH.contains(&format!("'$.{column}'")), "insert does not read {column}");
        }
        assert_eq!(row["created_at"], "t7");
        assert_eq!(row["streamed"], 1);
        assert_eq!(row["usage_source"], "estimated");
        assert_eq!(row["reconcile_state"], "pending");
        assert_eq!(row["client_request_id"], "c");
    }

    #[test]
    fn rows_awaiting_reconciliation_hold_their_posthog_event() {
        let state = |posthog: Option<&str>, reconcile: Option<&str>| RowState {
            request_id: "r".into(),
            posthog_state: posthog.map(str::to_owned),
            reconcile_state: reconcile.map(str::to_owned),
        };
        assert!(state(None, None).owes_posthog());
        assert!(!state(None, Some("pending")).owes_posthog());
        assert!(state(None, Some("done")).owes_posthog() && state(None, Some("failed")).owes_posthog());
        assert!(!state(Some("sent"), Some("done")).owes_posthog());
    }

    #[test]
    fn ids_are_a_json_array() {
        assert_eq!(ids_json(["a", "b\"c"]), r#"["a","b\"c"]"#);
    }
}
