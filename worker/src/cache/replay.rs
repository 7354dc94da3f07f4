//! A stored chat completion played as the stream a streamed request expects: per choice a chunk carrying its
//! whole message (role, content, reasoning, tool calls with their `index`, logprobs) and a chunk with its finish
//! reason, then the usage-only chunk when the client asked for it (`stream_options.include_usage`), then
//! `[DONE]`. Each chunk carries the answer's own `id`, `created`, `model` (and `provider`, …), as the upstream's
//! chunks did.

use serde_json::{json, Map, Value};

/// The SSE body of the replay.
pub fn stream(answer: &Value, include_usage: bool) -> String {
    let head: Map<String, Value> = answer
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(field, _)| !matches!(field.as_str(), "object" | "choices" | "usage"))
        .map(|(field, value)| (field.clone(), value.clone()))
        .collect();
    let chunk = |choices: Value| {
        let mut chunk = head.clone();
        chunk.insert("object".into(), "chat.completion.chunk".into());
        chunk.insert("choices".into(), choices);
        Value::Object(chunk)
    };
    let mut events = Vec::new();
    for (position, choice) in answer["choices"].as_array().into_iter().flatten().enumerate() {
        let index = choice.get("index").cloned().unwrap_or_else(|| json!(position));
        let mut opening = json!({"index": index, "delta": delta(&choice["message"]), "finish_reason": null});
        if let Some(logprobs) = choice.get("logprobs").filter(|l| !l.is_null()) {
            opening["logprobs"] = logprobs.clone();
        }
        events.push(chunk(json!([opening])));
        let mut closing = Map::new();
        closing.insert("index".into(), index);
        closing.insert("delta".into(), json!({}));
        for (field, value) in choice.as_object().into_iter().flatten() {
            if !matches!(field.as_str(), "index" | "message" | "logprobs") {
                closing.insert(field.clone(), value.clone());
            }
        }
        events.push(chunk(json!([closing])));
    }
    if include_usage {
        let mut usage = chunk(json!([]));
        usage["usage"] = answer["usage"].clone();
        events.push(usage);
    }
    let mut body: String = events.iter().map(|event| format!("data: {event}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

/// A whole message as one delta: its fields that are set, each tool call numbered.
fn delta(message: &Value) -> Value {
    let mut delta = Map::new();
    for (field, value) in message.as_object().into_iter().flatten() {
        match (field.as_str(), value) {
            (_, Value::Null) => {}
            ("tool_calls", Value::Array(calls)) => {
                let numbered = calls
                    .iter()
                    .enumerate()
                    .map(|(index, call)| {
                        let mut call = call.clone();
                        if let Some(call) = call.as_object_mut() {
                            call.insert("index".into(), json!(index));
                        }
                        call
                    })
                    .collect();
                delta.insert(field.clone(), Value::Array(numbered));
            }
            _ => {
                delta.insert(field.clone(), value.clone());
            }
        }
    }
    Value::Object(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::assemble::Assembly;

    fn events(body: &str) -> Vec<&str> {
        body.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.trim_start_matches("data: ")).collect()
    }

    fn answer() -> Value {
        json!({"id": "gen-1", "object": "chat.completion", "created": 7, "model": "m", "provider": "P",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                 "native_finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": null, "reasoning": "hm", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                 "finish_reason": "tool_calls", "logprobs": {"content": [{"token": "x"}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.0}})
    }

    #[test]
    fn a_stored_answer_replays_as_chunks_then_usage_then_done() {
        let body = stream(&answer(), true);
        let events = events(&body);
        assert_eq!(events.len(), 6);
        let first: Value = serde_json::from_str(events[0]).expect("json");
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!((first["id"].as_str(), first["provider"].as_str()), (Some("gen-1"), Some("P")));
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": "Hello"}));
        assert!(first["choices"][0]["finish_reason"].is_null());
        let closing: Value = serde_json::from_str(events[1]).expect("json");
        assert_eq!(closing["choices"][0]["finish_reason"], "stop");
        let tool: Value = serde_json::from_str(events[2]).expect("json");
        assert_eq!(tool["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
        let usage: Value = serde_json::from_str(events[4]).expect("json");
        assert_eq!((usage["choices"].clone(), usage["usage"]["total_tokens"].clone()), (json!([]), json!(4)));
        assert_eq!(events[5], "[DONE]");
        assert!(!stream(&answer(), false).contains("\"usage\""), "no usage chunk unless asked");
    }

    #[test]
    fn a_replay_assembles_back_into_the_same_answer() {
        let original = answer();
        let mut assembly = Assembly::new();
        for event in events(&stream(&original, true)).into_iter().filter(|e| *e != "[DONE]") {
            assembly.push(event.as_bytes());
        }
        assert_eq!(assembly.finish(), Some(original));
    }
}
