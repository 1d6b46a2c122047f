//! Training errors: a bad recipe or bad rows name the field; everything else says what failed.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    /// A recipe value or a row is unusable; `field` names it as the API spells it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A row or a text past a limit; `field` names it.
    #[error("{field}: {message}")]
    TooLarge { field: String, message: String },
    #[error("training job {0:?} not found")]
    JobNotFound(String),
    /// The job exists but cannot do what was asked (e.g. cancel a finished job).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The queue of waiting jobs is full.
    #[error("{0}")]
    QueueFull(String),
    #[error("training was cancelled")]
    Cancelled,
    #[error("backbone: {0}")]
    Backbone(#[from] roe_backbone::BackboneError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("adapter: {0}")]
    Peft(#[from] roe_peft::PeftError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("registering the trained expert: {0}")]
    Register(String),
}

impl TrainError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn too_large(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::TooLarge {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
