//! `GET /v1/models`: OpenRouter's model list in OpenAI's shape, and the freshness rule of its KV cache.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What the KV cache stores: the rendered OpenAI list and when it was fetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedModels {
    pub fetched_at_ms: u64,
    pub body: String,
}

impl CachedModels {
    pub fn is_fresh(&self, now_ms: u64, ttl_secs: u64) -> bool {
        now_ms.saturating_sub(self.fetched_at_ms) < ttl_secs * 1000
    }
}

/// KV's minimum expiration; shorter TTLs are enforced with `fetched_at_ms` instead.
pub const KV_MIN_TTL_SECS: u64 = 60;

/// Converts OpenRouter's `{"data":[{id, created, context_length, pricing, ...}]}` into
/// `{"object":"list","data":[{id, object:"model", created, owned_by, ...}]}`. `None` if the body is not a list.
pub fn to_openai_list(openrouter_bodies: &[&[u8]]) -> Option<String> {
    let mut lists = Vec::with_capacity(openrouter_bodies.len());
    for body in openrouter_bodies {
        let mut parsed: Value = serde_json::from_slice(body).ok()?;
        let Value::Array(list) = parsed.get_mut("data")?.take() else { return None };
        lists.push(list);
    }
    let mut seen = std::collections::HashSet::new();
    let data: Vec<Value> = lists
        .iter()
        .flatten()
        .filter(|m| m.get("id").and_then(Value::as_str).is_some_and(|id| seen.insert(id.to_owned())))
        .filter_map(|m| {
            let id = m.get("id")?.as_str()?;
            let owned_by = id.split_once('/').map_or("openrouter", |(owner, _)| owner);
            let mut model = json!({
                "id": id,
                "object": "model",
                "created": m.get("created").and_then(Value::as_i64).unwrap_or(0),
                "owned_by": owned_by,
            });
            // Extra facts OpenAI clients ignore and gateway users find useful.
            for field in ["name", "context_length", "pricing"] {
                if let Some(v) = m.get(field) {
                    model[field] = v.clone();
                }
            }
            Some(model)
        })
        .collect();
    serde_json::to_string(&json!({"object": "list", "data": data})).ok()
}

/// One model of the gateway's list (`GET /v1/models/{id}`), as the list shows it.
pub fn find(list: &str, id: &str) -> Option<String> {
    let parsed: Value = serde_json::from_str(list).ok()?;
    let model = parsed.get("data")?.as_array()?.iter().find(|m| m.get("id").and_then(Value::as_str) == Some(id))?;
    serde_json::to_string(model).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_model_is_found_by_its_exact_id() {
        let list = to_openai_list(&[br#"{"data":[{"id":"openai/gpt-4o-mini","created":1},{"id":"x/y:free"}]}"#])
            .expect("list");
        let found: Value = serde_json::from_str(&find(&list, "x/y:free").expect("found")).expect("json");
        assert_eq!(
            (found["id"].as_str(), found["object"].as_str(), found["owned_by"].as_str()),
            (Some("x/y:free"), Some("model"), Some("x"))
        );
        assert_eq!(find(&list, "openai/gpt-4o"), None);
        assert_eq!(find(&list, "OPENAI/GPT-4O-MINI"), None);
        assert_eq!(find("not json", "x"), None);
    }

    #[test]
    fn converts_openrouter_models_to_openai_shape() {
        let body = br#"{"data":[{"id":"openai/gpt-4o-mini","name":"GPT-4o mini","created":1721260800,
            "context_length":128000,"pricing":{"prompt":"0.00000015"},"architecture":{}},
            {"id":"weird-no-owner"},{"name":"no id"}]}"#;
        let out: Value = serde_json::from_str(&to_openai_list(&[body]).expect("list")).expect("json");
        assert_eq!(out["object"], "list");
        let data = out["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        assert_eq!(data[0]["id"], "openai/gpt-4o-mini");
        assert_eq!(data[0]["object"], "model");
        assert_eq!(data[0]["created"], 1721260800);
        assert_eq!(data[0]["owned_by"], "openai");
        assert_eq!(data[0]["context_length"], 128000);
        assert!(data[0].get("architecture").is_none());
        assert_eq!(data[1]["owned_by"], "openrouter");
    }

    #[test]
    fn non_list_bodies_are_rejected() {
        assert!(to_openai_list(&[b"<html>"]).is_none());
        assert!(to_openai_list(&[b"{\"data\":{}}"]).is_none());
    }

    #[test]
    fn text_and_embedding_models_are_one_list_without_repeats() {
        let text = br#"{"data":[{"id":"a/chat"},{"id":"b/both"}]}"#;
        let embeddings = br#"{"data":[{"id":"e/embed","pricing":{"prompt":"0.00000002"}},{"id":"b/both"}]}"#;
        let out: Value = serde_json::from_str(&to_openai_list(&[text, embeddings]).expect("list")).expect("json");
        let ids: Vec<&str> = out["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(ids, ["a/chat", "b/both", "e/embed"]);
        assert_eq!(out["data"][2]["pricing"]["prompt"], "0.00000002");
    }

    #[test]
    fn freshness_follows_the_ttl() {
        let c = CachedModels { fetched_at_ms: 10_000, body: String::new() };
        assert!(c.is_fresh(10_000, 5));
        assert!(c.is_fresh(14_999, 5));
        assert!(!c.is_fresh(15_000, 5));
        assert!(!c.is_fresh(10_000, 0));
    }
}
