//! The quota decisions of one API key, in plain Rust: exact sliding windows, reservations, budgets, leases.
//!
//! [`Quota`] holds the live state; every operation takes `now` and returns the [`Change`]s that the Durable Object
//! must persist before answering, so the rules are unit- and property-tested natively and the object stays a thin
//! shell. Definitions:
//! - A request at time `t` is in the window if it was admitted in `(t − window, t]`.
//! - Requests: admit iff fewer than `requests_per_window` admissions are in the window.
//! - Tokens: admit iff the tokens of admissions in the window (reserved amounts until settled, then actual ones)
//!   plus this reservation fit `tokens_per_window`.
//! - Budget: admit iff the period's settled spend plus all outstanding reservations plus this one fit.
//! - Concurrency: admit iff fewer than `max_concurrency` reservations are outstanding.
//! - A reservation not settled within its lease is charged as reserved and released.
//! - A settled request's charge may be corrected once afterwards (reconciliation): the budget of the period it
//!   was admitted in moves by the difference.
//! - A lease ([`Quota::grant`]) is an admission of `slots` requests and `allowance` at once, stamped at the
//!   lease's end: it is in every window from its grant until a window after its end, so however its slots are
//!   used within that time, no window holds more than the limit. Its reports ([`Quota::report`]) release what
//!   was returned unused and charge what was used; one that is never accounted for is charged as held when its
//!   reservation lease ends, like an unsettled request.
//!
//! Amounts are clamped on the way in ([`Amount::clamped`]) and totals use saturating arithmetic, so no reported
//! usage, however absurd, can wrap a running total.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::protocol::{
    Adjustment, Amount, DenyReason, KeyControl, LeaseGrant, LeaseReport, LeaseTotals, LeaseWant, Limits, Period,
    Snapshot, WindowState,
};

/// One admission inside the sliding window.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub request_id: String,
    pub at_ms: u64,
    /// Reserved tokens until the request settles, then the actual tokens.
    pub tokens: u64,
    /// Requests it counts for: 1, or a lease's slots (its used ones once it is returned).
    pub count: u32,
}

/// An admitted request that has not settled yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub request_id: String,
    /// When it was admitted (finds its admission in the window without a scan).
    pub at_ms: u64,
    /// What it holds against the budget: the reservation; for a lease, its allowance not yet settled.
    pub reserved: Amount,
    pub expires_at_ms: u64,
    /// Set for a lease.
    pub lease: Option<LeaseState>,
}

/// What the object knows of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LeaseState {
    pub slots: u32,
    pub allowance: Amount,
    /// The last report applied.
    pub totals: LeaseTotals,
}

/// Settled spend in the current budget period.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpend {
    /// `2026-11-27`, `2026-11`, or `lifetime`.
    pub period_key: String,
    pub spent: Amount,
}

/// A change the Durable Object writes to its storage. One row per admitted request holds both its place in the
/// window and its reservation, so an admission is one INSERT and a settlement one UPDATE.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Admitted {
        reservation: Reservation,
    },
    /// The request settled (or its lease expired): it holds `tokens` in the window and no longer a reservation.
    Settled {
        request_id: String,
        tokens: u64,
    },
    /// Settled requests admitted at or before this time have left every window. Issued in batches, so storage
    /// holds at most `PURGE_BATCH` such rows beyond the window.
    ForgetUpTo(u64),
    SetBudget(BudgetSpend),
    /// A correction was applied for this request (kept to apply each correction once).
    Adjusted {
        request_id: String,
        at_ms: u64,
    },
    /// Corrections recorded before this time are forgotten (no correction arrives that late).
    ForgetAdjustedBefore(u64),
    /// A lease's report was applied: what it now counts for in the windows and holds against the budget
    /// (`reservation` is `None` once it is closed).
    LeaseReported {
        lease_id: String,
        count: u32,
        tokens: u64,
        reservation: Option<Reservation>,
    },
}

/// A lease never takes more than this share of the room left (its slots may go unused, and other isolates need
/// room too), so grants shrink as the key nears its limit.
pub const LEASE_SHARE_DIVISOR: u64 = 4;
/// Below this many slots a lease is not worth its row: requests are admitted one by one.
pub const MIN_LEASE_SLOTS: u32 = 2;
pub const MAX_LEASE_SLOTS: u32 = 1024;
/// The longest lease the object grants.
pub const MAX_LEASE_MS: u64 = 5_000;

/// How long the object remembers that a request's charge was corrected. Reconciliation retries for minutes, so
/// two days is far beyond any repeat.
pub const ADJUSTED_RETENTION_MS: u64 = 2 * 86_400_000;

/// Rows that left the window are deleted this many at a time (one DELETE per batch instead of one per request).
pub const PURGE_BATCH: usize = 64;

/// A reservation charged at the end of its lease by [`Quota::expire_leases`].
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub request_id: String,
    pub charged: Amount,
    /// An admission lease (its usage event names the lease, and says what was charged).
    pub lease: bool,
}

/// A lease granted by [`Quota::grant`] (the object adds the control that applied: see `LeaseGrant`).
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    pub slots: u32,
    pub allowance: Amount,
    pub valid_ms: u64,
    /// The key's state with the lease counted in full.
    pub state: Snapshot,
    pub at_ms: u64,
}

impl Granted {
    /// The grant as the isolate receives it: named, with the control that applied.
    pub fn into_grant(self, lease_id: String, control: KeyControl) -> LeaseGrant {
        LeaseGrant {
            lease_id,
            slots: self.slots,
            allowance: self.allowance,
            valid_ms: self.valid_ms,
            state: self.state,
            control,
            at_ms: self.at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Admitted(Snapshot),
    Denied { reason: DenyReason, retry_after_ms: Option<u64>, state: Snapshot },
}

/// Every decision is O(log n) in the admissions of the window (n can be large for a hot key with a high limit):
/// the window is a time-ordered deque with running totals, so nothing is recounted per request.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    /// Admissions in time order (only those that may still be in a window).
    admissions: VecDeque<Admission>,
    /// Sum of `tokens` and of `count` over `admissions`.
    admitted_tokens: u64,
    admitted_requests: u64,
    /// The latest time seen: time never runs backwards inside the window, even if the clock does.
    clock: u64,
    reservations: HashMap<String, Reservation>,
    /// Sum of `reserved` over `reservations`.
    outstanding: Amount,
    budget: BudgetSpend,
    /// Admissions dropped from the window since storage last deleted them.
    unpurged: usize,
    /// Requests whose charge was corrected, and when.
    adjusted: HashMap<String, u64>,
}

/// Retry hint when only the concurrency cap denies: in-flight requests usually finish within a second or two.
const CONCURRENCY_RETRY_MS: u64 = 1000;

impl Default for Quota {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new(), None, Vec::new())
    }
}

impl Quota {
    /// Rebuilds the state from storage rows (any order).
    pub fn new(
        mut admissions: Vec<Admission>,
        reservations: Vec<Reservation>,
        budget: Option<BudgetSpend>,
        adjusted: Vec<(String, u64)>,
    ) -> Self {
        admissions.sort_by_key(|a| a.at_ms);
        let outstanding = reservations.iter().fold(Amount::default(), |sum, r| add(sum, r.reserved));
        Quota {
            admitted_tokens: admissions.iter().fold(0, |sum, a| sum.saturating_add(a.tokens)),
            admitted_requests: admissions.iter().map(|a| u64::from(a.count)).sum(),
            clock: 0,
            admissions: admissions.into(),
            reservations: reservations.into_iter().map(|r| (r.request_id.clone(), r)).collect(),
            outstanding,
            budget: budget.unwrap_or(BudgetSpend { period_key: String::new(), spent: Amount::default() }),
            unpurged: 0,
            adjusted: adjusted.into_iter().collect(),
        }
    }

    /// Decides one request; on admission the reservation is recorded.
    pub fn admit(&mut self, now: u64, limits: &Limits, request_id: &str, reserve: Amount) -> (Decision, Vec<Change>) {
        let reserve = reserve.clamped();
        let mut changes = Vec::new();
        let now = self.tick(now);
        self.prune(now, limits.window_ms, &mut changes);
        self.roll_period(now, limits, &mut changes);

        if let Some((reason, retry_after_ms)) = self.denial(now, limits, reserve) {
            let state = self.snapshot(now, limits);
            return (Decision::Denied { reason, retry_after_ms, state }, changes);
        }

        let reservation = Reservation {
            request_id: request_id.to_owned(),
            at_ms: now,
            reserved: reserve,
            expires_at_ms: now.saturating_add(limits.lease_ms),
            lease: None,
        };
        self.insert(Admission { request_id: request_id.to_owned(), at_ms: now, tokens: reserve.tokens, count: 1 });
        self.outstanding = add(self.outstanding, reserve);
        self.reservations.insert(request_id.to_owned(), reservation.clone());
        changes.push(Change::Admitted { reservation });
        (Decision::Admitted(self.snapshot(now, limits)), changes)
    }

    /// Grants a lease of up to `want.slots` slots worth `want.per_slot` each, valid `want.valid_ms` (at most
    /// [`MAX_LEASE_MS`]), or nothing. Never to a key with a concurrency cap (a slot would hold an in-flight unit
    /// for its whole lease), and never more than a [`LEASE_SHARE_DIVISOR`]th of the room any limit has left:
    /// near a limit grants shrink to nothing and requests are decided one by one, exactly.
    pub fn grant(&mut self, now: u64, limits: &Limits, want: &LeaseWant) -> (Option<Granted>, Vec<Change>) {
        let mut changes = Vec::new();
        let now = self.tick(now);
        self.prune(now, limits.window_ms, &mut changes);
        self.roll_period(now, limits, &mut changes);
        let per_slot = want.per_slot.clamped();
        let slots = self.room_in_slots(now, limits, per_slot) / LEASE_SHARE_DIVISOR;
        let slots = slots.min(u64::from(want.slots.min(MAX_LEASE_SLOTS))) as u32;
        if limits.max_concurrency.is_some() || slots < MIN_LEASE_SLOTS || want.valid_ms == 0 {
            return (None, changes);
        }
        let valid_ms = want.valid_ms.min(MAX_LEASE_MS);
        let allowance = Amount { tokens: per_slot.tokens * u64::from(slots), usd: per_slot.usd * f64::from(slots) };
        let ends_at = now.saturating_add(valid_ms);
        let reservation = Reservation {
            request_id: want.lease_id.clone(),
            at_ms: ends_at,
            reserved: allowance,
            expires_at_ms: ends_at.saturating_add(limits.lease_ms),
            lease: Some(LeaseState { slots, allowance, totals: LeaseTotals::default() }),
        };
        self.insert(Admission {
            request_id: want.lease_id.clone(),
            at_ms: ends_at,
            tokens: allowance.tokens,
            count: slots,
        });
        self.outstanding = add(self.outstanding, allowance);
        self.reservations.insert(want.lease_id.clone(), reservation.clone());
        changes.push(Change::Admitted { reservation });
        let grant = Granted { slots, allowance, valid_ms, state: self.snapshot(now, limits), at_ms: now };
        (Some(grant), changes)
    }

    /// How many more requests of `per_slot` every limit has room for now.
    fn room_in_slots(&self, now: u64, limits: &Limits, per_slot: Amount) -> u64 {
        let (_, requests_used, tokens_used) = self.window(now, limits.window_ms);
        let per = |room: u64, each: u64| room.checked_div(each).unwrap_or(u64::MAX);
        let mut room = u64::from(limits.requests_per_window).saturating_sub(requests_used);
        if let Some(tpm) = limits.tokens_per_window {
            room = room.min(per(tpm.saturating_sub(tokens_used), per_slot.tokens));
        }
        if let Some(budget) = &limits.budget {
            let committed = add(self.budget.spent, self.outstanding);
            if let Some(limit) = budget.tokens {
                room = room.min(per(limit.saturating_sub(committed.tokens), per_slot.tokens));
            }
            if let Some(limit) = budget.usd {
                let left = limit - committed.usd;
                if left <= 0.0 {
                    return 0;
                }
                if per_slot.usd > 0.0 {
                    room = room.min((left / per_slot.usd).floor() as u64);
                }
            }
        }
        room
    }

    /// Applies a lease's report (totals since its grant; anything not newer than the last one is ignored):
    /// charges the budget what its settled requests used, holds what its unsettled ones reserved (and, while it
    /// is not returned, the allowance left), and once returned counts only its used slots in the windows.
    /// Closed when returned with every request settled. Returns whether anything changed.
    pub fn report(&mut self, now: u64, limits: &Limits, report: &LeaseReport) -> (bool, Vec<Change>) {
        let mut changes = Vec::new();
        self.roll_period(now, limits, &mut changes);
        let Some(reservation) = self.reservations.get(&report.lease_id).cloned() else { return (false, changes) };
        let Some(lease) = reservation.lease else { return (false, changes) };
        let totals = sanitized(report.totals, lease.slots);
        let old = lease.totals;
        let newer = totals != old
            && totals.used >= old.used
            && totals.settled >= old.settled
            && (totals.returned || !old.returned);
        if !newer {
            return (false, changes);
        }
        let charged_now = sub(totals.actual_settled, old.actual_settled);
        let in_flight = sub(totals.reserved_used, totals.reserved_settled);
        let (count, tokens, held) = if totals.returned {
            (totals.used, totals.actual_settled.tokens.saturating_add(in_flight.tokens), in_flight)
        } else {
            let unsettled = max(sub(lease.allowance, totals.reserved_settled), in_flight);
            let tokens = lease.allowance.tokens.max(totals.actual_settled.tokens.saturating_add(in_flight.tokens));
            (lease.slots, tokens, unsettled)
        };
        let closed = totals.returned && totals.settled == totals.used;
        let at_ms = reservation.at_ms;
        self.set_window_entry(&report.lease_id, at_ms, tokens, Some(count));
        let mut reservation = reservation;
        self.outstanding = add(sub(self.outstanding, reservation.reserved), held);
        self.charge(limits, charged_now, &mut changes);
        reservation.reserved = held;
        reservation.lease = Some(LeaseState { totals, ..lease });
        let kept = if closed {
            self.reservations.remove(&report.lease_id);
            None
        } else {
            self.reservations.insert(report.lease_id.clone(), reservation.clone());
            Some(reservation)
        };
        changes.push(Change::LeaseReported { lease_id: report.lease_id.clone(), count, tokens, reservation: kept });
        (true, changes)
    }

    /// Replaces a reservation with what the request actually used. Unknown ids (settled twice, or already
    /// charged by lease expiry) change nothing.
    pub fn settle(&mut self, now: u64, limits: &Limits, request_id: &str, actual: Amount) -> (bool, Vec<Change>) {
        let actual = actual.clamped();
        let mut changes = Vec::new();
        self.roll_period(now, limits, &mut changes);
        let Some(reservation) = self.reservations.remove(request_id) else {
            return (false, changes);
        };
        if reservation.lease.is_some() {
            // A lease settles through its reports, never as one request.
            self.reservations.insert(request_id.to_owned(), reservation);
            return (false, changes);
        }
        self.outstanding = sub(self.outstanding, reservation.reserved);
        self.set_window_entry(request_id, reservation.at_ms, actual.tokens, None);
        changes.push(Change::Settled { request_id: reservation.request_id, tokens: actual.tokens });
        self.charge(limits, actual, &mut changes);
        (true, changes)
    }

    /// Corrects a settled request's charge by `actual − charged`, once per request id: in the budget (if the
    /// request was admitted in the current period) and in the token window (if it is still in it). Returns
    /// whether anything changed.
    pub fn adjust(&mut self, now: u64, limits: &Limits, adjustment: &Adjustment) -> (bool, Vec<Change>) {
        let mut changes = Vec::new();
        self.roll_period(now, limits, &mut changes);
        let cutoff = now.saturating_sub(ADJUSTED_RETENTION_MS);
        if self.adjusted.values().any(|&at| at < cutoff) {
            self.adjusted.retain(|_, at| *at >= cutoff);
            changes.push(Change::ForgetAdjustedBefore(cutoff));
        }
        let id = adjustment.request_id.as_str();
        if self.adjusted.contains_key(id) || self.reservations.contains_key(id) {
            // Applied already, or not settled yet (its settlement will carry the right amount).
            return (false, changes);
        }
        let (charged, actual) = (adjustment.charged.clamped(), adjustment.actual.clamped());
        self.adjusted.insert(id.to_owned(), now);
        changes.push(Change::Adjusted { request_id: id.to_owned(), at_ms: now });
        if self.set_window_entry(id, adjustment.admitted_at_ms, actual.tokens, None) {
            changes.push(Change::Settled { request_id: id.to_owned(), tokens: actual.tokens });
        }
        let same_period = limits
            .budget
            .as_ref()
            .is_some_and(|b| period_key(adjustment.admitted_at_ms, b.period) == self.budget.period_key);
        if same_period {
            self.budget.spent = add(sub(self.budget.spent, charged), actual);
            changes.push(Change::SetBudget(self.budget.clone()));
        }
        (true, changes)
    }

    /// Sets what an admission still in the window holds in the token window (and, for a lease, how many
    /// requests it counts for); false if it has left.
    fn set_window_entry(&mut self, request_id: &str, at_ms: u64, tokens: u64, count: Option<u32>) -> bool {
        let first_at_that_time = self.admissions.partition_point(|a| a.at_ms < at_ms);
        let admission = self
            .admissions
            .range_mut(first_at_that_time..)
            .take_while(|a| a.at_ms == at_ms)
            .find(|a| a.request_id == request_id);
        let Some(admission) = admission else { return false };
        self.admitted_tokens = self.admitted_tokens.saturating_sub(admission.tokens).saturating_add(tokens);
        admission.tokens = tokens;
        if let Some(count) = count {
            self.admitted_requests = self.admitted_requests - u64::from(admission.count) + u64::from(count);
            admission.count = count;
        }
        true
    }

    /// What an admission still in the window holds in the token window.
    fn window_tokens(&self, request_id: &str, at_ms: u64) -> Option<u64> {
        let first_at_that_time = self.admissions.partition_point(|a| a.at_ms < at_ms);
        self.admissions
            .range(first_at_that_time..)
            .take_while(|a| a.at_ms == at_ms)
            .find(|a| a.request_id == request_id)
            .map(|a| a.tokens)
    }

    /// Adds an admission in time order (a lease's is stamped at its end, after admissions made meanwhile).
    fn insert(&mut self, admission: Admission) {
        self.admitted_tokens = self.admitted_tokens.saturating_add(admission.tokens);
        self.admitted_requests += u64::from(admission.count);
        let at = self.admissions.partition_point(|a| a.at_ms <= admission.at_ms);
        self.admissions.insert(at, admission);
    }

    fn tick(&mut self, now: u64) -> u64 {
        self.clock = self.clock.max(now);
        self.clock
    }

    /// Charges and releases every reservation whose lease has run out (the request's Worker never settled it;
    /// the lease's isolate never accounted for it): what it held is charged. Returns the changes, and each
    /// expired id with what it was charged.
    pub fn expire_leases(&mut self, now: u64, limits: &Limits) -> (Vec<Change>, Vec<Expired>) {
        let mut changes = Vec::new();
        self.roll_period(now, limits, &mut changes);
        let mut expired: Vec<String> =
            self.reservations.values().filter(|r| r.expires_at_ms <= now).map(|r| r.request_id.clone()).collect();
        expired.sort();
        let mut charged = Vec::new();
        for request_id in expired {
            if let Some(reservation) = self.reservations.remove(&request_id) {
                self.outstanding = sub(self.outstanding, reservation.reserved);
                self.charge(limits, reservation.reserved, &mut changes);
                let tokens = match reservation.lease {
                    // A lease keeps what it counts for in the windows (all of it, if it was never returned).
                    Some(_) => self.window_tokens(&request_id, reservation.at_ms).unwrap_or(0),
                    None => reservation.reserved.tokens,
                };
                changes.push(Change::Settled { request_id: request_id.clone(), tokens });
                charged.push(Expired { request_id, charged: reservation.reserved, lease: reservation.lease.is_some() });
            }
        }
        (changes, charged)
    }

    pub fn next_lease_expiry(&self) -> Option<u64> {
        self.reservations.values().map(|r| r.expires_at_ms).min()
    }

    /// Where every limit stands at `now` (no state change).
    pub fn snapshot(&self, now: u64, limits: &Limits) -> Snapshot {
        let (_, requests_used, tokens_used) = self.window(now, limits.window_ms);
        let reset_ms = if requests_used == 0 {
            0
        } else {
            self.admissions.back().map_or(0, |a| (a.at_ms + limits.window_ms).saturating_sub(now))
        };
        let requests = WindowState {
            limit: u64::from(limits.requests_per_window),
            remaining: u64::from(limits.requests_per_window).saturating_sub(requests_used),
            reset_ms,
        };
        let tokens = limits.tokens_per_window.map(|limit| WindowState {
            limit,
            remaining: limit.saturating_sub(tokens_used),
            reset_ms,
        });
        let spent_this_period =
            if limits.budget.as_ref().is_some_and(|b| self.budget.period_key == period_key(now, b.period)) {
                self.budget.spent
            } else {
                Amount::default()
            };
        Snapshot { requests, tokens, in_flight: self.reservations.len() as u64, budget_used: spent_this_period }
    }

    /// Rows the object keeps in storage: admissions in the window, outstanding reservations that left it,
    /// admissions awaiting a batched delete, one budget row.
    pub fn stored_rows(&self) -> usize {
        let oldest_in_window = self.admissions.front().map_or(u64::MAX, |a| a.at_ms);
        let reserved_outside = self.reservations.values().filter(|r| r.at_ms < oldest_in_window).count();
        self.admissions.len() + reserved_outside + self.unpurged + self.adjusted.len() + 1
    }

    /// Why this request cannot be admitted now — the first limit that denies it, in the order requests, tokens,
    /// concurrency, budget — and how long until *every* limit would let it through (`None`: no reset is known).
    /// Each window's usage only falls while nothing is admitted, so the earliest fitting time is the latest of the
    /// per-limit times.
    fn denial(&self, now: u64, limits: &Limits, reserve: Amount) -> Option<(DenyReason, Option<u64>)> {
        let budget_tokens = limits.budget.as_ref().and_then(|b| b.tokens);
        if limits.tokens_per_window.is_some_and(|tpm| reserve.tokens > tpm) {
            return Some((DenyReason::TooLargeForTokensPerWindow, None));
        }
        if budget_tokens.is_some_and(|limit| reserve.tokens > limit) {
            return Some((DenyReason::TooLargeForBudget, None));
        }
        if limits.budget.as_ref().and_then(|b| b.usd).is_some_and(|limit| reserve.usd > limit) {
            return Some((DenyReason::TooLargeForUsdBudget, None));
        }

        let window = limits.window_ms;
        let (start, count, tokens_used) = self.window(now, window);
        let in_window = self.admissions.range(start..);
        let leaves_at = |a: &Admission| (a.at_ms + window).saturating_sub(now);
        let mut reason = None;
        let mut wait: Option<u64> = Some(0);
        let mut block = |why: DenyReason, until: Option<u64>| {
            reason.get_or_insert(why);
            wait = wait.zip(until).map(|(a, b)| a.max(b));
        };

        let limit = u64::from(limits.requests_per_window);
        if count >= limit {
            // The oldest (count − limit + 1) requests must leave before one more fits.
            let mut to_leave = count - limit + 1;
            let until = in_window.clone().find_map(|a| {
                to_leave = to_leave.saturating_sub(u64::from(a.count));
                (to_leave == 0).then(|| leaves_at(a))
            });
            block(DenyReason::Requests, until);
        }
        if let Some(tpm) = limits.tokens_per_window {
            if tokens_used.saturating_add(reserve.tokens) > tpm {
                let mut remaining = tokens_used;
                let until = in_window.clone().find_map(|a| {
                    remaining = remaining.saturating_sub(a.tokens);
                    (remaining.saturating_add(reserve.tokens) <= tpm).then(|| leaves_at(a))
                });
                block(DenyReason::Tokens, until);
            }
        }
        if limits.max_concurrency.is_some_and(|max| self.reservations.len() >= max as usize) {
            block(DenyReason::Concurrency, Some(CONCURRENCY_RETRY_MS));
        }
        if let Some(budget) = &limits.budget {
            let outstanding = self.outstanding;
            let until_next_period = period_end(now, budget.period).map(|end| end.saturating_sub(now));
            if budget_tokens.is_some_and(|limit| {
                self.budget.spent.tokens.saturating_add(outstanding.tokens).saturating_add(reserve.tokens) > limit
            }) {
                block(DenyReason::BudgetTokens, until_next_period);
            }
            if let Some(limit) = budget.usd {
                let spent = self.budget.spent.usd + outstanding.usd;
                // With no price known in advance (reserve 0) an exactly exhausted budget must still deny.
                if spent + reserve.usd > limit || spent >= limit {
                    block(DenyReason::BudgetUsd, until_next_period);
                }
            }
        }
        reason.map(|reason| (reason, wait))
    }

    /// Where the window at `now` starts in `admissions`, and the requests and tokens admitted inside it (a
    /// lease stamped later than `now` is inside). After `prune` the start is 0; a snapshot taken later only
    /// skips the few admissions that have left since.
    fn window(&self, now: u64, window_ms: u64) -> (usize, u64, u64) {
        let Some(cutoff) = now.checked_sub(window_ms) else {
            return (0, self.admitted_requests, self.admitted_tokens);
        };
        let start = self.admissions.partition_point(|a| a.at_ms <= cutoff);
        let (requests, tokens) = self
            .admissions
            .range(..start)
            .fold((0u64, 0u64), |(r, t), a| (r + u64::from(a.count), t.saturating_add(a.tokens)));
        (start, self.admitted_requests - requests, self.admitted_tokens.saturating_sub(tokens))
    }

    /// Forgets admissions that have left the window (storage forgets them in batches).
    fn prune(&mut self, now: u64, window_ms: u64, changes: &mut Vec<Change>) {
        let Some(cutoff) = now.checked_sub(window_ms) else { return };
        while let Some(oldest) = self.admissions.front().filter(|a| a.at_ms <= cutoff) {
            self.admitted_tokens = self.admitted_tokens.saturating_sub(oldest.tokens);
            self.admitted_requests -= u64::from(oldest.count);
            self.admissions.pop_front();
            self.unpurged += 1;
        }
        if self.unpurged >= PURGE_BATCH {
            self.unpurged = 0;
            changes.push(Change::ForgetUpTo(cutoff));
        }
    }

    /// Starts a new budget period when the calendar has moved on. Spend is tracked only while a budget applies.
    fn roll_period(&mut self, now: u64, limits: &Limits, changes: &mut Vec<Change>) {
        let Some(budget) = &limits.budget else { return };
        let key = period_key(now, budget.period);
        if self.budget.period_key != key {
            self.budget = BudgetSpend { period_key: key, spent: Amount::default() };
            changes.push(Change::SetBudget(self.budget.clone()));
        }
    }

    fn charge(&mut self, limits: &Limits, amount: Amount, changes: &mut Vec<Change>) {
        if limits.budget.is_none() {
            return;
        }
        self.budget.spent = add(self.budget.spent, amount);
        changes.push(Change::SetBudget(self.budget.clone()));
    }
}

fn add(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.saturating_add(b.tokens), usd: a.usd + b.usd }
}

fn sub(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.saturating_sub(b.tokens), usd: (a.usd - b.usd).max(0.0) }
}

fn max(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.max(b.tokens), usd: a.usd.max(b.usd) }
}

/// A report's totals made consistent: no more used than granted, no more settled than used, amounts clamped.
fn sanitized(t: LeaseTotals, slots: u32) -> LeaseTotals {
    let used = t.used.min(slots);
    LeaseTotals {
        returned: t.returned,
        used,
        settled: t.settled.min(used),
        reserved_used: t.reserved_used.clamped(),
        reserved_settled: t.reserved_settled.clamped(),
        actual_settled: t.actual_settled.clamped(),
    }
}

const DAY_MS: u64 = 86_400_000;

/// The budget period containing `now_ms` (UTC).
pub fn period_key(now_ms: u64, period: Period) -> String {
    let (year, month, day) = civil_from_days(now_ms / DAY_MS);
    match period {
        Period::Day => format!("{year:04}-{month:02}-{day:02}"),
        Period::Month => format!("{year:04}-{month:02}"),
        Period::Lifetime => "lifetime".to_owned(),
    }
}

/// When the period containing `now_ms` ends (UTC), or `None` for a lifetime budget.
pub fn period_end(now_ms: u64, period: Period) -> Option<u64> {
    match period {
        Period::Day => Some((now_ms / DAY_MS + 1) * DAY_MS),
        Period::Month => {
            let (year, month, _) = civil_from_days(now_ms / DAY_MS);
            let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
            Some(days_from_civil(next_year, next_month, 1) * DAY_MS)
        }
        Period::Lifetime => None,
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Budget;

    const W: u64 = 60_000;

    fn limits(rpm: u32) -> Limits {
        Limits {
            requests_per_window: rpm,
            tokens_per_window: None,
            window_ms: W,
            budget: None,
            max_concurrency: None,
            lease_ms: 600_000,
        }
    }

    fn tokens(n: u64) -> Amount {
        Amount { tokens: n, usd: 0.0 }
    }

    fn admitted(d: &Decision) -> bool {
        matches!(d, Decision::Admitted(_))
    }

    fn denied(d: &Decision) -> (DenyReason, Option<u64>) {
        match d {
            Decision::Denied { reason, retry_after_ms, .. } => (*reason, *retry_after_ms),
            Decision::Admitted(_) => panic!("expected a denial"),
        }
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn admits_exactly_the_limit_then_resumes_when_the_oldest_leaves() {
        let mut q = Quota::default();
        let l = limits(3);
        assert!(admitted(&q.admit(T0, &l, "a", tokens(0)).0));
        assert!(admitted(&q.admit(T0 + 10_000, &l, "b", tokens(0)).0));
        assert!(admitted(&q.admit(T0 + 20_000, &l, "c", tokens(0)).0));
        let (reason, retry) = denied(&q.admit(T0 + 30_000, &l, "d", tokens(0)).0);
        assert_eq!(reason, DenyReason::Requests);
        assert_eq!(retry, Some(30_000), "a leaves the window at T0 + 60 s");
        // One millisecond early: a is still in (t − 60 s, t].
        assert!(!admitted(&q.admit(T0 + W - 1, &l, "e", tokens(0)).0));
        assert!(admitted(&q.admit(T0 + W, &l, "f", tokens(0)).0));
        assert!(!admitted(&q.admit(T0 + W, &l, "g", tokens(0)).0));
    }

    #[test]
    fn snapshot_counts_remaining_and_reset() {
        let mut q = Quota::default();
        let l = limits(5);
        q.admit(T0, &l, "a", tokens(0));
        let (decision, _) = q.admit(T0 + 1_000, &l, "b", tokens(0));
        let Decision::Admitted(state) = decision else { panic!("admitted") };
        assert_eq!(state.requests, WindowState { limit: 5, remaining: 3, reset_ms: W });
        assert_eq!(q.snapshot(T0 + 31_000, &l).requests.reset_ms, 30_000);
        assert_eq!(q.snapshot(T0 + 61_000, &l).requests, WindowState { limit: 5, remaining: 5, reset_ms: 0 });
    }

    #[test]
    fn token_window_counts_reservations_then_actuals() {
        let mut q = Quota::default();
        let l = Limits { tokens_per_window: Some(1_000), ..limits(100) };
        assert!(admitted(&q.admit(T0, &l, "a", tokens(600)).0));
        let (reason, retry) = denied(&q.admit(T0 + 5_000, &l, "b", tokens(500)).0);
        assert_eq!((reason, retry), (DenyReason::Tokens, Some(55_000)));
        // a used far less than it reserved: the refund frees room at once.
        assert!(q.settle(T0 + 6_000, &l, "a", tokens(100)).0);
        assert!(admitted(&q.admit(T0 + 6_000, &l, "b", tokens(500)).0));
        assert_eq!(q.snapshot(T0 + 6_000, &l).tokens.map(|t| t.remaining), Some(400));
    }

    #[test]
    fn a_reservation_larger_than_a_limit_can_never_fit() {
        let mut q = Quota::default();
        let l = Limits { tokens_per_window: Some(1_000), ..limits(100) };
        assert_eq!(denied(&q.admit(T0, &l, "a", tokens(1_001)).0), (DenyReason::TooLargeForTokensPerWindow, None));
        let l =
            Limits { budget: Some(Budget { period: Period::Lifetime, tokens: Some(50), usd: None }), ..limits(100) };
        assert_eq!(denied(&q.admit(T0, &l, "a", tokens(51)).0), (DenyReason::TooLargeForBudget, None));
    }

    #[test]
    fn concurrency_is_released_by_settle() {
        let mut q = Quota::default();
        let l = Limits { max_concurrency: Some(2), ..limits(100) };
        assert!(admitted(&q.admit(T0, &l, "a", tokens(1)).0));
        assert!(admitted(&q.admit(T0, &l, "b", tokens(1)).0));
        assert_eq!(denied(&q.admit(T0, &l, "c", tokens(1)).0).0, DenyReason::Concurrency);
        q.settle(T0 + 1, &l, "a", tokens(1));
        assert!(admitted(&q.admit(T0 + 2, &l, "c", tokens(1)).0));
    }

    #[test]
    fn budget_counts_settled_and_outstanding_and_resets_with_the_day() {
        let mut q = Quota::default();
        let l =
            Limits { budget: Some(Budget { period: Period::Day, tokens: Some(1_000), usd: None }), ..limits(1_000) };
        let day_start = (T0 / DAY_MS) * DAY_MS;
        let t = day_start + 1_000;
        assert!(admitted(&q.admit(t, &l, "a", tokens(400)).0));
        assert!(admitted(&q.admit(t, &l, "b", tokens(400)).0));
        let (reason, retry) = denied(&q.admit(t, &l, "c", tokens(400)).0);
        assert_eq!(reason, DenyReason::BudgetTokens);
        assert_eq!(retry, Some(DAY_MS - 1_000), "until midnight UTC");
        q.settle(t + 10, &l, "a", tokens(100));
        assert!(admitted(&q.admit(t + 20, &l, "c", tokens(400)).0), "100 + 400 + 400 ≤ 1000");
        assert_eq!(q.snapshot(t + 20, &l).budget_used.tokens, 100);
        // Next day: spend starts over (outstanding b and c still count until they settle).
        let next = day_start + DAY_MS + 5;
        assert!(admitted(&q.admit(next, &l, "d", tokens(200)).0));
        assert_eq!(q.snapshot(next, &l).budget_used.tokens, 0);
    }

    #[test]
    fn usd_budget_denies_once_spent_even_without_a_price() {
        let mut q = Quota::default();
        let l =
            Limits { budget: Some(Budget { period: Period::Lifetime, tokens: None, usd: Some(1.0) }), ..limits(1_000) };
        assert!(admitted(&q.admit(T0, &l, "a", Amount::default()).0));
        q.settle(T0 + 1, &l, "a", Amount { tokens: 10, usd: 1.0 });
        let (reason, retry) = denied(&q.admit(T0 + 2, &l, "b", Amount::default()).0);
        assert_eq!((reason, retry), (DenyReason::BudgetUsd, None), "a lifetime budget never resets");
    }

    #[test]
    fn unsettled_reservations_are_charged_as_reserved_when_the_lease_ends() {
        let mut q = Quota::default();
        let l = Limits {
            lease_ms: 5_000,
            max_concurrency: Some(1),
            budget: Some(Budget { period: Period::Lifetime, tokens: Some(10_000), usd: None }),
            ..limits(100)
        };
        q.admit(T0, &l, "a", tokens(300));
        assert_eq!(q.next_lease_expiry(), Some(T0 + 5_000));
        assert!(q.expire_leases(T0 + 4_999, &l).0.is_empty());
        let changes = q.expire_leases(T0 + 5_000, &l);
        assert!(changes.0.contains(&Change::Settled { request_id: "a".into(), tokens: 300 }));
        assert_eq!(q.snapshot(T0 + 5_000, &l).budget_used.tokens, 300);
        assert_eq!(q.snapshot(T0 + 5_000, &l).in_flight, 0);
        assert!(!q.settle(T0 + 6_000, &l, "a", tokens(1)).0, "a late settle changes nothing");
        assert_eq!(q.snapshot(T0 + 6_000, &l).budget_used.tokens, 300);
        assert!(admitted(&q.admit(T0 + 6_000, &l, "b", tokens(1)).0), "the concurrency slot was released");
    }

    #[test]
    fn absurd_amounts_are_clamped_and_never_wrap_the_totals() {
        let mut q = Quota::default();
        let l = Limits {
            tokens_per_window: Some(u64::MAX),
            budget: Some(Budget { period: Period::Lifetime, tokens: Some(u64::MAX), usd: Some(1e300) }),
            ..limits(1_000)
        };
        for i in 0..50 {
            let id = format!("r{i}");
            assert!(admitted(&q.admit(T0 + i, &l, &id, tokens(u64::MAX)).0), "admission {i}");
            q.settle(T0 + i, &l, &id, Amount { tokens: u64::MAX, usd: f64::INFINITY });
        }
        let state = q.snapshot(T0 + 100, &l);
        assert_eq!(state.budget_used.tokens, 50 * Amount::MAX_TOKENS);
        assert_eq!(state.budget_used.usd, 0.0, "a non-finite cost counts as nothing");
        assert_eq!(state.tokens.map(|t| t.remaining), Some(u64::MAX - 50 * Amount::MAX_TOKENS));
        // The window still empties exactly.
        assert_eq!(q.snapshot(T0 + 100 + W, &l).tokens.map(|t| t.remaining), Some(u64::MAX));
    }

    #[test]
    fn a_correction_moves_the_budget_once_and_only_in_its_period() {
        let mut q = Quota::default();
        let l = Limits {
            tokens_per_window: Some(10_000),
            budget: Some(Budget { period: Period::Day, tokens: Some(10_000), usd: Some(1.0) }),
            ..limits(100)
        };
        let day_start = (T0 / DAY_MS) * DAY_MS;
        let t = day_start + 1_000;
        q.admit(t, &l, "a", tokens(500));
        q.settle(t + 10, &l, "a", Amount { tokens: 40, usd: 0.01 });
        let fix = Adjustment {
            request_id: "a".into(),
            admitted_at_ms: t,
            charged: Amount { tokens: 40, usd: 0.01 },
            actual: Amount { tokens: 90, usd: 0.03 },
        };
        let (applied, changes) = q.adjust(t + 20, &l, &fix);
        assert!(applied);
        assert!(changes.contains(&Change::Adjusted { request_id: "a".into(), at_ms: t + 20 }));
        let state = q.snapshot(t + 20, &l);
        assert_eq!(state.budget_used.tokens, 90);
        assert!((state.budget_used.usd - 0.03).abs() < 1e-12);
        assert_eq!(state.tokens.map(|w| w.remaining), Some(10_000 - 90), "the window holds the corrected count");
        assert!(!q.adjust(t + 30, &l, &fix).0, "a repeat changes nothing");
        assert_eq!(q.snapshot(t + 30, &l).budget_used.tokens, 90);

        // A correction for a request of the previous day leaves today's budget alone.
        let tomorrow = day_start + DAY_MS + 5;
        q.admit(tomorrow, &l, "b", tokens(10));
        q.settle(tomorrow, &l, "b", tokens(10));
        let old = Adjustment { request_id: "z".into(), admitted_at_ms: t, charged: tokens(1), actual: tokens(500) };
        assert!(q.adjust(tomorrow, &l, &old).0);
        assert_eq!(q.snapshot(tomorrow, &l).budget_used.tokens, 10);
        // An unsettled reservation is not corrected (its settlement will carry the right amount).
        q.admit(tomorrow + 1, &l, "c", tokens(10));
        let early =
            Adjustment { request_id: "c".into(), admitted_at_ms: tomorrow + 1, charged: tokens(1), actual: tokens(2) };
        assert!(!q.adjust(tomorrow + 2, &l, &early).0);
        // Remembered corrections are forgotten after the retention period.
        let (_, changes) = q.adjust(tomorrow + ADJUSTED_RETENTION_MS, &l, &old);
        assert!(changes.iter().any(|c| matches!(c, Change::ForgetAdjustedBefore(_))));
    }

    #[test]
    fn settling_twice_charges_once() {
        let mut q = Quota::default();
        let l =
            Limits { budget: Some(Budget { period: Period::Lifetime, tokens: Some(1_000), usd: None }), ..limits(10) };
        q.admit(T0, &l, "a", tokens(100));
        assert!(q.settle(T0, &l, "a", tokens(50)).0);
        assert!(!q.settle(T0, &l, "a", tokens(50)).0);
        assert_eq!(q.snapshot(T0, &l).budget_used.tokens, 50);
    }

    #[test]
    fn lowering_the_limit_below_the_current_count_waits_for_enough_to_leave() {
        let mut q = Quota::default();
        for (i, t) in [0u64, 1_000, 2_000, 3_000].iter().enumerate() {
            q.admit(T0 + t, &limits(10), &format!("r{i}"), tokens(0));
        }
        let (reason, retry) = denied(&q.admit(T0 + 4_000, &limits(2), "x", tokens(0)).0);
        assert_eq!(reason, DenyReason::Requests);
        assert_eq!(retry, Some(W + 2_000 - 4_000), "r0, r1 and r2 must leave");
    }

    #[test]
    fn storage_stays_bounded_by_the_limit() {
        let mut q = Quota::default();
        let l = limits(60);
        let mut t = T0;
        for i in 0..10_000 {
            let (d, _) = q.admit(t, &l, &format!("r{i}"), tokens(1));
            if admitted(&d) {
                q.settle(t, &l, &format!("r{i}"), tokens(1));
            }
            t += 250;
        }
        assert!(q.stored_rows() <= 60 + PURGE_BATCH + 1, "{} rows", q.stored_rows());
    }

    #[test]
    fn a_clock_step_backwards_does_not_reopen_the_window() {
        let mut q = Quota::default();
        let l = limits(1);
        q.admit(T0, &l, "a", tokens(0));
        assert!(!admitted(&q.admit(T0 - 30_000, &l, "b", tokens(0)).0));
    }

    #[test]
    fn calendar_periods() {
        // 2026-11-27T13:08:30Z
        let t = 1_795_784_910_000;
        assert_eq!(period_key(t, Period::Day), "2026-11-27");
        assert_eq!(period_key(t, Period::Month), "2026-11");
        assert_eq!(period_key(t, Period::Lifetime), "lifetime");
        assert_eq!(period_end(t, Period::Month), Some(1_796_083_200_000), "2026-12-01T00:00:00Z");
        assert_eq!(period_key(951_782_400_000, Period::Day), "2000-02-29");
        assert_eq!(period_end(1_798_675_200_000, Period::Month), Some(1_798_761_600_000), "December → next January");
    }
}

/// The implementation against a naive reference model: random arrivals, settles and lease expiries.
#[cfg(test)]
mod model_tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::protocol::Budget;

    const T0: u64 = 1_800_000_000_000;

    /// Keeps every admission forever and recomputes everything from scratch.
    #[derive(Default)]
    struct Model {
        admissions: Vec<(u64, String, u64)>,
        outstanding: HashMap<String, (Amount, u64)>,
        spent: Amount,
    }

    impl Model {
        fn in_window(&self, now: u64, w: u64) -> Vec<&(u64, String, u64)> {
            self.admissions.iter().filter(|(at, _, _)| *at + w > now).collect()
        }

        fn admit(&mut self, now: u64, l: &Limits, id: &str, reserve: Amount) -> Option<DenyReason> {
            if l.tokens_per_window.is_some_and(|tpm| reserve.tokens > tpm) {
                return Some(DenyReason::TooLargeForTokensPerWindow);
            }
            if l.budget.as_ref().and_then(|b| b.tokens).is_some_and(|limit| reserve.tokens > limit) {
                return Some(DenyReason::TooLargeForBudget);
            }
            let in_window = self.in_window(now, l.window_ms);
            if in_window.len() >= l.requests_per_window as usize {
                return Some(DenyReason::Requests);
            }
            if let Some(tpm) = l.tokens_per_window {
                if in_window.iter().map(|a| a.2).sum::<u64>() + reserve.tokens > tpm {
                    return Some(DenyReason::Tokens);
                }
            }
            if l.max_concurrency.is_some_and(|m| self.outstanding.len() >= m as usize) {
                return Some(DenyReason::Concurrency);
            }
            if let Some(limit) = l.budget.as_ref().and_then(|b| b.tokens) {
                let outstanding: u64 = self.outstanding.values().map(|(a, _)| a.tokens).sum();
                if self.spent.tokens + outstanding + reserve.tokens > limit {
                    return Some(DenyReason::BudgetTokens);
                }
            }
            self.admissions.push((now, id.to_owned(), reserve.tokens));
            self.outstanding.insert(id.to_owned(), (reserve, now + l.lease_ms));
            None
        }

        fn settle(&mut self, id: &str, actual: Amount) -> bool {
            if self.outstanding.remove(id).is_none() {
                return false;
            }
            if let Some(a) = self.admissions.iter_mut().find(|a| a.1 == id) {
                a.2 = actual.tokens;
            }
            self.spent.tokens += actual.tokens;
            true
        }

        fn expire(&mut self, now: u64) {
            let expired: Vec<String> =
                self.outstanding.iter().filter(|(_, (_, e))| *e <= now).map(|(k, _)| k.clone()).collect();
            for id in expired {
                if let Some((reserved, _)) = self.outstanding.remove(&id) {
                    self.spent.tokens += reserved.tokens;
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit {
            after_ms: u64,
            reserve: u64,
        },
        /// Settle the n-th outstanding reservation (if any) with this fraction of its reservation.
        Settle {
            nth: usize,
            percent: u64,
        },
        Expire {
            after_ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..3_000, 0u64..400).prop_map(|(after_ms, reserve)| Op::Admit { after_ms, reserve }),
            3 => (0usize..8, 0u64..=100).prop_map(|(nth, percent)| Op::Settle { nth, percent }),
            1 => (0u64..20_000).prop_map(|after_ms| Op::Expire { after_ms }),
        ]
    }

    fn limits_strategy() -> impl Strategy<Value = Limits> {
        (
            1u32..8,
            proptest::option::of(100u64..1_500),
            proptest::option::of(1u32..5),
            proptest::option::of(500u64..5_000),
        )
            .prop_map(|(rpm, tpm, conc, budget)| Limits {
                requests_per_window: rpm,
                tokens_per_window: tpm,
                window_ms: 10_000,
                budget: budget.map(|tokens| Budget { period: Period::Lifetime, tokens: Some(tokens), usd: None }),
                max_concurrency: conc,
                lease_ms: 15_000,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn implementation_agrees_with_the_reference_model(l in limits_strategy(), ops in proptest::collection::vec(op(), 1..200)) {
            let mut quota = Quota::default();
            let mut model = Model::default();
            let mut now = T0;
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Admit { after_ms, reserve } => {
                        now += after_ms;
                        let id = format!("r{i}");
                        let expected = model.admit(now, &l, &id, Amount { tokens: *reserve, usd: 0.0 });
                        let (decision, _) = quota.admit(now, &l, &id, Amount { tokens: *reserve, usd: 0.0 });
                        let got = match decision { Decision::Admitted(_) => None, Decision::Denied { reason, .. } => Some(reason) };
                        prop_assert_eq!(got, expected, "op {} at {}", i, now);
                    }
                    Op::Settle { nth, percent } => {
                        let mut ids: Vec<&String> = model.outstanding.keys().collect();
                        ids.sort();
                        if let Some(id) = ids.get(*nth).map(|s| s.to_string()) {
                            let reserved = model.outstanding[&id].0.tokens;
                            let actual = Amount { tokens: reserved * percent / 100, usd: 0.0 };
                            prop_assert_eq!(quota.settle(now, &l, &id, actual).0, model.settle(&id, actual));
                        }
                    }
                    Op::Expire { after_ms } => {
                        now += after_ms;
                        quota.expire_leases(now, &l);
                        model.expire(now);
                    }
                }
                // Invariants: never more admitted than allowed, in any window or budget.
                let in_window = model.in_window(now, l.window_ms);
                prop_assert!(in_window.len() <= l.requests_per_window as usize);
                if let Some(tpm) = l.tokens_per_window {
                    prop_assert!(in_window.iter().map(|a| a.2).sum::<u64>() <= tpm);
                }
                if let Some(limit) = l.budget.as_ref().and_then(|b| b.tokens) {
                    let outstanding: u64 = model.outstanding.values().map(|(a, _)| a.tokens).sum();
                    prop_assert!(model.spent.tokens + outstanding <= limit);
                }
                let snapshot = quota.snapshot(now, &l);
                prop_assert_eq!(snapshot.requests.remaining, (l.requests_per_window as u64).saturating_sub(in_window.len() as u64));
                prop_assert_eq!(snapshot.in_flight, model.outstanding.len() as u64);
            }
        }

        #[test]
        fn retry_after_is_exactly_when_the_request_would_fit(l in limits_strategy(), arrivals in proptest::collection::vec((0u64..2_000, 0u64..300), 1..60)) {
            // Requests and tokens only (no budget, no concurrency): waiting retry_after_ms must be enough, and
            // one millisecond less must not be.
            let l = Limits { budget: None, max_concurrency: None, ..l };
            let mut quota = Quota::default();
            let mut now = T0;
            for (i, (gap, reserve)) in arrivals.iter().enumerate() {
                now += gap;
                let reserve = Amount { tokens: *reserve, usd: 0.0 };
                let (decision, _) = quota.admit(now, &l, &format!("r{i}"), reserve);
                if let Decision::Denied { reason: DenyReason::Requests | DenyReason::Tokens, retry_after_ms: Some(retry), .. } = decision {
                    prop_assert!(retry > 0);
                    let mut early = quota.clone();
                    let (too_early, _) = early.admit(now + retry - 1, &l, "probe", reserve);
                    prop_assert!(!matches!(too_early, Decision::Admitted(_)), "admitted before retry-after");
                    let mut on_time = quota.clone();
                    let (decision, _) = on_time.admit(now + retry, &l, "probe", reserve);
                    prop_assert!(matches!(decision, Decision::Admitted(_)), "denied at retry-after: {:?}", decision);
                }
            }
        }
    }
}
