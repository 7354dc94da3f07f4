//! Messages between the Worker and a key's Durable Object (JSON over the object's `fetch`).

use serde::{Deserialize, Serialize};

/// The limits that apply to one key, as the Worker computed them (key row + gateway defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests admitted per window (exact sliding window).
    pub requests_per_window: u32,
    /// Tokens (reserved, then actual) per window; `None` = unlimited.
    pub tokens_per_window: Option<u64>,
    /// Window length; 60 000 in production (configurable for tests).
    pub window_ms: u64,
    pub budget: Option<Budget>,
    /// In-flight requests; `None` = unlimited.
    pub max_concurrency: Option<u32>,
    /// How long a reservation may stay unsettled before the object charges it as reserved.
    pub lease_ms: u64,
}

/// A spending budget per period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub period: Period,
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// UTC calendar day.
    Day,
    /// UTC calendar month.
    Month,
    Lifetime,
}

/// What a request may consume at most, held until it settles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Amount {
    pub tokens: u64,
    /// USD; 0 when the price of the request is not known in advance.
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitRequest {
    /// The request id: the reservation's name, used to settle it.
    pub request_id: String,
    pub limits: Limits,
    pub reserve: Amount,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleRequest {
    pub request_id: String,
    pub actual: Amount,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleResponse {
    /// False when the reservation was unknown (already settled, or expired and charged as reserved).
    pub settled: bool,
}

/// Where one window stands after a decision, for the `x-ratelimit-*` and `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub limit: u64,
    pub remaining: u64,
    /// Milliseconds until the window is empty again (its "initial state").
    pub reset_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub requests: WindowState,
    pub tokens: Option<WindowState>,
    pub in_flight: u64,
    pub budget_used: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    Requests,
    Tokens,
    Concurrency,
    BudgetTokens,
    BudgetUsd,
    /// The reservation alone exceeds a limit: retrying can never help.
    TooLargeForTokensPerWindow,
    TooLargeForBudget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum AdmitResponse {
    Admitted { state: Snapshot },
    Denied { reason: DenyReason, retry_after_ms: Option<u64>, state: Snapshot },
}
