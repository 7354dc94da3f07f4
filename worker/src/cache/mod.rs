//! The response cache, the pure part: whether a request may be answered from KV or have its answer stored there,
//! under which KV key, and the stored entries. The KV calls are `bindings`'; the pipeline's stages
//! `answer_from_cache` and `store_in_cache` use this. Only chat completions (streamed or not, each mode served
//! from the other's answers: [`assemble`] puts a stream back together, [`replay`] plays an answer as a stream)
//! and embeddings are cached.
//!
//! - **Opt-in.** A key's `cache_ttl_seconds` caches that key's deterministic requests (`temperature: 0`, and
//!   embeddings), and its sampled ones too with `cache_sampled`; a request's `Cache-Control: max-age=N` caches it
//!   whatever its temperature (it asked explicitly) and accepts only entries at most N s old; `no-cache` (or
//!   `max-age=0`) skips the read but still stores a fresh answer as the key's settings say; `no-store` keeps the
//!   cache out. Off by default, and `RESPONSE_CACHE_MAX_TTL_SECONDS` bounds every TTL (0 turns it off).
//! - **The key** is a SHA-256 of the endpoint, the scope (the API key's id, or its user's id when the key shares
//!   within its user) and the canonical JSON (sorted keys, integral numbers without a fraction) of the body sent
//!   upstream — the gateway's defaults filled in — without the fields that do not change the answer.
//! - **An entry** is a complete, successful answer with its usage: every choice finished (`stop`, `length`,
//!   `tool_calls`), no error, within KV's value limit.

pub mod assemble;
pub mod replay;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use crate::endpoint::Endpoint;
use crate::keys::KeyRecord;
use crate::usage::Usage;
use crate::validate::ModelRequest;

/// Fields of a request body that do not change the answer: how it is delivered, who the client says asked, and
/// OpenRouter's usage-accounting switch.
const IGNORED_FIELDS: [&str; 4] = ["stream", "stream_options", "user", "usage"];

/// KV's value size limit (25 MiB); larger answers are not stored.
pub const MAX_ENTRY_BYTES: usize = 25 * 1024 * 1024;

/// The longest TTL a key may be given (a year); `RESPONSE_CACHE_MAX_TTL_SECONDS` bounds it further.
pub const MAX_KEY_TTL_SECS: u64 = 365 * 86_400;

const KEY_PREFIX: &str = "response:v1:";

/// The endpoints whose answers are cached.
pub fn cacheable(endpoint: Endpoint) -> bool {
    matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Embeddings)
}

/// What a request's `Cache-Control` header asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Answer from an entry at most this old (0: none), and keep a fresh answer this long.
    MaxAge(u64),
    /// Do not answer from the cache (a fresh answer may still be stored).
    NoCache,
    /// Neither answer from nor store in the cache.
    NoStore,
}

/// Reads `Cache-Control` (comma-separated directives, case-insensitive): `no-store` wins over `no-cache`, which
/// wins over `max-age`. Other directives and a malformed `max-age` are ignored.
pub fn parse_cache_control(header: Option<&str>) -> Option<Directive> {
    let mut max_age = None;
    let (mut no_cache, mut no_store) = (false, false);
    for part in header?.split(',').map(str::trim) {
        let (name, value) = part.split_once('=').map_or((part, None), |(n, v)| (n.trim(), Some(v.trim())));
        match name.to_ascii_lowercase().as_str() {
            "no-store" => no_store = true,
            "no-cache" => no_cache = true,
            "max-age" => max_age = value.and_then(|v| v.trim_matches('"').parse::<u64>().ok()).or(max_age),
            _ => {}
        }
    }
    if no_store {
        Some(Directive::NoStore)
    } else if no_cache {
        Some(Directive::NoCache)
    } else {
        max_age.map(Directive::MaxAge)
    }
}

/// Whose answers an entry may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The key's own requests only.
    #[default]
    Key,
    /// The requests of every key of the same user that shares within its user.
    User,
}

impl Scope {
    pub fn parse(raw: &str) -> Option<Scope> {
        match raw {
            "key" => Some(Scope::Key),
            "user" => Some(Scope::User),
            _ => None,
        }
    }
}

/// A key's cache settings (its `cache_*` columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeySettings {
    /// How long answers to the key's requests are kept; `None`: only requests that ask are cached.
    pub ttl_secs: Option<u64>,
    pub scope: Scope,
    /// Whether the key's TTL also covers requests that sample (temperature above 0, or unset).
    pub sampled: bool,
}

impl KeySettings {
    pub fn of(key: &KeyRecord) -> KeySettings {
        KeySettings {
            ttl_secs: key.cache_ttl_seconds,
            scope: key.cache_scope.as_deref().and_then(Scope::parse).unwrap_or_default(),
            sampled: key.cache_sampled == 1,
        }
    }
}

/// What the cache does for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Answer from an entry at most this old; `None`: do not read.
    pub max_age_secs: Option<u64>,
    /// Store a complete, successful answer for this long.
    pub ttl_secs: u64,
}

/// The cache's policy for a request, or `None` when the cache stays out of it. `temperature` is the request's
/// (unset means the model's default, which samples); `max_ttl_secs` is `RESPONSE_CACHE_MAX_TTL_SECONDS`.
pub fn policy(
    endpoint: Endpoint,
    key: KeySettings,
    directive: Option<Directive>,
    temperature: Option<f64>,
    max_ttl_secs: u64,
) -> Option<Policy> {
    if !cacheable(endpoint) || max_ttl_secs == 0 {
        return None;
    }
    let deterministic = endpoint == Endpoint::Embeddings || temperature == Some(0.0);
    let key_ttl = key.ttl_secs.filter(|_| deterministic || key.sampled);
    let (max_age, ttl) = match directive {
        Some(Directive::NoStore) => return None,
        Some(Directive::MaxAge(secs)) if secs > 0 => (Some(secs), secs),
        Some(Directive::MaxAge(_) | Directive::NoCache) => (None, key_ttl?),
        None => (key_ttl, key_ttl?),
    };
    let bound = |secs: u64| secs.min(max_ttl_secs);
    Some(Policy { max_age_secs: max_age.map(bound), ttl_secs: bound(ttl) })
}

/// The cache's plan for one request: its KV key and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub endpoint: Endpoint,
    pub kv_key: String,
    pub policy: Policy,
}

/// The plan for a validated request of `key`, or `None` when the cache stays out of it.
pub fn plan(request: &ModelRequest, key: &KeyRecord, cache_control: Option<&str>, max_ttl_secs: u64) -> Option<Plan> {
    let settings = KeySettings::of(key);
    let policy =
        policy(request.endpoint, settings, parse_cache_control(cache_control), request.temperature, max_ttl_secs)?;
    let scope = match settings.scope {
        Scope::Key => format!("key:{}", key.id),
        Scope::User => format!("user:{}", key.user_id),
    };
    let kv_key = kv_key(request.endpoint, &scope, &request.forward_body)?;
    Some(Plan { endpoint: request.endpoint, kv_key, policy })
}

/// The KV key of a request's answer; `None` when the body is not a JSON object.
pub fn kv_key(endpoint: Endpoint, scope: &str, body: &str) -> Option<String> {
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(body) else { return None };
    for field in IGNORED_FIELDS {
        fields.remove(field);
    }
    // serde_json's maps are sorted by key, so with numbers normalized this is canonical JSON.
    let canonical = canonical(Value::Object(fields)).to_string();
    let digest = Sha256::new()
        .chain_update(endpoint.as_str())
        .chain_update(b"\n")
        .chain_update(scope)
        .chain_update(b"\n")
        .chain_update(canonical)
        .finalize();
    Some(format!("{KEY_PREFIX}{}", hex::encode(digest)))
}

/// Numbers that are integers written as decimals (`0.0`, `1e2`) as integers, so `temperature: 0` and `0.0` are
/// the same request.
fn canonical(value: Value) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: larger floats are not exact integers
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < EXACT => Value::Number(Number::from(f as i64)),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Object(fields) => Value::Object(fields.into_iter().map(|(k, v)| (k, canonical(v))).collect()),
        other => other,
    }
}

/// One stored answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub stored_at_ms: u64,
    /// The gateway's own expiry (KV keeps an entry at least 60 s).
    pub expires_at_ms: u64,
    /// The answer as the upstream gave it, its `usage` (and `usage.cost`) included: a `chat.completion` (put
    /// together from its stream if it was streamed) or an embeddings `list`.
    pub answer: Value,
}

impl Entry {
    pub fn new(answer: Value, now_ms: u64, ttl_secs: u64) -> Entry {
        Entry { stored_at_ms: now_ms, expires_at_ms: now_ms.saturating_add(ttl_secs.saturating_mul(1000)), answer }
    }

    /// Not expired, and at most `max_age_secs` old.
    pub fn usable(&self, now_ms: u64, max_age_secs: u64) -> bool {
        now_ms < self.expires_at_ms && now_ms.saturating_sub(self.stored_at_ms) <= max_age_secs.saturating_mul(1000)
    }

    /// The `age` header: whole seconds since it was stored.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// What the original answer cost upstream (what a hit saves).
    pub fn original_cost(&self) -> f64 {
        Usage::from_json(&self.answer["usage"]).and_then(|usage| usage.cost).unwrap_or(0.0)
    }

    /// The answer as a hit serves it: the original's usage, at no cost (`usage.cost` is 0 where the upstream
    /// reported one: the client pays nothing for it this time).
    pub fn served(&self) -> Value {
        let mut answer = self.answer.clone();
        if let Some(cost) = answer.get_mut("usage").and_then(|u| u.get_mut("cost")) {
            *cost = Value::from(0.0);
        }
        answer
    }

    /// The entry as KV keeps it; `None` when it is larger than KV takes.
    pub fn encode(&self) -> Option<String> {
        serde_json::to_string(self).ok().filter(|json| json.len() <= MAX_ENTRY_BYTES)
    }
}

/// Whether an answer may be stored: complete and successful, with its usage.
pub fn storable(endpoint: Endpoint, answer: &Value) -> bool {
    let has_usage = answer.get("usage").is_some_and(Value::is_object);
    let no_error = answer.get("error").is_none_or(Value::is_null);
    let ok = match endpoint {
        Endpoint::ChatCompletions => {
            answer["object"] == "chat.completion"
                && answer["choices"].as_array().is_some_and(|choices| {
                    !choices.is_empty()
                        && choices.iter().all(|c| {
                            c["message"].is_object()
                                && matches!(c["finish_reason"].as_str(), Some("stop" | "length" | "tool_calls"))
                        })
                })
        }
        Endpoint::Embeddings => {
            answer["object"] == "list" && answer["data"].as_array().is_some_and(|data| !data.is_empty())
        }
        Endpoint::Completions | Endpoint::Responses => false,
    };
    ok && has_usage && no_error
}

/// Why a miss's answer was or was not stored (the log's `cache_store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Stored,
    /// Failed, cut off, not finished, or without usage.
    Incomplete,
    /// Larger than KV's value limit.
    TooLarge,
    /// KV refused or timed out.
    WriteFailed,
}

impl Stored {
    pub fn label(self) -> &'static str {
        match self {
            Stored::Stored => "stored",
            Stored::Incomplete => "incomplete",
            Stored::TooLarge => "too_large",
            Stored::WriteFailed => "write_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cache_control_directives() {
        assert_eq!(parse_cache_control(None), None);
        assert_eq!(parse_cache_control(Some("max-age=600")), Some(Directive::MaxAge(600)));
        assert_eq!(parse_cache_control(Some("Max-Age = \"60\", private")), Some(Directive::MaxAge(60)));
        assert_eq!(parse_cache_control(Some("max-age=600, no-cache")), Some(Directive::NoCache));
        assert_eq!(parse_cache_control(Some("no-cache, no-store")), Some(Directive::NoStore));
        assert_eq!(parse_cache_control(Some("max-age=soon")), None);
        assert_eq!(parse_cache_control(Some("max-age=-5")), None);
        assert_eq!(parse_cache_control(Some("public")), None);
        assert_eq!(parse_cache_control(Some("")), None);
    }

    const DAY: u64 = 86_400;
    const CHAT: Endpoint = Endpoint::ChatCompletions;

    fn key(ttl: Option<u64>, sampled: bool) -> KeySettings {
        KeySettings { ttl_secs: ttl, scope: Scope::Key, sampled }
    }

    fn both(secs: u64) -> Option<Policy> {
        Some(Policy { max_age_secs: Some(secs), ttl_secs: secs })
    }

    #[test]
    fn the_cache_is_opt_in_and_sampling_needs_an_explicit_ask() {
        // Off by default.
        assert_eq!(policy(CHAT, key(None, false), None, Some(0.0), DAY), None);
        // The key's TTL covers deterministic requests; sampled ones only when the key says so.
        assert_eq!(policy(CHAT, key(Some(300), false), None, Some(0.0), DAY), both(300));
        assert_eq!(policy(CHAT, key(Some(300), false), None, Some(0.7), DAY), None);
        assert_eq!(policy(CHAT, key(Some(300), false), None, None, DAY), None, "unset temperature samples");
        assert_eq!(policy(CHAT, key(Some(300), true), None, Some(0.7), DAY), both(300));
        // Embeddings are deterministic.
        assert_eq!(policy(Endpoint::Embeddings, key(Some(300), false), None, None, DAY), both(300));
        // A request that asks is cached whatever its temperature, for as long as it asks.
        assert_eq!(policy(CHAT, key(None, false), Some(Directive::MaxAge(120)), Some(1.0), DAY), both(120));
        assert_eq!(policy(CHAT, key(Some(300), false), Some(Directive::MaxAge(5)), Some(0.0), DAY), both(5));
    }

    #[test]
    fn no_cache_refreshes_and_no_store_stays_out() {
        let refresh = Some(Policy { max_age_secs: None, ttl_secs: 300 });
        assert_eq!(policy(CHAT, key(Some(300), false), Some(Directive::NoCache), Some(0.0), DAY), refresh);
        assert_eq!(policy(CHAT, key(Some(300), false), Some(Directive::MaxAge(0)), Some(0.0), DAY), refresh);
        assert_eq!(policy(CHAT, key(None, false), Some(Directive::NoCache), Some(0.0), DAY), None, "nothing to do");
        assert_eq!(policy(CHAT, key(Some(300), false), Some(Directive::NoCache), Some(1.0), DAY), None);
        assert_eq!(policy(CHAT, key(Some(300), true), Some(Directive::NoStore), Some(0.0), DAY), None);
    }

    #[test]
    fn the_gateway_bounds_every_ttl_and_can_turn_the_cache_off() {
        assert_eq!(policy(CHAT, key(None, false), Some(Directive::MaxAge(u64::MAX)), None, DAY), both(DAY));
        assert_eq!(policy(CHAT, key(Some(10 * DAY), false), None, Some(0.0), DAY), both(DAY));
        assert_eq!(policy(CHAT, key(Some(300), false), None, Some(0.0), 0), None);
        for endpoint in [Endpoint::Completions, Endpoint::Responses] {
            assert_eq!(policy(endpoint, key(Some(300), true), Some(Directive::MaxAge(60)), Some(0.0), DAY), None);
        }
    }

    #[test]
    fn the_key_ignores_delivery_order_and_number_spelling_but_not_the_scope() {
        let a = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true,"user":"x"}"#;
        let b = r#"{"temperature":0.0, "messages":[{"content":"hi","role":"user"}], "model":"m",
                   "stream_options":{"include_usage":true}, "usage": {"include": true}}"#;
        let key = |scope: &str, body: &str| kv_key(CHAT, scope, body);
        assert_eq!(key("key:k1", a), key("key:k1", b));
        assert_ne!(key("key:k1", a), key("key:k2", a), "another key never shares it");
        assert_ne!(key("key:k1", a), key("user:k1", a));
        assert_ne!(kv_key(CHAT, "key:k1", a), kv_key(Endpoint::Embeddings, "key:k1", a));
        let hotter = a.replace("\"temperature\":0", "\"temperature\":0.1");
        assert_ne!(key("key:k1", a), key("key:k1", &hotter));
        let longer = a.replace("\"model\":\"m\"", "\"model\":\"m\",\"max_tokens\":1e2");
        assert_eq!(key("key:k1", &longer), key("key:k1", &longer.replace("1e2", "100")));
        assert_eq!(key("key:k1", "[1]"), None);
        assert!(key("key:k1", a).is_some_and(|k| k.starts_with(KEY_PREFIX) && k.len() == KEY_PREFIX.len() + 64));
    }

    fn chat_answer(finish: &str) -> Value {
        json!({"id": "gen-1", "object": "chat.completion", "created": 7, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": finish}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.25}})
    }

    #[test]
    fn only_complete_successful_answers_with_usage_are_stored() {
        for finish in ["stop", "length", "tool_calls"] {
            assert!(storable(CHAT, &chat_answer(finish)), "{finish}");
        }
        for finish in ["error", "content_filter"] {
            assert!(!storable(CHAT, &chat_answer(finish)), "{finish}");
        }
        let mut failed = chat_answer("stop");
        failed["error"] = json!({"message": "provider failed"});
        assert!(!storable(CHAT, &failed));
        let mut no_usage = chat_answer("stop");
        no_usage.as_object_mut().map(|o| o.remove("usage"));
        assert!(!storable(CHAT, &no_usage));
        assert!(!storable(CHAT, &json!({"object": "chat.completion", "choices": [], "usage": {}})));
        let embeddings = json!({"object": "list", "data": [{"embedding": [0.5]}], "usage": {"prompt_tokens": 1}});
        assert!(storable(Endpoint::Embeddings, &embeddings));
        assert!(!storable(Endpoint::Embeddings, &json!({"object": "list", "data": [], "usage": {}})));
        assert!(!storable(Endpoint::Completions, &chat_answer("stop")));
    }

    #[test]
    fn entries_expire_and_age_and_hits_cost_nothing() {
        let entry = Entry::new(chat_answer("stop"), 10_000, 60);
        assert!(entry.usable(10_000, 60) && entry.usable(69_999, 600));
        assert!(!entry.usable(70_000, 600), "expired");
        assert!(!entry.usable(15_001, 5), "older than the request accepts");
        assert_eq!(entry.age_secs(12_999), 2);
        assert_eq!(entry.original_cost(), 0.25);
        let served = entry.served();
        assert_eq!(served["usage"]["cost"], 0.0);
        assert_eq!(served["usage"]["prompt_tokens"], 3);
        assert_eq!(served["choices"], entry.answer["choices"]);
        let decoded: Entry = serde_json::from_str(&entry.encode().expect("small")).expect("json");
        assert_eq!(decoded, entry);
        let huge = Entry::new(json!({"blob": "x".repeat(MAX_ENTRY_BYTES)}), 0, 60);
        assert_eq!(huge.encode(), None);
    }
}
