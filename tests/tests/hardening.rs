//! What the gateway does when things it depends on misbehave: a key's Durable Object whose storage cannot be
//! read, failing open without giving up revocation or allowed models, an upstream reporting absurd usage, a
//! drain that would outlive the platform's grace period, a limiter too slow to answer, and a revocation the
//! limiter could not be told of. A gateway that a test restarts is that test's alone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

const ADMIN: &str = "adm-hardening-9c1e";

fn chat() -> Value {
    json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "standin": {}})
}

async fn post(gw: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    client().post(gw.url("/v1/chat/completions")).bearer_auth(key).json(body).send().await.expect("reachable")
}

async fn error_code(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    (status, assert_openai_error(&body)["code"].clone())
}

/// Makes one request with the key (so its Durable Object exists), and returns the object's SQLite file.
async fn object_file_of(gw: &Gateway, key: &str) -> PathBuf {
    let before = gw.durable_object_files();
    assert_eq!(post(gw, key, &chat()).await.status(), 200);
    let after = gw.durable_object_files();
    let created: Vec<PathBuf> = after.into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(created.len(), 1, "one new object for the key: {created:?}");
    created.into_iter().next().unwrap_or_default()
}

/// Makes the object's pushed control unreadable (as a corrupted or half-written storage would be).
fn corrupt(file: &Path) {
    sqlite(file, "INSERT OR REPLACE INTO meta (name, value) VALUES ('control', '{not json')");
}

fn strict() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .var("ADMIN_API_KEY", ADMIN)
                .keys(&["broken", "healthy"]),
        )
    })
}

#[tokio::test]
async fn a_limiter_whose_storage_cannot_be_read_refuses_and_a_revocation_it_cannot_take_is_an_error() {
    let gw = strict();
    let broken = gw.key("broken").clone();
    let file = object_file_of(gw, &broken.secret).await;
    corrupt(&file);
    gw.restart();

    // Not an empty quota: a refusal, and a log line saying why.
    let (status, code) = error_code(post(gw, &broken.secret, &chat()).await).await;
    assert_eq!((status, code.as_str()), (503, Some("service_unavailable")));
    assert!(gw.logs().contains("limiter_storage_unreadable"), "the object logs its storage failure");
    // Other keys are unaffected.
    assert_eq!(post(gw, &gw.key("healthy").secret, &chat()).await.status(), 200);

    // Revoking the key: saved, but its object cannot be told, so the caller hears so (and may retry).
    let response = client()
        .delete(gw.url(&format!("/admin/keys/{}", broken.id)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("reachable");
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (503, Some("limiter_unavailable")));
    let row = gw.d1(&format!("SELECT active FROM api_keys WHERE id = '{}'", broken.id));
    assert_eq!(row[0]["active"], 0, "the revocation itself was saved");
}

fn lenient() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .var("LIMITER_FAIL_OPEN", "true")
                .var("AUTH_CACHE_TTL_SECONDS", 600)
                .keys(&["open"]),
        )
    })
}

#[tokio::test]
async fn failing_open_still_enforces_revocation_and_allowed_models() {
    let gw = lenient();
    let key = gw.key("open").clone();
    let file = object_file_of(gw, &key.secret).await;
    corrupt(&file);
    gw.restart();

    assert_eq!(post(gw, &key.secret, &chat()).await.status(), 200, "the limiter is down: fail open");
    gw.d1(&format!("UPDATE api_keys SET allowed_models = '[\"other/model\"]' WHERE id = '{}'", key.id));
    let (status, code) = error_code(post(gw, &key.secret, &chat()).await).await;
    assert_eq!((status, code.as_str()), (403, Some("model_not_allowed")), "read from the key's row, not a cache");
    gw.d1(&format!("UPDATE api_keys SET active = 0, allowed_models = NULL WHERE id = '{}'", key.id));
    // The auth cache (TTL 600 s) still holds the key; the fresh read does not.
    let (status, code) = error_code(post(gw, &key.secret, &chat()).await).await;
    assert_eq!((status, code.as_str()), (401, Some("invalid_api_key")));
}

fn guarded() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .key_with("absurd", &[("usage_limit", "1000000")]),
        )
    })
}

fn sluggish() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("LIMITER_TIMEOUT_MS", 300)
                .var("LIMITER_FAULT_DELAY_MS", 5000)
                .keys(&["slow"]),
        )
    })
}

#[tokio::test]
async fn absurd_usage_reports_are_clamped_not_wrapped() {
    let gw = guarded();
    let key = gw.key("absurd").clone();
    let mut body = chat();
    body["standin"] = json!({"usage_override": {"prompt_tokens": 1e30, "completion_tokens": 1e30, "cost": 1e30}});
    assert_eq!(post(gw, &key.secret, &body).await.status(), 200);
    // The budget holds what one request can account for at most (2^40 tokens), and is spent: no wrap-around
    // turned it into room.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let usage = gw.own_usage(&key.secret).await;
        if usage["current"]["in_flight"] == 0 {
            assert_eq!(usage["current"]["budget_used"]["tokens"], 1u64 << 40, "{usage}");
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {usage}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, code) = error_code(post(gw, &key.secret, &chat()).await).await;
    assert_eq!((status, code.as_str()), (429, Some("insufficient_quota")));
}

#[tokio::test]
async fn a_limiter_that_cannot_answer_in_time_is_a_503_not_a_hang() {
    let gw = sluggish();
    let started = Instant::now();
    let response = post(gw, &gw.key("slow").secret, &chat()).await;
    let id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (503, Some("service_unavailable")));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "the deadline was waited for: {waited:?}");
    assert!(waited < Duration::from_secs(5), "the object's 5 s delay was not: {waited:?}");
    // The log line is written once the response is out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(line) = gw.request_logs().into_iter().find(|l| l["request_id"] == id.as_str()) {
            break line;
        }
        assert!(Instant::now() < deadline, "no log line for {id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(line["error"], "limiter_timeout", "{line}");
}

fn drainer() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .var("CLIENT_ABORT_POLICY", "drain")
                .var("DRAIN_TIMEOUT_SECONDS", 2)
                .var("UPSTREAM_TIMEOUT_SECONDS", 60)
                .keys(&["leaver"]),
        )
    })
}

/// Leaves a slow stream after its first content; `native`: the client asked for the usage chunk (the stream goes on
/// the runtime's pipe).
async fn drain_is_bounded(native: bool) {
    let gw = drainer();
    let id = format!("drain-{}", random_hex(4));
    // 200 words, one every 100 ms: 20 s to generate the whole answer.
    let body = json!({"messages": [{"role": "user", "content": "a slow answer"}], "stream": true, "max_tokens": 1000,
        "stream_options": {"include_usage": native}, "standin": {"chunks": 200, "delay_ms": 100}});
    let key = gw.key("leaver").secret.clone();
    let (head, _) =
        post_and_leave(&gw.base, "/v1/chat/completions", &key, &[("x-request-id", &id)], &body, "\"content\"").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let left_at = Instant::now();
    // The drain reads on for 2 s (not the 20 s the answer takes), aborts, and the request is billed and reconciled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let rows = gw.d1(&format!("SELECT * FROM usage_logs WHERE client_request_id = '{id}'"));
        if let Some(row) = rows.into_iter().next().filter(|r| r["reconcile_state"] != "pending") {
            break row;
        }
        assert!(Instant::now() < deadline, "no settled row within 30 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(left_at.elapsed() < Duration::from_secs(30), "not held until the upstream's answer ended");
    assert_eq!((row["error"].as_str(), row["usage_source"].as_str()), (Some("client_abort"), Some("reconciled")));
    let generations = gw.upstream.generations().await;
    let generation = row["generation_id"].as_str().and_then(|id| generations.get(id)).expect("the generation");
    assert_eq!(generation["cancelled"], true, "the drain stopped the upstream");
    assert!(generation["tokens_completion"].as_u64().is_some_and(|n| n > 0 && n < 150), "{generation}");
    assert_eq!(row["output_tokens"], generation["tokens_completion"], "billed what was generated before the stop");
}

#[tokio::test]
async fn a_drain_is_bounded_and_what_it_could_not_read_is_reconciled() {
    drain_is_bounded(false).await;
}

#[tokio::test]
async fn on_the_native_path_a_drain_is_bounded_too() {
    drain_is_bounded(true).await;
}
