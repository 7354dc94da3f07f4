//! The Postgres store (`DB_PROVIDER=neon`) against a real PostgreSQL server the harness runs for each gateway,
//! in both local runtimes: keys are looked up and the ledger written there (and nowhere else), and with the
//! database down, auth answers from its cache within `AUTH_CACHE_TTL_SECONDS` or fails closed with a 503, while
//! the queue keeps every usage event until the database is back.

use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

async fn chat(gw: &Gateway, key: &str, client_id: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-client-request-id", client_id)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "standin": {}}))
        .send()
        .await
        .expect("gateway reachable")
}

/// The ledger rows (in Postgres) of the requests whose client id starts with `prefix`, once there are `n`.
async fn ledger_rows(gw: &Gateway, prefix: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let rows = gw.db(&format!(
            "SELECT request_id, client_request_id, key_id, status FROM usage_logs \
             WHERE client_request_id LIKE '{prefix}%' ORDER BY client_request_id"
        ));
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_lookups_and_ledger_rows_go_to_postgres() {
    let gw = Gateway::start(GatewayOptions::default().store(Store::Postgres).keys(&["pg"]));
    let key = gw.key("pg");
    let prefix = format!("pg-{}-", random_hex(4));
    let response = chat(&gw, &key.secret, &format!("{prefix}1")).await;
    assert_eq!(response.status(), 200, "log:\n{}", gw.logs());
    let request_id = response.headers()["x-request-id"].to_str().expect("id").to_owned();

    let rows = ledger_rows(&gw, &prefix, 1, Duration::from_secs(30)).await;
    assert_eq!(rows.len(), 1, "one ledger row in Postgres: {rows:?}");
    assert_eq!(rows[0]["request_id"], request_id.as_str());
    assert_eq!(rows[0]["key_id"], key.id.as_str());
    // The key exists only in Postgres, and D1 was never even migrated: nothing can have come from there.
    let d1_dir = gw.state_dir.join("v3/d1/miniflare-D1DatabaseObject");
    let databases: Vec<_> = std::fs::read_dir(&d1_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".sqlite") && name != "metadata.sqlite")
        .collect();
    assert!(databases.is_empty(), "this gateway has no D1 database at all: {databases:?}");
    // Postgres saw the lookup: its statistics count the key table's index scans.
    let scans = gw.db("SELECT idx_scan FROM pg_stat_user_tables WHERE relname = 'api_keys'");
    assert!(scans[0]["idx_scan"].as_i64().is_some_and(|n| n >= 1), "{scans:?}");
}

/// Waits (up to a minute) until the gateway has logged `label`: the operator sees what failed.
async fn wait_for_log(gw: &Gateway, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gw.logs().contains(label) {
        assert!(Instant::now() < deadline, "no {label} in the log:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The database goes away mid-traffic, as a crash would take it (SIGKILL), then comes back.
async fn database_outage(runtime: Runtime) {
    let gw = Gateway::start(
        GatewayOptions::default()
            .store(Store::Postgres)
            .runtime(runtime)
            .var("AUTH_CACHE_TTL_SECONDS", 600)
            .keys(&["warm", "cold"]),
    );
    let (warm, cold) = (gw.key("warm").secret.clone(), gw.key("cold").secret.clone());
    let prefix = format!("outage-{}-", random_hex(4));
    assert_eq!(chat(&gw, &warm, &format!("{prefix}0-before")).await.status(), 200, "log:\n{}", gw.logs());
    assert_eq!(ledger_rows(&gw, &prefix, 1, Duration::from_secs(30)).await.len(), 1);

    gw.postgres().stop();
    // A key this isolate has verified is served from the auth cache (within its TTL), and billed later.
    for i in 1..=3 {
        let response = chat(&gw, &warm, &format!("{prefix}{i}-during")).await;
        assert_eq!(response.status(), 200, "a cached key keeps working; log:\n{}", gw.logs());
    }
    // A key it has not seen cannot be verified: refused, quickly and clearly, and nothing reaches the upstream.
    let started = Instant::now();
    let refused = chat(&gw, &cold, &format!("{prefix}x-cold")).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("json");
    let error = assert_openai_error(&body);
    assert_eq!(error["code"], "service_unavailable");
    assert_eq!(error["message"], "API key verification is temporarily unavailable.");
    wait_for_log(&gw, "key_lookup_failed").await;
    assert!(started.elapsed() < Duration::from_secs(15), "fails closed without hanging: {:?}", started.elapsed());
    // The consumer could not write the ledger and left the events in the queue.
    wait_for_log(&gw, "ledger_write_failed").await;

    gw.postgres().resume();
    let rows = ledger_rows(&gw, &prefix, 4, Duration::from_secs(90)).await;
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["client_request_id"].as_str()).collect();
    let expected: Vec<String> =
        [0, 1, 2, 3].iter().map(|i| format!("{prefix}{i}-{}", if *i == 0 { "before" } else { "during" })).collect();
    assert_eq!(ids, expected, "every admitted request billed once, the refused one not at all");
    // The key nobody could verify works again.
    assert_eq!(chat(&gw, &cold, &format!("{prefix}5-after")).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_fails_auth_closed_and_loses_no_usage_under_miniflare() {
    database_outage(Runtime::Miniflare).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_fails_auth_closed_and_loses_no_usage_under_npm_run_dev() {
    database_outage(Runtime::Dev).await;
}
