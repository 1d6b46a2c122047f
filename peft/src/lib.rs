//! roe-peft: the one place in roe that knows Hugging Face PEFT's adapter format.
//!
//! An adapter is `adapter_config.json` + `adapter_model.safetensors`, of `peft_type`
//! `PROMPT_TUNING` (a soft prompt) or `LORA`. This crate
//!
//! - types the config ([`PeftConfig`]), refusing by name the PEFT features roe's runtime does
//!   not run (DoRA, per-module ranks, fan_in_fan_out, biases, ...) and applying PEFT's
//!   defaults (`lora_alpha` 8);
//! - reads the tensors ([`LoraKey`] for every spelling PEFT writes), decodes F32/F16/BF16 to
//!   f32, refuses NaN/infinity, and checks the exact tensor set and shapes against a
//!   [`ModelShape`] that the backbone builds from the model it loaded;
//! - returns validated adapters with their decoded data ([`SoftPromptAdapter`],
//!   [`LoraAdapter`]) and what registration records about them ([`AdapterSummary`]);
//! - writes adapters back in PEFT's format ([`PeftFiles`], `to_peft`).
//!
//! Registration (roe-expert-library), the runtime loaders (roe-backbone) and merging all go
//! through it, so an adapter the library accepts is one the runtime loads, at the same scale.
//! It has no tensor library and no I/O: callers turn the f32 data into what they compute with.

mod adapter;
mod config;
mod error;
mod keys;
mod lora;
mod prompt;
mod shape;
mod summary;
mod tensors;
mod write;

pub use adapter::Adapter;
pub use config::{
    lora_scale, AdapterOrigin, LoraConfig, PeftConfig, PeftType, PromptTuningConfig,
    DEFAULT_LORA_ALPHA,
};
pub use error::{PeftError, PeftErrorKind, Result};
pub use keys::{LoraKey, LoraMatrix, PROMPT_EMBEDDINGS};
pub use lora::{LoraAdapter, LoraBlock};
pub use prompt::SoftPromptAdapter;
pub use shape::{LoraTarget, ModelShape};
pub use summary::AdapterSummary;
pub use tensors::decode_f32;
pub use write::PeftFiles;

/// Largest `adapter_model.safetensors` accepted: far above a LoRA of a small model, far below
/// memory.
pub const MAX_ADAPTER_BYTES: usize = 512 * 1024 * 1024;
/// Largest `adapter_config.json` accepted (PEFT writes about 2 KB).
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Most soft-prompt vectors accepted.
pub const MAX_VIRTUAL_TOKENS: usize = 512;
/// Largest LoRA rank accepted.
pub const MAX_LORA_RANK: usize = 256;

#[cfg(test)]
mod tests;
