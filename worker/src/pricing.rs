//! Model prices from OpenRouter's model list, and what they make of a request: its USD worst case (reserved
//! at admission against a key's USD budget) and the cost of an estimated usage (a request that ended without a
//! usage report). Pure.

use std::collections::HashMap;

use serde::Deserialize;

/// USD per token (and per request) of one model. OpenRouter prices are decimal strings; a negative one (such as
/// `openrouter/auto`'s "-1", "depends on the routed model") means the price is not known in advance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    pub prompt: f64,
    pub completion: f64,
    pub request: f64,
}

impl ModelPrice {
    /// What `prompt` and `completion` tokens cost.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        prompt_tokens as f64 * self.prompt + completion_tokens as f64 * self.completion + self.request
    }
}

/// Prices by model id; models without a known price are absent.
pub type PriceTable = HashMap<String, ModelPrice>;

/// The prices in a model list (OpenRouter's shape or the gateway's OpenAI-shaped copy: both carry
/// `data[].id` and `data[].pricing`).
pub fn price_table(list_json: &str) -> PriceTable {
    #[derive(Deserialize)]
    struct List {
        #[serde(default)]
        data: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        id: Option<String>,
        pricing: Option<HashMap<String, serde_json::Value>>,
    }
    let Ok(list) = serde_json::from_str::<List>(list_json) else { return PriceTable::new() };
    list.data
        .into_iter()
        .filter_map(|entry| {
            let pricing = entry.pricing?;
            let field = |name: &str| -> Option<f64> {
                let v = pricing.get(name)?;
                let price = v.as_str().and_then(|s| s.trim().parse::<f64>().ok()).or_else(|| v.as_f64())?;
                (price.is_finite() && price >= 0.0).then_some(price)
            };
            let price = ModelPrice {
                prompt: field("prompt")?,
                completion: field("completion")?,
                request: if pricing.contains_key("request") { field("request")? } else { 0.0 },
            };
            Some((entry.id?, price))
        })
        .collect()
}

/// The most a request can cost: its prompt estimate and its output bound (`max_tokens × n`) at the dearest of
/// the models that may serve it. `Err(model)` names a model whose price is unknown.
pub fn worst_case_usd<'a>(
    prices: &PriceTable,
    models: &'a [String],
    prompt_tokens: u64,
    output_tokens: u64,
) -> Result<f64, &'a str> {
    let mut worst: f64 = 0.0;
    for model in models {
        let price = prices.get(model).ok_or(model.as_str())?;
        worst = worst.max(price.cost(prompt_tokens, output_tokens));
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> PriceTable {
        price_table(
            &json!({"data": [
                {"id": "a/cheap", "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0"}},
                {"id": "b/dear", "pricing": {"prompt": "0.00001", "completion": "0.00003", "request": "0.0005"}},
                {"id": "c/none"},
                {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
                {"id": "d/numbers", "pricing": {"prompt": 0.5, "completion": 1}},
                {"id": "e/bad", "pricing": {"prompt": "cheap", "completion": "0"}}
            ]})
            .to_string(),
        )
    }

    #[test]
    fn prices_are_read_from_strings_or_numbers_and_unknown_ones_are_absent() {
        let t = table();
        assert_eq!(t.get("a/cheap"), Some(&ModelPrice { prompt: 1e-6, completion: 2e-6, request: 0.0 }));
        assert_eq!(t.get("d/numbers"), Some(&ModelPrice { prompt: 0.5, completion: 1.0, request: 0.0 }));
        for unknown in ["c/none", "openrouter/auto", "e/bad", "z/missing"] {
            assert!(!t.contains_key(unknown), "{unknown}");
        }
        assert!(price_table("<html>").is_empty());
    }

    #[test]
    fn the_worst_case_is_the_dearest_candidate_with_its_request_price() {
        let t = table();
        let models = vec!["a/cheap".to_owned(), "b/dear".to_owned()];
        let worst = worst_case_usd(&t, &models, 100, 1_000).expect("priced");
        assert!((worst - (100.0 * 1e-5 + 1_000.0 * 3e-5 + 0.0005)).abs() < 1e-12);
        let cheap = worst_case_usd(&t, &models[..1], 100, 1_000).expect("priced");
        assert!((cheap - 0.0021).abs() < 1e-12);
        let with_unknown = vec!["a/cheap".to_owned(), "c/none".to_owned()];
        assert_eq!(worst_case_usd(&t, &with_unknown, 1, 1), Err("c/none"));
    }
}
