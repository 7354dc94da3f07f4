// The admin tests, run once per store by tests/tests/admin.rs (`STORE` is the including module's).

use std::collections::HashSet;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

const ADMIN_KEY: &str = "adm-test-key-7f3e9c1b";

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(GatewayOptions::default().store(STORE).var("ADMIN_API_KEY", ADMIN_KEY).keys(&["regular"]))
    })
}

async fn admin(method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = client().request(method, gateway().url(path)).bearer_auth(ADMIN_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("gateway reachable")
}

async fn create(body: Value) -> Value {
    let response = admin(reqwest::Method::POST, "/admin/keys", Some(body)).await;
    assert_eq!(response.status(), 201);
    response.json().await.expect("json")
}

async fn chat(key: &str, model: &str) -> reqwest::Response {
    client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "standin": {}}),
        )
        .send()
        .await
        .expect("gateway reachable")
}

fn user(tag: &str) -> String {
    format!("{tag}-{}", random_hex(4))
}

#[tokio::test]
async fn key_lifecycle_create_use_limit_revoke() {
    let owner = user("life");
    let created = create(json!({"user_id": owner, "rpm": 100, "name": "lifecycle"})).await;
    let key = created["key"].as_str().expect("plaintext key, once").to_owned();
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(key.starts_with(&format!("sk-gw-{id}-")), "prefix, public id, secret: {key}");
    assert!(created.get("key_hash").is_none());
    assert_eq!(created["rpm"], 100);
    let stored = gateway().db(&format!("SELECT key_hash FROM api_keys WHERE id = '{id}'"));
    assert_eq!(stored[0]["key_hash"], sha256_hex(&key).as_str(), "only the hash is stored");

    assert_eq!(chat(&key, "openai/gpt-4o-mini").await.status(), 200);
    let shown: Value =
        admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None).await.json().await.expect("json");
    assert!(shown.get("key").is_none(), "the plaintext is never shown again");

    // Lower the limit: the very next requests see it (one more fits in a window of 2), no cache TTL involved.
    let patched = admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(json!({"rpm": 2}))).await;
    assert_eq!(patched.status(), 200);
    let first = chat(&key, "openai/gpt-4o-mini").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(chat(&key, "openai/gpt-4o-mini").await.status(), 429);

    // Revoke: refused at once everywhere, although this isolate's auth cache still holds the key.
    let revoked = admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(revoked.status(), 200);
    let view: Value = revoked.json().await.expect("json");
    assert_eq!(view["active"], false);
    assert!(view["revoked_at"].is_string());
    let response = chat(&key, "openai/gpt-4o-mini").await;
    assert_eq!(response.status(), 401);
    let models = client().get(gateway().url("/v1/models")).bearer_auth(&key).send().await.expect("reachable");
    assert_eq!(models.status(), 401);
    let usage = client().get(gateway().url("/v1/usage")).bearer_auth(&key).send().await.expect("reachable");
    assert_eq!(usage.status(), 401, "revocation applies to the very next request, on every route");
}

#[tokio::test]
async fn a_key_created_with_a_cache_ttl_answers_repeats_from_the_cache() {
    let created = create(json!({"user_id": user("cache"), "cache_ttl_seconds": 600})).await;
    assert_eq!(
        (created["cache_ttl_seconds"].as_u64(), created["cache_scope"].as_str(), created["cache_sampled"].as_bool()),
        (Some(600), Some("key"), Some(false))
    );
    let key = created["key"].as_str().expect("key");
    let body = json!({"messages": [{"role": "user", "content": random_hex(8)}], "temperature": 0, "standin": {}});
    let ask = || async {
        let response =
            client().post(gateway().url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.expect("up");
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (header("x-cache"), header("x-request-id").expect("request id"))
    };
    let (first, request_id) = ask().await;
    assert_eq!(first.as_deref(), Some("MISS"));
    assert_eq!(gateway().request_log("request_id", &request_id).await["cache_store"], "stored");
    assert_eq!(ask().await.0.as_deref(), Some("HIT"));
}

#[tokio::test]
async fn listing_pages_through_every_key_without_secrets() {
    let owner = user("page");
    let mut ids = HashSet::new();
    for _ in 0..5 {
        ids.insert(create(json!({"user_id": owner})).await["id"].as_str().expect("id").to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/admin/keys?user_id={owner}&limit=2");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = admin(reqwest::Method::GET, &path, None).await.json().await.expect("json");
        pages += 1;
        for key in page["data"].as_array().expect("data") {
            assert!(key.get("key").is_none() && key.get("key_hash").is_none(), "no secrets in a listing");
            seen.push(key["id"].as_str().expect("id").to_owned());
        }
        if page["has_more"] != true {
            assert!(page["next_cursor"].is_null());
            break;
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), ids);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "stable order");
    let bad = admin(reqwest::Method::GET, "/admin/keys?limit=1000", None).await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn usage_aggregates_the_ledger_and_exports_csv() {
    let owner = user("usage");
    let a = create(json!({"user_id": owner})).await;
    let b = create(json!({"user_id": owner})).await;
    let mut expected_input = 0;
    let mut expected_output = 0;
    let mut expected_cost = 0.0;
    for (key, model) in [(&a, "openai/gpt-4o-mini"), (&a, "anthropic/claude-3.5-sonnet"), (&b, "openai/gpt-4o-mini")] {
        let response = chat(key["key"].as_str().expect("key"), model).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        expected_input += body["usage"]["prompt_tokens"].as_u64().expect("usage");
        expected_output += body["usage"]["completion_tokens"].as_u64().expect("usage");
        expected_cost += body["usage"]["cost"].as_f64().expect("cost");
    }
    // The ledger is written by the queue consumer, a few seconds later.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report: Value = admin(reqwest::Method::GET, &format!("/admin/usage?user_id={owner}&group_by=model"), None)
            .await
            .json()
            .await
            .expect("json");
        let requests: u64 =
            report["data"].as_array().map_or(0, |rows| rows.iter().filter_map(|r| r["requests"].as_u64()).sum());
        if requests == 3 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rows = report["data"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "two models: {report}");
    let mini = rows.iter().find(|r| r["model"] == "openai/gpt-4o-mini").expect("row");
    assert_eq!(mini["requests"], 2);
    let input: u64 = rows.iter().filter_map(|r| r["input_tokens"].as_u64()).sum();
    let output: u64 = rows.iter().filter_map(|r| r["output_tokens"].as_u64()).sum();
    let cost: f64 = rows.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    assert_eq!((input, output), (expected_input, expected_output));
    assert!((cost - expected_cost).abs() < 1e-9);

    let by_key: Value = admin(reqwest::Method::GET, &format!("/admin/usage?user_id={owner}&group_by=key"), None)
        .await
        .json()
        .await
        .expect("json");
    let key_a = by_key["data"].as_array().expect("rows").iter().find(|r| r["key_id"] == a["id"]).expect("row");
    assert_eq!(key_a["requests"], 2);
    let future: Value = admin(reqwest::Method::GET, &format!("/admin/usage?user_id={owner}&from=2999-01-01"), None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(future["data"], json!([]), "the date filter applies");

    let csv = admin(reqwest::Method::GET, &format!("/admin/usage?user_id={owner}&group_by=day&format=csv"), None).await;
    assert!(csv.headers()["content-type"].to_str().unwrap_or("").starts_with("text/csv"));
    let text = csv.text().await.expect("csv");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "day,requests,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,saved_cost_usd");
    assert_eq!(lines.len(), 2, "one day: {text}");
    let cells: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(cells.len(), 8);
    assert_eq!((cells[6], cells[7]), ("0", "0"), "no cache hits");
    assert_eq!(cells[1], "3");
    assert_eq!(cells[2].parse::<u64>().ok(), Some(expected_input));
    assert!((cells[5].parse::<f64>().unwrap_or(-1.0) - expected_cost).abs() < 1e-9);

    for bad in ["group_by=week", "from=yesterday", "format=xml", "key_id=bad%20id"] {
        let response = admin(reqwest::Method::GET, &format!("/admin/usage?{bad}"), None).await;
        assert_eq!(response.status(), 400, "{bad}");
        assert_openai_error(&response.json().await.expect("json"));
    }

    // The owner's own view.
    let own = gateway().own_usage(a["key"].as_str().expect("key")).await;
    assert_eq!(own["key_id"], a["id"]);
    assert_eq!(own["usage_this_period"]["requests"], 2);
    assert_eq!(own["limits"]["requests_per_window"], 60, "the gateway default");
    assert_eq!(own["current"]["requests"]["remaining"], 58);
}

#[tokio::test]
async fn admin_auth_is_required() {
    let no_key = client().get(gateway().url("/admin/keys")).send().await.expect("reachable");
    assert_eq!(no_key.status(), 401);
    assert_openai_error(&no_key.json().await.expect("json"));
    for wrong in ["adm-test-key-7f3e9c1", "adm-test-key-7f3e9c1bX", "", gateway().key("regular").secret.as_str()] {
        let response = client()
            .post(gateway().url("/admin/keys"))
            .bearer_auth(wrong)
            .json(&json!({"user_id": "x"}))
            .send()
            .await
            .expect("reachable");
        assert_eq!(response.status(), 401, "{wrong:?}");
    }
}

#[tokio::test]
async fn without_an_admin_key_the_admin_api_does_not_exist() {
    let gw = Gateway::start(GatewayOptions::default().store(STORE));
    let response = client().get(gw.url("/admin/keys")).bearer_auth("anything").send().await.expect("reachable");
    assert_eq!(response.status(), 404);
    assert_openai_error(&response.json().await.expect("json"));
}

#[tokio::test]
async fn allowed_models_are_enforced_and_changes_apply_at_once() {
    let created = create(json!({"user_id": user("models"), "allowed_models": ["openai/gpt-4o-mini"]})).await;
    let key = created["key"].as_str().expect("key");
    assert_eq!(chat(key, "openai/gpt-4o-mini").await.status(), 200);
    let forbidden = chat(key, "anthropic/claude-3.5-sonnet").await;
    assert_eq!(forbidden.status(), 403);
    let body: Value = forbidden.json().await.expect("json");
    assert_eq!(assert_openai_error(&body)["code"], "model_not_allowed");
    assert_eq!(body["error"]["param"], "model");
    let fallback = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "openai/gpt-4o-mini", "models": ["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"],
                      "messages": [{"role": "user", "content": "hi"}], "standin": {}}))
        .send()
        .await
        .expect("reachable");
    assert_eq!(fallback.status(), 403, "a fallback model must be allowed too");

    let id = created["id"].as_str().expect("id");
    let cleared =
        admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(json!({"allowed_models": null}))).await;
    assert_eq!(cleared.status(), 200);
    assert_eq!(chat(key, "anthropic/claude-3.5-sonnet").await.status(), 200);
}

#[tokio::test]
async fn bad_admin_input_is_a_400_and_unknown_keys_a_404() {
    let cases = [
        json!({"rpm": 5}),
        json!({"user_id": "u", "rpm": "fast"}),
        json!({"user_id": "u", "rpm": 0}),
        json!({"user_id": "u", "tpm": 1.5}),
        json!({"user_id": "u", "budget_period": "week"}),
        json!({"user_id": "u", "usd_limit": -1}),
        json!({"user_id": "u", "allowed_models": "all"}),
        json!({"user_id": "u", "key": "sk-chosen-by-me"}),
    ];
    for body in cases {
        let response = admin(reqwest::Method::POST, "/admin/keys", Some(body.clone())).await;
        assert_eq!(response.status(), 400, "{body}");
        let error = response.json::<Value>().await.expect("json");
        assert!(assert_openai_error(&error)["param"].is_string(), "{error}");
    }
    let raw = client()
        .post(gateway().url("/admin/keys"))
        .bearer_auth(ADMIN_KEY)
        .body("{oops")
        .send()
        .await
        .expect("reachable");
    assert_eq!(raw.status(), 400);
    assert_eq!(admin(reqwest::Method::GET, "/admin/keys/no-such-key", None).await.status(), 404);
    assert_eq!(admin(reqwest::Method::DELETE, "/admin/keys/no-such-key", None).await.status(), 404);
    assert_eq!(admin(reqwest::Method::GET, "/admin/keys/bad%20id", None).await.status(), 400);
    let created = create(json!({"user_id": user("bad")})).await;
    let id = created["id"].as_str().expect("id");
    for body in [json!({}), json!({"user_id": "someone-else"}), json!({"active": "no"}), json!({"rpm": -5})] {
        let response = admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(body.clone())).await;
        assert_eq!(response.status(), 400, "{body}");
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("node")
        .arg(repo_root().join("scripts/keys.mjs"))
        .args(["--url", &gateway().base])
        .args(args)
        .env("ADMIN_API_KEY", ADMIN_KEY)
        .output()
        .expect("node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_keys_cli_manages_keys_for_people_and_scripts() {
    let owner = user("cli");
    let (ok, out, err) = cli(&["create", "--user", &owner, "--rpm", "120", "--models", "openai/gpt-4o-mini", "--json"]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["rpm"], 120);
    assert_eq!(created["allowed_models"], json!(["openai/gpt-4o-mini"]));
    assert_eq!(chat(created["key"].as_str().expect("key"), "openai/gpt-4o-mini").await.status(), 200);

    let (ok, out, _) = cli(&["list", "--user", &owner]);
    assert!(ok);
    assert!(out.lines().next().is_some_and(|h| h.starts_with("id")), "a table for people:\n{out}");
    assert!(out.contains(&id));

    let (ok, out, _) = cli(&["update", &id, "--rpm", "none", "--json"]);
    assert!(ok);
    assert!(serde_json::from_str::<Value>(&out).expect("json")[0]["rpm"].is_null());

    // The response cache's settings.
    let (ok, out, err) =
        cli(&["update", &id, "--cache-ttl", "600", "--cache-scope", "user", "--cache-sampled", "true", "--json"]);
    assert!(ok, "{err}");
    let updated = &serde_json::from_str::<Value>(&out).expect("json")[0];
    assert_eq!(
        (updated["cache_ttl_seconds"].as_u64(), updated["cache_scope"].as_str(), updated["cache_sampled"].as_bool()),
        (Some(600), Some("user"), Some(true))
    );
    let (ok, out, _) = cli(&["update", &id, "--cache-ttl", "none", "--json"]);
    assert!(ok);
    assert!(serde_json::from_str::<Value>(&out).expect("json")[0]["cache_ttl_seconds"].is_null());
    let (ok, _, err) = cli(&["update", &id, "--cache-scope", "world"]);
    assert!(!ok);
    assert!(err.contains("cache_scope"), "{err}");

    let (ok, out, _) = cli(&["revoke", &id, "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).expect("json")[0]["active"], false);

    let (ok, out, _) = cli(&["usage", "--user", &owner, "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).expect("json")["object"], "usage_report");

    let (ok, _, err) = cli(&["create"]);
    assert!(!ok);
    assert!(err.contains("--user"), "{err}");
    let (ok, _, err) = cli(&["show", "no-such-key"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
}

#[tokio::test]
async fn a_key_inserted_by_hand_with_the_original_columns_gets_an_id_and_works() {
    // The original design's insert: key_hash, user_id, active — no id.
    let secret = format!("sk-by-hand-{}", random_hex(16));
    let owner = user("hand");
    gateway().db(&format!(
        "INSERT INTO api_keys (key_hash, user_id, active) VALUES ('{}', '{owner}', 1)",
        sha256_hex(&secret)
    ));
    let rows = gateway().db(&format!("SELECT id FROM api_keys WHERE user_id = '{owner}'"));
    let id = rows[0]["id"].as_str().expect("an id was generated").to_owned();
    assert_eq!(id.len(), 12, "twelve hex digits, like the admin API's ids: {id}");
    let response = chat(&secret, "openai/gpt-4o-mini").await;
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = gateway().db(&format!("SELECT key_id FROM usage_logs WHERE user_id = '{owner}'"));
        if let Some(row) = rows.first() {
            assert_eq!(row["key_id"], id.as_str(), "billed to the generated id");
            break;
        }
        assert!(Instant::now() < deadline, "the request was never billed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn auth_reads_keys_from_the_store_and_refuses_unknown_and_revoked_ones() {
    let created = create(json!({"user_id": user("auth")})).await;
    let key = created["key"].as_str().expect("key").to_owned();
    let id = created["id"].as_str().expect("id");
    // Revoked in the store by hand before it was ever used: no cache anywhere knows it, so the next lookup reads
    // the row and refuses it.
    gateway().db(&format!("UPDATE api_keys SET active = 0 WHERE id = '{id}'"));
    for (secret, case) in [(key.as_str(), "revoked"), ("sk-gw-unknown-0000", "unknown")] {
        let response = chat(secret, "openai/gpt-4o-mini").await;
        assert_eq!(response.status(), 401, "{case}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(assert_openai_error(&body)["code"], "invalid_api_key", "{case}");
    }
    assert_eq!(chat(&gateway().key("regular").secret, "openai/gpt-4o-mini").await.status(), 200);
}
