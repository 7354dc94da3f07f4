//! The conversation with a key's Durable Object, from the Worker's side — the only code that calls the object.
//!
//! - **Typed calls**: each message knows its path and its answer (`key_limiter::protocol::Call`), with a deadline.
//! - **Admission leases**: the object may grant this isolate a batch of slots and an allowance
//!   (`key_limiter::lease::HeldLease`); requests are then admitted here, without a call, until the lease ends
//!   (`ADMISSION_LEASE_MS`) or runs out. The object counts every granted slot as used from its grant to its
//!   end, so quotas stay exact; what was used and what is left go back with the key's next call, or on their own
//!   once the lease has ended.
//! - **Combined calls**: requests of one key that need the object while a call for that key is in flight wait
//!   for it and go together in the next one (one leader at a time per key; the others poll their own timer, so
//!   every request resumes in its own request context).
//! - **Reservations**: [`Reservation`] is `#[must_use]` and only [`Reservation::settle`] consumes it. Settlements
//!   ride on the key's next call when one comes within [`SETTLE_DEFERRAL`]; otherwise they are sent on their own.
//! - **Control pushes** from the admin API ([`configure`]), which also give back this isolate's lease of the key.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use key_limiter::lease::{HeldLease, Miss};
use key_limiter::protocol::{
    AdmitDecision, AdmitRequest, Amount, Call, Candidate, KeyControl, LeaseReport, LeaseWant, Limits, SettleBatch,
    SettleRequest, Snapshot, StateRequest, StateResponse,
};
use wasm_bindgen::JsValue;
use worker::Env;

use crate::bindings::{log_error, now_ms, within};

pub const KEY_LIMITER: &str = "KEY_LIMITER";

/// How long a settlement waits for an admission to ride with (it holds the reservation that much longer).
const SETTLE_DEFERRAL: Duration = Duration::from_millis(50);
/// How often a request waiting for another's call looks for its answer.
const WAIT_POLL: Duration = Duration::from_millis(1);
/// Most requests one call carries (the rest wait for the next).
const MAX_CANDIDATES: usize = 256;
/// A lease is asked for when the isolate admitted at least this many requests of the key within the last
/// lease lifetime: a key doing one request a second gets no batching.
const MIN_RECENT_FOR_LEASE: usize = 2;

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum LimiterError {
    /// No answer within the deadline.
    Timeout,
    /// The object could not be reached or refused the message (it answers 500 when its storage is unreadable).
    Failed(String),
}

impl LimiterError {
    pub fn label(&self) -> &'static str {
        match self {
            LimiterError::Timeout => "limiter_timeout",
            LimiterError::Failed(_) => "limiter_unreachable",
        }
    }
}

impl std::fmt::Display for LimiterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimiterError::Timeout => f.write_str("no answer within the deadline"),
            LimiterError::Failed(e) => f.write_str(e),
        }
    }
}

/// What one request cost the object, for its log line and the platform bill.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub calls: u32,
    pub rows_written: u64,
}

impl Traffic {
    pub fn add(&mut self, other: Traffic) {
        self.calls += other.calls;
        self.rows_written += other.rows_written;
    }
}

/// Sends one message to the key's object (`idFromName(key id)`) and decodes its answer, within `timeout_ms`.
pub async fn call<M: Call>(env: &Env, key_id: &str, message: &M, timeout_ms: u64) -> Result<M::Answer, LimiterError> {
    let exchange = async {
        let stub = env.durable_object(KEY_LIMITER)?.id_from_name(key_id)?.get_stub()?;
        let body = serde_json::to_string(message)?;
        let mut init = worker::RequestInit::new();
        init.with_method(worker::Method::Post).with_body(Some(JsValue::from_str(&body)));
        let request = worker::Request::new_with_init(&format!("https://key-limiter{}", M::PATH), &init)?;
        let mut response = stub.fetch_with_request(request).await?;
        if response.status_code() != 200 {
            let detail = response.text().await.unwrap_or_default();
            return Err(worker::Error::RustError(format!(
                "limiter answered {} on {}: {detail}",
                response.status_code(),
                M::PATH
            )));
        }
        response.json::<M::Answer>().await
    };
    match within(Duration::from_millis(timeout_ms), exchange).await {
        Some(Ok(answer)) => Ok(answer),
        Some(Err(e)) => Err(LimiterError::Failed(e.to_string())),
        None => Err(LimiterError::Timeout),
    }
}

/// An admitted request's hold on its key's limits. It must end in [`Reservation::settle`], with what the request
/// used; a reservation that is never settled (its isolate died) is charged as reserved when its lease ends.
#[must_use = "a reservation is released only by settling it"]
#[derive(Debug)]
pub struct Reservation {
    key_id: String,
    hold: Hold,
    /// When the object admitted it (or granted its lease), by the object's clock.
    pub admitted_at_ms: u64,
}

#[derive(Debug)]
enum Hold {
    /// Admitted by the object: settled by request id.
    Object { request_id: String },
    /// Admitted from this isolate's lease: settled into the lease's totals.
    Lease { lease_id: String, reserved: Amount },
}

/// How a request was admitted, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// From this isolate's lease: no call.
    Lease,
    /// By a call this request made (carrying whoever was waiting with it).
    Call,
    /// By a call another request of the key made, or from a lease that call brought.
    Joined,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::Lease => "lease",
            Route::Call => "call",
            Route::Joined => "joined",
        }
    }
}

/// The object's answer for one request, and where the key stands (for the rate-limit headers).
#[derive(Debug)]
pub enum Admission {
    Admitted {
        reservation: Reservation,
        state: Snapshot,
        limits: Limits,
    },
    Denied {
        reason: key_limiter::protocol::DenyReason,
        retry_after_ms: Option<u64>,
        state: Snapshot,
        limits: Limits,
        model: Option<String>,
    },
}

/// Builds a usage event for `(id, error)`.
pub type UnsettledEvent = Box<dyn Fn(&str, &str) -> Option<String>>;

/// One request asking to be admitted.
pub struct Ask {
    pub control: KeyControl,
    /// Its `unsettled_event` is filled in only if it goes to the object (a lease needs none).
    pub candidate: Candidate,
    /// The usage event the object bills if what it admits is never accounted for, named `(id, error)`: the
    /// request's own (`unsettled`), or that of a lease its call brings (`unsettled_lease`, which the object
    /// fills in with what it charged). Built only when a call is made.
    pub unsettled_event: UnsettledEvent,
    /// The id a lease this request's call brings would have.
    pub lease_id: String,
}

/// Where a waiting request's answer comes from.
enum Outcome {
    Answer(Box<Result<Admission, LimiterError>>),
    /// The call that carried the others has returned: this request makes the next one.
    Lead,
}

struct Waiter {
    ticket: u64,
    ask: Ask,
}

/// This isolate's side of one key's conversation.
#[derive(Default)]
struct KeyState {
    leases: Vec<HeldLease>,
    settles: Vec<SettleRequest>,
    waiting: Vec<Waiter>,
    outcomes: HashMap<u64, Outcome>,
    /// A call for this key is in flight (its leader hands over to a waiter, or clears this).
    calling: bool,
    /// When this isolate admitted the key's recent requests (for the lease size).
    recent: VecDeque<u64>,
    /// A lone report is already scheduled to go at this time.
    flush_at: Option<u64>,
}

thread_local! {
    static KEYS: RefCell<HashMap<String, KeyState>> = RefCell::new(HashMap::new());
    static NEXT_TICKET: RefCell<u64> = const { RefCell::new(0) };
    static ADMISSIONS: RefCell<u64> = const { RefCell::new(0) };
}

/// Every this many admissions the isolate forgets the keys it holds nothing for (so an isolate that sees many
/// keys keeps state only for the busy ones).
const SWEEP_EVERY: u64 = 1024;

impl KeyState {
    /// Holds nothing: no lease, nothing waiting or held back, no recent traffic.
    fn idle(&self, now: u64, lease_ms: u64) -> bool {
        self.leases.is_empty()
            && self.settles.is_empty()
            && self.waiting.is_empty()
            && self.outcomes.is_empty()
            && !self.calling
            && self.flush_at.is_none()
            && self.recent.back().is_none_or(|&at| at + lease_ms <= now)
    }
}

fn sweep_now_and_then(now: u64, lease_ms: u64) {
    let due = ADMISSIONS.with(|n| {
        let mut n = n.borrow_mut();
        *n += 1;
        n.is_multiple_of(SWEEP_EVERY)
    });
    if due {
        KEYS.with(|keys| keys.borrow_mut().retain(|_, key| !key.idle(now, lease_ms)));
    }
}

fn with_key<T>(key_id: &str, f: impl FnOnce(&mut KeyState) -> T) -> T {
    KEYS.with(|keys| f(keys.borrow_mut().entry(key_id.to_owned()).or_default()))
}

/// The settings of one admission.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub timeout_ms: u64,
    /// `ADMISSION_LEASE_MS`; 0: no leases.
    pub lease_ms: u64,
}

/// Admits a request: from this isolate's lease of the key if it can, else by the key's object (with whatever
/// else of the key is waiting, and asking for a lease if the key is busy here).
pub async fn admit(
    env: &Env,
    key_id: &str,
    ask: Ask,
    settings: Settings,
) -> (Result<Admission, LimiterError>, Route, Traffic) {
    let now = now_ms();
    sweep_now_and_then(now, settings.lease_ms);
    if let Some(admission) = with_key(key_id, |key| key.admit_locally(key_id, &ask, now, settings.lease_ms)) {
        return (Ok(admission), Route::Lease, Traffic::default());
    }
    let ticket = NEXT_TICKET.with(|t| {
        let mut t = t.borrow_mut();
        *t += 1;
        *t
    });
    let lead = with_key(key_id, |key| {
        key.waiting.push(Waiter { ticket, ask });
        !std::mem::replace(&mut key.calling, true)
    });
    if lead {
        let traffic = lead_calls(env, key_id, settings).await;
        let outcome = with_key(key_id, |key| key.outcomes.remove(&ticket));
        return match outcome {
            Some(Outcome::Answer(answer)) => (*answer, Route::Call, traffic),
            _ => (Err(LimiterError::Failed("no answer for the leader".into())), Route::Call, traffic),
        };
    }
    // Another request's call is in flight: wait for it (twice the deadline: its call, then ours).
    let deadline = now.saturating_add(2 * settings.timeout_ms);
    loop {
        worker::Delay::from(WAIT_POLL).await;
        match with_key(key_id, |key| key.outcomes.remove(&ticket)) {
            Some(Outcome::Answer(answer)) => return (*answer, Route::Joined, Traffic::default()),
            Some(Outcome::Lead) => {
                let traffic = lead_calls(env, key_id, settings).await;
                let answer = with_key(key_id, |key| key.outcomes.remove(&ticket));
                return match answer {
                    Some(Outcome::Answer(answer)) => (*answer, Route::Call, traffic),
                    _ => (Err(LimiterError::Failed("no answer for the leader".into())), Route::Call, traffic),
                };
            }
            None if now_ms() >= deadline => {
                with_key(key_id, |key| key.waiting.retain(|w| w.ticket != ticket));
                return (Err(LimiterError::Timeout), Route::Joined, Traffic::default());
            }
            None => {}
        }
    }
}

/// Makes one call for everyone waiting on the key, then hands the lead to a request still waiting (if any).
/// The lead is handed over (or released) even if this future is dropped.
async fn lead_calls(env: &Env, key_id: &str, settings: Settings) -> Traffic {
    struct HandOver<'a>(&'a str);
    impl Drop for HandOver<'_> {
        fn drop(&mut self) {
            with_key(self.0, |key| match key.waiting.first() {
                Some(next) => {
                    key.outcomes.insert(next.ticket, Outcome::Lead);
                }
                None => key.calling = false,
            });
        }
    }
    let _hand_over = HandOver(key_id);
    let sent_at = now_ms();
    let (waiters, message) = with_key(key_id, |key| key.next_call(sent_at, settings.lease_ms));
    let Some(message) = message else { return Traffic::default() };
    let answer = call(env, key_id, &message, settings.timeout_ms).await;
    let rows_written = answer.as_ref().map_or(0, |a| a.rows_written);
    let now = now_ms();
    with_key(key_id, |key| key.take_answer(key_id, waiters, message, answer, sent_at, now));
    Traffic { calls: 1, rows_written }
}

impl KeyState {
    fn admit_locally(&mut self, key_id: &str, ask: &Ask, now: u64, lease_ms: u64) -> Option<Admission> {
        self.note_admission(now, lease_ms);
        self.admit_from_lease(key_id, ask, now)
    }

    fn admit_from_lease(&mut self, key_id: &str, ask: &Ask, now: u64) -> Option<Admission> {
        let candidate = &ask.candidate;
        let lease = self.leases.iter_mut().find(|l| l.usable(now))?;
        match lease.admit(now, &ask.control.version, &candidate.models, candidate.reserve) {
            Ok(state) => Some(Admission::Admitted {
                reservation: Reservation {
                    key_id: key_id.to_owned(),
                    hold: Hold::Lease { lease_id: lease.lease_id.clone(), reserved: candidate.reserve },
                    admitted_at_ms: lease.granted_at_ms,
                },
                state,
                limits: lease.control.limits.clone(),
            }),
            Err(Miss::Spent | Miss::Outdated) => {
                lease.give_back();
                None
            }
            // The object decides (and words the error).
            Err(Miss::Model) => None,
        }
    }

    fn note_admission(&mut self, now: u64, lease_ms: u64) {
        while self.recent.front().is_some_and(|&at| at + lease_ms <= now) {
            self.recent.pop_front();
        }
        if lease_ms > 0 && self.recent.len() < MAX_CANDIDATES * 4 {
            self.recent.push_back(now);
        }
    }

    /// The next call: the waiting candidates (up to [`MAX_CANDIDATES`]), the held-back settlements, every
    /// lease's report, and a lease sized by the key's recent traffic here. Every lease is given back first: a
    /// request that needs the object found no room in them, and what they still hold would be refused to the
    /// candidates.
    fn next_call(&mut self, now: u64, lease_ms: u64) -> (Vec<Waiter>, Option<AdmitRequest>) {
        let take = self.waiting.len().min(MAX_CANDIDATES);
        let waiters: Vec<Waiter> = self.waiting.drain(..take).collect();
        let Some(first) = waiters.first() else { return (waiters, None) };
        self.leases.iter_mut().for_each(HeldLease::give_back);
        // The newest key row any of them presented.
        let control = waiters
            .iter()
            .map(|w| &w.ask.control)
            .max_by(|a, b| a.version.cmp(&b.version))
            .unwrap_or(&first.ask.control)
            .clone();
        let recent = self.recent.len();
        let lease = (lease_ms > 0 && recent >= MIN_RECENT_FOR_LEASE).then(|| {
            let per_slot = waiters
                .iter()
                .map(|w| w.ask.candidate.reserve)
                .fold(Amount::default(), |a, b| Amount { tokens: a.tokens.max(b.tokens), usd: a.usd.max(b.usd) });
            LeaseWant {
                lease_id: first.ask.lease_id.clone(),
                slots: u32::try_from(recent * 2).unwrap_or(u32::MAX),
                per_slot,
                valid_ms: lease_ms,
                unsettled_event: (first.ask.unsettled_event)(&first.ask.lease_id, "unsettled_lease"),
            }
        });
        let candidates = waiters
            .iter()
            .map(|w| Candidate {
                unsettled_event: (w.ask.unsettled_event)(&w.ask.candidate.request_id, "unsettled"),
                ..w.ask.candidate.clone()
            })
            .collect();
        let message = AdmitRequest {
            control,
            candidates,
            settle: std::mem::take(&mut self.settles),
            reports: self.reports(now),
            lease,
        };
        (waiters, Some(message))
    }

    fn take_answer(
        &mut self,
        key_id: &str,
        waiters: Vec<Waiter>,
        sent: AdmitRequest,
        answer: Result<key_limiter::protocol::AdmitResponse, LimiterError>,
        sent_at: u64,
        now: u64,
    ) {
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // Nothing it carried was applied: keep the settlements (reports are sent again from the totals).
                self.settles.extend(sent.settle);
                for w in waiters {
                    self.outcomes.insert(w.ticket, Outcome::Answer(Box::new(Err(e.clone()))));
                }
                return;
            }
        };
        self.confirm(&sent.reports);
        if let Some(grant) = answer.lease {
            self.leases.push(HeldLease::new(grant, sent_at));
        }
        let mut decisions = answer.decisions.into_iter();
        for w in waiters {
            let outcome = match decisions.next() {
                Some(AdmitDecision::Admitted { state, limits, at_ms }) => Ok(Admission::Admitted {
                    reservation: Reservation {
                        key_id: key_id.to_owned(),
                        hold: Hold::Object { request_id: w.ask.candidate.request_id.clone() },
                        admitted_at_ms: at_ms,
                    },
                    state,
                    limits,
                }),
                Some(AdmitDecision::Denied { reason, retry_after_ms, state, limits, model }) => {
                    Ok(Admission::Denied { reason, retry_after_ms, state, limits, model })
                }
                None => Err(LimiterError::Failed("the limiter answered fewer decisions than it was asked".into())),
            };
            self.outcomes.insert(w.ticket, Outcome::Answer(Box::new(outcome)));
        }
        // Whoever arrived during the call may fit the lease it brought.
        let mut still_waiting = Vec::new();
        for w in std::mem::take(&mut self.waiting) {
            match self.admit_from_lease(key_id, &w.ask, now) {
                Some(admission) => {
                    self.outcomes.insert(w.ticket, Outcome::Answer(Box::new(Ok(admission))));
                }
                None => still_waiting.push(w),
            }
        }
        self.waiting = still_waiting;
    }

    /// Every lease's unconfirmed totals (leases past their end are given back first).
    fn reports(&mut self, now: u64) -> Vec<LeaseReport> {
        self.leases
            .iter_mut()
            .filter_map(|lease| {
                lease.give_back_if_ended(now);
                lease.report()
            })
            .collect()
    }

    fn confirm(&mut self, sent: &[LeaseReport]) {
        for report in sent {
            if let Some(lease) = self.leases.iter_mut().find(|l| l.lease_id == report.lease_id) {
                lease.confirm(&report.totals);
            }
        }
        self.leases.retain(|l| !l.closed());
    }
}

impl Reservation {
    /// Replaces the reservation with what was used. One admitted by the object waits briefly for the key's next
    /// call from this isolate to carry it (under load it almost always does), else it is sent on its own. One
    /// admitted from a lease goes into the lease's totals, which the key's next call carries (or
    /// [`report_leases`]). A settlement that cannot be delivered leaves its reservation to be charged as reserved
    /// when its reservation lease ends: the key is over-charged, never under-charged.
    pub async fn settle(self, env: &Env, actual: Amount, timeout_ms: u64) -> Traffic {
        let key_id = self.key_id;
        let by_object = with_key(&key_id, |key| match self.hold {
            Hold::Object { request_id } => {
                key.settles.push(SettleRequest { request_id, actual });
                true
            }
            Hold::Lease { lease_id, reserved } => {
                if let Some(lease) = key.leases.iter_mut().find(|l| l.lease_id == lease_id) {
                    lease.settle(reserved, actual);
                }
                false
            }
        });
        if !by_object {
            return Traffic::default();
        }
        worker::Delay::from(SETTLE_DEFERRAL).await;
        flush(env, &key_id, timeout_ms).await
    }
}

/// Sends the key's lease reports once its open leases have ended, if no other request of the key is already
/// waiting to: someone must, when no call comes along to carry them, or the object would hold the unused
/// slots and allowance until the end of the reservation lease. Call it last (it may wait up to a lease's
/// lifetime; nothing a client or the ledger waits for should come after it).
pub async fn report_leases(env: &Env, key_id: &str, timeout_ms: u64) -> Traffic {
    let Some(at) = with_key(key_id, |key| key.claim_lease_flush(now_ms())) else { return Traffic::default() };
    worker::Delay::from(Duration::from_millis(at.saturating_sub(now_ms()))).await;
    flush(env, key_id, timeout_ms).await
}

impl KeyState {
    /// When the reports of this key's open leases are due (after the last one's end), if no request has
    /// claimed that already.
    fn claim_lease_flush(&mut self, now: u64) -> Option<u64> {
        let end = self.leases.iter().filter(|l| !l.closed()).map(HeldLease::usable_until_ms).max()?;
        let at = end.max(now) + SETTLE_DEFERRAL.as_millis() as u64;
        if self.flush_at.is_some_and(|claimed| claimed >= at) {
            return None;
        }
        self.flush_at = Some(at);
        Some(at)
    }
}

/// Sends the key's held-back settlements and lease reports, if any, on their own.
async fn flush(env: &Env, key_id: &str, timeout_ms: u64) -> Traffic {
    let now = now_ms();
    let batch = with_key(key_id, |key| {
        if key.flush_at.is_some_and(|at| at <= now) {
            key.flush_at = None;
        }
        SettleBatch { settle: std::mem::take(&mut key.settles), reports: key.reports(now) }
    });
    if batch.settle.is_empty() && batch.reports.is_empty() {
        return Traffic::default();
    }
    match call(env, key_id, &batch, timeout_ms).await {
        Ok(answer) => {
            with_key(key_id, |key| key.confirm(&batch.reports));
            Traffic { calls: 1, rows_written: answer.rows_written }
        }
        Err(e) => {
            with_key(key_id, |key| key.settles.extend(batch.settle));
            log_error("limiter_settle_failed", &e.to_string());
            Traffic { calls: 1, rows_written: 0 }
        }
    }
}

/// Where the key stands, without admitting anything.
pub async fn state(
    env: &Env,
    key_id: &str,
    control: KeyControl,
    timeout_ms: u64,
) -> Result<StateResponse, LimiterError> {
    call(env, key_id, &StateRequest { control }, timeout_ms).await
}

/// How often, and how far apart, the admin API tries to tell a key's object about a change.
const CONFIGURE_RETRIES_MS: [u64; 3] = [0, 200, 1000];

/// Pushes a key's new control (limits, allowed models, revocation) to its object, retrying briefly, and gives
/// back this isolate's lease of the key (other isolates' leases end within `ADMISSION_LEASE_MS`). An error
/// means the object was not told: the caller must not report the change as in force.
pub async fn configure(env: &Env, key_id: &str, control: &KeyControl, timeout_ms: u64) -> Result<(), LimiterError> {
    with_key(key_id, |key| key.leases.iter_mut().for_each(HeldLease::give_back));
    let mut last = LimiterError::Timeout;
    for delay_ms in CONFIGURE_RETRIES_MS {
        if delay_ms > 0 {
            worker::Delay::from(Duration::from_millis(delay_ms)).await;
        }
        match call(env, key_id, control, timeout_ms).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use key_limiter::protocol::{AdmitResponse, DenyReason, LeaseGrant, WindowState};

    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn limits() -> Limits {
        Limits {
            requests_per_window: 1000,
            tokens_per_window: None,
            window_ms: 60_000,
            budget: None,
            max_concurrency: None,
            lease_ms: 900_000,
        }
    }

    fn control() -> KeyControl {
        KeyControl { version: "v1".into(), revoked: false, limits: limits(), allowed_models: None }
    }

    fn ask(id: &str) -> Ask {
        Ask {
            control: control(),
            candidate: Candidate {
                request_id: id.into(),
                models: vec!["m".into()],
                reserve: Amount { tokens: 100, usd: 0.0 },
                unsettled_event: None,
            },
            unsettled_event: Box::new(|id, error| Some(format!("{id}:{error}"))),
            lease_id: format!("lease_{id}"),
        }
    }

    fn state() -> Snapshot {
        let w = WindowState { limit: 1000, remaining: 900, reset_ms: 60_000 };
        Snapshot { requests: w, tokens: None, in_flight: 0, budget_used: Amount::default() }
    }

    fn admitted() -> AdmitDecision {
        AdmitDecision::Admitted { state: state(), limits: limits(), at_ms: T0 }
    }

    fn grant(id: &str, slots: u32) -> LeaseGrant {
        LeaseGrant {
            lease_id: id.into(),
            slots,
            allowance: Amount { tokens: 100 * u64::from(slots), usd: 0.0 },
            valid_ms: 1000,
            state: state(),
            control: control(),
            at_ms: T0,
        }
    }

    fn waiter(ticket: u64, id: &str) -> Waiter {
        Waiter { ticket, ask: ask(id) }
    }

    fn answer(key: &mut KeyState, ticket: u64) -> Result<Admission, LimiterError> {
        match key.outcomes.remove(&ticket) {
            Some(Outcome::Answer(answer)) => *answer,
            _ => panic!("no answer for ticket {ticket}"),
        }
    }

    #[test]
    fn waiting_requests_go_in_one_call_and_a_lease_is_asked_only_for_a_busy_key() {
        let mut key = KeyState::default();
        key.note_admission(T0, 1000);
        key.waiting = vec![waiter(1, "a")];
        let (_, call) = key.next_call(T0, 1000);
        assert!(call.expect("a call").lease.is_none(), "one request in the last second: no batching");

        for at in [T0 + 1, T0 + 2] {
            key.note_admission(at, 1000);
        }
        key.waiting = vec![waiter(2, "b"), waiter(3, "c")];
        key.settles.push(SettleRequest { request_id: "old".into(), actual: Amount::default() });
        let (waiters, call) = key.next_call(T0 + 3, 1000);
        let call = call.expect("a call");
        assert_eq!(waiters.len(), 2);
        let ids: Vec<&str> = call.candidates.iter().map(|c| c.request_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(call.candidates[0].unsettled_event.as_deref(), Some("b:unsettled"), "built only for the call");
        assert_eq!(call.settle.len(), 1, "held-back settlements ride along");
        let lease = call.lease.expect("three requests within a second: a lease is asked for");
        assert_eq!((lease.lease_id.as_str(), lease.slots, lease.valid_ms), ("lease_b", 6, 1000));
        assert_eq!(lease.unsettled_event.as_deref(), Some("lease_b:unsettled_lease"));
        assert!(key.waiting.is_empty() && key.settles.is_empty());
        // Nothing waiting: no call.
        assert!(key.next_call(T0 + 4, 1000).1.is_none());
        // Leases off: never asked for.
        let mut off = KeyState::default();
        for at in [T0, T0 + 1, T0 + 2] {
            off.note_admission(at, 0);
        }
        off.waiting = vec![waiter(4, "d")];
        assert!(off.next_call(T0 + 3, 0).1.expect("a call").lease.is_none());
    }

    #[test]
    fn an_answer_reaches_each_waiter_and_its_lease_admits_those_who_came_meanwhile() {
        let mut key = KeyState { waiting: vec![waiter(1, "a"), waiter(2, "b")], ..KeyState::default() };
        let (waiters, call) = key.next_call(T0, 1000);
        let call = call.expect("a call");
        // Two more arrive while the call is in flight.
        key.waiting = vec![waiter(3, "c"), waiter(4, "d")];
        let denied = AdmitDecision::Denied {
            reason: DenyReason::Requests,
            retry_after_ms: Some(5),
            state: state(),
            limits: limits(),
            model: None,
        };
        let response =
            AdmitResponse { decisions: vec![admitted(), denied], lease: Some(grant("lease_a", 1)), rows_written: 3 };
        key.take_answer("k", waiters, call, Ok(response), T0, T0 + 2);
        assert!(matches!(answer(&mut key, 1), Ok(Admission::Admitted { .. })));
        assert!(matches!(answer(&mut key, 2), Ok(Admission::Denied { reason: DenyReason::Requests, .. })));
        let Ok(Admission::Admitted { reservation, state, .. }) = answer(&mut key, 3) else {
            panic!("c should be admitted from the lease")
        };
        assert!(matches!(reservation.hold, Hold::Lease { .. }));
        assert_eq!(state.requests.remaining, 900, "the lease's unused slots (none left) on top of the grant's state");
        assert_eq!(key.waiting.len(), 1, "the one-slot lease is spent: d waits for the next call");
        assert_eq!(key.waiting[0].ticket, 4);
        std::mem::forget(reservation);
    }

    #[test]
    fn a_key_is_idle_once_it_holds_nothing_and_its_traffic_is_older_than_a_lease() {
        let mut key = KeyState::default();
        assert!(key.idle(T0, 1000));
        key.note_admission(T0, 1000);
        assert!(!key.idle(T0 + 999, 1000), "recent traffic sizes the next lease");
        assert!(key.idle(T0 + 1000, 1000));
        key.leases.push(HeldLease::new(grant("l", 2), T0));
        assert!(!key.idle(T0 + 5000, 1000), "a lease not yet reported is kept");
    }

    #[test]
    fn a_failed_call_keeps_its_settlements_and_fails_its_waiters() {
        let mut key = KeyState::default();
        key.settles.push(SettleRequest { request_id: "old".into(), actual: Amount::default() });
        key.waiting = vec![waiter(1, "a")];
        let (waiters, call) = key.next_call(T0, 1000);
        key.take_answer("k", waiters, call.expect("a call"), Err(LimiterError::Timeout), T0, T0 + 5);
        assert_eq!(answer(&mut key, 1).err(), Some(LimiterError::Timeout));
        assert_eq!(key.settles.len(), 1, "kept for the next call");
    }

    #[test]
    fn a_lease_is_reported_until_it_is_given_back_and_settled_then_forgotten() {
        let mut key = KeyState::default();
        key.leases.push(HeldLease::new(grant("l", 4), T0));
        let Some(Admission::Admitted { reservation, .. }) = key.admit_from_lease("k", &ask("a"), T0 + 10) else {
            panic!("a slot")
        };
        let Hold::Lease { reserved, .. } = reservation.hold else { panic!("held by the lease") };
        assert!(key.claim_lease_flush(T0 + 20).is_some_and(|at| at == T0 + 1000 + 50), "due after the lease's end");
        assert_eq!(key.claim_lease_flush(T0 + 30), None, "claimed once");

        let open = key.reports(T0 + 500);
        assert_eq!(open.len(), 1);
        assert!(!open[0].totals.returned && open[0].totals.used == 1);
        key.confirm(&open);
        assert!(key.reports(T0 + 600).is_empty(), "nothing new to tell");

        key.leases[0].settle(reserved, Amount { tokens: 40, usd: 0.0 });
        let ended = key.reports(T0 + 1000);
        assert!(ended[0].totals.returned, "a lease past its end is given back");
        assert_eq!((ended[0].totals.settled, ended[0].totals.actual_settled.tokens), (1, 40));
        key.confirm(&ended);
        assert!(key.leases.is_empty(), "given back, settled and confirmed: forgotten");
        std::mem::forget(reservation);
    }
}
