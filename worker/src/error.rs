//! The one error type of the request path, and the one place that renders it as an OpenAI error body.
//!
//! Every failure a client can see is an [`ApiError`]: it knows its HTTP status, the OpenAI `type`/`code`/`param`,
//! a message safe to show, and a low-cardinality `label` for logs. Internal details (binding errors, upstream
//! bodies) are logged by the caller and never copied into the message.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// Boxed to keep the error small on the `Result` paths it travels.
    pub param: Option<Box<str>>,
    pub message: Box<str>,
    /// Seconds the client should wait before retrying (`Retry-After`); also rendered as `retry-after-ms`.
    pub retry_after_ms: Option<u64>,
    /// Stable, low-cardinality name for logs and metrics.
    pub label: &'static str,
    /// Rendered as `x-should-retry`, which the OpenAI SDKs obey before their own retry rules.
    pub should_retry: Option<bool>,
    /// Rendered as `Allow` (a 405 names the methods the path takes).
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, code: Option<&'static str>, label: &'static str, message: String) -> Self {
        let message = message.into_boxed_str();
        Self { status, kind, code, param: None, message, retry_after_ms: None, label, should_retry: None, allow: None }
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into().into_boxed_str());
        self
    }

    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// A 400 about one request field (`param` names it the way OpenAI does, e.g. `messages[2].role`).
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", None, "invalid_request", message.into()).with_param(param)
    }

    /// A 400 about the request as a whole (e.g. the body is not JSON).
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", None, "invalid_request", message.into())
    }

    pub fn invalid_api_key(message: &str) -> Self {
        Self::new(401, "invalid_request_error", Some("invalid_api_key"), "invalid_api_key", message.to_owned())
    }

    /// The key may not use this model (its allowed-models list).
    pub fn model_not_allowed(model: &str) -> Self {
        let shown: String = model.chars().take(200).collect();
        Self::new(
            403,
            "invalid_request_error",
            Some("model_not_allowed"),
            "model_not_allowed",
            format!("This API key may not use the model '{shown}'."),
        )
        .with_param("model")
    }

    /// `GET /v1/models/{id}` for a model the list does not have (OpenAI's words).
    pub fn model_not_found(model: &str) -> Self {
        let shown: String = model.chars().take(200).collect();
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            "model_not_found",
            format!("The model '{shown}' does not exist"),
        )
        .with_param("model")
    }

    pub fn key_not_found(id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self::new(
            404,
            "invalid_request_error",
            Some("key_not_found"),
            "key_not_found",
            format!("No API key with id '{shown}'."),
        )
        .with_param("id")
    }

    pub fn not_found(path: &str) -> Self {
        let shown: String = path.chars().take(200).collect();
        Self::new(
            404,
            "invalid_request_error",
            Some("unknown_url"),
            "not_found",
            format!("Unknown request URL: {shown}."),
        )
    }

    pub fn method_not_allowed(method: &str, allowed: &'static str) -> Self {
        let shown: String = method.chars().take(32).collect();
        let mut error = Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            "method_not_allowed",
            format!("Method {shown} is not allowed here; use {allowed}."),
        );
        error.allow = Some(allowed);
        error
    }

    /// The client did not send its whole body in time.
    pub fn body_timeout(seconds: u64) -> Self {
        Self::new(
            408,
            "invalid_request_error",
            Some("request_timeout"),
            "request_body_timeout",
            format!("The request body did not arrive within {seconds} s."),
        )
    }

    /// A key with a USD budget asked for a model whose price is unknown, so its worst case cannot be reserved.
    pub fn model_price_unknown(model: &str) -> Self {
        let shown: String = model.chars().take(200).collect();
        Self::new(
            400,
            "invalid_request_error",
            Some("model_price_unknown"),
            "model_price_unknown",
            format!(
                "This API key has a USD budget, and the price of the model '{shown}' is unknown, so its cost cannot be reserved. Use a model with a published price."
            ),
        )
        .with_param("model")
    }

    /// A change was saved, but the key's Durable Object (which enforces it at once) could not be told.
    pub fn limiter_not_told(key_id: &str) -> Self {
        let shown: String = key_id.chars().take(64).collect();
        Self::new(
            503,
            "server_error",
            Some("limiter_unavailable"),
            "limiter_configure_failed",
            format!(
                "The change to key '{shown}' was saved, but its rate limiter could not be told, so it may not apply to requests yet (at the latest after the auth cache's TTL). Retry the request."
            ),
        )
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            "request_too_large",
            format!("Request body exceeds the gateway's limit of {limit_bytes} bytes."),
        )
    }

    /// The key's requests or tokens per window are used up; `kind` is `requests` or `tokens`, as OpenAI's.
    pub fn rate_limited(kind: &'static str, message: String) -> Self {
        Self::new(429, kind, Some("rate_limit_exceeded"), "rate_limited", message)
    }

    /// The key's spending budget is used up: retrying soon cannot help, so the SDKs are told not to.
    pub fn quota_exhausted(message: String) -> Self {
        let mut error = Self::new(429, "insufficient_quota", Some("insufficient_quota"), "quota_exhausted", message);
        error.should_retry = Some(false);
        error
    }

    /// The upstream answered with an error before the first byte of a successful response.
    /// Its status is kept (except 401: the provider rejected *our* credentials, which is not the client's fault).
    pub fn upstream(status: u16, upstream_message: &str) -> Self {
        let message = format!("Upstream provider error: {}", truncate(upstream_message, 500));
        match status {
            401 => Self::new(
                502,
                "server_error",
                Some("upstream_auth_failed"),
                "upstream_auth",
                "The upstream provider rejected the gateway's credentials.".to_owned(),
            ),
            400 | 413 | 422 => Self::new(status, "invalid_request_error", None, "upstream_invalid_request", message),
            402 => Self::new(402, "insufficient_quota", Some("upstream_payment_required"), "upstream_payment", message),
            403 => Self::new(403, "invalid_request_error", Some("upstream_forbidden"), "upstream_forbidden", message),
            404 => Self::new(404, "invalid_request_error", Some("model_not_found"), "upstream_not_found", message),
            408 => Self::new(408, "server_error", Some("upstream_timeout"), "upstream_timeout", message),
            429 => Self::new(429, "requests", Some("rate_limit_exceeded"), "upstream_rate_limited", message),
            500..=599 => Self::new(status, "server_error", Some("upstream_error"), "upstream_error", message),
            _ if (400..500).contains(&status) => {
                Self::new(status, "invalid_request_error", None, "upstream_client_error", message)
            }
            _ => Self::new(502, "server_error", Some("upstream_error"), "upstream_error", message),
        }
    }

    /// The upstream answered 2xx but with something that is not a valid completion.
    pub fn upstream_malformed() -> Self {
        Self::new(
            502,
            "server_error",
            Some("upstream_malformed_response"),
            "upstream_malformed",
            "The upstream provider returned a malformed response.".to_owned(),
        )
    }

    /// A stream the upstream closed before `[DONE]`, or whose connection broke mid-answer.
    pub fn upstream_cut_off() -> Self {
        Self::new(
            502,
            "server_error",
            Some("upstream_cut_off"),
            "upstream_cut_off",
            "The upstream provider closed the stream before the answer was complete.".to_owned(),
        )
    }

    pub fn upstream_unreachable() -> Self {
        Self::new(
            502,
            "server_error",
            Some("upstream_unreachable"),
            "upstream_unreachable",
            "The upstream provider could not be reached.".to_owned(),
        )
    }

    pub fn upstream_timeout(seconds: u64) -> Self {
        Self::new(
            504,
            "server_error",
            Some("upstream_timeout"),
            "upstream_timeout",
            format!("The upstream provider did not answer within {seconds} s."),
        )
    }

    /// Something inside the gateway failed; `label` says what, the details go to the log only.
    pub fn internal(label: &'static str) -> Self {
        Self::new(
            500,
            "server_error",
            Some("internal_error"),
            label,
            "The gateway failed to process the request. Retry, and report the x-request-id if it persists.".to_owned(),
        )
    }

    /// A dependency the gateway needs for this request (D1, the limiter) is unavailable.
    pub fn unavailable(label: &'static str, what: &str) -> Self {
        Self::new(
            503,
            "server_error",
            Some("service_unavailable"),
            label,
            format!("{what} is temporarily unavailable."),
        )
    }

    /// The OpenAI error body: `{"error":{"message","type","param","code"}}`.
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        };
        // Serializing a struct of strings cannot fail; fall back to a fixed body rather than panic.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_owned()
        })
    }

    /// The same error as one SSE event, for failures after a stream has started (SDKs raise on `error`).
    pub fn sse_event(&self) -> String {
        format!("data: {}\n\n", self.body_json())
    }

    /// The headers this error implies: `Retry-After` / `retry-after-ms`, `x-should-retry`, `Allow`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let (Some(ms), Some(secs)) = (self.retry_after_ms, self.retry_after_secs()) {
            headers.push(("retry-after", secs.to_string()));
            headers.push(("retry-after-ms", ms.to_string()));
        }
        if let Some(should_retry) = self.should_retry {
            headers.push(("x-should-retry", should_retry.to_string()));
        }
        if let Some(allow) = self.allow {
            headers.push(("allow", allow.to_owned()));
        }
        headers
    }

    /// Whole seconds for `Retry-After` (rounded up, as the header cannot express fractions).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_ms.map(|ms| ms.div_ceil(1000))
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(e: &ApiError) -> Value {
        serde_json::from_str(&e.body_json()).unwrap_or(Value::Null)
    }

    #[test]
    fn body_has_the_openai_shape_with_nullable_param_and_code() {
        let v = parse(&ApiError::invalid_request("bad"));
        let err = &v["error"];
        assert_eq!(err["message"], "bad");
        assert_eq!(err["type"], "invalid_request_error");
        assert!(err["param"].is_null());
        assert!(err["code"].is_null());
        assert_eq!(err.as_object().map(|o| o.len()), Some(4));
    }

    #[test]
    fn param_is_rendered() {
        let e = ApiError::invalid_param("messages[0].role", "bad role");
        assert_eq!(e.status, 400);
        assert_eq!(parse(&e)["error"]["param"], "messages[0].role");
    }

    #[test]
    fn invalid_key_is_401_with_code() {
        let e = ApiError::invalid_api_key("nope");
        assert_eq!(e.status, 401);
        assert_eq!(parse(&e)["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn upstream_statuses_are_kept_except_401() {
        for s in [400, 402, 403, 404, 408, 429, 500, 502, 503] {
            assert_eq!(ApiError::upstream(s, "x").status, s, "status {s}");
        }
        let e = ApiError::upstream(401, "bad key sk-or-secret");
        assert_eq!(e.status, 502);
        assert!(!e.message.contains("sk-or"), "upstream auth text must not leak");
        assert_eq!(ApiError::upstream(429, "slow down").code, Some("rate_limit_exceeded"));
        assert_eq!(ApiError::upstream(302, "odd").status, 502);
    }

    #[test]
    fn upstream_message_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let e = ApiError::upstream(400, &long);
        assert!(e.message.chars().count() < 600);
    }

    #[test]
    fn retry_after_rounds_up() {
        let e = ApiError::upstream(429, "x").with_retry_after_ms(1001);
        assert_eq!(e.retry_after_secs(), Some(2));
        assert_eq!(ApiError::upstream(429, "x").with_retry_after_ms(1000).retry_after_secs(), Some(1));
    }

    #[test]
    fn sse_event_is_a_data_line_with_the_error_object() {
        let ev = ApiError::upstream_unreachable().sse_event();
        assert!(ev.starts_with("data: {\"error\":"));
        assert!(ev.ends_with("\n\n"));
    }

    /// Every constructor's status, type and code, pinned (the contract clients and SDKs depend on).
    #[test]
    fn each_error_has_its_status_type_and_code() {
        let table: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            (ApiError::invalid_param("x", "m"), 400, "invalid_request_error", None),
            (ApiError::invalid_request("m"), 400, "invalid_request_error", None),
            (ApiError::invalid_api_key("m"), 401, "invalid_request_error", Some("invalid_api_key")),
            (ApiError::model_not_allowed("m"), 403, "invalid_request_error", Some("model_not_allowed")),
            (ApiError::key_not_found("k"), 404, "invalid_request_error", Some("key_not_found")),
            (ApiError::not_found("/x"), 404, "invalid_request_error", Some("unknown_url")),
            (ApiError::method_not_allowed("PUT", "GET"), 405, "invalid_request_error", Some("method_not_allowed")),
            (ApiError::body_timeout(30), 408, "invalid_request_error", Some("request_timeout")),
            (ApiError::payload_too_large(10), 413, "invalid_request_error", Some("request_too_large")),
            (ApiError::rate_limited("tokens", "m".into()), 429, "tokens", Some("rate_limit_exceeded")),
            (ApiError::quota_exhausted("m".into()), 429, "insufficient_quota", Some("insufficient_quota")),
            (ApiError::model_price_unknown("m"), 400, "invalid_request_error", Some("model_price_unknown")),
            (ApiError::upstream_malformed(), 502, "server_error", Some("upstream_malformed_response")),
            (ApiError::upstream_cut_off(), 502, "server_error", Some("upstream_cut_off")),
            (ApiError::upstream_unreachable(), 502, "server_error", Some("upstream_unreachable")),
            (ApiError::upstream_timeout(5), 504, "server_error", Some("upstream_timeout")),
            (ApiError::internal("x"), 500, "server_error", Some("internal_error")),
            (ApiError::unavailable("x", "X"), 503, "server_error", Some("service_unavailable")),
            (ApiError::limiter_not_told("k"), 503, "server_error", Some("limiter_unavailable")),
        ];
        for (error, status, kind, code) in table {
            assert_eq!((error.status, error.kind, error.code), (status, kind, code), "{}", error.label);
            let body = parse(&error);
            assert_eq!(body["error"]["type"], kind);
            assert_eq!(body["error"]["code"].as_str(), code);
        }
    }

    #[test]
    fn headers_are_rendered_with_the_error() {
        let h = ApiError::method_not_allowed("PROPFIND", "GET").headers();
        assert_eq!(h, vec![("allow", "GET".to_owned())]);
        let h = ApiError::quota_exhausted("m".into()).with_retry_after_ms(1500).headers();
        assert!(h.contains(&("retry-after", "2".to_owned())) && h.contains(&("retry-after-ms", "1500".to_owned())));
        assert!(h.contains(&("x-should-retry", "false".to_owned())));
    }

    #[test]
    fn not_found_path_is_bounded() {
        let e = ApiError::not_found(&"a".repeat(5000));
        assert!(e.message.len() < 300);
        assert_eq!(e.status, 404);
    }
}
