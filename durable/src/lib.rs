//! The per-API-key Durable Object: exact quotas for one key.
//!
//! One object per key (`idFromName(key id)`) is single-threaded, so a burst of concurrent requests for the key is
//! decided one at a time against the exact state — no over-admission, whatever the number of Worker isolates.
//! The object is a thin shell: `fetch` decodes a message, [`quota::Quota`] decides, [`store::Store`] persists the
//! changes, and the answer is encoded. The messages and their paths are in [`protocol`] (each implements
//! [`protocol::Call`]).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod lease;
pub mod protocol;
pub mod quota;
pub mod store;

use std::cell::{Cell, RefCell};
use std::time::Duration;

use futures_util::future::{select, Either};
use worker::{durable_object, DurableObject, Env, Request, Response, Result, ScheduledTime, State};

use std::collections::HashMap;

use crate::protocol::{
    AdjustBatch, AdjustResponse, AdmitDecision, AdmitRequest, AdmitResponse, Call, DenyReason, KeyControl, LeaseReport,
    Limits, SettleBatch, SettleRequest, SettleResponse, StateRequest, StateResponse,
};
use crate::quota::{Change, Decision, Quota};
use crate::store::Store;

/// The usage queue (the same binding the Worker produces to): the object sends the events of requests whose
/// Worker never settled them.
const USAGE_EVENTS: &str = "USAGE_EVENTS";
const QUEUE_SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[durable_object]
pub struct KeyLimiter {
    state: State,
    env: Env,
    /// `Err` when storage could not be opened or read: every request is then refused (500) and logged, and the
    /// Worker fails closed. Starting from an empty quota instead would forget admissions, spend and revocations.
    live: std::result::Result<Live, String>,
    /// The alarm time this instance has set, to avoid re-setting it on every admission.
    alarm_at: Cell<Option<u64>>,
    /// Fault injection for tests (`LIMITER_FAULT_DELAY_MS`): every answer is held back this long, so the
    /// Worker's deadline on limiter calls can be exercised. A local runtime runs the object in the Worker's own
    /// thread, where no slowness but an asynchronous one lets the Worker's timer fire. Unset in production.
    fault_delay: Option<Duration>,
}

/// The object's state once storage has been read.
struct Live {
    store: Store,
    quota: RefCell<Quota>,
    /// The limits of the last request, for the alarm (persisted, so they survive eviction).
    limits: RefCell<Option<Limits>>,
    /// What the admin API last pushed (persisted).
    pushed: RefCell<Option<KeyControl>>,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, env: Env) -> Self {
        let live = Live::load(&state).map_err(|e| {
            let line = serde_json::json!({"level": "error", "event": "limiter_storage_unreadable",
                "detail": e.to_string()});
            worker::console_error!("{line}");
            e.to_string()
        });
        let fault_delay = js_sys::Reflect::get(env.as_ref(), &"LIMITER_FAULT_DELAY_MS".into())
            .ok()
            .and_then(|v| v.as_string().and_then(|s| s.trim().parse::<f64>().ok()).or_else(|| v.as_f64()))
            .filter(|ms| *ms > 0.0)
            .map(|ms| Duration::from_millis(ms as u64));
        KeyLimiter { state, env, live, alarm_at: Cell::new(None), fault_delay }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        if let Some(delay) = self.fault_delay {
            worker::Delay::from(delay).await;
        }
        let live = match &self.live {
            Ok(live) => live,
            Err(e) => return Response::error(format!("limiter storage unreadable: {e}"), 500),
        };
        let path = req.path();
        match path.as_str() {
            AdmitRequest::PATH => {
                let Ok(message) = req.json::<AdmitRequest>().await else { return Response::error("bad admit", 400) };
                let response = live.admit(&message)?;
                self.ensure_alarm(live).await?;
                answer::<AdmitRequest>(&response)
            }
            SettleBatch::PATH => {
                let Ok(message) = req.json::<SettleBatch>().await else { return Response::error("bad settle", 400) };
                let mut changes = Vec::new();
                let settled = live.settle(&message.settle, &message.reports, &mut changes);
                let rows_written = live.store.apply(&changes, &HashMap::new())?;
                answer::<SettleBatch>(&SettleResponse { settled, rows_written })
            }
            AdjustBatch::PATH => {
                let Ok(message) = req.json::<AdjustBatch>().await else { return Response::error("bad adjust", 400) };
                let applied = live.adjust(&message)?;
                answer::<AdjustBatch>(&AdjustResponse { applied })
            }
            StateRequest::PATH => {
                let Ok(message) = req.json::<StateRequest>().await else { return Response::error("bad state", 400) };
                let pushed = live.pushed.borrow().clone();
                let control = KeyControl::newest(pushed.as_ref(), &message.control);
                let state = live.quota.borrow().snapshot(now_ms(), &control.limits);
                answer::<StateRequest>(&StateResponse {
                    revoked: control.revoked,
                    limits: control.limits.clone(),
                    state,
                })
            }
            KeyControl::PATH => {
                let Ok(control) = req.json::<KeyControl>().await else { return Response::error("bad configure", 400) };
                let newer = live.configure(control)?;
                answer::<KeyControl>(&newer)
            }
            _ => Response::error("not found", 404),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm_at.set(None);
        let Ok(live) = &self.live else { return Response::ok("storage unreadable") };
        let Some(limits) = live.limits.borrow().clone() else { return Response::ok("nothing to expire") };
        let (changes, expired) = live.quota.borrow_mut().expire_leases(now_ms(), &limits);
        let events = live.store.unsettled_events(&expired)?;
        live.store.apply(&changes, &HashMap::new())?;
        self.send_unsettled_events(events).await;
        self.ensure_alarm(live).await?;
        Response::ok("expired")
    }
}

/// Encodes a message's answer (the type is the one its [`Call`] names).
fn answer<M: Call>(value: &M::Answer) -> Result<Response> {
    Response::from_json(value)
}

impl Live {
    fn load(state: &State) -> Result<Live> {
        let store = Store::open(state.storage().sql())?;
        let quota = store.load()?;
        let limits = store.load_meta::<Limits>("limits")?;
        let pushed = store.load_meta::<KeyControl>("control")?;
        Ok(Live { store, quota: RefCell::new(quota), limits: RefCell::new(limits), pushed: RefCell::new(pushed) })
    }

    /// Decide and persist in one synchronous step (no `.await` between reading and writing the state): the
    /// carried settlements and reports first, then each candidate in order, then the lease if one was asked for
    /// and every candidate was admitted.
    fn admit(&self, message: &AdmitRequest) -> Result<AdmitResponse> {
        let pushed = self.pushed.borrow().clone();
        let control = KeyControl::newest(pushed.as_ref(), &message.control);
        let limits = &control.limits;
        self.remember_limits(limits)?;
        let now = now_ms();
        let mut changes = Vec::new();
        self.settle(&message.settle, &message.reports, &mut changes);
        let mut decisions = Vec::with_capacity(message.candidates.len());
        let mut events = HashMap::new();
        for candidate in &message.candidates {
            let refusal = if control.revoked {
                Some((DenyReason::Revoked, None))
            } else {
                control.forbidden_model(&candidate.models).map(|m| (DenyReason::ModelNotAllowed, Some(m.to_owned())))
            };
            if let Some((reason, model)) = refusal {
                let state = self.quota.borrow().snapshot(now, limits);
                decisions.push(AdmitDecision::Denied {
                    reason,
                    retry_after_ms: None,
                    state,
                    limits: limits.clone(),
                    model,
                });
                continue;
            }
            let (decision, admitted) =
                self.quota.borrow_mut().admit(now, limits, &candidate.request_id, candidate.reserve);
            changes.extend(admitted);
            decisions.push(match decision {
                Decision::Admitted(state) => {
                    if let Some(event) = &candidate.unsettled_event {
                        events.insert(candidate.request_id.as_str(), event.as_str());
                    }
                    AdmitDecision::Admitted { state, limits: limits.clone(), at_ms: now }
                }
                Decision::Denied { reason, retry_after_ms, state } => {
                    AdmitDecision::Denied { reason, retry_after_ms, state, limits: limits.clone(), model: None }
                }
            });
        }
        let all_admitted = decisions.iter().all(|d| matches!(d, AdmitDecision::Admitted { .. }));
        let lease = match &message.lease {
            Some(want) if all_admitted && !control.revoked => {
                let (granted, grant_changes) = self.quota.borrow_mut().grant(now, limits, want);
                changes.extend(grant_changes);
                granted.map(|g| {
                    if let Some(event) = &want.unsettled_event {
                        events.insert(want.lease_id.as_str(), event.as_str());
                    }
                    g.into_grant(want.lease_id.clone(), control.clone())
                })
            }
            _ => None,
        };
        let rows_written = self.store.apply(&changes, &events)?;
        Ok(AdmitResponse { decisions, lease, rows_written })
    }

    /// Keeps the newest control the admin API pushed; says whether this one was kept.
    fn configure(&self, control: KeyControl) -> Result<bool> {
        let newer = self.pushed.borrow().as_ref().is_none_or(|current| control.version >= current.version);
        if newer {
            let _ = self.store.save_meta("control", &control)?;
            *self.pushed.borrow_mut() = Some(control);
        }
        Ok(newer)
    }

    /// Settles reservations and applies lease reports; the caller writes the changes (with whatever else its
    /// turn writes).
    fn settle(&self, settles: &[SettleRequest], reports: &[LeaseReport], changes: &mut Vec<Change>) -> usize {
        let limits = self.limits.borrow().clone();
        let Some(limits) = limits else { return 0 };
        let now = now_ms();
        let mut quota = self.quota.borrow_mut();
        for report in reports {
            changes.extend(quota.report(now, &limits, report).1);
        }
        settles
            .iter()
            .filter(|s| {
                let (settled, settle_changes) = quota.settle(now, &limits, &s.request_id, s.actual);
                changes.extend(settle_changes);
                settled
            })
            .count()
    }

    /// Applies corrections of settled charges (reconciliation); returns how many changed anything.
    fn adjust(&self, batch: &AdjustBatch) -> Result<usize> {
        let limits = self.limits.borrow().clone();
        let Some(limits) = limits else { return Ok(0) };
        let now = now_ms();
        let mut changes = Vec::new();
        let mut applied = 0;
        for adjustment in &batch.adjust {
            let (changed, adjust_changes) = self.quota.borrow_mut().adjust(now, &limits, adjustment);
            applied += usize::from(changed);
            changes.extend(adjust_changes);
        }
        self.store.apply(&changes, &HashMap::new())?;
        Ok(applied)
    }

    fn remember_limits(&self, limits: &Limits) -> Result<()> {
        if self.limits.borrow().as_ref() != Some(limits) {
            let _ = self.store.save_meta("limits", limits)?;
            *self.limits.borrow_mut() = Some(limits.clone());
        }
        Ok(())
    }
}

impl KeyLimiter {
    /// Keeps an alarm set for the earliest lease expiry, so abandoned reservations are charged and released.
    async fn ensure_alarm(&self, live: &Live) -> Result<()> {
        let Some(next) = live.quota.borrow().next_lease_expiry() else { return Ok(()) };
        if self.alarm_at.get().is_some_and(|at| at <= next) {
            return Ok(());
        }
        let when = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(next as f64));
        self.state.storage().set_alarm(ScheduledTime::new(when)).await?;
        self.alarm_at.set(Some(next));
        Ok(())
    }

    /// Bills requests whose Worker never settled them: their stored usage events (charged as reserved) go to
    /// the usage queue. Events that cannot be sent are logged in full, as the Worker does, never dropped silently.
    async fn send_unsettled_events(&self, events: Vec<String>) {
        if events.is_empty() {
            return;
        }
        let sent = match self.env.queue(USAGE_EVENTS) {
            Ok(queue) => {
                let messages = events
                    .iter()
                    .map(|e| {
                        worker::RawMessageBuilder::new(wasm_bindgen::JsValue::from_str(e))
                            .build_with_content_type(worker::QueueContentType::Text)
                    })
                    .collect::<Vec<_>>();
                let send = std::pin::pin!(queue.send_raw_batch(messages));
                match select(send, std::pin::pin!(worker::Delay::from(QUEUE_SEND_TIMEOUT))).await {
                    Either::Left((result, _)) => result.map_err(|e| e.to_string()),
                    Either::Right(_) => Err("queue send timed out".to_owned()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(detail) = sent {
            for event in events {
                let event: serde_json::Value = serde_json::from_str(&event).unwrap_or(serde_json::Value::String(event));
                let line = serde_json::json!({"level": "error", "event": "usage_event_not_enqueued",
                    "detail": detail, "usage_event": event});
                worker::console_error!("{line}");
            }
        }
    }
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}
