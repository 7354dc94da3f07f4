//! The gateway under both local runtimes the harness knows: wrangler's dev server as `npm run dev` starts it
//! (scripts/dev.mjs) and Miniflare's API (scripts/serve.mjs, what the other tests use), and the harness's direct
//! SQLite access to D1 and Durable Object storage while the runtime runs.

use gateway_tests::*;

async fn chat(gw: &Gateway, key: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream, "standin": {}}))
        .send()
        .await
        .expect("gateway reachable")
}

/// A non-streamed and a streamed completion, both answered in full.
async fn assert_serves(gw: &Gateway, key: &str) {
    let response = chat(gw, key, false).await;
    assert_eq!(response.status(), 200, "non-streamed; log:\n{}", gw.logs());
    let body: serde_json::Value = response.json().await.expect("JSON body");
    assert!(body["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{body}");

    let response = chat(gw, key, true).await;
    assert_eq!(response.status(), 200, "streamed; log:\n{}", gw.logs());
    assert!(response.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let events = sse_events(response).await;
    assert!(events.len() > 1, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_run_dev_serves_reads_its_database_and_survives_a_restart() {
    let gw = Gateway::start(GatewayOptions::default().runtime(Runtime::Dev).keys(&["dev"]));
    let key = gw.key("dev").secret.clone();
    assert_serves(&gw, &key).await;

    // dev.mjs adds its demo key to the harness's: both in the database the running gateway uses.
    let rows = gw.d1("SELECT COUNT(*) AS n FROM api_keys");
    assert_eq!(rows, vec![json!({"n": 2})]);
    let files = gw.durable_object_files();
    assert!(
        !files.is_empty()
            && files.iter().all(|f| f.parent().is_some_and(|d| d.ends_with("openrouter-gateway-KeyLimiter"))),
        "{files:?}"
    );

    gw.restart();
    assert_serves(&gw, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_storage_is_readable_while_the_gateway_runs() {
    let gw = Gateway::start(GatewayOptions::default().keys(&["plain"]));
    assert_serves(&gw, &gw.key("plain").secret.clone()).await;
    let files = gw.durable_object_files();
    assert!(
        !files.is_empty() && files.iter().all(|f| f.parent().is_some_and(|d| d.ends_with("gateway-KeyLimiter"))),
        "{files:?}"
    );
    let tables = sqlite(&files[0], "SELECT name FROM sqlite_master WHERE type = 'table'");
    assert!(!tables.is_empty(), "the limiter stored nothing in {}", files[0].display());
    // Several statements, with and without rows, through the same helper.
    let rows = sqlite(
        &gw.d1_file(),
        "CREATE TEMP TABLE t (a, b, c, d); INSERT INTO t VALUES (1, 2.5, 'x', NULL); SELECT * FROM t",
    );
    assert_eq!(rows, vec![json!({"a": 1, "b": 2.5, "c": "x", "d": null})]);
}
