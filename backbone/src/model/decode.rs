//! The one-position step (decode): the same transformer as [`Backbone::forward`], written over
//! plain slices with the [`crate::kernels`] matmuls.
//!
//! A decode step moves one position per row through 30 layers. Built from candle ops it is
//! ~25 small tensor ops per layer, each paying dispatch, allocation and a thread-pool wake-up,
//! which cost more than the arithmetic. Here a layer is four parallel matmuls and a few loops;
//! the KV cache stays the candle tensors that prefill writes, so both paths share it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Tensor;

use super::lora::add_lora;
use super::{Backbone, KvCache, Layer, Linear, LoraBatch};
use crate::error::{BackboneError, Result};
use crate::experts::LoraTarget;
use crate::kernels::{self, WeightRef};

/// Up to this many rows a step runs here; larger batches use the general path, where one
/// GEMM over the dequantized weight wins.
pub(crate) const MAX_STEP_ROWS: usize = 16;

/// Calls `f` with the contiguous f32 data of a CPU tensor.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        BackboneError::InvalidInput("decode step needs contiguous tensors".into())
    })?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => Err(BackboneError::InvalidInput(
            "decode step runs on the CPU only".into(),
        )),
    }
}

fn q_matmul(q: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let (n, k) = q.shape().dims2()?;
    let data = q.data()?;
    Ok(match q.dtype() {
        GgmlDType::Q4_1 => Some(kernels::matmul(WeightRef::Q4_1(&data), n, k, x, m)),
        GgmlDType::Q8_0 => Some(kernels::matmul(WeightRef::Q8_0(&data), n, k, x, m)),
        _ => None,
    })
}

/// x [m, k] · W^T for many rows of x (a contiguous tensor) and a Q4_1 / Q8_0 weight:
/// [`kernels::matmul_expanded`].
pub(super) fn linear_rows_expanded(q: &QTensor, x: &Tensor, m: usize) -> Result<Vec<f32>> {
    let (n, k) = q.shape().dims2()?;
    let data = q.data()?;
    let w = match q.dtype() {
        GgmlDType::Q4_1 => WeightRef::Q4_1(&data),
        GgmlDType::Q8_0 => WeightRef::Q8_0(&data),
        other => {
            return Err(BackboneError::InvalidInput(format!(
                "no expanded kernel for {other:?} weights"
            )))
        }
    };
    with_f32(x, |xs| kernels::matmul_expanded(w, n, k, xs, m))
}

/// x [m, k] · W^T for any linear layer: the block kernels when the weight is Q4_1, Q8_0 or
/// f32, candle's own forward otherwise.
pub(super) fn linear_rows(lin: &Linear, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let fast = match lin {
        Linear::OnTheFly(q) | Linear::Mm(QMatMul::QTensor(q)) => q_matmul(q, x, m)?,
        Linear::Mm(QMatMul::Tensor(w)) if w.dtype() == candle_core::DType::F32 => {
            let (n, k) = w.dims2()?;
            Some(with_f32(w, |w| {
                kernels::matmul(WeightRef::F32(w), n, k, x, m)
            })?)
        }
        _ => None,
    };
    match fast {
        Some(y) => Ok(y),
        None => {
            let k = x.len() / m.max(1);
            let xt = Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?;
            Ok(lin.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?)
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    }
}

/// Dot product in 8 lanes (a plain `zip().sum()` is not vectorised: float addition order).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Interleaved rotary embedding of one head (pairs (2i, 2i+1)).
fn rope(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, pair) in v.chunks_exact_mut(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos[i] - b * sin[i];
        pair[1] = a * sin[i] + b * cos[i];
    }
}

impl Backbone {
    /// One new position per row: `embeds` [b, 1, hidden]. Same contract as
    /// [`Backbone::forward`], which calls it.
    pub(super) fn forward_step(
        &self,
        embeds: &Tensor,
        lens: &[usize],
        cache: &mut KvCache,
        loras: &LoraBatch,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, _, h) = embeds.dims3()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd, ffn) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let half = hd / 2;
        let eps = cfg.rms_norm_eps as f32;
        let max_pos = self.cos.dim(0)?;
        // Each row's rotary position (a row without a new token repeats its last position).
        let pos: Vec<usize> = (0..b).map(|i| cache.next_pos[i].min(max_pos - 1)).collect();
        // Each row's rotary (cos, sin) at its position, read once for all layers.
        let at = |table: &Tensor| -> Result<Vec<Vec<f32>>> {
            with_f32(table, |t| {
                pos.iter()
                    .map(|&p| t[p * half..(p + 1) * half].to_vec())
                    .collect()
            })
        };
        let (cos, sin) = (at(&self.cos)?, at(&self.sin)?);
        let old_len = cache.len;
        let kv_len = old_len + 1;
        cache.reserve(1)?;
        let cap = cache.cap;

        let mut x = embeds.flatten_all()?.to_vec1::<f32>()?;
        let mut xn = vec![0f32; b * h];
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0f32; kv_len];
        for (li, layer) in self.layers.iter().enumerate() {
            let Layer {
                attn_norm,
                qkv,
                wo,
                ffn_norm,
                gate_up,
                down,
            } = layer;
            with_f32(attn_norm, |w| rms_norm(&x, w, eps, &mut xn))?;
            // q, k, v of every row: [b, qd + 2 kvd].
            let mut qkv_out = linear_rows(qkv, &xn, b)?;
            let w = qd + 2 * kvd;
            for (target, off, len) in [
                (LoraTarget::QProj, 0, qd),
                (LoraTarget::KProj, qd, kvd),
                (LoraTarget::VProj, qd + kvd, kvd),
            ] {
                if let Some(rows) = loras.rows(li, target) {
                    let mut d = vec![0f32; b * len];
                    add_lora(rows, &xn, 1, &mut d)?;
                    for row in 0..b {
                        for (o, dv) in qkv_out[row * w + off..row * w + off + len]
                            .iter_mut()
                            .zip(&d[row * len..(row + 1) * len])
                        {
                            *o += dv;
                        }
                    }
                }
            }
            // Rotary on q and k; q pre-scaled.
            for row in 0..b {
                let r = &mut qkv_out[row * w..row * w + qd + kvd];
                for head in r.chunks_exact_mut(hd) {
                    rope(head, &cos[row], &sin[row]);
                }
                r[..qd].iter_mut().for_each(|v| *v *= scale);
            }
            // Append k and v: [b, nkv, 1, hd].
            let mut k_new = Vec::with_capacity(b * kvd);
            let mut v_new = Vec::with_capacity(b * kvd);
            for row in 0..b {
                k_new.extend_from_slice(&qkv_out[row * w + qd..row * w + qd + kvd]);
                v_new.extend_from_slice(&qkv_out[row * w + qd + kvd..(row + 1) * w]);
            }
            let dev = &self.device;
            cache.k[li].slice_set(&Tensor::from_vec(k_new, (b, nkv, 1, hd), dev)?, 2, old_len)?;
            cache.v[li].slice_set(&Tensor::from_vec(v_new, (b, nkv, 1, hd), dev)?, 2, old_len)?;
            // Attention of each query head over its KV head's slots.
            let mut y = vec![0f32; b * qd];
            let valid = &cache.valid;
            with_f32(&cache.k[li], |kc| {
                with_f32(&cache.v[li], |vc| {
                    for row in 0..b {
                        for head in 0..nh {
                            let g = head / (nh / nkv);
                            let base = ((row * nkv + g) * cap) * hd;
                            let q = &qkv_out[row * w + head * hd..row * w + (head + 1) * hd];
                            let mut max = f32::NEG_INFINITY;
                            for (s, sc) in scores.iter_mut().enumerate() {
                                let allowed = s == old_len || valid[row][s];
                                *sc = if allowed {
                                    let kr = &kc[base + s * hd..base + (s + 1) * hd];
                                    dot(q, kr)
                                } else {
                                    f32::NEG_INFINITY
                                };
                                max = max.max(*sc);
                            }
                            let mut sum = 0f32;
                            for sc in scores.iter_mut() {
                                *sc = (*sc - max).exp();
                                sum += *sc;
                            }
                            let out = &mut y[row * qd + head * hd..row * qd + (head + 1) * hd];
                            for (s, &p) in scores.iter().enumerate() {
                                if p == 0.0 {
                                    continue;
                                }
                                let p = p / sum;
                                let vr = &vc[base + s * hd..base + (s + 1) * hd];
                                for (o, &vv) in out.iter_mut().zip(vr) {
                                    *o += p * vv;
                                }
                            }
                        }
                    }
                })
            })??;
            let mut attn = linear_rows(wo, &y, b)?;
            if let Some(rows) = loras.rows(li, LoraTarget::OProj) {
                add_lora(rows, &y, 1, &mut attn)?;
            }
            x.iter_mut().zip(&attn).for_each(|(xv, a)| *xv += a);
            // MLP.
            with_f32(ffn_norm, |w| rms_norm(&x, w, eps, &mut xn))?;
            let gu = linear_rows(gate_up, &xn, b)?;
            let mut gate = vec![0f32; b * ffn];
            let mut up = vec![0f32; b * ffn];
            for row in 0..b {
                gate[row * ffn..(row + 1) * ffn]
                    .copy_from_slice(&gu[row * 2 * ffn..row * 2 * ffn + ffn]);
                up[row * ffn..(row + 1) * ffn]
                    .copy_from_slice(&gu[row * 2 * ffn + ffn..(row + 1) * 2 * ffn]);
            }
            if let Some(rows) = loras.rows(li, LoraTarget::GateProj) {
                add_lora(rows, &xn, 1, &mut gate)?;
            }
            if let Some(rows) = loras.rows(li, LoraTarget::UpProj) {
                add_lora(rows, &xn, 1, &mut up)?;
            }
            let hmid: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let mut out = linear_rows(down, &hmid, b)?;
            if let Some(rows) = loras.rows(li, LoraTarget::DownProj) {
                add_lora(rows, &hmid, 1, &mut out)?;
            }
            x.iter_mut().zip(&out).for_each(|(xv, o)| *xv += o);
        }
        cache.commit(lens, 1);
        with_f32(&self.final_norm, |w| rms_norm(&x, w, eps, &mut xn))?;
        Ok(Tensor::from_vec(xn, (b, 1, h), &self.device)?)
    }
}
