//! Exact per-key quotas through the real Durable Object: bursts, the sliding window, token reservations and
//! refunds, budgets, leases, restarts, and the headers that report it all.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway_tests::*;
use serde_json::Value;

/// Window length in this gateway (seconds): short, so the window can be watched sliding.
const WINDOW_SECS: u64 = 5;

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 60)
                .var("RESERVATION_LEASE_SECONDS", 120)
                .keys(&["burst1", "burst2", "burst3", "burst4"])
                .key_with("tpm", &[("tpm", "2000"), ("rpm", "1000")])
                .key_with("budget", &[("usage_limit", "1500"), ("rpm", "1000")])
                .key_with("small_tpm", &[("tpm", "500")])
                .key_with("shared_id", &[("max_concurrency", "3"), ("rpm", "1000"), ("usage_limit", "100000000")])
                .key_with("usd", &[("usd_limit", USD_LIMIT), ("rpm", "1000")])
                .key_with("usd_unpriced", &[("usd_limit", "1"), ("rpm", "1000")])
                .key_with("choices", &[("tpm", "250"), ("rpm", "1000")]),
        )
    })
}

/// Lease of the restartable gateway: long enough that a restart on a busy machine finishes well inside it.
const LEASE_SECS: u64 = 15;

/// A gateway that one test kills and restarts (so it is nobody else's).
fn restartable() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RESERVATION_LEASE_SECONDS", LEASE_SECS)
                .key_with("conc", &[("max_concurrency", "1"), ("rpm", "1000")])
                .key_with("restart", &[("rpm", "5")]),
        )
    })
}

/// A second gateway whose window is a few seconds long.
fn short_window() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_WINDOW_SECONDS", WINDOW_SECS)
                .key_with("slide", &[("rpm", "3")])
                .key_with("headers", &[("rpm", "5")]),
        )
    })
}

fn chat(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "count me"}], "max_tokens": max_tokens, "standin": {}})
}

async fn send(gw: &Gateway, client: &reqwest::Client, key: &str, body: &Value) -> reqwest::Response {
    client.post(gw.url("/v1/chat/completions")).bearer_auth(key).json(body).send().await.expect("gateway reachable")
}

fn header_u64(response: &reqwest::Response, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Fires `n` requests at once for one key; returns the statuses.
async fn burst(gw: &Gateway, key: &str, n: usize, body: &Value) -> Vec<u16> {
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(120)).build().expect("client");
    let requests = (0..n).map(|_| {
        let client = client.clone();
        async move { send(gw, &client, key, body).await.status().as_u16() }
    });
    join_all(requests).await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_500_admits_exactly_the_limit_every_time_and_keys_are_independent() {
    let gw = gateway();
    for name in ["burst1", "burst2"] {
        let statuses = burst(gw, &gw.key(name).secret, 500, &chat(16)).await;
        let others: Vec<&u16> = statuses.iter().filter(|s| **s != 200 && **s != 429).collect();
        assert_eq!(count(&statuses, 200), 60, "{name}: {others:?}");
        assert_eq!(count(&statuses, 429), 440, "{name}: {others:?}");
    }
    // Two keys bursting at the same time do not affect each other.
    let body = chat(16);
    let (a, b) =
        tokio::join!(burst(gw, &gw.key("burst3").secret, 500, &body), burst(gw, &gw.key("burst4").secret, 500, &body));
    assert_eq!((count(&a, 200), count(&b, 200)), (60, 60));
    assert_eq!((count(&a, 429), count(&b, 429)), (440, 440));
}

#[tokio::test]
async fn the_window_slides_admissions_resume_exactly_when_the_oldest_leaves() {
    let gw = short_window();
    let key = gw.key("slide").secret.clone();
    let client = client();
    let first_sent = Instant::now();
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 200);
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 200);

    let denied = send(gw, &client, &key, &chat(8)).await;
    let denied_received = Instant::now();
    assert_eq!(denied.status(), 429);
    let retry_ms = header_u64(&denied, "retry-after-ms").expect("retry-after-ms");
    let retry_s = header_u64(&denied, "retry-after").expect("retry-after");
    assert_eq!(retry_s, retry_ms.div_ceil(1000), "Retry-After is retry-after-ms rounded up");
    // The oldest admission happened between first_sent and the first response; it leaves WINDOW_SECS later.
    let leaves_at_latest = first_sent + Duration::from_secs(WINDOW_SECS) + Duration::from_millis(500);
    assert!(
        denied_received + Duration::from_millis(retry_ms) <= leaves_at_latest,
        "retry-after too long: {retry_ms} ms"
    );
    let body: Value = denied.json().await.expect("json");
    assert_eq!(assert_openai_error(&body)["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");

    // Still denied shortly before the oldest leaves...
    tokio::time::sleep(Duration::from_millis(retry_ms.saturating_sub(1200))).await;
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 429);
    // ...and admitted right after: one slot (the oldest) came free, not the whole window.
    let until_free = (denied_received + Duration::from_millis(retry_ms)).saturating_duration_since(Instant::now());
    tokio::time::sleep(until_free + Duration::from_millis(100)).await;
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 200);
    assert_eq!(send(gw, &client, &key, &chat(8)).await.status(), 429);
}

#[tokio::test]
async fn headers_report_the_exact_state() {
    let gw = short_window();
    let key = gw.key("headers").secret.clone();
    let client = client();
    for expected_remaining in (0..5).rev() {
        let response = send(gw, &client, &key, &chat(8)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header_u64(&response, "x-ratelimit-limit-requests"), Some(5));
        assert_eq!(header_u64(&response, "x-ratelimit-remaining-requests"), Some(expected_remaining));
        let reset = response.headers()["x-ratelimit-reset-requests"].to_str().expect("ascii").to_owned();
        assert!(reset.ends_with('s'), "Go-style duration: {reset}");
        assert_eq!(response.headers()["ratelimit-policy"], format!("\"rpm\";q=5;w={WINDOW_SECS}").as_str());
        let ietf = response.headers()["ratelimit"].to_str().expect("ascii").to_owned();
        assert!(ietf.starts_with(&format!("\"rpm\";r={expected_remaining};t=")), "{ietf}");
    }
    let denied = send(gw, &client, &key, &chat(8)).await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header_u64(&denied, "x-ratelimit-remaining-requests"), Some(0));
    assert!(header_u64(&denied, "retry-after").is_some_and(|s| (1..=WINDOW_SECS).contains(&s)));
}

/// Reads `x-ratelimit-remaining-tokens` after a request.
async fn remaining_tokens(gw: &Gateway, key: &str) -> Option<u64> {
    header_u64(&send(gw, &client(), key, &chat(1)).await, "x-ratelimit-remaining-tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_reservations_never_exceed_the_limit_and_are_refunded() {
    let gw = gateway();
    let key = gw.key("tpm").secret.clone();
    // Each request reserves its prompt estimate (ceil(8/4) + 4 + 3 = 9) plus max_tokens (191) = 200 tokens.
    let body = json!({"messages": [{"role": "user", "content": "count me"}], "max_tokens": 191,
        "standin": {"delay_ms": 300}});
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let responses = join_all((0..40).map(|_| send(gw, &client, &key, &body))).await;
    let mut admitted_usage = 0;
    let mut admitted = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => {
                admitted += 1;
                let body: Value = response.json().await.expect("json");
                admitted_usage += body["usage"]["total_tokens"].as_u64().expect("usage");
            }
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 10, "2000 / 200 = 10 reservations fit");

    // Settlement runs just after each response: give it a moment, then the window holds the actual usage
    // (far below 200 per request) plus the probe's own 10-token reservation — to the token.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let remaining = remaining_tokens(gw, &key).await.expect("token headers");
    assert_eq!(remaining, 2000 - admitted_usage - 10, "refunds happened and headers match the state");
    let statuses = burst(gw, &key, 5, &body).await;
    assert_eq!(count(&statuses, 200), 5, "refunded room admits more: {statuses:?}");
}

#[tokio::test]
async fn a_reservation_that_can_never_fit_is_a_400_not_a_429() {
    let gw = gateway();
    let response = send(gw, &client(), &gw.key("small_tpm").secret, &chat(600)).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    let error = assert_openai_error(&body);
    assert_eq!(error["param"], "max_tokens");
    assert!(error["message"].as_str().unwrap_or("").contains("never"));
    // A request that fits goes through.
    assert_eq!(send(gw, &client(), &gw.key("small_tpm").secret, &chat(100)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_is_never_overspent_under_concurrency() {
    let gw = gateway();
    let key = gw.key("budget").secret.clone();
    // 1500-token lifetime budget; each request reserves 9 + 291 = 300 tokens.
    let body =
        json!({"messages": [{"role": "user", "content": "count me"}], "max_tokens": 291, "standin": {"delay_ms": 300}});
    let statuses = burst(gw, &key, 30, &body).await;
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");

    // Keep spending until the budget is gone; then the answer is insufficient_quota, not retryable.
    let client = client();
    let mut exhausted = None;
    for _ in 0..200 {
        let response = send(gw, &client, &key, &chat(8)).await;
        if response.status() == 429 {
            exhausted = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let response = exhausted.expect("the budget runs out");
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body: Value = response.json().await.expect("json");
    assert_eq!(assert_openai_error(&body)["code"], "insufficient_quota");
}

#[tokio::test]
async fn concurrency_cap_and_abandoned_reservations_survive_a_restart_until_their_lease_ends() {
    let gw = restartable();
    let conc = gw.key("conc").secret.clone();
    let limited = gw.key("restart").secret.clone();
    let client = client();

    // rpm = 5: use three, so the window holds three admissions when the runtime dies.
    for _ in 0..3 {
        assert_eq!(send(gw, &client, &limited, &chat(8)).await.status(), 200);
    }
    // A stream that is still running when the runtime dies: its reservation is never settled.
    let dead_id = format!("dead-{}", random_hex(6));
    let mut stream = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&conc)
        .header("x-request-id", &dead_id)
        .json(&json!({"messages": [{"role": "user", "content": "long"}], "stream": true, "max_tokens": 50,
            "standin": {"chunks": 10, "pause_after": 1, "pause_ms": 60000}}))
        .send()
        .await
        .expect("reachable");
    assert_eq!(stream.status(), 200);
    let _ = stream.chunk().await;
    let reserved_at = Instant::now();
    assert_eq!(send(gw, &client, &conc, &chat(8)).await.status(), 429, "one in flight: the cap is reached");

    gw.restart();
    drop(stream);
    let client = gateway_tests::client();
    // The window's admissions survived the restart: two more fit, not five.
    assert_eq!(send(gw, &client, &limited, &chat(8)).await.status(), 200);
    assert_eq!(send(gw, &client, &limited, &chat(8)).await.status(), 200);
    assert_eq!(send(gw, &client, &limited, &chat(8)).await.status(), 429);

    // The abandoned reservation still holds the concurrency slot, until its lease ends and the alarm frees it.
    let response = send(gw, &client, &conc, &chat(8)).await;
    assert!(reserved_at.elapsed() < Duration::from_secs(LEASE_SECS), "the restart took longer than the lease");
    assert_eq!(response.status(), 429, "the dead stream's reservation survived the restart");
    let deadline = reserved_at + Duration::from_secs(LEASE_SECS + 20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = send(gw, &client, &conc, &chat(8)).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the lease never expired");
    }
    // Its Worker died, but the request is still billed: the object sent its usage event, charged as reserved.
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let rows = gw.d1(&format!("SELECT * FROM usage_logs WHERE client_request_id = '{dead_id}'"));
        if let Some(row) = rows.into_iter().next() {
            break row;
        }
        assert!(Instant::now() < deadline, "no ledger row for the request whose Worker died");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!((row["usage_source"].as_str(), row["error"].as_str()), (Some("reserved"), Some("unsettled")));
    assert_eq!(row["output_tokens"], 50, "charged its whole output bound");
    assert!(row["request_id"].as_str().is_some_and(|id| id.starts_with("req_")));
}

/// A USD budget of ten and a half worst cases (see `usd_worst_case`): room for exactly ten.
const USD_LIMIT: &str = "0.002184";

/// The worst case of `usd_chat()` at the stand-in's prices for openai/gpt-4o-mini ($1 and $2 per million
/// tokens): a prompt estimate of 8 tokens ("hi" = 1, 4 per message, 3 for the reply) and 100 output tokens.
fn usd_worst_case() -> f64 {
    8.0 * 0.000001 + 100.0 * 0.000002
}

fn usd_chat() -> Value {
    json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
        "standin": {"delay_ms": 400}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usd_budget_holds_under_concurrency_and_refunds_are_exact() {
    let gw = gateway();
    let key = gw.key("usd").secret.clone();
    let limit: f64 = USD_LIMIT.parse().expect("number");
    assert!((limit - 10.5 * usd_worst_case()).abs() < 1e-12);
    // 50 at once, each reserving its worst case: exactly ten fit. The admitted ones are held for 3 s, far longer
    // than the burst takes to arrive, so none settles (and refunds) before the last of the fifty is decided.
    let mut held = usd_chat();
    held["standin"]["delay_ms"] = json!(3000);
    let statuses = burst(gw, &key, 50, &held).await;
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 40, "{statuses:?}");

    // Settled with what they cost (far less than the worst case): the refunds are exact, and spend stays within.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (spent, rows) = loop {
        let usage = gw.own_usage(&key).await;
        let rows = gw.d1(&format!("SELECT cost FROM usage_logs WHERE key_id = '{}'", gw.key("usd").id));
        if usage["current"]["in_flight"] == 0 && rows.len() == 10 {
            break (usage["current"]["budget_used"]["usd"].as_f64().expect("usd"), rows);
        }
        assert!(Instant::now() < deadline, "requests never settled: {usage}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let billed: f64 = rows.iter().filter_map(|r| r["cost"].as_f64()).sum();
    assert!((spent - billed).abs() < 1e-12, "the object holds exactly what the ledger billed: {spent} vs {billed}");
    assert!(spent <= limit && spent > 0.0, "spent {spent} of {limit}");
    // With the refunds, more requests fit again.
    assert_eq!(send(gw, &client(), &key, &usd_chat()).await.status(), 200);
}

#[tokio::test]
async fn a_usd_budget_refuses_a_model_whose_price_is_unknown() {
    let gw = gateway();
    let key = gw.key("usd_unpriced").secret.clone();
    let mut body = usd_chat();
    body["model"] = json!("standin/unpriced");
    let response = send(gw, &client(), &key, &body).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    let error = assert_openai_error(&body);
    assert_eq!((error["code"].as_str(), error["param"].as_str()), (Some("model_price_unknown"), Some("model")));
    // A fallback list is priced at its dearest member, so an unpriced fallback is refused too.
    let mut fallback = usd_chat();
    fallback["models"] = json!(["openai/gpt-4o-mini", "standin/unpriced"]);
    assert_eq!(send(gw, &client(), &key, &fallback).await.status(), 400);
    assert_eq!(send(gw, &client(), &key, &usd_chat()).await.status(), 200);
}

#[tokio::test]
async fn n_choices_multiply_the_reservation() {
    let gw = gateway();
    let key = gw.key("choices").secret.clone();
    // tpm 250: 8 + 3 × 100 can never fit; 8 + 2 × 100 can.
    let mut body = chat(100);
    body["messages"] = json!([{"role": "user", "content": "hi"}]);
    body["n"] = json!(3);
    let response = send(gw, &client(), &key, &body).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    assert!(error["error"]["message"].as_str().unwrap_or("").contains("308"), "{error}");
    body["n"] = json!(2);
    assert_eq!(send(gw, &client(), &key, &body).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_request_id_keys_nothing() {
    let gw = gateway();
    let key = gw.key("shared_id").secret.clone();
    let shared = format!("dup-id-{}", random_hex(4));
    let body = json!({"messages": [{"role": "user", "content": "same id"}], "max_tokens": 10,
        "standin": {"delay_ms": 600}});
    // Eight at once with one x-request-id: the concurrency cap of three holds, as for distinct ids.
    let send_with_shared_id = || async {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-request-id", &shared)
            .json(&body)
            .send()
            .await
            .expect("reachable")
    };
    let shared_id = shared.as_str();
    let sends = (0..8).map(|_| {
        let send = send_with_shared_id();
        async move {
            let response = send.await;
            let status = response.status().as_u16();
            let own = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
            assert_eq!(response.headers()["x-client-request-id"], shared_id);
            let _ = response.bytes().await;
            (status, own)
        }
    });
    let answers = join_all(sends).await;
    assert_eq!(answers.iter().filter(|(s, _)| *s == 200).count(), 3, "{answers:?}");
    // Four more, one after another, with the same id: each is a request of its own.
    for _ in 0..4 {
        assert_eq!(send_with_shared_id().await.status(), 200);
    }
    // Seven admitted: seven ledger rows with seven ids of the gateway's own, and seven settlements.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = gw.d1(&format!(
            "SELECT request_id, input_tokens, output_tokens FROM usage_logs WHERE client_request_id = '{shared}'"
        ));
        let usage = gw.own_usage(&key).await;
        if rows.len() == 7 && usage["current"]["in_flight"] == 0 {
            let ids: std::collections::HashSet<&str> = rows.iter().filter_map(|r| r["request_id"].as_str()).collect();
            assert_eq!(ids.len(), 7);
            let billed: u64 = rows
                .iter()
                .map(|r| r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!(usage["current"]["budget_used"]["tokens"], billed, "each settlement charged its own request");
            break;
        }
        assert!(Instant::now() < deadline, "rows: {rows:?}, usage: {usage}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
