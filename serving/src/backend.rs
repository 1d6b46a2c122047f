//! What the serving core needs from a model runtime, as text-embeddings-inference's backend
//! trait: load an expert, score a batch, decode a batch step by step. The queues are written
//! against this trait only, so their batching and failure handling are tested with a fake
//! backend (see the queues' tests); [`crate::candle`] implements it for the GGUF backbone.

use roe_backbone::{FinishReason, GenerateParams, GeneratedToken, ScoreOutput};
use roe_expert_library::{ExpertKind, PeftAdapter};

use crate::error::Result;

/// One input to score with one expert (a Score request, an ensemble member, an Answer input).
pub struct ScoreInput<'a, E> {
    pub input: &'a str,
    pub choices: &'a [String],
    pub expert: Option<&'a E>,
    /// True once the request has been withdrawn (its client went away or its deadline
    /// passed): a backend asks it between forward passes and leaves the input out.
    pub withdrawn: &'a (dyn Fn() -> bool + Sync),
    /// Keep only the last this many prompt ids (the request asked for the cut); None: all.
    pub keep: Option<usize>,
}

/// A [`ScoreInput::withdrawn`] for inputs nobody withdraws.
pub fn never_withdrawn() -> bool {
    false
}

/// How a generation's input becomes its prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptFormat {
    /// The canonical rendering the experts were trained on: `input + "\nAnswer:"`.
    #[default]
    Canonical,
    /// The input's tokens as they are (a plain continuation, or a chat already rendered with
    /// the backbone's template), special tokens included.
    Raw,
}

/// One generation to start in a batch.
pub struct GenerationInput<'a, E> {
    pub input: &'a str,
    pub format: PromptFormat,
    pub expert: Option<&'a E>,
    pub params: &'a GenerateParams,
    /// Keep only the last this many prompt ids (the request asked for the cut); None: all.
    pub keep: Option<usize>,
}

/// A model runtime the serving core drives. Its methods block (CPU work); the core calls
/// them from blocking threads only.
pub trait Backend: Send + Sync + 'static {
    /// An expert loaded and checked against this backend, ready to run.
    type Expert: Send + Sync + 'static;
    /// A running generation batch.
    type Generation<'a>: GenerationBatch<Self::Expert>
    where
        Self: 'a;

    /// Parses an adapter of `kind` and checks that it fits; FAILED_PRECONDITION when not.
    fn load_expert(&self, kind: ExpertKind, adapter: &PeftAdapter) -> Result<Self::Expert>;

    /// Scores every input (in order) in shared forward passes; an input withdrawn before its
    /// pass is left out (`None`).
    fn score_batch(
        &self,
        inputs: &[ScoreInput<'_, Self::Expert>],
    ) -> Result<Vec<Option<ScoreOutput>>>;

    /// An empty generation batch that requests join with [`GenerationBatch::admit`].
    fn generation(&self) -> Self::Generation<'_>;

    /// A conversation rendered with the backbone's own chat template, ready for the
    /// generation prompt ([`PromptFormat::Raw`]); INVALID_ARGUMENT when the backbone has no
    /// template or the messages do not fit it.
    fn chat_prompt(&self, messages: &[roe_backbone::ChatMessage]) -> Result<String>;

    /// Token counts of `input`'s prompt in `format` and of the longest of `choices` as
    /// scoring renders them: what [`crate::context`] checks against the context.
    fn count_tokens(
        &self,
        input: &str,
        format: PromptFormat,
        choices: &[String],
    ) -> Result<crate::context::PromptCount>;

    /// Positions the backbone reads (prompt, soft prompt and answer together).
    fn context_length(&self) -> usize;

    /// Positions `expert` adds in front of every prompt (a soft prompt's virtual tokens).
    fn soft_prompt_tokens(&self, expert: &Self::Expert) -> usize;
}

/// Rows decoded together, one forward per step for the rows still generating. Rows are
/// numbered in admission order; [`GenerationBatch::retain_unfinished`] renumbers them.
pub trait GenerationBatch<E> {
    /// Adds the inputs as new rows, all or none.
    fn admit(&mut self, inputs: &[GenerationInput<'_, E>]) -> Result<()>;
    /// Drops the finished rows; returns the indices (before the call) of the rows kept.
    fn retain_unfinished(&mut self) -> Result<Vec<usize>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when no row is still generating.
    fn is_done(&self) -> bool;
    /// Why `row` finished, or None while it generates.
    fn finish_reason(&self, row: usize) -> Option<FinishReason>;
    /// Ends `row` (its reader went away); it takes no part in later steps.
    fn stop_row(&mut self, row: usize);
    /// One decode step: the token of each row that produced one.
    fn step(&mut self) -> Result<Vec<Option<GeneratedToken>>>;
}
