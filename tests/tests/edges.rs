//! Everything around the chat path: health, routing errors, body limits, timeouts, key revocation, the model
//! list cache, CORS and the headers every response carries.

use std::sync::OnceLock;
use std::time::Duration;

use gateway_tests::*;
use serde_json::Value;

const ORIGIN: &str = "https://app.example.com";

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .keys(&["carol", "dave"])
                .var("UPSTREAM_TIMEOUT_SECONDS", 2)
                .var("CLIENT_BODY_TIMEOUT_SECONDS", 2)
                .var("AUTH_CACHE_TTL_SECONDS", 2)
                .var("CACHE_TTL_SECONDS", 5)
                .var("MAX_REQUEST_BYTES", 65536)
                .var("ALLOWED_ORIGINS", format!("http://localhost:3000,{ORIGIN}")),
        )
    })
}

fn carol() -> &'static str {
    &gateway().key("carol").secret
}

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "standin": {}})
}

async fn chat_as(key: &str, body: &Value) -> reqwest::Response {
    client().post(gateway().url("/v1/chat/completions")).bearer_auth(key).json(body).send().await.expect("reachable")
}

async fn models(key: &str) -> reqwest::Response {
    client().get(gateway().url("/v1/models")).bearer_auth(key).send().await.expect("reachable")
}

async fn models_fetches() -> u64 {
    gateway().upstream.stats().await["models"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn health_needs_no_key() {
    let response = client().get(gateway().url("/health")).send().await.expect("reachable");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_openai_errors() {
    let response = client().get(gateway().url("/v1/engines")).send().await.expect("reachable");
    assert_eq!(response.status(), 404);
    assert_openai_error(&response.json().await.expect("json"));

    let response =
        client().get(gateway().url("/v1/chat/completions")).bearer_auth(carol()).send().await.expect("reachable");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_openai_error(&response.json().await.expect("json"));

    let response = client().delete(gateway().url("/v1/models")).send().await.expect("reachable");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET");

    // Methods outside HTTP's usual set are refused too, not served as GET.
    for method in ["PROPFIND", "MKCOL"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = client()
            .request(method.clone(), gateway().url("/v1/models"))
            .bearer_auth(carol())
            .send()
            .await
            .expect("reachable");
        assert_eq!(response.status(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "GET");
        assert_openai_error(&response.json().await.expect("json"));
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_body_gets_a_408() {
    // One chunk, then silence far longer than CLIENT_BODY_TIMEOUT_SECONDS (2 s here).
    let chunks = futures_util::stream::unfold(0, |n| async move {
        match n {
            0 => Some((Ok::<_, std::io::Error>(b"{\"messages\": [".to_vec()), 1)),
            _ => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                None
            }
        }
    });
    // The gateway is started (on first use) before the clock starts.
    let url = gateway().url("/v1/chat/completions");
    let started = std::time::Instant::now();
    let response = client()
        .post(url)
        .bearer_auth(carol())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("an answer before the body ends");
    assert_eq!(response.status(), 408);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(assert_openai_error(&response.json().await.expect("json"))["code"], "request_timeout");
}

#[tokio::test]
async fn upstream_bodies_are_read_within_the_timeout_and_size_cap() {
    // A completion whose body stops half-way: 504, and the upstream request is aborted.
    let mut body = chat_body();
    body["standin"] = json!({"scenario": "stall_body"});
    gateway(); // started (on first use) before the clock starts
    let started = std::time::Instant::now();
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(assert_openai_error(&response.json().await.expect("json"))["code"], "upstream_timeout");

    // An error whose body stalls: the status still reaches the client, within the timeout.
    body["standin"] = json!({"scenario": "error", "status": 503, "stall_error_body": true});
    let started = std::time::Instant::now();
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_openai_error(&response.json().await.expect("json"));

    // A huge error body: read up to the cap, its message still shown (cut).
    body["standin"] = json!({"scenario": "error", "status": 400, "error_body_bytes": 5_000_000});
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.len() < 1000));
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413_declared_or_not() {
    let mut body = chat_body();
    body["padding"] = json!("x".repeat(70_000));
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 413);
    assert_eq!(assert_openai_error(&response.json().await.expect("json"))["code"], "request_too_large");

    // Chunked upload without Content-Length: the limit is enforced while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..10).map(|_| Ok(vec![b' '; 8192])).collect();
    let stream = futures_util::stream::iter(chunks);
    let response = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(carol())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504() {
    let mut body = chat_body();
    body["standin"] = json!({"scenario": "hang"});
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 504);
    assert_eq!(assert_openai_error(&response.json().await.expect("json"))["code"], "upstream_timeout");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    // A second gateway whose upstream address refuses connections.
    let closed_port = free_port();
    let gw = Gateway::start(
        GatewayOptions::default()
            .var("RATE_LIMIT_PER_MINUTE", 100_000)
            .keys(&["erin"])
            .var("OPENROUTER_BASE_URL", format!("http://127.0.0.1:{closed_port}/api/v1")),
    );
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&gw.key("erin").secret)
        .json(&chat_body())
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.status(), 502);
    assert_eq!(assert_openai_error(&response.json().await.expect("json"))["code"], "upstream_unreachable");
}

#[tokio::test]
async fn a_revoked_key_stops_working_within_the_auth_cache_ttl() {
    let dave = gateway().key("dave").clone();
    let ok = chat_as(&dave.secret, &chat_body()).await;
    assert_eq!(ok.status(), 200, "the key works (and is now cached)");

    gateway().d1(&format!("UPDATE api_keys SET active = 0 WHERE id = '{}'", dave.id));
    let revoked_at = tokio::time::Instant::now();
    loop {
        let response = chat_as(&dave.secret, &chat_body()).await;
        if response.status() == 401 {
            break;
        }
        assert_eq!(response.status(), 200);
        // AUTH_CACHE_TTL_SECONDS is 2; allow generous slack for a busy machine.
        assert!(revoked_at.elapsed() < Duration::from_secs(10), "revoked key still accepted after the cache TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn model_list_is_openai_shaped_and_cached() {
    let first = models(carol()).await;
    assert_eq!(first.status(), 200);
    let body: Value = first.json().await.expect("json");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().expect("data");
    assert!(!data.is_empty());
    for model in data {
        assert_eq!(model["object"], "model");
        assert!(model["id"].is_string() && model["owned_by"].is_string() && model["created"].is_i64());
    }
    let fetched = models_fetches().await;
    for _ in 0..5 {
        assert_eq!(models(carol()).await.status(), 200);
    }
    assert_eq!(models_fetches().await, fetched, "served from the cache within CACHE_TTL_SECONDS");

    // After the TTL (5 s) the next request refreshes the cache.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(models(carol()).await.status(), 200);
    assert_eq!(models_fetches().await, fetched + 1);

    let anonymous = client().get(gateway().url("/v1/models")).send().await.expect("reachable");
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let allowed = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(carol())
        .header("origin", ORIGIN)
        .json(&chat_body())
        .send()
        .await
        .expect("reachable");
    assert_eq!(allowed.headers()["access-control-allow-origin"], ORIGIN);
    let exposed = allowed.headers()["access-control-expose-headers"].to_str().unwrap_or("");
    assert!(exposed.contains("x-request-id"));

    let denied = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(carol())
        .header("origin", "https://evil.example.com")
        .json(&chat_body())
        .send()
        .await
        .expect("reachable");
    assert_eq!(denied.status(), 200, "CORS is the browser's business; the request itself is fine");
    assert!(denied.headers().keys().all(|h| !h.as_str().starts_with("access-control-")));

    let preflight = client()
        .request(reqwest::Method::OPTIONS, gateway().url("/v1/chat/completions"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type, x-stainless-os")
        .send()
        .await
        .expect("reachable");
    assert_eq!(preflight.status(), 204);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert!(headers["access-control-allow-methods"].to_str().unwrap_or("").contains("POST"));
    assert!(headers["access-control-allow-headers"].to_str().unwrap_or("").contains("x-stainless-os"));

    let denied_preflight = client()
        .request(reqwest::Method::OPTIONS, gateway().url("/v1/chat/completions"))
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("reachable");
    assert!(denied_preflight.headers().keys().all(|h| !h.as_str().starts_with("access-control-")));
}

#[tokio::test]
async fn every_response_carries_security_headers_and_a_request_id() {
    let c = client();
    let responses = vec![
        c.get(gateway().url("/health")).send().await,
        c.get(gateway().url("/nope")).send().await,
        c.get(gateway().url("/v1/models")).send().await,
        c.post(gateway().url("/v1/chat/completions")).bearer_auth(carol()).json(&chat_body()).send().await,
        c.post(gateway().url("/v1/chat/completions")).bearer_auth(carol()).json(&json!({})).send().await,
        c.request(reqwest::Method::OPTIONS, gateway().url("/v1/models")).header("origin", ORIGIN).send().await,
    ];
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.expect("reachable");
        let h = response.headers();
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(h["strict-transport-security"].to_str().unwrap_or("").contains("max-age="));
        assert!(h["content-security-policy"].to_str().unwrap_or("").contains("default-src 'none'"));
        let id = h["x-request-id"].to_str().unwrap_or("").to_owned();
        assert!(id.starts_with("req_"), "{id}");
        assert!(ids.insert(id), "request ids are unique");
    }

    // A client's id is echoed beside the gateway's own, which it never replaces.
    let echoed =
        c.get(gateway().url("/health")).header("x-request-id", "client-id-42").send().await.expect("reachable");
    assert_eq!(echoed.headers()["x-client-request-id"], "client-id-42");
    assert!(echoed.headers()["x-request-id"].to_str().unwrap_or("").starts_with("req_"));
    let preferred = c
        .get(gateway().url("/health"))
        .header("x-request-id", "from-x-request-id")
        .header("x-client-request-id", "from-x-client-request-id")
        .send()
        .await
        .expect("reachable");
    assert_eq!(preferred.headers()["x-client-request-id"], "from-x-client-request-id");
    let insane =
        c.get(gateway().url("/health")).header("x-request-id", "bad id; with spaces").send().await.expect("reachable");
    assert!(insane.headers().get("x-client-request-id").is_none(), "an unsafe id is neither echoed nor kept");
    assert!(insane.headers()["x-request-id"].to_str().unwrap_or("").starts_with("req_"));
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_with_an_error_event() {
    // UPSTREAM_TIMEOUT_SECONDS is 2 here; the stand-in falls silent for 30 s after two deltas.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true,
        "standin": {"chunks": 5, "pause_after": 2, "pause_ms": 30000}});
    let response = chat_as(carol(), &body).await;
    assert_eq!(response.status(), 200);
    let events = tokio::time::timeout(Duration::from_secs(20), sse_events(response)).await.expect("the stream ends");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "upstream_cut_off", "{events:?}");
    assert!(events.len() >= 3, "the deltas before the silence were delivered: {events:?}");
}
