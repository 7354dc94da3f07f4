//! Token usage as OpenRouter reports it (in a completion body, the final stream chunk, a Responses object or an
//! embeddings list), read leniently:
//! a missing or oddly typed field is a zero, never a failed request, and absurd values are clamped to what one
//! request can account for ([`Amount::MAX_TOKENS`], [`Amount::MAX_USD`]).

use key_limiter::protocol::Amount;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache (already included in `prompt_tokens`).
    pub cached_tokens: u64,
    /// Reasoning tokens (already included in `completion_tokens`).
    pub reasoning_tokens: u64,
    /// OpenRouter's charge for the request, in USD credits; `None` when the upstream did not say.
    pub cost: Option<f64>,
}

impl Usage {
    /// Reads an OpenAI/OpenRouter `usage` object: chat's names (`prompt_tokens`, `completion_tokens`, `…_details`)
    /// or the Responses API's (`input_tokens`, `output_tokens`, `input_tokens_details`, `output_tokens_details`).
    pub fn from_json(usage: &Value) -> Option<Usage> {
        let usage = usage.as_object()?;
        let count = |v: Option<&Value>| {
            v.and_then(Value::as_f64)
                .filter(|n| n.is_finite() && *n >= 0.0)
                .map_or(0, |n| (n as u64).min(Amount::MAX_TOKENS))
        };
        let either = |chat: &str, responses: &str| usage.get(chat).or_else(|| usage.get(responses));
        let nested =
            |chat: &str, responses: &str, inner: &str| count(either(chat, responses).and_then(|o| o.get(inner)));
        Some(Usage {
            prompt_tokens: count(either("prompt_tokens", "input_tokens")),
            completion_tokens: count(either("completion_tokens", "output_tokens")),
            cached_tokens: nested("prompt_tokens_details", "input_tokens_details", "cached_tokens"),
            reasoning_tokens: nested("completion_tokens_details", "output_tokens_details", "reasoning_tokens"),
            cost: usage
                .get("cost")
                .and_then(Value::as_f64)
                .filter(|c| c.is_finite() && *c >= 0.0)
                .map(|c| c.min(Amount::MAX_USD)),
        })
    }

    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_openrouter_usage_with_details_and_cost() {
        let u = Usage::from_json(&json!({
            "prompt_tokens": 194, "completion_tokens": 2, "total_tokens": 196,
            "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 1}, "cost": 0.95, "is_byok": false
        }))
        .expect("usage");
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 194,
                completion_tokens: 2,
                cached_tokens: 10,
                reasoning_tokens: 1,
                cost: Some(0.95)
            }
        );
        assert_eq!(u.total_tokens(), 196);
    }

    #[test]
    fn reads_responses_and_embeddings_usage() {
        let u = Usage::from_json(&json!({"input_tokens": 36, "input_tokens_details": {"cached_tokens": 6},
            "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 123, "cost": 0.01}))
        .expect("usage");
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 36,
                completion_tokens: 87,
                cached_tokens: 6,
                reasoning_tokens: 40,
                cost: Some(0.01)
            }
        );
        let e = Usage::from_json(&json!({"prompt_tokens": 8, "total_tokens": 8, "cost": 0.0000016})).expect("usage");
        assert_eq!((e.prompt_tokens, e.completion_tokens, e.cost), (8, 0, Some(0.0000016)));
    }

    #[test]
    fn odd_fields_become_zero_or_none() {
        let u = Usage::from_json(&json!({"prompt_tokens": "7", "completion_tokens": -1, "cost": null})).expect("usage");
        assert_eq!(u, Usage::default());
        assert!(Usage::from_json(&json!(null)).is_none());
    }

    #[test]
    fn absurd_counts_are_clamped() {
        let u = Usage::from_json(&json!({"prompt_tokens": 1e30, "completion_tokens": u64::MAX, "cost": 1e300}))
            .expect("usage");
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Amount::MAX_TOKENS, Amount::MAX_TOKENS));
        assert_eq!(u.cost, Some(Amount::MAX_USD));
        assert_eq!(u.total_tokens(), 2 * Amount::MAX_TOKENS);
    }
}
