//! The chat-completions path end to end: auth, validation, pass-through, streaming and non-streaming answers,
//! upstream failures before and during a stream, and what the gateway logs.

use std::sync::OnceLock;
use std::time::Duration;

use gateway_tests::*;
use serde_json::Value;

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default().var("RATE_LIMIT_PER_MINUTE", 100_000).keys(&["alice", "bob", "revoked"]),
        )
    })
}

fn revoked_key() -> &'static TestKey {
    static REVOKED: OnceLock<TestKey> = OnceLock::new();
    REVOKED.get_or_init(|| {
        let gw = gateway();
        let key = gw.key("revoked").clone();
        gw.d1(&format!("UPDATE api_keys SET active = 0 WHERE id = '{}'", key.id));
        key
    })
}

async fn post(key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = client().post(gateway().url("/v1/chat/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("gateway reachable")
}

fn alice() -> &'static str {
    &gateway().key("alice").secret
}

/// A unique marker carried in the request so this test can find its own upstream requests.
fn marker() -> String {
    format!("m-{}", random_hex(6))
}

fn hello(marker: &str) -> Value {
    json!([{"role": "user", "content": format!("hello {marker}")}])
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

#[tokio::test]
async fn non_streamed_completion_is_returned_with_usage() {
    let m = marker();
    let response = post(Some(alice()), &json!({"model": "openai/gpt-4o-mini", "messages": hello(&m)})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap_or("").starts_with("application/json"));
    assert!(response.headers().contains_key("x-generation-id"));
    let body = json_of(response).await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "openai/gpt-4o-mini");
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(content.contains(&m), "the stand-in echoes the prompt: {content}");
    assert!(body["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0));
}

#[tokio::test]
async fn missing_model_and_max_tokens_get_the_configured_defaults() {
    let m = marker();
    let response = post(Some(alice()), &json!({"messages": hello(&m)})).await;
    assert_eq!(response.status(), 200);
    let sent = gateway().upstream.chat_requests_with(&m).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["body"]["model"], "openai/gpt-4o-mini", "wrangler.toml's DEFAULT_MODEL");
    assert_eq!(sent[0]["body"]["max_tokens"], 4096, "wrangler.toml's MAX_TOKENS_DEFAULT");
}

#[tokio::test]
async fn unknown_and_provider_fields_reach_the_upstream_unchanged() {
    let m = marker();
    let body = json!({
        "model": "anthropic/claude-3.5-sonnet",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": format!("look {m}")},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "models": ["anthropic/claude-3.5-sonnet", "openai/gpt-4o"],
        "provider": {"order": ["anthropic"], "allow_fallbacks": false, "max_price": {"prompt": 1}},
        "plugins": [{"id": "web"}], "route": "fallback", "user": "end-user-7", "seed": 42, "top_p": 0.5,
        "temperature": 0.3, "max_tokens": 77, "x_vendor_extension": {"deep": [1, "two", null, {"three": 3.25}]}
    });
    let response = post(Some(alice()), &body).await;
    assert_eq!(response.status(), 200);
    let sent = gateway().upstream.chat_requests_with(&m).await;
    assert_eq!(sent.len(), 1);
    for (field, value) in body.as_object().expect("object") {
        assert_eq!(&sent[0]["body"][field], value, "field {field} was changed on the way");
    }
    let headers = &sent[0]["headers"];
    assert_eq!(headers["authorization"], format!("Bearer {PROVIDER_KEY}"), "the provider key, not the client's");
    assert!(headers["x-openrouter-title"].is_string());
}

#[tokio::test]
async fn stream_delivers_events_in_order_and_hides_the_usage_chunk_unless_asked() {
    let m = marker();
    let plain = post(Some(alice()), &json!({"messages": hello(&m), "stream": true, "standin": {}})).await;
    assert_eq!(plain.status(), 200);
    assert!(plain.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let events = sse_events(plain).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("JSON event")).collect();
    assert!(chunks.len() >= 3);
    for chunk in &chunks {
        assert!(
            !chunk["choices"].as_array().expect("choices").is_empty(),
            "a client indexing choices[0] would crash on {chunk}"
        );
    }
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(text.contains(&m));

    let with_usage = post(
        Some(alice()),
        &json!({"messages": hello(&m), "stream": true, "stream_options": {"include_usage": true}, "standin": {}}),
    )
    .await;
    let events = sse_events(with_usage).await;
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["total_tokens"].as_u64().is_some_and(|n| n > 0));
    assert!(usage_chunk["usage"]["cost"].is_number());
}

#[tokio::test]
async fn first_event_arrives_while_the_upstream_is_still_generating() {
    let m = marker();
    // The stand-in sends one delta, pauses (long enough that a buffering gateway would show nothing), then goes on
    // for about ten more seconds.
    let body = json!({"messages": hello(&m), "stream": true,
        "standin": {"chunks": 200, "delay_ms": 50, "pause_after": 1, "pause_ms": 2000}});
    let mut response = post(Some(alice()), &body).await;
    assert_eq!(response.status(), 200);
    let mut received = String::new();
    let first_content = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = response.chunk().await.expect("stream readable") {
            received.push_str(&String::from_utf8_lossy(&chunk));
            if received.contains("\"content\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(first_content, Ok(true), "no content before the upstream finished; got {received:?}");
    assert!(!received.contains("[DONE]"));
    drop(response);

    // The client went away mid-stream: the gateway notices at its next write and cancels the upstream generation,
    // long before the upstream would have finished on its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let aborted = gateway().upstream.stats().await["aborted_streams"].as_u64().unwrap_or(0);
        if aborted >= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "upstream stream was not cancelled after the client left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn auth_rejects_missing_malformed_unknown_and_revoked_keys() {
    let m = marker();
    let body = json!({"messages": hello(&m)});
    let revoked = revoked_key().secret.clone();
    let cases: [(Option<&str>, &str); 4] = [
        (None, "missing"),
        (Some("not-a-real-key"), "unknown"),
        (Some(&revoked), "revoked"),
        (Some("sk-gw-x y"), "malformed"),
    ];
    for (key, case) in cases {
        let response = post(key, &body).await;
        assert_eq!(response.status(), 401, "{case}");
        let body = json_of(response).await;
        assert_eq!(assert_openai_error(&body)["code"], "invalid_api_key", "{case}");
    }
    let basic = client()
        .post(gateway().url("/v1/chat/completions"))
        .header("authorization", format!("Basic {}", alice()))
        .json(&body)
        .send()
        .await
        .expect("reachable");
    assert_eq!(basic.status(), 401);
    assert!(gateway().upstream.chat_requests_with(&m).await.is_empty(), "nothing unauthenticated reached the upstream");
    // A different valid key still works.
    assert_eq!(post(Some(&gateway().key("bob").secret), &body).await.status(), 200);
}

#[tokio::test]
async fn every_validation_error_is_a_400_naming_the_parameter() {
    let m = marker();
    let ok_messages = hello(&m);
    let cases = [
        (json!({"model": "x"}), Some("messages")),
        (json!({"messages": []}), Some("messages")),
        (json!({"messages": "hi"}), Some("messages")),
        (json!({"messages": ["hi"]}), Some("messages[0]")),
        (json!({"messages": [{"content": "no role"}]}), Some("messages[0].role")),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), Some("messages[0].role")),
        (json!({"messages": ok_messages, "temperature": 2.5}), Some("temperature")),
        (json!({"messages": ok_messages, "temperature": "warm"}), Some("temperature")),
        (json!({"messages": ok_messages, "max_tokens": 0}), Some("max_tokens")),
        (json!({"messages": ok_messages, "max_tokens": 65537}), Some("max_tokens")),
        (json!({"messages": ok_messages, "max_completion_tokens": -3}), Some("max_completion_tokens")),
        (json!({"messages": ok_messages, "model": 7}), Some("model")),
        (json!({"messages": ok_messages, "model": "openai/gpt-4o-mini\r\nx: y"}), Some("model")),
        (json!({"messages": ok_messages, "models": ["a/b", 7]}), Some("models[1]")),
        (json!({"messages": ok_messages, "models": "a/b"}), Some("models")),
        (json!({"messages": ok_messages, "n": 0}), Some("n")),
        (json!({"messages": ok_messages, "stream": "yes"}), Some("stream")),
        (
            json!({"messages": ok_messages, "stream_options": {"include_usage": "yes"}}),
            Some("stream_options.include_usage"),
        ),
        (json!([1, 2, 3]), None),
    ];
    for (body, param) in cases {
        let response = post(Some(alice()), &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let parsed = json_of(response).await;
        let error = assert_openai_error(&parsed);
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"].as_str(), param, "{body}");
    }
    for raw in ["{not json", "", "\u{0}\u{1}"] {
        let response = client()
            .post(gateway().url("/v1/chat/completions"))
            .bearer_auth(alice())
            .header("content-type", "application/json")
            .body(raw.to_owned())
            .send()
            .await
            .expect("reachable");
        assert_eq!(response.status(), 400, "{raw:?}");
        assert_openai_error(&json_of(response).await);
    }
    assert!(gateway().upstream.chat_requests_with(&m).await.is_empty(), "invalid requests must not be forwarded");
}

#[tokio::test]
async fn upstream_errors_keep_their_status_as_openai_errors() {
    for (status, retry_after) in
        [(429u16, Some(7u64)), (400, None), (402, None), (404, None), (502, None), (503, Some(2))]
    {
        let mut standin = json!({"scenario": "error", "status": status});
        if let Some(secs) = retry_after {
            standin["retry_after"] = json!(secs);
        }
        let response = post(Some(alice()), &json!({"messages": hello(&marker()), "standin": standin})).await;
        assert_eq!(response.status().as_u16(), status);
        let header_retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(header_retry, retry_after.map(|s| s.to_string()), "status {status}");
        if let Some(secs) = retry_after {
            assert_eq!(response.headers()["retry-after-ms"], (secs * 1000).to_string().as_str());
        }
        let body = json_of(response).await;
        let error = assert_openai_error(&body);
        assert!(error["message"].as_str().unwrap_or("").contains("Upstream provider error"), "{body}");
    }
    // The provider rejecting the gateway's own key is not the client's authentication failure.
    let response =
        post(Some(alice()), &json!({"messages": hello(&marker()), "standin": {"scenario": "error", "status": 401}}))
            .await;
    assert_eq!(response.status(), 502);
    assert_eq!(assert_openai_error(&json_of(response).await)["code"], "upstream_auth_failed");
}

#[tokio::test]
async fn garbage_from_the_upstream_is_a_502_or_an_error_event() {
    let response =
        post(Some(alice()), &json!({"messages": hello(&marker()), "standin": {"scenario": "garbage"}})).await;
    assert_eq!(response.status(), 502);
    assert_eq!(assert_openai_error(&json_of(response).await)["code"], "upstream_malformed_response");

    let response = post(
        Some(alice()),
        &json!({"messages": hello(&marker()), "stream": true, "standin": {"scenario": "garbage", "after_chunks": 2}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    let parsed: Vec<Value> =
        events.iter().map(|e| serde_json::from_str(e).expect("every event the client sees is JSON")).collect();
    assert_eq!(parsed.len(), 3, "two good chunks, then the error: {events:?}");
    assert_eq!(parsed[2]["error"]["code"], "upstream_malformed_response");
}

#[tokio::test]
async fn mid_stream_upstream_error_reaches_the_client_as_an_sdk_error_event() {
    let response = post(
        Some(alice()),
        &json!({"messages": hello(&marker()), "stream": true, "standin": {"scenario": "midstream_error", "after_chunks": 2}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert!(last["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{last}");
    assert_eq!(events.len(), 3);
}

#[tokio::test]
async fn upstream_disconnects_are_reported_not_silently_truncated() {
    let response = post(
        Some(alice()),
        &json!({"messages": hello(&marker()), "stream": true, "standin": {"scenario": "disconnect", "after_chunks": 2}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "upstream_cut_off");

    let response =
        post(Some(alice()), &json!({"messages": hello(&marker()), "standin": {"scenario": "disconnect"}})).await;
    assert_eq!(response.status(), 502);
    assert_openai_error(&json_of(response).await);
}

#[tokio::test]
async fn each_request_logs_one_structured_line_and_no_secret_anywhere() {
    let id = format!("trace-{}", random_hex(6));
    let m = marker();
    let response = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(alice())
        .header("x-request-id", &id)
        .json(&json!({"messages": hello(&m), "stream": true, "standin": {}}))
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.headers()["x-client-request-id"], id.as_str());
    let own_id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert!(own_id.starts_with("req_"));
    let body = response.text().await.expect("body");
    assert!(!body.contains(PROVIDER_KEY));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let lines: Vec<Value> =
            gateway().request_logs().into_iter().filter(|l| l["request_id"] == own_id.as_str()).collect();
        if let Some(line) = lines.first() {
            assert_eq!(lines.len(), 1, "exactly one line per request");
            break line.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no log line for {id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(line["client_request_id"], id.as_str(), "the client's id is logged beside the gateway's");
    assert_eq!(line["key_id"], gateway().key("alice").id.as_str());
    assert_eq!(line["model"], "openai/gpt-4o-mini");
    assert_eq!(line["status"], 200);
    assert_eq!(line["streamed"], true);
    assert_eq!(line["stream_end"], "done");
    assert!(line["latency_ms"].is_u64());
    assert!(line["completion_tokens"].as_u64().is_some_and(|n| n > 0));

    let logs = gateway().logs();
    for secret in [PROVIDER_KEY, alice(), gateway().key("bob").secret.as_str()] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
    assert!(!logs.contains(&m), "prompts are not logged");
}
