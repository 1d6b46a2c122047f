//! Experts over the frozen backbone: PEFT prompt tuning (soft prompts) and PEFT LoRA.
//!
//! Reading and validating PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)
//! is roe-peft's job, the same code registration runs; this module turns the validated f32
//! data into the runtime's layouts (candle tensors, scaled and GGUF-permuted LoRA matrices).
//! Every problem is reported as an [`ExpertError`], never a panic.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use roe_peft::{LoraAdapter, SoftPromptAdapter};
pub use roe_peft::{LoraBlock, LoraTarget, ModelShape, MAX_LORA_RANK, MAX_VIRTUAL_TOKENS};

use crate::error::ExpertError;

fn read_dir_files(dir: &Path) -> Result<(String, Vec<u8>), ExpertError> {
    let cfg_path = dir.join("adapter_config.json");
    let st_path = dir.join("adapter_model.safetensors");
    let cfg = std::fs::read_to_string(&cfg_path).map_err(|source| ExpertError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let st = std::fs::read(&st_path).map_err(|source| ExpertError::Io {
        path: st_path.clone(),
        source,
    })?;
    Ok((cfg, st))
}

fn candle_err(e: candle_core::Error) -> ExpertError {
    ExpertError::Invalid(format!("tensor construction failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Soft prompts
// ---------------------------------------------------------------------------------------------

/// A PEFT prompt-tuning expert: `n` virtual token embeddings placed before the prompt.
#[derive(Debug, Clone)]
pub struct SoftPrompt {
    /// [n, hidden] f32.
    embeddings: Tensor,
    num_virtual_tokens: usize,
}

impl SoftPrompt {
    /// Load from a PEFT directory with `adapter_config.json` and `adapter_model.safetensors`,
    /// for SmolLM2-135M.
    pub fn from_peft_dir(dir: impl AsRef<Path>) -> Result<Self, ExpertError> {
        Self::from_peft_dir_with(dir, &ModelShape::smollm2_135m())
    }

    pub fn from_peft_dir_with(
        dir: impl AsRef<Path>,
        shape: &ModelShape,
    ) -> Result<Self, ExpertError> {
        let (cfg, st) = read_dir_files(dir.as_ref())?;
        Self::from_peft_bytes_with(&cfg, &st, shape)
    }

    /// Load from the text of `adapter_config.json` and the bytes of
    /// `adapter_model.safetensors`, for SmolLM2-135M.
    pub fn from_peft_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self, ExpertError> {
        Self::from_peft_bytes_with(config_json, safetensors, &ModelShape::smollm2_135m())
    }

    pub fn from_peft_bytes_with(
        config_json: &str,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<Self, ExpertError> {
        Self::from_adapter(SoftPromptAdapter::from_peft(
            config_json,
            safetensors,
            shape,
        )?)
    }

    /// From a prompt roe-peft validated.
    pub fn from_adapter(prompt: SoftPromptAdapter) -> Result<Self, ExpertError> {
        let (n, d) = (prompt.num_virtual_tokens(), prompt.token_dim());
        let embeddings =
            Tensor::from_vec(prompt.into_embeddings(), (n, d), &Device::Cpu).map_err(candle_err)?;
        Ok(Self {
            embeddings,
            num_virtual_tokens: n,
        })
    }

    /// Build from row-major f32 values of shape [n, hidden].
    pub fn from_vec(values: Vec<f32>, n: usize, shape: &ModelShape) -> Result<Self, ExpertError> {
        Self::from_adapter(SoftPromptAdapter::new(values, n, shape)?)
    }

    /// Build from a [n, hidden] tensor (any float dtype).
    pub fn from_tensor(t: &Tensor, shape: &ModelShape) -> Result<Self, ExpertError> {
        let dims = t.dims().to_vec();
        if dims.len() != 2 || dims[1] != shape.hidden_size {
            return Err(ExpertError::Invalid(format!(
                "prompt_embeddings tensor has shape {dims:?}, the model needs [n, {}]",
                shape.hidden_size
            )));
        }
        let values = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err)?;
        Self::from_vec(values, dims[0], shape)
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// The [n, hidden] f32 embeddings.
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------------

/// One adapted projection: `delta(x) = b_t^T (a x)` with the scale folded into `b_t`.
/// Plain shared slices: a batch clones them per row for free, and the per-row kernel
/// ([`crate::model`]'s LoRA module) reads them directly.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// [r, in] f32, row-major (PEFT's lora_A as stored): each rank's input vector contiguous.
    pub(crate) a: Arc<[f32]>,
    /// [r, out] f32 (scale · B transposed, rows permuted to GGUF layout for q/k), row-major.
    pub(crate) b_t: Arc<[f32]>,
    pub(crate) rank: usize,
    pub(crate) fin: usize,
    pub(crate) fout: usize,
}

/// A PEFT LoRA expert, applied unmerged: `W x + (alpha/r) · B (A x)`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// layers[l][target.index()].
    layers: Vec<[Option<LoraPair>; 7]>,
    rank: usize,
    alpha: f64,
    scale: f64,
    targets: Vec<LoraTarget>,
}

/// Row permutation of llama.cpp's HF -> GGUF conversion for q/k projections:
/// `reshape(n_head, 2, head_dim/2, in).swap(1, 2)`. Returns, for every GGUF row, its HF row.
pub(crate) fn hf_to_gguf_rows(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut src = vec![0usize; n_head * head_dim];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                src[h * head_dim + 2 * i + j] = h * head_dim + j * half + i;
            }
        }
    }
    src
}

impl Lora {
    /// Load from a PEFT directory, for SmolLM2-135M.
    pub fn from_peft_dir(dir: impl AsRef<Path>) -> Result<Self, ExpertError> {
        Self::from_peft_dir_with(dir, &ModelShape::smollm2_135m())
    }

    pub fn from_peft_dir_with(
        dir: impl AsRef<Path>,
        shape: &ModelShape,
    ) -> Result<Self, ExpertError> {
        let (cfg, st) = read_dir_files(dir.as_ref())?;
        Self::from_peft_bytes_with(&cfg, &st, shape)
    }

    /// Load from the text of `adapter_config.json` and the bytes of
    /// `adapter_model.safetensors`, for SmolLM2-135M.
    pub fn from_peft_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self, ExpertError> {
        Self::from_peft_bytes_with(config_json, safetensors, &ModelShape::smollm2_135m())
    }

    pub fn from_peft_bytes_with(
        config_json: &str,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<Self, ExpertError> {
        Self::from_adapter(LoraAdapter::from_peft(config_json, safetensors, shape)?)
    }

    /// From a LoRA roe-peft validated, at the scale it reports.
    pub fn from_adapter(lora: LoraAdapter) -> Result<Self, ExpertError> {
        let (rank, alpha, scale, shape) = (lora.rank(), lora.alpha(), lora.scale(), *lora.shape());
        Self::from_weights(rank, alpha, scale, lora.into_blocks(), &shape)
    }

    /// Build from raw Hugging Face layout weights. `scale` multiplies `B(A x)` (PEFT:
    /// alpha / r). Projections not listed are not adapted.
    pub fn from_weights(
        rank: usize,
        alpha: f64,
        scale: f64,
        weights: Vec<LoraBlock>,
        shape: &ModelShape,
    ) -> Result<Self, ExpertError> {
        if rank == 0 || rank > MAX_LORA_RANK {
            return Err(ExpertError::Invalid(format!(
                "r {rank} outside 1..={MAX_LORA_RANK}"
            )));
        }
        if !scale.is_finite() || !alpha.is_finite() {
            return Err(ExpertError::Invalid("lora_alpha is not finite".into()));
        }
        if weights.is_empty() {
            return Err(ExpertError::Invalid(
                "a LoRA needs at least one adapted projection".into(),
            ));
        }
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..shape.num_layers).map(|_| Default::default()).collect();
        let mut targets = BTreeSet::new();
        for w in weights {
            w.check(rank, shape)?;
            let (fin, fout) = w.target.dims(shape);
            let label = format!("layers.{}.{}", w.layer, w.target.name());
            // a [r, in]: PEFT's layout.
            let a: Arc<[f32]> = w.a.as_slice().into();
            // b_t [r, out], rows of B permuted to GGUF layout for q/k, scaled.
            let perm = match w.target {
                LoraTarget::QProj => Some(hf_to_gguf_rows(shape.num_heads, shape.head_dim)),
                LoraTarget::KProj => Some(hf_to_gguf_rows(shape.num_kv_heads, shape.head_dim)),
                _ => None,
            };
            let mut b_t = vec![0f32; rank * fout];
            for o in 0..fout {
                let src = perm.as_ref().map(|p| p[o]).unwrap_or(o);
                for r in 0..rank {
                    b_t[r * fout + o] = (w.b[src * rank + r] as f64 * scale) as f32;
                }
            }
            let b_t: Arc<[f32]> = b_t.into();
            let slot = &mut layers[w.layer][w.target.index()];
            if slot.is_some() {
                return Err(ExpertError::Invalid(format!("{label}: given twice")));
            }
            *slot = Some(LoraPair {
                a,
                b_t,
                rank,
                fin,
                fout,
            });
            targets.insert(w.target);
        }
        Ok(Self {
            layers,
            rank,
            alpha,
            scale,
            targets: targets.into_iter().collect(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn targets(&self) -> &[LoraTarget] {
        &self.targets
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn pair(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers
            .get(layer)
            .and_then(|l| l[target.index()].as_ref())
    }
}

/// The experts applied to one row: an optional soft prompt and an optional LoRA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Adapters<'a> {
    pub prompt: Option<&'a SoftPrompt>,
    pub lora: Option<&'a Lora>,
}

impl<'a> Adapters<'a> {
    pub const fn none() -> Self {
        Self {
            prompt: None,
            lora: None,
        }
    }
    pub const fn prompt(p: &'a SoftPrompt) -> Self {
        Self {
            prompt: Some(p),
            lora: None,
        }
    }
    pub const fn lora(l: &'a Lora) -> Self {
        Self {
            prompt: None,
            lora: Some(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp() {
        // n_head 1, head_dim 4: HF rows [0,1,2,3] -> GGUF rows [0,2,1,3]
        assert_eq!(hf_to_gguf_rows(1, 4), vec![0, 2, 1, 3]);
        assert_eq!(hf_to_gguf_rows(2, 4), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
