//! The D1 billing ledger: one `usage_logs` row per request id, written a whole batch per statement.
//!
//! A batch is bound as a single JSON parameter and expanded with `json_each`, so a queue batch of up to 100
//! events is one INSERT (D1 allows 100 bound parameters per statement; binding columns one by one would need
//! five statements per 100 events). `ON CONFLICT DO NOTHING` on the request id makes redelivery harmless.
//! `posthog_state` tracks the other sink: a retried batch only re-sends what PostHog has not accepted yet.

use serde_json::{json, Value};

use crate::usage_event::UsageEvent;

pub const INSERT_BATCH: &str = "INSERT INTO usage_logs (request_id, key_id, user_id, model, served_model, \
input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost, usage_source, status, streamed, finish_reason, \
error, latency_ms, ttft_ms, created_at) \
SELECT json_extract(value, '$.request_id'), json_extract(value, '$.key_id'), json_extract(value, '$.user_id'), \
json_extract(value, '$.model'), json_extract(value, '$.served_model'), json_extract(value, '$.input_tokens'), \
json_extract(value, '$.output_tokens'), json_extract(value, '$.cached_tokens'), \
json_extract(value, '$.reasoning_tokens'), json_extract(value, '$.cost'), json_extract(value, '$.usage_source'), \
json_extract(value, '$.status'), json_extract(value, '$.streamed'), json_extract(value, '$.finish_reason'), \
json_extract(value, '$.error'), json_extract(value, '$.latency_ms'), json_extract(value, '$.ttft_ms'), \
json_extract(value, '$.created_at') \
FROM json_each(?1) WHERE true ON CONFLICT (request_id) DO NOTHING";

/// Which of the batch's request ids PostHog has not accepted yet.
pub const PENDING_FOR_POSTHOG: &str = "SELECT request_id FROM usage_logs \
WHERE request_id IN (SELECT value FROM json_each(?1)) AND posthog_state IS NULL";

/// Records PostHog's verdict (`sent` or `rejected`) for these request ids.
pub const MARK_POSTHOG: &str = "UPDATE usage_logs SET posthog_state = ?2 \
WHERE request_id IN (SELECT value FROM json_each(?1))";

/// The rows to insert, as the JSON array bound to [`INSERT_BATCH`]. `created_at` formats a timestamp (RFC 3339).
pub fn rows_json<'a>(events: impl IntoIterator<Item = &'a UsageEvent>, created_at: impl Fn(u64) -> String) -> String {
    let rows: Vec<Value> = events
        .into_iter()
        .map(|e| {
            json!({
                "request_id": e.request_id,
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
    use crate::usage_event::UsageSource;

    #[test]
    fn rows_carry_every_inserted_column() {
        let event = UsageEvent {
            request_id: "r".into(),
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
            temperature: None,
            max_tokens: 8,
            content: None,
        };
        let rows: Value = serde_json::from_str(&rows_json([&event], |ms| format!("t{ms}"))).expect("json");
        let row = &rows[0];
        let columns = INSERT_BATCH.split(" SELECT ").next().unwrap_or_default();
        for column in [
            "request_id",
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
        ] {
            assert!(row.get(column).is_some(), "row lacks {column}");
            assert!(columns.contains(column), "insert lacks {column}");
            assert!(INSERT_BATCH.contains(&format!("'$.{column}'")), "insert does not read {column}");
        }
        assert_eq!(row["created_at"], "t7");
        assert_eq!(row["streamed"], 1);
        assert_eq!(row["usage_source"], "estimated");
    }

    #[test]
    fn ids_are_a_json_array() {
        assert_eq!(ids_json(["a", "b\"c"]), r#"["a","b\"c"]"#);
    }
}
