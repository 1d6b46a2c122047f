//! roe's serving core, as text-embeddings-inference's `core/`: everything between a request
//! and the model that is not transport. It knows nothing of gRPC; `roe-services` converts
//! messages, calls in, and maps [`ServingError`] to a status in one place.
//!
//! - [`Backend`] is what the core needs from a model runtime; [`candle`] implements it for
//!   the GGUF backbone, and the queues' tests use a fake one.
//! - [`Inference`]: Score, ScoreEnsemble and Generate for experts resolved through the
//!   [`ExpertCache`] (bounded in bytes, single-flight loads) from an [`ExpertSource`].
//! - [`ScoreQueue`] merges concurrent scoring into shared passes; [`GenerationQueue`] decodes
//!   concurrent generations together, with continuous batching.
//! - [`Answerer`]: route a task through a [`RouteService`], then answer with the winner.
//! - [`ServingConfig`]: every batch size, wait, queue bound, cache budget and request limit.

pub mod answer;
pub mod backend;
pub mod cache;
pub mod candle;
pub mod config;
pub mod context;
pub mod error;
pub mod experts;
pub mod generation_queue;
pub mod inference;
pub mod metrics;
pub mod routing;
pub mod score_queue;
pub mod stats;
pub mod validate;
mod worker;

pub use answer::{Answer, AnswerInput, AnswerMode, AnswerRequest, Answered, Answerer, Chosen};
pub use backend::{Backend, GenerationBatch, GenerationInput, PromptFormat, ScoreInput};
pub use cache::ExpertCache;
pub use candle::{answer_end_id, LoadedExpert};
pub use config::{RequestLimits, ServingConfig};
pub use context::{PromptCount, PromptFit, PromptUsage};
pub use error::{ErrorKind, Result, ServingError};
pub use experts::{ExpertRef, ExpertSource, LocalExpertSource};
pub use generation_queue::{GenerationQueue, GenerationRequest, TokenStream};
pub use inference::{
    EnsembleOutput, EnsembleRequest, GenerateRequest, Inference, ScoreRequest, Started,
};
pub use routing::{LocalRouter, RouteOverrides, RouteService};
pub use score_queue::{ScoreItem, ScoreQueue};
pub use stats::InferenceStats;
pub use validate::{check_expert_id, GenerateOptions};

/// The serving core over the GGUF backbone, as `roe serve` runs it.
pub type BackboneInference = Inference<roe_backbone::Backbone>;
/// The answerer over the GGUF backbone.
pub type BackboneAnswerer = Answerer<roe_backbone::Backbone>;
