//! A BERT encoder forward pass (the architecture of all-MiniLM-L6-v2) on candle, written for
//! CPU inference: the GELU is a custom op over a vectorisable rational tanh, because candle's
//! GELU calls libm's scalar tanh/erf per element and was most of the encoder's time.
//!
//! The linear layers run in f32 (candle's GEMM) or, where the CPU has AVX-512 BF16 and the
//! caller asks, in bf16 with f32 accumulation ([`crate::bf16`]), bias and GELU fused into
//! the product. Attention, layer norms and pooling stay f32 on both paths.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, Embedding, LayerNorm, LayerNormConfig, Linear, VarBuilder,
};
use serde::Deserialize;

use crate::bf16::{Epilogue, PackedLinear};

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// tanh as a [13/6] rational function of x, clamped where tanh is 1 in f32; only
/// multiplies, adds and one divide, so the loop over a slice vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)] // coefficients kept as fitted
pub fn fast_tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = x2 * -2.760_768_5e-16 + 2.000_187_9e-13;
    let p = x2 * p + -8.604_671_5e-11;
    let p = x2 * p + 5.122_297e-8;
    let p = x2 * p + 1.485_722_4e-5;
    let p = x2 * p + 6.372_619_3e-4;
    let p = x2 * p + 4.893_524_6e-3;
    let p = x * p;
    let q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    let q = x2 * q + 2.268_434_6e-3;
    let q = x2 * q + 4.893_525_2e-3;
    p / q
}

/// GELU, tanh form: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + fast_tanh(K * (x + 0.044_715 * x * x * x)))
}

/// The contiguous f32 values a custom op reads (its name in the error otherwise).
fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 input only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: needs a contiguous tensor");
    };
    Ok(&data[start..end])
}

struct FastGelu;

impl CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(self.name(), storage, layout)?;
        let out: Vec<f32> = data.iter().map(|&x| gelu(x)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The arithmetic of the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearPrecision {
    F32,
    /// bf16 operands, f32 sums; only where [`crate::bf16::supported`].
    Bf16,
}

impl LinearPrecision {
    pub fn name(self) -> &'static str {
        match self {
            LinearPrecision::F32 => "f32",
            LinearPrecision::Bf16 => "bf16",
        }
    }
}

/// One linear layer on the chosen path.
enum Proj {
    F32(Linear),
    Bf16(PackedLinear),
}

/// A packed linear layer applied to a contiguous f32 tensor `[.., k]`.
struct Bf16Op<'a>(&'a PackedLinear, Epilogue);

impl CustomOp1 for Bf16Op<'_> {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(self.name(), storage, layout)?;
        let k = self.0.in_features();
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("bf16-linear: input {:?}, layer reads {k}", dims);
        }
        let m = data.len() / k;
        let out = self.0.forward(data, m, self.1);
        if let Some(last) = dims.last_mut() {
            *last = self.0.out_features();
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The fast path's attention ([`crate::attention`]) on the fused projection's output.
struct AttentionOp<'a> {
    b: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    lens: &'a [usize],
}

impl CustomOp1 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "fast-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(self.name(), storage, layout)?;
        let hidden = self.heads * self.head_dim;
        if data.len() != self.b * self.len * 3 * hidden {
            candle_core::bail!("fast-attention: input is not [b, len, 3·hidden]");
        }
        let out = crate::attention::attention(
            data,
            self.b,
            self.len,
            self.heads,
            self.head_dim,
            self.lens,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b, self.len, hidden)),
        ))
    }
}

impl Proj {
    fn new(l: Linear, precision: LinearPrecision) -> candle_core::Result<Self> {
        Ok(match precision {
            LinearPrecision::F32 => Proj::F32(l),
            LinearPrecision::Bf16 => {
                let (n, k) = l.weight().dims2()?;
                let w = l.weight().flatten_all()?.to_vec1::<f32>()?;
                let b = match l.bias() {
                    Some(b) => b.to_vec1::<f32>()?,
                    None => vec![0.0; n],
                };
                Proj::Bf16(PackedLinear::pack(&w, &b, n, k))
            }
        })
    }

    fn forward(&self, x: &Tensor, epilogue: Epilogue) -> candle_core::Result<Tensor> {
        match self {
            Proj::F32(l) => {
                let y = l.forward(x)?;
                match epilogue {
                    Epilogue::Bias => Ok(y),
                    Epilogue::BiasGelu => y.contiguous()?.apply_op1_no_bwd(&FastGelu),
                }
            }
            Proj::Bf16(p) => x.contiguous()?.apply_op1_no_bwd(&Bf16Op(p, epilogue)),
        }
    }
}

struct Layer {
    /// Query, key and value projections fused into one [3·hidden, hidden] matmul.
    qkv: Proj,
    attn_out: Proj,
    attn_norm: LayerNorm,
    intermediate: Proj,
    out: Proj,
    out_norm: LayerNorm,
}

pub struct BertEncoderModel {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
}

impl BertEncoderModel {
    pub fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        precision: LinearPrecision,
    ) -> candle_core::Result<Self> {
        if precision == LinearPrecision::Bf16 && !crate::bf16::supported() {
            candle_core::bail!("bf16 linears need AVX-512 BF16, which this CPU lacks");
        }
        if cfg.hidden_act != "gelu" && cfg.hidden_act != "gelu_new" {
            candle_core::bail!("unsupported hidden_act {:?} (gelu)", cfg.hidden_act);
        }
        // Some exports prefix every name with `bert.`.
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = cfg.hidden_size;
        let ln = |vb: VarBuilder| {
            layer_norm(
                h,
                LayerNormConfig {
                    eps: cfg.layer_norm_eps,
                    ..Default::default()
                },
                vb,
            )
        };
        let e = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let parts = ["query", "key", "value"]
                    .map(|n| linear(h, h, l.pp(format!("attention.self.{n}"))));
                let [q, k, v] = parts;
                let (q, k, v) = (q?, k?, v?);
                let bias = |x: &Linear| {
                    x.bias()
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg("linear without bias".into()))
                };
                let qkv = Linear::new(
                    Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?,
                    Some(Tensor::cat(&[bias(&q)?, bias(&k)?, bias(&v)?], 0)?),
                );
                let proj = |l| Proj::new(l, precision);
                Ok(Layer {
                    qkv: proj(qkv)?,
                    attn_out: proj(linear(h, h, l.pp("attention.output.dense"))?)?,
                    attn_norm: ln(l.pp("attention.output.LayerNorm"))?,
                    intermediate: proj(linear(
                        h,
                        cfg.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?)?,
                    out: proj(linear(cfg.intermediate_size, h, l.pp("output.dense"))?)?,
                    out_norm: ln(l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            word: embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: ln(e.pp("LayerNorm"))?,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// Token ids, token types and attention mask, all (batch, len) u32 -> hidden states
    /// (batch, len, hidden).
    pub fn forward(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?.unsqueeze(0)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(types)?)?;
        let mut x = self.norm.forward(&x)?;
        // Padding positions get a large negative bias before the softmax.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e4)?.reshape((b, 1, 1, len))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // The fast path attends over each text's real positions only.
        let lens: Option<Vec<usize>> = match self.layers.first().map(|l| &l.qkv) {
            Some(Proj::Bf16(_)) => Some(
                mask.to_vec2::<u32>()?
                    .iter()
                    .map(|row| row.iter().filter(|&&m| m != 0).count())
                    .collect(),
            ),
            _ => None,
        };
        for l in &self.layers {
            let qkv = l.qkv.forward(&x, Epilogue::Bias)?;
            let ctx = match &lens {
                Some(lens) => qkv.apply_op1_no_bwd(&AttentionOp {
                    b,
                    len,
                    heads: self.heads,
                    head_dim: self.head_dim,
                    lens,
                })?,
                None => self.attention(&qkv, &bias, b, len, scale)?,
            };
            x = l
                .attn_norm
                .forward(&(l.attn_out.forward(&ctx, Epilogue::Bias)? + &x)?)?;
            let inner = l.intermediate.forward(&x, Epilogue::BiasGelu)?;
            x = l
                .out_norm
                .forward(&(l.out.forward(&inner, Epilogue::Bias)? + &x)?)?;
        }
        Ok(x)
    }

    /// Candle's attention (the f32 path): `qkv` [b, len, 3·hidden] -> context
    /// [b, len, hidden].
    fn attention(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        b: usize,
        len: usize,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        // [b, len, 3, heads, head_dim] -> q, k, v as [b, heads, len, head_dim].
        let qkv = qkv.reshape((b, len, 3, self.heads, self.head_dim))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = ((part(0)? * scale)?, part(1)?, part(2)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, len, self.heads * self.head_dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_tanh_matches_libm() {
        let mut worst = 0.0f32;
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max((fast_tanh(x) - x.tanh()).abs());
            x += 0.001;
        }
        assert!(worst < 2e-6, "max |fast_tanh - tanh| = {worst}");
    }
}
