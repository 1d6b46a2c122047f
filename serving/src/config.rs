//! Every knob of the serving core in one place, set from `roe serve` flags or the environment
//! and logged at start-up.

use std::time::Duration;

/// Batching, queue, cache and request limits of the serving core.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingConfig {
    /// Requests one scoring pass may merge.
    pub max_score_batch: usize,
    /// How long the Score queue waits for more requests after the first one arrives.
    pub score_batch_wait: Duration,
    /// Rows one generation batch may hold (at most the backbone's limit,
    /// [`roe_backbone::MAX_GENERATE_BATCH`]).
    pub max_generate_batch: usize,
    /// How long the generation queue waits for more requests after the first one (a
    /// generation lasts seconds; sharing its forwards is worth a few milliseconds).
    pub generate_batch_wait: Duration,
    /// Whether requests join a generation batch already running (continuous batching); off,
    /// they only share a batch with requests that arrive together (for comparisons).
    pub join_running_generations: bool,
    /// Submissions each queue holds before callers wait for room.
    pub queue_capacity: usize,
    /// Byte budget of the loaded-expert cache.
    pub expert_cache_bytes: u64,
    pub limits: RequestLimits,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            max_score_batch: 16,
            score_batch_wait: Duration::from_millis(5),
            max_generate_batch: roe_backbone::MAX_GENERATE_BATCH,
            generate_batch_wait: Duration::from_millis(10),
            join_running_generations: true,
            queue_capacity: 128,
            expert_cache_bytes: 512 * 1024 * 1024,
            limits: RequestLimits::default(),
        }
    }
}

impl ServingConfig {
    /// The configuration with its batch sizes brought within what the queues can run: at
    /// least one row, and no more generation rows than the backbone takes.
    pub fn normalised(mut self) -> Self {
        self.max_score_batch = self.max_score_batch.max(1);
        self.max_generate_batch = self
            .max_generate_batch
            .clamp(1, roe_backbone::MAX_GENERATE_BATCH);
        self.queue_capacity = self.queue_capacity.max(1);
        self.limits.max_ensemble_members = self
            .limits
            .max_ensemble_members
            .clamp(2, self.max_score_batch.max(2));
        self.limits.max_answer_generate_inputs = self
            .limits
            .max_answer_generate_inputs
            .clamp(1, self.max_generate_batch);
        self
    }
}

/// What one request may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Most choices of one Score request.
    pub max_choices: usize,
    /// Most bytes of input (plus choices, plus stop strings) of one request.
    pub max_input_bytes: usize,
    /// Most input tokens (prompt and soft prompt) of one request (`--max-input-length`);
    /// 0: the backbone's context. Within it a prompt must also leave room for its answer.
    pub max_input_tokens: usize,
    /// Most new tokens of one generation.
    pub max_new_tokens: u32,
    /// New tokens when a request leaves max_new_tokens at 0.
    pub default_new_tokens: u32,
    /// Highest accepted temperature.
    pub max_temperature: f32,
    /// Most stop strings of one generation.
    pub max_stop_strings: usize,
    /// Most members of one ensemble: one Score batch holds them all.
    pub max_ensemble_members: usize,
    /// Most inputs one Answer call may score.
    pub max_answer_score_inputs: usize,
    /// Most inputs one Answer call may generate for: they share one generation batch.
    pub max_answer_generate_inputs: usize,
    /// Most bytes of one choice.
    pub max_choice_bytes: usize,
    /// Most bytes of text one call may have the backbone read, over all its inputs, choices
    /// and ensemble members: scoring reads each input once and each choice once, so this
    /// bounds the forward-pass work of one request (Answer, ScoreEnsemble).
    pub max_work_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_choices: 64,
            max_input_bytes: 64 * 1024,
            max_input_tokens: 0,
            max_new_tokens: 512,
            default_new_tokens: 64,
            max_temperature: 5.0,
            max_stop_strings: 16,
            max_ensemble_members: 16,
            max_answer_score_inputs: 64,
            max_answer_generate_inputs: 16,
            max_choice_bytes: 4 * 1024,
            max_work_bytes: 256 * 1024,
        }
    }
}
