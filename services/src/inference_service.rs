//! `roe.v1.Inference`: score choices and generate text with an expert (soft prompt or LoRA)
//! applied to the shared frozen backbone.
//!
//! Experts are fetched by id from an [`ExpertSource`] (the library of this process, or one
//! served by another process), loaded once and kept in an LRU cache bounded in bytes. Concurrent `Score` requests are merged by a scheduler into one
//! [`Backbone::score_batch`] call (up to [`MAX_SCORE_BATCH`] requests, waiting at most
//! [`SCORE_BATCH_WAIT`] for company), so requests for different experts share forward passes.
//! `ScoreEnsemble` submits its members together, so they always share one batch.
//! Concurrent `Generate` requests (and the answers `Answer` generates) are merged the same way
//! into one [`BatchGenerator`] (up to [`MAX_GENERATE_BATCH`], waiting at most
//! [`GENERATE_BATCH_WAIT`]): each decode step runs one forward for all their rows. Requests
//! that arrive while a batch runs join it between two steps when it has room (continuous
//! batching), else start a batch of their own on its own blocking thread, so a long
//! generation never holds back later requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;
use roe_backbone::{
    ensemble_vote, Adapters, Backbone, BackboneError, BatchGenerator, FinishReason, GenerateParams,
    GenerateRequest, GeneratedToken, Lora, RenderOptions, ScoreOutput, SoftPrompt,
    MAX_GENERATE_BATCH,
};
use roe_expert_library::expert::ExpertKind;
use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::PeftAdapter;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::expert_source::{ExpertRef, ExpertSource, LocalExpertSource};
use crate::library_service::blocking;
use crate::proto::{self, inference_server::Inference as Api};

/// Requests one scoring pass may merge.
pub const MAX_SCORE_BATCH: usize = 16;
/// How long the scheduler waits for more requests after the first one arrives.
pub const SCORE_BATCH_WAIT: Duration = Duration::from_millis(5);
/// How long the generation scheduler waits for more Generate requests after the first one
/// (a generation lasts seconds; sharing its forwards is worth a few milliseconds).
pub const GENERATE_BATCH_WAIT: Duration = Duration::from_millis(10);
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
/// Most members of one ScoreEnsemble request: one scheduler batch holds them all.
pub const MAX_ENSEMBLE_MEMBERS: usize = MAX_SCORE_BATCH;
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
    /// Time those calls spent in the backbone, in microseconds (all of them together).
    pub score_batch_micros: AtomicU64,
    /// Tokens produced by Generate (all streams).
    pub generated_tokens: AtomicU64,
    /// Generation batches started (each a [`BatchGenerator`] over one or more requests).
    pub generate_batches: AtomicU64,
    /// The most requests one generation batch has held at once.
    pub max_generate_batch: AtomicU64,
    /// Generate requests that joined a batch already running (continuous batching).
    pub generate_joined: AtomicU64,
    /// Generate streams still producing tokens.
    pub active_generations: AtomicU64,
    /// Expert cache misses served: weights read from the library, parsed and checked.
    pub expert_loads: AtomicU64,
    /// Time those loads took, in microseconds (all of them together).
    pub expert_load_micros: AtomicU64,
}

struct Inner {
    stats: Arc<InferenceStats>,
    /// Whether Generate requests join a running batch (on) or only start their own.
    join_running: Arc<AtomicBool>,
    backbone: Arc<Backbone>,
    /// The library in this process, or one served by another (`roe serve --role inference`).
    experts: Arc<dyn ExpertSource>,
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
    fn check_backbone(&self, meta: &ExpertRef) -> Result<(), Status> {
        if meta.backbone != self.backbone_name {
            return Err(Status::failed_precondition(format!(
                "expert {:?} is for backbone {:?}; this server runs {:?}",
                meta.id, meta.backbone, self.backbone_name
            )));
        }
        Ok(())
    }

    /// The loaded expert of `id` (None for the bare backbone). The metadata is read on every
    /// call, so a new version is used at once; the weights only on a cache miss.
    async fn resolve(self: &Arc<Self>, id: &str) -> Result<Option<Arc<LoadedExpert>>, Status> {
        if id.is_empty() {
            return Ok(None);
        }
        let meta = self.experts.meta(id).await?;
        self.check_backbone(&meta)?;
        if let Some(e) = self
            .cache
            .lock()
            .get(id, meta.version, &meta.weights_sha256)
        {
            return Ok(Some(e));
        }
        // The metadata that comes with the weights keys the cache: a version registered in
        // between must not be cached under the older version's key.
        let load_started = std::time::Instant::now();
        let (meta, adapter) = self.experts.adapter(id).await?;
        self.check_backbone(&meta)?;
        let adapter_bytes = adapter.safetensors.len();
        let inner = self.clone();
        let (kind, name) = (meta.kind, id.to_string());
        let expert = blocking(move || inner.load(&name, kind, &adapter).map(Arc::new)).await?;
        self.stats.expert_loads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .expert_load_micros
            .fetch_add(load_started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.cache.lock().put(
            id.to_string(),
            CacheEntry {
                version: meta.version,
                sha256: meta.weights_sha256,
                bytes: meta.weights_bytes.max(adapter_bytes),
                expert: expert.clone(),
            },
        );
        Ok(Some(expert))
    }

    /// Parses and checks an adapter against the backbone. Blocking (CPU work).
    fn load(
        &self,
        id: &str,
        kind: ExpertKind,
        adapter: &PeftAdapter,
    ) -> Result<LoadedExpert, Status> {
        let spec = self.backbone.model_shape();
        Ok(match kind {
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
        })
    }
}

/// One input to score with one expert (a Score request, an ensemble member, an Answer input).
pub(crate) struct ScoreItem {
    pub expert: Option<Arc<LoadedExpert>>,
    pub input: String,
    pub choices: Vec<String>,
}

/// One Score request waiting for the scheduler.
struct ScoreJob {
    input: String,
    choices: Vec<String>,
    expert: Option<Arc<LoadedExpert>>,
    reply: oneshot::Sender<Result<ScoreOutput, Status>>,
}

/// One Generate request (or an answer to generate) waiting for the generation scheduler.
struct GenerateJob {
    input: String,
    expert: Option<Arc<LoadedExpert>>,
    params: GenerateParams,
    /// Told once the prompt has run, or why it could not.
    started: oneshot::Sender<Result<(), Status>>,
    /// The tokens as they come; unbounded, so that a slow reader never stalls the rows it
    /// shares a batch with (at most [`MAX_NEW_TOKENS`] messages per request).
    tokens: mpsc::UnboundedSender<Result<GeneratedToken, Status>>,
}

/// The id that scored answers end with: `<|im_start|>` when the backbone's tokenizer has it,
/// else its EOS.
///
/// The canonical rendering of `assets/experts/README.md` says EOS (id 2 for SmolLM2), but the
/// reference experts were trained to end answers with `<|im_start|>` (id 1) and
/// `reference.json` was measured that way: with id 1, `roe bench score` reproduces the
/// reference accuracies (see bench/results/score.md), with id 2 several move by a few points.
pub fn answer_end_id(backbone: &Backbone) -> u32 {
    backbone
        .tokenizer()
        .token_to_id("<|im_start|>")
        .unwrap_or_else(|| backbone.eos_token_id())
}

/// How Score renders requests: the canonical rendering with [`answer_end_id`].
fn score_render_options(backbone: &Backbone) -> RenderOptions {
    RenderOptions {
        eos_id: Some(answer_end_id(backbone)),
        ..RenderOptions::default()
    }
}

/// Runs a batch of jobs in one `score_batch` call; when the batch fails, each job runs alone
/// so an error reaches only the request that caused it. Blocking.
fn run_batch(backbone: &Backbone, stats: &InferenceStats, jobs: Vec<ScoreJob>) {
    let render = score_render_options(backbone);
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
    let started = std::time::Instant::now();
    let scored = backbone.score_batch_with(&reqs, &render);
    stats
        .score_batch_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    match scored {
        Ok(outs) if outs.len() == jobs.len() => {
            drop(reqs);
            for (job, out) in jobs.into_iter().zip(outs) {
                let _ = job.reply.send(Ok(out));
            }
        }
        _ if jobs.len() > 1 => {
            let results: Vec<_> = reqs
                .iter()
                .map(|r| {
                    backbone
                        .score_batch_with(std::slice::from_ref(r), &render)
                        .map_err(backbone_status)
                        .and_then(|mut o| {
                            o.pop()
                                .ok_or_else(|| Status::internal("scoring returned no result"))
                        })
                })
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

/// Collects concurrent Score submissions into batches and runs them one batch at a time.
/// A submission (the jobs of one request: a Score, an ensemble's members, an Answer's inputs)
/// is never split, so its jobs share forward passes; one that does not fit in the batch being
/// collected opens the next batch.
async fn score_scheduler(
    backbone: Arc<Backbone>,
    stats: Arc<InferenceStats>,
    mut rx: mpsc::Receiver<Vec<ScoreJob>>,
) {
    let mut held: Option<Vec<ScoreJob>> = None;
    loop {
        let mut jobs = match held.take() {
            Some(group) => group,
            None => match rx.recv().await {
                Some(group) => group,
                None => break,
            },
        };
        let deadline = tokio::time::Instant::now() + SCORE_BATCH_WAIT;
        while jobs.len() < MAX_SCORE_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(group)) if jobs.len() + group.len() <= MAX_SCORE_BATCH => {
                    jobs.extend(group)
                }
                Ok(Some(group)) => {
                    held = Some(group);
                    break;
                }
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

/// A running generation batch that later requests may join (continuous batching).
struct OpenBatch {
    inbox: Mutex<Inbox>,
}

struct Inbox {
    /// False once the batch's thread has ended: jobs must start a batch of their own.
    open: bool,
    /// Jobs that join the batch before its next step.
    jobs: Vec<GenerateJob>,
    /// Rows still generating plus jobs waiting to join: the batch's room is
    /// [`MAX_GENERATE_BATCH`] minus this.
    rows: usize,
}

/// Collects concurrent generation jobs (waiting [`GENERATE_BATCH_WAIT`] for company) and hands
/// them to the newest running batch when it has room for all of them (they join between two
/// of its steps), else starts a batch for them on its own blocking thread. A long generation
/// never holds back later requests: they join it, or run beside it.
async fn generate_scheduler(
    backbone: Arc<Backbone>,
    stats: Arc<InferenceStats>,
    join_running: Arc<AtomicBool>,
    mut rx: mpsc::Receiver<GenerateJob>,
) {
    let mut newest: Option<Arc<OpenBatch>> = None;
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + GENERATE_BATCH_WAIT;
        while jobs.len() < MAX_GENERATE_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        jobs.retain(|j| !j.tokens.is_closed());
        if jobs.is_empty() {
            continue;
        }
        if join_running.load(Ordering::Relaxed) {
            if let Some(batch) = &newest {
                let mut inbox = batch.inbox.lock();
                if inbox.open && inbox.rows + jobs.len() <= MAX_GENERATE_BATCH {
                    tracing::debug!(jobs = jobs.len(), "joining a running generation batch");
                    inbox.rows += jobs.len();
                    inbox.jobs.append(&mut jobs);
                    continue;
                }
            }
        }
        tracing::debug!(batch = jobs.len(), "generation batch");
        let batch = Arc::new(OpenBatch {
            inbox: Mutex::new(Inbox {
                open: true,
                jobs: Vec::new(),
                rows: jobs.len(),
            }),
        });
        newest = Some(batch.clone());
        let (bb, st) = (backbone.clone(), stats.clone());
        tokio::task::spawn_blocking(move || run_generation(&bb, &st, &batch, jobs));
    }
}

/// Renders the jobs' prompts and adds them to `generator` as new rows (after dropping its
/// finished rows, and their senders with them); when they cannot join together, each tries
/// alone, so an error reaches only the request that caused it. Blocking.
fn admit_jobs<'a>(
    backbone: &'a Backbone,
    stats: &InferenceStats,
    generator: &mut BatchGenerator<'a>,
    senders: &mut Vec<Option<TokenSender>>,
    jobs: Vec<GenerateJob>,
    joining: bool,
) {
    match generator.retain_unfinished() {
        Ok(kept) => *senders = kept.iter().map(|&k| senders[k].take()).collect(),
        Err(e) => {
            let status = backbone_status(e);
            for job in jobs {
                let _ = job.started.send(Err(status.clone()));
            }
            return;
        }
    }
    let mut ready = Vec::with_capacity(jobs.len());
    for job in jobs {
        match backbone.render_prompt(&job.input, &RenderOptions::default()) {
            Ok(ids) => ready.push((job, ids)),
            Err(e) => {
                let _ = job.started.send(Err(backbone_status(e)));
            }
        }
    }
    fn request((job, ids): &(GenerateJob, Vec<u32>)) -> GenerateRequest<'_> {
        GenerateRequest {
            prompt_ids: ids.clone(),
            adapters: job
                .expert
                .as_deref()
                .map(LoadedExpert::adapters)
                .unwrap_or_default(),
            params: job.params.clone(),
        }
    }
    let together = {
        let reqs: Vec<GenerateRequest<'_>> = ready.iter().map(request).collect();
        generator.admit(&reqs)
    };
    let mut admitted = 0;
    match together {
        Ok(()) => {
            for (job, _) in ready {
                let _ = job.started.send(Ok(()));
                senders.push(Some(job.tokens));
                admitted += 1;
            }
        }
        Err(e) if ready.len() == 1 => {
            if let Some((job, _)) = ready.into_iter().next() {
                let _ = job.started.send(Err(backbone_status(e)));
            }
        }
        Err(_) => {
            for job in ready {
                let alone = generator.admit(&[request(&job)]);
                match alone {
                    Ok(()) => {
                        let _ = job.0.started.send(Ok(()));
                        senders.push(Some(job.0.tokens));
                        admitted += 1;
                    }
                    Err(e) => {
                        let _ = job.0.started.send(Err(backbone_status(e)));
                    }
                }
            }
        }
    }
    if joining {
        stats.generate_joined.fetch_add(admitted, Ordering::Relaxed);
    }
    stats
        .max_generate_batch
        .fetch_max(generator.len() as u64, Ordering::Relaxed);
}

type TokenSender = mpsc::UnboundedSender<Result<GeneratedToken, Status>>;

/// Runs one generation batch to its end: admits `jobs`, then steps, sending each row its
/// tokens, admitting the jobs that arrive in `batch`'s inbox between steps. A row's sender is
/// dropped with its last token (its stream ends then, not when the batch does); a row whose
/// reader went away is stopped at the next step. Ends (closing the inbox) when no row is left
/// generating and no job waits. Blocking.
fn run_generation(
    backbone: &Backbone,
    stats: &InferenceStats,
    batch: &OpenBatch,
    jobs: Vec<GenerateJob>,
) {
    stats.generate_batches.fetch_add(1, Ordering::Relaxed);
    let mut generator = BatchGenerator::new(backbone);
    let mut streams = RowStreams {
        senders: Vec::new(),
        active: 0,
        stats,
    };
    let mut pending = jobs;
    let mut joining = false;
    loop {
        if !pending.is_empty() {
            let jobs = std::mem::take(&mut pending);
            admit_jobs(
                backbone,
                stats,
                &mut generator,
                &mut streams.senders,
                jobs,
                joining,
            );
        }
        joining = true;
        for (row, tx) in streams.senders.iter().enumerate() {
            if tx.as_ref().is_some_and(|tx| tx.is_closed()) {
                generator.stop_row(row);
            }
        }
        streams.sync(&generator);
        if generator.is_done() {
            let mut inbox = batch.inbox.lock();
            if inbox.jobs.is_empty() {
                inbox.open = false;
                break;
            }
            pending = std::mem::take(&mut inbox.jobs);
            continue;
        }
        match generator.step() {
            Ok(tokens) => {
                for (row, token) in tokens.into_iter().enumerate() {
                    let Some(token) = token else { continue };
                    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    let sent = streams.senders[row].as_ref().map(|tx| tx.send(Ok(token)));
                    if matches!(sent, Some(Err(_))) {
                        generator.stop_row(row);
                    }
                }
            }
            // The error reaches every row still generating (a row it came from is marked
            // finished by the step itself); the batch stops them all and goes on with the
            // jobs waiting to join, if any.
            Err(e) => {
                let status = backbone_status(e);
                let failed: Vec<TokenSender> =
                    streams.senders.iter_mut().flat_map(Option::take).collect();
                for row in 0..generator.len() {
                    generator.stop_row(row);
                }
                streams.sync(&generator);
                for tx in failed {
                    let _ = tx.send(Err(status.clone()));
                }
            }
        }
        let live = streams.sync(&generator);
        let mut inbox = batch.inbox.lock();
        pending = std::mem::take(&mut inbox.jobs);
        inbox.rows = live + pending.len();
    }
    streams.sync(&generator);
}

/// The token streams of a generation batch's rows (a row's sender until it finishes) and how
/// many of them `active_generations` counts.
struct RowStreams<'s> {
    senders: Vec<Option<TokenSender>>,
    active: usize,
    stats: &'s InferenceStats,
}

impl RowStreams<'_> {
    /// Ends the streams of the rows `generator` has finished (dropping a sender ends its
    /// stream, right after the row's last token) and counts the rows still generating into
    /// `active_generations` — before dropping, so that a client whose stream has ended never
    /// finds it still counted. Returns the rows still generating.
    fn sync(&mut self, generator: &BatchGenerator<'_>) -> usize {
        let live = |row: usize| generator.finish_reason(row).is_none();
        let now = (0..self.senders.len())
            .filter(|&row| self.senders[row].is_some() && live(row))
            .count();
        let counter = &self.stats.active_generations;
        if now > self.active {
            counter.fetch_add((now - self.active) as u64, Ordering::Relaxed);
        } else {
            counter.fetch_sub((self.active - now) as u64, Ordering::Relaxed);
        }
        self.active = now;
        for (row, tx) in self.senders.iter_mut().enumerate() {
            if !live(row) {
                *tx = None;
            }
        }
        now
    }
}

pub struct InferenceService {
    inner: Arc<Inner>,
    score_tx: mpsc::Sender<Vec<ScoreJob>>,
    generate_tx: mpsc::Sender<GenerateJob>,
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
        Self::with_source(
            backbone,
            Arc::new(LocalExpertSource::new(library)),
            backbone_name,
            cache_bytes,
        )
    }

    /// Serves `backbone` with the experts of `experts` registered for backbone
    /// `backbone_name` (e.g. a [`RemoteExpertSource`](crate::expert_source::RemoteExpertSource)
    /// when the library runs in another process). Must be called inside a Tokio runtime.
    pub fn with_source(
        backbone: Arc<Backbone>,
        experts: Arc<dyn ExpertSource>,
        backbone_name: String,
        cache_bytes: usize,
    ) -> Self {
        let (score_tx, score_rx) = mpsc::channel(MAX_SCORE_BATCH * 8);
        let (generate_tx, generate_rx) = mpsc::channel(MAX_GENERATE_BATCH * 8);
        let stats = Arc::new(InferenceStats::default());
        let join_running = Arc::new(AtomicBool::new(true));
        tokio::spawn(score_scheduler(backbone.clone(), stats.clone(), score_rx));
        tokio::spawn(generate_scheduler(
            backbone.clone(),
            stats.clone(),
            join_running.clone(),
            generate_rx,
        ));
        Self {
            inner: Arc::new(Inner {
                stats,
                join_running,
                backbone,
                experts,
                backbone_name,
                cache: Mutex::new(ExpertCache::new(cache_bytes)),
            }),
            score_tx,
            generate_tx,
        }
    }

    /// Counters of the work done so far.
    pub fn stats(&self) -> &InferenceStats {
        &self.inner.stats
    }

    /// Whether Generate requests may join a generation batch that is already running (on by
    /// default; off, they only share a batch with requests that arrive together — for
    /// comparisons).
    pub fn set_join_running_generations(&self, on: bool) {
        self.inner.join_running.store(on, Ordering::Relaxed);
    }

    pub(crate) async fn resolve(&self, id: String) -> Result<Option<Arc<LoadedExpert>>, Status> {
        self.inner.resolve(&id).await
    }

    /// Checks that expert `id` ("" = bare backbone) exists, fits this backbone and loads
    /// (e.g. `roe serve --fallback-expert` at start-up).
    pub async fn check_expert(&self, id: &str) -> Result<(), Status> {
        self.resolve(id.to_string()).await.map(|_| ())
    }

    /// Scores `items` through the scheduler, in order. They go in submissions of at most
    /// [`MAX_SCORE_BATCH`], each kept whole in one batch (with other requests' jobs when
    /// there is room).
    pub(crate) async fn score_items(
        &self,
        items: Vec<ScoreItem>,
    ) -> Result<Vec<ScoreOutput>, Status> {
        let mut replies = Vec::with_capacity(items.len());
        let mut group = Vec::new();
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let (reply, rx) = oneshot::channel();
            replies.push(rx);
            group.push(ScoreJob {
                input: item.input,
                choices: item.choices,
                expert: item.expert,
                reply,
            });
            if group.len() == MAX_SCORE_BATCH || i + 1 == n {
                self.score_tx
                    .send(std::mem::take(&mut group))
                    .await
                    .map_err(|_| Status::unavailable("the scoring scheduler has stopped"))?;
            }
        }
        let mut outs = Vec::with_capacity(replies.len());
        for rx in replies {
            outs.push(
                rx.await
                    .map_err(|_| Status::internal("the scoring scheduler dropped the request"))??,
            );
        }
        Ok(outs)
    }

    /// Hands `input` to the generation scheduler; resolves once its prompt has run (or with
    /// the status saying why it could not), returning the tokens as they come. Dropping the
    /// receiver stops the generation at its next step.
    async fn submit_generation(
        &self,
        expert: Option<Arc<LoadedExpert>>,
        input: String,
        params: GenerateParams,
    ) -> Result<mpsc::UnboundedReceiver<Result<GeneratedToken, Status>>, Status> {
        let (tokens, rx) = mpsc::unbounded_channel();
        let (started, started_rx) = oneshot::channel();
        self.generate_tx
            .send(GenerateJob {
                input,
                expert,
                params,
                started,
                tokens,
            })
            .await
            .map_err(|_| Status::unavailable("the generation scheduler has stopped"))?;
        started_rx
            .await
            .map_err(|_| Status::internal("the generation worker failed"))??;
        Ok(rx)
    }

    /// Generates the whole answer to `input` (no streaming), as Generate would stream it.
    /// Stops early when the caller goes away (the returned future is dropped).
    pub(crate) async fn generate_text(
        &self,
        expert: Option<Arc<LoadedExpert>>,
        input: String,
        params: GenerateParams,
    ) -> Result<(String, FinishReason), Status> {
        let mut rx = self.submit_generation(expert, input, params).await?;
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        while let Some(token) = rx.recv().await {
            let token = token?;
            text.push_str(&token.text);
            if let Some(f) = token.finish {
                finish = f;
            }
        }
        Ok((text, finish))
    }
}

/// `status` with `field: ` in front of its message, keeping its code.
pub(crate) fn prefixed(field: &str, s: Status) -> Status {
    Status::new(s.code(), format!("{field}: {}", s.message()))
}

/// The text of a Score or Generate input; `extra` bytes (choices, stop strings) count against
/// the same budget. `prefix` goes before the field names ("inputs[2]." in Answer).
pub(crate) fn check_text_input(prefix: &str, input: &str, extra: usize) -> Result<(), Status> {
    if input.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "{prefix}input: must not be empty"
        )));
    }
    if input.len() + extra > MAX_INPUT_BYTES {
        return Err(Status::resource_exhausted(format!(
            "{prefix}input: more than {MAX_INPUT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The input and choices of a scoring request, as Score checks them.
pub(crate) fn check_score_input(
    prefix: &str,
    input: &str,
    choices: &[String],
) -> Result<(), Status> {
    if choices.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{prefix}choices: at least one is required"
        )));
    }
    if choices.len() > MAX_CHOICES {
        return Err(Status::invalid_argument(format!(
            "{prefix}choices: at most {MAX_CHOICES}"
        )));
    }
    check_text_input(prefix, input, choices.iter().map(String::len).sum())
}

pub(crate) fn score_response(
    expert_id: String,
    choices: &[String],
    out: &ScoreOutput,
) -> proto::ScoreResponse {
    proto::ScoreResponse {
        choices: choices
            .iter()
            .zip(&out.choices)
            .map(|(choice, s)| proto::ChoiceScore {
                choice: choice.clone(),
                sum_logprob: s.sum_logprob,
                mean_logprob: s.mean_logprob,
                num_tokens: s.num_tokens as u32,
            })
            .collect(),
        best: out.best as u32,
        best_by_mean: out.best_by_mean as u32,
        expert_id,
    }
}

pub(crate) fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

/// Validated sampling parameters of a Generate request.
pub(crate) fn generate_params(req: &proto::GenerateRequest) -> Result<GenerateParams, Status> {
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
        check_score_input("", &req.input, &req.choices)?;
        let expert = self.resolve(req.expert_id.clone()).await?;
        let out = self
            .score_items(vec![ScoreItem {
                expert,
                input: req.input,
                choices: req.choices.clone(),
            }])
            .await?
            .pop()
            .ok_or_else(|| Status::internal("scoring returned no result"))?;
        Ok(Response::new(score_response(
            req.expert_id,
            &req.choices,
            &out,
        )))
    }

    async fn score_ensemble(
        &self,
        request: Request<proto::ScoreEnsembleRequest>,
    ) -> Result<Response<proto::ScoreEnsembleResponse>, Status> {
        let req = request.into_inner();
        let n = req.expert_ids.len();
        if !(2..=MAX_ENSEMBLE_MEMBERS).contains(&n) {
            return Err(Status::invalid_argument(format!(
                "expert_ids: an ensemble has 2 to {MAX_ENSEMBLE_MEMBERS} experts, got {n}"
            )));
        }
        for (i, id) in req.expert_ids.iter().enumerate() {
            if req.expert_ids[..i].contains(id) {
                return Err(Status::invalid_argument(format!(
                    "expert_ids[{i}]: {id:?} is listed twice"
                )));
            }
        }
        check_score_input("", &req.input, &req.choices)?;
        let mut experts = Vec::with_capacity(n);
        for (i, id) in req.expert_ids.iter().enumerate() {
            experts.push(
                self.inner
                    .resolve(id)
                    .await
                    .map_err(|s| prefixed(&format!("expert_ids[{i}]"), s))?,
            );
        }
        // One submission: the members share one batch.
        let items = experts
            .into_iter()
            .map(|expert| ScoreItem {
                expert,
                input: req.input.clone(),
                choices: req.choices.clone(),
            })
            .collect();
        let outs = self.score_items(items).await?;
        let vote = ensemble_vote(&outs).map_err(backbone_status)?;
        Ok(Response::new(proto::ScoreEnsembleResponse {
            members: req
                .expert_ids
                .into_iter()
                .zip(&outs)
                .map(|(id, out)| score_response(id, &req.choices, out))
                .collect(),
            votes: vote.votes,
            summed_logprob: vote.summed_logprob,
            best: vote.best as u32,
        }))
    }

    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::GenerateResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        check_text_input("", &req.input, req.stop.iter().map(String::len).sum())?;
        let params = generate_params(&req)?;
        let expert = self.resolve(req.expert_id.clone()).await?;
        // The prompt runs before the answer, so that its errors become the status.
        let rx = self.submit_generation(expert, req.input, params).await?;
        let stream = UnboundedReceiverStream::new(rx).map(|token| {
            token.map(|t| proto::GenerateResponse {
                text: t.text,
                token_id: t.id,
                logprob: t.logprob,
                finish_reason: t.finish.map(finish_name).unwrap_or_default().to_string(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
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
                    &roe_backbone::ModelShape {
                        hidden_size: 4,
                        ..roe_backbone::ModelShape::smollm2_135m()
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
