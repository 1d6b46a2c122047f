//! `roe.v1.Inference`: score choices and generate text with an expert (soft prompt or LoRA)
//! applied to the shared frozen backbone.
//!
//! Experts are fetched from the library by id, loaded once and kept in an LRU cache bounded in
//! bytes. Concurrent `Score` requests are merged by a scheduler into one
//! [`Backbone::score_batch`] call (up to [`MAX_SCORE_BATCH`] requests, waiting at most
//! [`SCORE_BATCH_WAIT`] for company), so requests for different experts share forward passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;
use roe_backbone::{
    Adapters, Backbone, BackboneError, FinishReason, GenerateParams, Lora, RenderOptions,
    ScoreOutput, SoftPrompt,
};
use roe_expert_library::expert::ExpertKind;
use roe_expert_library::library::ExpertLibrary;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::status;
use crate::library_service::blocking;
use crate::proto::{self, inference_server::Inference as Api};

/// Requests one scoring pass may merge.
pub const MAX_SCORE_BATCH: usize = 16;
/// How long the scheduler waits for more requests after the first one arrives.
pub const SCORE_BATCH_WAIT: Duration = Duration::from_millis(5);
/// Most choices of one Score request.
pub const MAX_CHOICES: usize = 64;
/// Most bytes of input (plus choices, plus stop strings) of one request.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Most new tokens of one Generate request.
pub const MAX_NEW_TOKENS: u32 = 512;
/// New tokens when the request leaves max_new_tokens at 0.
pub const DEFAULT_NEW_TOKENS: u32 = 64;
/// Highest accepted temperature.
pub const MAX_TEMPERATURE: f32 = 5.0;
/// Most stop strings of one Generate request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Default byte budget of the loaded-expert cache.
pub const DEFAULT_CACHE_BYTES: usize = 512 * 1024 * 1024;

/// A loaded expert, ready to run.
pub enum LoadedExpert {
    Prompt(SoftPrompt),
    Lora(Lora),
}

impl LoadedExpert {
    fn adapters(&self) -> Adapters<'_> {
        match self {
            LoadedExpert::Prompt(p) => Adapters::prompt(p),
            LoadedExpert::Lora(l) => Adapters::lora(l),
        }
    }
}

struct CacheEntry {
    version: u64,
    sha256: String,
    bytes: usize,
    expert: Arc<LoadedExpert>,
}

/// LRU of loaded experts, bounded by the sum of their weight sizes.
struct ExpertCache {
    entries: LruCache<String, CacheEntry>,
    bytes: usize,
    budget: usize,
}

impl ExpertCache {
    fn new(budget: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    fn get(&mut self, id: &str, version: u64, sha256: &str) -> Option<Arc<LoadedExpert>> {
        let hit = self
            .entries
            .get(id)
            .filter(|e| e.version == version && e.sha256 == sha256)
            .map(|e| e.expert.clone());
        if hit.is_none() {
            if let Some(old) = self.entries.pop(id) {
                self.bytes -= old.bytes;
            }
        }
        hit
    }

    fn put(&mut self, id: String, entry: CacheEntry) {
        if entry.bytes > self.budget {
            return;
        }
        self.bytes += entry.bytes;
        if let Some(old) = self.entries.put(id, entry) {
            self.bytes -= old.bytes;
        }
        while self.bytes > self.budget {
            match self.entries.pop_lru() {
                Some((_, e)) => self.bytes -= e.bytes,
                None => break,
            }
        }
    }
}

/// Counters of the work done, for tests and monitoring.
#[derive(Debug, Default)]
pub struct InferenceStats {
    /// `score_batch` calls made by the scheduler.
    pub score_batches: AtomicU64,
    /// Score requests those calls served.
    pub scored_requests: AtomicU64,
    /// The largest batch so far.
    pub max_score_batch: AtomicU64,
    /// Tokens produced by Generate (all streams).
    pub generated_tokens: AtomicU64,
    /// Generate streams still producing tokens.
    pub active_generations: AtomicU64,
}

struct Inner {
    stats: Arc<InferenceStats>,
    backbone: Arc<Backbone>,
    library: Arc<ExpertLibrary>,
    /// Name of the backbone experts must be registered for.
    backbone_name: String,
    cache: Mutex<ExpertCache>,
}

/// Maps a backbone error: the caller's expert → FAILED_PRECONDITION, the caller's input →
/// INVALID_ARGUMENT, anything else → INTERNAL.
fn backbone_status(e: BackboneError) -> Status {
    if e.is_expert_error() {
        Status::failed_precondition(e.to_string())
    } else if e.is_invalid_input() {
        Status::invalid_argument(e.to_string())
    } else {
        tracing::error!(error = %e, "backbone failed");
        Status::internal(e.to_string())
    }
}

impl Inner {
    /// The loaded expert of `id` (None for the bare backbone). Blocking.
    fn resolve(&self, id: &str) -> Result<Option<Arc<LoadedExpert>>, Status> {
        if id.is_empty() {
            return Ok(None);
        }
        let meta = self.library.get(id).map_err(status)?;
        if meta.backbone != self.backbone_name {
            return Err(Status::failed_precondition(format!(
                "expert {id:?} is for backbone {:?}; this server runs {:?}",
                meta.backbone, self.backbone_name
            )));
        }
        if let Some(e) = self
            .cache
            .lock()
            .get(id, meta.version, &meta.weights_sha256)
        {
            return Ok(Some(e));
        }
        let adapter = self.library.adapter(id).map_err(status)?;
        let spec = self.backbone.expert_spec();
        let loaded = match meta.kind {
            ExpertKind::Prompt => {
                let p = SoftPrompt::from_peft_bytes_with(
                    &adapter.config_json,
                    &adapter.safetensors,
                    &spec,
                )
                .map_err(|e| Status::failed_precondition(format!("expert {id:?}: {e}")))?;
                self.backbone
                    .check_soft_prompt(&p)
                    .map_err(|e| Status::failed_precondition(format!("expert {id:?}: {e}")))?;
                LoadedExpert::Prompt(p)
            }
            ExpertKind::Lora => {
                let l =
                    Lora::from_peft_bytes_with(&adapter.config_json, &adapter.safetensors, &spec)
                        .map_err(|e| Status::failed_precondition(format!("expert {id:?}: {e}")))?;
                self.backbone
                    .check_lora(&l)
                    .map_err(|e| Status::failed_precondition(format!("expert {id:?}: {e}")))?;
                LoadedExpert::Lora(l)
            }
        };
        let expert = Arc::new(loaded);
        self.cache.lock().put(
            id.to_string(),
            CacheEntry {
                version: meta.version,
                sha256: meta.weights_sha256.clone(),
                bytes: meta.weights_bytes.max(adapter.safetensors.len()),
                expert: expert.clone(),
            },
        );
        Ok(Some(expert))
    }
}

/// One Score request waiting for the scheduler.
struct ScoreJob {
    input: String,
    choices: Vec<String>,
    expert: Option<Arc<LoadedExpert>>,
    reply: oneshot::Sender<Result<ScoreOutput, Status>>,
}

/// Runs a batch of jobs in one `score_batch` call; when the batch fails, each job runs alone
/// so an error reaches only the request that caused it. Blocking.
fn run_batch(backbone: &Backbone, stats: &InferenceStats, jobs: Vec<ScoreJob>) {
    stats.score_batches.fetch_add(1, Ordering::Relaxed);
    stats
        .scored_requests
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    stats
        .max_score_batch
        .fetch_max(jobs.len() as u64, Ordering::Relaxed);
    let reqs: Vec<roe_backbone::ScoreRequest<'_>> = jobs
        .iter()
        .map(|j| roe_backbone::ScoreRequest {
            input: &j.input,
            choices: &j.choices,
            adapters: j
                .expert
                .as_deref()
                .map(LoadedExpert::adapters)
                .unwrap_or_default(),
        })
        .collect();
    match backbone.score_batch(&reqs) {
        Ok(outs) if outs.len() == jobs.len() => {
            drop(reqs);
            for (job, out) in jobs.into_iter().zip(outs) {
                let _ = job.reply.send(Ok(out));
            }
        }
        _ if jobs.len() > 1 => {
            let results: Vec<_> = reqs
                .iter()
                .map(|r| backbone.score(r).map_err(backbone_status))
                .collect();
            drop(reqs);
            for (job, r) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(r);
            }
        }
        other => {
            let r = match other {
                Ok(mut outs) => outs
                    .pop()
                    .ok_or_else(|| Status::internal("scoring returned no result")),
                Err(e) => Err(backbone_status(e)),
            };
            drop(reqs);
            if let Some(job) = jobs.into_iter().next() {
                let _ = job.reply.send(r);
            }
        }
    }
}

/// Collects concurrent Score jobs into batches and runs them one batch at a time.
async fn score_scheduler(
    backbone: Arc<Backbone>,
    stats: Arc<InferenceStats>,
    mut rx: mpsc::Receiver<ScoreJob>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + SCORE_BATCH_WAIT;
        while jobs.len() < MAX_SCORE_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        // Requests whose clients went away need no work.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        tracing::debug!(batch = jobs.len(), "scoring batch");
        let bb = backbone.clone();
        let st = stats.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || run_batch(&bb, &st, jobs)).await {
            tracing::error!(error = %e, "scoring worker failed");
        }
    }
}

pub struct InferenceService {
    inner: Arc<Inner>,
    score_tx: mpsc::Sender<ScoreJob>,
}

impl InferenceService {
    /// Serves `backbone` with experts of `library` registered for the library's default
    /// backbone. Must be called inside a Tokio runtime (it starts the Score scheduler).
    pub fn new(backbone: Arc<Backbone>, library: Arc<ExpertLibrary>) -> Self {
        Self::with_cache_bytes(backbone, library, DEFAULT_CACHE_BYTES)
    }

    pub fn with_cache_bytes(
        backbone: Arc<Backbone>,
        library: Arc<ExpertLibrary>,
        cache_bytes: usize,
    ) -> Self {
        let backbone_name = library
            .backbone(None)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        let (score_tx, score_rx) = mpsc::channel(MAX_SCORE_BATCH * 8);
        let stats = Arc::new(InferenceStats::default());
        tokio::spawn(score_scheduler(backbone.clone(), stats.clone(), score_rx));
        Self {
            inner: Arc::new(Inner {
                stats,
                backbone,
                library,
                backbone_name,
                cache: Mutex::new(ExpertCache::new(cache_bytes)),
            }),
            score_tx,
        }
    }

    /// Counters of the work done so far.
    pub fn stats(&self) -> &InferenceStats {
        &self.inner.stats
    }

    async fn resolve(&self, id: String) -> Result<Option<Arc<LoadedExpert>>, Status> {
        let inner = self.inner.clone();
        blocking(move || inner.resolve(&id)).await
    }
}

fn check_input(input: &str) -> Result<(), Status> {
    if input.trim().is_empty() {
        return Err(Status::invalid_argument("input: must not be empty"));
    }
    Ok(())
}

fn check_size(total: usize) -> Result<(), Status> {
    if total > MAX_INPUT_BYTES {
        return Err(Status::resource_exhausted(format!(
            "input: more than {MAX_INPUT_BYTES} bytes"
        )));
    }
    Ok(())
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

/// Validated sampling parameters of a Generate request.
fn generate_params(req: &proto::GenerateRequest) -> Result<GenerateParams, Status> {
    if req.max_new_tokens > MAX_NEW_TOKENS {
        return Err(Status::invalid_argument(format!(
            "max_new_tokens: at most {MAX_NEW_TOKENS}"
        )));
    }
    if !(req.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&req.temperature)) {
        return Err(Status::invalid_argument(format!(
            "temperature: must be in [0, {MAX_TEMPERATURE}]"
        )));
    }
    let top_p = if req.top_p == 0.0 { 1.0 } else { req.top_p };
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(Status::invalid_argument("top_p: must be in (0, 1]"));
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(Status::invalid_argument(format!(
            "stop: at most {MAX_STOP_STRINGS} strings"
        )));
    }
    if req.stop.iter().any(|s| s.is_empty()) {
        return Err(Status::invalid_argument("stop: strings must not be empty"));
    }
    let max_new_tokens = if req.max_new_tokens == 0 {
        DEFAULT_NEW_TOKENS
    } else {
        req.max_new_tokens
    };
    Ok(GenerateParams {
        max_new_tokens: max_new_tokens as usize,
        temperature: req.temperature,
        top_p,
        seed: req.seed.unwrap_or_else(rand::random),
        stop: req.stop.clone(),
        ..GenerateParams::default()
    })
}

#[tonic::async_trait]
impl Api for InferenceService {
    async fn score(
        &self,
        request: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        let req = request.into_inner();
        check_input(&req.input)?;
        if req.choices.is_empty() {
            return Err(Status::invalid_argument(
                "choices: at least one is required",
            ));
        }
        if req.choices.len() > MAX_CHOICES {
            return Err(Status::invalid_argument(format!(
                "choices: at most {MAX_CHOICES}"
            )));
        }
        check_size(req.input.len() + req.choices.iter().map(String::len).sum::<usize>())?;
        let expert = self.resolve(req.expert_id.clone()).await?;
        let (reply, rx) = oneshot::channel();
        self.score_tx
            .send(ScoreJob {
                input: req.input,
                choices: req.choices.clone(),
                expert,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the scoring scheduler has stopped"))?;
        let out = rx
            .await
            .map_err(|_| Status::internal("the scoring scheduler dropped the request"))??;
        Ok(Response::new(proto::ScoreResponse {
            choices: req
                .choices
                .into_iter()
                .zip(&out.choices)
                .map(|(choice, s)| proto::ChoiceScore {
                    choice,
                    sum_logprob: s.sum_logprob,
                    mean_logprob: s.mean_logprob,
                    num_tokens: s.num_tokens as u32,
                })
                .collect(),
            best: out.best as u32,
            best_by_mean: out.best_by_mean as u32,
            expert_id: req.expert_id,
        }))
    }

    type GenerateStream = ReceiverStream<Result<proto::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        check_input(&req.input)?;
        check_size(req.input.len() + req.stop.iter().map(String::len).sum::<usize>())?;
        let params = generate_params(&req)?;
        let expert = self.resolve(req.expert_id.clone()).await?;
        let backbone = self.inner.backbone.clone();
        let stats = self.inner.stats.clone();
        // Render and run the prompt before answering, so that its errors become the status.
        let (tx, rx) = mpsc::channel(32);
        let (started_tx, started_rx) = oneshot::channel::<Result<(), Status>>();
        tokio::task::spawn_blocking(move || {
            let adapters = expert
                .as_deref()
                .map(LoadedExpert::adapters)
                .unwrap_or_default();
            let generator = backbone
                .render_prompt(&req.input, &RenderOptions::default())
                .and_then(|ids| backbone.generator(&ids, adapters, params));
            let generator = match generator {
                Ok(g) => {
                    let _ = started_tx.send(Ok(()));
                    g
                }
                Err(e) => {
                    let _ = started_tx.send(Err(backbone_status(e)));
                    return;
                }
            };
            stats.active_generations.fetch_add(1, Ordering::Relaxed);
            for step in generator {
                stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let msg = match step {
                    Ok(t) => Ok(proto::GenerateResponse {
                        text: t.text,
                        token_id: t.id,
                        logprob: t.logprob,
                        finish_reason: t.finish.map(finish_name).unwrap_or_default().to_string(),
                    }),
                    Err(e) => Err(backbone_status(e)),
                };
                let last = msg.is_err();
                // The client went away: stop generating.
                if tx.blocking_send(msg).is_err() || last {
                    break;
                }
            }
            stats.active_generations.fetch_sub(1, Ordering::Relaxed);
        });
        started_rx
            .await
            .map_err(|_| Status::internal("the generation worker failed"))??;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: usize) -> CacheEntry {
        CacheEntry {
            version: 1,
            sha256: "s".into(),
            bytes,
            expert: Arc::new(LoadedExpert::Prompt(
                SoftPrompt::from_vec(
                    vec![0.0; 4],
                    1,
                    &roe_backbone::ExpertSpec {
                        hidden_size: 4,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )),
        }
    }

    #[test]
    fn cache_is_bounded_in_bytes_and_checks_versions() {
        let mut c = ExpertCache::new(100);
        c.put("a".into(), entry(40));
        c.put("b".into(), entry(40));
        assert!(c.get("a", 1, "s").is_some()); // a is now the most recent
        c.put("c".into(), entry(40)); // evicts b
        assert_eq!(c.bytes, 80);
        assert!(c.get("b", 1, "s").is_none());
        assert!(c.get("a", 1, "s").is_some());
        assert!(c.get("c", 1, "s").is_some());
        // A new version misses and drops the stale entry.
        assert!(c.get("a", 2, "s").is_none());
        assert_eq!(c.bytes, 40);
        // Too large for the budget: not cached.
        c.put("huge".into(), entry(500));
        assert!(c.get("huge", 1, "s").is_none());
        assert_eq!(c.bytes, 40);
        // Replacing an entry counts its bytes once.
        c.put("c".into(), entry(50));
        assert_eq!(c.bytes, 50);
    }
}
