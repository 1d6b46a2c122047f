//! The one error type of PEFT reading, validation and writing. Every message names the config
//! field or the tensor at fault; [`PeftError::kind`] says whose fault it is, so that callers map
//! it onto their own errors (INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED).

/// Whose problem an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftErrorKind {
    /// The files are malformed, inconsistent, or use a PEFT feature the runtime does not run.
    Invalid,
    /// The files are well formed but made for another model shape.
    DoesNotFit,
    /// Over one of the size limits.
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeftError {
    /// Not JSON, or not a JSON object.
    #[error("adapter_config.json: {0}")]
    ConfigJson(String),
    #[error(
        "adapter_config.json: peft_type {found:?} is not supported here (expected {expected})"
    )]
    PeftType {
        found: String,
        expected: &'static str,
    },
    /// A config field is missing, of the wrong type, or contradicts the tensors.
    #[error("adapter_config.json: {field}: {message}")]
    ConfigField { field: String, message: String },
    /// A config field asks for a PEFT feature that the runtime does not implement.
    #[error("adapter_config.json: {field}: {message}; roe's runtime does not support it")]
    Unsupported { field: String, message: String },
    /// A config field describes another model (token_dim, num_layers).
    #[error("adapter_config.json: {field} is {found}, the model has {expected}")]
    ModelMismatch {
        field: String,
        found: usize,
        expected: usize,
    },
    /// A layer index (of a tensor or in `layers_to_transform`) the model does not have.
    #[error("{at}: layer {layer}, the model has {num_layers} layers")]
    LayerOutOfRange {
        at: String,
        layer: usize,
        num_layers: usize,
    },
    #[error("adapter_model.safetensors: {0}")]
    Safetensors(String),
    #[error("adapter_model.safetensors: missing tensor {0}")]
    MissingTensor(String),
    #[error("adapter_model.safetensors: unexpected tensor {name}: {reason}")]
    UnexpectedTensor { name: String, reason: String },
    #[error("adapter_model.safetensors: tensor {name} has shape {found:?}, the model needs {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("adapter_model.safetensors: tensor {name}: dtype {dtype} is not supported (F32, F16 or BF16)")]
    Dtype { name: String, dtype: String },
    #[error("adapter_model.safetensors: tensor {name} holds NaN or infinite values")]
    NonFinite { name: String },
    /// `what` names the field or file over the limit.
    #[error("{what} is {found}, the limit is {limit}")]
    TooLarge {
        what: String,
        found: usize,
        limit: usize,
    },
}

impl PeftError {
    pub fn kind(&self) -> PeftErrorKind {
        match self {
            Self::ModelMismatch { .. } | Self::LayerOutOfRange { .. } | Self::Shape { .. } => {
                PeftErrorKind::DoesNotFit
            }
            // A tensor the config promises but the file lacks: most often a LoRA trained for a
            // model with more layers or other modules, so it is reported as not fitting.
            Self::MissingTensor(_) => PeftErrorKind::DoesNotFit,
            Self::TooLarge { .. } => PeftErrorKind::TooLarge,
            Self::ConfigJson(_)
            | Self::PeftType { .. }
            | Self::ConfigField { .. }
            | Self::Unsupported { .. }
            | Self::Safetensors(_)
            | Self::UnexpectedTensor { .. }
            | Self::Dtype { .. }
            | Self::NonFinite { .. } => PeftErrorKind::Invalid,
        }
    }

    /// Where the problem is, as a request field path: `adapter_config.<field>` for config
    /// problems, `weights` for the safetensors file (tensor names are in the message).
    pub fn field(&self) -> String {
        match self {
            Self::ConfigJson(_) => "adapter_config".to_string(),
            Self::PeftType { .. } => "adapter_config.peft_type".to_string(),
            Self::ConfigField { field, .. }
            | Self::Unsupported { field, .. }
            | Self::ModelMismatch { field, .. } => format!("adapter_config.{field}"),
            Self::LayerOutOfRange { at, .. } if at == "layers_to_transform" => {
                "adapter_config.layers_to_transform".to_string()
            }
            Self::TooLarge { what, .. } if !what.starts_with("adapter_") => {
                format!("adapter_config.{what}")
            }
            Self::TooLarge { what, .. } if what == "adapter_config.json" => {
                "adapter_config".to_string()
            }
            _ => "weights".to_string(),
        }
    }

    pub(crate) fn field_error(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigField {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unsupported {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = PeftError> = std::result::Result<T, E>;
