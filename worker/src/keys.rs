//! API keys, the pure part: the key format, validation of create/update bodies (limits and the response cache's
//! settings), and the `api_keys` row in the shapes its readers need — [`KeyRecord`] (what authentication,
//! admission and the response cache read), [`KeyRow`] (the admin API's whole row), [`KeyFields`] (what an admin
//! call sets) and [`KeyView`] (what it shows: never the hash).
//!
//! A key reads `sk-gw-<id>-<secret>`: a recognisable prefix, the 12-hex-digit public id (safe in logs and UIs), and
//! 192 random bits. Only its SHA-256 is stored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cache::{Scope, MAX_KEY_TTL_SECS};
use crate::error::ApiError;

pub const KEY_PREFIX: &str = "sk-gw-";

/// Builds a new key from 6 + 24 random bytes: (public id, plaintext key).
pub fn new_key(id_bytes: [u8; 6], secret_bytes: [u8; 24]) -> (String, String) {
    let id = hex::encode(id_bytes);
    let key = format!("{KEY_PREFIX}{id}-{}", hex::encode(secret_bytes));
    (id, key)
}

/// A key id as the admin API accepts it in paths: what `new_key` makes, or the ids of keys inserted by other
/// means (letters, digits, `-`, `_`, up to 64).
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Settable columns of a key, each `Some(value)` when given (`Some(None)` = set to NULL, i.e. no limit).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyFields {
    pub user_id: Option<String>,
    pub name: Option<Option<String>>,
    pub rpm: Option<Option<u64>>,
    pub tpm: Option<Option<u64>>,
    pub usage_limit: Option<Option<u64>>,
    pub budget_period: Option<String>,
    pub usd_limit: Option<Option<f64>>,
    pub max_concurrency: Option<Option<u64>>,
    pub allowed_models: Option<Option<Vec<String>>>,
    pub active: Option<bool>,
    /// The response cache: how long answers are kept (`Some(None)`: only requests that ask are cached), whose
    /// answers an entry serves (`key` or `user`), and whether requests that sample are cached too.
    pub cache_ttl_seconds: Option<Option<u64>>,
    pub cache_scope: Option<String>,
    pub cache_sampled: Option<bool>,
}

const LIMIT_FIELDS: [(&str, u64); 4] = [
    ("rpm", 1_000_000),
    ("tpm", 1_000_000_000_000),
    ("usage_limit", 1_000_000_000_000_000),
    ("max_concurrency", 100_000),
];

/// Parses a `POST /admin/keys` (`creating`) or `PATCH /admin/keys/{id}` body; unknown fields are errors.
pub fn parse_fields(raw: &[u8], creating: bool) -> Result<KeyFields, ApiError> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(raw) else {
        return Err(ApiError::invalid_request("The request body must be a JSON object."));
    };
    let allowed: &[&str] = if creating {
        &[
            "user_id",
            "name",
            "rpm",
            "tpm",
            "usage_limit",
            "budget_period",
            "usd_limit",
            "max_concurrency",
            "allowed_models",
            "cache_ttl_seconds",
            "cache_scope",
            "cache_sampled",
        ]
    } else {
        &[
            "name",
            "rpm",
            "tpm",
            "usage_limit",
            "budget_period",
            "usd_limit",
            "max_concurrency",
            "allowed_models",
            "active",
            "cache_ttl_seconds",
            "cache_scope",
            "cache_sampled",
        ]
    };
    if let Some(unknown) = body.keys().find(|k| !allowed.contains(&k.as_str())) {
        let shown: String = unknown.chars().take(64).collect();
        return Err(ApiError::invalid_param(
            shown.clone(),
            format!("Unknown field '{shown}'. Allowed: {}.", allowed.join(", ")),
        ));
    }
    let mut fields = KeyFields {
        user_id: text(&body, "user_id", 128)?.flatten(),
        name: text(&body, "name", 200)?,
        usd_limit: positive_number(&body, "usd_limit")?,
        allowed_models: model_list(&body)?,
        active: flag(&body, "active")?,
        cache_sampled: flag(&body, "cache_sampled")?,
        cache_ttl_seconds: positive_integer(&body, "cache_ttl_seconds", MAX_KEY_TTL_SECS)?,
        cache_scope: match body.get("cache_scope") {
            None => None,
            Some(Value::String(s)) if Scope::parse(s).is_some() => Some(s.clone()),
            Some(_) => return Err(ApiError::invalid_param("cache_scope", "'cache_scope' must be key or user.")),
        },
        budget_period: match body.get("budget_period") {
            None => None,
            Some(Value::String(p)) if ["day", "month", "lifetime"].contains(&p.as_str()) => Some(p.clone()),
            Some(_) => {
                return Err(ApiError::invalid_param("budget_period", "'budget_period' must be day, month or lifetime."))
            }
        },
        ..KeyFields::default()
    };
    for (field, max) in LIMIT_FIELDS {
        let value = positive_integer(&body, field, max)?;
        match field {
            "rpm" => fields.rpm = value,
            "tpm" => fields.tpm = value,
            "usage_limit" => fields.usage_limit = value,
            _ => fields.max_concurrency = value,
        }
    }
    if creating && fields.user_id.is_none() {
        return Err(ApiError::invalid_param("user_id", "Missing required parameter: 'user_id'."));
    }
    if !creating && body.is_empty() {
        return Err(ApiError::invalid_request("Nothing to update: give at least one field."));
    }
    Ok(fields)
}

fn flag(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_param(field, format!("'{field}' must be true or false."))),
    }
}

/// `None` = absent, `Some(None)` = null, `Some(Some(s))` = a non-empty string without control characters.
fn text(body: &Map<String, Value>, field: &str, max_chars: usize) -> Result<Option<Option<String>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) if field != "user_id" => Ok(Some(None)),
        Some(Value::String(s))
            if !s.trim().is_empty() && s.chars().count() <= max_chars && !s.chars().any(char::is_control) =>
        {
            Ok(Some(Some(s.clone())))
        }
        Some(_) => Err(ApiError::invalid_param(
            field,
            format!(
                "'{field}' must be a non-empty string of at most {max_chars} characters, without control characters."
            ),
        )),
    }
}

fn positive_integer(body: &Map<String, Value>, field: &str, max: u64) -> Result<Option<Option<u64>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(Some(n))),
            _ => Err(ApiError::invalid_param(
                field,
                format!("'{field}' must be an integer from 1 to {max}, or null for no limit."),
            )),
        },
    }
}

fn positive_number(body: &Map<String, Value>, field: &str) -> Result<Option<Option<f64>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x <= 1e9 => Ok(Some(Some(x))),
            _ => Err(ApiError::invalid_param(
                field,
                format!("'{field}' must be a positive number of USD, or null for no limit."),
            )),
        },
    }
}

fn model_list(body: &Map<String, Value>) -> Result<Option<Option<Vec<String>>>, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "allowed_models",
            "'allowed_models' must be a list of 1 to 100 model ids, or null for any model.",
        )
    };
    match body.get("allowed_models") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= 100 => {
            let models = list
                .iter()
                .map(|m| m.as_str().filter(|s| !s.is_empty() && s.len() <= 256).map(str::to_owned))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(invalid)?;
            Ok(Some(Some(models)))
        }
        Some(_) => Err(invalid()),
    }
}

/// What the gateway knows about an active key (one row of `api_keys`); limits left `None` fall back to the
/// gateway's defaults (requests) or to no limit (the rest).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct KeyRecord {
    /// The key's public id: safe to log and show.
    pub id: String,
    pub user_id: String,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    /// Token budget per `budget_period` (the seed's column name).
    pub usage_limit: Option<u64>,
    pub budget_period: Option<String>,
    pub usd_limit: Option<f64>,
    pub max_concurrency: Option<u32>,
    /// JSON array of model ids, or `None` for any model.
    pub allowed_models: Option<String>,
    /// When the row last changed (RFC 3339): the version of the key's limits.
    pub updated_at: String,
    /// The response cache's settings (see `cache::KeySettings`).
    pub cache_ttl_seconds: Option<u64>,
    pub cache_scope: Option<String>,
    #[serde(default)]
    pub cache_sampled: u8,
}

/// One `api_keys` row as the store returns it (everything but the hash).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct KeyRow {
    pub id: String,
    pub user_id: String,
    pub name: Option<String>,
    pub active: u8,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub usage_limit: Option<u64>,
    pub budget_period: String,
    pub usd_limit: Option<f64>,
    pub max_concurrency: Option<u64>,
    pub allowed_models: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub revoked_at: Option<String>,
    pub cache_ttl_seconds: Option<u64>,
    pub cache_scope: String,
    pub cache_sampled: u8,
}

impl KeyRow {
    /// The key as the request path knows it (what authentication reads), for telling its Durable Object.
    pub fn record(&self) -> KeyRecord {
        KeyRecord {
            id: self.id.clone(),
            user_id: self.user_id.clone(),
            rpm: self.rpm.and_then(|n| u32::try_from(n).ok()),
            tpm: self.tpm,
            usage_limit: self.usage_limit,
            budget_period: Some(self.budget_period.clone()),
            usd_limit: self.usd_limit,
            max_concurrency: self.max_concurrency.and_then(|n| u32::try_from(n).ok()),
            allowed_models: self.allowed_models.clone(),
            updated_at: self.updated_at.clone(),
            cache_ttl_seconds: self.cache_ttl_seconds,
            cache_scope: Some(self.cache_scope.clone()),
            cache_sampled: self.cache_sampled,
        }
    }
}

/// A key as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    pub id: String,
    pub object: &'static str,
    pub user_id: String,
    pub name: Option<String>,
    pub active: bool,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub usage_limit: Option<u64>,
    pub budget_period: String,
    pub usd_limit: Option<f64>,
    pub max_concurrency: Option<u64>,
    pub allowed_models: Option<Vec<String>>,
    pub created_at: String,
    pub updated_at: String,
    pub revoked_at: Option<String>,
    pub cache_ttl_seconds: Option<u64>,
    pub cache_scope: String,
    pub cache_sampled: bool,
    /// The plaintext key: present only in the response that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl KeyView {
    pub fn from_row(row: KeyRow) -> KeyView {
        KeyView {
            id: row.id,
            object: "api_key",
            user_id: row.user_id,
            name: row.name,
            active: row.active == 1,
            rpm: row.rpm,
            tpm: row.tpm,
            usage_limit: row.usage_limit,
            budget_period: row.budget_period,
            usd_limit: row.usd_limit,
            max_concurrency: row.max_concurrency,
            allowed_models: row.allowed_models.as_deref().map(crate::admit::parse_allowed_models),
            created_at: row.created_at,
            updated_at: row.updated_at,
            revoked_at: row.revoked_at,
            cache_ttl_seconds: row.cache_ttl_seconds,
            cache_scope: row.cache_scope,
            cache_sampled: row.cache_sampled == 1,
            key: None,
        }
    }
}

/// Compares a presented admin key with the configured one in time independent of where they differ (or of
/// their lengths): both are hashed, then every byte of the digests is compared.
pub fn admin_key_matches(presented: &str, configured: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(configured.as_bytes());
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value, creating: bool) -> Result<KeyFields, ApiError> {
        parse_fields(body.to_string().as_bytes(), creating)
    }

    fn param(body: Value, creating: bool) -> Option<String> {
        parse(body, creating).err().and_then(|e| {
            assert_eq!(e.status, 400);
            e.param.map(String::from)
        })
    }

    #[test]
    fn keys_have_a_prefix_a_public_id_and_a_long_secret() {
        let (id, key) = new_key([0xab; 6], [0x01; 24]);
        assert_eq!(id, "abababababab");
        assert_eq!(key, format!("sk-gw-abababababab-{}", "01".repeat(24)));
        assert!(valid_key_id(&id));
        for bad in ["", "a/b", "a b", "x'--", &"a".repeat(65)] {
            assert!(!valid_key_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn create_needs_a_user_and_accepts_every_limit() {
        let f = parse(
            json!({"user_id": "alice@example.com", "rpm": 120, "tpm": 50000, "usage_limit": 1000000,
                   "budget_period": "month", "usd_limit": 12.5, "max_concurrency": 4, "allowed_models": ["a/b"], "name": "ci"}),
            true,
        )
        .expect("valid");
        assert_eq!(f.user_id.as_deref(), Some("alice@example.com"));
        assert_eq!((f.rpm, f.tpm, f.max_concurrency), (Some(Some(120)), Some(Some(50000)), Some(Some(4))));
        assert_eq!(f.usd_limit, Some(Some(12.5)));
        assert_eq!(f.allowed_models, Some(Some(vec!["a/b".to_owned()])));
        assert_eq!(param(json!({"rpm": 5}), true).as_deref(), Some("user_id"));
    }

    #[test]
    fn wrong_types_ranges_and_unknown_fields_name_the_parameter() {
        let cases = [
            (json!({"user_id": "u", "rpm": 0}), "rpm"),
            (json!({"user_id": "u", "rpm": "60"}), "rpm"),
            (json!({"user_id": "u", "rpm": 1.5}), "rpm"),
            (json!({"user_id": "u", "tpm": -1}), "tpm"),
            (json!({"user_id": "u", "max_concurrency": 1_000_000}), "max_concurrency"),
            (json!({"user_id": "u", "usd_limit": 0}), "usd_limit"),
            (json!({"user_id": "u", "budget_period": "week"}), "budget_period"),
            (json!({"user_id": "u", "allowed_models": []}), "allowed_models"),
            (json!({"user_id": "u", "allowed_models": [1]}), "allowed_models"),
            (json!({"user_id": ""}), "user_id"),
            (json!({"user_id": "a\nb"}), "user_id"),
            (json!({"user_id": 7}), "user_id"),
            (json!({"user_id": "u", "key_hash": "x"}), "key_hash"),
            (json!({"user_id": "u", "active": true}), "active"),
            (json!({"user_id": "u", "cache_ttl_seconds": 0}), "cache_ttl_seconds"),
            (json!({"user_id": "u", "cache_ttl_seconds": 400 * 86_400}), "cache_ttl_seconds"),
            (json!({"user_id": "u", "cache_scope": "everyone"}), "cache_scope"),
            (json!({"user_id": "u", "cache_sampled": 1}), "cache_sampled"),
        ];
        for (body, expected) in cases {
            assert_eq!(param(body.clone(), true).as_deref(), Some(expected), "{body}");
        }
        assert_eq!(param(json!({"active": "no"}), false).as_deref(), Some("active"));
        assert_eq!(param(json!({"user_id": "moved"}), false).as_deref(), Some("user_id"), "a key's owner is fixed");
        assert!(parse(json!({}), false).is_err());
        assert!(parse_fields(b"[]", true).is_err());
    }

    #[test]
    fn cache_settings_are_set_and_cleared() {
        let f = parse(
            json!({"user_id": "u", "cache_ttl_seconds": 3600, "cache_scope": "user", "cache_sampled": true}),
            true,
        )
        .expect("valid");
        assert_eq!(
            (f.cache_ttl_seconds, f.cache_scope.as_deref(), f.cache_sampled),
            (Some(Some(3600)), Some("user"), Some(true))
        );
        let f = parse(json!({"cache_ttl_seconds": null, "cache_scope": "key"}), false).expect("valid");
        assert_eq!((f.cache_ttl_seconds, f.cache_scope.as_deref(), f.cache_sampled), (Some(None), Some("key"), None));
        let row =
            KeyRow { cache_ttl_seconds: Some(60), cache_scope: "user".into(), cache_sampled: 1, ..KeyRow::default() };
        let view = serde_json::to_value(KeyView::from_row(row.clone())).expect("json");
        assert_eq!((view["cache_ttl_seconds"].as_u64(), view["cache_scope"].as_str()), (Some(60), Some("user")));
        assert_eq!(view["cache_sampled"], true);
        let record = row.record();
        assert_eq!(
            (record.cache_ttl_seconds, record.cache_scope.as_deref(), record.cache_sampled),
            (Some(60), Some("user"), 1)
        );
    }

    #[test]
    fn null_clears_a_limit_in_an_update() {
        let f = parse(json!({"rpm": null, "allowed_models": null, "active": false}), false).expect("valid");
        assert_eq!(f.rpm, Some(None));
        assert_eq!(f.allowed_models, Some(None));
        assert_eq!(f.active, Some(false));
        assert_eq!(f.tpm, None, "absent fields stay as they are");
    }

    #[test]
    fn admin_key_comparison() {
        assert!(admin_key_matches("s3cret", "s3cret"));
        assert!(!admin_key_matches("s3cres", "s3cret"));
        assert!(!admin_key_matches("", "s3cret"));
        assert!(!admin_key_matches("s3cret-and-more", "s3cret"));
    }

    #[test]
    fn the_view_never_shows_the_hash() {
        let row = KeyRow { id: "k".into(), active: 1, allowed_models: Some(r#"["m"]"#.into()), ..KeyRow::default() };
        let json = serde_json::to_value(KeyView::from_row(row)).expect("json");
        assert!(json.get("key_hash").is_none() && json.get("key").is_none());
        assert_eq!(json["active"], true);
        assert_eq!(json["allowed_models"], json!(["m"]));
    }
}
