//! The billing ledger, as both stores keep it: one `usage_logs` row per request id, a whole queue batch written
//! by one statement that takes the rows as one JSON array ([`rows_json`]); `ON CONFLICT DO NOTHING` on the
//! request id makes redelivery harmless.
//! `posthog_state` tracks the other sink: a retried batch only re-sends what PostHog has not accepted yet.
//! `reconcile_state` tracks reconciliation (see `reconcile`): a row awaiting it holds its PostHog event back.

use serde_json::{json, Value};

use crate::usage_event::UsageEvent;

/// The columns a batch insert writes: the keys of each [`rows_json`] row.
pub const COLUMNS: [&str; 24] = [
    "request_id",
    "client_request_id",
    "generation_id",
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
    "reconcile_state",
    "endpoint",
    "cache_hit",
    "saved_cost",
];

/// Where a request's row stands (PostHog's verdict, reconciliation).
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

/// The rows to insert, as the JSON array each store's batch insert takes. `created_at` formats a timestamp (RFC 3339);
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
                "cache_hit": u8::from(e.cache_hit),
                "saved_cost": e.saved_cost_usd,
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
            cache_hit: true,
            saved_cost_usd: 0.125,
            content: None,
        };
        let rows: Value = serde_json::from_str(&rows_json([&event], |ms| format!("t{ms}"), |_| true)).expect("json");
        let row = &rows[0];
        assert_eq!(row.as_object().map(|o| o.len()), Some(COLUMNS.len()));
        for column in COLUMNS {
            assert!(row.get(column).is_some(), "row lacks {column}");
        }
        assert_eq!(row["created_at"], "t7");
        assert_eq!(row["streamed"], 1);
        assert_eq!(row["usage_source"], "estimated");
        assert_eq!(row["reconcile_state"], "pending");
        assert_eq!(row["client_request_id"], "c");
        assert_eq!((row["cache_hit"].as_u64(), row["saved_cost"].as_f64()), (Some(1), Some(0.125)));
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
