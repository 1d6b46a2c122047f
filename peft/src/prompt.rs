//! A validated prompt-tuning adapter: learned vectors placed before the input embeddings.

use crate::config::{check_virtual_tokens, AdapterOrigin, PeftConfig, PromptTuningConfig};
use crate::error::{PeftError, Result};
use crate::keys::PROMPT_EMBEDDINGS;
use crate::shape::ModelShape;
use crate::summary::AdapterSummary;
use crate::tensors;

/// `num_virtual_tokens` rows of the model's hidden size, f32, finite, within the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftPromptAdapter {
    /// [num_virtual_tokens, hidden_size], row-major.
    embeddings: Vec<f32>,
    num_virtual_tokens: usize,
    shape: ModelShape,
    origin: AdapterOrigin,
}

impl SoftPromptAdapter {
    /// From row-major values of shape [num_virtual_tokens, shape.hidden_size].
    pub fn new(
        embeddings: Vec<f32>,
        num_virtual_tokens: usize,
        shape: &ModelShape,
    ) -> Result<Self> {
        check_virtual_tokens(num_virtual_tokens)?;
        if Some(embeddings.len()) != num_virtual_tokens.checked_mul(shape.hidden_size) {
            return Err(PeftError::Shape {
                name: PROMPT_EMBEDDINGS.into(),
                found: vec![embeddings.len()],
                expected: vec![num_virtual_tokens, shape.hidden_size],
            });
        }
        tensors::check_finite(PROMPT_EMBEDDINGS, &embeddings)?;
        Ok(Self {
            embeddings,
            num_virtual_tokens,
            shape: *shape,
            origin: AdapterOrigin::default(),
        })
    }

    /// Records where the prompt comes from (written into the config by the writer).
    pub fn with_origin(mut self, origin: AdapterOrigin) -> Self {
        self.origin = origin;
        self
    }

    /// Reads and validates `adapter_config.json` (as text) and `adapter_model.safetensors`.
    pub fn from_peft(config_json: &str, safetensors: &[u8], shape: &ModelShape) -> Result<Self> {
        match PeftConfig::from_json(config_json)? {
            PeftConfig::PromptTuning(config) => Self::from_config(config, safetensors, shape),
            other => Err(PeftError::PeftType {
                found: other.peft_type().as_str().into(),
                expected: "PROMPT_TUNING",
            }),
        }
    }

    pub(crate) fn from_config(
        config: PromptTuningConfig,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<Self> {
        if let Some(d) = config.token_dim.filter(|d| *d != shape.hidden_size) {
            return Err(PeftError::ModelMismatch {
                field: "token_dim".into(),
                found: d,
                expected: shape.hidden_size,
            });
        }
        if let Some(l) = config.num_layers.filter(|l| *l != shape.num_layers) {
            return Err(PeftError::ModelMismatch {
                field: "num_layers".into(),
                found: l,
                expected: shape.num_layers,
            });
        }
        let st = tensors::open(safetensors)?;
        let mut names = st.names();
        names.sort();
        if let Some(other) = names.iter().find(|n| **n != PROMPT_EMBEDDINGS) {
            return Err(PeftError::UnexpectedTensor {
                name: other.to_string(),
                reason: format!("a prompt-tuning adapter holds only {PROMPT_EMBEDDINGS}"),
            });
        }
        let view = st
            .tensor(PROMPT_EMBEDDINGS)
            .map_err(|_| PeftError::MissingTensor(PROMPT_EMBEDDINGS.into()))?;
        let n = match view.shape() {
            [n, d] if *d == shape.hidden_size => *n,
            found => {
                let rows = config
                    .num_virtual_tokens
                    .or(found.first().copied())
                    .unwrap_or(1);
                return Err(PeftError::Shape {
                    name: PROMPT_EMBEDDINGS.into(),
                    found: found.to_vec(),
                    expected: vec![rows, shape.hidden_size],
                });
            }
        };
        if let Some(c) = config.num_virtual_tokens.filter(|c| *c != n) {
            return Err(PeftError::field_error(
                "num_virtual_tokens",
                format!("says {c} but {PROMPT_EMBEDDINGS} has {n} rows"),
            ));
        }
        check_virtual_tokens(n)?;
        let values = tensors::decode_f32(PROMPT_EMBEDDINGS, &view)?;
        Ok(Self::new(values, n, shape)?.with_origin(config.origin))
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// The model's hidden size.
    pub fn token_dim(&self) -> usize {
        self.shape.hidden_size
    }

    /// [num_virtual_tokens, token_dim], row-major.
    pub fn embeddings(&self) -> &[f32] {
        &self.embeddings
    }

    pub fn into_embeddings(self) -> Vec<f32> {
        self.embeddings
    }

    /// The shape it was validated against.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn origin(&self) -> &AdapterOrigin {
        &self.origin
    }

    pub fn summary(&self) -> AdapterSummary {
        AdapterSummary::Prompt {
            num_virtual_tokens: self.num_virtual_tokens,
            token_dim: self.token_dim(),
        }
    }
}
