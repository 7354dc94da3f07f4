//! Validation of a chat-completions body, and the one rewrite the gateway makes to it.
//!
//! Only what the gateway depends on is checked (messages and roles, sampling and token bounds, the model).
//! Everything else — tools, `response_format`, multimodal content, OpenRouter's `models`/`provider`, fields the
//! gateway has never heard of — passes through untouched. The rewrite fills in `model` and the effective
//! `max_tokens`, so the upstream can never generate more than the limiter reserved.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::Config;
use crate::error::ApiError;

const VALID_ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];
const MAX_MODEL_NAME_CHARS: usize = 256;
/// OpenAI's own ceiling on `n`.
pub const MAX_CHOICES: u64 = 128;

/// A validated request, ready to forward.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The body to send upstream: the client's fields as sent, with `model` and `max_tokens` filled in.
    pub forward_body: String,
    /// The model asked for (explicit, first of `models`, or the default); for logs, billing and limits.
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Upper bound on output tokens per choice, as forwarded upstream.
    pub max_tokens: u32,
    /// How many choices the upstream generates (`n`): the output bound is `max_tokens × choices`.
    pub choices: u32,
    pub temperature: Option<f64>,
    /// Characters of everything the model reads, for the prompt-token estimate: message text (strings and text
    /// parts), tool-call names and arguments, tool and function definitions, `response_format`, and a `prompt`.
    pub prompt_chars: usize,
    pub message_count: usize,
    /// The `messages` array as the client sent it (JSON), for content capture.
    pub messages_json: String,
    /// Every model that may serve the request: `model`, then OpenRouter's `models` fallbacks.
    pub models: Vec<String>,
}

/// The body's top-level fields, each kept as the client's raw JSON: only the fields the gateway checks are
/// decoded, so large message contents (images as base64, long documents) are never built into a JSON tree.
type Fields<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;

pub fn validate_chat(raw: &[u8], config: &Config) -> Result<ChatRequest, ApiError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| ApiError::invalid_request("The request body must be UTF-8 encoded JSON."))?;
    let fields: Fields = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid_request("The request body must be a JSON object."),
        _ => ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        )),
    })?;

    let (message_count, message_chars) = check_messages(fields.get("messages").copied())?;
    let prompt_chars = message_chars + read_by_the_model(&fields);
    let choices = check_choices(small(&fields, "n")?)?;
    let temperature = check_temperature(small(&fields, "temperature")?)?;
    let stream = optional_bool(&fields, "stream")?.unwrap_or(false);
    let include_usage = check_stream_options(small(&fields, "stream_options")?)?;

    let max_tokens = optional_token_count(&fields, "max_tokens", config.max_tokens_limit)?;
    let max_completion_tokens = optional_token_count(&fields, "max_completion_tokens", config.max_tokens_limit)?;
    let effective_max_tokens = match (max_tokens, max_completion_tokens) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => config.max_tokens_default,
    };

    let fallbacks = check_fallbacks(small(&fields, "models")?, config.max_fallback_models)?;
    let (model, inject_model) = match small(&fields, "model")? {
        None | Some(Value::Null) => match fallbacks.first() {
            // OpenRouter routes by `models` alone; injecting a default would change which model is tried first.
            Some(first) => (first.clone(), false),
            None => (config.default_model.clone(), true),
        },
        Some(Value::String(m)) => (check_model_id("model", m)?, false),
        Some(_) => return Err(ApiError::invalid_param("model", "'model' must be a string.")),
    };

    let mut models = vec![model.clone()];
    for m in fallbacks {
        if !models.contains(&m) {
            models.push(m);
        }
    }

    let mut overrides = vec![("max_tokens", effective_max_tokens.to_string())];
    if max_completion_tokens.is_some() {
        overrides.push(("max_completion_tokens", effective_max_tokens.to_string()));
    }
    if inject_model {
        overrides.push(("model", Value::from(model.as_str()).to_string()));
    }
    Ok(ChatRequest {
        forward_body: rewrite(&fields, &overrides),
        model,
        stream,
        include_usage,
        max_tokens: effective_max_tokens,
        choices,
        temperature,
        prompt_chars,
        message_count,
        messages_json: fields.get("messages").map(|m| m.get().to_owned()).unwrap_or_default(),
        models,
    })
}

/// A model id: non-empty, bounded, and without control characters (it reaches logs, the ledger and headers).
fn check_model_id(param: &str, id: String) -> Result<String, ApiError> {
    if !id.trim().is_empty() && id.chars().count() <= MAX_MODEL_NAME_CHARS && !id.chars().any(char::is_control) {
        return Ok(id);
    }
    Err(ApiError::invalid_param(
        param,
        format!(
            "'{param}' must be a non-empty model id of at most {MAX_MODEL_NAME_CHARS} characters, without control characters."
        ),
    ))
}

/// OpenRouter's `models` fallback list: model ids, at most `max` of them (each one is checked against the key's
/// allowed models, so none may hide in an odd shape).
fn check_fallbacks(value: Option<Value>, max: usize) -> Result<Vec<String>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= max => list,
        Some(_) => {
            return Err(ApiError::invalid_param("models", format!("'models' must be a list of 1 to {max} model ids.")))
        }
    };
    list.into_iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(m) => check_model_id(&format!("models[{i}]"), m),
            _ => Err(ApiError::invalid_param(format!("models[{i}]"), format!("models[{i}] must be a model id."))),
        })
        .collect()
}

/// `n`: how many choices to generate.
fn check_choices(value: Option<Value>) -> Result<u32, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n as u32),
            _ => Err(ApiError::invalid_param("n", format!("'n' must be an integer from 1 to {MAX_CHOICES}."))),
        },
    }
}

/// Characters outside `messages` that the model reads: tool and (legacy) function definitions and a structured
/// output schema are serialized into the prompt; a `prompt` is read as text. Counted as the client wrote them.
fn read_by_the_model(fields: &Fields) -> usize {
    let raw_len = |field: &str| fields.get(field).map_or(0, |v| if v.get() == "null" { 0 } else { v.get().len() });
    let prompt = fields.get("prompt").map_or(0, |raw| {
        if let Ok(text) = serde_json::from_str::<Cow<str>>(raw.get()) {
            text.chars().count()
        } else if let Ok(texts) = serde_json::from_str::<Vec<Cow<str>>>(raw.get()) {
            texts.iter().map(|t| t.chars().count()).sum()
        } else {
            raw.get().len()
        }
    });
    raw_len("tools") + raw_len("functions") + raw_len("response_format") + prompt
}

/// The client's object with some fields replaced: untouched fields are copied as the client wrote them.
fn rewrite(fields: &Fields, overrides: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(fields.values().map(|v| v.get().len() + 16).sum::<usize>() + 64);
    out.push('{');
    let kept = fields.iter().filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
    for (key, value) in kept {
        out.push_str(&Value::from(key.as_ref()).to_string());
        out.push(':');
        out.push_str(value.get());
        out.push(',');
    }
    for (key, value) in overrides {
        out.push_str(&Value::from(*key).to_string());
        out.push(':');
        out.push_str(value);
        out.push(',');
    }
    out.pop();
    out.push('}');
    out
}

/// A small top-level field (a number, a flag, a short list) decoded as JSON.
fn small(fields: &Fields, field: &str) -> Result<Option<Value>, ApiError> {
    match fields.get(field) {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|_| ApiError::invalid_param(field, format!("'{field}' could not be read."))),
    }
}

/// Checks the messages array; returns how many messages and characters of content (strings and text parts).
fn check_messages(messages: Option<&RawValue>) -> Result<(usize, usize), ApiError> {
    let raw = match messages {
        None => return Err(ApiError::invalid_param("messages", "Missing required parameter: 'messages'.")),
        Some(raw) if raw.get() == "null" => {
            return Err(ApiError::invalid_param("messages", "Missing required parameter: 'messages'."))
        }
        Some(raw) => raw,
    };
    let list: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::invalid_param("messages", "'messages' must be an array."))?;
    if list.is_empty() {
        return Err(ApiError::invalid_param("messages", "'messages' must contain at least one message."));
    }
    let mut chars = 0;
    for (i, message) in list.iter().enumerate() {
        let message: Fields = serde_json::from_str(message.get()).map_err(|_| {
            ApiError::invalid_param(format!("messages[{i}]"), format!("messages[{i}] must be an object."))
        })?;
        let role = message.get("role").map(|r| serde_json::from_str::<Value>(r.get()).unwrap_or(Value::Null));
        match role {
            Some(Value::String(role)) if VALID_ROLES.contains(&role.as_str()) => {}
            Some(Value::String(role)) => {
                let shown: String = role.chars().take(40).collect();
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].role"),
                    format!(
                        "Invalid value '{shown}' for messages[{i}].role; expected one of {}.",
                        VALID_ROLES.join(", ")
                    ),
                ));
            }
            None | Some(Value::Null) => {
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].role"),
                    format!("Missing required parameter: messages[{i}].role."),
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].role"),
                    format!("messages[{i}].role must be a string."),
                ))
            }
        }
        chars += content_chars(message.get("content").copied()) + tool_call_chars(message.get("tool_calls").copied());
    }
    Ok((list.len(), chars))
}

/// Characters of a message's text: a string, or the `text` of each part of a multimodal list (other parts —
/// images, audio — are skipped without being decoded).
fn content_chars(content: Option<&RawValue>) -> usize {
    #[derive(Deserialize)]
    struct Part<'a> {
        #[serde(borrow)]
        text: Option<Cow<'a, str>>,
    }
    let Some(content) = content else { return 0 };
    let raw = content.get();
    if let Ok(text) = serde_json::from_str::<Cow<str>>(raw) {
        return text.chars().count();
    }
    let Ok(parts) = serde_json::from_str::<Vec<&RawValue>>(raw) else { return 0 };
    parts.iter().filter_map(|p| serde_json::from_str::<Part>(p.get()).ok()?.text).map(|t| t.chars().count()).sum()
}

/// Characters of the tool calls an assistant message replays: function names and arguments (the arguments are a
/// JSON string the model reads back).
fn tool_call_chars(tool_calls: Option<&RawValue>) -> usize {
    #[derive(Deserialize)]
    struct Call<'a> {
        #[serde(borrow)]
        function: Option<Function<'a>>,
    }
    #[derive(Deserialize)]
    struct Function<'a> {
        #[serde(borrow)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow)]
        arguments: Option<Cow<'a, str>>,
    }
    let Some(raw) = tool_calls else { return 0 };
    let Ok(calls) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) else { return raw.get().len() };
    calls
        .iter()
        .map(|call| match serde_json::from_str::<Call>(call.get()) {
            Ok(Call { function: Some(f) }) => {
                f.name.map_or(0, |n| n.chars().count()) + f.arguments.map_or(0, |a| a.chars().count())
            }
            _ => call.get().len(),
        })
        .sum()
}

fn check_temperature(value: Option<Value>) -> Result<Option<f64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => Ok(Some(t)),
            _ => {
                Err(ApiError::invalid_param("temperature", format!("'temperature' must be between 0 and 2, got {n}.")))
            }
        },
        Some(_) => Err(ApiError::invalid_param("temperature", "'temperature' must be a number between 0 and 2.")),
    }
}

fn optional_bool(fields: &Fields, field: &str) -> Result<Option<bool>, ApiError> {
    match small(fields, field)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(ApiError::invalid_param(field, format!("'{field}' must be a boolean."))),
    }
}

fn check_stream_options(value: Option<Value>) -> Result<bool, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid_param(
                "stream_options.include_usage",
                "'stream_options.include_usage' must be a boolean.",
            )),
        },
        Some(_) => Err(ApiError::invalid_param("stream_options", "'stream_options' must be an object.")),
    }
}

fn optional_token_count(fields: &Fields, field: &str, ceiling: u32) -> Result<Option<u32>, ApiError> {
    let value = match small(fields, field)? {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    match value.as_u64() {
        Some(n) if n >= 1 && n <= u64::from(ceiling) => Ok(u32::try_from(n).ok()),
        Some(0) => Err(ApiError::invalid_param(field, format!("'{field}' must be at least 1."))),
        Some(n) => Err(ApiError::invalid_param(
            field,
            format!("'{field}' is {n}, above this gateway's limit of {ceiling} tokens."),
        )),
        None => Err(ApiError::invalid_param(field, format!("'{field}' must be a positive integer."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Config {
        Config::from_lookup(|name| match name {
            "MAX_TOKENS_DEFAULT" => Some("1000".into()),
            "MAX_TOKENS_LIMIT" => Some("8000".into()),
            "DEFAULT_MODEL" => Some("default/model".into()),
            _ => None,
        })
        .expect("test config")
    }

    fn check(body: Value) -> Result<ChatRequest, ApiError> {
        validate_chat(body.to_string().as_bytes(), &config())
    }

    /// What would be sent upstream, as JSON.
    fn sent(r: &ChatRequest) -> Value {
        serde_json::from_str(&r.forward_body).expect("the forwarded body is JSON")
    }

    fn param_of(body: Value) -> Option<String> {
        check(body).err().and_then(|e| {
            assert_eq!(e.status, 400);
            e.param.map(String::from)
        })
    }

    fn hello() -> Value {
        json!([{"role": "user", "content": "hello"}])
    }

    #[test]
    fn minimal_request_gets_default_model_and_max_tokens() {
        let r = check(json!({"messages": hello()})).expect("valid");
        assert_eq!(r.model, "default/model");
        assert_eq!(sent(&r)["model"], "default/model");
        assert_eq!(r.max_tokens, 1000);
        assert_eq!(sent(&r)["max_tokens"], 1000);
        assert!(!r.stream);
        assert!(!r.include_usage);
        assert_eq!(r.prompt_chars, 5);
    }

    #[test]
    fn unknown_and_openrouter_fields_pass_through_unchanged() {
        let body = json!({
            "model": "m/x", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"},
            "provider": {"order": ["a", "b"], "allow_fallbacks": false}, "route": "fallback",
            "stream_options": {"include_usage": true}, "stream": true, "x_custom": {"nested": [1, 2.5, null]},
            "seed": 7, "top_p": 0.9, "user": "u1"
        });
        let r = check(body.clone()).expect("valid");
        for (k, v) in body.as_object().expect("object") {
            assert_eq!(&sent(&r)[k], v, "field {k} changed");
        }
        assert!(r.stream && r.include_usage);
        let read_by_the_model = body["tools"].to_string().len() + body["response_format"].to_string().len();
        assert_eq!(r.prompt_chars, 2 + read_by_the_model, "text parts, tool definitions, response format");
    }

    #[test]
    fn models_fallback_list_is_respected_without_injecting_a_default() {
        let r = check(json!({"messages": hello(), "models": ["a/one", "b/two"]})).expect("valid");
        assert_eq!(r.model, "a/one");
        assert!(sent(&r).get("model").is_none());
        assert_eq!(r.models, vec!["a/one", "b/two"]);
        let r = check(json!({"messages": hello(), "model": "c/x", "models": ["a/one", "c/x"]})).expect("valid");
        assert_eq!(r.models, vec!["c/x", "a/one"], "every model that may serve, once");
    }

    #[test]
    fn messages_are_required_non_empty_objects_with_valid_roles() {
        assert_eq!(param_of(json!({})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"messages": []})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"messages": "hi"})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"messages": [1]})).as_deref(), Some("messages[0]"));
        assert_eq!(
            param_of(json!({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]})).as_deref(),
            Some("messages[1].role")
        );
        assert_eq!(param_of(json!({"messages": [{"role": "wizard"}]})).as_deref(), Some("messages[0].role"));
        assert_eq!(param_of(json!({"messages": [{"role": 3}]})).as_deref(), Some("messages[0].role"));
        for role in VALID_ROLES {
            assert!(check(json!({"messages": [{"role": role, "content": "x"}]})).is_ok(), "{role}");
        }
    }

    #[test]
    fn temperature_must_be_a_number_in_range() {
        assert!(check(json!({"messages": hello(), "temperature": 0})).is_ok());
        assert!(check(json!({"messages": hello(), "temperature": 2.0})).is_ok());
        assert!(check(json!({"messages": hello(), "temperature": null})).is_ok());
        assert_eq!(param_of(json!({"messages": hello(), "temperature": 2.01})).as_deref(), Some("temperature"));
        assert_eq!(param_of(json!({"messages": hello(), "temperature": -0.1})).as_deref(), Some("temperature"));
        assert_eq!(param_of(json!({"messages": hello(), "temperature": "hot"})).as_deref(), Some("temperature"));
    }

    #[test]
    fn token_bounds_are_positive_and_below_the_ceiling() {
        for field in ["max_tokens", "max_completion_tokens"] {
            assert_eq!(param_of(json!({"messages": hello(), field: 0})).as_deref(), Some(field));
            assert_eq!(param_of(json!({"messages": hello(), field: -5})).as_deref(), Some(field));
            assert_eq!(param_of(json!({"messages": hello(), field: 1.5})).as_deref(), Some(field));
            assert_eq!(param_of(json!({"messages": hello(), field: 8001})).as_deref(), Some(field));
            assert_eq!(param_of(json!({"messages": hello(), field: "10"})).as_deref(), Some(field));
            assert_eq!(check(json!({"messages": hello(), field: 8000})).expect("valid").max_tokens, 8000);
        }
    }

    #[test]
    fn the_smaller_of_both_token_fields_is_forwarded_in_both() {
        let r = check(json!({"messages": hello(), "max_tokens": 300, "max_completion_tokens": 200})).expect("valid");
        assert_eq!(r.max_tokens, 200);
        assert_eq!(sent(&r)["max_tokens"], 200);
        assert_eq!(sent(&r)["max_completion_tokens"], 200);
        let r = check(json!({"messages": hello(), "max_completion_tokens": 50})).expect("valid");
        assert_eq!(sent(&r)["max_tokens"], 50);
    }

    #[test]
    fn model_must_be_a_sane_string() {
        assert_eq!(param_of(json!({"messages": hello(), "model": 5})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"messages": hello(), "model": ""})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"messages": hello(), "model": "x".repeat(300)})).as_deref(), Some("model"));
        assert_eq!(check(json!({"messages": hello(), "model": null})).expect("valid").model, "default/model");
    }

    #[test]
    fn model_ids_refuse_control_characters_and_fallbacks_are_checked_one_by_one() {
        assert_eq!(param_of(json!({"messages": hello(), "model": "a/b\u{0}"})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"messages": hello(), "model": "a/b\nX-Injected: 1"})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"messages": hello(), "models": "a/b"})).as_deref(), Some("models"));
        assert_eq!(param_of(json!({"messages": hello(), "models": []})).as_deref(), Some("models"));
        assert_eq!(param_of(json!({"messages": hello(), "models": ["a/b", 7]})).as_deref(), Some("models[1]"));
        assert_eq!(
            param_of(json!({"messages": hello(), "models": ["a/b", {"id": "c"}]})).as_deref(),
            Some("models[1]")
        );
        assert_eq!(param_of(json!({"messages": hello(), "models": ["a/b", "\t"]})).as_deref(), Some("models[1]"));
        let nine: Vec<String> = (0..9).map(|i| format!("m/{i}")).collect();
        assert_eq!(param_of(json!({"messages": hello(), "models": nine})).as_deref(), Some("models"));
        let eight: Vec<String> = (0..8).map(|i| format!("m/{i}")).collect();
        assert_eq!(check(json!({"messages": hello(), "models": eight})).expect("valid").models.len(), 8);
    }

    #[test]
    fn n_is_validated_and_counted() {
        assert_eq!(check(json!({"messages": hello()})).expect("valid").choices, 1);
        assert_eq!(check(json!({"messages": hello(), "n": 3})).expect("valid").choices, 3);
        for bad in [json!(0), json!(129), json!(1.5), json!("2"), json!(-1)] {
            assert_eq!(param_of(json!({"messages": hello(), "n": bad})).as_deref(), Some("n"), "{bad}");
        }
    }

    #[test]
    fn the_prompt_estimate_counts_everything_the_model_reads() {
        let base = check(json!({"messages": hello()})).expect("valid").prompt_chars;
        assert_eq!(base, 5);
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let with_tools = check(json!({"messages": hello(), "tools": tools})).expect("valid").prompt_chars;
        assert_eq!(with_tools, 5 + tools.to_string().len());
        let replayed = json!([{"role": "user", "content": "hello"}, {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]);
        let r = check(json!({"messages": replayed})).expect("valid");
        assert_eq!(r.prompt_chars, 5 + "get_weather".len() + "{\"city\":\"Paris\"}".len() + 5);
        let prompt = check(json!({"messages": hello(), "prompt": "four"})).expect("valid").prompt_chars;
        assert_eq!(prompt, 9);
        let parts = check(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"},
            {"type": "text", "text": "cd"}]}]}))
        .expect("valid");
        assert_eq!(parts.prompt_chars, 4, "every text part");
    }

    #[test]
    fn stream_flags_are_typed() {
        assert_eq!(param_of(json!({"messages": hello(), "stream": "yes"})).as_deref(), Some("stream"));
        assert_eq!(param_of(json!({"messages": hello(), "stream_options": true})).as_deref(), Some("stream_options"));
        assert_eq!(
            param_of(json!({"messages": hello(), "stream_options": {"include_usage": 1}})).as_deref(),
            Some("stream_options.include_usage")
        );
    }

    #[test]
    fn non_json_and_non_object_bodies_are_rejected_without_param() {
        for raw in [&b"not json"[..], b"[1,2]", b"", b"{\"messages\": [", b"\xff\xfe"] {
            let e = validate_chat(raw, &config()).expect_err("must fail");
            assert_eq!(e.status, 400);
            assert_eq!(e.param, None);
        }
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let raw = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(validate_chat(raw.as_bytes(), &config()).err().map(|e| e.status), Some(400));
        let raw = format!("{{\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(validate_chat(raw.as_bytes(), &config()).err().map(|e| e.status), Some(400));
    }

    #[test]
    fn raw_fields_keep_their_exact_text_and_big_contents_are_counted_not_built() {
        let image = "A".repeat(1_000_000);
        let raw = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"héllo"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],"seed":1.50,"x":"\u00e9"}}"#
        );
        let r = validate_chat(raw.as_bytes(), &config()).expect("valid");
        assert_eq!(r.prompt_chars, 5);
        assert!(r.forward_body.contains(r#""seed":1.50"#), "numbers keep their spelling");
        assert!(r.forward_body.contains(r#""x":"\u00e9""#), "escapes are kept as sent");
        assert!(r.forward_body.contains(&image));
        assert_eq!(r.messages_json.len(), raw.len() - r#"{"messages":,"seed":1.50,"x":"\u00e9"}"#.len());
    }
}
