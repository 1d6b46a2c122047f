//! Training jobs: a bounded queue in front of a fixed number of worker threads (one by
//! default: a job uses every core), each job's spec, rows, state and checkpoints kept under
//! `<dir>/<job id>/`. A job found queued or running when the queue opens (the process
//! stopped or crashed) resumes from its last checkpoint, or fails with the reason; it is
//! never silently lost. Watchers get every state change through a `tokio::sync::watch`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use roe_backbone::Backbone;
use roe_expert_library::{
    validate_expert_id, ExpertKind, ExpertLibrary, ExpertMeta, Instance, NewExpert, PeftAdapter,
    TrainingRecord,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::checkpoint;
use crate::data::{self, EvalMetric, TaskSpec};
use crate::error::{Result, TrainError};
use crate::params::Params;
use crate::recipe::Recipe;
use crate::train::{self, RunnableAdapter, TrainState};

/// What a client asks to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub expert_id: String,
    pub name: String,
    pub description: String,
    pub task: TaskSpec,
    pub recipe: Recipe,
    /// Register as the next version when the id exists (else the job is refused).
    pub new_version: bool,
    /// Members of a prompt ensemble (Lester et al. §6): this many experts trained with seeds
    /// `seed, seed + 1, ...`, registered as `<expert_id>.1` ... `<expert_id>.N` (1: one
    /// expert, `<expert_id>`).
    #[serde(default = "one")]
    pub ensemble_size: usize,
}

fn one() -> usize {
    1
}

/// Most members of one ensemble.
pub const MAX_ENSEMBLE: usize = 8;

impl JobSpec {
    /// The ids the job registers.
    pub fn expert_ids(&self) -> Vec<String> {
        if self.ensemble_size <= 1 {
            vec![self.expert_id.clone()]
        } else {
            (1..=self.ensemble_size)
                .map(|k| format!("{}.{k}", self.expert_id))
                .collect()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A job as watchers and lists see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub expert_id: String,
    /// Every expert the job registers (the ensemble's members, or `expert_id` alone).
    #[serde(default)]
    pub expert_ids: Vec<String>,
    pub kind: ExpertKind,
    pub state: JobState,
    /// `queued`, `training`, `evaluating`, `registering` or `done`.
    pub phase: String,
    /// 1-based place in the queue while queued (0 otherwise).
    pub queue_position: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub tokens_per_s: f64,
    pub steps_per_s: f64,
    pub eta_s: f64,
    pub train_rows: usize,
    pub held_out_rows: usize,
    pub metric: EvalMetric,
    pub held_out_score: Option<f64>,
    pub held_out_baseline: Option<f64>,
    /// Each ensemble member's held-out score (one entry for a single expert).
    #[serde(default)]
    pub member_scores: Vec<f64>,
    /// The step the run continued from after its latest restart (0 when it never stopped).
    pub resumed_from_step: usize,
    /// The registered expert's version (0 until it is registered).
    pub expert_version: u64,
    pub error: String,
    pub created_at_unix_ms: u64,
    pub finished_at_unix_ms: u64,
}

/// Where finished experts go: the library (or anything that registers like it).
pub trait ExpertSink: Send + Sync {
    /// Refuses a job whose expert could not be registered (bad id, existing id without
    /// `new_version`), before any training.
    fn check(&self, expert_id: &str, new_version: bool) -> Result<()>;
    /// Registers the trained expert; returns its version.
    fn register(&self, expert: NewExpert, new_version: bool, record: TrainingRecord)
        -> Result<u64>;
}

impl ExpertSink for ExpertLibrary {
    fn check(&self, expert_id: &str, new_version: bool) -> Result<()> {
        validate_expert_id(expert_id)
            .map_err(|e| TrainError::invalid("expert_id", e.to_string()))?;
        match self.get(expert_id) {
            Ok(meta) if !new_version => Err(TrainError::FailedPrecondition(format!(
                "expert_id: {expert_id:?} already exists (version {}); set new_version to \
                 train its next version",
                meta.version
            ))),
            _ => Ok(()),
        }
    }

    fn register(
        &self,
        expert: NewExpert,
        new_version: bool,
        record: TrainingRecord,
    ) -> Result<u64> {
        // A job resumed after a crash between registering and recording it finds its own
        // expert already there: that registration stands.
        if let Ok(meta) = self.get(&expert.id) {
            if meta.training.as_ref().map(|t| t.job_id.as_str()) == Some(record.job_id.as_str()) {
                return Ok(meta.version);
            }
        }
        self.register_trained(expert, new_version, Some(record))
            .map(|m: ExpertMeta| m.version)
            .map_err(|e| TrainError::Register(e.to_string()))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct JobsConfig {
    /// Jobs trained at once.
    pub workers: usize,
    /// Jobs waiting beyond the running ones.
    pub max_queued: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            max_queued: 16,
        }
    }
}

/// The job file: spec and status (rows live beside it in `rows.jsonl`).
#[derive(Serialize, Deserialize)]
struct JobFile {
    spec: JobSpec,
    status: JobStatus,
}

struct Job {
    /// None for a job whose file could not be read (reported failed, kept listed).
    spec: Option<JobSpec>,
    status: watch::Sender<JobStatus>,
    cancel: Arc<AtomicBool>,
}

struct Inner {
    dir: PathBuf,
    backbone: Arc<Backbone>,
    base_model: String,
    sink: Arc<dyn ExpertSink>,
    config: JobsConfig,
    jobs: Mutex<BTreeMap<String, Job>>,
    queue: Mutex<VecDeque<String>>,
    wake: Condvar,
    /// Set when the queue is dropped: workers stop at the next step and leave their job
    /// `running` on disk, so the next start resumes it.
    shutdown: AtomicBool,
}

/// The training queue. Dropping it stops the workers within a step.
pub struct TrainingJobs {
    inner: Arc<Inner>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status of a job whose file cannot be read: failed, with the reason.
fn unreadable_job(id: &str, error: String) -> JobStatus {
    JobStatus {
        id: id.to_string(),
        expert_id: String::new(),
        expert_ids: Vec::new(),
        kind: ExpertKind::Prompt,
        state: JobState::Failed,
        phase: "done".into(),
        queue_position: 0,
        step: 0,
        total_steps: 0,
        loss: 0.0,
        learning_rate: 0.0,
        tokens_per_s: 0.0,
        steps_per_s: 0.0,
        eta_s: 0.0,
        train_rows: 0,
        held_out_rows: 0,
        metric: EvalMetric::Accuracy,
        held_out_score: None,
        held_out_baseline: None,
        member_scores: Vec::new(),
        resumed_from_step: 0,
        expert_version: 0,
        error,
        created_at_unix_ms: 0,
        finished_at_unix_ms: now_ms(),
    }
}

fn new_job_id() -> String {
    format!("train-{:x}-{:04x}", now_ms(), rand::random::<u16>())
}

impl TrainingJobs {
    /// Opens the queue over `dir` (created if missing) and resumes the jobs left unfinished
    /// there. `base_model` is written into trained adapters as `base_model_name_or_path`.
    pub fn open(
        dir: impl AsRef<Path>,
        backbone: Arc<Backbone>,
        base_model: impl Into<String>,
        sink: Arc<dyn ExpertSink>,
        config: JobsConfig,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            backbone,
            base_model: base_model.into(),
            sink,
            config: JobsConfig {
                workers: config.workers.max(1),
                max_queued: config.max_queued.max(1),
            },
            jobs: Mutex::new(BTreeMap::new()),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        inner.recover()?;
        let workers = (0..inner.config.workers)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("roe-train-{i}"))
                    .spawn(move || inner.work())
                    .map_err(|e| TrainError::io(&dir, e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { inner, workers })
    }

    /// Validates and queues a job; returns its first status.
    pub fn submit(&self, spec: JobSpec, rows: Vec<Instance>) -> Result<JobStatus> {
        spec.recipe.validate()?;
        validate_expert_id(&spec.expert_id)
            .map_err(|e| TrainError::invalid("expert_id", e.to_string()))?;
        // What registration will check at the end of the run, checked before it starts (as
        // the library does: INVALID_ARGUMENT naming the field).
        let max_text = roe_expert_library::library::Limits::default().max_text_bytes;
        for (field, text, max) in [
            (
                "name",
                spec.name.as_str(),
                roe_expert_library::library::MAX_NAME_BYTES,
            ),
            ("description", spec.description.as_str(), max_text),
            ("task_description", spec.task.description.as_str(), max_text),
        ] {
            if text.len() > max {
                return Err(TrainError::invalid(
                    field,
                    format!("{} bytes, at most {max}", text.len()),
                ));
            }
        }
        let rows = data::check_rows(&rows, &spec.task)?;
        if spec.recipe.kind == ExpertKind::Prompt
            && spec.recipe.prompt_init == crate::recipe::PromptInit::ClassLabels
            && spec.task.description.trim().is_empty()
            && spec.task.labels.is_empty()
        {
            return Err(TrainError::invalid(
                "task_description",
                "class-label init needs a description or labels (or choose another init)",
            ));
        }
        if spec.ensemble_size == 0 || spec.ensemble_size > MAX_ENSEMBLE {
            return Err(TrainError::invalid(
                "ensemble_size",
                format!("{} is outside 1..={MAX_ENSEMBLE}", spec.ensemble_size),
            ));
        }
        for expert_id in spec.expert_ids() {
            self.inner.sink.check(&expert_id, spec.new_version)?;
        }
        let (train_rows, held) =
            data::split(&rows, spec.recipe.held_out_fraction, spec.recipe.seed);
        let id = new_job_id();
        let status = JobStatus {
            id: id.clone(),
            expert_id: spec.expert_id.clone(),
            expert_ids: spec.expert_ids(),
            kind: spec.recipe.kind,
            state: JobState::Queued,
            phase: "queued".into(),
            queue_position: 0,
            step: 0,
            total_steps: spec.recipe.steps * spec.ensemble_size.max(1),
            // Never NaN: the job file is JSON, which has no NaN.
            loss: 0.0,
            learning_rate: 0.0,
            tokens_per_s: 0.0,
            steps_per_s: 0.0,
            eta_s: 0.0,
            train_rows: train_rows.len(),
            held_out_rows: held.len().min(spec.recipe.max_eval_rows),
            metric: data::metric_of(&rows),
            held_out_score: None,
            held_out_baseline: None,
            member_scores: Vec::new(),
            resumed_from_step: 0,
            expert_version: 0,
            error: String::new(),
            created_at_unix_ms: now_ms(),
            finished_at_unix_ms: 0,
        };
        {
            let queue = self.inner.queue.lock();
            if queue.len() >= self.inner.config.max_queued {
                return Err(TrainError::QueueFull(format!(
                    "{} training jobs are already waiting (at most {})",
                    queue.len(),
                    self.inner.config.max_queued
                )));
            }
        }
        let job_dir = self.inner.dir.join(&id);
        std::fs::create_dir_all(&job_dir).map_err(|e| TrainError::io(&job_dir, e))?;
        let mut lines = String::new();
        for r in &rows {
            lines.push_str(
                &serde_json::to_string(r).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
            );
            lines.push('\n');
        }
        checkpoint::write_atomically(&job_dir.join("rows.jsonl"), lines.as_bytes())?;
        let status = self.inner.insert(spec, status)?;
        self.inner.enqueue(&id);
        Ok(self.get(&status.id).unwrap_or(status))
    }

    pub fn get(&self, id: &str) -> Result<JobStatus> {
        self.inner
            .jobs
            .lock()
            .get(id)
            .map(|j| j.status.borrow().clone())
            .ok_or_else(|| TrainError::JobNotFound(id.to_string()))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self
            .inner
            .jobs
            .lock()
            .values()
            .map(|j| j.status.borrow().clone())
            .collect();
        v.sort_by(|a, b| {
            b.created_at_unix_ms
                .cmp(&a.created_at_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        v
    }

    /// Every change of the job's status, the current one first.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<JobStatus>> {
        self.inner
            .jobs
            .lock()
            .get(id)
            .map(|j| j.status.subscribe())
            .ok_or_else(|| TrainError::JobNotFound(id.to_string()))
    }

    /// Cancels a queued job at once, a running one within a step. A finished job is
    /// FAILED_PRECONDITION.
    pub fn cancel(&self, id: &str) -> Result<JobStatus> {
        let status = self.get(id)?;
        if status.state.is_finished() {
            return Err(TrainError::FailedPrecondition(format!(
                "job {id} already {}",
                status.state.as_str()
            )));
        }
        if let Some(j) = self.inner.jobs.lock().get(id) {
            j.cancel.store(true, Ordering::SeqCst);
        }
        let removed = {
            let mut q = self.inner.queue.lock();
            let before = q.len();
            q.retain(|q| q != id);
            before != q.len()
        };
        if removed {
            self.inner.finish(
                id,
                JobState::Cancelled,
                "cancelled before it started".into(),
            )?;
            self.inner.update_positions();
        }
        self.get(id)
    }

    /// Where the job keeps its rows, state, checkpoint and (once trained) `adapter/`.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.inner.dir.join(id)
    }
}

impl Drop for TrainingJobs {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Inner {
    fn insert(&self, spec: JobSpec, status: JobStatus) -> Result<JobStatus> {
        let id = status.id.clone();
        self.persist(&spec, &status)?;
        let (tx, _) = watch::channel(status.clone());
        self.jobs.lock().insert(
            id,
            Job {
                spec: Some(spec),
                status: tx,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
        Ok(status)
    }

    fn persist(&self, spec: &JobSpec, status: &JobStatus) -> Result<()> {
        let file = JobFile {
            spec: spec.clone(),
            status: status.clone(),
        };
        let text =
            serde_json::to_vec_pretty(&file).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        checkpoint::write_atomically(&self.dir.join(&status.id).join("job.json"), &text)
    }

    fn enqueue(&self, id: &str) {
        self.queue.lock().push_back(id.to_string());
        self.update_positions();
        self.wake.notify_one();
    }

    fn update_positions(&self) {
        let queue = self.queue.lock().clone();
        let jobs = self.jobs.lock();
        for (i, id) in queue.iter().enumerate() {
            if let Some(j) = jobs.get(id) {
                j.status.send_if_modified(|s| {
                    let changed = s.queue_position != i + 1;
                    s.queue_position = i + 1;
                    changed
                });
            }
        }
    }

    /// Applies `f` to a job's status, publishes it, and persists it when `durable`.
    fn update(&self, id: &str, durable: bool, f: impl FnOnce(&mut JobStatus)) -> Result<JobStatus> {
        let (spec, status) = {
            let jobs = self.jobs.lock();
            let j = jobs
                .get(id)
                .ok_or_else(|| TrainError::JobNotFound(id.into()))?;
            j.status.send_modify(f);
            let s = j.status.borrow().clone();
            (j.spec.clone(), s)
        };
        if let (true, Some(spec)) = (durable, spec) {
            self.persist(&spec, &status)?;
        }
        Ok(status)
    }

    fn finish(&self, id: &str, state: JobState, error: String) -> Result<JobStatus> {
        self.update(id, true, |s| {
            s.state = state;
            s.phase = "done".into();
            s.queue_position = 0;
            s.error = error;
            s.finished_at_unix_ms = now_ms();
        })
    }

    /// Loads every job under the directory; unfinished ones are queued again (oldest
    /// first) and will resume from their checkpoints.
    fn recover(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let mut pending = Vec::new();
        for e in entries.flatten() {
            let path = e.path().join("job.json");
            // A folder without a job file is a submission that never returned: nothing was
            // acknowledged for it.
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let file: JobFile = match serde_json::from_slice(&text) {
                Ok(f) => f,
                Err(err) => {
                    // Listed as failed with the reason rather than dropped.
                    tracing::warn!(path = %path.display(), error = %err, "unreadable training job file");
                    let id = e.file_name().to_string_lossy().to_string();
                    let status = unreadable_job(&id, format!("its job file is unreadable: {err}"));
                    let (tx, _) = watch::channel(status);
                    self.jobs.lock().insert(
                        id,
                        Job {
                            spec: None,
                            status: tx,
                            cancel: Arc::new(AtomicBool::new(false)),
                        },
                    );
                    continue;
                }
            };
            let mut status = file.status;
            if !status.state.is_finished() {
                status.state = JobState::Queued;
                status.phase = "queued".into();
                pending.push((status.created_at_unix_ms, status.id.clone()));
            }
            let (tx, _) = watch::channel(status.clone());
            self.jobs.lock().insert(
                status.id.clone(),
                Job {
                    spec: Some(file.spec),
                    status: tx,
                    cancel: Arc::new(AtomicBool::new(false)),
                },
            );
        }
        pending.sort();
        for (_, id) in pending {
            tracing::info!(job = %id, "resuming a training job left unfinished");
            self.queue.lock().push_back(id);
        }
        self.update_positions();
        Ok(())
    }

    fn work(self: Arc<Self>) {
        loop {
            let id = {
                let mut q = self.queue.lock();
                loop {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(id) = q.pop_front() {
                        break id;
                    }
                    self.wake.wait(&mut q);
                }
            };
            self.update_positions();
            let outcome = self.run_job(&id);
            if self.shutdown.load(Ordering::SeqCst) && matches!(outcome, Err(TrainError::Cancelled))
            {
                // Stopped by the process going down: left `running` on disk to resume.
                let cancelled = self
                    .jobs
                    .lock()
                    .get(&id)
                    .map(|j| j.cancel.load(Ordering::SeqCst))
                    .unwrap_or(false);
                if !cancelled {
                    return;
                }
            }
            let result = match outcome {
                Ok(()) => Ok(()),
                Err(TrainError::Cancelled) => self
                    .finish(&id, JobState::Cancelled, "cancelled by a client".into())
                    .map(|_| ()),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "training job failed");
                    self.finish(&id, JobState::Failed, e.to_string())
                        .map(|_| ())
                }
            };
            if let Err(e) = result {
                tracing::error!(job = %id, error = %e, "could not record a training job's end");
            }
        }
    }

    fn run_job(&self, id: &str) -> Result<()> {
        let (spec, cancel) = {
            let jobs = self.jobs.lock();
            let j = jobs
                .get(id)
                .ok_or_else(|| TrainError::JobNotFound(id.into()))?;
            let spec = j
                .spec
                .clone()
                .ok_or_else(|| TrainError::Checkpoint(format!("job {id} has no readable spec")))?;
            (spec, j.cancel.clone())
        };
        let cancelled = || cancel.load(Ordering::SeqCst) || self.shutdown.load(Ordering::SeqCst);
        if cancelled() {
            return Err(TrainError::Cancelled);
        }
        let job_dir = self.dir.join(id);
        let rows_path = job_dir.join("rows.jsonl");
        let text =
            std::fs::read_to_string(&rows_path).map_err(|e| TrainError::io(&rows_path, e))?;
        let rows: Vec<Instance> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| TrainError::Checkpoint(format!("rows.jsonl: {e}")))
            })
            .collect::<Result<_>>()?;
        let recipe = &spec.recipe;
        let bb = &self.backbone;
        let (train_rows, mut held) = data::split(&rows, recipe.held_out_fraction, recipe.seed);
        held.truncate(recipe.max_eval_rows);
        let rendered = data::render(bb, &train_rows)?;
        let ids = spec.expert_ids();
        let members = ids.len();
        let mut finished: Vec<(TrainState, PeftAdapter)> = Vec::with_capacity(members);
        for k in 0..members {
            // A single expert keeps its checkpoint in the job's folder, members in their own.
            let dir = if members == 1 {
                job_dir.clone()
            } else {
                job_dir.join(format!("member-{}", k + 1))
            };
            std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
            let mut recipe_k = recipe.clone();
            recipe_k.seed = recipe.seed.wrapping_add(k as u64);
            let state = self.train_member(id, k, &spec, &recipe_k, &rendered, &dir, &cancelled)?;
            let adapter = state.params.to_peft(bb, &self.base_model)?;
            let out = dir.join("adapter");
            std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
            checkpoint::write_atomically(
                &out.join("adapter_config.json"),
                adapter.config_json.as_bytes(),
            )?;
            checkpoint::write_atomically(
                &out.join("adapter_model.safetensors"),
                &adapter.safetensors,
            )?;
            finished.push((state, adapter));
        }
        self.update(id, true, |s| s.phase = "evaluating".into())?;
        let metric = data::metric_of(&rows);
        let runnable = finished
            .iter()
            .map(|(_, a)| RunnableAdapter::from_peft(bb, recipe.kind, a))
            .collect::<Result<Vec<_>>>()?;
        let (member_scores, score, baseline) = if held.is_empty() {
            (Vec::new(), None, None)
        } else {
            let (m, s) = train::evaluate_ensemble(bb, &runnable, &held, metric, &cancelled)?;
            let b = train::evaluate(bb, None, &held, metric, &cancelled)?;
            (m, Some(s), Some(b))
        };
        self.update(id, true, |s| {
            s.held_out_score = score;
            s.held_out_baseline = baseline;
            s.member_scores = member_scores.clone();
            s.phase = "registering".into();
        })?;
        if cancelled() {
            return Err(TrainError::Cancelled);
        }
        let recipe_json =
            serde_json::to_string(recipe).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let mut version = 0;
        let mut final_loss = f64::NAN;
        for (k, ((state, adapter), expert_id)) in finished.into_iter().zip(&ids).enumerate() {
            final_loss = state.losses.last().copied().unwrap_or(f64::NAN);
            let record = TrainingRecord {
                job_id: id.to_string(),
                recipe_json: recipe_json.clone(),
                steps: state.step,
                final_loss,
                metric: metric.as_str().into(),
                held_out_score: member_scores.get(k).copied(),
                held_out_baseline: baseline,
                held_out_rows: held.len(),
                train_rows: train_rows.len(),
                ensemble_members: if members > 1 { ids.clone() } else { Vec::new() },
            };
            let instances = data::sample_instances(
                &train_rows,
                recipe.instances,
                recipe.seed.wrapping_add(k as u64),
            );
            version = self.sink.register(
                NewExpert {
                    id: expert_id.clone(),
                    name: if spec.name.is_empty() || members == 1 {
                        spec.name.clone()
                    } else {
                        format!("{} ({} of {members})", spec.name, k + 1)
                    },
                    description: spec.description.clone(),
                    backbone: None,
                    adapter,
                    instances,
                },
                spec.new_version,
                record,
            )?;
        }
        self.update(id, true, |s| {
            s.expert_version = version;
            s.state = JobState::Succeeded;
            s.phase = "done".into();
            s.finished_at_unix_ms = now_ms();
        })?;
        tracing::info!(job = %id, expert = %spec.expert_id, members, version, final_loss, ?score, "training job done");
        Ok(())
    }

    /// Trains member `k` (0-based) of a job from its checkpoint in `dir` (or from the start),
    /// publishing progress over the whole job's steps.
    #[allow(clippy::too_many_arguments)]
    fn train_member(
        &self,
        id: &str,
        k: usize,
        spec: &JobSpec,
        recipe: &Recipe,
        rendered: &[data::RenderedRow],
        dir: &Path,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<TrainState> {
        let bb = &self.backbone;
        let mut state = match checkpoint::load(dir)? {
            Some(s) => s,
            None => TrainState::new(Params::init(bb, recipe, &spec.task)?),
        };
        let done_before = k * recipe.steps;
        let resumed = state.step;
        self.update(id, true, |s| {
            s.state = JobState::Running;
            s.phase = "training".into();
            s.queue_position = 0;
            s.step = done_before + state.step;
            // The latest restart's point, not the first: checkpoints only move forward, so
            // a later resume (or a later member of this one) is the one the run goes on from.
            if resumed > 0 {
                s.resumed_from_step = done_before + resumed;
            }
            if let Some(&l) = state.losses.last() {
                s.loss = l;
            }
        })?;
        let every = recipe.checkpoint_every;
        let members = spec.ensemble_size.max(1);
        let outcome = train::run(bb, recipe, rendered, &mut state, cancelled, &mut |r, st| {
            if r.step % every == 0 || r.step == r.total_steps {
                checkpoint::save(dir, st)?;
            }
            let left = (members - k - 1) * recipe.steps;
            self.update(id, false, |s| {
                s.step = done_before + r.step;
                s.loss = r.loss;
                s.learning_rate = r.learning_rate;
                s.tokens_per_s = r.tokens_per_s;
                s.steps_per_s = r.steps_per_s;
                s.eta_s = r.eta_s + left as f64 / r.steps_per_s.max(1e-9);
            })?;
            Ok(())
        });
        if let Err(e) = outcome {
            if matches!(e, TrainError::Cancelled) {
                // Keep what was done: a resumed run continues from here.
                checkpoint::save(dir, &state)?;
            }
            return Err(e);
        }
        Ok(state)
    }
}
