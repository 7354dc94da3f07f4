//! Messages between the Worker and a key's Durable Object (JSON over the object's `fetch`).
//!
//! Each request message implements [`Call`]: it knows the path the object serves it on and the type of its
//! answer, so the Worker's client and the object's router cannot pair them differently.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A message the Worker sends to a key's object.
pub trait Call: Serialize {
    const PATH: &'static str;
    type Answer: Serialize + DeserializeOwned;
}

impl Call for AdmitRequest {
    const PATH: &'static str = "/admit";
    type Answer = AdmitResponse;
}

impl Call for SettleBatch {
    const PATH: &'static str = "/settle";
    type Answer = SettleResponse;
}

impl Call for StateRequest {
    const PATH: &'static str = "/state";
    type Answer = StateResponse;
}

/// The admin API pushing a key's control; the answer says whether it was newer than what the object held.
impl Call for KeyControl {
    const PATH: &'static str = "/configure";
    type Answer = bool;
}

impl Call for AdjustBatch {
    const PATH: &'static str = "/adjust";
    type Answer = AdjustResponse;
}

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
    /// USD: the worst case from the model's prices at admission, OpenRouter's reported cost at settlement.
    pub usd: f64,
}

impl Amount {
    /// No single request can account for more than this many tokens (about 10¹²): what the object is told is
    /// clamped to it, so running totals over millions of requests can never overflow, whatever an upstream
    /// reports.
    pub const MAX_TOKENS: u64 = 1 << 40;
    /// Likewise for USD (and negative or non-finite amounts count as 0).
    pub const MAX_USD: f64 = 1e9;

    pub fn clamped(self) -> Amount {
        let usd = if self.usd.is_finite() { self.usd.clamp(0.0, Self::MAX_USD) } else { 0.0 };
        Amount { tokens: self.tokens.min(Self::MAX_TOKENS), usd }
    }
}

/// Everything that governs a key: its limits, whether it is revoked, which models it may use. `version` is the
/// key row's `updated_at` (fixed-width RFC 3339, so string order is time order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyControl {
    pub version: String,
    pub revoked: bool,
    pub limits: Limits,
    /// `None` = any model.
    pub allowed_models: Option<Vec<String>>,
}

impl KeyControl {
    /// The newer of what the object was told by the admin API and what the Worker read (possibly from a cache):
    /// a change pushed to the object wins until every cache has caught up with it.
    pub fn newest<'a>(pushed: Option<&'a KeyControl>, presented: &'a KeyControl) -> &'a KeyControl {
        match pushed {
            Some(pushed) if pushed.version > presented.version => pushed,
            _ => presented,
        }
    }

    /// The first requested model this key may not use.
    pub fn forbidden_model<'a>(&self, models: &'a [String]) -> Option<&'a str> {
        let allowed = self.allowed_models.as_ref()?;
        models.iter().find(|m| !allowed.contains(m)).map(String::as_str)
    }
}

/// One call admits the requests of a key that one isolate had waiting (concurrent admissions are combined), and
/// may ask for a lease of further slots the isolate then admits from without calling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitRequest {
    pub control: KeyControl,
    /// Decided one by one, in order, each exactly as a request on its own.
    pub candidates: Vec<Candidate>,
    /// Settlements of this key's earlier requests that the Worker held back to send along (applied first, and
    /// written in the same storage transaction as these admissions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settle: Vec<SettleRequest>,
    /// Where the isolate's earlier leases of this key stand (applied first, like `settle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<LeaseReport>,
    /// Granted only if every candidate was admitted and the key has room to spare (see `quota::Quota::grant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseWant>,
}

/// A request waiting for admission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The request id: the reservation's name, used to settle it.
    pub request_id: String,
    /// Every model the request may be served by (`model` and OpenRouter's `models` fallbacks).
    pub models: Vec<String>,
    pub reserve: Amount,
    /// The usage event to bill if this request is never settled (its Worker died): the object sends it to the
    /// usage queue when it charges the reservation at the end of its lease, so even then the ledger gets its row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsettled_event: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitResponse {
    /// One per candidate, in order.
    pub decisions: Vec<AdmitDecision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseGrant>,
    /// Storage rows this call wrote (for the platform bill).
    #[serde(default)]
    pub rows_written: u64,
}

/// What an isolate asks for: slots for the requests it expects during the lease, each worth `per_slot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseWant {
    /// Named by the Worker (like a request id): reports name it.
    pub lease_id: String,
    pub slots: u32,
    pub per_slot: Amount,
    /// How long the isolate may admit from it, from the moment it sent this call.
    pub valid_ms: u64,
    /// The usage event to bill if the lease is never accounted for (its isolate died): the object fills in
    /// what it charged (`output_tokens`, `cost_usd`) and sends it to the usage queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsettled_event: Option<String>,
}

/// Slots granted to one isolate: it admits up to `slots` requests whose reserves fit `allowance` in total, for
/// `valid_ms` from when it sent the call. The object counts every slot in the request window from now until the
/// lease's end, as if each were used at any instant of it, so the window can never exceed its limit however
/// the slots are used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease_id: String,
    pub slots: u32,
    pub allowance: Amount,
    pub valid_ms: u64,
    /// The key's state with the lease counted in full, and the control that applied (it may be newer than the
    /// one the Worker sent: the isolate checks models against it).
    pub state: Snapshot,
    pub control: KeyControl,
    /// The object's clock at the grant (the budget period its requests count in).
    pub at_ms: u64,
}

/// Where a lease stands, as totals since it was granted (so a report sent twice, or late, is harmless: the
/// object applies only what is newer than what it holds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseTotals {
    /// The isolate admits nothing more from it: unused slots and allowance are released.
    pub returned: bool,
    /// Requests admitted from it, and how many of those have settled.
    pub used: u32,
    pub settled: u32,
    /// What the admitted requests reserved, what the settled ones had reserved, and what they used.
    pub reserved_used: Amount,
    pub reserved_settled: Amount,
    pub actual_settled: Amount,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseReport {
    pub lease_id: String,
    pub totals: LeaseTotals,
}

/// Asks where the key stands without admitting anything (owner view, model list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRequest {
    pub control: KeyControl,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateResponse {
    pub revoked: bool,
    pub limits: Limits,
    pub state: Snapshot,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleRequest {
    pub request_id: String,
    pub actual: Amount,
}

/// Settlements and lease reports sent on their own (`POST /settle`), when no admission came along to carry them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleBatch {
    pub settle: Vec<SettleRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<LeaseReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleResponse {
    /// How many reservations were settled (unknown ones — settled twice, or already charged by lease expiry —
    /// are not counted).
    pub settled: usize,
    #[serde(default)]
    pub rows_written: u64,
}

/// A settled request's charge corrected after the fact (reconciliation with the upstream's own accounting):
/// the budget is charged `actual − charged`. Applied once per request id, however often it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adjustment {
    pub request_id: String,
    /// When the request was admitted: a correction for an earlier budget period is not applied to this one.
    pub admitted_at_ms: u64,
    pub charged: Amount,
    pub actual: Amount,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdjustBatch {
    pub adjust: Vec<Adjustment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdjustResponse {
    /// How many corrections changed the budget (repeats and other periods' corrections do not).
    pub applied: usize,
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
    /// The USD worst case alone exceeds the key's whole USD budget.
    TooLargeForUsdBudget,
    /// The key was revoked (the admin API told the object before any cache could know).
    Revoked,
    /// A requested model is not on the key's allowed list.
    ModelNotAllowed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum AdmitDecision {
    Admitted {
        state: Snapshot,
        limits: Limits,
        /// The admission's time by the object's clock (the budget period it counts in).
        #[serde(default)]
        at_ms: u64,
    },
    Denied {
        reason: DenyReason,
        retry_after_ms: Option<u64>,
        state: Snapshot,
        /// The limits that applied (they may be newer than the ones the Worker sent).
        limits: Limits,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
}
