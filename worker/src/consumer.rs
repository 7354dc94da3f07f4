//! The Queue consumer: usage events → the ledger (D1 or Postgres, see `store`), then PostHog; reconciliation jobs → OpenRouter's account of
//! the generation → the key's Durable Object, the ledger, then PostHog (see `reconcile`).
//!
//! Per batch of usage events: one INSERT for the whole ledger (idempotent per request id); one SELECT for where
//! the rows stand; reconciliation jobs for the rows that await it; then, if PostHog is on, one `POST /batch/`
//! with the events PostHog is owed and one UPDATE recording its verdict. Failures retry with exponential
//! backoff (`attempts` is read from each message); a retry repeats only the work still owed, because the ledger
//! remembers PostHog's verdict and reconciliation's state per request. After `max_retries` the queue moves the
//! messages to the dead-letter queue.
//!
//! The handler is exported by hand rather than with `#[event(queue)]` because the `worker` crate's `Message`
//! does not expose `attempts`, which the backoff needs.

use key_limiter::protocol::AdjustBatch;
use wasm_bindgen::prelude::*;
use worker::{Env, Fetch, Headers, Method, Request, RequestInit};

use crate::bindings::{self, iso_time, log_error, now_ms, within};
use crate::catalog;
use crate::config::{Config, PostHogConfig};
use crate::forward;
use crate::limiter;
use crate::posthog::{self, Delivery};
use crate::reconcile::{self, Job, Lookup, QueueItem};
use crate::store::{ledger::RowState, Store};
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

/// A parsed event and the message that carried it.
struct Item {
    event: UsageEvent,
    message: QueueMessage,
}

/// The Worker's `queue` handler (see the module docs for why it is not `#[event(queue)]`).
#[wasm_bindgen]
pub async fn queue(batch: QueueBatch, env: Env, _ctx: JsValue) -> Result<(), JsValue> {
    let mut usage = Vec::new();
    let mut jobs = Vec::new();
    for message in batch.messages().iter().map(JsCast::unchecked_into::<QueueMessage>) {
        match message.body().as_string().and_then(|s| QueueItem::parse(&s)) {
            Some(QueueItem::Usage(event)) => usage.push(Item { event, message }),
            Some(QueueItem::Reconcile(Job { reconcile: event })) => jobs.push(Item { event, message }),
            None => {
                // Retrying cannot make it parse: keep it out of the way, but say so.
                log_error("usage_event_unreadable", &format!("{:?}", message.body().as_string()));
                message.ack();
            }
        }
    }
    match bindings::config(&env) {
        Ok(config) => {
            let store = Store::open(&env, &config);
            deliver(&env, &config, &store, &usage).await;
            reconcile_all(&env, &config, &store, &jobs).await;
        }
        Err(_) => {
            retry(&usage);
            retry(&jobs);
        }
    }
    Ok(())
}

async fn deliver(env: &Env, config: &Config, store: &Store, items: &[Item]) {
    if items.is_empty() {
        return;
    }
    let events: Vec<&UsageEvent> = items.iter().map(|i| &i.event).collect();
    match store.insert_ledger_rows(&events, |e| reconcile::wanted(e, config.reconcile_estimates)).await {
        Ok(rows_written) => {
            let line = serde_json::json!({"level": "info", "event": "ledger_batch", "events": items.len(),
                "rows_written": rows_written});
            worker::console_log!("{line}");
        }
        Err(e) => {
            log_error("ledger_write_failed", &e.to_string());
            return retry(items);
        }
    }
    let Some(states) = row_states(store, items.iter().map(|i| i.event.request_id.as_str())).await else {
        return retry(items);
    };
    let state_of = |item: &Item| states.iter().find(|s| s.request_id == item.event.request_id);

    // Rows awaiting reconciliation: a job each (repeats are harmless, see `reconcile`).
    let pending: Vec<&Item> = items.iter().filter(|i| state_of(i).is_some_and(RowState::reconcile_pending)).collect();
    if !pending.is_empty() {
        let jobs: Vec<String> =
            pending.iter().filter_map(|i| serde_json::to_string(&Job { reconcile: i.event.clone() }).ok()).collect();
        if let Err(e) = bindings::send_delayed(env, &jobs, reconcile::FIRST_LOOKUP_DELAY_SECS).await {
            log_error("reconcile_enqueue_failed", &e.to_string());
            return retry(items);
        }
    }

    let (owed, done): (Vec<&Item>, Vec<&Item>) = match &config.posthog {
        Some(_) => items.iter().partition(|i| state_of(i).is_some_and(RowState::owes_posthog)),
        None => (Vec::new(), items.iter().collect()),
    };
    ack(done);
    send_owed(env, config, store, owed).await;
}

/// Sends PostHog the events it is owed, records its verdict, and acks or retries their messages.
async fn send_owed(env: &Env, config: &Config, store: &Store, owed: Vec<&Item>) {
    let Some(posthog) = &config.posthog else { return ack(owed) };
    if owed.is_empty() {
        return;
    }
    let owed_events: Vec<&UsageEvent> = owed.iter().map(|i| &i.event).collect();
    match send_to_posthog(env, config, posthog, &owed_events).await {
        Delivery::Retry => retry(owed),
        verdict => {
            let state = if verdict == Delivery::Sent { "sent" } else { "rejected" };
            let owed_ids = owed_events.iter().map(|e| e.request_id.as_str());
            if let Err(e) = store.mark_posthog(owed_ids, state).await {
                // PostHog has the events; retrying would send them again, so only log.
                log_error("ledger_mark_failed", &e.to_string());
            }
            ack(owed);
        }
    }
}

async fn row_states<'a>(store: &Store, ids: impl IntoIterator<Item = &'a str>) -> Option<Vec<RowState>> {
    match store.ledger_states(ids).await {
        Ok(rows) => Some(rows),
        Err(e) => {
            log_error("ledger_read_failed", &e.to_string());
            None
        }
    }
}

/// Reconciles each job's row (see `reconcile`), then sends PostHog the events that were held back for them.
async fn reconcile_all(env: &Env, config: &Config, store: &Store, jobs: &[Item]) {
    if jobs.is_empty() {
        return;
    }
    let mut settled = Vec::new();
    for job in jobs {
        match reconcile_one(env, config, store, job).await {
            Some(final_event) => {
                settled.push(Item { event: final_event, message: job.message.clone().unchecked_into() })
            }
            None => retry([job]),
        }
    }
    let Some(states) = row_states(store, settled.iter().map(|i| i.event.request_id.as_str())).await else {
        return retry(&settled);
    };
    let (owed, done): (Vec<&Item>, Vec<&Item>) =
        settled.iter().partition(|i| states.iter().any(|s| s.request_id == i.event.request_id && s.owes_posthog()));
    ack(done);
    send_owed(env, config, store, owed).await;
}

/// One job: look the generation up, correct the key's budget and the ledger row. Returns the request's final
/// event (reconciled, or the estimate when reconciliation gave up), or `None` to try again later.
async fn reconcile_one(env: &Env, config: &Config, store: &Store, job: &Item) -> Option<UsageEvent> {
    let event = &job.event;
    let generation_id = event.generation_id.as_deref()?;
    let last_attempt = job.message.attempts() >= f64::from(config.reconcile_max_attempts);
    let looked_up = forward::get_generation(config, generation_id).await;
    let status = looked_up.as_ref().map(|(status, _)| *status);
    let generation = looked_up.and_then(|(_, body)| reconcile::read_generation(&body));
    let generation = match (reconcile::classify(status), generation) {
        (Lookup::Found, Some(generation)) => generation,
        (lookup, _) => {
            if lookup == Lookup::Later && !last_attempt {
                return None;
            }
            log_error(
                "reconcile_gave_up",
                &format!("{} ({generation_id}): lookup answered {status:?}", event.request_id),
            );
            store.reconcile_failed(&event.request_id, now_ms()).await.ok()?;
            return Some(event.clone());
        }
    };
    if let Some(adjustment) = reconcile::adjustment(event, &generation) {
        let batch = AdjustBatch { adjust: vec![adjustment] };
        if let Err(e) = limiter::call(env, &event.key_id, &batch, config.limiter_timeout_ms).await {
            log_error("reconcile_adjust_failed", &e.to_string());
            return None;
        }
    }
    let reconciled = reconcile::reconciled(event, &generation);
    if let Err(e) = store.reconcile_done(&reconciled, now_ms()).await {
        log_error("ledger_write_failed", &e.to_string());
        return None;
    }
    Some(reconciled)
}

/// POSTs the events to PostHog and says what to do next.
async fn send_to_posthog(env: &Env, config: &Config, posthog: &PostHogConfig, events: &[&UsageEvent]) -> Delivery {
    let prices = catalog::prices(env, config).await.unwrap_or_default();
    let batch: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            let price = prices.get(e.served_model.as_deref().unwrap_or(&e.model)).copied();
            posthog::ai_event(e, &iso_time(e.timestamp_ms), &config.upstream_base_url, price, posthog.capture_content)
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
    let timeout = std::time::Duration::from_secs(POSTHOG_TIMEOUT_SECS);
    let response = within(timeout, Fetch::Request(request).send()).await?.ok()?;
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
