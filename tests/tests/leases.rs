//! Admission leases (see `worker/src/limiter.rs`): a busy key's requests are admitted from its isolate's lease,
//! without a call to the key's object per request, while every quota stays exact — in both local runtimes. A
//! revocation applies to the next request; a lease whose isolate dies is still charged and billed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use gateway_tests::*;
use serde_json::{json, Value};

const ADMIN_KEY: &str = "adm-leases-test-4d1c8a";
/// How long a lease whose isolate died waits to be charged after its end (RESERVATION_LEASE_SECONDS).
const LEASE_SECS: u64 = 4;

fn options() -> GatewayOptions {
    GatewayOptions::default()
        .var("ADMIN_API_KEY", ADMIN_KEY)
        .var("RESERVATION_LEASE_SECONDS", LEASE_SECS)
        .key_with("hot", &[("rpm", "100000")])
        .key_with("burst", &[("rpm", "300")])
        .key_with("revoked", &[("rpm", "100000")])
        .key_with("tokens", &[("rpm", "100000"), ("tpm", "60000")])
}

fn miniflare() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options()))
}

fn dev() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options().runtime(Runtime::Dev)))
}

/// Their own gateways: the tests kill them. Leases of 5 s (the longest), so the test's requests are long over
/// while their lease is still open.
fn dying_options() -> GatewayOptions {
    GatewayOptions::default()
        .var("RESERVATION_LEASE_SECONDS", LEASE_SECS)
        .var("ADMISSION_LEASE_MS", 5000)
        .key_with("dying", &[("rpm", "100000")])
}

fn dying_miniflare() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(dying_options()))
}

fn dying_dev() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(dying_options().runtime(Runtime::Dev)))
}

fn chat(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

/// `n` requests, `concurrency` at a time; their statuses and the `x-ratelimit-remaining-requests` of the last.
async fn load(gw: &Gateway, key: &str, n: usize, concurrency: usize, body: &Value) -> Vec<u16> {
    let client = client();
    stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            async move {
                let response = client.post(gw.url("/v1/chat/completions")).bearer_auth(key).json(body).send().await;
                let response = response.expect("gateway reachable");
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                status
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// The request log lines of one key, once there are `n` of them (each is written after its settlement, which for
/// a leased request may wait for its lease's end).
async fn key_logs(gw: &Gateway, key_id: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines: Vec<Value> = gw.request_logs().into_iter().filter(|l| l["key_id"] == key_id).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "{} of {n} log lines for {key_id}", lines.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ledger_rows(gw: &Gateway, key_id: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = gw.d1(&format!("SELECT * FROM usage_logs WHERE key_id = '{key_id}'"));
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "{} of {n} ledger rows for {key_id}", rows.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn admitted_by(lines: &[Value], route: &str) -> usize {
    lines.iter().filter(|l| l["admission"] == route).count()
}

/// A busy key: most requests are admitted from a lease, the object sees a fraction of a call per request and
/// writes rows per grant, every request has its ledger row, and once the leases are over the object's window
/// holds exactly the requests made.
async fn a_busy_key_is_admitted_from_leases_and_its_window_stays_exact(gw: &Gateway) {
    let key = gw.key("hot");
    const N: usize = 300;
    let statuses = load(gw, &key.secret, N, 8, &chat(16)).await;
    assert_eq!(count(&statuses, 200), N, "{statuses:?}");

    let lines = key_logs(gw, &key.id, N).await;
    let from_lease = admitted_by(&lines, "lease");
    let calls: u64 = lines.iter().filter_map(|l| l["limiter_calls"].as_u64()).sum();
    assert!(from_lease * 2 > N, "only {from_lease} of {N} admitted from a lease");
    assert!((calls as usize) * 4 < N, "{calls} object calls for {N} requests");
    assert_eq!(admitted_by(&lines, "lease") + admitted_by(&lines, "call") + admitted_by(&lines, "joined"), N);

    // One ledger row per request, each under its own request id.
    let rows = ledger_rows(gw, &key.id, N).await;
    assert_eq!(rows.len(), N);
    let ids: std::collections::HashSet<&str> = rows.iter().filter_map(|r| r["request_id"].as_str()).collect();
    assert_eq!(ids.len(), N);

    // The object stored a row per grant or per request it admitted itself, not one per request.
    let stored: u64 = gw
        .durable_object_files()
        .iter()
        .flat_map(|f| sqlite(f, "SELECT request_id, count FROM requests"))
        .filter(|r| r["request_id"].as_str().is_some_and(|id| ids.contains(id) || id.starts_with("lease_")))
        .count() as u64;
    assert!((stored as usize) * 4 < N, "{stored} object rows for {N} requests");

    // After every lease has ended and been reported, the window holds exactly the N requests: the slots granted
    // and not used were released.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .json(&chat(16))
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.status(), 200);
    let remaining = response.headers()["x-ratelimit-remaining-requests"].to_str().ok().map(str::to_owned);
    assert_eq!(remaining.as_deref(), Some(&*(100_000 - N as u64 - 1).to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_key_is_admitted_from_leases_in_the_test_runtime() {
    a_busy_key_is_admitted_from_leases_and_its_window_stays_exact(miniflare()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_key_is_admitted_from_leases_under_npm_run_dev() {
    a_busy_key_is_admitted_from_leases_and_its_window_stays_exact(dev()).await;
}

/// Leases granted while the key was far from its limit never let a burst through: exactly the limit is
/// admitted, however the slots were spread over leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_never_let_a_burst_past_the_limit() {
    let gw = miniflare();
    let key = gw.key("burst");
    let warm = load(gw, &key.secret, 100, 4, &chat(16)).await;
    assert_eq!(count(&warm, 200), 100);
    let burst = load(gw, &key.secret, 600, 64, &chat(16)).await;
    assert_eq!(count(&burst, 200), 200, "{burst:?}");
    assert_eq!(count(&burst, 429), 400);
    let lines = key_logs(gw, &key.id, 700).await;
    assert!(admitted_by(&lines, "lease") > 0, "no request was admitted from a lease: the test tests nothing");
}

/// Tokens too: leases carry an allowance, and what a lease did not use goes back. A warm-up makes the key busy
/// (leases granted) and leaves its actual usage in the window; then a burst of requests that all hold their
/// reservation at once is admitted exactly as far as the tokens left allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_never_let_tokens_past_the_limit() {
    let gw = miniflare();
    let key = gw.key("tokens");
    let warm = load(gw, &key.secret, 100, 4, &chat(92)).await;
    assert_eq!(count(&warm, 200), 100);
    let lines = key_logs(gw, &key.id, 100).await;
    assert!(admitted_by(&lines, "lease") > 0, "no request was admitted from a lease: the test tests nothing");
    let used: u64 = ledger_rows(gw, &key.id, 100)
        .await
        .iter()
        .map(|r| r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0))
        .sum();
    // The warm-up's leases have ended and been reported.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // Each reserves 8 (prompt estimate) + 92 = 100 tokens and uses exactly that, so a request of the burst that
    // settles before the burst is over frees nothing: the count does not depend on how fast the burst goes.
    let held = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 92,
        "standin": {"delay_ms": 500,
            "usage_override": {"prompt_tokens": 8, "completion_tokens": 92, "total_tokens": 100}}});
    let burst = load(gw, &key.secret, 800, 800, &held).await;
    let fit = (60_000 - used) / 100;
    assert_eq!(count(&burst, 200) as u64, fit, "{used} tokens used before the burst");
    assert_eq!(count(&burst, 429) as u64, 800 - fit);
}

/// Revoking a key through the admin API gives back this isolate's lease: the next request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_stops_a_lease_at_once() {
    let gw = miniflare();
    let key = gw.key("revoked");
    let statuses = load(gw, &key.secret, 60, 4, &chat(16)).await;
    assert_eq!(count(&statuses, 200), 60);
    let lines = key_logs(gw, &key.id, 60).await;
    assert!(admitted_by(&lines, "lease") > 0, "no lease was in use: the test tests nothing");
    let revoked = client()
        .delete(gw.url(&format!("/admin/keys/{}", key.id)))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("reachable");
    assert_eq!(revoked.status(), 200);
    let next = load(gw, &key.secret, 1, 1, &chat(16)).await;
    assert_eq!(next, [401]);
}

/// An isolate that dies holding a lease never reports it: its object charges what the lease still held when
/// the reservation lease ends, and bills it with one ledger row for the lease.
async fn a_lease_whose_isolate_died_is_charged_and_billed(gw: &Gateway) {
    let key = gw.key("dying");
    let statuses = load(gw, &key.secret, 40, 4, &chat(16)).await;
    assert_eq!(count(&statuses, 200), 40);
    let lines = key_logs(gw, &key.id, 1).await;
    assert!(admitted_by(&lines, "lease") > 0, "no request was admitted from a lease: the test tests nothing");
    // The lease still open (its isolate reports it only at its end), the runtime dies.
    let open_leases = gw
        .durable_object_files()
        .iter()
        .flat_map(|f| {
            sqlite(f, "SELECT request_id FROM requests WHERE request_id LIKE 'lease_%' AND lease IS NOT NULL")
        })
        .count();
    assert!(open_leases > 0, "no open lease in the key's object before the restart");
    gw.restart();
    let deadline = Instant::now() + Duration::from_secs(5 + LEASE_SECS + 30);
    let row = loop {
        let rows =
            gw.d1(&format!("SELECT * FROM usage_logs WHERE key_id = '{}' AND request_id LIKE 'lease_%'", key.id));
        if let Some(row) = rows.into_iter().next() {
            break row;
        }
        assert!(Instant::now() < deadline, "no ledger row for the lease whose isolate died");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!((row["usage_source"].as_str(), row["error"].as_str()), (Some("reserved"), Some("unsettled_lease")));
    assert!(row["output_tokens"].as_u64().is_some_and(|t| t > 0), "charged what it held: {row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_whose_isolate_died_is_charged_and_billed_in_the_test_runtime() {
    a_lease_whose_isolate_died_is_charged_and_billed(dying_miniflare()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_whose_isolate_died_is_charged_and_billed_under_npm_run_dev() {
    a_lease_whose_isolate_died_is_charged_and_billed(dying_dev()).await;
}
