//! The OpenAI API's request and response shapes that roe serves (completions, chat
//! completions, models), with roe's extension field `roe` on requests (routing examples and
//! options) and responses (the routing evidence). Fields a request may carry are listed in
//! [`COMPLETION_FIELDS`] and [`CHAT_FIELDS`]; anything else is refused with a 400 naming it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};

/// The model name of the bare backbone.
pub const BASE_MODEL: &str = "base";
/// The model name that routes each request to the expert that fits it.
pub const AUTO_MODEL: &str = "auto";

/// Fields of a completion request, and what the ones roe does not implement must be for the
/// request to go on (their no-op value): never silently ignored.
pub const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "user",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
    "roe",
    "truncate",
];

pub const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "roe",
    "truncate",
];

/// Checks a request object's fields: unknown ones, and known ones roe cannot honour unless
/// they hold their no-op value (`n: 1`, `presence_penalty: 0`, `echo: false`, ...).
pub fn check_fields(body: &Value, known: &[&str]) -> ApiResult<()> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    };
    for (name, value) in map {
        if !known.contains(&name.as_str()) {
            return Err(ApiError::unsupported(
                &quote_name(name),
                "unknown field (roe implements the fields its API description lists)",
            ));
        }
        let no_op = match name.as_str() {
            "n" | "best_of" => value.is_null() || value.as_u64() == Some(1),
            "presence_penalty" | "frequency_penalty" => {
                value.is_null() || value.as_f64() == Some(0.0)
            }
            "echo" => value.is_null() || value.as_bool() == Some(false),
            "logit_bias" => value.is_null() || value.as_object().is_some_and(|m| m.is_empty()),
            "suffix" => value.is_null() || value.as_str() == Some(""),
            _ => true,
        };
        if !no_op {
            let why = match name.as_str() {
                "n" | "best_of" => "only 1 is supported: send one request per completion",
                "echo" => "not supported (the prompt is not returned)",
                "suffix" => "not supported (no insertion)",
                _ => "not supported: sampling has no penalties or biases here",
            };
            return Err(ApiError::unsupported(name, why));
        }
    }
    Ok(())
}

/// A client's field name, safe to quote in a message.
fn quote_name(name: &str) -> String {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Options of a streamed response (with `stream: true` only, as OpenAI has it).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage counts before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// An example input of a task, for routing: a string or `{input, choices, target}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RoeQuery {
    Text(String),
    Labeled {
        input: String,
        #[serde(default)]
        choices: Vec<String>,
        #[serde(default)]
        target: Option<String>,
    },
}

/// roe's extension of a request.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoeRequestOptions {
    /// With `model: "auto"`: example inputs of the task to route by, instead of the request's
    /// own text (the paper's Q queries). At most the Router's query limit.
    #[serde(default)]
    pub queries: Vec<RoeQuery>,
    /// With `model: "auto"`: routing options, as the gRPC `RouteOptions` message in its JSON
    /// form (e.g. `{"abstainThreshold": 0.5, "kind": "EXPERT_KIND_LORA"}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub route: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// An expert id, "base" (the bare backbone) or "auto" (routed).
    pub model: String,
    pub prompt: OneOrMany,
    /// Tokens to generate at most (default: the server's, 64).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Default 1 (sampling), as OpenAI; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// 0: the sampled tokens' log-probabilities (no alternatives: more is refused).
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub roe: Option<RoeRequestOptions>,
    /// roe's extension, as text-embeddings-inference's `truncate`: a prompt longer than the
    /// backbone's context (less `max_tokens`) keeps its last tokens that fit, and
    /// `usage.truncated_prompt_tokens` says how many were cut. Without it such a prompt is
    /// refused with 400 `context_length_exceeded`.
    #[serde(default)]
    pub truncate: bool,
}

/// Message content: a string or a list of text parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// "system" (or "developer"), "user" or "assistant".
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// An expert id, "base" (the backbone with its chat template) or "auto" (routed).
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0 only: the backbone gives the sampled token's log-probability, no alternatives.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub roe: Option<RoeRequestOptions>,
    /// roe's extension, as text-embeddings-inference's `truncate`: a prompt longer than the
    /// backbone's context (less `max_tokens`) keeps its last tokens that fit, and
    /// `usage.truncated_prompt_tokens` says how many were cut. Without it such a prompt is
    /// refused with 400 `context_length_exceeded`.
    #[serde(default)]
    pub truncate: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// roe's extension, only when the request asked to `truncate`: prompt tokens cut from
    /// the front (not counted in `prompt_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_prompt_tokens: Option<u32>,
}

/// An expert that routing ranked, for the evidence.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RankedExpert {
    pub expert_id: String,
    /// Its share of the evidence (the winner's decides whether routing abstains).
    pub share: f32,
    pub score: f32,
}

/// roe's extension of a response: which expert answered and why.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoeResponseInfo {
    /// The expert that answered; "base" for the bare backbone.
    pub expert_id: String,
    /// Whether the request was routed (`model: "auto"`).
    pub routed: bool,
    /// Whether routing abstained and the server's fallback answered.
    pub fell_back: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fallback_reason: String,
    /// The winner's share of the evidence (absent when nothing was routed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub winner_share: Option<f32>,
    /// The experts ranked after the winner (at most 4).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runners_up: Vec<RankedExpert>,
    /// The whole routing result, as the gRPC `RouteResponse` in its JSON form.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub routing: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Always null: the backbone gives no alternatives.
    #[schema(value_type = Option<Object>)]
    pub top_logprobs: Option<Value>,
    pub text_offset: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    /// "stop" (an end token or a stop string) or "length"; null while streaming.
    pub finish_reason: Option<String>,
    /// The routing of this prompt (with `model: "auto"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roe: Option<RoeResponseInfo>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// "text_completion".
    pub object: &'static str,
    pub created: u64,
    /// The expert that answered ("base" for the bare backbone); "auto" when the prompts of
    /// one request went to different experts (each choice's `roe` says which).
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roe: Option<RoeResponseInfo>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// Always empty: the backbone gives no alternatives.
    pub top_logprobs: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// "chat.completion".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roe: Option<RoeResponseInfo>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// "chat.completion.chunk".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// In the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roe: Option<RoeResponseInfo>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// "model".
    pub object: &'static str,
    /// Unix seconds (the expert's registration; the server's start for base and auto).
    pub created: u64,
    pub owned_by: String,
    /// The backbone the model runs on (null for the backbone itself).
    pub parent: Option<String>,
    pub root: String,
    /// "prompt" or "lora" (experts), "backbone" (base) or "router" (auto).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// "list".
    pub object: &'static str,
    pub data: Vec<Model>,
}
