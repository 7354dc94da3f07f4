//! The Queue consumer: usage events → the D1 ledger, then PostHog.
//!
//! Per batch: one INSERT for the whole ledger (idempotent per request id); then, if PostHog is on, one SELECT for
//! the events PostHog has not accepted yet, one `POST /batch/` with those, and one UPDATE recording the verdict.
//! Failures retry with exponential backoff (`attempts` is read from each message); a retry repeats only the work
//! still owed, because the ledger remembers PostHog's verdict per request. After `max_retries` the queue moves
//! the messages to the dead-letter queue.
//!
//! The handler is exported by hand rather than with `#[event(queue)]` because the `worker` crate's `Message`
//! does not expose `attempts`, which the backoff needs.

use serde_json::Value;
use wasm_bindgen::prelude::*;
use worker::{Env, Fetch, Headers, Method, Request, RequestInit};

use crate::bindings::{self, iso_time, log_error};
use crate::config::{Config, PostHogConfig};
use crate::forward::with_timeout;
use crate::ledger;
use crate::posthog::{self, Delivery};
use crate::usage_event::UsageEvent;

const POSTHOG_TIMEOUT_SECS: u64 = 10;
const MAX_BACKOFF_SECS: u32 = 300;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(extends = js_sys::Object)]
    pub type QueueBatch;
    #[wasm_bindgen(method, getter)]
    fn messages(this: &QueueBatch) -> js_sys::Array;

    #[wasm_bindgen(extends = js_sys::Object)]
    type QueueMessage;
    #[wasm_bindgen(method, getter)]
    fn body(this: &QueueMessage) -> JsValue;
    #[wasm_bindgen(method, getter)]
    fn attempts(this: &QueueMessage) -> f64;
    #[wasm_bindgen(method)]
    fn ack(this: &QueueMessage);
    #[wasm_bindgen(method)]
    fn retry(this: &QueueMessage, options: &JsValue);
}

#[derive(serde::Deserialize)]
struct PendingRow {
    request_id: String,
}

/// A parsed event and the message that carried it.
struct Item {
    event: UsageEvent,
    message: QueueMessage,
}

/// The Worker's `queue` handler (see the module docs for why it is not `#[event(queue)]`).
#[wasm_bindgen]
pub async fn queue(batch: QueueBatch, env: Env, _ctx: JsValue) -> Result<(), JsValue> {
    let mut items = Vec::new();
    for message in batch.messages().iter().map(JsCast::unchecked_into::<QueueMessage>) {
        match message.body().as_string().and_then(|s| serde_json::from_str::<UsageEvent>(&s).ok()) {
            Some(event) => items.push(Item { event, message }),
            None => {
                // Retrying cannot make it parse: keep it out of the way, but say so.
                log_error("usage_event_unreadable", &format!("{:?}", message.body().as_string()));
                message.ack();
            }
        }
    }
    match bindings::config(&env) {
        Ok(config) => deliver(&env, &config, &items).await,
        Err(_) => retry(&items),
    }
    Ok(())
}

async fn deliver(env: &Env, config: &Config, items: &[Item]) {
    if items.is_empty() {
        return;
    }
    let events: Vec<&UsageEvent> = items.iter().map(|i| &i.event).collect();
    let rows = ledger::rows_json(events.iter().copied(), iso_time);
    if let Err(e) = bindings::d1_run(env, ledger::INSERT_BATCH, &[rows.as_str().into()]).await {
        log_error("ledger_write_failed", &e.to_string());
        return retry(items);
    }
    let Some(posthog) = &config.posthog else { return ack(items) };
    let ids = ledger::ids_json(events.iter().map(|e| e.request_id.as_str()));
    let pending = match bindings::d1_rows::<PendingRow>(env, ledger::PENDING_FOR_POSTHOG, &[ids.as_str().into()]).await
    {
        Ok(rows) => rows.into_iter().map(|r| r.request_id).collect::<Vec<String>>(),
        Err(e) => {
            log_error("ledger_read_failed", &e.to_string());
            return retry(items);
        }
    };
    let (owed, done): (Vec<&Item>, Vec<&Item>) = items.iter().partition(|i| pending.contains(&i.event.request_id));
    ack(done);
    if owed.is_empty() {
        return;
    }
    let owed_events: Vec<&UsageEvent> = owed.iter().map(|i| &i.event).collect();
    match send_to_posthog(env, config, posthog, &owed_events).await {
        Delivery::Retry => retry(owed),
        verdict => {
            let state = if verdict == Delivery::Sent { "sent" } else { "rejected" };
            let owed_ids = ledger::ids_json(owed_events.iter().map(|e| e.request_id.as_str()));
            if let Err(e) = bindings::d1_run(env, ledger::MARK_POSTHOG, &[owed_ids.as_str().into(), state.into()]).await
            {
                // PostHog has the events; retrying would send them again, so only log.
                log_error("ledger_mark_failed", &e.to_string());
            }
            ack(owed);
        }
    }
}

/// POSTs the events to PostHog and says what to do next.
async fn send_to_posthog(env: &Env, config: &Config, posthog: &PostHogConfig, events: &[&UsageEvent]) -> Delivery {
    let model_list = bindings::cached_models(env).await.and_then(|m| serde_json::from_str::<Value>(&m.body).ok());
    let batch: Vec<Value> = events
        .iter()
        .map(|e| {
            let prices = model_list
                .as_ref()
                .and_then(|list| posthog::prices_from_model_list(list, e.served_model.as_deref().unwrap_or(&e.model)));
            posthog::generation_event(
                e,
                &iso_time(e.timestamp_ms),
                &config.upstream_base_url,
                prices,
                posthog.capture_content,
            )
        })
        .collect();
    let body = posthog::batch_body(posthog.api_key.expose(), batch).to_string();
    let status = post_json(&format!("{}/batch/", posthog.host), &body).await;
    let verdict = posthog::classify(status);
    if verdict != Delivery::Sent {
        log_error("posthog_delivery_failed", &format!("status {status:?}, {} events, {verdict:?}", events.len()));
    }
    verdict
}

/// The response status, or `None` on a network failure or timeout.
async fn post_json(url: &str, body: &str) -> Option<u16> {
    let headers = Headers::new();
    headers.set("content-type", "application/json").ok()?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_headers(headers).with_body(Some(JsValue::from_str(body)));
    let request = Request::new_with_init(url, &init).ok()?;
    let response = with_timeout(Fetch::Request(request).send(), POSTHOG_TIMEOUT_SECS).await.ok()?.ok()?;
    Some(response.status_code())
}

fn ack<'a>(items: impl IntoIterator<Item = &'a Item>) {
    for item in items {
        item.message.ack();
    }
}

/// Redelivers the messages later, with exponential backoff.
fn retry<'a>(items: impl IntoIterator<Item = &'a Item>) {
    for item in items {
        let options = js_sys::Object::new();
        let delay = backoff_secs(item.message.attempts());
        let _ = js_sys::Reflect::set(&options, &JsValue::from_str("delaySeconds"), &JsValue::from(delay));
        item.message.retry(&options);
    }
}

/// 2, 4, 8, … seconds, capped: `attempts` counts deliveries so far (1 on the first).
fn backoff_secs(attempts: f64) -> u32 {
    let attempts = attempts.clamp(1.0, 16.0) as u32;
    (1u32 << attempts).min(MAX_BACKOFF_SECS)
}
