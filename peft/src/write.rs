//! Writing adapters in PEFT's format, so that PEFT (and roe) load what roe makes: merges now,
//! experts trained inside roe next. Tensors are written as f32 under PEFT's canonical names.

use serde_json::{json, Value};

use crate::error::{PeftError, Result};
use crate::keys::{LoraMatrix, PROMPT_EMBEDDINGS};
use crate::lora::LoraAdapter;
use crate::prompt::SoftPromptAdapter;
use crate::tensors::{serialize_f32, F32Tensor};

/// The two files of a PEFT adapter directory, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftFiles {
    /// `adapter_config.json`.
    pub config_json: String,
    /// `adapter_model.safetensors`.
    pub safetensors: Vec<u8>,
}

/// What PEFT assumes when a config names no task: roe's backbones are causal LMs.
const DEFAULT_TASK_TYPE: &str = "CAUSAL_LM";

fn config_text(config: &Value) -> Result<String> {
    serde_json::to_string_pretty(config).map_err(|e| PeftError::ConfigJson(format!("writing: {e}")))
}

/// An integral alpha is written as an integer, as PEFT writes it.
fn alpha_json(alpha: f64) -> Value {
    if alpha.fract() == 0.0 && alpha.abs() < 9.0e15 {
        json!(alpha as i64)
    } else {
        json!(alpha)
    }
}

impl SoftPromptAdapter {
    pub fn to_peft(&self) -> Result<PeftFiles> {
        let shape = self.shape();
        let origin = self.origin();
        let config = json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": origin.task_type.as_deref().unwrap_or(DEFAULT_TASK_TYPE),
            "base_model_name_or_path": origin.base_model_name_or_path,
            "num_virtual_tokens": self.num_virtual_tokens(),
            "token_dim": self.token_dim(),
            "num_transformer_submodules": 1,
            "num_attention_heads": shape.num_heads,
            "num_layers": shape.num_layers,
            "prompt_tuning_init": "RANDOM",
            "inference_mode": true,
        });
        Ok(PeftFiles {
            config_json: config_text(&config)?,
            safetensors: serialize_f32(&[F32Tensor {
                name: PROMPT_EMBEDDINGS.into(),
                shape: vec![self.num_virtual_tokens(), self.token_dim()],
                values: self.embeddings(),
            }])?,
        })
    }
}

impl LoraAdapter {
    pub fn to_peft(&self) -> Result<PeftFiles> {
        let config = self.config();
        let origin = self.origin();
        let mut target_modules: Vec<&str> = self.targets().iter().map(|t| t.name()).collect();
        target_modules.sort_unstable();
        let json = json!({
            "peft_type": "LORA",
            "task_type": origin.task_type.as_deref().unwrap_or(DEFAULT_TASK_TYPE),
            "base_model_name_or_path": origin.base_model_name_or_path,
            "r": config.r,
            "lora_alpha": alpha_json(config.lora_alpha),
            "use_rslora": config.use_rslora,
            "target_modules": target_modules,
            "layers_to_transform": config.layers_to_transform,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": null,
        });
        let (r, shape) = (config.r, self.shape());
        let tensors: Vec<F32Tensor<'_>> = self
            .blocks()
            .iter()
            .flat_map(|b| {
                let (fin, fout) = shape.dims(b.target);
                [
                    F32Tensor {
                        name: b.key(LoraMatrix::A).format(),
                        shape: vec![r, fin],
                        values: &b.a,
                    },
                    F32Tensor {
                        name: b.key(LoraMatrix::B).format(),
                        shape: vec![fout, r],
                        values: &b.b,
                    },
                ]
            })
            .collect();
        Ok(PeftFiles {
            config_json: config_text(&json)?,
            safetensors: serialize_f32(&tensors)?,
        })
    }
}
