//! Validation of a model API's body, and the one rewrite the gateway makes to it.
//!
//! Only what the gateway depends on is checked: the input (messages, prompt, input items), sampling and token
//! bounds, the model. Everything else — tools' contents, `response_format`, multimodal content, OpenRouter's
//! `provider`, stateful Responses fields, fields the gateway has never heard of — passes through untouched. The
//! rewrite fills in `model` (chat) and the effective output bound (`max_tokens`, `max_output_tokens`), so the
//! upstream can never generate more than the limiter reserved.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::Config;
use crate::endpoint::Endpoint;
use crate::error::ApiError;

const VALID_ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];
const MAX_MODEL_NAME_CHARS: usize = 256;
/// OpenAI's own ceiling on `n`.
pub const MAX_CHOICES: u64 = 128;
/// OpenAI's ceilings: inputs per embeddings request (also prompts per legacy completion), `best_of`.
pub const MAX_INPUTS: usize = 2048;
pub const MAX_BEST_OF: u64 = 20;
/// OpenAI's ceiling on the tokens of one embeddings request (here: as estimated).
pub const MAX_EMBEDDING_TOKENS: u64 = 300_000;

/// A validated request, ready to forward.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub endpoint: Endpoint,
    /// The body to send upstream: the client's fields as sent, with the model and output bound filled in.
    pub forward_body: String,
    /// The model asked for (explicit, first of `models`, or the default); for logs, billing and limits.
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Upper bound on output tokens per choice, as forwarded upstream (0 for embeddings).
    pub max_tokens: u32,
    /// How many answers the upstream generates (`n`, times the prompts of a legacy completion, or `best_of`):
    /// the output bound is `max_tokens × choices`.
    pub choices: u32,
    pub temperature: Option<f64>,
    /// Characters of everything the model reads, for the prompt-token estimate: message and input text (strings
    /// and text parts), instructions, tool-call names and arguments, tool and function definitions, structured
    /// output schemas, prompts.
    pub prompt_chars: usize,
    /// Tokens the input gives as token ids (legacy prompts and embeddings inputs may be token arrays).
    pub prompt_token_ids: u64,
    /// Tokens of framing around the text (per message, and the reply's priming).
    pub framing_tokens: u64,
    /// What the model reads, as the client sent it (JSON: messages, input, prompt), for content capture.
    pub input_json: String,
    /// Every model that may serve the request: `model`, then OpenRouter's `models` fallbacks.
    pub models: Vec<String>,
}

/// The body's top-level fields, each kept as the client's raw JSON: only the fields the gateway checks are
/// decoded, so large contents (images as base64, long documents) are never built into a JSON tree.
type Fields<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;

pub fn validate(endpoint: Endpoint, raw: &[u8], config: &Config) -> Result<ModelRequest, ApiError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| ApiError::invalid_request("The request body must be UTF-8 encoded JSON."))?;
    let fields: Fields = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid_request("The request body must be a JSON object."),
        _ => ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        )),
    })?;
    match endpoint {
        Endpoint::ChatCompletions => chat(&fields, config),
        Endpoint::Completions => completions(&fields, config),
        Endpoint::Responses => responses(&fields, config),
        Endpoint::Embeddings => embeddings(&fields, config),
    }
}

fn chat(fields: &Fields, config: &Config) -> Result<ModelRequest, ApiError> {
    let (message_count, message_chars) = check_messages(fields.get("messages").copied())?;
    let max_tokens = optional_token_count(fields, "max_tokens", config.max_tokens_limit)?;
    let max_completion_tokens = optional_token_count(fields, "max_completion_tokens", config.max_tokens_limit)?;
    let effective_max_tokens = match (max_tokens, max_completion_tokens) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => config.max_tokens_default,
    };
    let mut overrides = vec![("max_tokens", effective_max_tokens.to_string())];
    if max_completion_tokens.is_some() {
        overrides.push(("max_completion_tokens", effective_max_tokens.to_string()));
    }
    let request = Common::read(fields, config, true)?;
    let read = raw_len(fields, "tools") + raw_len(fields, "functions") + raw_len(fields, "response_format");
    // OpenRouter also reads a `prompt` beside the messages; an odd one is counted as written, not refused.
    let prompt = prompt_text(fields.get("prompt").copied()).unwrap_or(Texts {
        count: 1,
        chars: raw_len(fields, "prompt"),
        token_ids: 0,
    });
    Ok(request.finish(
        fields,
        Endpoint::ChatCompletions,
        overrides,
        Input {
            max_tokens: effective_max_tokens,
            choices: check_choices(small(fields, "n")?)?,
            prompt_chars: message_chars + read + prompt.chars,
            prompt_token_ids: prompt.token_ids,
            framing_tokens: 4 * message_count as u64 + 3,
            json: fields.get("messages").map(|m| m.get().to_owned()).unwrap_or_default(),
        },
    ))
}

/// Legacy text completions: a `prompt` (a string, strings, or token arrays), `max_tokens`, `n` and `best_of`
/// choices per prompt.
fn completions(fields: &Fields, config: &Config) -> Result<ModelRequest, ApiError> {
    let prompt = match fields.get("prompt").copied() {
        Some(raw) if raw.get() != "null" => prompt_text(Some(raw))?,
        _ => return Err(ApiError::invalid_param("prompt", "Missing required parameter: 'prompt'.")),
    };
    let max_tokens =
        optional_token_count(fields, "max_tokens", config.max_tokens_limit)?.unwrap_or(config.max_tokens_default);
    let n = check_choices(small(fields, "n")?)?;
    let best_of = match small(fields, "best_of")? {
        None | Some(Value::Null) => n,
        Some(v) => match v.as_u64() {
            Some(b) if (1..=MAX_BEST_OF).contains(&b) && b >= u64::from(n) => b as u32,
            _ => {
                return Err(ApiError::invalid_param(
                    "best_of",
                    format!("'best_of' must be an integer from n to {MAX_BEST_OF}."),
                ))
            }
        },
    };
    let request = Common::read(fields, config, true)?;
    Ok(request.finish(
        fields,
        Endpoint::Completions,
        vec![("max_tokens", max_tokens.to_string())],
        Input {
            max_tokens,
            choices: best_of.saturating_mul(prompt.count as u32),
            prompt_chars: prompt.chars,
            prompt_token_ids: prompt.token_ids,
            framing_tokens: 0,
            json: fields.get("prompt").map(|m| m.get().to_owned()).unwrap_or_default(),
        },
    ))
}

/// The Responses API: `input` (a string or a list of items), `instructions`, `max_output_tokens`, `tools`.
/// Stateful fields (`previous_response_id`, `store`, `conversation`) pass through as given.
fn responses(fields: &Fields, config: &Config) -> Result<ModelRequest, ApiError> {
    let continues = ["previous_response_id", "conversation"].iter().any(|f| raw_len(fields, f) > 0);
    let (item_count, input_chars) = match fields.get("input").copied() {
        Some(raw) if raw.get() != "null" => check_input_items(raw)?,
        // A continued response may add nothing: its input is the stored conversation.
        _ if continues => (0, 0),
        _ => return Err(ApiError::invalid_param("input", "Missing required parameter: 'input'.")),
    };
    let instructions = match small(fields, "instructions")? {
        None | Some(Value::Null) => 0,
        Some(Value::String(text)) => text.chars().count(),
        Some(_) => return Err(ApiError::invalid_param("instructions", "'instructions' must be a string.")),
    };
    check_tools(fields.get("tools").copied())?;
    let max_tokens = optional_token_count(fields, "max_output_tokens", config.max_tokens_limit)?
        .unwrap_or(config.max_tokens_default);
    let request = Common::read(fields, config, false)?;
    let read = raw_len(fields, "tools") + raw_len(fields, "text");
    Ok(request.finish(
        fields,
        Endpoint::Responses,
        vec![("max_output_tokens", max_tokens.to_string())],
        Input {
            max_tokens,
            choices: 1,
            prompt_chars: input_chars + instructions + read,
            prompt_token_ids: 0,
            framing_tokens: 4 * item_count as u64 + 3,
            json: fields.get("input").map(|m| m.get().to_owned()).unwrap_or_default(),
        },
    ))
}

/// Embeddings: `input` (a string, strings, token ids or token arrays), `encoding_format`, `dimensions`. The
/// model is required (the gateway's default model is a chat model); nothing is generated, nothing streamed.
fn embeddings(fields: &Fields, config: &Config) -> Result<ModelRequest, ApiError> {
    let input = match fields.get("input").copied() {
        Some(raw) if raw.get() != "null" => embedding_input(raw)?,
        _ => return Err(ApiError::invalid_param("input", "Missing required parameter: 'input'.")),
    };
    let estimate = (input.chars as u64).div_ceil(4) + input.token_ids;
    if estimate > MAX_EMBEDDING_TOKENS {
        return Err(ApiError::invalid_param(
            "input",
            format!(
                "'input' is about {estimate} tokens; one embeddings request may hold at most {MAX_EMBEDDING_TOKENS}."
            ),
        ));
    }
    match small(fields, "encoding_format")? {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(_) => {
            return Err(ApiError::invalid_param("encoding_format", "'encoding_format' must be 'float' or 'base64'."))
        }
    }
    match small(fields, "dimensions")? {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64().is_some_and(|d| d >= 1) => {}
        Some(_) => return Err(ApiError::invalid_param("dimensions", "'dimensions' must be a positive integer.")),
    }
    if matches!(small(fields, "model")?, None | Some(Value::Null)) && raw_len(fields, "models") == 0 {
        return Err(ApiError::invalid_param("model", "Missing required parameter: 'model'."));
    }
    let request =
        Common { stream: false, include_usage: false, temperature: None, ..Common::read(fields, config, false)? };
    Ok(request.finish(
        fields,
        Endpoint::Embeddings,
        Vec::new(),
        Input {
            max_tokens: 0,
            choices: 1,
            prompt_chars: input.chars,
            prompt_token_ids: input.token_ids,
            framing_tokens: 0,
            json: fields.get("input").map(|m| m.get().to_owned()).unwrap_or_default(),
        },
    ))
}

/// What every model API checks the same way: the model (and OpenRouter's fallbacks), streaming, temperature.
struct Common {
    model: String,
    models: Vec<String>,
    /// The default model was chosen, so the forwarded body must name it.
    inject_model: bool,
    stream: bool,
    include_usage: bool,
    temperature: Option<f64>,
}

/// What the endpoint read from its input.
struct Input {
    max_tokens: u32,
    choices: u32,
    prompt_chars: usize,
    prompt_token_ids: u64,
    framing_tokens: u64,
    json: String,
}

impl Common {
    /// `stream_options`: chat and legacy completions take `include_usage` (the Responses API's stream options
    /// are its own, passed through).
    fn read(fields: &Fields, config: &Config, stream_options: bool) -> Result<Common, ApiError> {
        let temperature = check_temperature(small(fields, "temperature")?)?;
        let stream = optional_bool(fields, "stream")?.unwrap_or(false);
        let include_usage = stream_options && check_stream_options(small(fields, "stream_options")?)?;
        let fallbacks = check_fallbacks(small(fields, "models")?, config.max_fallback_models)?;
        let (model, inject_model) = match small(fields, "model")? {
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
        Ok(Common { model, models, inject_model, stream, include_usage, temperature })
    }

    fn finish(
        self,
        fields: &Fields,
        endpoint: Endpoint,
        mut overrides: Vec<(&str, String)>,
        input: Input,
    ) -> ModelRequest {
        if self.inject_model {
            overrides.push(("model", Value::from(self.model.as_str()).to_string()));
        }
        ModelRequest {
            endpoint,
            forward_body: rewrite(fields, &overrides),
            model: self.model,
            stream: self.stream,
            include_usage: self.include_usage,
            max_tokens: input.max_tokens,
            choices: input.choices,
            temperature: self.temperature,
            prompt_chars: input.prompt_chars,
            prompt_token_ids: input.prompt_token_ids,
            framing_tokens: input.framing_tokens,
            input_json: input.json,
            models: self.models,
        }
    }
}

/// A prompt or an embeddings input: how many there are, their characters and the tokens given as ids.
#[derive(Debug, Default, PartialEq)]
struct Texts {
    count: usize,
    chars: usize,
    token_ids: u64,
}

/// One token id: a non-negative integer.
fn is_token_id(v: &Value) -> bool {
    v.as_u64().is_some()
}

/// A legacy `prompt` (OpenAI's forms: a string, a list of strings, a list of token ids, a list of such lists).
fn prompt_text(raw: Option<&RawValue>) -> Result<Texts, ApiError> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else { return Ok(Texts { count: 1, ..Texts::default() }) };
    texts(raw, "prompt", false)
}

fn embedding_input(raw: &RawValue) -> Result<Texts, ApiError> {
    texts(raw, "input", true)
}

/// Reads the string / strings / token ids / token arrays forms shared by `prompt` and embeddings' `input`.
/// `non_empty`: embeddings refuse empty strings and empty arrays (there is nothing to embed).
fn texts(raw: &RawValue, param: &str, non_empty: bool) -> Result<Texts, ApiError> {
    let shape_error = || {
        ApiError::invalid_param(
            param,
            format!("'{param}' must be a string, a list of strings, a list of token ids, or a list of token-id lists, with 1 to {MAX_INPUTS} entries."),
        )
    };
    let empty_error = || ApiError::invalid_param(param, format!("'{param}' must not contain empty strings or lists."));
    if let Ok(text) = serde_json::from_str::<Cow<str>>(raw.get()) {
        if non_empty && text.is_empty() {
            return Err(empty_error());
        }
        return Ok(Texts { count: 1, chars: text.chars().count(), token_ids: 0 });
    }
    let list: Vec<Value> = serde_json::from_str(raw.get()).map_err(|_| shape_error())?;
    if list.is_empty() || list.len() > MAX_INPUTS {
        return Err(shape_error());
    }
    if list.iter().all(is_token_id) {
        return Ok(Texts { count: 1, chars: 0, token_ids: list.len() as u64 });
    }
    let mut out = Texts::default();
    for entry in &list {
        match entry {
            Value::String(text) if non_empty && text.is_empty() => return Err(empty_error()),
            Value::String(text) => out.chars += text.chars().count(),
            Value::Array(ids) if ids.iter().all(is_token_id) => {
                if non_empty && ids.is_empty() {
                    return Err(empty_error());
                }
                out.token_ids += ids.len() as u64;
            }
            _ => return Err(shape_error()),
        }
        out.count += 1;
    }
    Ok(out)
}

/// A Responses `input`: a string, or a list of items (objects). Returns how many items and the characters the
/// model reads in them: message content (a string or text parts), tool calls' names and arguments, tool outputs.
fn check_input_items(raw: &RawValue) -> Result<(usize, usize), ApiError> {
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<Cow<'a, str>>,
        role: Option<Value>,
        #[serde(borrow)]
        content: Option<&'a RawValue>,
        #[serde(borrow)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow)]
        arguments: Option<Cow<'a, str>>,
        #[serde(borrow)]
        output: Option<&'a RawValue>,
    }
    if let Ok(text) = serde_json::from_str::<Cow<str>>(raw.get()) {
        return Ok((1, text.chars().count()));
    }
    let list: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::invalid_param("input", "'input' must be a string or a list of input items."))?;
    let mut chars = 0;
    for (i, raw_item) in list.iter().enumerate() {
        let item: Item = serde_json::from_str(raw_item.get()).map_err(|_| {
            ApiError::invalid_param(format!("input[{i}]"), format!("input[{i}] must be an input item (an object)."))
        })?;
        match &item.role {
            None | Some(Value::Null) if item.kind.is_none() => {
                return Err(ApiError::invalid_param(
                    format!("input[{i}]"),
                    format!("input[{i}] must have a 'type' or a 'role'."),
                ))
            }
            None | Some(Value::Null) => {}
            Some(Value::String(role)) if ["user", "assistant", "system", "developer"].contains(&role.as_str()) => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("input[{i}].role"),
                    format!("input[{i}].role must be one of user, assistant, system, developer."),
                ))
            }
        }
        chars += content_chars(item.content)
            + item.name.map_or(0, |n| n.chars().count())
            + item.arguments.map_or(0, |a| a.chars().count())
            + content_chars(item.output);
    }
    Ok((list.len(), chars))
}

/// Responses `tools`: a list of tool objects, each naming its `type` (their contents pass through).
fn check_tools(raw: Option<&RawValue>) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    struct Tool<'a> {
        #[serde(borrow, rename = "type")]
        kind: Cow<'a, str>,
    }
    let Some(raw) = raw.filter(|r| r.get() != "null") else { return Ok(()) };
    let list: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::invalid_param("tools", "'tools' must be a list of tools."))?;
    for (i, tool) in list.iter().enumerate() {
        if serde_json::from_str::<Tool>(tool.get()).map_or(true, |t| t.kind.is_empty()) {
            return Err(ApiError::invalid_param(
                format!("tools[{i}]"),
                format!("tools[{i}] must be an object with a string 'type'."),
            ));
        }
    }
    Ok(())
}

/// Characters of a field as the client wrote it (0 when absent or null): definitions the model reads whole.
fn raw_len(fields: &Fields, field: &str) -> usize {
    fields.get(field).map_or(0, |v| if v.get() == "null" { 0 } else { v.get().len() })
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

    fn check(body: Value) -> Result<ModelRequest, ApiError> {
        validate(Endpoint::ChatCompletions, body.to_string().as_bytes(), &config())
    }

    /// What would be sent upstream, as JSON.
    fn sent(r: &ModelRequest) -> Value {
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
            let e = validate(Endpoint::ChatCompletions, raw, &config()).expect_err("must fail");
            assert_eq!(e.status, 400);
            assert_eq!(e.param, None);
        }
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let raw = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(validate(Endpoint::ChatCompletions, raw.as_bytes(), &config()).err().map(|e| e.status), Some(400));
        let raw = format!("{{\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(validate(Endpoint::ChatCompletions, raw.as_bytes(), &config()).err().map(|e| e.status), Some(400));
    }

    #[test]
    fn raw_fields_keep_their_exact_text_and_big_contents_are_counted_not_built() {
        let image = "A".repeat(1_000_000);
        let raw = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"héllo"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],"seed":1.50,"x":"\u00e9"}}"#
        );
        let r = validate(Endpoint::ChatCompletions, raw.as_bytes(), &config()).expect("valid");
        assert_eq!(r.prompt_chars, 5);
        assert!(r.forward_body.contains(r#""seed":1.50"#), "numbers keep their spelling");
        assert!(r.forward_body.contains(r#""x":"\u00e9""#), "escapes are kept as sent");
        assert!(r.forward_body.contains(&image));
        assert_eq!(r.input_json.len(), raw.len() - r#"{"messages":,"seed":1.50,"x":"\u00e9"}"#.len());
    }

    fn check_at(endpoint: Endpoint, body: Value) -> Result<ModelRequest, ApiError> {
        validate(endpoint, body.to_string().as_bytes(), &config())
    }

    fn param_at(endpoint: Endpoint, body: Value) -> Option<String> {
        check_at(endpoint, body).err().and_then(|e| {
            assert_eq!(e.status, 400);
            e.param.map(String::from)
        })
    }

    #[test]
    fn responses_take_a_string_or_items_and_bound_max_output_tokens() {
        let r = check_at(Endpoint::Responses, json!({"model": "m/x", "input": "hello", "instructions": "Be brief."}))
            .expect("valid");
        assert_eq!((r.endpoint, r.max_tokens, r.choices), (Endpoint::Responses, 1000, 1));
        assert_eq!(sent(&r)["max_output_tokens"], 1000, "the default is forwarded");
        assert_eq!(sent(&r).get("max_tokens"), None);
        assert_eq!(r.prompt_chars, 5 + 9);
        assert_eq!(r.framing_tokens, 4 + 3);
        assert_eq!(r.input_json, "\"hello\"");
        let items = json!([
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "abc"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
        ]);
        let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
        let body = json!({"model": "m/x", "input": items, "tools": tools, "max_output_tokens": 50, "stream": true,
            "store": false, "previous_response_id": "resp_1", "reasoning": {"effort": "low"}});
        let r = check_at(Endpoint::Responses, body.clone()).expect("valid");
        assert_eq!(r.prompt_chars, 2 + 3 + 1 + 2 + 5 + tools.to_string().len());
        assert_eq!((r.max_tokens, r.stream, r.include_usage), (50, true, false));
        for field in ["input", "tools", "store", "previous_response_id", "reasoning"] {
            assert_eq!(sent(&r)[field], body[field], "{field} passes through");
        }
        // Continuing a stored response needs no new input.
        assert!(check_at(Endpoint::Responses, json!({"model": "m", "previous_response_id": "resp_1"})).is_ok());
        assert_eq!(param_at(Endpoint::Responses, json!({"model": "m"})).as_deref(), Some("input"));
        assert_eq!(param_at(Endpoint::Responses, json!({"input": 7})).as_deref(), Some("input"));
        assert_eq!(param_at(Endpoint::Responses, json!({"input": [1]})).as_deref(), Some("input[0]"));
        assert_eq!(param_at(Endpoint::Responses, json!({"input": [{"content": "x"}]})).as_deref(), Some("input[0]"));
        assert_eq!(
            param_at(Endpoint::Responses, json!({"input": [{"role": "robot", "content": "x"}]})).as_deref(),
            Some("input[0].role")
        );
        assert_eq!(
            param_at(Endpoint::Responses, json!({"input": "x", "instructions": 1})).as_deref(),
            Some("instructions")
        );
        assert_eq!(param_at(Endpoint::Responses, json!({"input": "x", "tools": {}})).as_deref(), Some("tools"));
        assert_eq!(param_at(Endpoint::Responses, json!({"input": "x", "tools": [{}]})).as_deref(), Some("tools[0]"));
        assert_eq!(
            param_at(Endpoint::Responses, json!({"input": "x", "max_output_tokens": 9000})).as_deref(),
            Some("max_output_tokens")
        );
        assert_eq!(param_at(Endpoint::Responses, json!({"input": "x", "stream": "yes"})).as_deref(), Some("stream"));
    }

    #[test]
    fn embeddings_inputs_are_strings_or_token_ids_bounded_in_count_and_size() {
        let r = check_at(Endpoint::Embeddings, json!({"model": "e/x", "input": "héllo"})).expect("valid");
        assert_eq!(
            (r.endpoint, r.max_tokens, r.stream, r.prompt_chars, r.framing_tokens),
            (Endpoint::Embeddings, 0, false, 5, 0)
        );
        assert_eq!(sent(&r), json!({"model": "e/x", "input": "héllo"}), "nothing is added");
        let r = check_at(
            Endpoint::Embeddings,
            json!({"model": "e/x", "input": ["ab", "cde"], "encoding_format": "base64",
            "dimensions": 8}),
        )
        .expect("valid");
        assert_eq!(r.prompt_chars, 5);
        let r = check_at(Endpoint::Embeddings, json!({"model": "e/x", "input": [1, 2, 3]})).expect("valid");
        assert_eq!((r.prompt_chars, r.prompt_token_ids), (0, 3));
        let r = check_at(Endpoint::Embeddings, json!({"model": "e/x", "input": [[1, 2], [3]]})).expect("valid");
        assert_eq!(r.prompt_token_ids, 3);
        // `stream` means nothing here: never streamed.
        assert!(
            !check_at(Endpoint::Embeddings, json!({"model": "e", "input": "x", "stream": true})).expect("valid").stream
        );
        for (body, param) in [
            (json!({"input": "x"}), "model"),
            (json!({"model": "e"}), "input"),
            (json!({"model": "e", "input": ""}), "input"),
            (json!({"model": "e", "input": []}), "input"),
            (json!({"model": "e", "input": ["a", ""]}), "input"),
            (json!({"model": "e", "input": [[1], []]}), "input"),
            (json!({"model": "e", "input": [1, "a"]}), "input"),
            (json!({"model": "e", "input": [-1]}), "input"),
            (json!({"model": "e", "input": {"text": "a"}}), "input"),
            (json!({"model": "e", "input": vec!["a"; MAX_INPUTS + 1]}), "input"),
            (json!({"model": "e", "input": "x".repeat(4 * MAX_EMBEDDING_TOKENS as usize + 4)}), "input"),
            (json!({"model": "e", "input": "x", "encoding_format": "int8"}), "encoding_format"),
            (json!({"model": "e", "input": "x", "dimensions": 0}), "dimensions"),
            (json!({"model": 7, "input": "x"}), "model"),
        ] {
            assert_eq!(param_at(Endpoint::Embeddings, body.clone()).as_deref(), Some(param), "{body}");
        }
        assert!(check_at(Endpoint::Embeddings, json!({"model": "e", "input": vec!["a"; MAX_INPUTS]})).is_ok());
    }

    #[test]
    fn legacy_completions_bound_every_choice_of_every_prompt() {
        let r = check_at(Endpoint::Completions, json!({"model": "m/x", "prompt": "Say hi"})).expect("valid");
        assert_eq!((r.endpoint, r.max_tokens, r.choices, r.prompt_chars), (Endpoint::Completions, 1000, 1, 6));
        assert_eq!(sent(&r)["max_tokens"], 1000);
        let r = check_at(
            Endpoint::Completions,
            json!({"model": "m/x", "prompt": ["a", "b", [1, 2]], "n": 2,
            "best_of": 3, "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}, "suffix": "!"}),
        )
        .expect("valid");
        assert_eq!((r.choices, r.max_tokens, r.prompt_token_ids, r.prompt_chars), (9, 10, 2, 2));
        assert!(r.stream && r.include_usage);
        assert_eq!(sent(&r)["suffix"], "!");
        assert_eq!(param_at(Endpoint::Completions, json!({"model": "m"})).as_deref(), Some("prompt"));
        assert_eq!(param_at(Endpoint::Completions, json!({"prompt": {"a": 1}})).as_deref(), Some("prompt"));
        assert_eq!(
            param_at(Endpoint::Completions, json!({"prompt": "x", "best_of": 1, "n": 2})).as_deref(),
            Some("best_of")
        );
        assert_eq!(
            param_at(Endpoint::Completions, json!({"prompt": "x", "max_tokens": 0})).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(param_at(Endpoint::Completions, json!({"prompt": "x", "n": 0})).as_deref(), Some("n"));
        // The default model is filled in, as for chat.
        assert_eq!(
            sent(&check_at(Endpoint::Completions, json!({"prompt": "x"})).expect("valid"))["model"],
            "default/model"
        );
    }
}
