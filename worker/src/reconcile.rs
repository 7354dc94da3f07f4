//! Reconciliation, the pure part: which ledger rows are reconciled, how a reconciliation job travels through the
//! usage queue, how OpenRouter's account of a generation (`GET /generation?id=…`) is read, and what it changes.
//!
//! A request billed by estimate (the client left under `CLIENT_ABORT_POLICY=cancel`, the stream was cut, the
//! upstream timed out or sent no usage) is written to the ledger with `reconcile_state = 'pending'`, and a job
//! carrying its usage event goes back into the usage queue. The consumer looks the generation up; OpenRouter
//! answers 404 for a few seconds after a generation ends, so a miss is retried with backoff. With the real
//! counts it corrects the key's budget in its Durable Object (once per request), the ledger row
//! (`usage_source = 'reconciled'`), and only then sends the request's one PostHog event, which was held back
//! until the numbers were final. After `RECONCILE_MAX_ATTEMPTS` misses the estimate stands (`'failed'`) and the
//! held event is sent with it.

use key_limiter::protocol::{Adjustment, Amount};
use serde::{Deserialize, Serialize};

use crate::usage_event::{UsageEvent, UsageSource};

/// Seconds before the first look-up: OpenRouter needs a moment to record a generation.
pub const FIRST_LOOKUP_DELAY_SECS: u32 = 2;

/// Whether a ledger row is reconciled: an estimate with a generation to look up.
pub fn wanted(event: &UsageEvent, enabled: bool) -> bool {
    enabled && event.usage_source == UsageSource::Estimated && event.generation_id.is_some()
}

/// A reconciliation job: the estimated request's usage event, in the usage queue beside ordinary events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub reconcile: UsageEvent,
}

/// What a queue message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueItem {
    Reconcile(Job),
    Usage(UsageEvent),
}

impl QueueItem {
    /// Reads a message body: a job (`{"reconcile": …}`) or a usage event. (Two plain reads rather than serde's
    /// `untagged`, which buffers every message into an intermediate tree and costs wasm size.)
    pub fn parse(body: &str) -> Option<QueueItem> {
        match serde_json::from_str::<Job>(body) {
            Ok(job) => Some(QueueItem::Reconcile(job)),
            Err(_) => serde_json::from_str::<UsageEvent>(body).ok().map(QueueItem::Usage),
        }
    }
}

/// OpenRouter's account of one generation: native token counts (what its usage reports) and the charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    pub cached_tokens: u64,
    pub cost: f64,
}

/// Reads `{"data": {...}}` from `GET /generation`; `None` if it is not a generation.
pub fn read_generation(body: &[u8]) -> Option<Generation> {
    #[derive(Deserialize)]
    struct Body {
        data: Data,
    }
    #[derive(Deserialize)]
    struct Data {
        tokens_prompt: Option<f64>,
        tokens_completion: Option<f64>,
        native_tokens_prompt: Option<f64>,
        native_tokens_completion: Option<f64>,
        native_tokens_reasoning: Option<f64>,
        native_tokens_cached: Option<f64>,
        total_cost: Option<f64>,
    }
    let data = serde_json::from_slice::<Body>(body).ok()?.data;
    let count = |native: Option<f64>, normalized: Option<f64>| {
        native.or(normalized).filter(|n| n.is_finite() && *n >= 0.0).map_or(0, |n| (n as u64).min(Amount::MAX_TOKENS))
    };
    Some(Generation {
        prompt_tokens: count(data.native_tokens_prompt, data.tokens_prompt),
        completion_tokens: count(data.native_tokens_completion, data.tokens_completion),
        reasoning_tokens: count(data.native_tokens_reasoning, None),
        cached_tokens: count(data.native_tokens_cached, None),
        cost: data.total_cost.filter(|c| c.is_finite() && *c >= 0.0).map_or(0.0, |c| c.min(Amount::MAX_USD)),
    })
}

/// The event as reconciled: OpenRouter's counts and charge in place of the estimate.
pub fn reconciled(event: &UsageEvent, generation: &Generation) -> UsageEvent {
    UsageEvent {
        input_tokens: generation.prompt_tokens,
        output_tokens: generation.completion_tokens,
        reasoning_tokens: generation.reasoning_tokens,
        cached_tokens: generation.cached_tokens,
        cost_usd: generation.cost,
        usage_source: UsageSource::Reconciled,
        ..event.clone()
    }
}

/// The correction the key's Durable Object applies: the estimate it was charged → the real charge. `None` when
/// the request was admitted without the object (the limiter failed open), so nothing was charged there.
pub fn adjustment(estimated: &UsageEvent, generation: &Generation) -> Option<Adjustment> {
    (estimated.admitted_at_ms > 0).then(|| Adjustment {
        request_id: estimated.request_id.clone(),
        admitted_at_ms: estimated.admitted_at_ms,
        charged: Amount {
            tokens: estimated.input_tokens.saturating_add(estimated.output_tokens),
            usd: estimated.cost_usd,
        },
        actual: Amount {
            tokens: generation.prompt_tokens.saturating_add(generation.completion_tokens),
            usd: generation.cost,
        },
    })
}

/// What a look-up's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Found,
    /// Not recorded yet (404), throttled, or the service failed: look again later.
    Later,
    /// The gateway's own credentials or request are wrong: looking again cannot help.
    Never,
}

pub fn classify(status: Option<u16>) -> Lookup {
    match status {
        Some(200) => Lookup::Found,
        Some(404 | 408 | 429) | Some(500..=599) | None => Lookup::Later,
        Some(_) => Lookup::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn estimated() -> UsageEvent {
        serde_json::from_value(json!({
            "request_id": "req_1", "client_request_id": "mine", "generation_id": "gen-1", "admitted_at_ms": 1000,
            "key_id": "k", "user_id": "u", "model": "m", "served_model": null, "input_tokens": 10,
            "output_tokens": 5, "cached_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.00002,
            "usage_source": "estimated", "latency_ms": 3, "ttft_ms": null, "status": 200, "streamed": true,
            "finish_reason": null, "error": "client_abort", "timestamp_ms": 999, "temperature": null, "max_tokens": 50
        }))
        .expect("event")
    }

    #[test]
    fn only_estimates_with_a_generation_are_reconciled() {
        let e = estimated();
        assert!(wanted(&e, true));
        assert!(!wanted(&e, false));
        assert!(!wanted(&UsageEvent { generation_id: None, ..e.clone() }, true));
        assert!(!wanted(&UsageEvent { usage_source: UsageSource::Reported, ..e }, true));
    }

    #[test]
    fn queue_items_are_told_apart_and_jobs_round_trip() {
        let event = estimated();
        let usage = serde_json::to_string(&event).expect("json");
        assert_eq!(QueueItem::parse(&usage), Some(QueueItem::Usage(event.clone())));
        let job = serde_json::to_string(&Job { reconcile: event.clone() }).expect("json");
        assert_eq!(QueueItem::parse(&job), Some(QueueItem::Reconcile(Job { reconcile: event })));
        assert_eq!(QueueItem::parse("{\"request_id\": 5}"), None);
    }

    #[test]
    fn a_generation_is_read_with_native_counts_first() {
        let body = json!({"data": {"id": "gen-1", "total_cost": 0.0009, "tokens_prompt": 12, "tokens_completion": 30,
            "native_tokens_prompt": 11, "native_tokens_completion": 31, "native_tokens_reasoning": 4,
            "native_tokens_cached": 2, "cancelled": true}});
        let g = read_generation(body.to_string().as_bytes()).expect("generation");
        assert_eq!(
            g,
            Generation {
                prompt_tokens: 11,
                completion_tokens: 31,
                reasoning_tokens: 4,
                cached_tokens: 2,
                cost: 0.0009
            }
        );
        let normalized = json!({"data": {"tokens_prompt": 12, "tokens_completion": 30, "total_cost": 1e300}});
        let g = read_generation(normalized.to_string().as_bytes()).expect("generation");
        assert_eq!((g.prompt_tokens, g.completion_tokens, g.cost), (12, 30, Amount::MAX_USD));
        assert_eq!(read_generation(br#"{"error":{"code":404}}"#), None);
    }

    #[test]
    fn reconciliation_replaces_the_estimate_and_corrects_the_charge() {
        let e = estimated();
        let g = Generation {
            prompt_tokens: 11,
            completion_tokens: 31,
            reasoning_tokens: 4,
            cached_tokens: 2,
            cost: 0.0009,
        };
        let r = reconciled(&e, &g);
        assert_eq!(
            (r.input_tokens, r.output_tokens, r.cost_usd, r.usage_source),
            (11, 31, 0.0009, UsageSource::Reconciled)
        );
        assert_eq!((r.request_id.as_str(), r.error.as_deref()), ("req_1", Some("client_abort")));
        let a = adjustment(&e, &g).expect("adjustment");
        assert_eq!(a.charged, Amount { tokens: 15, usd: 0.00002 });
        assert_eq!(a.actual, Amount { tokens: 42, usd: 0.0009 });
        assert_eq!(a.admitted_at_ms, 1000);
        assert_eq!(adjustment(&UsageEvent { admitted_at_ms: 0, ..e }, &g), None);
    }

    #[test]
    fn lookups_retry_misses_and_give_up_on_our_own_errors() {
        assert_eq!(classify(Some(200)), Lookup::Found);
        for later in [Some(404), Some(429), Some(503), None] {
            assert_eq!(classify(later), Lookup::Later);
        }
        for never in [Some(400), Some(401), Some(403)] {
            assert_eq!(classify(never), Lookup::Never);
        }
    }
}
