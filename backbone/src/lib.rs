//! roe-backbone: the shared frozen backbone (SmolLM2-135M-Instruct, a Llama in GGUF) on
//! candle, serving soft-prompt and LoRA experts.
//!
//! - [`Backbone::load`] reads hyper-parameters, weights and tokenizer from the GGUF file.
//! - [`Backbone::forward`] runs a batch of embedding rows (so soft prompts can be prepended)
//!   with padding, a [`KvCache`] and a per-row LoRA ([`LoraBatch`]).
//! - [`Backbone::score_batch`] does rank classification with the canonical rendering;
//!   [`ensemble_vote`] combines several experts' scores of one input by majority vote.
//! - [`Backbone::generator`] / [`Backbone::generate`] decode greedily or by sampling.
//! - [`SoftPrompt`] and [`Lora`] load PEFT experts, read and validated by roe-peft against
//!   [`Backbone::model_shape`] ([`ExpertError`]).

pub mod chat;
pub mod config;
pub mod ensemble;
pub mod error;
pub mod experts;
pub mod generate;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod score;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::BackboneConfig;
pub use ensemble::{ensemble_vote, EnsembleVote};
pub use error::{BackboneError, ExpertError, Result};
pub use experts::{Adapters, Lora, LoraBlock, LoraTarget, ModelShape, SoftPrompt};
pub use generate::{
    BatchGenerator, FinishReason, GenerateParams, GenerateRequest, GeneratedToken, Generation,
    Generator, MAX_GENERATE_BATCH,
};
pub use model::{
    keep_last, AnswerLoss, AnswerRow, Backbone, BackboneOptions, KvCache, LoraBatch, QuantKernel,
    TrainAdapter, TrainLora, DEFAULT_MAX_BATCH_PREFILL_TOKENS, MIN_PREFILL_CHUNK,
};
pub use roe_peft::PeftError;
pub use score::{ChoiceScore, RenderOptions, ScoreIdsRequest, ScoreOutput, ScoreRequest};
pub use tokenizer::TextTokenizer;

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_sync() {
        assert_send_sync::<crate::Backbone>();
        assert_send_sync::<crate::Lora>();
        assert_send_sync::<crate::SoftPrompt>();
        assert_send_sync::<crate::KvCache>();
        assert_send_sync::<crate::LoraBatch>();
    }
}
