//! Tensor names in `adapter_model.safetensors`.
//!
//! PEFT saves a LoRA matrix of a causal LM under
//! `base_model.model.model.layers.{N}.{self_attn|mlp}.{module}.lora_{A|B}.weight`; older
//! versions and some tools keep the adapter name (`lora_A.default.weight`), and models saved
//! without the inner `model.` (`base_model.model.layers...`) exist too. All are read; the
//! canonical form is written. A prompt-tuning adapter holds one tensor, `prompt_embeddings`.

use crate::shape::LoraTarget;

/// The one tensor of a prompt-tuning adapter: [num_virtual_tokens, token_dim].
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

const LORA_PREFIX: &str = "base_model.model.";

/// Which of the two LoRA matrices: A is [r, in], B is [out, r].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraMatrix {
    A,
    B,
}

impl LoraMatrix {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B => "B",
        }
    }
}

/// Where a LoRA tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoraKey {
    pub layer: usize,
    pub target: LoraTarget,
    pub matrix: LoraMatrix,
}

impl LoraKey {
    pub const fn new(layer: usize, target: LoraTarget, matrix: LoraMatrix) -> Self {
        Self {
            layer,
            target,
            matrix,
        }
    }

    /// Reads any of the accepted spellings; `None` for a name that is not a LoRA A/B matrix
    /// of a Llama projection (including a projection under the wrong parent, `mlp.q_proj`).
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(LORA_PREFIX)?;
        let rest = rest.strip_prefix("model.").unwrap_or(rest);
        let rest = rest.strip_prefix("layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        // Digits only: `usize::from_str` would also take a leading `+`.
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let layer: usize = layer.parse().ok()?;
        let (parent, rest) = rest.split_once('.')?;
        let (module, rest) = rest.split_once('.')?;
        let target = LoraTarget::from_name(module).filter(|t| t.parent() == parent)?;
        let rest = rest.strip_suffix(".weight")?;
        let rest = rest.strip_suffix(".default").unwrap_or(rest);
        let matrix = match rest {
            "lora_A" => LoraMatrix::A,
            "lora_B" => LoraMatrix::B,
            _ => return None,
        };
        Some(Self::new(layer, target, matrix))
    }

    /// The name PEFT writes (no adapter name).
    pub fn format(&self) -> String {
        format!(
            "{LORA_PREFIX}model.layers.{}.{}.{}.lora_{}.weight",
            self.layer,
            self.target.parent(),
            self.target.name(),
            self.matrix.as_str()
        )
    }
}

impl std::fmt::Display for LoraKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.format())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        let q12a = LoraKey::new(12, LoraTarget::QProj, LoraMatrix::A);
        for name in [
            "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.layers.12.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(LoraKey::parse(name), Some(q12a), "{name}");
        }
        assert_eq!(
            LoraKey::parse("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight"),
            Some(LoraKey::new(3, LoraTarget::DownProj, LoraMatrix::B))
        );
    }

    #[test]
    fn refuses_other_names() {
        for name in [
            "prompt_embeddings",
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.3.mlp.q_proj.lora_B.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.other.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.bias",
            "model.layers.3.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(LoraKey::parse(name), None, "{name}");
        }
    }

    #[test]
    fn format_round_trips() {
        for t in LoraTarget::ALL {
            for m in [LoraMatrix::A, LoraMatrix::B] {
                let k = LoraKey::new(7, t, m);
                assert_eq!(LoraKey::parse(&k.format()), Some(k));
            }
        }
        assert_eq!(
            LoraKey::new(0, LoraTarget::VProj, LoraMatrix::B).format(),
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        );
    }
}
