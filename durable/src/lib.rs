//! The per-API-key Durable Object: exact quotas for one key.
//!
//! One object per key (`idFromName(key id)`) is single-threaded, so a burst of concurrent requests for the key is
//! decided one at a time against the exact state — no over-admission, whatever the number of Worker isolates.
//! The object is a thin shell: `fetch` decodes a message, [`quota::Quota`] decides, [`store::Store`] persists the
//! changes, and the answer is encoded. Routes: `POST /admit`, `POST /settle`, `POST /state`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod protocol;
pub mod quota;
pub mod store;

use std::cell::{Cell, RefCell};

use worker::{durable_object, DurableObject, Env, Request, Response, Result, ScheduledTime, State};

use crate::protocol::{AdmitRequest, AdmitResponse, Limits, SettleRequest, SettleResponse};
use crate::quota::{Decision, Quota};
use crate::store::Store;

#[durable_object]
pub struct KeyLimiter {
    state: State,
    /// `None` when storage could not be opened: every request then gets a 500 and the Worker fails closed.
    store: Option<Store>,
    quota: RefCell<Quota>,
    /// The limits of the last request, for the alarm (persisted, so they survive eviction).
    limits: RefCell<Option<Limits>>,
    /// The alarm time this instance has set, to avoid re-setting it on every admission.
    alarm_at: Cell<Option<u64>>,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, _env: Env) -> Self {
        let store = Store::open(state.storage().sql()).ok();
        let quota = store.as_ref().and_then(|s| s.load().ok()).unwrap_or_default();
        let limits = store.as_ref().and_then(|s| s.load_limits().ok().flatten());
        KeyLimiter { state, store, quota: RefCell::new(quota), limits: RefCell::new(limits), alarm_at: Cell::new(None) }
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
                let Ok(message) = req.json::<SettleRequest>().await else { return Response::error("bad settle", 400) };
                let settled = self.settle(store, &message)?;
                Response::from_json(&SettleResponse { settled })
            }
            "/state" => {
                let Ok(limits) = req.json::<Limits>().await else { return Response::error("bad state", 400) };
                let snapshot = self.quota.borrow().snapshot(now_ms(), &limits);
                Response::from_json(&snapshot)
            }
            "/storage-rows" => Response::from_json(&store.row_count()?),
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
        self.remember_limits(store, &message.limits)?;
        let (decision, changes) =
            self.quota.borrow_mut().admit(now_ms(), &message.limits, &message.request_id, message.reserve);
        store.apply(&changes)?;
        Ok(match decision {
            Decision::Admitted(state) => AdmitResponse::Admitted { state },
            Decision::Denied { reason, retry_after_ms, state } => AdmitResponse::Denied { reason, retry_after_ms, state },
        })
    }

    fn settle(&self, store: &Store, message: &SettleRequest) -> Result<bool> {
        let limits = self.limits.borrow().clone();
        let Some(limits) = limits else { return Ok(false) };
        let (settled, changes) = self.quota.borrow_mut().settle(now_ms(), &limits, &message.request_id, message.actual);
        store.apply(&changes)?;
        Ok(settled)
    }

    fn remember_limits(&self, store: &Store, limits: &Limits) -> Result<()> {
        if self.limits.borrow().as_ref() != Some(limits) {
            store.save_limits(limits)?;
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
