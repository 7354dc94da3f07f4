//! Admission by the key's Durable Object, seen from the Worker: what to reserve, which limits apply, what a
//! denial means to the client, and the rate-limit headers that tell it where it stands. Pure.

use key_limiter::protocol::{Amount, Budget, DenyReason, KeyControl, Limits, Period, Snapshot, WindowState};

use crate::config::Config;
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::keys::KeyRecord;
use crate::usage::Usage;
use crate::validate::ModelRequest;

/// Prompt-token estimate: the common "four characters per token" rule for text, the token ids given as such,
/// and the framing (four tokens per chat message or input item, three for the reply's priming; none for
/// prompts and embeddings). The reservation is this plus the forwarded output bound, which bounds the output
/// exactly; when the provider reports more prompt tokens than estimated, the actual count is what gets charged
/// at settlement.
pub fn estimate_prompt_tokens(request: &ModelRequest) -> u64 {
    (request.prompt_chars as u64).div_ceil(4) + request.prompt_token_ids + request.framing_tokens
}

/// The most output the upstream may generate: the output bound per choice, times the choices.
pub fn output_bound(request: &ModelRequest) -> u64 {
    u64::from(request.max_tokens).saturating_mul(u64::from(request.choices))
}

/// Tokens of generated text that was streamed before usage was reported (same rule, for cut-off streams).
pub fn estimate_completion_tokens(completion_chars: usize) -> u64 {
    (completion_chars as u64).div_ceil(4)
}

/// The limits for this key: its own where set, the gateway's defaults otherwise.
pub fn limits_for(key: &KeyRecord, config: &Config) -> Limits {
    let period = match key.budget_period.as_deref() {
        Some("day") => Period::Day,
        Some("month") => Period::Month,
        _ => Period::Lifetime,
    };
    let budget = (key.usage_limit.is_some() || key.usd_limit.is_some()).then_some(Budget {
        period,
        tokens: key.usage_limit,
        usd: key.usd_limit,
    });
    Limits {
        requests_per_window: key.rpm.unwrap_or(config.rate_limit_per_minute),
        tokens_per_window: key.tpm,
        window_ms: config.rate_limit_window_secs * 1000,
        budget,
        max_concurrency: key.max_concurrency,
        lease_ms: config.reservation_lease_secs * 1000,
    }
}

/// What the limiter needs to know about the key, from its row (possibly cached) and the gateway's defaults.
pub fn control_for(key: &KeyRecord, config: &Config) -> KeyControl {
    KeyControl {
        version: key.updated_at.clone(),
        revoked: false,
        limits: limits_for(key, config),
        allowed_models: key.allowed_models.as_deref().map(parse_allowed_models),
    }
}

/// The stored allow-list; an unreadable one allows nothing (failing closed), rather than everything.
pub fn parse_allowed_models(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// What to charge the limiter when the request is over (reported, or estimated — see `usage_event::tokens_for`).
pub fn actual_amount(usage: &Usage) -> Amount {
    Amount { tokens: usage.total_tokens(), usd: usage.cost.unwrap_or(0.0) }
}

/// The client's error for a denial. `limits` names the numbers in the message.
pub fn denial_error(
    reason: DenyReason,
    retry_after_ms: Option<u64>,
    limits: &Limits,
    reserve: Amount,
    model: Option<&str>,
    endpoint: Endpoint,
) -> ApiError {
    let window_secs = limits.window_ms / 1000;
    // What the client can lower: the output bound, or (embeddings) the input.
    let (bound, what) = match endpoint {
        Endpoint::Responses => ("max_output_tokens", "prompt estimate + max_output_tokens"),
        Endpoint::Embeddings => ("input", "the input's estimate"),
        Endpoint::ChatCompletions | Endpoint::Completions => ("max_tokens", "prompt estimate + max_tokens × n"),
    };
    let wait = retry_after_ms.map(|ms| format!(" Please try again in {}.", go_duration(ms))).unwrap_or_default();
    let error = match reason {
        DenyReason::Requests => ApiError::rate_limited(
            "requests",
            format!("Rate limit reached for requests: {} per {window_secs} s.{wait}", limits.requests_per_window),
        ),
        DenyReason::Tokens => ApiError::rate_limited(
            "tokens",
            format!(
                "Rate limit reached for tokens: {} per {window_secs} s; this request reserves {} ({what}).{wait}",
                limits.tokens_per_window.unwrap_or_default(),
                reserve.tokens
            ),
        ),
        DenyReason::Concurrency => ApiError::rate_limited(
            "requests",
            format!("Too many concurrent requests: at most {} in flight.{wait}", limits.max_concurrency.unwrap_or_default()),
        ),
        DenyReason::BudgetTokens | DenyReason::BudgetUsd => ApiError::quota_exhausted(format!(
            "This key has used its {} budget.{wait}",
            match limits.budget.as_ref().map(|b| b.period) {
                Some(Period::Day) => "daily",
                Some(Period::Month) => "monthly",
                _ => "total",
            }
        )),
        DenyReason::Revoked => ApiError::invalid_api_key("This API key has been revoked."),
        DenyReason::ModelNotAllowed => ApiError::model_not_allowed(model.unwrap_or_default()),
        DenyReason::TooLargeForTokensPerWindow => ApiError::invalid_param(
            bound,
            format!(
                "This request reserves {} tokens ({what}), more than this key's limit of {} tokens per {window_secs} s; it can never be admitted. Lower {bound}.",
                reserve.tokens,
                limits.tokens_per_window.unwrap_or_default()
            ),
        ),
        DenyReason::TooLargeForBudget => ApiError::invalid_param(
            bound,
            format!(
                "This request reserves {} tokens ({what}), more than this key's whole token budget of {}; it can never be admitted. Lower {bound}.",
                reserve.tokens,
                limits.budget.as_ref().and_then(|b| b.tokens).unwrap_or_default()
            ),
        ),
        DenyReason::TooLargeForUsdBudget => ApiError::invalid_param(
            bound,
            format!(
                "This request may cost up to ${:.6} ({what} at the model's prices), more than this key's whole USD budget of ${}; it can never be admitted. Lower {bound}.",
                reserve.usd,
                limits.budget.as_ref().and_then(|b| b.usd).unwrap_or_default()
            ),
        ),
    };
    match retry_after_ms {
        Some(ms) if error.status == 429 => error.with_retry_after_ms(ms),
        _ => error,
    }
}

/// `x-ratelimit-*` (OpenAI) and `RateLimit-Policy` / `RateLimit` (IETF draft) headers for the key's windows.
pub fn rate_limit_headers(state: &Snapshot, window_ms: u64) -> Vec<(&'static str, String)> {
    let window_secs = window_ms / 1000;
    let mut headers = vec![
        ("x-ratelimit-limit-requests", state.requests.limit.to_string()),
        ("x-ratelimit-remaining-requests", state.requests.remaining.to_string()),
        ("x-ratelimit-reset-requests", go_duration(state.requests.reset_ms)),
    ];
    let mut policy = vec![ietf_policy("rpm", &state.requests, window_secs)];
    let mut current = vec![ietf_state("rpm", &state.requests)];
    if let Some(tokens) = &state.tokens {
        headers.push(("x-ratelimit-limit-tokens", tokens.limit.to_string()));
        headers.push(("x-ratelimit-remaining-tokens", tokens.remaining.to_string()));
        headers.push(("x-ratelimit-reset-tokens", go_duration(tokens.reset_ms)));
        policy.push(ietf_policy("tpm", tokens, window_secs));
        current.push(ietf_state("tpm", tokens));
    }
    headers.push(("ratelimit-policy", policy.join(", ")));
    headers.push(("ratelimit", current.join(", ")));
    headers
}

fn ietf_policy(name: &str, window: &WindowState, window_secs: u64) -> String {
    format!("\"{name}\";q={};w={window_secs}", window.limit)
}

fn ietf_state(name: &str, window: &WindowState) -> String {
    format!("\"{name}\";r={};t={}", window.remaining, window.reset_ms.div_ceil(1000))
}

/// A duration the way Go prints it (OpenAI's reset headers): `0s`, `12ms`, `1s`, `1.5s`, `6m0s`, `4m12.172s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    let seconds = if millis == 0 {
        format!("{seconds}s")
    } else {
        let fraction = format!("{millis:03}");
        format!("{seconds}.{}s", fraction.trim_end_matches('0'))
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use key_limiter::protocol::WindowState;

    fn config() -> Config {
        Config::from_lookup(|_| None).expect("defaults")
    }

    fn key() -> KeyRecord {
        KeyRecord { id: "k".into(), user_id: "u".into(), ..KeyRecord::default() }
    }

    #[test]
    fn go_durations_match_go() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(12), "12ms");
        assert_eq!(go_duration(1000), "1s");
        assert_eq!(go_duration(1500), "1.5s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(252_172), "4m12.172s");
        assert_eq!(go_duration(3_600_000), "1h0m0s");
        assert_eq!(go_duration(59_990), "59.99s");
    }

    #[test]
    fn key_limits_override_the_gateway_default() {
        let l = limits_for(&key(), &config());
        assert_eq!(l.requests_per_window, 60);
        assert_eq!(l.window_ms, 60_000);
        assert!(l.tokens_per_window.is_none() && l.budget.is_none() && l.max_concurrency.is_none());
        let custom = KeyRecord {
            rpm: Some(5),
            tpm: Some(9_000),
            usage_limit: Some(1_000_000),
            budget_period: Some("month".into()),
            max_concurrency: Some(3),
            ..key()
        };
        let l = limits_for(&custom, &config());
        assert_eq!((l.requests_per_window, l.tokens_per_window, l.max_concurrency), (5, Some(9_000), Some(3)));
        assert_eq!(l.budget, Some(Budget { period: Period::Month, tokens: Some(1_000_000), usd: None }));
    }

    #[test]
    fn headers_carry_both_conventions() {
        let state = Snapshot {
            requests: WindowState { limit: 60, remaining: 12, reset_ms: 29_500 },
            tokens: Some(WindowState { limit: 10_000, remaining: 2_500, reset_ms: 1_200 }),
            in_flight: 1,
            budget_used: Amount::default(),
        };
        let h = rate_limit_headers(&state, 60_000);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("12"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("29.5s"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("2500"));
        assert_eq!(get("ratelimit-policy"), Some("\"rpm\";q=60;w=60, \"tpm\";q=10000;w=60"));
        assert_eq!(get("ratelimit"), Some("\"rpm\";r=12;t=30, \"tpm\";r=2500;t=2"));
        let no_tokens = Snapshot { tokens: None, ..state };
        assert!(rate_limit_headers(&no_tokens, 60_000).iter().all(|(k, _)| !k.ends_with("-tokens")));
    }

    #[test]
    fn denials_map_to_openai_errors() {
        let l = Limits { tokens_per_window: Some(100), ..limits_for(&key(), &config()) };
        let r = Amount { tokens: 150, usd: 0.0 };
        let e = denial_error(DenyReason::Requests, Some(1_234), &l, r, None, Endpoint::ChatCompletions);
        assert_eq!((e.status, e.kind, e.code), (429, "requests", Some("rate_limit_exceeded")));
        assert_eq!(e.retry_after_ms, Some(1_234));
        assert_eq!(e.retry_after_secs(), Some(2));
        assert_eq!(denial_error(DenyReason::Tokens, Some(5), &l, r, None, Endpoint::ChatCompletions).kind, "tokens");
        let never = denial_error(DenyReason::TooLargeForTokensPerWindow, None, &l, r, None, Endpoint::ChatCompletions);
        assert_eq!((never.status, never.param.as_deref()), (400, Some("max_tokens")));
        let quota = denial_error(DenyReason::BudgetTokens, None, &l, r, None, Endpoint::ChatCompletions);
        assert_eq!((quota.status, quota.code), (429, Some("insufficient_quota")));
        assert_eq!(denial_error(DenyReason::Revoked, None, &l, r, None, Endpoint::ChatCompletions).status, 401);
        let forbidden = denial_error(DenyReason::ModelNotAllowed, None, &l, r, Some("x/y"), Endpoint::ChatCompletions);
        assert_eq!((forbidden.status, forbidden.code), (403, Some("model_not_allowed")));
        assert!(forbidden.message.contains("x/y"));
        // The parameter to lower is the endpoint's own.
        let responses = denial_error(DenyReason::TooLargeForBudget, None, &l, r, None, Endpoint::Responses);
        assert_eq!(responses.param.as_deref(), Some("max_output_tokens"));
        assert!(responses.message.contains("Lower max_output_tokens."));
        let embeddings = denial_error(DenyReason::TooLargeForTokensPerWindow, None, &l, r, None, Endpoint::Embeddings);
        assert_eq!(embeddings.param.as_deref(), Some("input"));
    }

    #[test]
    fn control_carries_version_and_allow_list_and_fails_closed_on_a_bad_list() {
        let k = KeyRecord {
            allowed_models: Some(r#"["a/b"]"#.into()),
            updated_at: "2026-11-27T10:00:00.000Z".into(),
            ..key()
        };
        let c = control_for(&k, &config());
        assert_eq!(c.version, "2026-11-27T10:00:00.000Z");
        assert_eq!(c.allowed_models, Some(vec!["a/b".to_owned()]));
        assert_eq!(
            control_for(&KeyRecord { allowed_models: Some("not json".into()), ..key() }, &config()).allowed_models,
            Some(vec![])
        );
        assert_eq!(control_for(&key(), &config()).allowed_models, None);
    }

    #[test]
    fn charges_prompt_and_completion_tokens_and_cost() {
        let usage = Usage { prompt_tokens: 10, completion_tokens: 5, cost: Some(0.01), ..Usage::default() };
        assert_eq!(actual_amount(&usage), Amount { tokens: 15, usd: 0.01 });
        assert_eq!(actual_amount(&Usage::default()), Amount::default());
    }
}
