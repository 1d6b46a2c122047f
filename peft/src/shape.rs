//! The shape of the Llama backbone an adapter must fit, and the projections a LoRA may adapt.

use serde::{Deserialize, Serialize};

/// The hyper-parameters of a Llama backbone that decide the shape of its adapters. The
/// backbone builds it from the GGUF it loaded (`roe_backbone::BackboneConfig::model_shape`);
/// [`ModelShape::smollm2_135m`] is for defaults and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelShape {
    /// Width of the residual stream: a soft prompt's `token_dim`.
    pub hidden_size: usize,
    /// Width of the MLP (gate/up output, down input).
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Not used by prompt or LoRA adapters today; part of the shape so that token-level
    /// adapters (trainable tokens, embedding LoRA) have it when they come.
    pub vocab_size: usize,
}

impl ModelShape {
    /// SmolLM2-135M(-Instruct): 576 wide, 30 layers, 9 heads of 64, 3 KV heads, MLP 1536.
    pub const fn smollm2_135m() -> Self {
        Self {
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
        }
    }

    /// Output width of q_proj (input width of o_proj).
    pub const fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Output width of k_proj and v_proj.
    pub const fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// (in_features, out_features) of a projection: lora_A is [r, in], lora_B is [out, r].
    pub const fn dims(&self, target: LoraTarget) -> (usize, usize) {
        let h = self.hidden_size;
        let f = self.intermediate_size;
        match target {
            LoraTarget::QProj => (h, self.q_dim()),
            LoraTarget::KProj | LoraTarget::VProj => (h, self.kv_dim()),
            LoraTarget::OProj => (self.q_dim(), h),
            LoraTarget::GateProj | LoraTarget::UpProj => (h, f),
            LoraTarget::DownProj => (f, h),
        }
    }
}

/// A linear projection of a Llama decoder layer that a LoRA can adapt (all of them: the
/// runtime applies a LoRA delta on each). The order is the order of the layer's computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// Position in [`LoraTarget::ALL`], for per-target arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The module name PEFT uses (`q_proj`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// The submodule of a Llama decoder layer that holds the projection.
    pub const fn parent(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// (in_features, out_features) on `shape`; see [`ModelShape::dims`].
    pub const fn dims(self, shape: &ModelShape) -> (usize, usize) {
        shape.dims(self)
    }
}

impl std::fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_dims() {
        let s = ModelShape::smollm2_135m();
        assert_eq!(s.dims(LoraTarget::QProj), (576, 576));
        assert_eq!(s.dims(LoraTarget::VProj), (576, 192));
        assert_eq!(s.dims(LoraTarget::OProj), (576, 576));
        assert_eq!(s.dims(LoraTarget::UpProj), (576, 1536));
        assert_eq!(s.dims(LoraTarget::DownProj), (1536, 576));
    }

    #[test]
    fn names_round_trip() {
        for t in LoraTarget::ALL {
            assert_eq!(LoraTarget::from_name(t.name()), Some(t));
            assert_eq!(LoraTarget::ALL[t.index()], t);
        }
        assert_eq!(LoraTarget::from_name("lm_head"), None);
        assert_eq!(LoraTarget::GateProj.parent(), "mlp");
        assert_eq!(LoraTarget::KProj.parent(), "self_attn");
    }
}
