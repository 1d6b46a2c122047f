//! What registration records about a validated adapter (stored as JSON with the expert).

use serde::{Deserialize, Serialize};

use crate::config::PeftType;

/// The facts of an adapter that the library stores and reports. For a LoRA, `alpha` and
/// `scale` are exactly what the runtime applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", from = "StoredSummary")]
pub enum AdapterSummary {
    Prompt {
        num_virtual_tokens: usize,
        token_dim: usize,
    },
    Lora {
        r: usize,
        alpha: f64,
        /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
        scale: f64,
        /// Alphabetical.
        target_modules: Vec<String>,
        /// How many layers are adapted.
        num_layers: usize,
        /// The adapted layers when not all of them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layers_to_transform: Option<Vec<usize>>,
    },
}

impl AdapterSummary {
    pub fn peft_type(&self) -> PeftType {
        match self {
            Self::Prompt { .. } => PeftType::PromptTuning,
            Self::Lora { .. } => PeftType::Lora,
        }
    }
}

/// The stored form, read leniently: records written before the scale was recorded have none,
/// and were registered at `alpha / r` (their `alpha` already defaulted to `r` when unset).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum StoredSummary {
    Prompt {
        num_virtual_tokens: usize,
        token_dim: usize,
    },
    Lora {
        r: usize,
        alpha: f64,
        #[serde(default)]
        scale: Option<f64>,
        target_modules: Vec<String>,
        num_layers: usize,
        #[serde(default)]
        layers_to_transform: Option<Vec<usize>>,
    },
}

impl From<StoredSummary> for AdapterSummary {
    fn from(s: StoredSummary) -> Self {
        match s {
            StoredSummary::Prompt {
                num_virtual_tokens,
                token_dim,
            } => Self::Prompt {
                num_virtual_tokens,
                token_dim,
            },
            StoredSummary::Lora {
                r,
                alpha,
                scale,
                target_modules,
                num_layers,
                layers_to_transform,
            } => Self::Lora {
                r,
                alpha,
                scale: scale.unwrap_or(alpha / r.max(1) as f64),
                target_modules,
                num_layers,
                layers_to_transform,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips_and_old_records_read() {
        let s = AdapterSummary::Lora {
            r: 4,
            alpha: 16.0,
            scale: 8.0,
            target_modules: vec!["q_proj".into()],
            num_layers: 30,
            layers_to_transform: None,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""type":"lora""#), "{json}");
        assert!(!json.contains("layers_to_transform"), "{json}");
        assert_eq!(serde_json::from_str::<AdapterSummary>(&json).unwrap(), s);
        let old = r#"{"type":"lora","r":4,"alpha":8.0,"target_modules":["q_proj","v_proj"],"num_layers":30}"#;
        let AdapterSummary::Lora { scale, .. } = serde_json::from_str(old).unwrap() else {
            panic!()
        };
        assert_eq!(scale, 2.0);
        let p = AdapterSummary::Prompt {
            num_virtual_tokens: 20,
            token_dim: 576,
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"type":"prompt","num_virtual_tokens":20,"token_dim":576}"#
        );
        assert_eq!(serde_json::from_str::<AdapterSummary>(&json).unwrap(), p);
    }
}
