//! Counters of the work the serving core has done, for tests, benchmarks and monitoring.

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct InferenceStats {
    /// Scoring passes the Score queue ran.
    pub score_batches: AtomicU64,
    /// Score inputs those passes served.
    pub scored_requests: AtomicU64,
    /// The largest Score batch so far.
    pub max_score_batch: AtomicU64,
    /// Time those passes spent in the backend, in microseconds (all of them together).
    pub score_batch_micros: AtomicU64,
    /// Tokens generated (all streams).
    pub generated_tokens: AtomicU64,
    /// Generation batches started (each over one or more requests).
    pub generate_batches: AtomicU64,
    /// The most requests one generation batch has held at once.
    pub max_generate_batch: AtomicU64,
    /// Generations that joined a batch already running (continuous batching).
    pub generate_joined: AtomicU64,
    /// Generation streams still producing tokens.
    pub active_generations: AtomicU64,
    /// Expert cache misses served: weights read from the library, parsed and checked. Loads
    /// of one expert that overlap count once (they share one load).
    pub expert_loads: AtomicU64,
    /// Time those loads took, in microseconds (all of them together).
    pub expert_load_micros: AtomicU64,
    /// Batches whose worker panicked (their requests got INTERNAL).
    pub worker_panics: AtomicU64,
}
