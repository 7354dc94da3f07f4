//! PostHog LLM analytics: `$ai_generation` events (chat, legacy completions, responses) and `$ai_embedding`
//! events (embeddings) in PostHog's schema, and what a `/batch/` answer means.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::endpoint::Endpoint;
use crate::pricing::ModelPrice;
use crate::usage_event::UsageEvent;

/// What to do with the events of a batch after PostHog answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// Throttled, timed out, or a server error: try again later.
    Retry,
    /// A client error other than 408/429 (bad key, malformed): retrying cannot help.
    Rejected,
}

pub fn classify(status: Option<u16>) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Sent,
        Some(408 | 429) | Some(500..=599) | None => Delivery::Retry,
        Some(_) => Delivery::Rejected,
    }
}

/// A stable UUID for a request id (RFC 9562 version 8: SHA-256 based), so a re-sent event keeps its identity.
pub fn event_uuid(request_id: &str) -> String {
    let digest = Sha256::digest(format!("openrouter-gateway:{request_id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Splits OpenRouter's total cost into input and output parts. PostHog keeps the costs we send only when both
/// parts are present, so both always are: by the model's prices when known, else by token share.
pub fn split_cost(total: f64, input_tokens: u64, output_tokens: u64, prices: Option<ModelPrice>) -> (f64, f64) {
    let input = match prices {
        Some(p) => {
            let priced_input = input_tokens as f64 * p.prompt;
            let priced_total = priced_input + output_tokens as f64 * p.completion;
            if priced_total > 0.0 {
                total * priced_input / priced_total
            } else {
                0.0
            }
        }
        None if input_tokens + output_tokens > 0 => total * input_tokens as f64 / (input_tokens + output_tokens) as f64,
        None => 0.0,
    };
    (input, total - input)
}

/// One analytics event: `$ai_embedding` for embeddings (input tokens and the cost only: nothing is generated),
/// `$ai_generation` for the others. `timestamp` is the request's start as RFC 3339.
pub fn ai_event(
    event: &UsageEvent,
    timestamp: &str,
    upstream_base_url: &str,
    prices: Option<ModelPrice>,
    capture_content: bool,
) -> Value {
    let embedding = event.endpoint == Endpoint::Embeddings;
    let (input_cost, output_cost) = split_cost(event.cost_usd, event.input_tokens, event.output_tokens, prices);
    let mut p = Map::new();
    let mut put = |k: &str, v: Value| {
        p.insert(k.to_owned(), v);
    };
    put("$ai_trace_id", json!(event.request_id));
    put("$ai_model", json!(event.served_model.as_deref().unwrap_or(&event.model)));
    put("$ai_provider", json!("openrouter"));
    put("$ai_input_tokens", json!(event.input_tokens));
    put("$ai_latency", json!(event.latency_ms as f64 / 1000.0));
    put("$ai_http_status", json!(event.status));
    put("$ai_base_url", json!(upstream_base_url));
    put("$ai_is_error", json!(event.error.is_some() || event.status >= 400));
    if let Some(error) = &event.error {
        put("$ai_error", json!(error));
    }
    put("$ai_total_cost_usd", json!(event.cost_usd));
    put("$ai_span_name", json!(event.endpoint.span_name()));
    put("requested_model", json!(event.model));
    put("api_key_id", json!(event.key_id));
    put("usage_source", json!(event.usage_source.as_str()));
    // The gateway's response cache (not the provider's prompt cache, which `$ai_cache_read_input_tokens` counts):
    // a hit cost nothing; `cache_saved_usd` is what its original answer cost.
    put("cache_hit", json!(event.cache_hit));
    if event.cache_hit {
        put("cache_saved_usd", json!(event.saved_cost_usd));
    }
    if let Some(client_id) = &event.client_request_id {
        put("client_request_id", json!(client_id));
    }
    if let Some(generation_id) = &event.generation_id {
        put("generation_id", json!(generation_id));
    }
    let content = event.content.as_ref().filter(|_| capture_content);
    if embedding {
        put("$ai_input_cost_usd", json!(event.cost_usd));
        put("$ai_output_cost_usd", json!(0.0));
        if let Some(content) = content {
            put("$ai_input", content.input.clone());
        }
    } else {
        put("$ai_output_tokens", json!(event.output_tokens));
        put("$ai_cache_read_input_tokens", json!(event.cached_tokens));
        // OpenRouter's prompt_tokens already include cached ones; PostHog must not add them again.
        put("$ai_cache_reporting_exclusive", json!(false));
        put("$ai_reasoning_tokens", json!(event.reasoning_tokens));
        if let Some(ttft) = event.ttft_ms {
            put("$ai_time_to_first_token", json!(ttft as f64 / 1000.0));
        }
        put("$ai_stream", json!(event.streamed));
        if let Some(t) = event.temperature {
            put("$ai_temperature", json!(t));
        }
        put("$ai_max_tokens", json!(event.max_tokens));
        put("$ai_input_cost_usd", json!(input_cost));
        put("$ai_output_cost_usd", json!(output_cost));
        if let Some(reason) = &event.finish_reason {
            put("$ai_stop_reason", json!(reason));
        }
        if let Some(content) = content {
            put("$ai_input", content.input.clone());
            put("$ai_output_choices", json!([{"role": "assistant", "content": content.output}]));
        }
    }
    json!({
        "event": if embedding { "$ai_embedding" } else { "$ai_generation" },
        "distinct_id": event.user_id,
        "uuid": event_uuid(&event.request_id),
        "timestamp": timestamp,
        "properties": Value::Object(p),
    })
}

/// The body of `POST {host}/batch/`.
pub fn batch_body(api_key: &str, events: Vec<Value>) -> Value {
    json!({"api_key": api_key, "batch": events})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage_event::{CapturedContent, UsageSource};

    fn event() -> UsageEvent {
        UsageEvent {
            request_id: "req_abc".into(),
            client_request_id: None,
            generation_id: Some("gen-1".into()),
            admitted_at_ms: 0,
            key_id: "key1".into(),
            user_id: "alice".into(),
            model: "openai/gpt-4o-mini".into(),
            served_model: Some("openai/gpt-4o-mini-2024".into()),
            input_tokens: 100,
            output_tokens: 50,
            cached_tokens: 20,
            reasoning_tokens: 5,
            cost_usd: 0.002,
            usage_source: UsageSource::Reported,
            latency_ms: 1534,
            ttft_ms: Some(210),
            status: 200,
            streamed: true,
            finish_reason: Some("stop".into()),
            error: None,
            timestamp_ms: 0,
            endpoint: Endpoint::ChatCompletions,
            temperature: Some(0.2),
            max_tokens: 500,
            cache_hit: false,
            saved_cost_usd: 0.0,
            content: Some(CapturedContent {
                input: json!([{"role": "user", "content": "hi"}]),
                output: "hello".into(),
            }),
        }
    }

    #[test]
    fn generation_event_uses_posthog_names_and_units() {
        let v = ai_event(&event(), "2026-11-27T13:08:30.000Z", "https://openrouter.ai/api/v1", None, false);
        assert_eq!(v["event"], "$ai_generation");
        assert_eq!(v["distinct_id"], "alice");
        assert_eq!(v["timestamp"], "2026-11-27T13:08:30.000Z");
        let p = &v["properties"];
        assert_eq!(p["$ai_latency"], 1.534, "seconds, not milliseconds");
        assert_eq!(p["$ai_time_to_first_token"], 0.21);
        assert_eq!(p["$ai_model"], "openai/gpt-4o-mini-2024", "the model that served");
        assert_eq!(p["$ai_trace_id"], "req_abc");
        assert_eq!(p["$ai_input_tokens"], 100);
        assert_eq!(p["$ai_output_tokens"], 50);
        assert_eq!(p["$ai_cache_read_input_tokens"], 20);
        assert_eq!(p["$ai_cache_reporting_exclusive"], false);
        assert_eq!(p["$ai_stream"], true);
        assert_eq!(p["$ai_is_error"], false);
        assert_eq!(p["$ai_http_status"], 200);
        let total = p["$ai_input_cost_usd"].as_f64().unwrap() + p["$ai_output_cost_usd"].as_f64().unwrap();
        assert!((total - 0.002).abs() < 1e-12);
        assert_eq!(p["$ai_total_cost_usd"], 0.002);
        assert!(p.get("$ai_input").is_none() && p.get("$ai_output_choices").is_none(), "privacy by default");
        assert_eq!(p["$ai_span_name"], "chat.completions");
        assert_eq!(p["cache_hit"], false);
        assert!(p.get("cache_saved_usd").is_none());
    }

    #[test]
    fn a_cache_hit_costs_nothing_and_says_what_it_saved() {
        let hit = UsageEvent { cost_usd: 0.0, cache_hit: true, saved_cost_usd: 0.002, ..event() };
        let v = ai_event(&hit, "t", "u", Some(ModelPrice { prompt: 1e-6, completion: 2e-6, request: 0.0 }), false);
        let p = &v["properties"];
        assert_eq!((p["cache_hit"].as_bool(), p["cache_saved_usd"].as_f64()), (Some(true), Some(0.002)));
        for cost in ["$ai_total_cost_usd", "$ai_input_cost_usd", "$ai_output_cost_usd"] {
            assert_eq!(p[cost], 0.0, "{cost}");
        }
        assert_eq!((p["$ai_input_tokens"].as_u64(), p["$ai_output_tokens"].as_u64()), (Some(100), Some(50)));
    }

    #[test]
    fn embeddings_are_ai_embedding_events_without_output() {
        let e =
            UsageEvent { endpoint: Endpoint::Embeddings, output_tokens: 0, ttft_ms: None, streamed: false, ..event() };
        let v = ai_event(&e, "t", "u", None, true);
        assert_eq!(v["event"], "$ai_embedding");
        let p = &v["properties"];
        assert_eq!((p["$ai_input_tokens"].as_u64(), p["$ai_total_cost_usd"].as_f64()), (Some(100), Some(0.002)));
        assert_eq!((p["$ai_span_name"].as_str(), p["$ai_input_cost_usd"].as_f64()), (Some("embeddings"), Some(0.002)));
        for absent in ["$ai_output_tokens", "$ai_stream", "$ai_max_tokens", "$ai_output_choices", "$ai_stop_reason"] {
            assert!(p.get(absent).is_none(), "{absent}");
        }
        assert_eq!(p["$ai_input"][0]["content"], "hi", "the input, with capture on");
        let r = UsageEvent { endpoint: Endpoint::Responses, ..event() };
        let v = ai_event(&r, "t", "u", None, false);
        assert_eq!(
            (v["event"].as_str(), v["properties"]["$ai_span_name"].as_str()),
            (Some("$ai_generation"), Some("responses"))
        );
    }

    #[test]
    fn content_is_sent_only_when_capture_is_on() {
        let v = ai_event(&event(), "t", "u", None, true);
        assert_eq!(v["properties"]["$ai_input"][0]["content"], "hi");
        assert_eq!(v["properties"]["$ai_output_choices"][0]["content"], "hello");
    }

    #[test]
    fn uuid_is_stable_distinct_and_well_formed() {
        let a = event_uuid("req_1");
        assert_eq!(a, event_uuid("req_1"));
        assert_ne!(a, event_uuid("req_2"));
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('8'), "version 8");
        assert!(matches!(parts[3].chars().next(), Some('8' | '9' | 'a' | 'b')), "RFC variant");
    }

    #[test]
    fn cost_split_by_price_or_token_share_always_sums_to_the_total() {
        let (i, o) = split_cost(1.0, 100, 100, Some(ModelPrice { prompt: 1e-6, completion: 3e-6, request: 0.0 }));
        assert!((i - 0.25).abs() < 1e-12 && (o - 0.75).abs() < 1e-12);
        let (i, o) = split_cost(0.9, 200, 100, None);
        assert!((i - 0.6).abs() < 1e-12 && (o - 0.3).abs() < 1e-12);
        assert_eq!(split_cost(0.0, 0, 0, None), (0.0, 0.0));
    }

    #[test]
    fn responses_are_classified_like_posthog_documents() {
        assert_eq!(classify(Some(200)), Delivery::Sent);
        for retry in [Some(408), Some(429), Some(500), Some(503), None] {
            assert_eq!(classify(retry), Delivery::Retry, "{retry:?}");
        }
        for reject in [Some(400), Some(401), Some(413)] {
            assert_eq!(classify(reject), Delivery::Rejected);
        }
    }
}
