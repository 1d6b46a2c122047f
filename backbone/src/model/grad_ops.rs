//! Custom candle ops with hand-written backward passes for the training forward
//! ([`super::grad`]).
//!
//! candle's fused kernels (`rms_norm`, `rope_i`, `softmax_last_dim`, `QMatMul`) record no
//! gradient, and its plain `matmul` against a constant weight would compute that weight's
//! gradient anyway (backprop fills a gradient for both operands). Each op here holds the
//! frozen parts (weights, rotary tables, targets) inside itself, so backprop only ever sees
//! the activation as an argument and only the activation's gradient is computed. Every op
//! works on contiguous f32 CPU storage, which the forward guarantees.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::Linear;
use crate::kernels::{self, WeightRef};

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// A frozen weight matrix [n, k] in the form the kernels read.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    /// Q4_1 / Q8_0 GGUF blocks, expanded to f32 at every use (the serving weights, shared).
    Blocks(Arc<QTensor>),
    /// An f32 tensor (contiguous).
    F32(Tensor),
}

impl FrozenWeight {
    pub(crate) fn of_linear(lin: &Linear) -> candle_core::Result<Self> {
        match lin {
            Linear::OnTheFly(q) => Self::of_blocks(q),
            Linear::Mm(QMatMul::QTensor(q)) => Self::of_blocks(q),
            Linear::Mm(QMatMul::Tensor(t)) | Linear::Mm(QMatMul::TensorF16(t)) => {
                Self::of_tensor(t)
            }
        }
    }

    pub(crate) fn of_tensor(t: &Tensor) -> candle_core::Result<Self> {
        Ok(Self::F32(
            t.to_dtype(candle_core::DType::F32)?.contiguous()?,
        ))
    }

    fn of_blocks(q: &Arc<QTensor>) -> candle_core::Result<Self> {
        if matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) {
            Ok(Self::Blocks(q.clone()))
        } else {
            // Other block types have no expanding kernel here: an f32 copy of that weight.
            Self::of_tensor(&q.dequantize(&candle_core::Device::Cpu)?)
        }
    }

    /// (n, k).
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Blocks(q) => q.shape().dims2(),
            Self::F32(t) => t.dims2(),
        }
    }

    fn with_ref<R>(&self, f: impl FnOnce(WeightRef<'_>) -> R) -> candle_core::Result<R> {
        match self {
            Self::Blocks(q) => {
                let data = q.data()?;
                Ok(match q.dtype() {
                    GgmlDType::Q4_1 => f(WeightRef::Q4_1(&data)),
                    _ => f(WeightRef::Q8_0(&data)),
                })
            }
            Self::F32(t) => {
                let (storage, layout) = t.storage_and_layout();
                match &*storage {
                    candle_core::Storage::Cpu(cpu) => {
                        Ok(f(WeightRef::F32(contiguous(cpu, layout, "frozen weight")?)))
                    }
                    _ => candle_core::bail!("training runs on the CPU only"),
                }
            }
        }
    }
}

/// `y = x W^T` over the last dimension, W frozen; backward gives x's gradient only.
pub(crate) struct FrozenLinear(pub(crate) FrozenWeight);

/// `x W` or `x W^T` over the last dimension of a contiguous input, for W [n, k].
fn frozen_product(
    w: &FrozenWeight,
    transposed: bool,
    s: &CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(s, l, op)?;
    let (n, k) = w.dims()?;
    // x W^T maps k to n; its input gradient g W maps n back to k.
    let (from, to) = if transposed { (n, k) } else { (k, n) };
    let mut dims = l.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == from => *last = to,
        _ => candle_core::bail!("{op}: input {:?}, weight [{n}, {k}]", l.shape()),
    }
    let m = x.len() / from.max(1);
    let y = w.with_ref(|w| {
        if transposed {
            kernels::matmul_expanded_transposed(w, n, k, x, m)
        } else {
            kernels::matmul_expanded(w, n, k, x, m)
        }
    })?;
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_product(&self.0, false, s, l, self.name())
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(
            &FrozenLinearInputGrad(self.0.clone()),
        )?))
    }
}

/// `g W`: the input gradient of [`FrozenLinear`].
struct FrozenLinearInputGrad(FrozenWeight);

impl CustomOp1 for FrozenLinearInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_product(&self.0, true, s, l, self.name())
    }
}

/// RMS norm over the last dimension with a frozen gain: `y = x · r · w`,
/// `r = 1 / sqrt(mean(x²) + eps)`.
pub(crate) struct RmsNorm {
    pub(crate) weight: Arc<[f32]>,
    pub(crate) eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let h = self.weight.len();
        if l.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms-norm: input {:?}, weight [{h}]", l.shape());
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = self.inv_rms(xr);
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(self.weight.iter()) {
                *o = v * r * w;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = RmsNormGrad {
            weight: self.weight.clone(),
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// `dx_j = r (g_j w_j - x_j r² mean_i(g_i w_i x_i))`: the input gradient of [`RmsNorm`].
struct RmsNormGrad {
    weight: Arc<[f32]>,
    eps: f32,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let h = self.weight.len();
        if x.len() != g.len() || !x.len().is_multiple_of(h) {
            candle_core::bail!("rms-norm grad: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let norm = RmsNorm {
            weight: self.weight.clone(),
            eps: self.eps,
        };
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(h)
            .zip(g.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
        {
            let r = norm.inv_rms(xr);
            let dot: f32 = xr
                .iter()
                .zip(gr)
                .zip(self.weight.iter())
                .map(|((x, g), w)| x * g * w)
                .sum();
            let c = r * r * dot / h as f32;
            for (((d, &xv), &gv), &w) in dr.iter_mut().zip(xr).zip(gr).zip(self.weight.iter()) {
                *d = r * (gv * w - xv * c);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Interleaved rotary embedding of x [b, heads, t, head_dim] at positions 0..t: pairs
/// (x₂ᵢ, x₂ᵢ₊₁) rotated by the angle of (position, i). Linear, so its backward is the
/// inverse rotation.
#[derive(Clone)]
pub(crate) struct Rope {
    /// [t, head_dim / 2] each.
    pub(crate) cos: Arc<[f32]>,
    pub(crate) sin: Arc<[f32]>,
    pub(crate) inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-interleaved"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let (_, _, t, hd) = l.shape().dims4()?;
        let half = hd / 2;
        if self.cos.len() != t * half || self.sin.len() != t * half {
            candle_core::bail!("rope: input {:?}, tables of {}", l.shape(), self.cos.len());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        for (pos_block, (xr, yr)) in x.chunks_exact(hd).zip(y.chunks_exact_mut(hd)).enumerate() {
            let p = pos_block % t;
            let (c, sn) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            for i in 0..half {
                let (a, b) = (xr[2 * i], xr[2 * i + 1]);
                let (cv, sv) = (c[i], sign * sn[i]);
                yr[2 * i] = a * cv - b * sv;
                yr[2 * i + 1] = a * sv + b * cv;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope {
            inverse: !self.inverse,
            ..self.clone()
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Softmax over the last dimension (keys) with a causal mask: x is [.., rows, t] where row
/// `r` is a query at position `r % t`, which sees keys `0..=r % t`.
pub(crate) struct CausalSoftmax;

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let t = *l
            .shape()
            .dims()
            .last()
            .ok_or_else(|| candle_core::Error::Msg("causal-softmax: scalar input".into()))?;
        let mut y = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks_exact(t).zip(y.chunks_exact_mut(t)).enumerate() {
            let seen = r % t + 1;
            let max = xr[..seen].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in yr[..seen].iter_mut().zip(&xr[..seen]) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in &mut yr[..seen] {
                *o *= inv;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y (g - Σ y g)` per row: the input gradient of a softmax from its output.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let t = *l1.shape().dims().last().unwrap_or(&1);
        if y.len() != g.len() {
            candle_core::bail!("softmax grad: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), dr) in y
            .chunks_exact(t)
            .zip(g.chunks_exact(t))
            .zip(dx.chunks_exact_mut(t))
        {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                *d = yv * (gv - dot);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Negative log-likelihood of one target id per row of logits [n, vocab]: `[n]`.
pub(crate) struct TargetNll {
    pub(crate) targets: Arc<[u32]>,
}

/// Per row: (max, log Σ exp(x - max)).
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
    (max, sum.ln())
}

impl CustomOp1 for TargetNll {
    fn name(&self) -> &'static str {
        "target-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let (n, v) = l.shape().dims2()?;
        if n != self.targets.len() {
            candle_core::bail!("target-nll: {n} rows, {} targets", self.targets.len());
        }
        let mut out = Vec::with_capacity(n);
        for (row, &t) in x.chunks_exact(v).zip(self.targets.iter()) {
            let Some(&xt) = row.get(t as usize) else {
                candle_core::bail!("target-nll: target {t} outside a vocabulary of {v}");
            };
            let (max, lse) = log_sum_exp(row);
            out.push(max + lse - xt);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = TargetNllGrad {
            targets: self.targets.clone(),
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// `dx = g (softmax(x) - onehot(target))` per row.
struct TargetNllGrad {
    targets: Arc<[u32]>,
}

impl CustomOp2 for TargetNllGrad {
    fn name(&self) -> &'static str {
        "target-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        if g.len() != n || self.targets.len() != n {
            candle_core::bail!("target-nll grad: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut dx = vec![0f32; x.len()];
        for (((row, dr), &gv), &t) in x
            .chunks_exact(v)
            .zip(dx.chunks_exact_mut(v))
            .zip(g)
            .zip(self.targets.iter())
        {
            let (max, lse) = log_sum_exp(row);
            for (d, &xv) in dr.iter_mut().zip(row) {
                *d = gv * (xv - max - lse).exp();
            }
            if let Some(d) = dr.get_mut(t as usize) {
                *d -= gv;
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
