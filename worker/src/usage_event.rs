//! The usage event: one per admitted request, sent through the Queue after the response is done, and the only
//! input of the billing ledger (D1) and of LLM analytics (PostHog).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::endpoint::Endpoint;
use crate::pricing::ModelPrice;
use crate::usage::Usage;

/// Queue messages are at most 128 KB; captured content is cut to keep an event well inside that.
pub const MAX_CAPTURED_CONTENT_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The gateway's own request id (never the client's): the reservation's name, the idempotency key of the
    /// ledger row and the PostHog event.
    pub request_id: String,
    /// The client's `x-client-request-id` / `x-request-id`, when it sent a sane one: recorded, never a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// OpenRouter's generation id (`X-Generation-Id`, or the chunks' `id`): what reconciliation looks up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// When the key's Durable Object admitted the request (its budget period); 0 if it was admitted without it.
    #[serde(default)]
    pub admitted_at_ms: u64,
    pub key_id: String,
    pub user_id: String,
    /// The model asked for.
    pub model: String,
    /// The model that actually answered (OpenRouter may fall back).
    pub served_model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    /// OpenRouter's charge in USD (0 when it did not report one).
    pub cost_usd: f64,
    pub usage_source: UsageSource,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    /// The status the client received (200 for a stream that later failed; see `error`).
    pub status: u16,
    pub streamed: bool,
    pub finish_reason: Option<String>,
    /// Error label when the request failed or a stream ended badly.
    pub error: Option<String>,
    /// When the request arrived (ms since the epoch).
    pub timestamp_ms: u64,
    /// The API the request used (events queued before it was recorded were chat completions).
    #[serde(default)]
    pub endpoint: Endpoint,
    pub temperature: Option<f64>,
    pub max_tokens: u32,
    /// Answered from the response cache: `cost_usd` is 0, the token counts are the original answer's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_hit: bool,
    /// What the original answer of a cache hit cost upstream.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub saved_cost_usd: f64,
    /// The request's messages and the answer's text, only when content capture is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<CapturedContent>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's usage report (final stream chunk or response body).
    Reported,
    /// No report arrived (client left, stream cut, timeout): estimated from what was generated, until
    /// reconciliation replaces it.
    Estimated,
    /// An estimate corrected with OpenRouter's own accounting of the generation (`GET /generation`).
    Reconciled,
    /// The request's Worker never settled it: charged as reserved when its lease ended (sent by the key's
    /// Durable Object).
    Reserved,
    /// The upstream produced nothing (it answered with an error): nothing to charge.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Reconciled => "reconciled",
            UsageSource::Reserved => "reserved",
            UsageSource::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedContent {
    pub input: Value,
    pub output: String,
}

/// What an event bills: the report when there is one, else an estimate of what was generated (its cost at the
/// model's price, when known), else nothing.
pub fn usage_for(usage: Option<&Usage>, estimate: Option<Estimate>) -> (Usage, UsageSource) {
    match (usage, estimate) {
        (Some(u), _) => (*u, UsageSource::Reported),
        (None, Some(e)) => (
            Usage {
                prompt_tokens: e.prompt_tokens,
                completion_tokens: e.completion_tokens,
                cost: e.price.map(|p| p.cost(e.prompt_tokens, e.completion_tokens)),
                ..Usage::default()
            },
            UsageSource::Estimated,
        ),
        (None, None) => (Usage::default(), UsageSource::None),
    }
}

/// What was generated, estimated, for a request that ended without a usage report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub price: Option<ModelPrice>,
}

/// Captured content, cut to [`MAX_CAPTURED_CONTENT_BYTES`] each (a cut input becomes a string preview).
pub fn capture(input: &Value, output: &str) -> CapturedContent {
    let input_json = input.to_string();
    let input = if input_json.len() <= MAX_CAPTURED_CONTENT_BYTES {
        input.clone()
    } else {
        Value::String(format!("{}…", cut(&input_json, MAX_CAPTURED_CONTENT_BYTES)))
    };
    CapturedContent { input, output: cut(output, MAX_CAPTURED_CONTENT_BYTES).to_owned() }
}

fn cut(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reported_usage_wins_over_estimates_and_estimates_are_priced() {
        let usage = Usage { prompt_tokens: 3, completion_tokens: 4, ..Usage::default() };
        let estimate = Estimate { prompt_tokens: 10, completion_tokens: 20, price: None };
        assert_eq!(usage_for(Some(&usage), Some(estimate)), (usage, UsageSource::Reported));
        let (estimated, source) = usage_for(None, Some(estimate));
        assert_eq!((estimated.prompt_tokens, estimated.completion_tokens, source), (10, 20, UsageSource::Estimated));
        assert_eq!(estimated.cost, None, "no price known: reconciliation will tell");
        let price = ModelPrice { prompt: 1e-6, completion: 2e-6, request: 0.001 };
        let (priced, _) = usage_for(None, Some(Estimate { price: Some(price), ..estimate }));
        assert!((priced.cost.unwrap_or_default() - (10e-6 + 40e-6 + 0.001)).abs() < 1e-12);
        assert_eq!(usage_for(None, None).1, UsageSource::None);
    }

    #[test]
    fn captured_content_is_bounded_on_char_boundaries() {
        let big = "é".repeat(MAX_CAPTURED_CONTENT_BYTES);
        let c = capture(&json!([{"role": "user", "content": big}]), &big);
        assert!(c.output.len() <= MAX_CAPTURED_CONTENT_BYTES);
        assert!(c.input.as_str().is_some_and(|s| s.len() <= MAX_CAPTURED_CONTENT_BYTES + 3));
        let small = capture(&json!([{"role": "user", "content": "hi"}]), "yo");
        assert_eq!(small.input, json!([{"role": "user", "content": "hi"}]));
    }

    #[test]
    fn events_round_trip_through_json() {
        let e = UsageEvent {
            request_id: "req_1".into(),
            client_request_id: Some("client-7".into()),
            generation_id: Some("gen-1".into()),
            admitted_at_ms: 2,
            key_id: "k".into(),
            user_id: "u".into(),
            model: "m".into(),
            served_model: Some("m2".into()),
            input_tokens: 1,
            output_tokens: 2,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: 0.5,
            usage_source: UsageSource::Reported,
            latency_ms: 10,
            ttft_ms: Some(3),
            status: 200,
            streamed: true,
            finish_reason: Some("stop".into()),
            error: None,
            timestamp_ms: 1,
            endpoint: Endpoint::ChatCompletions,
            temperature: None,
            max_tokens: 5,
            cache_hit: false,
            saved_cost_usd: 0.0,
            content: None,
        };
        let json = serde_json::to_string(&e).expect("serialize");
        assert!(!json.contains("content") && !json.contains("cache_hit"));
        assert_eq!(serde_json::from_str::<UsageEvent>(&json).expect("parse"), e);
        let hit = UsageEvent { cache_hit: true, saved_cost_usd: 0.25, cost_usd: 0.0, ..e };
        let json = serde_json::to_string(&hit).expect("serialize");
        assert_eq!(serde_json::from_str::<UsageEvent>(&json).expect("parse"), hit);
    }
}
