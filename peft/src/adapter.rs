//! Either kind of adapter, read by its `peft_type`.

use crate::config::PeftConfig;
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::prompt::SoftPromptAdapter;
use crate::shape::ModelShape;
use crate::summary::AdapterSummary;
use crate::write::PeftFiles;

#[derive(Debug, Clone, PartialEq)]
pub enum Adapter {
    SoftPrompt(SoftPromptAdapter),
    Lora(LoraAdapter),
}

impl Adapter {
    /// Reads and validates an adapter of either kind against `shape`. This is the check that
    /// registration runs and that the runtime's loaders run: one accepts what the other loads.
    pub fn from_peft(config_json: &str, safetensors: &[u8], shape: &ModelShape) -> Result<Self> {
        match PeftConfig::from_json(config_json)? {
            PeftConfig::PromptTuning(c) => {
                SoftPromptAdapter::from_config(c, safetensors, shape).map(Self::SoftPrompt)
            }
            PeftConfig::Lora(c) => LoraAdapter::from_config(c, safetensors, shape).map(Self::Lora),
        }
    }

    /// [`Self::from_peft`]'s checks, same errors, without keeping the decoded values (a LoRA
    /// is decoded a block at a time): what registration runs on an upload.
    pub fn check_peft(
        config_json: &str,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<AdapterSummary> {
        match PeftConfig::from_json(config_json)? {
            PeftConfig::PromptTuning(c) => {
                SoftPromptAdapter::from_config(c, safetensors, shape).map(|p| p.summary())
            }
            PeftConfig::Lora(c) => LoraAdapter::check_config(c, safetensors, shape),
        }
    }

    pub fn summary(&self) -> AdapterSummary {
        match self {
            Self::SoftPrompt(p) => p.summary(),
            Self::Lora(l) => l.summary(),
        }
    }

    pub fn to_peft(&self) -> Result<PeftFiles> {
        match self {
            Self::SoftPrompt(p) => p.to_peft(),
            Self::Lora(l) => l.to_peft(),
        }
    }
}
