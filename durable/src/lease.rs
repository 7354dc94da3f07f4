//! An admission lease as the Worker isolate holding it sees it: which requests it may still admit without asking
//! the key's object, and the totals it reports back. Pure (the isolate's clock is passed in), so the Worker's
//! limiter and the property tests below use the same accounting.
//!
//! The isolate admits from a lease only before `usable_until_ms`: the time it *sent* the call that was granted
//! it plus the lease's validity, by its own clock. The object granted later than that and counts the slots until
//! its own, later, end of the lease, so every local admission falls inside the interval the object counted.

use crate::protocol::{Amount, KeyControl, LeaseGrant, LeaseReport, LeaseTotals, Snapshot, WindowState};

#[derive(Debug, Clone, PartialEq)]
pub struct HeldLease {
    pub lease_id: String,
    /// The control that applied at the grant: the models the key may use, its limits, its version.
    pub control: KeyControl,
    /// The object's clock at the grant: the budget period its requests count in.
    pub granted_at_ms: u64,
    usable_until_ms: u64,
    slots: u32,
    allowance: Amount,
    /// The key's state at the grant, the whole lease counted as used.
    state: Snapshot,
    totals: LeaseTotals,
    /// The totals the object has confirmed receiving.
    reported: LeaseTotals,
}

/// Why a request cannot be admitted from the lease (it then goes to the object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Ended, returned, or out of slots or allowance.
    Spent,
    /// The key's row the request presents is newer than the lease's control: its limits may have changed.
    Outdated,
    /// A model the lease's control does not allow (the object gives the error).
    Model,
}

impl HeldLease {
    pub fn new(grant: LeaseGrant, sent_at_ms: u64) -> Self {
        HeldLease {
            usable_until_ms: sent_at_ms.saturating_add(grant.valid_ms),
            lease_id: grant.lease_id,
            control: grant.control,
            granted_at_ms: grant.at_ms,
            slots: grant.slots,
            allowance: grant.allowance,
            state: grant.state,
            totals: LeaseTotals::default(),
            reported: LeaseTotals::default(),
        }
    }

    /// Admits one request reserving `reserve`, and says where the key stands for its rate-limit headers (the
    /// state at the grant, with this lease's unused slots and allowance as remaining).
    pub fn admit(&mut self, now_ms: u64, version: &str, models: &[String], reserve: Amount) -> Result<Snapshot, Miss> {
        if version > self.control.version.as_str() {
            return Err(Miss::Outdated);
        }
        let left = self.allowance_left();
        let fits = reserve.tokens <= left.tokens && reserve.usd <= left.usd + 1e-9 * self.allowance.usd;
        if self.totals.returned || now_ms >= self.usable_until_ms || self.totals.used >= self.slots || !fits {
            return Err(Miss::Spent);
        }
        if self.control.forbidden_model(models).is_some() {
            return Err(Miss::Model);
        }
        self.totals.used += 1;
        self.totals.reserved_used = add(self.totals.reserved_used, reserve);
        Ok(self.snapshot())
    }

    /// A request admitted from this lease is over.
    pub fn settle(&mut self, reserved: Amount, actual: Amount) {
        self.totals.settled += 1;
        self.totals.reserved_settled = add(self.totals.reserved_settled, reserved);
        self.totals.actual_settled = add(self.totals.actual_settled, actual.clamped());
    }

    /// Admits nothing more: what is unused goes back to the key with the next report.
    pub fn give_back(&mut self) {
        self.totals.returned = true;
    }

    pub fn usable(&self, now_ms: u64) -> bool {
        !self.totals.returned && now_ms < self.usable_until_ms
    }

    pub fn usable_until_ms(&self) -> u64 {
        self.usable_until_ms
    }

    /// A lease past its end is given back (nothing more can be admitted from it anyway).
    pub fn give_back_if_ended(&mut self, now_ms: u64) {
        if now_ms >= self.usable_until_ms {
            self.give_back();
        }
    }

    /// Its totals, if the object has not confirmed them yet.
    pub fn report(&self) -> Option<LeaseReport> {
        (self.totals != self.reported).then(|| LeaseReport { lease_id: self.lease_id.clone(), totals: self.totals })
    }

    /// The object answered a call that carried `sent`.
    pub fn confirm(&mut self, sent: &LeaseTotals) {
        self.reported = *sent;
    }

    /// Given back, every request settled, and the object told: the isolate can forget it.
    pub fn closed(&self) -> bool {
        self.totals.returned && self.totals.settled == self.totals.used && self.reported == self.totals
    }

    fn allowance_left(&self) -> Amount {
        Amount {
            tokens: self.allowance.tokens.saturating_sub(self.totals.reserved_used.tokens),
            usd: (self.allowance.usd - self.totals.reserved_used.usd).max(0.0),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let unused = u64::from(self.slots - self.totals.used);
        let with = |w: WindowState, more: u64| WindowState { remaining: (w.remaining + more).min(w.limit), ..w };
        Snapshot {
            requests: with(self.state.requests, unused),
            tokens: self.state.tokens.map(|t| with(t, self.allowance_left().tokens)),
            ..self.state
        }
    }
}

fn add(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.saturating_add(b.tokens), usd: a.usd + b.usd }
}

/// Leases against the truth: random interleavings of requests on several isolates (admitted from a lease, or by
/// a call that may carry reports and ask for a lease), settlements, reports, isolate crashes, and time passing
/// (lease ends, reservation expiries). The truth records every request at the instant it was admitted, as a
/// client would see it. No window or budget of the truth may ever exceed its limit, and once every request is
/// settled and every lease reported the object has charged exactly what was used.
#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::{Budget, LeaseWant, Limits, Period};
    use crate::quota::{Decision, Quota};

    const T0: u64 = 1_800_000_000_000;
    const WINDOW: u64 = 10_000;
    const LEASE_MS: u64 = 1_000;

    #[derive(Debug, Clone)]
    struct Truth {
        at: u64,
        reserve: u64,
        /// `Some` once settled.
        actual: Option<u64>,
    }

    #[derive(Debug, Clone)]
    enum Held {
        Object(String),
        Lease(String),
    }

    #[derive(Debug, Clone)]
    struct InFlight {
        held: Held,
        reserve: u64,
        truth: usize,
    }

    #[derive(Default)]
    struct Isolate {
        leases: Vec<HeldLease>,
        in_flight: Vec<InFlight>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request { isolate: usize, after_ms: u64, reserve: u64, want: u32 },
        Settle { isolate: usize, nth: usize, percent: u64 },
        Report { isolate: usize },
        Crash { isolate: usize },
        Wait { after_ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..3, 0u64..400, 0u64..300, prop_oneof![Just(0u32), 2u32..40])
                .prop_map(|(isolate, after_ms, reserve, want)| Op::Request { isolate, after_ms, reserve, want }),
            5 => (0usize..3, 0usize..6, 0u64..=100).prop_map(|(isolate, nth, percent)| Op::Settle { isolate, nth, percent }),
            2 => (0usize..3).prop_map(|isolate| Op::Report { isolate }),
            1 => (0usize..3).prop_map(|isolate| Op::Crash { isolate }),
            1 => (0u64..20_000).prop_map(|after_ms| Op::Wait { after_ms }),
        ]
    }

    fn limits_strategy() -> impl Strategy<Value = Limits> {
        (8u32..200, proptest::option::of(500u64..20_000), proptest::option::of(2_000u64..60_000), any::<bool>())
            .prop_map(|(rpm, tpm, budget, capped)| Limits {
                requests_per_window: rpm,
                tokens_per_window: tpm,
                window_ms: WINDOW,
                budget: budget.map(|tokens| Budget { period: Period::Lifetime, tokens: Some(tokens), usd: None }),
                max_concurrency: capped.then_some(50),
                lease_ms: 15_000,
            })
    }

    fn control(limits: &Limits) -> KeyControl {
        KeyControl { version: "v1".into(), revoked: false, limits: limits.clone(), allowed_models: None }
    }

    fn tokens(n: u64) -> Amount {
        Amount { tokens: n, usd: 0.0 }
    }

    /// Sends the isolate's reports (its ended leases given back first) and forgets the closed leases. False if
    /// the object no longer knew a lease (it had charged it at the end of its reservation).
    fn report(quota: &mut Quota, limits: &Limits, isolate: &mut Isolate, now: u64) -> bool {
        let mut all_known = true;
        for lease in &mut isolate.leases {
            lease.give_back_if_ended(now);
            if let Some(report) = lease.report() {
                all_known &= quota.report(now, limits, &report).0;
                lease.confirm(&report.totals);
            }
        }
        isolate.leases.retain(|l| !l.closed());
        all_known
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn no_interleaving_exceeds_a_limit_and_refunds_are_exact(
            l in limits_strategy(),
            ops in proptest::collection::vec(op(), 1..250),
        ) {
            let mut quota = Quota::default();
            let mut isolates: Vec<Isolate> = (0..3).map(|_| Isolate::default()).collect();
            let mut truth: Vec<Truth> = Vec::new();
            let mut now = T0;
            // Whether anything was charged as reserved (a crash, a reservation that outlived its lease): then
            // the key paid more than it used, and the exact-refund check does not apply.
            let mut overcharged = false;
            let mut granted = 0u32;
            let control = control(&l);
            for (i, op) in ops.iter().enumerate() {
                match op.clone() {
                    Op::Request { isolate, after_ms, reserve, want } => {
                        now += after_ms;
                        let iso = &mut isolates[isolate];
                        let local = iso.leases.iter_mut().find(|lease| lease.usable(now)).and_then(|lease| {
                            lease.admit(now, "v1", &[], tokens(reserve)).ok().map(|_| lease.lease_id.clone())
                        });
                        if let Some(lease_id) = local {
                            truth.push(Truth { at: now, reserve, actual: None });
                            iso.in_flight.push(InFlight { held: Held::Lease(lease_id), reserve, truth: truth.len() - 1 });
                        } else {
                            // The call: the isolate's usable lease (spent, or it would have admitted) goes back.
                            for lease in &mut iso.leases {
                                lease.give_back();
                            }
                            overcharged |= !report(&mut quota, &l, iso, now);
                            let id = format!("r{i}");
                            let (decision, _) = quota.admit(now, &l, &id, tokens(reserve));
                            if matches!(decision, Decision::Admitted(_)) {
                                truth.push(Truth { at: now, reserve, actual: None });
                                iso.in_flight.push(InFlight { held: Held::Object(id), reserve, truth: truth.len() - 1 });
                                if want > 0 {
                                    let lease_id = format!("l{i}");
                                    let ask = LeaseWant { lease_id: lease_id.clone(), slots: want, per_slot: tokens(reserve), valid_ms: LEASE_MS, unsettled_event: None };
                                    if let (Some(g), _) = quota.grant(now, &l, &ask) {
                                        prop_assert!(l.max_concurrency.is_none(), "a lease for a key with a concurrency cap");
                                        granted += g.slots;
                                        let grant = g.into_grant(lease_id, control.clone());
                                        iso.leases.push(HeldLease::new(grant, now));
                                    }
                                }
                            }
                        }
                    }
                    Op::Settle { isolate, nth, percent } => {
                        let iso = &mut isolates[isolate];
                        if nth < iso.in_flight.len() {
                            let request = iso.in_flight.remove(nth);
                            let actual = request.reserve * percent / 100;
                            truth[request.truth].actual = Some(actual);
                            match request.held {
                                Held::Object(id) => overcharged |= !quota.settle(now, &l, &id, tokens(actual)).0,
                                Held::Lease(lease_id) => {
                                    let lease = iso.leases.iter_mut().find(|lease| lease.lease_id == lease_id);
                                    prop_assert!(lease.is_some(), "a lease forgotten with a request in flight");
                                    if let Some(lease) = lease {
                                        lease.settle(tokens(request.reserve), tokens(actual));
                                    }
                                }
                            }
                        }
                    }
                    Op::Report { isolate } => overcharged |= !report(&mut quota, &l, &mut isolates[isolate], now),
                    Op::Crash { isolate } => {
                        overcharged |= !isolates[isolate].in_flight.is_empty() || !isolates[isolate].leases.is_empty();
                        isolates[isolate] = Isolate::default();
                    }
                    Op::Wait { after_ms } => {
                        now += after_ms;
                        quota.expire_leases(now, &l);
                    }
                }
                // The truth, as clients saw it: never more in a window or a budget than allowed.
                let in_window: Vec<&Truth> = truth.iter().filter(|t| t.at + WINDOW > now).collect();
                prop_assert!(in_window.len() <= l.requests_per_window as usize, "{} requests in the window at op {}", in_window.len(), i);
                if let Some(tpm) = l.tokens_per_window {
                    let used: u64 = in_window.iter().map(|t| t.actual.unwrap_or(t.reserve)).sum();
                    prop_assert!(used <= tpm, "{} tokens in the window at op {}", used, i);
                }
                if let Some(limit) = l.budget.as_ref().and_then(|b| b.tokens) {
                    let used: u64 = truth.iter().map(|t| t.actual.unwrap_or(t.reserve)).sum();
                    prop_assert!(used <= limit, "{} of a budget of {} at op {}", used, limit, i);
                }
                // The object never counts less than the truth.
                let state = quota.snapshot(now, &l);
                prop_assert!(state.requests.remaining <= u64::from(l.requests_per_window) - in_window.len() as u64);
            }

            // Everything settles and is reported: what the object charged is exactly what was used.
            if l.budget.is_some() && !overcharged {
                for iso in &mut isolates {
                    for request in std::mem::take(&mut iso.in_flight) {
                        let actual = request.reserve / 2;
                        truth[request.truth].actual = Some(actual);
                        match request.held {
                            Held::Object(id) => overcharged |= !quota.settle(now, &l, &id, tokens(actual)).0,
                            Held::Lease(lease_id) => {
                                if let Some(lease) = iso.leases.iter_mut().find(|lease| lease.lease_id == lease_id) {
                                    lease.settle(tokens(request.reserve), tokens(actual));
                                }
                            }
                        }
                    }
                    for lease in &mut iso.leases {
                        lease.give_back();
                    }
                    overcharged |= !report(&mut quota, &l, iso, now);
                    prop_assert!(iso.leases.is_empty(), "a lease left open after its last report");
                }
                let used: u64 = truth.iter().map(|t| t.actual.unwrap_or_default()).sum();
                let state = quota.snapshot(now, &l);
                if overcharged {
                    prop_assert!(state.budget_used.tokens >= used);
                } else {
                    prop_assert_eq!(state.budget_used.tokens, used, "charged ≠ used ({} slots granted)", granted);
                }
                prop_assert_eq!(state.in_flight, 0);
            }
        }
    }

    #[test]
    fn a_burst_at_the_limit_admits_exactly_the_limit_and_grants_nothing() {
        let l = Limits {
            requests_per_window: 60,
            tokens_per_window: None,
            window_ms: 60_000,
            budget: None,
            max_concurrency: None,
            lease_ms: 900_000,
        };
        let mut quota = Quota::default();
        let mut admitted = 0;
        let mut leases = Vec::new();
        for i in 0..1000 {
            let now = T0 + i;
            let mut got_in =
                leases.iter_mut().any(|lease: &mut HeldLease| lease.admit(now, "v1", &[], tokens(0)).is_ok());
            if !got_in && matches!(quota.admit(now, &l, &format!("r{i}"), tokens(0)).0, Decision::Admitted(_)) {
                got_in = true;
                let want = LeaseWant {
                    lease_id: format!("l{i}"),
                    slots: 1000,
                    per_slot: tokens(0),
                    valid_ms: 1000,
                    unsettled_event: None,
                };
                if let (Some(g), _) = quota.grant(now, &l, &want) {
                    let grant = g.into_grant(want.lease_id, control(&l));
                    leases.push(HeldLease::new(grant, now));
                }
            }
            admitted += usize::from(got_in);
        }
        assert_eq!(admitted, 60);
        // Grants shrank as the window filled: a quarter of what was left each time.
        let sizes: Vec<u32> = leases.iter().map(|l| l.slots).collect();
        assert_eq!(sizes.first(), Some(&14), "59 left after the first request: a quarter");
        assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "grants never grow near the limit: {sizes:?}");
    }

    #[test]
    fn a_returned_lease_releases_its_unused_slots_and_allowance() {
        let l = Limits {
            requests_per_window: 100,
            tokens_per_window: Some(10_000),
            window_ms: 60_000,
            budget: None,
            max_concurrency: None,
            lease_ms: 900_000,
        };
        let mut quota = Quota::default();
        let want =
            LeaseWant { lease_id: "l".into(), slots: 20, per_slot: tokens(100), valid_ms: 1000, unsettled_event: None };
        let (g, _) = quota.grant(T0, &l, &want);
        let g = g.expect("room for a lease");
        assert_eq!((g.slots, g.allowance.tokens), (20, 2_000));
        assert_eq!(quota.snapshot(T0, &l).requests.remaining, 80);
        let mut lease = HeldLease::new(g.into_grant("l".into(), control(&l)), T0);
        let headers = lease.admit(T0 + 1, "v1", &[], tokens(100)).expect("a slot");
        assert_eq!(headers.requests.remaining, 99, "the lease's unused slots count as remaining");
        assert_eq!(lease.admit(T0 + 1_000, "v1", &[], tokens(100)), Err(Miss::Spent), "the lease has ended");
        assert_eq!(lease.admit(T0 + 2, "v2", &[], tokens(100)), Err(Miss::Outdated));
        lease.settle(tokens(100), tokens(40));
        lease.give_back();
        let report = lease.report().expect("something to report");
        assert!(quota.report(T0 + 5, &l, &report).0);
        lease.confirm(&report.totals);
        assert!(lease.closed());
        let state = quota.snapshot(T0 + 5, &l);
        assert_eq!(state.requests.remaining, 99, "19 unused slots released");
        assert_eq!(state.tokens.map(|t| t.remaining), Some(9_960), "what was used, not the allowance");
        assert!(!quota.report(T0 + 6, &l, &report).0, "a report applies once");
    }
}
