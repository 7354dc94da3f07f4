//! The response cache: a miss, a hit and expiry; what `Cache-Control` and the key's settings ask; the per-tenant
//! scope; answers replayed across stream modes and read by both official SDKs; failed, cut and abandoned answers
//! never stored; and hits as requests — refused at the rate limit, billed $0 with the original answer's tokens in
//! the ledger (`cache_hit = 1`), in PostHog and in the usage report, using none of the key's tokens or budget.
//!
//! The billing and quota behaviour runs in both local runtimes (Miniflare and `npm run dev`) and on both stores;
//! the rest on Miniflare with D1.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

const ADMIN_KEY: &str = "adm-cache-key-90d2";
const TTL: &str = "3600";

fn options(runtime: Runtime, store: Store) -> GatewayOptions {
    GatewayOptions::default()
        .runtime(runtime)
        .store(store)
        .var("RATE_LIMIT_PER_MINUTE", 100_000)
        .var("ADMIN_API_KEY", ADMIN_KEY)
        .key_with("cached", &[("cache_ttl_seconds", TTL)])
        .key_with("short", &[("cache_ttl_seconds", "3")])
        .key_with("sampled", &[("cache_ttl_seconds", TTL), ("cache_sampled", "1")])
        .keys(&["plain"])
        // Two keys of one user sharing their answers, a third of that user keeping its own, and another user's.
        .key_with("team-a", &[("user_id", "'team'"), ("cache_ttl_seconds", TTL), ("cache_scope", "'user'")])
        .key_with("team-b", &[("user_id", "'team'"), ("cache_ttl_seconds", TTL), ("cache_scope", "'user'")])
        .key_with("team-own", &[("user_id", "'team'"), ("cache_ttl_seconds", TTL)])
        .key_with("outsider", &[("cache_ttl_seconds", TTL), ("cache_scope", "'user'")])
        .key_with("limited", &[("rpm", "2"), ("cache_ttl_seconds", TTL)])
        .key_with("budget", &[("tpm", "100000"), ("usage_limit", "1000000"), ("cache_ttl_seconds", TTL)])
        .key_with("sdk", &[("cache_ttl_seconds", TTL)])
        .posthog(&[])
}

fn miniflare() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options(Runtime::Miniflare, Store::D1)))
}

fn dev() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options(Runtime::Dev, Store::D1)))
}

fn postgres() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options(Runtime::Miniflare, Store::Postgres)))
}

/// A small deterministic chat request carrying `marker` (the stand-in answers it by quoting it).
fn body(marker: &str) -> Value {
    json!({"messages": [{"role": "user", "content": marker}], "temperature": 0, "max_tokens": 32, "standin": {}})
}

fn marker(tag: &str) -> String {
    format!("{tag}-{}", random_hex(4))
}

struct Answer {
    status: u16,
    request_id: String,
    x_cache: Option<String>,
    age: Option<u64>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().expect("an id").to_owned()
    }
}

async fn send(gw: &Gateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut request = client().post(gw.url("/v1/chat/completions")).bearer_auth(&gw.key(key).secret).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("gateway reachable");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, request_id) = (response.status().as_u16(), header("x-request-id").expect("x-request-id"));
    let (x_cache, age) = (header("x-cache"), header("age").map(|a| a.parse().expect("age in seconds")));
    Answer { status, request_id, x_cache, age, text: response.text().await.expect("body") }
}

/// What became of a miss's answer (the log's `cache_store`), once it is known.
async fn store_of(gw: &Gateway, request_id: &str) -> String {
    gw.request_log("request_id", request_id).await["cache_store"].as_str().unwrap_or("(none)").to_owned()
}

async fn upstream_calls(gw: &Gateway, marker: &str) -> usize {
    gw.upstream.chat_requests_with(marker).await.len()
}

#[tokio::test]
async fn a_miss_is_stored_then_hit_until_it_expires() {
    let gw = miniflare();
    let m = marker("expiry");
    let first = send(gw, "short", &body(&m), &[]).await;
    assert_eq!((first.status, first.x_cache.as_deref(), first.age), (200, Some("MISS"), None));
    assert_eq!(store_of(gw, &first.request_id).await, "stored");

    let hit = send(gw, "short", &body(&m), &[]).await;
    assert_eq!((hit.status, hit.x_cache.as_deref()), (200, Some("HIT")));
    assert!(hit.age.is_some_and(|age| age < 3), "age: {:?}", hit.age);
    let (original, replayed) = (first.json(), hit.json());
    assert_eq!(replayed["id"], original["id"], "the stored answer");
    assert_eq!(replayed["choices"], original["choices"]);
    assert_eq!(replayed["usage"]["prompt_tokens"], original["usage"]["prompt_tokens"]);
    assert!(original["usage"]["cost"].as_f64().is_some_and(|c| c > 0.0));
    assert_eq!(replayed["usage"]["cost"], 0.0, "a hit costs the client nothing");
    assert_eq!(upstream_calls(gw, &m).await, 1, "the hit never reached the upstream");
    let line = gw.request_log("request_id", &hit.request_id).await;
    assert_eq!((line["cache"].as_str(), line.get("upstream_status")), (Some("hit"), None));

    // The entry was stored with a 3 s TTL: after that it is a miss again (KV keeps it longer; the gateway does not
    // serve it).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let expired = send(gw, "short", &body(&m), &[]).await;
    assert_eq!(expired.x_cache.as_deref(), Some("MISS"));
    assert_ne!(expired.id(), first.id(), "a new generation");
    assert_eq!(upstream_calls(gw, &m).await, 2);
}

#[tokio::test]
async fn a_request_accepts_entries_no_older_than_its_max_age() {
    let gw = miniflare();
    let m = marker("max-age");
    let first = send(gw, "cached", &body(&m), &[]).await;
    assert_eq!(store_of(gw, &first.request_id).await, "stored");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh_enough = send(gw, "cached", &body(&m), &[("cache-control", "max-age=60")]).await;
    assert_eq!((fresh_enough.x_cache.as_deref(), fresh_enough.id()), (Some("HIT"), first.id()));
    assert!(fresh_enough.age.is_some_and(|age| age >= 1), "age: {:?}", fresh_enough.age);
    let too_old = send(gw, "cached", &body(&m), &[("cache-control", "max-age=1")]).await;
    assert_eq!(too_old.x_cache.as_deref(), Some("MISS"));
    assert_ne!(too_old.id(), first.id());
    assert_eq!(upstream_calls(gw, &m).await, 2);
}

#[tokio::test]
async fn the_cache_is_opt_in_and_cache_control_steers_it() {
    let gw = miniflare();
    let sampling = |m: &str, temperature: Option<f64>| {
        let mut b = body(m);
        match temperature {
            Some(t) => b["temperature"] = json!(t),
            None => drop(b.as_object_mut().map(|o| o.remove("temperature"))),
        }
        b
    };

    // A key without a TTL: nothing is cached unless the request asks.
    let m = marker("plain");
    for _ in 0..2 {
        assert_eq!(send(gw, "plain", &body(&m), &[]).await.x_cache, None);
    }
    let asked = send(gw, "plain", &body(&m), &[("cache-control", "max-age=600")]).await;
    assert_eq!(asked.x_cache.as_deref(), Some("MISS"));
    assert_eq!(store_of(gw, &asked.request_id).await, "stored");
    let again = send(gw, "plain", &body(&m), &[("cache-control", "max-age=600")]).await;
    assert_eq!((again.x_cache.as_deref(), again.id()), (Some("HIT"), asked.id()));
    assert_eq!(upstream_calls(gw, &m).await, 3);

    // A key with a TTL caches deterministic requests only; sampled ones when the request (or the key) asks.
    let m = marker("sampled");
    for temperature in [Some(0.7), None] {
        for _ in 0..2 {
            assert_eq!(send(gw, "cached", &sampling(&m, temperature), &[]).await.x_cache, None, "{temperature:?}");
        }
    }
    assert_eq!(upstream_calls(gw, &m).await, 4);
    let asked = send(gw, "cached", &sampling(&m, Some(0.7)), &[("cache-control", "max-age=600")]).await;
    assert_eq!(store_of(gw, &asked.request_id).await, "stored");
    assert_eq!(
        send(gw, "cached", &sampling(&m, Some(0.7)), &[("cache-control", "max-age=600")]).await.id(),
        asked.id()
    );
    let m = marker("sampling-key");
    let first = send(gw, "sampled", &sampling(&m, Some(0.7)), &[]).await;
    assert_eq!(store_of(gw, &first.request_id).await, "stored");
    let hit = send(gw, "sampled", &sampling(&m, Some(0.7)), &[]).await;
    assert_eq!((hit.x_cache.as_deref(), hit.id()), (Some("HIT"), first.id()));

    // no-cache goes upstream and refreshes the entry; no-store stays out of it altogether.
    let m = marker("refresh");
    let first = send(gw, "cached", &body(&m), &[]).await;
    assert_eq!(store_of(gw, &first.request_id).await, "stored");
    let refreshed = send(gw, "cached", &body(&m), &[("cache-control", "no-cache")]).await;
    assert_eq!(refreshed.x_cache.as_deref(), Some("MISS"));
    assert_eq!(store_of(gw, &refreshed.request_id).await, "stored");
    assert_ne!(refreshed.id(), first.id());
    let bypass = send(gw, "cached", &body(&m), &[("cache-control", "no-store")]).await;
    assert_eq!((bypass.status, bypass.x_cache.as_deref()), (200, None));
    assert_eq!(gw.request_log("request_id", &bypass.request_id).await.get("cache_store"), None);
    // The same request spelled differently (field order, 0.0, streamed or not, a `user`) is the same entry.
    let respelled = json!({"standin": {}, "max_tokens": 32, "user": "someone", "temperature": 0.0,
                           "messages": [{"content": m, "role": "user"}]});
    let hit = send(gw, "cached", &respelled, &[]).await;
    assert_eq!((hit.x_cache.as_deref(), hit.id()), (Some("HIT"), refreshed.id()), "the refreshed entry");
    assert_eq!(upstream_calls(gw, &m).await, 3);
}

#[tokio::test]
async fn an_entry_serves_only_its_key_or_the_keys_its_user_shares_it_with() {
    let gw = miniflare();
    let m = marker("scope");
    let stored = send(gw, "team-a", &body(&m), &[]).await;
    assert_eq!(store_of(gw, &stored.request_id).await, "stored");
    let shared = send(gw, "team-b", &body(&m), &[]).await;
    assert_eq!((shared.x_cache.as_deref(), shared.id()), (Some("HIT"), stored.id()), "same user, both sharing");
    for key in ["team-own", "outsider", "cached"] {
        let other = send(gw, key, &body(&m), &[]).await;
        assert_eq!(other.x_cache.as_deref(), Some("MISS"), "{key}");
        assert_ne!(other.id(), stored.id(), "{key} never gets the entry");
    }
    assert_eq!(upstream_calls(gw, &m).await, 4);
}

#[tokio::test]
async fn a_stored_answer_is_refused_to_a_revoked_key_and_to_a_model_it_may_no_longer_use() {
    let gw = miniflare();
    let admin = |method: reqwest::Method, path: String, body: Option<Value>| async move {
        let mut request = client().request(method, gw.url(&path)).bearer_auth(ADMIN_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("gateway reachable");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json::<Value>().await.expect("json")
    };
    let created = admin(
        reqwest::Method::POST,
        "/admin/keys".into(),
        Some(json!({"user_id": marker("admin"), "cache_ttl_seconds": 600})),
    )
    .await;
    let (id, secret) = (created["id"].as_str().expect("id"), created["key"].as_str().expect("key"));
    let ask = || async {
        let request = body("asked again after a change");
        let response =
            client().post(gw.url("/v1/chat/completions")).bearer_auth(secret).json(&request).send().await.expect("up");
        let x_cache = response.headers().get("x-cache").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let request_id = response.headers()["x-request-id"].to_str().expect("id").to_owned();
        (response.status().as_u16(), x_cache, request_id, response.json::<Value>().await.expect("json"))
    };
    let (status, _, request_id, _) = ask().await;
    assert_eq!((status, store_of(gw, &request_id).await.as_str()), (200, "stored"));
    assert_eq!(ask().await.1.as_deref(), Some("HIT"));

    let path = format!("/admin/keys/{id}");
    admin(reqwest::Method::PATCH, path.clone(), Some(json!({"allowed_models": ["anthropic/claude-3.5-sonnet"]}))).await;
    let (status, x_cache, _, error) = ask().await;
    assert_eq!((status, x_cache, assert_openai_error(&error)["code"].as_str()), (403, None, Some("model_not_allowed")));
    admin(reqwest::Method::DELETE, path, None).await;
    let (status, x_cache, _, error) = ask().await;
    assert_eq!((status, x_cache, assert_openai_error(&error)["code"].as_str()), (401, None, Some("invalid_api_key")));
}

/// Runs a phase of an SDK script (`node …` or the Python SDK's venv) and returns what it printed.
fn sdk(program: &std::path::Path, script: &str, gw: &Gateway, marker: &str, phase: &str) -> Value {
    let output = Command::new(program)
        .arg(repo_root().join(script))
        .args([gw.base.as_str(), gw.key("sdk").secret.as_str(), marker, phase])
        .output()
        .unwrap_or_else(|e| panic!("{} runs {script}: {e} (npm test's setup installs it)", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{script} failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{script} printed: {stdout}"))
}

fn ok<'a>(results: &'a Value, call: &str) -> &'a Value {
    assert_eq!(results[call]["ok"], true, "{call}: {}", results[call]);
    &results[call]
}

/// Waits until the gateway stored the answers of these calls (found by their client request ids).
async fn stored_by_client_id(gw: &Gateway, ids: &[String]) {
    for id in ids {
        let line = gw.request_log("client_request_id", id).await;
        assert_eq!(line["cache_store"], "stored", "{id}: {line}");
    }
}

#[tokio::test]
async fn answers_replay_across_stream_modes_through_the_official_node_sdk() {
    let gw = miniflare();
    let m = marker("node");
    let node = std::path::Path::new("node");
    let script = "tests/sdk/cache-sdk.mjs";
    let stored = sdk(node, script, gw, &m, "store");
    for call in ["plain_body", "tools_stream", "embeddings_first"] {
        assert_eq!(ok(&stored, call)["x_cache"], "MISS", "{call}");
    }
    let ids: Vec<String> =
        ["plain_body", "tools_stream", "embeddings_first"].iter().map(|c| format!("{m}-{c}")).collect();
    stored_by_client_id(gw, &ids).await;
    let r = sdk(node, script, gw, &m, "replay");

    // A non-streamed answer replayed as a stream: the SDK's iterator and its helper read the same answer.
    let plain = &ok(&stored, "plain_body")["choices"][0];
    let text = plain["content"].as_str().expect("content");
    assert!(text.contains(&m), "{text}");
    let streamed = ok(&r, "plain_stream");
    assert_eq!(streamed["x_cache"], "HIT");
    assert!(streamed["age"].as_str().is_some_and(|a| a.parse::<u64>().is_ok()));
    assert_eq!(streamed["ids"], json!([stored["plain_body"]["id"]]));
    assert_eq!((streamed["content"]["0"].as_str(), streamed["finish"]["0"].as_str()), (Some(text), Some("stop")));
    assert_eq!(streamed["usage"]["completion_tokens"], stored["plain_body"]["usage"]["completion_tokens"]);
    assert_eq!(streamed["usage"]["cost"], 0.0);
    let bare = ok(&r, "plain_stream_no_usage");
    assert_eq!((bare["x_cache"].as_str(), bare["usage"].is_null()), (Some("HIT"), true), "no usage chunk unasked");
    assert_eq!(bare["content"]["0"].as_str(), Some(text));
    let helper = ok(&r, "plain_helper");
    assert_eq!(
        (helper["id"].clone(), helper["choices"][0]["content"].as_str()),
        (stored["plain_body"]["id"].clone(), Some(text))
    );

    // A streamed answer (two choices calling a tool after reasoning) stored, then served as a body and a stream.
    let streamed = ok(&stored, "tools_stream");
    let calls = &streamed["tool_calls"];
    assert_eq!(calls["0"][0]["name"], "lookup");
    assert_eq!(
        serde_json::from_str::<Value>(calls["1"][0]["arguments"].as_str().expect("args")).ok(),
        Some(json!({"query": m, "page": 2}))
    );
    let body = ok(&r, "tools_body");
    assert_eq!((body["x_cache"].as_str(), body["object"].as_str()), (Some("HIT"), Some("chat.completion")));
    assert_eq!(body["id"], streamed["ids"][0]);
    for (i, choice) in body["choices"].as_array().expect("choices").iter().enumerate() {
        let sent = &calls[i.to_string()][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["tool_calls"], json!([{"id": sent["id"], "name": "lookup", "arguments": sent["arguments"]}]));
    }
    assert_eq!(body["usage"]["total_tokens"], streamed["usage"]["total_tokens"]);
    // The same answer through the stream helper (which leaves an empty content null).
    let helper = ok(&r, "tools_helper");
    for (ours, theirs) in
        helper["choices"].as_array().into_iter().flatten().zip(body["choices"].as_array().expect("choices"))
    {
        assert_eq!((&ours["tool_calls"], &ours["finish_reason"]), (&theirs["tool_calls"], &theirs["finish_reason"]));
    }
    assert_eq!(helper["choices"].as_array().map(Vec::len), Some(2));

    // Embeddings, decoded by the SDK from base64, the same vector.
    let (first, again) = (ok(&stored, "embeddings_first"), ok(&r, "embeddings_again"));
    assert_eq!((first["x_cache"].as_str(), again["x_cache"].as_str()), (Some("MISS"), Some("HIT")));
    assert_eq!(first["vector"], again["vector"]);
    assert_eq!(first["usage"]["prompt_tokens"], again["usage"]["prompt_tokens"]);
}

#[tokio::test]
async fn answers_replay_across_stream_modes_through_the_official_python_sdk() {
    let gw = miniflare();
    let m = marker("python");
    let python = repo_root().join(".tools/python/bin/python");
    let script = "tests/sdk/cache_sdk.py";
    let stored = sdk(&python, script, gw, &m, "store");
    for call in ["plain_body", "tools_stream"] {
        assert_eq!(ok(&stored, call)["x_cache"], "MISS", "{call}");
    }
    stored_by_client_id(gw, &[format!("{m}-py-plain_body"), format!("{m}-py-tools_stream")]).await;
    let r = sdk(&python, script, gw, &m, "replay");

    let original = ok(&stored, "plain_body");
    let text = original["choices"][0]["content"].as_str().expect("content");
    let streamed = ok(&r, "plain_stream");
    assert_eq!(streamed["x_cache"], "HIT");
    assert_eq!((streamed["ids"].clone(), streamed["content"].as_str()), (json!([original["id"]]), Some(text)));
    assert_eq!(streamed["finish_reason"], "stop");
    assert_eq!(streamed["usage"]["prompt_tokens"], original["usage"]["prompt_tokens"]);
    let helper = ok(&r, "plain_helper");
    assert_eq!((helper["id"].clone(), helper["choices"][0]["content"].as_str()), (original["id"].clone(), Some(text)));

    let tools = ok(&r, "tools_body");
    assert_eq!(
        (tools["x_cache"].as_str(), tools["id"].clone()),
        (Some("HIT"), stored["tools_stream"]["ids"][0].clone())
    );
    let call = &tools["choices"][0]["tool_calls"][0];
    assert_eq!(
        (call["name"].as_str(), tools["choices"][0]["finish_reason"].as_str()),
        (Some("lookup"), Some("tool_calls"))
    );
    assert_eq!(serde_json::from_str::<Value>(call["arguments"].as_str().expect("args")).ok(), Some(json!({"q": m})));
}

/// Answers that must never be stored, each asked twice: the second is a miss too, and reaches the upstream.
async fn failed_answers_are_never_stored(gw: &Gateway) {
    let streamed = |m: &str, standin: Value| {
        json!({"messages": [{"role": "user", "content": m}], "temperature": 0, "max_tokens": 32, "stream": true,
               "stream_options": {"include_usage": true}, "standin": standin})
    };
    let plain = |m: &str, standin: Value| json!({"messages": [{"role": "user", "content": m}], "temperature": 0, "max_tokens": 32, "standin": standin});
    let cases = [
        ("stream-error", streamed("x", json!({"scenario": "midstream_error", "after_chunks": 2}))),
        ("stream-cut", streamed("x", json!({"scenario": "disconnect", "after_chunks": 2}))),
        ("stream-garbage", streamed("x", json!({"scenario": "garbage", "after_chunks": 1}))),
        ("stream-finish-error", streamed("x", json!({"finish_reason": "error"}))),
        ("body-finish-error", plain("x", json!({"finish_reason": "error"}))),
        ("body-filtered", plain("x", json!({"finish_reason": "content_filter"}))),
        ("upstream-503", plain("x", json!({"scenario": "error", "status": 503}))),
    ];
    for (name, template) in cases {
        let m = marker(name);
        let mut request = template.clone();
        request["messages"][0]["content"] = json!(m);
        for attempt in 0..2 {
            let answer = send(gw, "cached", &request, &[]).await;
            assert_eq!(answer.x_cache.as_deref(), Some("MISS"), "{name} #{attempt}");
            assert_eq!(store_of(gw, &answer.request_id).await, "incomplete", "{name} #{attempt}");
        }
        assert_eq!(upstream_calls(gw, &m).await, 2, "{name}");
    }

    // A client that leaves mid-stream (CLIENT_ABORT_POLICY=cancel: the upstream is stopped): nothing stored.
    let m = marker("left");
    let request = streamed(&m, json!({"chunks": 200, "delay_ms": 5}));
    let key = &gw.key("cached").secret;
    let (head, _) = post_and_leave(&gw.base, "/v1/chat/completions", key, &[], &request, "\"content\"").await;
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: ").or_else(|| l.strip_prefix("X-Request-Id: ")))
        .expect("x-request-id")
        .trim()
        .to_owned();
    let line = gw.request_log("request_id", &request_id).await;
    assert_eq!((line["stream_end"].as_str(), line["cache_store"].as_str()), (Some("client_abort"), Some("incomplete")));
    assert_eq!(send(gw, "cached", &request, &[]).await.x_cache.as_deref(), Some("MISS"));
}

#[tokio::test]
async fn failed_cut_and_abandoned_answers_are_never_stored() {
    failed_answers_are_never_stored(miniflare()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cut_and_abandoned_answers_are_never_stored_under_npm_run_dev() {
    failed_answers_are_never_stored(dev()).await;
}

/// Ledger rows whose client request id starts with `prefix`, once there are `expected` of them.
async fn ledger_rows(gw: &Gateway, prefix: &str, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = gw.db(&format!(
            "SELECT client_request_id, cache_hit, cost, saved_cost, input_tokens, output_tokens, usage_source, \
             generation_id, streamed, endpoint FROM usage_logs WHERE client_request_id LIKE '{prefix}%' \
             ORDER BY client_request_id"
        ));
        if rows.len() >= expected || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Where the key's budget stands in its Durable Object, once it equals `tokens` (settlements can ride on the
/// key's next call).
async fn budget_reaches(gw: &Gateway, key: &str, tokens: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = gw.own_usage(&gw.key(key).secret).await["current"]["budget_used"]["tokens"].as_u64();
        if used == Some(tokens) {
            return;
        }
        assert!(Instant::now() < deadline, "the budget used {used:?} tokens, expected {tokens}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn total_tokens(answer: &Answer) -> u64 {
    answer.json()["usage"]["total_tokens"].as_u64().expect("usage")
}

/// Hits are requests: refused at the rate limit, billed $0 with the original answer's tokens, using none of the
/// key's tokens or budget, and reported apart.
async fn hits_are_requests_billed_at_zero(gw: &Gateway) {
    // At the rate limit (2 a minute): a miss, a hit, then the would-be hit is refused.
    let m = marker("rpm");
    let miss = send(gw, "limited", &body(&m), &[]).await;
    assert_eq!(store_of(gw, &miss.request_id).await, "stored");
    let hit = send(gw, "limited", &body(&m), &[]).await;
    assert_eq!((hit.status, hit.x_cache.as_deref()), (200, Some("HIT")));
    let refused = send(gw, "limited", &body(&m), &[]).await;
    assert_eq!((refused.status, refused.x_cache.as_deref()), (429, None));
    assert_eq!(assert_openai_error(&refused.json())["code"], "rate_limit_exceeded");
    let refused_miss = send(gw, "limited", &body(&marker("rpm-other")), &[]).await;
    assert_eq!(
        (refused_miss.status, refused_miss.x_cache.as_deref()),
        (429, None),
        "a refused miss says nothing either"
    );
    assert_eq!(upstream_calls(gw, &m).await, 1);

    // A miss, three hits (one streamed), then another miss: the budget is charged for the two misses only.
    let prefix = marker("bill");
    let m = marker("billed");
    let id = |n: &str| format!("{prefix}-{n}");
    let first = send(gw, "budget", &body(&m), &[("x-client-request-id", &id("0-miss"))]).await;
    assert_eq!(store_of(gw, &first.request_id).await, "stored");
    budget_reaches(gw, "budget", total_tokens(&first)).await;
    for n in 1..=3 {
        let mut request = body(&m);
        if n == 3 {
            request["stream"] = json!(true);
        }
        let hit = send(gw, "budget", &request, &[("x-client-request-id", &id(&format!("{n}-hit")))]).await;
        assert_eq!(hit.x_cache.as_deref(), Some("HIT"), "{}", hit.text);
        gw.request_log("request_id", &hit.request_id).await;
    }
    let second = send(gw, "budget", &body(&marker("other")), &[("x-client-request-id", &id("4-miss"))]).await;
    assert_eq!(second.x_cache.as_deref(), Some("MISS"));
    budget_reaches(gw, "budget", total_tokens(&first) + total_tokens(&second)).await;

    let rows = ledger_rows(gw, &prefix, 5).await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    let original = first.json();
    let cost = original["usage"]["cost"].as_f64().expect("cost");
    for row in &rows {
        let name = row["client_request_id"].as_str().unwrap_or_default();
        assert_eq!(row["usage_source"], "reported", "{name}");
        assert_eq!(row["endpoint"], "chat/completions");
        if name.ends_with("-hit") {
            assert_eq!((row["cache_hit"].as_i64(), row["cost"].as_f64()), (Some(1), Some(0.0)), "{name}");
            assert_eq!(row["input_tokens"], original["usage"]["prompt_tokens"], "{name}: the original's tokens");
            assert_eq!(row["output_tokens"], original["usage"]["completion_tokens"], "{name}");
            assert!((row["saved_cost"].as_f64().unwrap_or_default() - cost).abs() < 1e-12, "{name}: {row}");
            assert!(row["generation_id"].is_null(), "{name}: nothing was generated");
        } else {
            assert_eq!((row["cache_hit"].as_i64(), row["saved_cost"].as_f64()), (Some(0), Some(0.0)), "{name}");
            assert!(row["cost"].as_f64().is_some_and(|c| c > 0.0), "{name}");
        }
    }
    assert_eq!(rows[3]["streamed"], 1, "the streamed hit");

    // The report counts hits and what they saved apart from the upstream's tokens and cost.
    let report: Value = client()
        .get(gw.url(&format!("/admin/usage?key_id={}", gw.key("budget").id)))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("reachable")
        .json()
        .await
        .expect("json");
    let total = &report["data"][0];
    let prompt = |a: &Answer| a.json()["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!((total["requests"].as_u64(), total["cache_hits"].as_u64()), (Some(5), Some(3)), "{report}");
    assert_eq!(total["input_tokens"].as_u64(), Some(prompt(&first) + prompt(&second)), "{report}");
    assert!((total["saved_cost_usd"].as_f64().unwrap_or_default() - 3.0 * cost).abs() < 1e-9, "{report}");
    let own = gw.own_usage(&gw.key("budget").secret).await;
    assert_eq!(own["usage_this_period"]["cache_hits"], 3, "{own}");

    // PostHog: one $ai_generation per request; a hit's says so, costs nothing and says what it saved.
    let posthog = gw.posthog.as_ref().expect("PostHog stand-in");
    let deadline = Instant::now() + Duration::from_secs(60);
    let hit_event = loop {
        let events = posthog.posthog_events().await;
        let found = events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["properties"]["client_request_id"] == json!(id("1-hit")));
        if let Some(event) = found {
            break event.clone();
        }
        assert!(Instant::now() < deadline, "no PostHog event for the hit");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let p = &hit_event["properties"];
    assert_eq!((hit_event["event"].as_str(), p["cache_hit"].as_bool()), (Some("$ai_generation"), Some(true)));
    assert_eq!(p["$ai_total_cost_usd"], 0.0);
    assert!((p["cache_saved_usd"].as_f64().unwrap_or_default() - cost).abs() < 1e-12);
}

#[tokio::test]
async fn hits_are_requests_billed_at_zero_on_miniflare() {
    hits_are_requests_billed_at_zero(miniflare()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_requests_billed_at_zero_under_npm_run_dev() {
    hits_are_requests_billed_at_zero(dev()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_requests_billed_at_zero_with_the_postgres_store() {
    hits_are_requests_billed_at_zero(postgres()).await;
}
