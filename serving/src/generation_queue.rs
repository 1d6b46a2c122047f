//! The generation queue: concurrent generations decoded together, one forward per step for
//! every row still generating. Requests arriving within `generate_batch_wait` of each other
//! start one batch; later ones join the newest running batch between two of its steps when it
//! has room (continuous batching), else start a batch of their own on its own blocking
//! thread, so a long generation never holds back later requests. Each stream ends with its
//! own last token. A batch whose worker panics answers its rows and waiting requests with
//! INTERNAL and closes, so nothing waits on it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use roe_backbone::{GenerateParams, GeneratedToken};
use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, GenerationBatch, GenerationInput, PromptFormat};
use crate::config::ServingConfig;
use crate::error::{Result, ServingError};
use crate::stats::InferenceStats;
use crate::worker::{panic_message, Batcher, Liveness, LivenessGuard};

/// One generation to run.
pub struct GenerationRequest<E> {
    pub expert: Option<Arc<E>>,
    pub input: String,
    pub format: PromptFormat,
    pub params: GenerateParams,
    /// Keep only the last this many prompt ids (see [`crate::context`]); None: all.
    pub keep: Option<usize>,
}

/// The tokens of one generation as they come; the last one carries its finish reason.
/// Dropping the receiver stops the generation at its next step.
pub type TokenStream = mpsc::UnboundedReceiver<Result<GeneratedToken>>;
/// Unbounded, so that a slow reader never stalls the rows it shares a batch with (at most
/// max_new_tokens messages per request).
type TokenSender = mpsc::UnboundedSender<Result<GeneratedToken>>;

struct GenerationJob<E> {
    request: GenerationRequest<E>,
    /// Told once the prompt has run, or why it could not.
    started: oneshot::Sender<Result<()>>,
    tokens: TokenSender,
    submitted: Instant,
}

/// The stream of one row, and when its request was submitted until its first token.
struct RowSender {
    tx: TokenSender,
    submitted: Option<Instant>,
}

impl RowSender {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn send(
        &mut self,
        token: Result<GeneratedToken>,
    ) -> std::result::Result<(), mpsc::error::SendError<Result<GeneratedToken>>> {
        if token.is_ok() {
            if let Some(submitted) = self.submitted.take() {
                crate::metrics::first_token(submitted.elapsed());
            }
        }
        self.tx.send(token)
    }
}

pub struct GenerationQueue<E> {
    tx: mpsc::Sender<Vec<GenerationJob<E>>>,
    join_running: Arc<AtomicBool>,
    liveness: Liveness,
}

impl<E: Send + Sync + 'static> GenerationQueue<E> {
    /// Starts the queue's scheduler on the current Tokio runtime.
    pub fn start<B: Backend<Expert = E>>(
        backend: Arc<B>,
        stats: Arc<InferenceStats>,
        config: &ServingConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let join_running = Arc::new(AtomicBool::new(config.join_running_generations));
        let liveness = Liveness::new();
        tokio::spawn(schedule(
            backend,
            stats,
            config.clone(),
            join_running.clone(),
            rx,
            liveness.guard(),
        ));
        Self {
            tx,
            join_running,
            liveness,
        }
    }

    /// False once the scheduler has stopped (it should not: batches run guarded).
    pub fn is_running(&self) -> bool {
        self.liveness.is_alive()
    }

    /// Whether generations may join a batch that is already running.
    pub fn set_join_running(&self, on: bool) {
        self.join_running.store(on, Ordering::Relaxed);
    }

    /// Hands `requests` to the scheduler together (they share one batch when it has room
    /// for all of them) and waits until each one's prompt has run; then each result is its
    /// token stream, or why it could not start.
    pub async fn submit(&self, requests: Vec<GenerationRequest<E>>) -> Vec<Result<TokenStream>> {
        let mut group = Vec::with_capacity(requests.len());
        let mut waiting = Vec::with_capacity(requests.len());
        for request in requests {
            let (tokens, tokens_rx) = mpsc::unbounded_channel();
            let (started, started_rx) = oneshot::channel();
            group.push(GenerationJob {
                request,
                started,
                tokens,
                submitted: Instant::now(),
            });
            waiting.push((started_rx, tokens_rx));
        }
        crate::metrics::generate_queued(group.len());
        if self.tx.send(group).await.is_err() {
            crate::metrics::generate_dequeued(waiting.len());
            let e = ServingError::unavailable("the generation queue has stopped");
            return waiting.iter().map(|_| Err(e.clone())).collect();
        }
        let mut streams = Vec::with_capacity(waiting.len());
        for (started, tokens) in waiting {
            streams.push(match started.await {
                Ok(Ok(())) => Ok(tokens),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ServingError::internal("the generation worker failed")),
            });
        }
        streams
    }
}

/// A running generation batch that later requests may join.
struct OpenBatch<E> {
    inbox: Mutex<Inbox<E>>,
}

struct Inbox<E> {
    /// False once the batch's thread has ended: jobs must start a batch of their own.
    open: bool,
    /// Jobs that join the batch before its next step.
    jobs: Vec<GenerationJob<E>>,
    /// Rows still generating plus jobs waiting to join: the batch's room is
    /// `max_generate_batch` minus this.
    rows: usize,
}

async fn schedule<B: Backend>(
    backend: Arc<B>,
    stats: Arc<InferenceStats>,
    config: ServingConfig,
    join_running: Arc<AtomicBool>,
    rx: mpsc::Receiver<Vec<GenerationJob<B::Expert>>>,
    _alive: LivenessGuard,
) {
    let max = config.max_generate_batch;
    let mut newest: Option<Arc<OpenBatch<B::Expert>>> = None;
    let mut batches = Batcher::new(rx, max, config.generate_batch_wait);
    while let Some(mut jobs) = batches.next().await {
        crate::metrics::generate_dequeued(jobs.len());
        jobs.retain(|j| !j.tokens.is_closed());
        if jobs.is_empty() {
            continue;
        }
        if join_running.load(Ordering::Relaxed) {
            if let Some(batch) = &newest {
                let mut inbox = batch.inbox.lock();
                if inbox.open && inbox.rows + jobs.len() <= max {
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
        let (backend, stats) = (backend.clone(), stats.clone());
        tokio::task::spawn_blocking(move || run_batch(&*backend, &stats, &batch, jobs));
    }
}

/// Runs one generation batch to its end; a panic anywhere in it answers every row still
/// streaming and every job waiting to join with INTERNAL, and closes the batch's inbox so
/// the scheduler sends later jobs elsewhere. Blocking.
fn run_batch<B: Backend>(
    backend: &B,
    stats: &InferenceStats,
    batch: &OpenBatch<B::Expert>,
    jobs: Vec<GenerationJob<B::Expert>>,
) {
    stats.generate_batches.fetch_add(1, Ordering::Relaxed);
    let mut streams = RowStreams {
        senders: Vec::new(),
        active: 0,
        stats,
    };
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
        drive(backend, stats, batch, jobs, &mut streams)
    }));
    if let Err(panic) = run {
        stats.worker_panics.fetch_add(1, Ordering::Relaxed);
        let why = panic_message(&*panic);
        tracing::error!(panic = %why, "generation worker panicked");
        let e = ServingError::internal(format!("the generation worker failed: {why}"));
        let waiting = {
            let mut inbox = batch.inbox.lock();
            inbox.open = false;
            std::mem::take(&mut inbox.jobs)
        };
        for job in waiting {
            let _ = job.started.send(Err(e.clone()));
        }
        streams.fail_all(&e);
    }
}

/// Admits `jobs`, then steps, sending each row its tokens and admitting the jobs that arrive
/// in `batch`'s inbox between steps. Ends (closing the inbox) when no row is left generating
/// and no job waits.
fn drive<B: Backend>(
    backend: &B,
    stats: &InferenceStats,
    batch: &OpenBatch<B::Expert>,
    jobs: Vec<GenerationJob<B::Expert>>,
    streams: &mut RowStreams<'_>,
) {
    let mut generator = backend.generation();
    let mut pending = jobs;
    let mut joining = false;
    loop {
        if !pending.is_empty() {
            let jobs = std::mem::take(&mut pending);
            admit(stats, &mut generator, &mut streams.senders, jobs, joining);
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
                    crate::metrics::token_generated();
                    let sent = streams
                        .senders
                        .get_mut(row)
                        .and_then(Option::as_mut)
                        .map(|tx| tx.send(Ok(token)));
                    if matches!(sent, Some(Err(_))) {
                        generator.stop_row(row);
                    }
                }
            }
            // The error reaches every row still generating; the batch stops them all and
            // goes on with the jobs waiting to join, if any.
            Err(e) => {
                for row in 0..generator.len() {
                    generator.stop_row(row);
                }
                streams.fail_all(&e);
                streams.sync(&generator);
            }
        }
        let live = streams.sync(&generator);
        let mut inbox = batch.inbox.lock();
        pending = std::mem::take(&mut inbox.jobs);
        inbox.rows = live + pending.len();
    }
    streams.sync(&generator);
}

/// Adds the jobs to `generator` as new rows (after dropping its finished rows, and their
/// senders with them); when they cannot join together, each tries alone, so an error reaches
/// only the request that caused it.
fn admit<E, G: GenerationBatch<E>>(
    stats: &InferenceStats,
    generator: &mut G,
    senders: &mut Vec<Option<RowSender>>,
    jobs: Vec<GenerationJob<E>>,
    joining: bool,
) {
    match generator.retain_unfinished() {
        Ok(kept) => *senders = kept.iter().map(|&k| senders[k].take()).collect(),
        Err(e) => {
            for job in jobs {
                let _ = job.started.send(Err(e.clone()));
            }
            return;
        }
    }
    fn input<E>(job: &GenerationJob<E>) -> GenerationInput<'_, E> {
        GenerationInput {
            input: &job.request.input,
            format: job.request.format,
            expert: job.request.expert.as_deref(),
            params: &job.request.params,
            keep: job.request.keep,
        }
    }
    let together = {
        let inputs: Vec<_> = jobs.iter().map(input).collect();
        generator.admit(&inputs)
    };
    let mut admitted = 0;
    let mut started = |job: GenerationJob<E>, senders: &mut Vec<Option<RowSender>>| {
        let _ = job.started.send(Ok(()));
        senders.push(Some(RowSender {
            tx: job.tokens,
            submitted: Some(job.submitted),
        }));
        admitted += 1;
    };
    match together {
        Ok(()) => {
            for job in jobs {
                started(job, senders);
            }
        }
        Err(e) if jobs.len() == 1 => {
            for job in jobs {
                let _ = job.started.send(Err(e.clone()));
            }
        }
        Err(_) => {
            for job in jobs {
                let alone = generator.admit(&[input(&job)]);
                match alone {
                    Ok(()) => started(job, senders),
                    Err(e) => {
                        let _ = job.started.send(Err(e));
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
    crate::metrics::generate_batch(generator.len());
}

/// The token streams of a batch's rows (a row's sender until it finishes) and how many of
/// them `active_generations` counts.
struct RowStreams<'s> {
    senders: Vec<Option<RowSender>>,
    active: usize,
    stats: &'s InferenceStats,
}

impl RowStreams<'_> {
    /// Ends the streams of the rows `generator` has finished (dropping a sender ends its
    /// stream, right after the row's last token) and counts the rows still generating into
    /// `active_generations` — before dropping, so that a client whose stream has ended never
    /// finds it still counted. Returns the rows still generating.
    fn sync<E>(&mut self, generator: &impl GenerationBatch<E>) -> usize {
        let live = |row: usize| row < generator.len() && generator.finish_reason(row).is_none();
        let now = (0..self.senders.len())
            .filter(|&row| self.senders[row].is_some() && live(row))
            .count();
        self.count(now);
        for (row, tx) in self.senders.iter_mut().enumerate() {
            if !live(row) {
                *tx = None;
            }
        }
        now
    }

    /// Ends every stream still open with `e`.
    fn fail_all(&mut self, e: &ServingError) {
        self.count(0);
        for mut tx in self.senders.iter_mut().flat_map(Option::take) {
            let _ = tx.send(Err(e.clone()));
        }
    }

    fn count(&mut self, now: usize) {
        let counter = &self.stats.active_generations;
        if now > self.active {
            counter.fetch_add((now - self.active) as u64, Ordering::Relaxed);
        } else {
            counter.fetch_sub((self.active - now) as u64, Ordering::Relaxed);
        }
        self.active = now;
    }
}
