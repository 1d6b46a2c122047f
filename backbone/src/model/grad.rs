//! The training forward: the same transformer as [`Backbone::forward`], built from ops that
//! record gradients, for whole sequences (no KV cache) with a soft prompt or LoRA matrices
//! that require gradients. The backbone's weights are the serving ones, read in place and
//! never differentiated ([`super::grad_ops`]); gradients reach the adapter only.
//!
//! Rows are right-padded, so a causal mask is the whole mask: a real position only sees
//! positions before it, which are real too. The loss is the summed negative log-likelihood of
//! each row's answer ids, computed at the answer positions only (the vocabulary projection
//! of every other position would be wasted work).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use super::grad_ops::{CausalSoftmax, FrozenLinear, FrozenWeight, RmsNorm, Rope, TargetNll};
use super::{Backbone, Layer};
use crate::error::{BackboneError, Result};
use crate::experts::LoraTarget;

/// One training row: the rendered prompt and the answer ids to learn (the answer's end id
/// included), exactly as Score and Generate see them.
#[derive(Debug, Clone, Copy)]
pub struct AnswerRow<'a> {
    pub prompt_ids: &'a [u32],
    pub answer_ids: &'a [u32],
}

/// LoRA matrices being trained, in Hugging Face layout (as PEFT stores them): per layer and
/// projection, A [r, in] and B [out, r]; the delta is `scale · B (A x)`.
#[derive(Debug, Clone, Default)]
pub struct TrainLora {
    pub scale: f64,
    /// layers[l][target.index()].
    pub layers: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

/// What the training forward adapts.
#[derive(Debug, Clone, Copy)]
pub enum TrainAdapter<'a> {
    /// A soft prompt [n, hidden] placed before every row.
    Prompt(&'a Tensor),
    Lora(&'a TrainLora),
}

/// The loss of a batch: the summed negative log-likelihood of its answer ids (a scalar that
/// backpropagates to the adapter) and how many ids it sums over.
#[derive(Debug, Clone)]
pub struct AnswerLoss {
    pub sum_nll: Tensor,
    pub tokens: usize,
    /// Real positions the forward ran (virtual tokens included, padding not).
    pub positions: usize,
}

fn f32_values(t: &Tensor) -> Result<Arc<[f32]>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.into())
}

impl Backbone {
    /// The rows' answer loss with gradients to `adapter`'s tensors (make them
    /// [`candle_core::Var`]s and call `backward` on [`AnswerLoss::sum_nll`]).
    pub fn answer_loss(
        &self,
        rows: &[AnswerRow<'_>],
        adapter: TrainAdapter<'_>,
    ) -> Result<AnswerLoss> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        if rows.is_empty() {
            return Err(BackboneError::InvalidInput("empty training batch".into()));
        }
        let (prompt, lora) = match adapter {
            TrainAdapter::Prompt(p) => (Some(p), None),
            TrainAdapter::Lora(l) => (None, Some(l)),
        };
        let virtual_tokens = match prompt {
            Some(p) => {
                let (n, ph) = p.dims2()?;
                if ph != h {
                    return Err(BackboneError::InvalidInput(format!(
                        "soft prompt of width {ph}, the backbone's is {h}"
                    )));
                }
                n
            }
            None => 0,
        };
        // Inputs: prompt + answer without its last id; targets: every answer id.
        let mut seqs = Vec::with_capacity(rows.len());
        let mut at = Vec::new();
        let mut targets = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            if r.prompt_ids.is_empty() || r.answer_ids.is_empty() {
                return Err(BackboneError::InvalidInput(format!(
                    "training row {i} has an empty prompt or answer"
                )));
            }
            let mut seq = r.prompt_ids.to_vec();
            seq.extend_from_slice(&r.answer_ids[..r.answer_ids.len() - 1]);
            let first = virtual_tokens + r.prompt_ids.len() - 1;
            for (j, &id) in r.answer_ids.iter().enumerate() {
                at.push((i, first + j));
                targets.push(id);
            }
            seqs.push(seq);
        }
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let t = virtual_tokens + longest;
        if t > self.cos.dim(0)? {
            return Err(BackboneError::InvalidInput(format!(
                "a training row of {t} positions exceeds the context length {}",
                self.cos.dim(0)?
            )));
        }
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * longest);
        for s in &seqs {
            ids.extend_from_slice(s);
            ids.resize(ids.len() + longest - s.len(), 0);
        }
        let embeds = self.embed_ids(&ids)?.reshape((b, longest, h))?;
        let mut x = match prompt {
            Some(p) => {
                let p = p.unsqueeze(0)?.broadcast_as((b, virtual_tokens, h))?;
                Tensor::cat(&[&p, &embeds], 1)?
            }
            None => embeds,
        }
        .contiguous()?;

        let half = cfg.head_dim / 2;
        let rope = Rope {
            cos: f32_values(&self.cos.narrow(0, 0, t)?)?,
            sin: f32_values(&self.sin.narrow(0, 0, t)?)?,
            inverse: false,
        };
        debug_assert_eq!(rope.cos.len(), t * half);
        let eps = cfg.rms_norm_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let lora_layer = lora.and_then(|l| l.layers.get(li));
            let xn = x.apply_op1(RmsNorm {
                weight: f32_values(&layer.attn_norm)?,
                eps,
            })?;
            let attn = self.train_attention(layer, &xn, &rope, lora_layer, lora)?;
            x = (attn + x)?;
            let xn = x.apply_op1(RmsNorm {
                weight: f32_values(&layer.ffn_norm)?,
                eps,
            })?;
            let y = self.train_mlp(layer, &xn, lora_layer, lora)?;
            x = (y + x)?;
        }
        let hidden = self.gather_positions(&x, &at)?;
        let hidden = hidden.apply_op1(RmsNorm {
            weight: f32_values(&self.final_norm)?,
            eps,
        })?;
        let logits = hidden.apply_op1(FrozenLinear(self.lm_head_weight()?))?;
        let nll = logits.apply_op1(TargetNll {
            targets: targets.into(),
        })?;
        Ok(AnswerLoss {
            sum_nll: nll.sum_all()?,
            tokens: at.len(),
            positions: seqs.iter().map(|s| s.len() + virtual_tokens).sum(),
        })
    }

    fn lm_head_weight(&self) -> Result<FrozenWeight> {
        Ok(match &self.lm_head {
            candle_core::quantized::QMatMul::QTensor(q) => {
                FrozenWeight::of_linear(&super::Linear::OnTheFly(q.clone()))?
            }
            candle_core::quantized::QMatMul::Tensor(t)
            | candle_core::quantized::QMatMul::TensorF16(t) => FrozenWeight::of_tensor(t)?,
        })
    }

    /// `scale · B(A x)` of a trained projection, in the backbone's output layout.
    fn train_delta(
        &self,
        x: &Tensor,
        layer: Option<&[Option<(Tensor, Tensor)>; 7]>,
        lora: Option<&TrainLora>,
        target: LoraTarget,
    ) -> Result<Option<Tensor>> {
        let (Some(layer), Some(lora)) = (layer, lora) else {
            return Ok(None);
        };
        let Some((a, bm)) = &layer[target.index()] else {
            return Ok(None);
        };
        let (b, t, fin) = x.dims3()?;
        let ax = x.reshape((b * t, fin))?.matmul(&a.t()?)?;
        // q and k rows are stored permuted in GGUF (see `experts::hf_to_gguf_rows`).
        let bm = match target {
            LoraTarget::QProj => bm.index_select(&self.gguf_rows(self.config.num_heads)?, 0)?,
            LoraTarget::KProj => bm.index_select(&self.gguf_rows(self.config.num_kv_heads)?, 0)?,
            _ => bm.clone(),
        };
        let d = (ax.matmul(&bm.t()?)? * lora.scale)?;
        let fout = d.dim(1)?;
        Ok(Some(d.reshape((b, t, fout))?))
    }

    fn gguf_rows(&self, heads: usize) -> Result<Tensor> {
        let rows: Vec<u32> = crate::experts::hf_to_gguf_rows(heads, self.config.head_dim)
            .into_iter()
            .map(|r| r as u32)
            .collect();
        let n = rows.len();
        Ok(Tensor::from_vec(rows, n, &self.device)?)
    }

    fn train_attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        rope: &Rope,
        lora_layer: Option<&[Option<(Tensor, Tensor)>; 7]>,
        lora: Option<&TrainLora>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkv = x.apply_op1(FrozenLinear(FrozenWeight::of_linear(&layer.qkv)?))?;
        let mut q = qkv.narrow(2, 0, qd)?;
        let mut k = qkv.narrow(2, qd, kvd)?;
        let mut v = qkv.narrow(2, qd + kvd, kvd)?;
        if let Some(d) = self.train_delta(x, lora_layer, lora, LoraTarget::QProj)? {
            q = (q + d)?;
        }
        if let Some(d) = self.train_delta(x, lora_layer, lora, LoraTarget::KProj)? {
            k = (k + d)?;
        }
        if let Some(d) = self.train_delta(x, lora_layer, lora, LoraTarget::VProj)? {
            v = (v + d)?;
        }
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = (q.apply_op1(rope.clone())? * (1.0 / (hd as f64).sqrt()))?;
        let k = k.apply_op1(rope.clone())?;
        // Query heads that share a KV head, grouped: [b, nkv, g * t, hd]; row r of a group is
        // the query at position r % t, which the causal softmax relies on.
        let q = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
        let att = q.matmul(&k.t()?)?.contiguous()?.apply_op1(CausalSoftmax)?;
        let y = att.matmul(&v)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, qd))?
            .contiguous()?;
        let mut out = y.apply_op1(FrozenLinear(FrozenWeight::of_linear(&layer.wo)?))?;
        if let Some(d) = self.train_delta(&y, lora_layer, lora, LoraTarget::OProj)? {
            out = (out + d)?;
        }
        Ok(out)
    }

    fn train_mlp(
        &self,
        layer: &Layer,
        x: &Tensor,
        lora_layer: Option<&[Option<(Tensor, Tensor)>; 7]>,
        lora: Option<&TrainLora>,
    ) -> Result<Tensor> {
        let f = self.config.intermediate_size;
        let gu = x.apply_op1(FrozenLinear(FrozenWeight::of_linear(&layer.gate_up)?))?;
        let mut gate = gu.narrow(2, 0, f)?;
        let mut up = gu.narrow(2, f, f)?;
        if let Some(d) = self.train_delta(x, lora_layer, lora, LoraTarget::GateProj)? {
            gate = (gate + d)?;
        }
        if let Some(d) = self.train_delta(x, lora_layer, lora, LoraTarget::UpProj)? {
            up = (up + d)?;
        }
        let hmid = (gate.silu()? * up)?.contiguous()?;
        let mut out = hmid.apply_op1(FrozenLinear(FrozenWeight::of_linear(&layer.down)?))?;
        if let Some(d) = self.train_delta(&hmid, lora_layer, lora, LoraTarget::DownProj)? {
            out = (out + d)?;
        }
        Ok(out)
    }

    /// The embedding rows of `ids` [n, hidden] (a frozen copy, for initialising soft prompts).
    pub fn token_embeddings(&self, ids: &[u32]) -> Result<Tensor> {
        let e = self.embed_ids(ids)?;
        Ok(e.to_dtype(DType::F32)?.contiguous()?)
    }

    /// Mean squared norm of the token embeddings' rows (the scale of a random soft prompt).
    pub fn embedding_rms(&self) -> Result<f32> {
        Ok(self
            .tok_embeddings
            .sqr()?
            .mean(D::Minus1)?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()?)
    }
}
