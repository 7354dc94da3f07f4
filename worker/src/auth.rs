//! API-key authentication: the bearer token, its SHA-256, and a small per-isolate cache of lookups.
//!
//! Only the hash ever leaves this module; the plaintext key is never stored, cached or logged. The cache holds
//! positive *and* negative answers for a short TTL, so a flood of requests (or of bad keys) costs one store query
//! per key per TTL, and a revoked key stops working within that TTL at the latest.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::keys::KeyRecord;

const MAX_KEY_LEN: usize = 256;

/// The key from `Authorization: Bearer <key>`.
pub fn bearer_key(authorization: Option<&str>) -> Result<&str, ApiError> {
    let header = authorization.map(str::trim).filter(|h| !h.is_empty()).ok_or_else(|| {
        ApiError::invalid_api_key(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
        )
    })?;
    let key = match header.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
        _ => return Err(ApiError::invalid_api_key("The Authorization header must use the Bearer scheme.")),
    };
    let plausible = !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic());
    if plausible {
        Ok(key)
    } else {
        Err(invalid_key())
    }
}

pub fn invalid_key() -> ApiError {
    ApiError::invalid_api_key("Incorrect API key provided.")
}

/// Lower-case hex SHA-256 of the key: the only form in which a key is stored or looked up.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[derive(Debug)]
struct CacheEntry {
    key: Option<KeyRecord>,
    expires_at_ms: u64,
}

/// Bounded TTL cache from key hash to lookup result (`None` = no active key with that hash).
#[derive(Debug)]
pub struct AuthCache {
    entries: HashMap<String, CacheEntry>,
    ttl_ms: u64,
    max_entries: usize,
}

impl AuthCache {
    pub fn new(ttl_secs: u64, max_entries: usize) -> Self {
        Self { entries: HashMap::new(), ttl_ms: ttl_secs * 1000, max_entries }
    }

    /// `Some(answer)` when a fresh answer is cached.
    pub fn get(&self, hash: &str, now_ms: u64) -> Option<Option<KeyRecord>> {
        self.entries.get(hash).filter(|e| e.expires_at_ms > now_ms).map(|e| e.key.clone())
    }

    pub fn put(&mut self, hash: String, key: Option<KeyRecord>, now_ms: u64) {
        if self.ttl_ms == 0 || self.max_entries == 0 {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&hash) {
            self.entries.retain(|_, e| e.expires_at_ms > now_ms);
            if self.entries.len() >= self.max_entries {
                // Still full of live entries: drop one arbitrary entry; its key simply pays one more lookup.
                if let Some(victim) = self.entries.keys().next().cloned() {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(hash, CacheEntry { key, expires_at_ms: now_ms + self.ttl_ms });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> KeyRecord {
        KeyRecord { id: id.to_owned(), user_id: "u".to_owned(), ..KeyRecord::default() }
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_key(Some("Bearer sk-abc")).ok(), Some("sk-abc"));
        assert_eq!(bearer_key(Some("bearer   sk-abc  ")).ok(), Some("sk-abc"));
        for bad in [None, Some(""), Some("sk-abc"), Some("Basic dXNlcg=="), Some("Bearer "), Some("Bearer a b")] {
            let e = bearer_key(bad).expect_err("must be rejected");
            assert_eq!(e.status, 401);
            assert_eq!(e.code, Some("invalid_api_key"));
        }
        let long = format!("Bearer {}", "k".repeat(MAX_KEY_LEN + 1));
        assert!(bearer_key(Some(&long)).is_err());
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(key_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn cache_answers_until_ttl_including_negative_answers() {
        let mut cache = AuthCache::new(10, 100);
        cache.put("h1".into(), Some(record("k1")), 1_000);
        cache.put("h2".into(), None, 1_000);
        assert_eq!(cache.get("h1", 10_999), Some(Some(record("k1"))));
        assert_eq!(cache.get("h2", 10_999), Some(None));
        assert_eq!(cache.get("h1", 11_000), None, "expired at exactly the TTL");
        assert_eq!(cache.get("h3", 1_000), None);
    }

    #[test]
    fn cache_is_bounded_and_prefers_evicting_expired_entries() {
        let mut cache = AuthCache::new(1, 3);
        cache.put("old".into(), None, 0);
        cache.put("a".into(), None, 900);
        cache.put("b".into(), None, 900);
        cache.put("c".into(), None, 1_500);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("a", 1_500), Some(None));
        for i in 0..50 {
            cache.put(format!("x{i}"), None, 1_500);
            assert!(cache.len() <= 3);
        }
    }

    #[test]
    fn zero_ttl_disables_caching() {
        let mut cache = AuthCache::new(0, 10);
        cache.put("h".into(), Some(record("k")), 0);
        assert!(cache.is_empty());
    }
}
