//! A small-batch matmul over Q4_1 GGUF blocks with f32 activations (no activation rounding):
//! `y[m, n] = sum_k x[m, k] * (d * q + min)`, used for decode steps where expanding the whole
//! weight to f32 would dominate.

use half::f16;

/// Bytes of one Q4_1 block (f16 d, f16 min, 16 bytes of nibbles) holding 32 weights.
pub const BLOCK_BYTES: usize = 20;
pub const BLOCK: usize = 32;

#[inline(always)]
fn block_dot(blk: &[u8], x: &[f32]) -> f32 {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let qs = &blk[4..20];
    let mut lo = [0f32; 16];
    let mut hi = [0f32; 16];
    for j in 0..16 {
        lo[j] = (qs[j] & 0x0F) as f32 * x[j];
        hi[j] = (qs[j] >> 4) as f32 * x[16 + j];
    }
    let mut s = 0f32;
    for j in 0..16 {
        s += lo[j] + hi[j];
    }
    d * s
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn rows_generic(w: &[u8], k: usize, x: &[f32], xsum: &[f32], m: usize, n0: usize, out: &mut [f32]) {
    let nb = k / BLOCK;
    for (ri, row_idx) in (n0..n0 + out.len() / m).enumerate() {
        let wr = &w[row_idx * nb * BLOCK_BYTES..(row_idx + 1) * nb * BLOCK_BYTES];
        for mi in 0..m {
            let xr = &x[mi * k..(mi + 1) * k];
            let xs = &xsum[mi * nb..(mi + 1) * nb];
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = &wr[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
                let mn = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                acc += block_dot(blk, &xr[b * BLOCK..(b + 1) * BLOCK]) + mn * xs[b];
            }
            out[ri * m + mi] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn rows_avx2(
    w: &[u8],
    k: usize,
    x: &[f32],
    xsum: &[f32],
    m: usize,
    n0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    let mask = _mm_set1_epi8(0x0F);
    for (ri, row_idx) in (n0..n0 + out.len() / m).enumerate() {
        let wr = &w[row_idx * nb * BLOCK_BYTES..(row_idx + 1) * nb * BLOCK_BYTES];
        for mi in 0..m {
            let xr = &x[mi * k..(mi + 1) * k];
            let xs = &xsum[mi * nb..(mi + 1) * nb];
            let mut total = _mm256_setzero_ps();
            let mut min_acc = 0f32;
            for b in 0..nb {
                let blk = wr.as_ptr().add(b * BLOCK_BYTES);
                let d = f16::from_le_bytes([*blk, *blk.add(1)]).to_f32();
                let mn = f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32();
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let xp = xr.as_ptr().add(b * BLOCK);
                let l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                let mut acc = _mm256_mul_ps(l0, _mm256_loadu_ps(xp));
                acc = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xp.add(8)), acc);
                acc = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xp.add(16)), acc);
                acc = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xp.add(24)), acc);
                total = _mm256_fmadd_ps(_mm256_set1_ps(d), acc, total);
                min_acc += mn * xs[b];
            }
            let h = _mm_add_ps(
                _mm256_castps256_ps128(total),
                _mm256_extractf128_ps(total, 1),
            );
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            out[ri * m + mi] = _mm_cvtss_f32(h) + min_acc;
        }
    }
}

fn rows(w: &[u8], k: usize, x: &[f32], xsum: &[f32], m: usize, n0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were detected at run time.
            unsafe { rows_avx2(w, k, x, xsum, m, n0, out) };
            return;
        }
    }
    rows_generic(w, k, x, xsum, m, n0, out)
}

/// y [m, n] (row-major) = x [m, k] · W^T with W [n, k] in Q4_1 blocks.
pub fn matmul_q4_1(w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    use rayon::prelude::*;
    debug_assert_eq!(k % BLOCK, 0);
    debug_assert_eq!(w.len(), n * k / BLOCK * BLOCK_BYTES);
    let nb = k / BLOCK;
    let mut xsum = vec![0f32; m * nb];
    for mi in 0..m {
        for b in 0..nb {
            xsum[mi * nb + b] = x[mi * k + b * BLOCK..mi * k + (b + 1) * BLOCK].iter().sum();
        }
    }
    // Output computed as [n, m] then transposed (m is tiny).
    let mut yt = vec![0f32; n * m];
    const CHUNK: usize = 64;
    yt.par_chunks_mut(CHUNK * m)
        .enumerate()
        .for_each(|(ci, out)| {
            rows(w, k, x, &xsum, m, ci * CHUNK, out);
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for ni in 0..n {
        for mi in 0..m {
            y[mi * n + ni] = yt[ni * m + mi];
        }
    }
    y
}

/// Rough throughput probe (used by the bench example).
#[doc(hidden)]
pub fn bench_probe() -> f64 {
    let (n, k) = (3072usize, 576usize);
    let w = vec![0x35u8; n * k / BLOCK * BLOCK_BYTES];
    let x = vec![0.5f32; k];
    let t = std::time::Instant::now();
    let mut s = 0f32;
    for _ in 0..100 {
        s += matmul_q4_1(&w, n, k, &x, 1)[7];
    }
    std::hint::black_box(s);
    t.elapsed().as_secs_f64() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scalar_reference() {
        let (n, k, m) = (70, 64, 3);
        let nb = k / BLOCK;
        let mut w = Vec::new();
        let mut deq = vec![0f32; n * k];
        for r in 0..n {
            for b in 0..nb {
                let d = 0.01 * (r % 7 + 1) as f32;
                let mn = -0.05 * (b + 1) as f32;
                w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                w.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
                for j in 0..16 {
                    let lo = ((r + j) % 16) as u8;
                    let hi = ((r * 3 + j) % 16) as u8;
                    w.push(lo | (hi << 4));
                    let d16 = f16::from_f32(d).to_f32();
                    let m16 = f16::from_f32(mn).to_f32();
                    deq[r * k + b * 32 + j] = d16 * lo as f32 + m16;
                    deq[r * k + b * 32 + 16 + j] = d16 * hi as f32 + m16;
                }
            }
        }
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let y = matmul_q4_1(&w, n, k, &x, m);
        for mi in 0..m {
            for ni in 0..n {
                let want: f32 = (0..k).map(|j| x[mi * k + j] * deq[ni * k + j]).sum();
                assert!(
                    (y[mi * n + ni] - want).abs() < 1e-3,
                    "{} vs {want}",
                    y[mi * n + ni]
                );
            }
        }
    }
}
