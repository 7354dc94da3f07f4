//! The rest of the OpenAI surface — Responses, embeddings, legacy completions, model lookup — through the same
//! pipeline as chat: the official `openai` Node SDK unmodified against every endpoint (tests/sdk/openai-sdk.mjs),
//! quotas on each, one ledger row per admitted request with its endpoint, PostHog's event for each, errors.

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::*;
use serde_json::Value;

const ENDPOINTS: [&str; 4] = ["chat/completions", "completions", "responses", "embeddings"];
const ADMIN_KEY: &str = "adm-surface-key-52c1";

fn options() -> GatewayOptions {
    let mut options = GatewayOptions::default()
        .var("RATE_LIMIT_PER_MINUTE", 100_000)
        .var("ADMIN_API_KEY", ADMIN_KEY)
        .keys(&["sdk", "raw"])
        .key_with("usd", &[("usd_limit", "1.0")])
        .posthog(&[]);
    // One key per endpoint at 1 request per minute.
    for endpoint in ENDPOINTS {
        options = options.key_with(&limited_key(endpoint), &[("rpm", "1")]);
    }
    options
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options()))
}

/// The same, served as `npm run dev` serves it (wrangler's dev server).
fn dev_gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| Gateway::start(options().runtime(Runtime::Dev)))
}

fn limited_key(endpoint: &str) -> String {
    format!("limited-{}", id_part(endpoint))
}

/// The endpoint's name as it may appear in a key name or a client request id.
fn id_part(endpoint: &str) -> String {
    endpoint.replace('/', "-")
}

/// The body of a small valid request to `endpoint`, carrying `marker`.
fn body_for(endpoint: &str, marker: &str) -> Value {
    match endpoint {
        "chat/completions" => {
            json!({"messages": [{"role": "user", "content": marker}], "max_tokens": 16, "standin": {}})
        }
        "completions" => json!({"prompt": marker, "max_tokens": 16, "standin": {}}),
        "responses" => json!({"input": marker, "max_output_tokens": 16, "standin": {}}),
        _ => json!({"model": "openai/text-embedding-3-small", "input": marker}),
    }
}

/// Sends `body` to `/v1/{endpoint}` with `x-client-request-id: {client_id}` (letters, digits and `-_.:` only, or the
/// gateway does not record it).
async fn post(gw: &Gateway, endpoint: &str, key: &str, client_id: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url(&format!("/v1/{endpoint}")))
        .bearer_auth(key)
        .header("x-client-request-id", client_id)
        .json(body)
        .send()
        .await
        .expect("gateway reachable")
}

/// Ledger rows whose client request id starts with `prefix`, by that id, once there are `expected` of them.
async fn ledger_rows(gw: &Gateway, prefix: &str, expected: usize) -> HashMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = gw.d1(&format!("SELECT * FROM usage_logs WHERE client_request_id LIKE '{prefix}%'"));
        if rows.len() >= expected || Instant::now() > deadline {
            return rows
                .into_iter()
                .map(|r| (r["client_request_id"].as_str().unwrap_or_default().to_owned(), r))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// PostHog events whose client request id starts with `prefix`, by that id, once there are `expected` of them.
async fn posthog_events(gw: &Gateway, prefix: &str, expected: usize) -> HashMap<String, Value> {
    let posthog = gw.posthog.as_ref().expect("PostHog stand-in");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = posthog.posthog_events().await;
        let mine: HashMap<String, Value> = all["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let id = e["properties"]["client_request_id"].as_str()?;
                id.starts_with(prefix).then(|| (id.to_owned(), e.clone()))
            })
            .collect();
        if mine.len() >= expected || Instant::now() > deadline {
            return mine;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn run_sdk(gw: &Gateway, prefix: &str) -> Value {
    let output = Command::new("node")
        .arg(repo_root().join("tests/sdk/openai-sdk.mjs"))
        .args([gw.base.as_str(), gw.key("sdk").secret.as_str(), prefix])
        .output()
        .expect("node runs the SDK script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "SDK script failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("SDK script printed: {stdout}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test]
async fn the_official_sdk_works_unmodified_on_every_endpoint() {
    sdk_on_every_endpoint(gateway()).await;
}

/// Cut-off and failed streams and upstream errors are billing endings: they hold under `npm run dev` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_works_unmodified_on_every_endpoint_under_npm_run_dev() {
    sdk_on_every_endpoint(dev_gateway()).await;
}

async fn sdk_on_every_endpoint(gw: &Gateway) {
    let prefix = format!("sdk-{}", random_hex(4));
    let r = run_sdk(gw, &prefix);
    let ok = |name: &str| {
        assert_eq!(r[name]["ok"], true, "{name}: {}", r[name]);
        &r[name]
    };

    // Responses, not streamed.
    let resp = ok("responses");
    assert_eq!((resp["object"].as_str(), resp["status"].as_str()), (Some("response"), Some("completed")));
    assert!(resp["text"].as_str().is_some_and(|t| t.contains(&prefix)), "{resp}");
    // Streamed: OpenAI's typed events in order, usage in response.completed.
    let stream = ok("responses_stream");
    let types: Vec<&str> = stream["types"].as_array().expect("types").iter().filter_map(Value::as_str).collect();
    assert_eq!(types.first(), Some(&"response.created"));
    assert_eq!(types.last(), Some(&"response.completed"));
    assert_eq!(types.iter().filter(|t| **t == "response.output_text.delta").count(), 4);
    assert!(stream["text"].as_str().is_some_and(|t| t.contains(&prefix)));
    let helper = ok("responses_stream_helper");
    assert_eq!(helper["status"], "completed");
    assert!(helper["text"].as_str().is_some_and(|t| t.contains(&prefix)));
    // A cut-off stream ends with response.failed, so the SDK's final response says failed, not a short success.
    let cut = ok("responses_stream_cut");
    assert_eq!(cut["status"], "failed", "{cut}");
    assert_eq!(cut["error"]["code"], "upstream_cut_off");
    assert_eq!(cut["types"].as_array().and_then(|t| t.last()).and_then(Value::as_str), Some("response.failed"));
    // The upstream's own failure reaches the SDK as sent.
    let failed = ok("responses_stream_failed");
    assert_eq!(
        (failed["status"].as_str(), failed["types"].as_array().and_then(|t| t.last()).and_then(Value::as_str)),
        (Some("failed"), Some("response.failed")),
        "{failed}"
    );
    let invalid = &r["responses_invalid"];
    assert_eq!(
        (invalid["ok"].as_bool(), invalid["status"].as_u64(), invalid["param"].as_str()),
        (Some(false), Some(400), Some("input"))
    );
    assert_eq!(invalid["error"], "BadRequestError");
    let busy = &r["responses_upstream_429"];
    assert_eq!((busy["error"].as_str(), busy["status"].as_u64()), (Some("RateLimitError"), Some(429)), "{busy}");

    // Embeddings: the SDK's default base64 is decoded by the SDK into the stand-in's vectors.
    let emb = ok("embeddings");
    assert_eq!((emb["object"].as_str(), u(&emb["count"]), u(&emb["index"])), (Some("list"), 2, 1));
    let vector = emb["vector"].as_array().expect("a decoded vector");
    assert_eq!(vector.len(), 8, "dimensions");
    assert!(vector.iter().all(|x| x.as_f64().is_some_and(f64::is_finite)));
    let float = ok("embeddings_float");
    assert!(float["vector"].as_array().is_some_and(|v| !v.is_empty() && v.iter().all(Value::is_number)));
    assert_eq!(u(&ok("embeddings_tokens")["usage"]["prompt_tokens"]), 5, "token ids count as given");
    let invalid = &r["embeddings_invalid"];
    assert_eq!((invalid["status"].as_u64(), invalid["param"].as_str()), (Some(400), Some("input")));

    // Legacy completions.
    let comp = ok("completions");
    assert_eq!(comp["object"], "text_completion");
    assert!(comp["text"].as_str().is_some_and(|t| t.contains(&prefix)));
    let legacy = ok("completions_stream");
    assert!(legacy["text"].as_str().is_some_and(|t| t.contains(&prefix)));
    assert_eq!(u(&legacy["usage_only_chunks"]), 0, "the usage-only chunk is stripped unless asked for");
    let with_usage = ok("completions_stream_usage");
    assert!(u(&with_usage["usage"]["completion_tokens"]) > 0, "{with_usage}");
    let invalid = &r["completions_invalid"];
    assert_eq!((invalid["status"].as_u64(), invalid["param"].as_str()), (Some(400), Some("prompt")));

    // Models.
    let model = ok("models_retrieve");
    assert_eq!(
        (model["id"].as_str(), model["object"].as_str(), model["owned_by"].as_str()),
        (Some("openai/gpt-4o-mini"), Some("model"), Some("openai"))
    );
    let missing = &r["models_missing"];
    assert_eq!(
        (missing["error"].as_str(), missing["status"].as_u64(), missing["code"].as_str()),
        (Some("NotFoundError"), Some(404), Some("model_not_found")),
        "{missing}"
    );

    // The ledger: exactly one row per admitted request, each with its endpoint and the usage the SDK saw.
    // Refused before admission (invalid, model lookups): no row. The upstream's 429: admitted, so billed ($0).
    let admitted = [
        ("responses", "responses"),
        ("responses_stream", "responses"),
        ("responses_stream_helper", "responses"),
        ("responses_stream_cut", "responses"),
        ("responses_stream_failed", "responses"),
        ("responses_upstream_429", "responses"),
        ("embeddings", "embeddings"),
        ("embeddings_float", "embeddings"),
        ("embeddings_tokens", "embeddings"),
        ("completions", "completions"),
        ("completions_stream", "completions"),
        ("completions_stream_usage", "completions"),
    ];
    let rows = ledger_rows(gw, &prefix, admitted.len()).await;
    assert_eq!(rows.len(), admitted.len(), "{:?}", rows.keys().collect::<Vec<_>>());
    for (call, endpoint) in admitted {
        let row = &rows[&format!("{prefix}-{call}")];
        assert_eq!(row["endpoint"], endpoint, "{call}");
        assert_eq!(row["key_id"], gw.key("sdk").id.as_str());
    }
    let row = |call: &str| &rows[&format!("{prefix}-{call}")];
    let usage = &r["responses"]["usage"];
    assert_eq!(
        (u(&row("responses")["input_tokens"]), u(&row("responses")["output_tokens"])),
        (u(&usage["input_tokens"]), u(&usage["output_tokens"]))
    );
    assert!(row("responses")["cost"].as_f64().is_some_and(|c| c > 0.0));
    let usage = &r["responses_stream"]["usage"];
    assert_eq!(u(&row("responses_stream")["output_tokens"]), u(&usage["output_tokens"]));
    assert_eq!(
        (row("responses_stream")["streamed"].as_u64(), row("responses_stream")["usage_source"].as_str()),
        (Some(1), Some("reported"))
    );
    assert_eq!(row("responses_stream")["finish_reason"], "stop");
    assert_eq!(row("responses_stream_cut")["error"], "cut_off");
    assert!(u(&row("responses_stream_cut")["output_tokens"]) > 0, "a cut stream is billed what it generated");
    assert_eq!(row("responses_stream_failed")["finish_reason"], "error");
    assert_eq!(
        (u(&row("responses_upstream_429")["status"]), row("responses_upstream_429")["cost"].as_f64()),
        (429, Some(0.0))
    );
    let usage = &r["embeddings"]["usage"];
    assert_eq!(
        (u(&row("embeddings")["input_tokens"]), u(&row("embeddings")["output_tokens"])),
        (u(&usage["prompt_tokens"]), 0)
    );
    assert!(row("embeddings")["cost"].as_f64().is_some_and(|c| c > 0.0));
    assert_eq!(u(&row("embeddings_tokens")["input_tokens"]), 5);
    assert_eq!(u(&row("completions")["output_tokens"]), u(&r["completions"]["usage"]["completion_tokens"]));
    assert_eq!(row("completions_stream")["usage_source"], "reported", "usage read from the chunk the client never saw");

    // PostHog: $ai_embedding for embeddings, $ai_generation named by endpoint for the others.
    let events = posthog_events(gw, &prefix, admitted.len()).await;
    assert_eq!(events.len(), admitted.len());
    for (call, endpoint) in admitted {
        let event = &events[&format!("{prefix}-{call}")];
        let (name, span) = match endpoint {
            "embeddings" => ("$ai_embedding", "embeddings"),
            other => ("$ai_generation", other),
        };
        assert_eq!(
            (event["event"].as_str(), event["properties"]["$ai_span_name"].as_str()),
            (Some(name), Some(span)),
            "{call}"
        );
    }
    let embedding = &events[&format!("{prefix}-embeddings")]["properties"];
    assert_eq!(u(&embedding["$ai_input_tokens"]), u(&r["embeddings"]["usage"]["prompt_tokens"]));
    assert!(embedding.get("$ai_output_tokens").is_none());
}

#[tokio::test]
async fn every_endpoint_refuses_a_key_at_its_rpm_limit_and_bills_only_what_it_admitted() {
    let gw = gateway();
    let prefix = format!("rpm-{}", random_hex(4));
    for endpoint in ENDPOINTS {
        let key = &gw.key(&limited_key(endpoint)).secret;
        let first =
            post(gw, endpoint, key, &format!("{prefix}-{}-1", id_part(endpoint)), &body_for(endpoint, &prefix)).await;
        assert_eq!(first.status(), 200, "{endpoint}");
        let second =
            post(gw, endpoint, key, &format!("{prefix}-{}-2", id_part(endpoint)), &body_for(endpoint, &prefix)).await;
        assert_eq!(second.status(), 429, "{endpoint}");
        assert!(second.headers().contains_key("retry-after"), "{endpoint}");
        assert_eq!(second.headers()["x-ratelimit-remaining-requests"], "0", "{endpoint}");
        let body: Value = second.json().await.expect("JSON error");
        assert_eq!(assert_openai_error(&body)["code"], "rate_limit_exceeded", "{endpoint}");
    }
    let rows = ledger_rows(gw, &prefix, ENDPOINTS.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows_later = ledger_rows(gw, &prefix, ENDPOINTS.len()).await;
    assert_eq!(rows.len(), ENDPOINTS.len());
    assert_eq!(rows_later.len(), ENDPOINTS.len(), "refused requests leave no row");
    for endpoint in ENDPOINTS {
        let row = &rows[&format!("{prefix}-{}-1", id_part(endpoint))];
        assert_eq!((row["endpoint"].as_str(), row["status"].as_u64()), (Some(endpoint), Some(200)));
    }
}

#[tokio::test]
async fn invalid_requests_get_openai_errors_and_never_reach_the_upstream() {
    let gw = gateway();
    let key = &gw.key("raw").secret;
    let m = format!("bad-{}", random_hex(4));
    let cases = [
        ("responses", json!({"input": [{"role": "robot", "content": m}]}), "input[0].role"),
        ("responses", json!({"input": m, "max_output_tokens": 1_000_000}), "max_output_tokens"),
        ("responses", json!({"input": m, "tools": [{"name": "no type"}]}), "tools[0]"),
        ("embeddings", json!({"input": m}), "model"),
        ("embeddings", json!({"model": "e/x", "input": [m, ""]}), "input"),
        ("embeddings", json!({"model": "e/x", "input": m, "encoding_format": "int8"}), "encoding_format"),
        ("completions", json!({"prompt": m, "best_of": 2, "n": 3}), "best_of"),
        ("completions", json!({"prompt": {"text": m}}), "prompt"),
    ];
    for (i, (endpoint, body, param)) in cases.iter().enumerate() {
        let response = post(gw, endpoint, key, &format!("{m}-{i}"), body).await;
        assert_eq!(response.status(), 400, "{endpoint} {body}");
        let body: Value = response.json().await.expect("JSON error");
        assert_eq!(assert_openai_error(&body)["param"], *param, "{endpoint} {body}");
    }
    let forwarded = gw.upstream.requests().await;
    assert!(
        !forwarded.iter().any(|r| r["raw_body"].as_str().is_some_and(|b| b.contains(&m))),
        "an invalid request reached the upstream"
    );
    // Model lookups: found (ids with a slash, percent-encoded or not), missing, wrong method, no key.
    for path in ["/v1/models/openai%2Fgpt-4o-mini", "/v1/models/openai/gpt-4o-mini"] {
        let response = client().get(gw.url(path)).bearer_auth(key).send().await.expect("reachable");
        assert_eq!(response.status(), 200, "{path}");
        let model: Value = response.json().await.expect("JSON");
        assert_eq!((model["id"].as_str(), model["object"].as_str()), (Some("openai/gpt-4o-mini"), Some("model")));
    }
    let missing = client().get(gw.url("/v1/models/none%2Fsuch")).bearer_auth(key).send().await.expect("reachable");
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("JSON");
    let error = assert_openai_error(&body);
    assert_eq!((error["code"].as_str(), error["param"].as_str()), (Some("model_not_found"), Some("model")));
    assert!(error["message"].as_str().is_some_and(|t| t.contains("none/such")));
    let no_key = client().get(gw.url("/v1/models/openai%2Fgpt-4o-mini")).send().await.expect("reachable");
    assert_eq!(no_key.status(), 401);
    let post_model = client().post(gw.url("/v1/models/x")).bearer_auth(key).send().await.expect("reachable");
    assert_eq!(post_model.status(), 405);
}

#[tokio::test]
async fn a_cut_responses_stream_ends_with_response_failed_and_is_billed_by_estimate() {
    let gw = gateway();
    let key = &gw.key("raw").secret;
    let id = format!("cut-{}", random_hex(4));
    let body = json!({"input": format!("one two three {id}"), "stream": true,
        "standin": {"scenario": "disconnect", "after_chunks": 2, "chunks": 5}});
    let response = post(gw, "responses", key, &id, &body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let text = response.text().await.expect("stream body");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    let last = events.last().expect("events");
    assert!(last.starts_with("event: response.failed\ndata: "), "{last}");
    let data: Value = serde_json::from_str(last.trim_start_matches("event: response.failed\ndata: ")).expect("JSON");
    assert_eq!(
        (data["response"]["status"].as_str(), data["response"]["error"]["code"].as_str()),
        (Some("failed"), Some("upstream_cut_off"))
    );
    let deltas = events.iter().filter(|e| e.contains("response.output_text.delta")).count();
    assert_eq!(deltas, 2, "what the upstream sent before it broke reaches the client");
    let rows = ledger_rows(gw, &id, 1).await;
    let row = &rows[&id];
    assert_eq!((row["endpoint"].as_str(), row["error"].as_str()), (Some("responses"), Some("cut_off")));
    assert!(matches!(row["usage_source"].as_str(), Some("estimated" | "reconciled")), "{row}");
    assert!(u(&row["output_tokens"]) > 0);
}

/// Embedding models come from OpenRouter's own list of them (`/embeddings/models`), merged into the gateway's: they
/// can be looked up, and priced for a key with a USD budget.
#[tokio::test]
async fn embedding_models_are_listed_and_priced_for_usd_budgets() {
    let gw = gateway();
    let key = &gw.key("usd").secret;
    let model = client().get(gw.url("/v1/models/openai%2Ftext-embedding-3-small")).bearer_auth(key).send().await;
    let model: Value = model.expect("reachable").json().await.expect("JSON");
    assert_eq!(
        (model["id"].as_str(), model["pricing"]["prompt"].as_str()),
        (Some("openai/text-embedding-3-small"), Some("0.000001"))
    );
    let id = format!("usd-{}", random_hex(4));
    let body = json!({"model": "openai/text-embedding-3-small", "input": ["one two three four", "five"]});
    let response = post(gw, "embeddings", key, &id, &body).await;
    assert_eq!(response.status(), 200, "a priced embedding model is admitted on a USD budget");
    let answer: Value = response.json().await.expect("JSON");
    let tokens = u(&answer["usage"]["prompt_tokens"]);
    let row = &ledger_rows(gw, &id, 1).await[&id];
    assert_eq!(u(&row["input_tokens"]), tokens);
    assert!((row["cost"].as_f64().unwrap_or_default() - tokens as f64 * 0.000001).abs() < 1e-12, "{row}");
    // Its charge reached the key's budget.
    let usage = gw.own_usage(key).await;
    assert!(usage["current"]["budget_used"]["usd"].as_f64().is_some_and(|usd| usd > 0.0), "{usage}");
}

#[tokio::test]
async fn admin_usage_groups_by_endpoint() {
    let gw = gateway();
    let key = &gw.key("raw").secret;
    let m = format!("grp-{}", random_hex(4));
    for (i, endpoint) in ENDPOINTS.iter().enumerate() {
        for n in 0..=i {
            assert_eq!(
                post(gw, endpoint, key, &format!("{m}-{}-{n}", id_part(endpoint)), &body_for(endpoint, &m))
                    .await
                    .status(),
                200
            );
        }
    }
    let expected: usize = (1..=ENDPOINTS.len()).sum();
    assert_eq!(ledger_rows(gw, &m, expected).await.len(), expected);
    let key_id = &gw.key("raw").id;
    let response = client()
        .get(gw.url(&format!("/admin/usage?key_id={key_id}&group_by=endpoint")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.expect("JSON");
    assert_eq!(report["group_by"], "endpoint");
    let by_endpoint: HashMap<&str, &Value> = report["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| (r["endpoint"].as_str().unwrap_or_default(), r))
        .collect();
    for endpoint in ENDPOINTS {
        assert!(by_endpoint.contains_key(endpoint), "{endpoint} in {report}");
    }
    // The raw key's other tests add rows too; the grouping must at least hold this test's.
    for (i, endpoint) in ENDPOINTS.iter().enumerate() {
        assert!(u(&by_endpoint[endpoint]["requests"]) >= (i + 1) as u64, "{endpoint}");
    }
    assert_eq!(u(&by_endpoint["embeddings"]["output_tokens"]), 0, "embeddings generate nothing");
}

/// A client that leaves a Responses stream: the upstream is stopped, and the request billed what it generated
/// before the stop (estimated, then reconciled with the stand-in's count).
async fn responses_client_abort_is_billed(gw: &Gateway) {
    let id = format!("leave-{}", random_hex(4));
    // 100 words, one every 50 ms: 5 s to generate the whole answer.
    let body = json!({"input": "a slow answer", "stream": true, "max_output_tokens": 500,
        "standin": {"chunks": 100, "delay_ms": 50}});
    let key = gw.key("raw").secret.clone();
    let (head, _) =
        post_and_leave(&gw.base, "/v1/responses", &key, &[("x-client-request-id", &id)], &body, "output_text.delta")
            .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let rows = gw.d1(&format!("SELECT * FROM usage_logs WHERE client_request_id = '{id}'"));
        if let Some(row) = rows.into_iter().next().filter(|r| r["reconcile_state"] != "pending") {
            break row;
        }
        assert!(Instant::now() < deadline, "no settled row within 60 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!((row["endpoint"].as_str(), row["error"].as_str()), (Some("responses"), Some("client_abort")), "{row}");
    let generations = gw.upstream.generations().await;
    let generation = row["generation_id"].as_str().and_then(|id| generations.get(id)).expect("the generation");
    assert_eq!(generation["cancelled"], true, "the upstream was stopped");
    assert!(generation["tokens_completion"].as_u64().is_some_and(|n| n > 0 && n < 100), "{generation}");
    assert_eq!(row["usage_source"], "reconciled");
    assert_eq!(row["output_tokens"], generation["tokens_completion"], "billed what was generated before the stop");
}

#[tokio::test]
async fn a_client_leaving_a_responses_stream_is_billed_what_was_generated() {
    responses_client_abort_is_billed(gateway()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_responses_stream_is_billed_what_was_generated_under_npm_run_dev() {
    responses_client_abort_is_billed(dev_gateway()).await;
}
