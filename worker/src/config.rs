//! Environment strings → a validated [`Config`], in one step.
//!
//! Parsing is pure (it reads through a lookup function), so every rule here has a native unit test; the Worker
//! builds the lookup from `Env` once per isolate. A bad value is a startup error that names the variable, never a
//! silently ignored default.

use std::fmt;

pub const DEFAULT_OPENROUTER_BASE_URL: &str = "https://openrouter.ai/api/v1";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where API keys and the usage ledger live (`DB_PROVIDER`).
    pub store: StoreKind,
    /// Base URL requests are forwarded to; `/chat/completions` and `/models` are appended.
    pub upstream_base_url: String,
    pub openrouter_api_key: Option<Secret>,
    pub default_model: String,
    pub max_tokens_default: u32,
    /// Ceiling for a request's `max_tokens` / `max_completion_tokens`.
    pub max_tokens_limit: u32,
    pub max_request_bytes: usize,
    /// How long the client may take to send its request body.
    pub client_body_timeout_secs: u64,
    /// Bounds every upstream wait: the response headers, the silence between stream chunks, a non-streamed
    /// body, an error body.
    pub upstream_timeout_secs: u64,
    /// Longest `models` fallback list accepted.
    pub max_fallback_models: usize,
    pub referer: String,
    pub title: String,
    pub allowed_origins: AllowedOrigins,
    pub rate_limit_per_minute: u32,
    /// Length of the sliding windows (60 in production; shorter only to test the window sliding).
    pub rate_limit_window_secs: u64,
    /// How long an admitted request may stay unsettled before the limiter charges its reservation.
    pub reservation_lease_secs: u64,
    /// Admit requests when the limiter cannot be reached (default: refuse them with a 503). Revocation and
    /// allowed models are still enforced, from a fresh read of the key.
    pub limiter_fail_open: bool,
    /// Bounds each call to a key's Durable Object.
    pub limiter_timeout_ms: u64,
    /// How long an isolate may admit a key's requests from a lease its object granted (0: no leases).
    pub admission_lease_ms: u64,
    /// When a client leaves mid-stream: cancel the upstream (stop paying) or drain it (bill its exact usage).
    pub drain_on_client_abort: bool,
    /// How long a drain may read after the client left (the platform keeps work after a disconnect alive for
    /// 30 s, and billing must still run after it).
    pub drain_timeout_secs: u64,
    /// What a key with a USD budget does with a model whose price is unknown.
    pub unpriced_model: UnpricedModel,
    /// Reconcile requests billed by estimate with OpenRouter's own accounting (`GET /generation`).
    pub reconcile_estimates: bool,
    /// How many times a reconciliation is tried (with backoff) before the estimate stands.
    pub reconcile_max_attempts: u32,
    pub models_cache_ttl_secs: u64,
    /// The longest any answer is kept in the response cache, whatever a key or a request asks (0: the response
    /// cache is off).
    pub response_cache_max_ttl_secs: u64,
    pub auth_cache_ttl_secs: u64,
    pub auth_cache_max_entries: usize,
    pub posthog: Option<PostHogConfig>,
    /// Enables the admin API (`/admin/*`); without it those routes do not exist.
    pub admin_api_key: Option<Secret>,
}

/// The key store: D1, or PostgreSQL (Neon) through the `HYPERDRIVE` binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    D1,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl StoreKind {
    fn parse(raw: &str) -> Result<Self, ConfigError> {
        let problem = match raw.to_ascii_lowercase().as_str() {
            "d1" => return Ok(Self::D1),
            #[cfg(feature = "postgres")]
            "neon" => return Ok(Self::Postgres),
            #[cfg(not(feature = "postgres"))]
            "neon" => "'neon' needs the Postgres build of the Worker (worker/build-postgres, built by \
                       scripts/build.sh); this build has only D1"
                .to_owned(),
            other => format!("'{other}' is not a store: use 'd1' or 'neon'"),
        };
        Err(ConfigError { variable: "DB_PROVIDER", problem })
    }
}

/// The worst case of a request to a model without a known price cannot be computed: refuse it, or reserve a
/// fixed amount of USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnpricedModel {
    Refuse,
    Reserve(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostHogConfig {
    pub api_key: Secret,
    pub host: String,
    /// Send prompts and answers (`$ai_input`, `$ai_output_choices`); off unless asked for (privacy).
    pub capture_content: bool,
}

/// A value that must never reach a log line or a response: Debug prints stars.
#[derive(Clone, PartialEq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AllowedOrigins {
    Any,
    List(Vec<String>),
}

impl AllowedOrigins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(list) => list.iter().any(|o| o == origin),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration {}: {}", self.variable, self.problem)
    }
}

impl Config {
    /// `lookup(name)` returns the variable's value (a var or a secret), or `None` when unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());

        let store = StoreKind::parse(get("DB_PROVIDER").as_deref().unwrap_or("d1"))?;

        let upstream_base_url = match get("CF_AI_GATEWAY_URL") {
            Some(url) => parse_base_url("CF_AI_GATEWAY_URL", &url)?,
            None => parse_base_url(
                "OPENROUTER_BASE_URL",
                &get("OPENROUTER_BASE_URL").unwrap_or_else(|| DEFAULT_OPENROUTER_BASE_URL.to_owned()),
            )?,
        };

        let max_tokens_default = parse_num("MAX_TOKENS_DEFAULT", get("MAX_TOKENS_DEFAULT"), 4096, 1, u32::MAX)?;
        let max_tokens_limit = parse_num("MAX_TOKENS_LIMIT", get("MAX_TOKENS_LIMIT"), 65_536, 1, u32::MAX)?;
        if max_tokens_default > max_tokens_limit {
            return Err(ConfigError {
                variable: "MAX_TOKENS_DEFAULT",
                problem: format!("{max_tokens_default} exceeds MAX_TOKENS_LIMIT ({max_tokens_limit})"),
            });
        }

        let posthog = match get("POSTHOG_API_KEY") {
            None => None,
            Some(key) => Some(PostHogConfig {
                api_key: Secret(key),
                host: parse_base_url(
                    "POSTHOG_HOST",
                    &get("POSTHOG_HOST").unwrap_or_else(|| "https://us.i.posthog.com".to_owned()),
                )?,
                capture_content: parse_bool("POSTHOG_CAPTURE_CONTENT", get("POSTHOG_CAPTURE_CONTENT"), false)?,
            }),
        };

        Ok(Config {
            store,
            upstream_base_url,
            openrouter_api_key: get("OPENROUTER_API_KEY").map(Secret),
            default_model: get("DEFAULT_MODEL").unwrap_or_else(|| "openai/gpt-4o-mini".to_owned()),
            max_tokens_default,
            max_tokens_limit,
            max_request_bytes: parse_num("MAX_REQUEST_BYTES", get("MAX_REQUEST_BYTES"), 4 << 20, 1024, 100 << 20)?,
            client_body_timeout_secs: parse_num(
                "CLIENT_BODY_TIMEOUT_SECONDS",
                get("CLIENT_BODY_TIMEOUT_SECONDS"),
                30,
                1,
                600,
            )?,
            max_fallback_models: parse_num("MAX_FALLBACK_MODELS", get("MAX_FALLBACK_MODELS"), 8, 1, 64)?,
            upstream_timeout_secs: parse_num(
                "UPSTREAM_TIMEOUT_SECONDS",
                get("UPSTREAM_TIMEOUT_SECONDS"),
                120,
                1,
                3600,
            )?,
            referer: get("OPENROUTER_REFERER").unwrap_or_default(),
            title: get("OPENROUTER_TITLE").unwrap_or_else(|| "OpenRouter Gateway".to_owned()),
            allowed_origins: parse_origins(get("ALLOWED_ORIGINS"))?,
            rate_limit_per_minute: parse_num(
                "RATE_LIMIT_PER_MINUTE",
                get("RATE_LIMIT_PER_MINUTE"),
                60,
                1,
                100_000_000,
            )?,
            rate_limit_window_secs: parse_num(
                "RATE_LIMIT_WINDOW_SECONDS",
                get("RATE_LIMIT_WINDOW_SECONDS"),
                60,
                1,
                3600,
            )?,
            reservation_lease_secs: parse_num(
                "RESERVATION_LEASE_SECONDS",
                get("RESERVATION_LEASE_SECONDS"),
                900,
                1,
                86_400,
            )?,
            limiter_fail_open: parse_bool("LIMITER_FAIL_OPEN", get("LIMITER_FAIL_OPEN"), false)?,
            limiter_timeout_ms: parse_num("LIMITER_TIMEOUT_MS", get("LIMITER_TIMEOUT_MS"), 5000, 1, 60_000)?,
            // At most the object's `MAX_LEASE_MS`: revocations and limit changes reach every isolate within it.
            admission_lease_ms: parse_num("ADMISSION_LEASE_MS", get("ADMISSION_LEASE_MS"), 1000, 0, 5000)?,
            drain_timeout_secs: parse_num("DRAIN_TIMEOUT_SECONDS", get("DRAIN_TIMEOUT_SECONDS"), 20, 1, 25)?,
            unpriced_model: parse_unpriced(get("UNPRICED_MODEL_POLICY"), get("UNPRICED_MODEL_RESERVE_USD"))?,
            reconcile_estimates: parse_bool("RECONCILE_ESTIMATES", get("RECONCILE_ESTIMATES"), true)?,
            // At most the queue's `max_retries` (wrangler.toml: 10), after which the queue dead-letters the job.
            reconcile_max_attempts: parse_num("RECONCILE_MAX_ATTEMPTS", get("RECONCILE_MAX_ATTEMPTS"), 8, 1, 10)?,
            drain_on_client_abort: match get("CLIENT_ABORT_POLICY").as_deref() {
                None | Some("cancel") => false,
                Some("drain") => true,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "CLIENT_ABORT_POLICY",
                        problem: format!("'{other}' is neither 'cancel' nor 'drain'"),
                    })
                }
            },
            models_cache_ttl_secs: parse_num("CACHE_TTL_SECONDS", get("CACHE_TTL_SECONDS"), 300, 0, 86_400 * 30)?,
            response_cache_max_ttl_secs: parse_num(
                "RESPONSE_CACHE_MAX_TTL_SECONDS",
                get("RESPONSE_CACHE_MAX_TTL_SECONDS"),
                7 * 86_400,
                0,
                crate::cache::MAX_KEY_TTL_SECS,
            )?,
            auth_cache_ttl_secs: parse_num("AUTH_CACHE_TTL_SECONDS", get("AUTH_CACHE_TTL_SECONDS"), 10, 0, 3600)?,
            auth_cache_max_entries: parse_num(
                "AUTH_CACHE_MAX_ENTRIES",
                get("AUTH_CACHE_MAX_ENTRIES"),
                10_000,
                0,
                1_000_000,
            )?,
            posthog,
            admin_api_key: get("ADMIN_API_KEY").map(Secret),
        })
    }
}

fn parse_num<T>(variable: &'static str, raw: Option<String>, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = raw else { return Ok(default) };
    let value: T =
        raw.parse().map_err(|_| ConfigError { variable, problem: format!("'{raw}' is not a whole number") })?;
    if value < min || value > max {
        return Err(ConfigError { variable, problem: format!("{value} is outside {min}..={max}") });
    }
    Ok(value)
}

fn parse_unpriced(policy: Option<String>, amount: Option<String>) -> Result<UnpricedModel, ConfigError> {
    let usd = match amount {
        None => None,
        Some(raw) => match raw.parse::<f64>() {
            Ok(usd) if usd.is_finite() && usd > 0.0 && usd <= 1e6 => Some(usd),
            _ => {
                return Err(ConfigError {
                    variable: "UNPRICED_MODEL_RESERVE_USD",
                    problem: format!("'{raw}' is not a positive amount of USD"),
                })
            }
        },
    };
    match policy.as_deref() {
        None | Some("refuse") => Ok(UnpricedModel::Refuse),
        Some("reserve") => Ok(UnpricedModel::Reserve(usd.unwrap_or(DEFAULT_UNPRICED_RESERVE_USD))),
        Some(other) => Err(ConfigError {
            variable: "UNPRICED_MODEL_POLICY",
            problem: format!("'{other}' is neither 'refuse' nor 'reserve'"),
        }),
    }
}

/// What `UNPRICED_MODEL_POLICY=reserve` reserves per request when no amount is configured.
pub const DEFAULT_UNPRICED_RESERVE_USD: f64 = 0.10;

fn parse_bool(variable: &'static str, raw: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match raw.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError { variable, problem: format!("'{other}' is not true/false") }),
    }
}

/// An absolute http(s) URL without a trailing slash, so paths can be appended with `format!`.
fn parse_base_url(variable: &'static str, raw: &str) -> Result<String, ConfigError> {
    let lower = raw.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) || raw.contains(char::is_whitespace) {
        return Err(ConfigError { variable, problem: format!("'{raw}' is not an http(s) URL") });
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn parse_origins(raw: Option<String>) -> Result<AllowedOrigins, ConfigError> {
    let Some(raw) = raw else { return Ok(AllowedOrigins::List(Vec::new())) };
    let mut list = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if origin == "*" {
            return Ok(AllowedOrigins::Any);
        }
        // Browsers send the origin without a path or trailing slash; store it the same way so comparison is exact.
        let origin = origin.trim_end_matches('/');
        parse_base_url("ALLOWED_ORIGINS", origin)?;
        list.push(origin.to_owned());
    }
    Ok(AllowedOrigins::List(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream_base_url, DEFAULT_OPENROUTER_BASE_URL);
        assert_eq!(c.max_tokens_default, 4096);
        assert_eq!(c.rate_limit_per_minute, 60);
        assert_eq!(c.models_cache_ttl_secs, 300);
        assert_eq!(c.response_cache_max_ttl_secs, 7 * 86_400);
        assert_eq!(c.allowed_origins, AllowedOrigins::List(vec![]));
        assert!(c.posthog.is_none());
        assert!(c.openrouter_api_key.is_none());
    }

    #[test]
    fn ai_gateway_url_takes_precedence_and_loses_its_trailing_slash() {
        let c = config(&[
            ("OPENROUTER_BASE_URL", "http://127.0.0.1:9/api/v1"),
            ("CF_AI_GATEWAY_URL", "https://gateway.ai.cloudflare.com/v1/acc/gw/openrouter/"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream_base_url, "https://gateway.ai.cloudflare.com/v1/acc/gw/openrouter");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = config(&[("RATE_LIMIT_PER_MINUTE", "sixty")]).err();
        assert_eq!(e.map(|e| e.variable), Some("RATE_LIMIT_PER_MINUTE"));
        let e = config(&[("MAX_TOKENS_DEFAULT", "0")]).err();
        assert_eq!(e.map(|e| e.variable), Some("MAX_TOKENS_DEFAULT"));
        let e = config(&[("MAX_TOKENS_DEFAULT", "9000"), ("MAX_TOKENS_LIMIT", "8192")]).err();
        assert_eq!(e.map(|e| e.variable), Some("MAX_TOKENS_DEFAULT"));
        let e = config(&[("RESPONSE_CACHE_MAX_TTL_SECONDS", "31536001")]).err();
        assert_eq!(e.map(|e| e.variable), Some("RESPONSE_CACHE_MAX_TTL_SECONDS"));
        assert_eq!(config(&[("RESPONSE_CACHE_MAX_TTL_SECONDS", "0")]).map(|c| c.response_cache_max_ttl_secs), Ok(0));
    }

    #[test]
    fn db_provider_is_d1_or_neon_in_the_postgres_build() {
        assert_eq!(config(&[("DB_PROVIDER", "D1")]).map(|c| c.store), Ok(StoreKind::D1));
        assert_eq!(config(&[]).map(|c| c.store), Ok(StoreKind::D1));
        let neon = config(&[("DB_PROVIDER", "neon")]);
        #[cfg(feature = "postgres")]
        assert_eq!(neon.map(|c| c.store), Ok(StoreKind::Postgres));
        #[cfg(not(feature = "postgres"))]
        assert!(neon.is_err_and(|e| e.variable == "DB_PROVIDER" && e.problem.contains("build-postgres")));
        assert_eq!(config(&[("DB_PROVIDER", "mysql")]).err().map(|e| e.variable), Some("DB_PROVIDER"));
    }

    #[test]
    fn origins_parse_as_a_list_or_wildcard() {
        let c = config(&[("ALLOWED_ORIGINS", "http://localhost:3000, https://app.example.com/ ,")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.allowed_origins.allows("https://app.example.com"));
        assert!(c.allowed_origins.allows("http://localhost:3000"));
        assert!(!c.allowed_origins.allows("https://evil.example.com"));
        let any = config(&[("ALLOWED_ORIGINS", "*")]).unwrap_or_else(|e| panic!("{e}"));
        assert!(any.allowed_origins.allows("https://anything.example"));
        assert!(config(&[("ALLOWED_ORIGINS", "localhost:3000")]).is_err());
    }

    #[test]
    fn posthog_is_enabled_only_with_a_key_and_capture_is_opt_in() {
        let c = config(&[("POSTHOG_API_KEY", "phc_x"), ("POSTHOG_HOST", "http://127.0.0.1:1/")])
            .unwrap_or_else(|e| panic!("{e}"));
        let ph = c.posthog.unwrap_or_else(|| panic!("posthog should be on"));
        assert_eq!(ph.host, "http://127.0.0.1:1");
        assert!(!ph.capture_content);
        assert!(config(&[("POSTHOG_API_KEY", "phc_x"), ("POSTHOG_CAPTURE_CONTENT", "maybe")]).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = config(&[
            ("OPENROUTER_API_KEY", "sk-or-v1-abc"),
            ("POSTHOG_API_KEY", "phc_secret"),
            ("ADMIN_API_KEY", "adm-secret"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let printed = format!("{c:?}");
        assert!(!printed.contains("sk-or-v1-abc"));
        assert!(!printed.contains("phc_secret"));
        assert!(!printed.contains("adm-secret"));
    }

    #[test]
    fn unpriced_models_are_refused_unless_a_reserve_is_chosen() {
        assert_eq!(config(&[]).map(|c| c.unpriced_model), Ok(UnpricedModel::Refuse));
        let reserve = config(&[("UNPRICED_MODEL_POLICY", "reserve")]).map(|c| c.unpriced_model);
        assert_eq!(reserve, Ok(UnpricedModel::Reserve(DEFAULT_UNPRICED_RESERVE_USD)));
        let amount = config(&[("UNPRICED_MODEL_POLICY", "reserve"), ("UNPRICED_MODEL_RESERVE_USD", "0.5")]);
        assert_eq!(amount.map(|c| c.unpriced_model), Ok(UnpricedModel::Reserve(0.5)));
        assert_eq!(
            config(&[("UNPRICED_MODEL_POLICY", "hope")]).err().map(|e| e.variable),
            Some("UNPRICED_MODEL_POLICY")
        );
        let bad = config(&[("UNPRICED_MODEL_RESERVE_USD", "-1")]).err().map(|e| e.variable);
        assert_eq!(bad, Some("UNPRICED_MODEL_RESERVE_USD"));
    }

    #[test]
    fn waits_are_bounded_by_configuration() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.client_body_timeout_secs, c.limiter_timeout_ms, c.drain_timeout_secs), (30, 5000, 20));
        assert!(config(&[("DRAIN_TIMEOUT_SECONDS", "26")]).is_err(), "a drain must end inside the platform's 30 s");
        assert!(config(&[("LIMITER_TIMEOUT_MS", "0")]).is_err());
    }

    #[test]
    fn blank_values_count_as_unset() {
        let c = config(&[("DEFAULT_MODEL", "  "), ("CACHE_TTL_SECONDS", "")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.default_model, "openai/gpt-4o-mini");
        assert_eq!(c.models_cache_ttl_secs, 300);
    }
}
