//! A streamed chat completion put back together as the `chat.completion` a non-streamed request gets, so that a
//! streamed answer can be stored and served to either kind of request. The gateway reads every event of the
//! stream anyway (billing does); this keeps what the answer says, only while a store is planned.
//!
//! Deltas are merged as OpenAI's SDKs merge them: `content`, `refusal` and OpenRouter's `reasoning` are appended,
//! tool calls are gathered by their `index` (their `arguments` appended, `id`, `type` and `name` kept), logprobs
//! lists are joined, and the other fields of a choice (`finish_reason`, `native_finish_reason`) and of the chunk
//! (`id`, `model`, `created`, `provider`, …) are kept. A delta field it does not know how to merge (OpenRouter's
//! `reasoning_details`, `annotations`, audio, …) makes the answer one it cannot put back faithfully: it is not
//! stored (the same answer asked for without streaming is).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::MAX_ENTRY_BYTES;

#[derive(Debug, Default)]
pub struct Assembly {
    /// The chunks' own fields (`id`, `model`, `created`, …): the first value seen of each.
    top: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
    bytes: usize,
    failed: bool,
}

#[derive(Debug, Default)]
struct Choice {
    message: Map<String, Value>,
    tool_calls: BTreeMap<u64, ToolCall>,
    /// `finish_reason` and the choice's other fields: the last value seen of each.
    fields: Map<String, Value>,
    logprobs: Option<Map<String, Value>>,
}

#[derive(Debug, Default)]
struct ToolCall {
    fields: Map<String, Value>,
    name: String,
    arguments: String,
}

impl Assembly {
    pub fn new() -> Assembly {
        Assembly::default()
    }

    /// One event's data: a `chat.completion.chunk` as JSON.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        self.bytes += data.len();
        let merged = self.bytes <= MAX_ENTRY_BYTES && self.merge_chunk(data).is_some();
        if !merged {
            *self = Assembly { failed: true, ..Assembly::default() };
        }
    }

    /// The whole completion; `None` if some event could not be put back (or there was none).
    pub fn finish(self) -> Option<Value> {
        if self.failed || self.choices.is_empty() {
            return None;
        }
        let mut answer = self.top;
        answer.insert("object".into(), "chat.completion".into());
        let choices = self.choices.into_iter().map(|(index, choice)| choice.finish(index)).collect();
        answer.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            answer.insert("usage".into(), usage);
        }
        Some(Value::Object(answer))
    }

    fn merge_chunk(&mut self, data: &[u8]) -> Option<()> {
        let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else { return None };
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            return None;
        }
        for (field, value) in chunk {
            match field.as_str() {
                "choices" => {
                    for choice in value.as_array()? {
                        self.merge_choice(choice.as_object()?)?;
                    }
                }
                "usage" if !value.is_null() => self.usage = Some(value),
                "object" | "usage" => {}
                _ if value.is_null() => {}
                _ => {
                    self.top.entry(field).or_insert(value);
                }
            }
        }
        Some(())
    }

    fn merge_choice(&mut self, choice: &Map<String, Value>) -> Option<()> {
        let index = choice.get("index").map_or(Some(0), Value::as_u64)?;
        let parts = self.choices.entry(index).or_default();
        for (field, value) in choice {
            match (field.as_str(), value) {
                ("index", _) | (_, Value::Null) => {}
                ("delta", Value::Object(delta)) => parts.merge_delta(delta)?,
                ("logprobs", Value::Object(logprobs)) => {
                    let kept = parts.logprobs.get_or_insert_with(Map::new);
                    for (list, items) in logprobs {
                        match items {
                            Value::Null => {}
                            Value::Array(items) => {
                                let Value::Array(all) =
                                    kept.entry(list.clone()).or_insert_with(|| Value::Array(vec![]))
                                else {
                                    return None;
                                };
                                all.extend(items.iter().cloned());
                            }
                            _ => return None,
                        }
                    }
                }
                ("delta" | "logprobs", _) => return None,
                _ => {
                    parts.fields.insert(field.clone(), value.clone());
                }
            }
        }
        Some(())
    }
}

impl Choice {
    fn merge_delta(&mut self, delta: &Map<String, Value>) -> Option<()> {
        for (field, value) in delta {
            match (field.as_str(), value) {
                (_, Value::Null) => {}
                ("role", Value::String(_)) => {
                    self.message.insert(field.clone(), value.clone());
                }
                ("content" | "refusal" | "reasoning", Value::String(text)) => match self.message.get_mut(field) {
                    Some(Value::String(kept)) => kept.push_str(text),
                    _ => {
                        self.message.insert(field.clone(), value.clone());
                    }
                },
                ("tool_calls", Value::Array(calls)) => {
                    for (position, call) in calls.iter().enumerate() {
                        let call = call.as_object()?;
                        let index = call.get("index").map_or(Some(position as u64), Value::as_u64)?;
                        self.tool_calls.entry(index).or_default().merge(call)?;
                    }
                }
                // A piece of the answer this cannot put back.
                (_, Value::String(s)) if s.is_empty() => {}
                (_, Value::Array(items)) if items.is_empty() => {}
                _ => return None,
            }
        }
        Some(())
    }

    fn finish(self, index: u64) -> Value {
        let mut message = self.message;
        message.entry("role").or_insert_with(|| "assistant".into());
        message.entry("content").or_insert(Value::Null);
        if !self.tool_calls.is_empty() {
            let calls = self.tool_calls.into_values().map(ToolCall::finish).collect();
            message.insert("tool_calls".into(), Value::Array(calls));
        }
        let mut choice = Map::new();
        choice.insert("index".into(), index.into());
        choice.insert("message".into(), Value::Object(message));
        choice.extend(self.fields);
        if let Some(logprobs) = self.logprobs {
            choice.insert("logprobs".into(), Value::Object(logprobs));
        }
        Value::Object(choice)
    }
}

impl ToolCall {
    fn merge(&mut self, call: &Map<String, Value>) -> Option<()> {
        for (field, value) in call {
            match (field.as_str(), value) {
                ("index", _) | (_, Value::Null) => {}
                ("function", Value::Object(function)) => {
                    for (part, value) in function {
                        match (part.as_str(), value) {
                            (_, Value::Null) => {}
                            ("arguments", Value::String(more)) => self.arguments.push_str(more),
                            ("name", Value::String(name)) if !name.is_empty() => self.name = name.clone(),
                            ("name", Value::String(_)) => {}
                            _ => return None,
                        }
                    }
                }
                ("id" | "type", Value::String(_)) => {
                    self.fields.insert(field.clone(), value.clone());
                }
                _ => return None,
            }
        }
        Some(())
    }

    fn finish(self) -> Value {
        let mut call = self.fields;
        call.entry("type").or_insert_with(|| "function".into());
        let function = serde_json::json!({"name": self.name, "arguments": self.arguments});
        call.insert("function".into(), function);
        Value::Object(call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assemble(chunks: &[Value]) -> Option<Value> {
        let mut assembly = Assembly::new();
        for chunk in chunks {
            assembly.push(chunk.to_string().as_bytes());
        }
        assembly.finish()
    }

    fn chunk(choices: Value) -> Value {
        json!({"id": "gen-9", "object": "chat.completion.chunk", "created": 5, "model": "m/served",
               "provider": "P", "choices": choices})
    }

    #[test]
    fn content_deltas_become_one_message_with_the_usage() {
        let answer = assemble(&[
            chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}])),
            chunk(json!([{"index": 0, "delta": {"content": "lo"}, "finish_reason": null, "logprobs": null}])),
            chunk(json!([{"index": 0, "delta": {"content": ""}, "finish_reason": "stop", "native_finish_reason": "stop"}])),
            json!({"id": "gen-9", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": 0.1}}),
        ])
        .expect("assembled");
        assert_eq!(
            answer,
            json!({"id": "gen-9", "object": "chat.completion", "created": 5, "model": "m/served", "provider": "P",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "finish_reason": "stop", "native_finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": 0.1}})
        );
    }

    #[test]
    fn tool_calls_reasoning_choices_and_logprobs_are_gathered() {
        let answer = assemble(&[
            chunk(json!([{"index": 1, "delta": {"role": "assistant", "content": null, "reasoning": "Think"}}])),
            chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": "A",
                          "logprobs": null}, "logprobs": {"content": [{"token": "A", "logprob": -0.1}]}}])),
            chunk(json!([{"index": 1, "delta": {"reasoning": "ing", "tool_calls": [{"index": 0, "id": "call_1",
                          "type": "function", "function": {"name": "get", "arguments": ""}}]}}])),
            chunk(json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}}])),
            chunk(json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}])),
            chunk(json!([{"index": 0, "delta": {"content": "B"}, "logprobs": {"content": [{"token": "B"}]},
                          "finish_reason": "length"}])),
            chunk(json!([{"index": 1, "delta": {}, "finish_reason": "tool_calls"}])),
        ])
        .expect("assembled");
        let choices = answer["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 2);
        assert_eq!(choices[0]["message"], json!({"role": "assistant", "content": "AB"}));
        assert_eq!(choices[0]["logprobs"]["content"].as_array().map(Vec::len), Some(2));
        assert_eq!(choices[0]["finish_reason"], "length");
        assert_eq!(
            choices[1]["message"],
            json!({"role": "assistant", "content": null, "reasoning": "Thinking", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"a\":1}"}}]})
        );
        assert_eq!(choices[1]["finish_reason"], "tool_calls");
        assert!(answer.get("usage").is_none(), "no usage chunk: none (and so not storable)");
    }

    #[test]
    fn what_cannot_be_put_back_is_refused() {
        let ok = chunk(json!([{"index": 0, "delta": {"content": "x"}}]));
        let unknown = chunk(json!([{"index": 0, "delta": {"reasoning_details": [{"type": "reasoning.text"}]}}]));
        assert!(assemble(&[ok.clone(), unknown]).is_none());
        let empty_unknown = chunk(json!([{"index": 0, "delta": {"annotations": [], "audio": null}}]));
        assert!(assemble(&[ok.clone(), empty_unknown]).is_some());
        let error =
            json!({"error": {"message": "boom"}, "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]});
        assert!(assemble(&[ok.clone(), error]).is_none());
        let mut assembly = Assembly::new();
        assembly.push(b"{not json");
        assembly.push(ok.to_string().as_bytes());
        assert!(assembly.finish().is_none(), "a failure is final");
        assert!(assemble(&[]).is_none());
    }
}
