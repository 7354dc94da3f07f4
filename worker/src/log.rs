//! The one structured log line per request, readable in `wrangler tail --format json`.
//! It names the key by its public id and never carries a key, a prompt or an answer.

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestLog {
    /// The gateway's own id for the request.
    pub request_id: String,
    /// The id the client sent, if it sent a sane one (logged, never a key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    pub streamed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// Time spent waiting for the key's Durable Object to admit the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter_ms: Option<u64>,
    /// How the key's limits admitted it: `lease` (this isolate's lease: no call), `call` (its own call to the
    /// key's object), `joined` (another request's call, or the lease that call brought).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission: Option<&'static str>,
    /// Calls this request made to its key's object (admission, settlement, lease reports), and the storage rows
    /// they wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter_calls: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter_rows: Option<u64>,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Low-cardinality error label (see `ApiError::label`), when the request failed or a stream broke.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Bytes of a stream copied into wasm to be read, and bytes wasm produced for the client (rewrites only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasm_bytes_in: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasm_bytes_out: Option<usize>,
    /// Streams: how many reads of the copy it took (each read coalesces the events that arrived meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_reads: Option<usize>,
    /// How a stream was delivered: `native` (the runtime's pipe; the gateway reads a copy for billing) or
    /// `edited` (the gateway writes what the client gets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<&'static str>,
    /// How a stream ended: `done`, `upstream_error`, `cut_off`, `malformed`, `client_abort`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_end: Option<&'static str>,
    /// The response cache, when it was in play: `hit` (answered from it) or `miss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// What became of a miss's answer: `stored`, `incomplete` (failed, cut off, unfinished, without usage),
    /// `too_large`, `write_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_store: Option<&'static str>,
}

impl RequestLog {
    pub fn to_line(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            level: &'a str,
            event: &'a str,
            #[serde(flatten)]
            log: &'a RequestLog,
        }
        let level = if self.status >= 500 {
            "error"
        } else if self.status >= 400 {
            "warn"
        } else {
            "info"
        };
        serde_json::to_string(&Line { level, event: "request", log: self }).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn line_is_json_with_level_by_status_and_no_empty_fields() {
        let log = RequestLog {
            request_id: "req_1".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 502,
            latency_ms: 12,
            key_id: Some("k1".into()),
            streamed: true,
            error: Some("upstream_unreachable"),
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&log.to_line()).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["event"], "request");
        assert_eq!(v["key_id"], "k1");
        assert_eq!(v["streamed"], true);
        assert!(v.get("model").is_none());
    }
}
