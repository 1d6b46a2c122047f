//! Typed errors of the backbone runtime.

use std::path::PathBuf;

/// Why an expert (soft prompt or LoRA) could not be loaded. Every variant means the expert
/// itself is unusable with this backbone (a precondition failure), never an internal fault.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The PEFT files are malformed, unsupported, or made for another model shape; the same
    /// verdict registration reaches (both read them with roe-peft).
    #[error(transparent)]
    Peft(#[from] roe_peft::PeftError),
    /// Weights handed in directly (not as PEFT files) do not fit the backbone.
    #[error("{0}")]
    Invalid(String),
}

/// Errors of the backbone runtime.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gguf: {0}")]
    Gguf(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid expert: {0}")]
    Expert(#[from] ExpertError),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl BackboneError {
    /// True when the error is caused by the caller's expert or input (maps to
    /// FAILED_PRECONDITION / INVALID_ARGUMENT rather than INTERNAL).
    pub fn is_expert_error(&self) -> bool {
        matches!(self, BackboneError::Expert(_))
    }
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, BackboneError::InvalidInput(_))
    }
}

pub type Result<T, E = BackboneError> = std::result::Result<T, E>;
