//! Self-attention of the fast encoder path in one pass per (text, head), in f32: reads q, k
//! and v where the fused projection wrote them, skips the padding (a padded key's weight
//! is exp(-10⁴) = 0 in f32 anyway; a padded query's row is never pooled), and writes the
//! context in the layout the output projection reads. Candle's path copies q, k and v out,
//! transposes, runs two small matrix products, a broadcast add and a softmax, then copies
//! the context back; at MiniLM's sizes that overhead is a large part of a layer.
//!
//! Compiled for AVX-512 F and only called where [`crate::bf16::supported`] holds (which
//! implies it).

use rayon::prelude::*;

/// `qkv` rows `[b·len, 3·heads·head_dim]` (q, then k, then v, each heads × head_dim) →
/// context `[b·len, heads·head_dim]`; `lens[i]` is text i's real length (≤ len).
pub fn attention(
    qkv: &[f32],
    b: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    lens: &[usize],
) -> Vec<f32> {
    assert!(crate::bf16::supported(), "fast attention needs AVX-512");
    let hidden = heads * head_dim;
    assert_eq!(
        qkv.len(),
        b * len * 3 * hidden,
        "qkv is not [b·len, 3·hidden]"
    );
    assert_eq!(lens.len(), b, "one length per text");
    let mut out = vec![0f32; b * len * hidden];
    let scale = 1.0 / (head_dim as f32).sqrt();
    // One task per text: its rows of `out` are its own.
    out.par_chunks_mut(len * hidden)
        .zip(qkv.par_chunks(len * 3 * hidden))
        .zip(lens.par_iter())
        .for_each(|((out, qkv), &n)| {
            let n = n.min(len);
            for h in 0..heads {
                // SAFETY: AVX-512 F is present (asserted above); the slices are the
                // text's own rows.
                unsafe { head(qkv, out, n, h, heads, head_dim, scale) };
            }
        });
    out
}

/// One head of one text: `out[i, h] = Σ_j softmax_j(scale·q_i·k_j) v_j` over the `n` real
/// positions.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn head(
    qkv: &[f32],
    out: &mut [f32],
    n: usize,
    h: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let hidden = heads * head_dim;
    let row = 3 * hidden;
    // The head's keys transposed ([d][j]), so that one query's scores are axpys over j.
    let mut kt = vec![0f32; head_dim * n];
    for j in 0..n {
        let kj = &qkv[j * row + hidden + h * head_dim..][..head_dim];
        for (d, &x) in kj.iter().enumerate() {
            kt[d * n + j] = x;
        }
    }
    let mut scores = vec![0f32; n];
    let mut ctx = vec![0f32; head_dim];
    for i in 0..n {
        let qi = &qkv[i * row + h * head_dim..][..head_dim];
        scores.iter_mut().for_each(|s| *s = 0.0);
        for (d, &q) in qi.iter().enumerate() {
            let q = q * scale;
            for (s, &k) in scores.iter_mut().zip(&kt[d * n..(d + 1) * n]) {
                *s += q * k;
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let sum: f32 = scores.iter().sum();
        ctx.iter_mut().for_each(|c| *c = 0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vj = &qkv[j * row + 2 * hidden + h * head_dim..][..head_dim];
            for (c, &x) in ctx.iter_mut().zip(vj) {
                *c += p * x;
            }
        }
        let inv = 1.0 / sum;
        let o = &mut out[i * hidden + h * head_dim..][..head_dim];
        for (o, c) in o.iter_mut().zip(&ctx) {
            *o = c * inv;
        }
    }
}

/// e^x for x ≤ 0 (softmax's shifted scores), within 3e-7 of libm relatively: x split as
/// r·ln 2 + g with r an integer (the exponent bits) and |g| ≤ ln(2)/2 (Cody-Waite, so g
/// keeps its bits), e^g by its Taylor polynomial of degree 6; plain arithmetic, so a loop
/// over scores vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_375; // few mantissa bits: r·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let r = (x * std::f32::consts::LOG2_E).round();
    let g = (x - r * LN2_HI) - r * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * g + 1.0 / 120.0;
    let p = p * g + 1.0 / 24.0;
    let p = p * g + 1.0 / 6.0;
    let p = p * g + 0.5;
    let p = p * g + 1.0;
    let p = p * g + 1.0;
    p * f32::from_bits(((r as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0007;
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    /// Against the textbook formula with padding masked by a large negative bias, as the
    /// f32 path computes it.
    #[test]
    fn attention_matches_the_masked_softmax() {
        if !crate::bf16::supported() {
            eprintln!("no AVX-512 BF16 here: the fast path is not used on this CPU");
            return;
        }
        let (b, len, heads, hd) = (3, 7, 2, 4);
        let hidden = heads * hd;
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        let qkv: Vec<f32> = (0..b * len * 3 * hidden).map(|_| rnd()).collect();
        let lens = [7, 3, 1];
        let got = attention(&qkv, b, len, heads, hd, &lens);
        let at = |t: usize, i: usize, part: usize, h: usize, d: usize| {
            qkv[(t * len + i) * 3 * hidden + part * hidden + h * hd + d] as f64
        };
        for t in 0..b {
            for h in 0..heads {
                for i in 0..lens[t] {
                    let s: Vec<f64> = (0..len)
                        .map(|j| {
                            let dot: f64 =
                                (0..hd).map(|d| at(t, i, 0, h, d) * at(t, j, 1, h, d)).sum();
                            dot / (hd as f64).sqrt() + if j < lens[t] { 0.0 } else { -1e4 }
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..len).map(|j| e[j] / sum * at(t, j, 2, h, d)).sum();
                        let g = got[(t * len + i) * hidden + h * hd + d] as f64;
                        assert!(
                            (g - want).abs() < 1e-5,
                            "text {t} head {h} row {i} dim {d}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
