//! The Score queue: concurrent scoring submissions merged into one backend pass (up to
//! `max_score_batch` inputs, waiting at most `score_batch_wait` for company), so requests
//! for different experts share forward passes. A submission (one request's inputs: a Score,
//! an ensemble's members, an Answer's inputs) is never split.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use roe_backbone::ScoreOutput;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, ScoreInput};
use crate::config::ServingConfig;
use crate::error::{Result, ServingError};
use crate::stats::InferenceStats;
use crate::worker::{panic_message, Batcher, Liveness};

/// One input to score with one expert.
pub struct ScoreItem<E> {
    pub expert: Option<Arc<E>>,
    pub input: String,
    pub choices: Vec<String>,
    /// Keep only the last this many prompt ids (see [`crate::context`]); None: all.
    pub keep: Option<usize>,
}

struct ScoreJob<E> {
    item: ScoreItem<E>,
    reply: oneshot::Sender<Result<ScoreOutput>>,
}

pub struct ScoreQueue<E> {
    tx: mpsc::Sender<Vec<ScoreJob<E>>>,
    max_batch: usize,
    liveness: Liveness,
}

impl<E: Send + Sync + 'static> ScoreQueue<E> {
    /// Starts the queue's scheduler on the current Tokio runtime.
    pub fn start<B: Backend<Expert = E>>(
        backend: Arc<B>,
        stats: Arc<InferenceStats>,
        config: &ServingConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let liveness = Liveness::new();
        tokio::spawn(schedule(
            backend,
            stats,
            config.clone(),
            rx,
            liveness.guard(),
        ));
        Self {
            tx,
            max_batch: config.max_score_batch,
            liveness,
        }
    }

    /// False once the scheduler has stopped (it should not: batches run guarded).
    pub fn is_running(&self) -> bool {
        self.liveness.is_alive()
    }

    /// Scores `items`, in order. They go in submissions of at most `max_score_batch`, each
    /// kept whole in one batch (with other requests' inputs when there is room). Dropping
    /// the future withdraws the inputs not yet scored.
    pub async fn score(&self, items: Vec<ScoreItem<E>>) -> Result<Vec<ScoreOutput>> {
        let mut replies = Vec::with_capacity(items.len());
        let mut group = Vec::new();
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let (reply, rx) = oneshot::channel();
            replies.push(rx);
            group.push(ScoreJob { item, reply });
            if group.len() == self.max_batch || i + 1 == n {
                let size = group.len();
                crate::metrics::score_queued(size);
                if self.tx.send(std::mem::take(&mut group)).await.is_err() {
                    crate::metrics::score_dequeued(size);
                    return Err(ServingError::unavailable("the Score queue has stopped"));
                }
            }
        }
        let mut outs = Vec::with_capacity(replies.len());
        for rx in replies {
            outs.push(
                rx.await
                    .map_err(|_| ServingError::internal("the Score queue dropped the request"))??,
            );
        }
        Ok(outs)
    }
}

async fn schedule<B: Backend>(
    backend: Arc<B>,
    stats: Arc<InferenceStats>,
    config: ServingConfig,
    rx: mpsc::Receiver<Vec<ScoreJob<B::Expert>>>,
    _alive: crate::worker::LivenessGuard,
) {
    let mut batches = Batcher::new(rx, config.max_score_batch, config.score_batch_wait);
    while let Some(mut jobs) = batches.next().await {
        crate::metrics::score_dequeued(jobs.len());
        // Requests whose clients went away need no work.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        tracing::debug!(batch = jobs.len(), "scoring batch");
        let (backend, stats) = (backend.clone(), stats.clone());
        // run_batch answers every job itself, panics included; a JoinError is left only if
        // the runtime shuts down, and then the dropped replies tell the callers.
        let _ = tokio::task::spawn_blocking(move || run_batch(&*backend, &stats, jobs)).await;
    }
}

/// Runs the jobs in one backend pass. When the pass fails, each job runs alone so an error
/// reaches only the request that caused it; a panic answers the jobs it hit with INTERNAL.
fn run_batch<B: Backend>(backend: &B, stats: &InferenceStats, jobs: Vec<ScoreJob<B::Expert>>) {
    stats.score_batches.fetch_add(1, Ordering::Relaxed);
    stats
        .scored_requests
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    stats
        .max_score_batch
        .fetch_max(jobs.len() as u64, Ordering::Relaxed);
    // A job is withdrawn when its caller dropped the reply's receiver: the client went
    // away or its deadline passed (tonic drops the handler's future then).
    let withdrawn: Vec<_> = jobs.iter().map(|j| move || j.reply.is_closed()).collect();
    let inputs: Vec<ScoreInput<'_, B::Expert>> = jobs
        .iter()
        .zip(&withdrawn)
        .map(|(j, w)| ScoreInput {
            input: &j.item.input,
            choices: &j.item.choices,
            expert: j.item.expert.as_deref(),
            withdrawn: w,
            keep: j.item.keep,
        })
        .collect();
    let started = std::time::Instant::now();
    let together = guarded(stats, || backend.score_batch(&inputs));
    stats
        .score_batch_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    crate::metrics::score_batch(inputs.len(), started.elapsed());
    let results: Vec<Result<ScoreOutput>> = match together {
        Ok(outs) if outs.len() == inputs.len() => outs
            .into_iter()
            .map(|o| o.ok_or_else(|| ServingError::cancelled("the request was withdrawn")))
            .collect(),
        Ok(outs) => {
            let e = ServingError::internal(format!(
                "scoring returned {} results for {} inputs",
                outs.len(),
                inputs.len()
            ));
            inputs.iter().map(|_| Err(e.clone())).collect()
        }
        Err(e) if inputs.len() == 1 => vec![Err(e)],
        Err(_) => inputs
            .iter()
            .map(|input| {
                guarded(stats, || backend.score_batch(std::slice::from_ref(input))).and_then(
                    |mut o| match (o.pop(), o.is_empty()) {
                        (Some(Some(out)), true) => Ok(out),
                        (Some(None), true) => {
                            Err(ServingError::cancelled("the request was withdrawn"))
                        }
                        _ => Err(ServingError::internal(
                            "scoring one input did not return one result",
                        )),
                    },
                )
            })
            .collect(),
    };
    drop(inputs);
    for (job, r) in jobs.into_iter().zip(results) {
        let _ = job.reply.send(r);
    }
}

/// `f`, with a panic turned into INTERNAL (and counted).
fn guarded<T>(stats: &InferenceStats, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        stats.worker_panics.fetch_add(1, Ordering::Relaxed);
        let why = panic_message(&*panic);
        tracing::error!(panic = %why, "scoring worker panicked");
        Err(ServingError::internal(format!(
            "the scoring worker failed: {why}"
        )))
    })
}
