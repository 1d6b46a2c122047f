//! The inference core: requests for experts on the shared backend, resolved through the
//! expert cache and run through the Score and generation queues. Transport-free: the gRPC
//! handlers in `roe-services` convert messages and call these methods.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use roe_backbone::{ensemble_vote, EnsembleVote, FinishReason, ScoreOutput};

use crate::backend::{Backend, PromptFormat};
use crate::cache::{ExpertCache, Loaded};
use crate::config::ServingConfig;
use crate::context::{fit_prompt, ContextBudget, PromptFit, PromptUsage, Reserve};
use crate::error::{blocking, ErrorKind, Result, ServingError};
use crate::experts::{ExpertRef, ExpertSource};
use crate::generation_queue::{GenerationQueue, GenerationRequest, TokenStream};
use crate::score_queue::{ScoreItem, ScoreQueue};
use crate::stats::InferenceStats;
use crate::validate::{check_expert_id, GenerateOptions};

/// Score the choices of one input with one expert ("" = the bare backbone).
#[derive(Debug, Clone, Default)]
pub struct ScoreRequest {
    pub expert_id: String,
    pub input: String,
    pub choices: Vec<String>,
    /// Cut the prompt from the front when it does not fit (see [`crate::context`]), instead
    /// of CONTEXT_LENGTH_EXCEEDED.
    pub truncate: bool,
}

/// Score one input with several experts and let them vote.
#[derive(Debug, Clone, Default)]
pub struct EnsembleRequest {
    pub expert_ids: Vec<String>,
    pub input: String,
    pub choices: Vec<String>,
    /// As [`ScoreRequest::truncate`], for every member.
    pub truncate: bool,
}

#[derive(Debug, Clone)]
pub struct EnsembleOutput {
    /// One per expert, in request order.
    pub members: Vec<ScoreOutput>,
    pub vote: EnsembleVote,
}

/// Generate a continuation of `input` with one expert ("" = the bare backbone).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub expert_id: String,
    pub input: String,
    pub format: PromptFormat,
    pub options: GenerateOptions,
    /// As [`ScoreRequest::truncate`].
    pub truncate: bool,
}

/// One prompt to fit the context ([`Inference::fit_prompt`]).
pub(crate) struct PromptCheck<'a> {
    /// The field an error names (`input`, `inputs[2].input`).
    pub field: &'a str,
    pub input: &'a str,
    pub format: PromptFormat,
    /// A Score's choices (the longest needs room); empty for a generation.
    pub choices: &'a [String],
    /// A generation's new tokens (None: scoring).
    pub new_tokens: Option<usize>,
    pub truncate: bool,
}

impl<'a> PromptCheck<'a> {
    /// A Score input's prompt, in the canonical rendering, beside its choices.
    pub fn scoring(field: &'a str, input: &'a str, choices: &'a [String], truncate: bool) -> Self {
        Self {
            field,
            input,
            format: PromptFormat::Canonical,
            choices,
            new_tokens: None,
            truncate,
        }
    }

    /// A generation's prompt beside its new tokens.
    pub fn generation(
        field: &'a str,
        input: &'a str,
        format: PromptFormat,
        new_tokens: usize,
        truncate: bool,
    ) -> Self {
        Self {
            field,
            input,
            format,
            choices: &[],
            new_tokens: Some(new_tokens),
            truncate,
        }
    }
}

/// A generation started: its tokens as they come, and what was read of its prompt.
pub struct Started {
    pub tokens: TokenStream,
    pub usage: PromptUsage,
}

pub struct Inference<B: Backend> {
    backend: Arc<B>,
    /// The library of this process, or one served by another (`roe serve --role inference`).
    experts: Arc<dyn ExpertSource>,
    /// The backbone experts must be registered for.
    backbone_name: String,
    cache: ExpertCache<B::Expert>,
    scores: ScoreQueue<B::Expert>,
    generations: GenerationQueue<B::Expert>,
    stats: Arc<InferenceStats>,
    config: ServingConfig,
}

impl<B: Backend> Inference<B> {
    /// Serves `backend` with the experts of `experts` registered for `backbone_name`. Starts
    /// the queues, so it must be called inside a Tokio runtime.
    pub fn start(
        backend: Arc<B>,
        experts: Arc<dyn ExpertSource>,
        backbone_name: impl Into<String>,
        config: ServingConfig,
    ) -> Self {
        let config = config.normalised();
        let stats = Arc::new(InferenceStats::default());
        Self {
            scores: ScoreQueue::start(backend.clone(), stats.clone(), &config),
            generations: GenerationQueue::start(backend.clone(), stats.clone(), &config),
            cache: ExpertCache::new(config.expert_cache_bytes),
            backend,
            experts,
            backbone_name: backbone_name.into(),
            stats,
            config,
        }
    }

    /// Serves `backend` with the experts of the library of this process, registered for the
    /// library's default backbone.
    pub fn over_library(
        backend: Arc<B>,
        library: Arc<roe_expert_library::ExpertLibrary>,
        config: ServingConfig,
    ) -> Self {
        let backbone_name = library
            .backbone(None)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        let source = Arc::new(crate::experts::LocalExpertSource::new(library));
        Self::start(backend, source, backbone_name, config)
    }

    pub fn config(&self) -> &ServingConfig {
        &self.config
    }

    /// Counters of the work done so far.
    pub fn stats(&self) -> &InferenceStats {
        &self.stats
    }

    /// True while both queues' schedulers run (health reports NOT_SERVING otherwise).
    pub fn is_healthy(&self) -> bool {
        self.scores.is_running() && self.generations.is_running()
    }

    /// Whether generations may join a batch that is already running (on by default; off,
    /// they only share a batch with requests that arrive together — for comparisons).
    pub fn set_join_running_generations(&self, on: bool) {
        self.generations.set_join_running(on);
    }

    fn check_backbone(&self, meta: &ExpertRef) -> Result<()> {
        if meta.backbone != self.backbone_name {
            return Err(ServingError::precondition(format!(
                "expert {:?} is for backbone {:?}; this server runs {:?}",
                meta.id, meta.backbone, self.backbone_name
            )));
        }
        Ok(())
    }

    /// The loaded expert of `id` (None for "", the bare backbone). The metadata is read on
    /// every call, so a new version is used at once; the weights only on a cache miss, once
    /// for all the requests that miss together.
    pub async fn resolve(&self, id: &str) -> Result<Option<Arc<B::Expert>>> {
        if id.is_empty() {
            return Ok(None);
        }
        let meta = self.experts.meta(id).await?;
        self.check_backbone(&meta)?;
        let expert = self.cache.get_or_load(&meta, self.load(id)).await?;
        Ok(Some(expert))
    }

    /// Reads the weights of `id` and loads them on a blocking thread.
    async fn load(&self, id: &str) -> Result<Loaded<B::Expert>> {
        let started = std::time::Instant::now();
        // The metadata that comes with the weights keys the cache: a version registered
        // since `meta` must not be cached under the older version's key.
        let (meta, adapter) = self.experts.adapter(id).await?;
        self.check_backbone(&meta)?;
        let bytes = meta.weights_bytes.max(adapter.safetensors.len());
        let (backend, kind, field) = (self.backend.clone(), meta.kind, format!("expert {id:?}"));
        let expert = blocking(move || {
            backend
                .load_expert(kind, &adapter)
                .map_err(|e| e.prefixed(&field))
        })
        .await?;
        self.stats.expert_loads.fetch_add(1, Ordering::Relaxed);
        crate::metrics::expert_loaded(started.elapsed());
        self.stats
            .expert_load_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(Loaded {
            meta,
            bytes,
            expert,
        })
    }

    /// A conversation rendered with the backbone's chat template (the text of a
    /// [`PromptFormat::Raw`] generation).
    pub async fn chat_prompt(&self, messages: Vec<roe_backbone::ChatMessage>) -> Result<String> {
        let backend = self.backend.clone();
        blocking(move || backend.chat_prompt(&messages)).await
    }

    /// How much of `input`'s prompt in `format` the backbone may read beside `reserve`
    /// (scoring: the longest of `choices`; generation: its new tokens) with `expert` in front:
    /// whole, cut from the front when `truncate`, or CONTEXT_LENGTH_EXCEEDED naming `field`.
    /// Tokenizes on a blocking thread (a 64 KB input takes milliseconds).
    pub(crate) async fn fit_prompt(
        &self,
        check: PromptCheck<'_>,
        expert: Option<&Arc<B::Expert>>,
    ) -> Result<PromptFit> {
        let PromptCheck {
            field,
            input,
            format,
            choices,
            new_tokens,
            truncate,
        } = check;
        let backend = self.backend.clone();
        let (input, choices) = (input.to_string(), choices.to_vec());
        let count = blocking(move || backend.count_tokens(&input, format, &choices)).await?;
        let soft_prompt = expert.map_or(0, |e| self.backend.soft_prompt_tokens(e));
        let reserve = match new_tokens {
            Some(n) => Reserve::NewTokens(n),
            None => Reserve::Choices(count.longest_choice),
        };
        let context = self.backend.context_length();
        let max_input_tokens = match self.config.limits.max_input_tokens {
            0 => context,
            n => n.min(context),
        };
        let budget = ContextBudget {
            context,
            max_input_tokens,
        };
        fit_prompt(field, count.prompt, soft_prompt, reserve, budget, truncate)
    }

    /// Positions the backbone reads.
    pub fn context_length(&self) -> usize {
        self.backend.context_length()
    }

    /// Checks that expert `id` ("" = bare backbone) exists, fits this backbone and loads
    /// (e.g. `roe serve --fallback-expert` at start-up).
    pub async fn check_expert(&self, id: &str) -> Result<()> {
        self.resolve(id).await.map(|_| ())
    }

    pub async fn score(&self, req: ScoreRequest) -> Result<ScoreOutput> {
        self.config
            .limits
            .check_score_input("", &req.input, &req.choices)?;
        check_requested_expert("expert_id", &req.expert_id)?;
        let expert = self.resolve(&req.expert_id).await?;
        let fit = self
            .fit_prompt(
                PromptCheck::scoring("input", &req.input, &req.choices, req.truncate),
                expert.as_ref(),
            )
            .await?;
        self.score_items(vec![ScoreItem {
            expert,
            input: req.input,
            choices: req.choices,
            keep: fit.keep,
        }])
        .await?
        .pop()
        .ok_or_else(|| ServingError::internal("scoring returned no result"))
    }

    pub async fn score_ensemble(&self, req: EnsembleRequest) -> Result<EnsembleOutput> {
        let n = req.expert_ids.len();
        let most = self.config.limits.max_ensemble_members;
        if !(2..=most).contains(&n) {
            return Err(ServingError::invalid(
                "expert_ids",
                format!("an ensemble has 2 to {most} experts, got {n}"),
            ));
        }
        for (i, id) in req.expert_ids.iter().enumerate() {
            check_requested_expert(&format!("expert_ids[{i}]"), id)?;
            if req.expert_ids[..i].contains(id) {
                return Err(ServingError::invalid(
                    &format!("expert_ids[{i}]"),
                    format!("{id:?} is listed twice"),
                ));
            }
        }
        let limits = &self.config.limits;
        limits.check_score_input("", &req.input, &req.choices)?;
        let one = req.input.len() + req.choices.iter().map(String::len).sum::<usize>();
        limits.check_work("expert_ids", n * one)?;
        let mut items = Vec::with_capacity(n);
        for (i, id) in req.expert_ids.iter().enumerate() {
            let expert = self
                .resolve(id)
                .await
                .map_err(|e| e.prefixed(&format!("expert_ids[{i}]")))?;
            // Members' soft prompts differ in length: each fits on its own.
            let fit = self
                .fit_prompt(
                    PromptCheck::scoring("input", &req.input, &req.choices, req.truncate),
                    expert.as_ref(),
                )
                .await
                .map_err(|e| match e.kind {
                    ErrorKind::ContextLengthExceeded if expert.is_some() => {
                        ServingError::new(e.kind, format!("{} (with expert_ids[{i}])", e.message))
                    }
                    _ => e,
                })?;
            items.push(ScoreItem {
                expert,
                input: req.input.clone(),
                choices: req.choices.clone(),
                keep: fit.keep,
            });
        }
        // One submission: the members share one batch.
        let members = self.score_items(items).await?;
        let vote = ensemble_vote(&members)?;
        Ok(EnsembleOutput { members, vote })
    }

    /// Starts a generation; resolves once its prompt has run (or with why it could not).
    pub async fn generate(&self, req: GenerateRequest) -> Result<TokenStream> {
        Ok(self.start_generation(req).await?.tokens)
    }

    /// [`Self::generate`], with what was read of the prompt (usage counts).
    pub async fn start_generation(&self, req: GenerateRequest) -> Result<Started> {
        let limits = &self.config.limits;
        // The options first: a bad stop string is named as such, not as an input too long.
        let params = limits.generate_params(&req.options)?;
        limits.check_text_input("", &req.input, req.options.stop_bytes())?;
        check_requested_expert("expert_id", &req.expert_id)?;
        let expert = self.resolve(&req.expert_id).await?;
        let fit = self
            .fit_prompt(
                PromptCheck::generation(
                    "input",
                    &req.input,
                    req.format,
                    params.max_new_tokens,
                    req.truncate,
                ),
                expert.as_ref(),
            )
            .await?;
        let tokens = self
            .generations
            .submit(vec![GenerationRequest {
                expert,
                input: req.input,
                format: req.format,
                params,
                keep: fit.keep,
            }])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(ServingError::internal(
                    "the generation queue lost a request",
                ))
            })?;
        Ok(Started {
            tokens,
            usage: fit.usage,
        })
    }

    /// Scores `items` through the Score queue, in order.
    pub(crate) async fn score_items(
        &self,
        items: Vec<ScoreItem<B::Expert>>,
    ) -> Result<Vec<ScoreOutput>> {
        self.scores.score(items).await
    }

    /// Generates whole answers to `requests`, submitted together so that they share one
    /// batch. Stops early when the caller goes away (the future is dropped).
    pub(crate) async fn generate_texts(
        &self,
        requests: Vec<GenerationRequest<B::Expert>>,
    ) -> Vec<Result<(String, FinishReason)>> {
        let streams = self.generations.submit(requests).await;
        let mut texts = Vec::with_capacity(streams.len());
        for stream in streams {
            texts.push(match stream {
                Ok(stream) => collect_text(stream).await,
                Err(e) => Err(e),
            });
        }
        texts
    }
}

/// An expert id from a request, where "" names the bare backbone.
fn check_requested_expert(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Ok(());
    }
    check_expert_id(field, id)
}

/// The whole text of a stream and why it finished.
async fn collect_text(mut stream: TokenStream) -> Result<(String, FinishReason)> {
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    while let Some(token) = stream.recv().await {
        let token = token?;
        text.push_str(&token.text);
        if let Some(f) = token.finish {
            finish = f;
        }
    }
    Ok((text, finish))
}
