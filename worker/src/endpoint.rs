//! The model APIs the gateway serves. Each goes through the same stages (auth → validate → admit → forward →
//! relay → settle → one usage event); this names them where they differ: the upstream path, the name in the
//! ledger, and how their answers are read.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`. Events queued before endpoints were recorded are chat completions.
    #[default]
    #[serde(rename = "chat/completions")]
    ChatCompletions,
    /// `POST /v1/completions`: legacy text completions (`prompt` in, `choices[].text` out).
    #[serde(rename = "completions")]
    Completions,
    /// `POST /v1/responses`: OpenAI's Responses API (`input` in, typed output items and events out).
    #[serde(rename = "responses")]
    Responses,
    /// `POST /v1/embeddings`: vectors for inputs; no output tokens, never streamed.
    #[serde(rename = "embeddings")]
    Embeddings,
}

impl Endpoint {
    /// The name in the ledger, the log and PostHog: the path after `/v1/` (and after OpenRouter's `/api/v1/`).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }

    /// PostHog's `$ai_span_name`: the SDK method a client called.
    pub fn span_name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialized_as_the_ledger_name_and_chat_when_absent() {
        for e in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Responses, Endpoint::Embeddings] {
            assert_eq!(serde_json::to_value(e).unwrap(), serde_json::json!(e.as_str()));
            assert_eq!(serde_json::from_value::<Endpoint>(serde_json::json!(e.as_str())).unwrap(), e);
        }
        #[derive(Deserialize)]
        struct Old {
            #[serde(default)]
            endpoint: Endpoint,
        }
        let old: Old = serde_json::from_str("{}").unwrap();
        assert_eq!(old.endpoint, Endpoint::ChatCompletions);
    }
}
