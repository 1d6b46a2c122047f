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
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("unsupported peft_type {found:?} (expected {expected})")]
    PeftType {
        found: String,
        expected: &'static str,
    },
    #[error("adapter_model.safetensors: {0}")]
    Safetensors(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("unexpected tensor {0}")]
    UnexpectedTensor(String),
    #[error("tensor {name}: shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name}: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name}: holds non-finite values (NaN or infinity)")]
    NonFinite { name: String },
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
