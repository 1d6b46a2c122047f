//! `POST /v1/completions` and `POST /v1/chat/completions`: OpenAI requests resolved to an
//! expert (by id, `base`, or routed with `auto`), run through the serving core's generation
//! queue, answered whole or streamed as server-sent events ending with `data: [DONE]`.
//!
//! Prompts: an expert (and `auto`) reads the canonical rendering it was trained on,
//! `input + "\nAnswer:"`; for a chat, `input` is the messages' contents joined by blank
//! lines. `base` continues a completion prompt as it is, and reads a chat through the
//! backbone's own chat template.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use roe_backbone::{ChatMessage, FinishReason, GeneratedToken};
use roe_expert_library::Query;
use roe_services::convert::{route_overrides, route_result_to_proto};
use roe_services::proto;
use roe_serving::{
    ErrorKind, GenerateOptions, GenerateRequest, PromptFormat, PromptUsage, TokenStream,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use crate::error::{ApiError, ApiResult};
use crate::openai::*;
use crate::HttpState;

/// Fields the core names that an OpenAI request calls otherwise.
const COMPLETION_RENAMES: &[(&str, &str)] =
    &[("max_new_tokens", "max_tokens"), ("input", "prompt")];
const CHAT_RENAMES: &[(&str, &str)] = &[("max_new_tokens", "max_tokens"), ("input", "messages")];

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id: unique within the process, ordered by time.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos:x}{:04x}",
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The model name a response gives for an expert id ("" is the bare backbone).
fn model_name(expert_id: &str) -> String {
    if expert_id.is_empty() {
        BASE_MODEL.to_string()
    } else {
        expert_id.to_string()
    }
}

/// Where one prompt goes: its expert ("" = the bare backbone) and, when routed, why.
struct Target {
    expert_id: String,
    info: Option<RoeResponseInfo>,
}

/// Resolves `model` for a request whose own text (for routing) is `text`.
async fn target(
    state: &HttpState,
    model: &str,
    text: &str,
    roe: Option<&RoeRequestOptions>,
) -> ApiResult<Target> {
    let routes = roe.is_some_and(|r| !r.queries.is_empty() || r.route.is_some());
    match model {
        "" => Err(ApiError::invalid(
            "model",
            "required: an expert id, \"base\" or \"auto\"",
        )),
        AUTO_MODEL => route(state, text, roe.cloned().unwrap_or_default()).await,
        _ if routes => Err(ApiError::invalid(
            "roe",
            "queries and route options apply to model \"auto\" only",
        )),
        BASE_MODEL => Ok(Target {
            expert_id: String::new(),
            info: None,
        }),
        id => {
            roe_serving::check_expert_id("model", id)?;
            Ok(Target {
                expert_id: id.to_string(),
                info: None,
            })
        }
    }
}

/// Routes by the request's examples (`roe.queries`), or by its own text as one query.
async fn route(state: &HttpState, text: &str, roe: RoeRequestOptions) -> ApiResult<Target> {
    let answerer = state.answerer()?;
    let queries: Vec<Query> = if roe.queries.is_empty() {
        vec![Query {
            input: text.to_string(),
            choices: vec![],
            target: None,
        }]
    } else {
        roe.queries
            .into_iter()
            .map(|q| match q {
                RoeQuery::Text(input) => Query {
                    input,
                    choices: vec![],
                    target: None,
                },
                RoeQuery::Labeled {
                    input,
                    choices,
                    target,
                } => Query {
                    input,
                    choices,
                    target,
                },
            })
            .collect()
    };
    let options = match roe.route {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<proto::RouteOptions>(v)
                .map_err(|e| ApiError::invalid("roe.route", e))?,
        ),
    };
    let overrides = route_overrides(options, "roe.route")?;
    let chosen = answerer
        .choose(queries, overrides)
        .await
        .map_err(|e| ApiError::from(e).renamed(&[("queries", "roe.queries")]))?;
    let winner_share = chosen.routing.winner().map(|w| w.share);
    let runners_up = chosen
        .routing
        .ranked
        .iter()
        .skip(usize::from(!chosen.fell_back))
        .take(4)
        .map(|r| RankedExpert {
            expert_id: r.expert_id.clone(),
            share: r.share,
            score: r.score,
        })
        .collect();
    let routing = serde_json::to_value(route_result_to_proto(chosen.routing)).ok();
    Ok(Target {
        info: Some(RoeResponseInfo {
            expert_id: model_name(&chosen.expert_id),
            routed: true,
            fell_back: chosen.fell_back,
            fallback_reason: chosen.fallback_reason,
            winner_share,
            runners_up,
            routing,
        }),
        expert_id: chosen.expert_id,
    })
}

/// Sampling options of an OpenAI request, OpenAI's defaults (temperature 1) where unset.
fn options(
    max_tokens: Option<u32>,
    max_field: &str,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
) -> ApiResult<GenerateOptions> {
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(max_field, "must be at least 1"));
    }
    let seed = match seed {
        Some(s) if s < 0 => return Err(ApiError::invalid("seed", "must not be negative")),
        s => s.map(|s| s as u64),
    };
    Ok(GenerateOptions {
        max_new_tokens: max_tokens.unwrap_or(0),
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        seed,
        stop: stop.map(OneOrMany::into_vec).unwrap_or_default(),
    })
}

/// A generation ready to start.
struct Job {
    target: Target,
    input: String,
    format: PromptFormat,
    /// Cut a prompt that does not fit the context from the front (the request's `truncate`).
    truncate: bool,
}

/// Whether a response reports usage: always when whole, on request when streamed.
fn reports_usage(stream: bool, options: Option<&StreamOptions>) -> bool {
    !stream || options.is_some_and(|o| o.include_usage)
}

/// `stream_options` without `stream: true` would be ignored: refused, as OpenAI refuses it.
fn check_stream_options(stream: bool, options: Option<&StreamOptions>) -> ApiResult<()> {
    if options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "only allowed when stream is true",
        ));
    }
    Ok(())
}

/// Starts `job`'s generation; returns its tokens and what was read of its prompt.
async fn start(
    state: &HttpState,
    job: &Job,
    options: &GenerateOptions,
    renames: &[(&str, &str)],
) -> ApiResult<(TokenStream, PromptUsage)> {
    let inference = state.inference()?;
    let started = inference
        .start_generation(GenerateRequest {
            expert_id: job.target.expert_id.clone(),
            input: job.input.clone(),
            format: job.format,
            options: options.clone(),
            truncate: job.truncate,
        })
        .await
        .map_err(|e| match e.kind {
            ErrorKind::NotFound => ApiError::not_found("model", e.message),
            _ => ApiError::from(e).renamed(renames),
        })?;
    Ok((started.tokens, started.usage))
}

/// A whole generation, read to its end.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<GeneratedToken>,
    finish: Option<FinishReason>,
}

async fn collect(mut stream: TokenStream) -> ApiResult<Collected> {
    let mut out = Collected::default();
    while let Some(token) = stream.recv().await {
        let token = token.map_err(ApiError::from)?;
        out.text.push_str(&token.text);
        if let Some(f) = token.finish {
            out.finish = Some(f);
        }
        out.tokens.push(token);
    }
    Ok(out)
}

fn completion_logprobs(tokens: &[GeneratedToken]) -> CompletionLogprobs {
    let mut offset = 0u32;
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.text.len() as u32;
    }
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.text.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs: None,
        text_offset,
    }
}

fn chat_logprobs(tokens: &[GeneratedToken]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| TokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.text.as_bytes().to_vec(),
                top_logprobs: Vec::new(),
            })
            .collect(),
    }
}

/// Usage counts; `truncated` (the prompt tokens cut) only when the request asked to truncate.
fn usage(prompt: PromptUsage, completion: usize, truncate: bool) -> Usage {
    Usage {
        prompt_tokens: prompt.prompt_tokens as u32,
        completion_tokens: completion as u32,
        total_tokens: (prompt.prompt_tokens + completion) as u32,
        truncated_prompt_tokens: truncate.then_some(prompt.truncated_tokens as u32),
    }
}

/// The prompt usage of several generations together.
fn total(usages: impl IntoIterator<Item = PromptUsage>) -> PromptUsage {
    usages
        .into_iter()
        .fold(PromptUsage::default(), |a, u| PromptUsage {
            prompt_tokens: a.prompt_tokens + u.prompt_tokens,
            truncated_tokens: a.truncated_tokens + u.truncated_tokens,
        })
}

/// The response's model: the one expert that answered, or "auto" when several did.
fn response_model(targets: &[&Target]) -> String {
    match targets.first() {
        Some(first) if targets.iter().all(|t| t.expert_id == first.expert_id) => {
            model_name(&first.expert_id)
        }
        _ => AUTO_MODEL.to_string(),
    }
}

/// An SSE event of `value` in JSON.
fn event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// An error in the middle of a stream: OpenAI's error body as one event.
fn error_event(e: ApiError) -> Event {
    let body = serde_json::json!({"error": {
        "message": e.message, "type": e.kind, "param": e.param, "code": e.code,
    }});
    event(&body)
}

/// Server-sent events from a producer that writes into `tx`; when the client goes away the
/// receiver is dropped, the producer's next send fails, and its generations stop.
fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn completions(
    State(state): State<HttpState>,
    body: crate::ApiJson<Value>,
) -> ApiResult<Response> {
    let body = body.0;
    check_fields(&body, COMPLETION_FIELDS)?;
    let req: CompletionRequest = crate::from_body(body)?;
    check_stream_options(req.stream, req.stream_options.as_ref())?;
    if req.logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported(
            "logprobs",
            "at most 0: the backbone gives the sampled tokens' log-probabilities, no \
             alternatives",
        ));
    }
    let opts = options(
        req.max_tokens,
        "max_tokens",
        req.temperature,
        req.top_p,
        req.seed,
        req.stop.clone(),
    )?;
    let prompts = req.prompt.into_vec();
    let most = state.limits().max_answer_generate_inputs;
    if prompts.is_empty() || prompts.len() > most {
        return Err(ApiError::invalid(
            "prompt",
            format!("1 to {most} prompts, got {}", prompts.len()),
        ));
    }
    let many = prompts.len() > 1;
    let mut jobs = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let t = target(&state, &req.model, &prompt, req.roe.as_ref())
            .await
            .map_err(|e| at(e, i, many))?;
        let format = if t.expert_id.is_empty() {
            PromptFormat::Raw
        } else {
            PromptFormat::Canonical
        };
        jobs.push(Job {
            target: t,
            input: prompt,
            format,
            truncate: req.truncate,
        });
    }
    let include_usage = reports_usage(req.stream, req.stream_options.as_ref());
    // Each prompt joins the batch already decoding (continuous batching).
    let mut started = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        started.push(
            start(&state, job, &opts, COMPLETION_RENAMES)
                .await
                .map_err(|e| at(e, i, many))?,
        );
    }
    let id = response_id("cmpl");
    let created = now_unix();
    let model = response_model(&jobs.iter().map(|j| &j.target).collect::<Vec<_>>());
    let with_logprobs = req.logprobs.is_some();
    let top_info = (!many).then(|| jobs[0].target.info.clone()).flatten();
    if !req.stream {
        let mut choices = Vec::with_capacity(started.len());
        let prompt_total = total(started.iter().map(|(_, u)| *u));
        let mut completion_total = 0;
        for (i, ((stream, _), job)) in started.into_iter().zip(&jobs).enumerate() {
            let c = collect(stream).await.map_err(|e| at(e, i, many))?;
            completion_total += c.tokens.len();
            choices.push(CompletionChoice {
                logprobs: with_logprobs.then(|| completion_logprobs(&c.tokens)),
                text: c.text,
                index: i as u32,
                finish_reason: Some(finish_name(c.finish.unwrap_or(FinishReason::Length)).into()),
                roe: if many { job.target.info.clone() } else { None },
            });
        }
        return Ok(Json(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: Some(usage(prompt_total, completion_total, req.truncate)),
            roe: top_info,
        })
        .into_response());
    }
    let infos: Vec<Option<RoeResponseInfo>> = jobs.into_iter().map(|j| j.target.info).collect();
    let truncate = req.truncate;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut streams = StreamMap::new();
        let prompt_total = total(started.iter().map(|(_, u)| *u));
        for (i, (stream, _)) in started.into_iter().enumerate() {
            streams.insert(i, UnboundedReceiverStream::new(stream));
        }
        let mut first = vec![true; infos.len()];
        let mut completion_total = 0;
        while let Some((i, token)) = streams.next().await {
            let ev = match token {
                Ok(t) => {
                    completion_total += 1;
                    let roe = std::mem::take(&mut first[i])
                        .then(|| infos[i].clone())
                        .flatten();
                    event(&Completion {
                        id: id.clone(),
                        object: "text_completion",
                        created,
                        model: model.clone(),
                        choices: vec![CompletionChoice {
                            logprobs: with_logprobs
                                .then(|| completion_logprobs(std::slice::from_ref(&t))),
                            text: t.text,
                            index: i as u32,
                            finish_reason: t.finish.map(|f| finish_name(f).to_string()),
                            roe: if many { roe.clone() } else { None },
                        }],
                        usage: None,
                        roe: if many { None } else { roe },
                    })
                }
                Err(e) => error_event(at(ApiError::from(e), i, many)),
            };
            if tx.send(ev).await.is_err() {
                return; // the client went away: dropping the streams stops the work
            }
        }
        if include_usage {
            let last = Completion {
                id,
                object: "text_completion",
                created,
                model,
                choices: vec![],
                usage: Some(usage(prompt_total, completion_total, truncate)),
                roe: None,
            };
            let _ = tx.send(event(&last)).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(sse(rx))
}

/// An error of the `i`-th prompt of a list names it.
fn at(e: ApiError, i: usize, many: bool) -> ApiError {
    if !many {
        return e;
    }
    match e.param.as_deref() {
        Some(p) if p.starts_with("prompt") => e.renamed(&[("prompt", &format!("prompt[{i}]"))]),
        _ => e,
    }
}

/// The text of a message's content (text parts only).
fn content_text(i: usize, content: Content) -> ApiResult<String> {
    match content {
        Content::Text(t) => Ok(t),
        Content::Parts(parts) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content[{j}].text"),
                            "required for a text part",
                        ))
                    }
                    _ => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}].type"),
                            "only text parts are supported (the backbone reads text)",
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// The conversation, checked: roles known, the last message the user's.
fn conversation(messages: Vec<ChatMessageIn>) -> ApiResult<Vec<ChatMessage>> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one is required"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!(
                        "{:?} is not one of system, developer, user, assistant",
                        other.chars().take(32).collect::<String>()
                    ),
                ))
            }
        };
        out.push(ChatMessage::new(role, content_text(i, m.content)?));
    }
    if out.last().is_some_and(|m| m.role != "user") {
        return Err(ApiError::invalid(
            &format!("messages[{}].role", out.len() - 1),
            "the last message must be the user's",
        ));
    }
    Ok(out)
}

pub async fn chat_completions(
    State(state): State<HttpState>,
    body: crate::ApiJson<Value>,
) -> ApiResult<Response> {
    let body = body.0;
    check_fields(&body, CHAT_FIELDS)?;
    let req: ChatRequest = crate::from_body(body)?;
    check_stream_options(req.stream, req.stream_options.as_ref())?;
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported(
            "top_logprobs",
            "at most 0: the backbone gives the sampled tokens' log-probabilities, no \
             alternatives",
        ));
    }
    let (max_tokens, max_field) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let opts = options(
        max_tokens,
        max_field,
        req.temperature,
        req.top_p,
        req.seed,
        req.stop.clone(),
    )?;
    let messages = conversation(req.messages)?;
    let last_user = messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let target = target(&state, &req.model, &last_user, req.roe.as_ref()).await?;
    let job = if target.expert_id.is_empty() {
        let input = state
            .inference()?
            .chat_prompt(messages)
            .await
            .map_err(|e| ApiError::from(e).renamed(CHAT_RENAMES))?;
        Job {
            target,
            input,
            format: PromptFormat::Raw,
            truncate: req.truncate,
        }
    } else {
        // An expert was tuned on task inputs, not conversations: it reads their text.
        let input = messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        Job {
            target,
            input,
            format: PromptFormat::Canonical,
            truncate: req.truncate,
        }
    };
    let renames: Vec<(&str, &str)> = vec![("max_new_tokens", max_field), ("input", "messages")];
    let include_usage = reports_usage(req.stream, req.stream_options.as_ref());
    let (stream, prompt_tokens) = start(&state, &job, &opts, &renames).await?;
    let truncate = job.truncate;
    let id = response_id("chatcmpl");
    let created = now_unix();
    let model = model_name(&job.target.expert_id);
    let with_logprobs = req.logprobs == Some(true);
    if !req.stream {
        let c = collect(stream).await?;
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                logprobs: with_logprobs.then(|| chat_logprobs(&c.tokens)),
                message: ChatMessageOut {
                    role: "assistant",
                    content: c.text,
                },
                finish_reason: Some(finish_name(c.finish.unwrap_or(FinishReason::Length)).into()),
            }],
            usage: usage(prompt_tokens, c.tokens.len(), truncate),
            roe: job.target.info,
        })
        .into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let info = job.target.info;
    tokio::spawn(async move {
        let chunk = |delta: ChatDelta,
                     logprobs: Option<ChatLogprobs>,
                     finish: Option<String>,
                     roe: Option<RoeResponseInfo>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
            roe,
        };
        let opening = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        if tx
            .send(event(&chunk(opening, None, None, info)))
            .await
            .is_err()
        {
            return;
        }
        let mut stream = UnboundedReceiverStream::new(stream);
        let mut completion_tokens = 0;
        while let Some(token) = stream.next().await {
            let ev = match token {
                Ok(t) => {
                    completion_tokens += 1;
                    let logprobs = with_logprobs.then(|| chat_logprobs(std::slice::from_ref(&t)));
                    let finish = t.finish.map(|f| finish_name(f).to_string());
                    let delta = ChatDelta {
                        role: None,
                        content: Some(t.text),
                    };
                    event(&chunk(delta, logprobs, finish, None))
                }
                Err(e) => error_event(ApiError::from(e)),
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if include_usage {
            let mut last = chunk(ChatDelta::default(), None, None, None);
            last.choices.clear();
            last.usage = Some(usage(prompt_tokens, completion_tokens, truncate));
            let _ = tx.send(event(&last)).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(sse(rx))
}
