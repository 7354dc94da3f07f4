//! The conversation with a key's Durable Object, from the Worker's side: typed calls (each message knows its
//! path and its answer, see `key_limiter::protocol::Call`) with a deadline, the [`Reservation`] an admission
//! hands out, which only settling consumes, and settlements held back to ride with the key's next admission.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use key_limiter::protocol::{
    AdmitRequest, AdmitResponse, Amount, Call, KeyControl, SettleBatch, SettleRequest, StateRequest, StateResponse,
};
use wasm_bindgen::JsValue;
use worker::Env;

use crate::bindings::{log_error, within};

pub const KEY_LIMITER: &str = "KEY_LIMITER";

/// How long a settlement waits for an admission to ride with (it holds the reservation that much longer).
const SETTLE_DEFERRAL: Duration = Duration::from_millis(50);

thread_local! {
    /// Settlements waiting to ride along with the key's next admission from this isolate.
    static PENDING_SETTLES: RefCell<HashMap<String, Vec<SettleRequest>>> = RefCell::new(HashMap::new());
}

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
    request_id: String,
    /// When the object admitted it, by the object's clock.
    pub admitted_at_ms: u64,
}

/// Asks the key's object to admit a request. Settlements held back for the key ride along; if the call fails
/// they are kept for the next one.
pub async fn admit(
    env: &Env,
    message: AdmitRequest,
    key_id: &str,
    timeout_ms: u64,
) -> Result<(AdmitResponse, Option<Reservation>), LimiterError> {
    let mut message = message;
    message.settle = take_settles(key_id);
    match call(env, key_id, &message, timeout_ms).await {
        Ok(answer) => {
            let reservation = match &answer {
                AdmitResponse::Admitted { at_ms, .. } => Some(Reservation {
                    key_id: key_id.to_owned(),
                    request_id: message.request_id.clone(),
                    admitted_at_ms: *at_ms,
                }),
                AdmitResponse::Denied { .. } => None,
            };
            Ok((answer, reservation))
        }
        Err(e) => {
            // The settlements it carried were not applied: keep them for the next call.
            for settle in message.settle {
                defer_settle(key_id, settle);
            }
            Err(e)
        }
    }
}

impl Reservation {
    /// Replaces the reservation with what was used. The settlement first waits briefly for the key's next
    /// admission from this isolate to carry it (under load it almost always does); otherwise it is sent on its
    /// own. A settlement that cannot be delivered leaves the reservation to be charged as reserved when its
    /// lease ends: the key is over-charged, never under-charged.
    pub async fn settle(self, env: &Env, actual: Amount, timeout_ms: u64) {
        defer_settle(&self.key_id, SettleRequest { request_id: self.request_id, actual });
        worker::Delay::from(SETTLE_DEFERRAL).await;
        let settle = take_settles(&self.key_id);
        if settle.is_empty() {
            return;
        }
        if let Err(e) = call(env, &self.key_id, &SettleBatch { settle }, timeout_ms).await {
            log_error("limiter_settle_failed", &e.to_string());
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

/// Pushes a key's new control (limits, allowed models, revocation) to its object, retrying briefly. An error
/// means the object was not told: the caller must not report the change as in force.
pub async fn configure(env: &Env, key_id: &str, control: &KeyControl, timeout_ms: u64) -> Result<(), LimiterError> {
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

fn defer_settle(key_id: &str, settle: SettleRequest) {
    PENDING_SETTLES.with(|p| p.borrow_mut().entry(key_id.to_owned()).or_default().push(settle));
}

fn take_settles(key_id: &str) -> Vec<SettleRequest> {
    PENDING_SETTLES.with(|p| p.borrow_mut().remove(key_id)).unwrap_or_default()
}
