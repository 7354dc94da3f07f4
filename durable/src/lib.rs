//! The per-API-key Durable Object: exact quotas for one key.
//!
//! One object per key (`idFromName(key id)`) is single-threaded, so a burst of concurrent requests for the key is
//! decided one at a time against the exact state — no over-admission, whatever the number of Worker isolates.
//! The object is a thin shell: `fetch` decodes a message, [`quota::Quota`] decides, [`store::Store`] persists the
//! changes, and the answer is encoded. Routes: `POST /admit`, `POST /settle`, `POST /state`, `POST /configure`
//! (the admin API pushing a key's new limits, allowed models or revocation, effective at the next request).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod protocol;
pub mod quota;
pub mod store;

use std::cell::{Cell, RefCell};

use worker::{durable_object, DurableObject, Env, Request, Response, Result, ScheduledTime, State};

use crate::protocol::{
    AdmitRequest, AdmitResponse, DenyReason, KeyControl, Limits, SettleBatch, SettleRequest, SettleResponse,
    StateRequest, StateResponse,
};
use crate::quota::{Change, Decision, Quota};
use crate::store::Store;

#[durable_object]
pub struct KeyLimiter {
    state: State,
    /// `None` when storage could not be opened: every request then gets a 500 and the Worker fails closed.
    store: Option<Store>,
    quota: RefCell<Quota>,
    /// The limits of the last request, for the alarm (persisted, so they survive eviction).
    limits: RefCell<Option<Limits>>,
    /// What the admin API last pushed (persisted).
    pushed: RefCell<Option<KeyControl>>,
    /// The alarm time this instance has set, to avoid re-setting it on every admission.
    alarm_at: Cell<Option<u64>>,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, _env: Env) -> Self {
        let store = Store::open(state.storage().sql()).ok();
        let quota = store.as_ref().and_then(|s| s.load().ok()).unwrap_or_default();
        let limits = store.as_ref().and_then(|s| s.load_meta::<Limits>("limits").ok().flatten());
        let pushed = store.as_ref().and_then(|s| s.load_meta::<KeyControl>("control").ok().flatten());
        KeyLimiter {
            state,
            store,
            quota: RefCell::new(quota),
            limits: RefCell::new(limits),
            pushed: RefCell::new(pushed),
            alarm_at: Cell::new(None),
        }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let Some(store) = &self.store else {
            return Response::error("limiter storage unavailable", 500);
        };
        let path = req.path();
        match path.as_str() {
            "/admit" => {
                let Ok(message) = req.json::<AdmitRequest>().await else { return Response::error("bad admit", 400) };
                let response = self.admit(store, &message)?;
                self.ensure_alarm().await?;
                Response::from_json(&response)
            }
            "/settle" => {
                let Ok(message) = req.json::<SettleBatch>().await else { return Response::error("bad settle", 400) };
                let mut changes = Vec::new();
                let settled = self.settle(&message.settle, &mut changes);
                store.apply(&changes)?;
                Response::from_json(&SettleResponse { settled })
            }
            "/state" => {
                let Ok(message) = req.json::<StateRequest>().await else { return Response::error("bad state", 400) };
                let pushed = self.pushed.borrow().clone();
                let control = KeyControl::newest(pushed.as_ref(), &message.control);
                let state = self.quota.borrow().snapshot(now_ms(), &control.limits);
                Response::from_json(&StateResponse { revoked: control.revoked, limits: control.limits.clone(), state })
            }
            "/configure" => {
                let Ok(control) = req.json::<KeyControl>().await else { return Response::error("bad configure", 400) };
                let newer = self.configure(store, control)?;
                Response::from_json(&newer)
            }
            _ => Response::error("not found", 404),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm_at.set(None);
        let (Some(store), Some(limits)) = (&self.store, self.limits.borrow().clone()) else {
            return Response::ok("nothing to expire");
        };
        let changes = self.quota.borrow_mut().expire_leases(now_ms(), &limits);
        store.apply(&changes)?;
        self.ensure_alarm().await?;
        Response::ok("expired")
    }
}

impl KeyLimiter {
    /// Decide and persist in one synchronous step (no `.await` between reading and writing the state).
    fn admit(&self, store: &Store, message: &AdmitRequest) -> Result<AdmitResponse> {
        let pushed = self.pushed.borrow().clone();
        let control = KeyControl::newest(pushed.as_ref(), &message.control);
        let limits = &control.limits;
        self.remember_limits(store, limits)?;
        let now = now_ms();
        let mut changes = Vec::new();
        self.settle(&message.settle, &mut changes);
        let refusal = if control.revoked {
            Some((DenyReason::Revoked, None))
        } else {
            control.forbidden_model(&message.models).map(|m| (DenyReason::ModelNotAllowed, Some(m.to_owned())))
        };
        if let Some((reason, model)) = refusal {
            store.apply(&changes)?;
            let state = self.quota.borrow().snapshot(now, limits);
            return Ok(AdmitResponse::Denied { reason, retry_after_ms: None, state, limits: limits.clone(), model });
        }
        let (decision, admitted) = self.quota.borrow_mut().admit(now, limits, &message.request_id, message.reserve);
        changes.extend(admitted);
        store.apply(&changes)?;
        Ok(match decision {
            Decision::Admitted(state) => AdmitResponse::Admitted { state, limits: limits.clone() },
            Decision::Denied { reason, retry_after_ms, state } => {
                AdmitResponse::Denied { reason, retry_after_ms, state, limits: limits.clone(), model: None }
            }
        })
    }

    /// Keeps the newest control the admin API pushed; says whether this one was kept.
    fn configure(&self, store: &Store, control: KeyControl) -> Result<bool> {
        let newer = self.pushed.borrow().as_ref().is_none_or(|current| control.version >= current.version);
        if newer {
            store.save_meta("control", &control)?;
            *self.pushed.borrow_mut() = Some(control);
        }
        Ok(newer)
    }

    /// Settles reservations; the caller writes the changes (with whatever else its turn writes).
    fn settle(&self, settles: &[SettleRequest], changes: &mut Vec<Change>) -> usize {
        let limits = self.limits.borrow().clone();
        let Some(limits) = limits else { return 0 };
        let now = now_ms();
        let mut quota = self.quota.borrow_mut();
        settles
            .iter()
            .filter(|s| {
                let (settled, settle_changes) = quota.settle(now, &limits, &s.request_id, s.actual);
                changes.extend(settle_changes);
                settled
            })
            .count()
    }

    fn remember_limits(&self, store: &Store, limits: &Limits) -> Result<()> {
        if self.limits.borrow().as_ref() != Some(limits) {
            store.save_meta("limits", limits)?;
            *self.limits.borrow_mut() = Some(limits.clone());
        }
        Ok(())
    }

    /// Keeps an alarm set for the earliest lease expiry, so abandoned reservations are charged and released.
    async fn ensure_alarm(&self) -> Result<()> {
        let Some(next) = self.quota.borrow().next_lease_expiry() else { return Ok(()) };
        if self.alarm_at.get().is_some_and(|at| at <= next) {
            return Ok(());
        }
        let when = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(next as f64));
        self.state.storage().set_alarm(ScheduledTime::new(when)).await?;
        self.alarm_at.set(Some(next));
        Ok(())
    }
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}
