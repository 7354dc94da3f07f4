//! Exactly one ledger row per admitted request, however the client leaves — before the first byte, after the
//! first chunk, mid-stream, just before `[DONE]`, many at once — in both local runtimes: Miniflare (what the other
//! tests drive) and the `npm run dev` path (`scripts/dev.mjs`, wrangler's dev server). Every reservation is
//! settled, and every abandoned answer ends up billed with what the upstream really generated (reconciled).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway_tests::*;
use serde_json::Value;

fn options() -> GatewayOptions {
    GatewayOptions::default()
        .var("RATE_LIMIT_PER_MINUTE", 100_000)
        // Generous: on a loaded two-core machine an upstream answer can take seconds, and a timeout before the
        // answer's headers leaves nothing to reconcile.
        .var("UPSTREAM_TIMEOUT_SECONDS", 60)
        .keys(&["leaver"])
        .posthog(&[])
}

fn miniflare() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options()))
}

fn dev() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options().runtime(Runtime::Dev)))
}

/// Where the client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Leave {
    /// Before the response's first byte (the upstream is still thinking).
    BeforeFirstByte,
    AfterFirstChunk,
    MidStream,
    /// After the finish chunk, before `[DONE]` was read.
    BeforeDone,
    /// A fast 2,000-chunk stream left after its first chunk.
    FastStream,
    /// Not at all: the whole answer is read.
    Never,
}

const MIX: [Leave; 6] = [
    Leave::BeforeFirstByte,
    Leave::AfterFirstChunk,
    Leave::MidStream,
    Leave::BeforeDone,
    Leave::FastStream,
    Leave::Never,
];

/// `native`: the client asks for the usage chunk, so the stream needs no edit and goes on the runtime's pipe.
fn body(leave: Leave, text: &str, native: bool) -> Value {
    let standin = match leave {
        Leave::BeforeFirstByte => json!({"delay_ms": 1500}),
        Leave::AfterFirstChunk => json!({"chunks": 60, "delay_ms": 20, "pause_after": 2, "pause_ms": 800}),
        Leave::MidStream => json!({"chunks": 200, "delay_ms": 5}),
        Leave::BeforeDone => json!({"chunks": 10, "delay_ms": 5}),
        Leave::FastStream => json!({"chunks": 2000, "delay_ms": 0}),
        Leave::Never => json!({"chunks": 20, "delay_ms": 2}),
    };
    json!({"messages": [{"role": "user", "content": text}], "stream": leave != Leave::BeforeFirstByte,
        "stream_options": {"include_usage": native}, "max_tokens": 4000, "standin": standin})
}

/// Sends one request and leaves where `leave` says.
async fn one(gw: &Gateway, key: &str, id: String, leave: Leave, native: bool) {
    let timeout = if leave == Leave::BeforeFirstByte { Duration::from_millis(300) } else { Duration::from_secs(60) };
    let http = reqwest::Client::builder().timeout(timeout).build().expect("client");
    let sent = http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", &id)
        .json(&body(leave, "tell me a long story", native))
        .send()
        .await;
    let mut response = match (leave, sent) {
        (Leave::BeforeFirstByte, Err(e)) => return assert!(e.is_timeout(), "{id}: {e}"),
        (Leave::BeforeFirstByte, Ok(r)) => panic!("{id}: answered within 300 ms: {}", r.status()),
        (_, Ok(r)) => r,
        (_, Err(e)) => panic!("{id}: {e}"),
    };
    assert_eq!(response.status(), 200, "{id}");
    let mut seen = String::new();
    let mut content_events = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        let text = String::from_utf8_lossy(&chunk);
        content_events += text.matches("\"content\":\"").count();
        seen.push_str(&text);
        let leave_now = match leave {
            Leave::AfterFirstChunk | Leave::FastStream => content_events > 0,
            Leave::MidStream => content_events >= 100,
            Leave::BeforeDone => seen.contains("\"finish_reason\":\"stop\""),
            Leave::Never | Leave::BeforeFirstByte => false,
        };
        if leave_now {
            return; // dropping the response closes the connection
        }
    }
    assert!(seen.contains("data: [DONE]"), "{id}: the whole answer arrived: {}", seen.len());
}

/// What a mix taught: rows ÷ requests, how many rows were reconciled, and the reconciliation lags.
struct Figures {
    requests: usize,
    rows: usize,
    reconciled: usize,
    lags_ms: Vec<f64>,
}

/// One mix at a time: two at once on two cores measure the machine, not the gateway.
static ONE_MIX_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends `rounds` × the mix, `concurrency` at a time, and checks every request's row.
async fn run_mix(gw: &Gateway, rounds: usize, concurrency: usize) -> Figures {
    let _alone = ONE_MIX_AT_A_TIME.lock().await;
    let key = gw.key("leaver").secret.clone();
    let prefix = format!("mix-{}-", random_hex(4));
    // Every other round asks for the usage chunk: its streams go on the native relay, the others are edited.
    let native = |n: usize| (n / MIX.len()) % 2 == 1;
    let requests: Vec<(String, Leave)> = (0..rounds)
        .flat_map(|round| MIX.iter().enumerate().map(move |(i, leave)| (round * MIX.len() + i, *leave)))
        .map(|(n, leave)| (format!("{prefix}{n:04}"), leave))
        .collect();
    for (w, wave) in requests.chunks(concurrency).enumerate() {
        let sent = wave
            .iter()
            .enumerate()
            .map(|(i, (id, leave))| one(gw, &key, id.clone(), *leave, native(w * concurrency + i)));
        join_all(sent).await;
    }

    // Every request was admitted (no limit is near): one row each, none left pending.
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let rows = gw.d1(&format!(
            "SELECT *, (julianday(reconciled_at) - julianday(created_at)) * 86400000.0 - latency_ms AS lag_ms \
             FROM usage_logs WHERE client_request_id LIKE '{prefix}%'"
        ));
        let pending = rows.iter().filter(|r| r["reconcile_state"] == "pending").count();
        if (rows.len() >= requests.len() && pending == 0) || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let by_client_id: HashMap<&str, &Value> =
        rows.iter().map(|r| (r["client_request_id"].as_str().unwrap_or_default(), r)).collect();
    let missing: Vec<&(String, Leave)> =
        requests.iter().filter(|(id, _)| !by_client_id.contains_key(id.as_str())).collect();
    assert!(missing.is_empty(), "requests without a ledger row: {missing:?}");
    assert_eq!(rows.len(), requests.len(), "exactly one row per admitted request");
    let ids: HashSet<&str> = rows.iter().filter_map(|r| r["request_id"].as_str()).collect();
    assert_eq!(ids.len(), rows.len());

    // Each row bills what the upstream generated: reported when the answer was read to its end, reconciled
    // with the upstream's own count when the client left early.
    let generations = gw.upstream.generations().await;
    for (id, leave) in &requests {
        let row = by_client_id[id.as_str()];
        let source = row["usage_source"].as_str().unwrap_or_default();
        assert_ne!(source, "reserved", "{id} ({leave:?}): its Worker never settled it: {row}");
        assert!(row["output_tokens"].as_u64().is_some_and(|n| n > 0), "{id} ({leave:?}) billed nothing: {row}");
        let generation = row["generation_id"].as_str().and_then(|g| generations.get(g));
        let generation = generation.unwrap_or_else(|| panic!("{id} ({leave:?}): no generation for {row}"));
        assert_eq!(row["output_tokens"], generation["tokens_completion"], "{id} ({leave:?}): {row} vs {generation}");
        match leave {
            Leave::Never | Leave::BeforeFirstByte => assert_eq!(source, "reported", "{id} ({leave:?}): {row}"),
            // The answer may have been complete before the relay noticed the client had gone.
            _ => assert!(["reconciled", "reported"].contains(&source), "{id} ({leave:?}): {row}"),
        }
    }

    // Each stream went the way it was meant to.
    let logs = gw.request_logs();
    for (n, (id, leave)) in requests.iter().enumerate() {
        let line = logs.iter().find(|l| l["client_request_id"] == id.as_str());
        let line = line.unwrap_or_else(|| panic!("{id} ({leave:?}): no log line"));
        let expected = match leave {
            Leave::BeforeFirstByte => None,
            _ if native(n) => Some("native"),
            _ => Some("edited"),
        };
        assert_eq!(line["relay"].as_str(), expected, "{id} ({leave:?}): {line}");
    }

    // Every reservation was settled: nothing is left in flight in the key's Durable Object.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let usage = gw.own_usage(&key).await;
        if usage["current"]["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "reservations left unsettled: {usage}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    Figures {
        requests: requests.len(),
        rows: rows.len(),
        reconciled: rows.iter().filter(|r| r["usage_source"] == "reconciled").count(),
        lags_ms: rows.iter().filter_map(|r| r["lag_ms"].as_f64()).collect(),
    }
}

fn report(runtime: &str, figures: &Figures) {
    let mut lags = figures.lags_ms.clone();
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| lags.get(((lags.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "{runtime}: {} requests, {} ledger rows (rows ÷ admitted = {:.3}), {} reconciled; reconciliation lag after \
         the request ended: p50 {:.0} ms, max {:.0} ms",
        figures.requests,
        figures.rows,
        figures.rows as f64 / figures.requests as f64,
        figures.reconciled,
        at(0.5),
        at(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_of_leaving_bills_exactly_once_in_the_test_runtime() {
    let figures = run_mix(miniflare(), 4, 12).await;
    report("miniflare", &figures);
    assert!(figures.reconciled > 0);
}

/// The abort-heavy mix through `npm run dev`'s path: 34 rounds of the six endings (204 requests), 24 at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_of_leaving_bills_exactly_once_under_npm_run_dev() {
    let figures = run_mix(dev(), 34, 24).await;
    report("npm run dev", &figures);
    assert!(figures.reconciled > 0);
}
