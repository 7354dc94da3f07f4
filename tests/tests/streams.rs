//! The two stream relays. A stream that needs no edit (the client asked for `stream_options.include_usage`) goes
//! on the runtime's own pipe and the gateway reads a copy; what that path guarantees where the edited path would
//! add an error event: a silent upstream is aborted and the client's stream ends there, a cut-off ends it where the
//! upstream broke, both without `[DONE]` and without a finish reason; garbage reaches the client as sent. Every one
//! of them is still billed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        Gateway::start(
            GatewayOptions::default()
                .var("RATE_LIMIT_PER_MINUTE", 100_000)
                .var("UPSTREAM_TIMEOUT_SECONDS", 2)
                .keys(&["reader"]),
        )
    })
}

fn body(include_usage: bool, standin: Value) -> Value {
    json!({"messages": [{"role": "user", "content": "stream this"}], "stream": true,
        "stream_options": {"include_usage": include_usage}, "standin": standin})
}

/// Sends a stream and reads it to its end: the status, what arrived, and whether reading failed.
async fn stream(id: &str, body: &Value) -> (u16, String, bool) {
    let mut response = client()
        .post(gateway().url("/v1/chat/completions"))
        .bearer_auth(&gateway().key("reader").secret)
        .header("x-request-id", id)
        .json(body)
        .send()
        .await
        .expect("reachable");
    let status = response.status().as_u16();
    let mut text = String::new();
    let failed = loop {
        match tokio::time::timeout(Duration::from_secs(20), response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => break false,
            Ok(Err(_)) => break true,
            Err(_) => panic!("{id}: the stream neither ended nor failed within 20 s: {text}"),
        }
    };
    (status, text, failed)
}

/// The request's log line, once written.
async fn log_line(client_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = gateway().request_logs().into_iter().find(|l| l["client_request_id"] == client_id) {
            return line;
        }
        assert!(Instant::now() < deadline, "no log line for {client_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The request's ledger row, once written.
async fn ledger_row(client_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = gateway().d1(&format!("SELECT * FROM usage_logs WHERE client_request_id = '{client_id}'"));
        if let Some(row) = rows.into_iter().next() {
            return row;
        }
        assert!(Instant::now() < deadline, "no ledger row for {client_id}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn id(case: &str) -> String {
    format!("{case}-{}", random_hex(4))
}

#[tokio::test]
async fn a_stream_that_needs_no_edit_is_the_upstream_s_own_bytes() {
    let (native, edited) = (id("native"), id("edited"));
    let (status, text, failed) = stream(&native, &body(true, json!({"chunks": 30}))).await;
    assert!(status == 200 && !failed);
    let events = parse_sse(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).expect("the usage chunk");
    assert_eq!(usage["choices"], json!([]), "the usage-only chunk, as asked for");
    let line = log_line(&native).await;
    assert_eq!((line["relay"].as_str(), line["stream_end"].as_str()), (Some("native"), Some("done")), "{line}");
    assert_eq!(line["wasm_bytes_out"], 0, "nothing was written for the client");
    let row = ledger_row(&native).await;
    assert_eq!(
        (row["usage_source"].as_str(), row["output_tokens"].clone()),
        (Some("reported"), usage["usage"]["completion_tokens"].clone())
    );
    assert!(row["ttft_ms"].is_u64());

    // Without include_usage the stream is edited (the usage chunk is removed), and billed the same way.
    let (_, text, _) = stream(&edited, &body(false, json!({"chunks": 30}))).await;
    assert!(!text.contains("\"choices\":[]"));
    assert_eq!(log_line(&edited).await["relay"], "edited");
    assert_eq!(ledger_row(&edited).await["usage_source"], "reported");
}

/// What a client of the native path sees of an upstream that failed: the events sent before, then the end of the
/// body, with no `[DONE]` and no finish reason. (The runtime ends a response body that failed like one that
/// finished: workerd writes the last chunk and closes the connection.)
fn assert_ended_unfinished(text: &str) {
    assert!(text.contains("\"content\""), "what came before was delivered: {text}");
    assert!(!text.contains("[DONE]"), "{text}");
    for event in parse_sse(text) {
        let chunk: Value = serde_json::from_str(&event).expect("only the upstream's own events");
        assert!(chunk["choices"][0]["finish_reason"].is_null(), "no finish reason: {event}");
    }
}

#[tokio::test]
async fn on_the_native_path_a_silent_upstream_is_aborted_and_the_client_s_stream_ends_unfinished() {
    let case = id("silent");
    gateway(); // started (on first use) before the clock starts
    let started = Instant::now();
    let (status, text, _) =
        stream(&case, &body(true, json!({"chunks": 10, "pause_after": 2, "pause_ms": 30000}))).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(15), "aborted after UPSTREAM_TIMEOUT_SECONDS (2 s)");
    assert_ended_unfinished(&text);
    assert_eq!(log_line(&case).await["stream_end"], "cut_off");
    assert!(ledger_row(&case).await["output_tokens"].as_u64().is_some_and(|n| n > 0), "billed what was generated");
}

#[tokio::test]
async fn on_the_native_path_a_cut_off_ends_the_client_s_stream_unfinished() {
    let case = id("cut");
    let (status, text, _) = stream(&case, &body(true, json!({"scenario": "disconnect", "after_chunks": 3}))).await;
    assert_eq!(status, 200);
    assert_ended_unfinished(&text);
    assert_eq!(log_line(&case).await["stream_end"], "cut_off");
    assert!(ledger_row(&case).await["output_tokens"].as_u64().is_some_and(|n| n > 0));
}

#[tokio::test]
async fn on_the_native_path_garbage_reaches_the_client_as_sent_and_is_billed() {
    let case = id("garbage");
    let (status, text, _) = stream(&case, &body(true, json!({"scenario": "garbage", "after_chunks": 2}))).await;
    assert_eq!(status, 200);
    assert!(text.contains("data: {not json at all"), "passed as sent: {text}");
    assert_eq!(log_line(&case).await["stream_end"], "malformed");
    let row = ledger_row(&case).await;
    assert!(row["output_tokens"].as_u64().is_some_and(|n| n > 0), "{row}");
}
