//! Matrix products in bf16 with f32 accumulation, for the encoder's linear layers on CPUs
//! with AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products summed into 16 f32 lanes per
//! instruction, twice the multiply-adds of an f32 FMA of the same width).
//!
//! The weights are rounded to bf16 once, at load, and packed in panels of 32 output columns
//! whose rows are the input pairs (2p, 2p+1): one pair of a row of the input, broadcast,
//! meets a whole panel row in one instruction. The input is rounded to bf16 per call.
//! Products and sums are f32, so the only error is the two roundings (8 bits of mantissa),
//! which the encoder's cosine test bounds.
//!
//! Nothing here runs unless [`supported`] says the CPU has the instructions; the f32 path
//! is the fallback.

use rayon::prelude::*;

/// Output columns of one packed panel (two 16-lane registers).
const NR: usize = 32;
/// Input rows of one register tile.
const MR: usize = 6;

/// Whether this CPU runs the bf16 kernels (checked at run time, never assumed).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 -> bf16, rounding to nearest even (as `vcvtneps2bf16` does); NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// What is done to each output value after the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `x·Wᵀ + b`
    Bias,
    /// `gelu(x·Wᵀ + b)`
    BiasGelu,
}

/// A linear layer's weight `[n, k]` (out × in) and bias, packed for the bf16 kernel.
pub struct PackedLinear {
    n: usize,
    k: usize,
    /// Input pairs: `k` rounded up to even, halved.
    kp: usize,
    /// `ceil(n / NR)` panels of `kp × NR` bf16 pairs (u32: element 2p low, 2p+1 high);
    /// columns past `n` are zero.
    panels: Vec<u32>,
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

impl PackedLinear {
    /// `weight` row-major `[n, k]`, `bias` of `n`.
    pub fn pack(weight: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "weight is not [n, k]");
        assert_eq!(bias.len(), n, "bias is not [n]");
        let kp = k.div_ceil(2);
        let panels_n = n.div_ceil(NR);
        let mut panels = vec![0u32; panels_n * kp * NR];
        let at = |j: usize, i: usize| if i < k { weight[j * k + i] } else { 0.0 };
        for pn in 0..panels_n {
            for p in 0..kp {
                for c in 0..NR {
                    let j = pn * NR + c;
                    if j < n {
                        panels[(pn * kp + p) * NR + c] = pair(at(j, 2 * p), at(j, 2 * p + 1));
                    }
                }
            }
        }
        Self {
            n,
            k,
            kp,
            panels,
            bias: bias.to_vec(),
        }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `x` row-major `[m, k]` -> `[m, n]`, with the epilogue applied. Needs [`supported`].
    pub fn forward(&self, x: &[f32], m: usize, epilogue: Epilogue) -> Vec<f32> {
        assert!(
            supported(),
            "bf16 kernels called on a CPU without AVX-512 BF16"
        );
        assert_eq!(x.len(), m * self.k, "input is not [m, k]");
        let (k, kp, n) = (self.k, self.kp, self.n);
        // The input as bf16 pairs, rows padded to whole tiles with zeros.
        let m_pad = m.div_ceil(MR) * MR;
        let mut a = vec![0u32; m_pad * kp];
        a[..m * kp]
            .par_chunks_mut(kp * 64)
            .zip(x.par_chunks(k * 64))
            .for_each(|(dst, src)| {
                for (drow, srow) in dst.chunks_mut(kp).zip(src.chunks(k)) {
                    // SAFETY: `supported()` was checked above.
                    unsafe { round_row(srow, drow) };
                }
            });
        let mut out = vec![0f32; m * n];
        // Each task owns one panel's columns of every output row: rows are strided, so the
        // tasks write disjoint columns through a shared pointer.
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(NR)).into_par_iter().for_each(|pn| {
            let out_ptr = &out_ptr;
            let panel = &self.panels[pn * kp * NR..(pn + 1) * kp * NR];
            let c0 = pn * NR;
            let cols = NR.min(n - c0);
            // SAFETY: `supported()` was checked above; `a` holds `m_pad` rows of `kp` pairs
            // and `panel` `kp` rows of NR pairs; rows < m and columns c0..c0 + cols of
            // `out` (row stride n) are inside it, and no other task writes those columns.
            unsafe {
                panel_rows(
                    &a,
                    m,
                    kp,
                    panel,
                    &self.bias[c0..c0 + cols],
                    out_ptr.0.add(c0),
                    n,
                    epilogue,
                )
            };
        });
        out
    }
}

/// `src` (f32) as bf16 pairs into `dst` (`src.len()` rounded up to even, halved).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/BF16.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
    // Written as a plain loop: with the features enabled the compiler vectorises it.
    for (p, d) in dst.iter_mut().enumerate() {
        let lo = src[2 * p];
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// Every row tile of one panel: the products, then the epilogue into `out` (the panel's
/// first column, row stride `stride`).
///
/// # Safety
/// As [`kernel`], and `out` must be valid for `m` rows of `bias.len()` columns.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn panel_rows(
    a: &[u32],
    m: usize,
    kp: usize,
    panel: &[u32],
    bias: &[f32],
    out: *mut f32,
    stride: usize,
    epilogue: Epilogue,
) {
    let cols = bias.len();
    let mut tile = [0f32; MR * NR];
    for r0 in (0..m).step_by(MR) {
        kernel(kp, a.as_ptr().add(r0 * kp), panel.as_ptr(), &mut tile);
        for r in 0..MR.min(m - r0) {
            let row = std::slice::from_raw_parts_mut(out.add((r0 + r) * stride), cols);
            let acc = &tile[r * NR..r * NR + cols];
            match epilogue {
                Epilogue::Bias => {
                    for ((o, &v), &b) in row.iter_mut().zip(acc).zip(bias) {
                        *o = v + b;
                    }
                }
                Epilogue::BiasGelu => {
                    for ((o, &v), &b) in row.iter_mut().zip(acc).zip(bias) {
                        *o = crate::bert::gelu(v + b);
                    }
                }
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at places no other task writes (see
// `PackedLinear::forward`), and `out` outlives the parallel loop.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// One MR × NR tile: `tile[r][c] = Σ_p a[r][p] · panel[p][c]` over bf16 pairs.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/BF16; `a` must point at MR rows of `kp` pairs (row
/// stride `kp`), `panel` at `kp` rows of NR pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn kernel(kp: usize, a: *const u32, panel: *const u32, tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    for p in 0..kp {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR).cast()));
        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16).cast()));
        for r in 0..MR {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
            acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], x, w0);
            acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], x, w1);
        }
    }
    for (i, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(tile.as_mut_ptr().add(16 * i), *v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_kp: usize, _a: *const u32, _panel: *const u32, _tile: &mut [f32; MR * NR]) {
    unreachable!("bf16 kernels are x86_64 only; supported() is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// The kernel computes exactly the product of the bf16-rounded operands (up to f32
    /// summation order), for shapes with tails in every dimension.
    #[test]
    fn products_equal_the_rounded_operands_product() {
        if !supported() {
            eprintln!("no AVX-512 BF16 here: the bf16 path is not used on this CPU");
            return;
        }
        let mut seed = 7;
        for &(m, k, n) in &[
            (1, 2, 1),
            (7, 5, 33),
            (13, 384, 64),
            (6, 31, 32),
            (50, 96, 70),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let lin = PackedLinear::pack(&w, &b, n, k);
            for epi in [Epilogue::Bias, Epilogue::BiasGelu] {
                let got = lin.forward(&x, m, epi);
                for i in 0..m {
                    for j in 0..n {
                        let mut want = b[j] as f64;
                        for p in 0..k {
                            want += from_bf16(to_bf16(x[i * k + p])) as f64
                                * from_bf16(to_bf16(w[j * k + p])) as f64;
                        }
                        let want = match epi {
                            Epilogue::Bias => want as f32,
                            Epilogue::BiasGelu => crate::bert::gelu(want as f32),
                        };
                        let g = got[i * n + j];
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "m {m} k {k} n {n} ({i},{j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
