//! Matrix × few-rows kernels for decode steps: `y[m, n] = x[m, k] · W[n, k]^T` with W in its
//! GGUF blocks (Q4_1, Q8_0) or f32, and f32 activations (no activation rounding, so the
//! results equal those of the dequantized weight up to summation order).
//!
//! Decode reads every weight once per token for one or a few activation rows, so it is bound
//! by how fast weight blocks turn into products: each block is unpacked once and used for all
//! `m` rows, and the work is split over the output rows on candle's own worker pool (the one
//! its ops use), so decode and prefill never run two pools against each other.

use half::f16;

/// Q4_1: f16 d, f16 min, 16 bytes of nibbles → 32 weights `d·q + min`.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Q8_0: f16 d, 32 i8 → 32 weights `d·q`.
pub const Q8_0_BLOCK_BYTES: usize = 34;
pub const BLOCK: usize = 32;

/// A weight matrix [n, k] the kernels can read.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    Q4_1(&'a [u8]),
    Q8_0(&'a [u8]),
    F32(&'a [f32]),
}

/// Rows of x handled together (their accumulators stay in registers).
const MAX_M: usize = 4;
/// Output rows per parallel task.
const CHUNK: usize = 32;

/// Panics unless x is [m, k] and W [n, k] with k a multiple of the block size.
fn assert_sizes(w: WeightRef<'_>, n: usize, k: usize, x: &[f32], m: usize) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    match w {
        WeightRef::Q4_1(b) => assert_eq!(b.len(), n * k / BLOCK * Q4_1_BLOCK_BYTES),
        WeightRef::Q8_0(b) => assert_eq!(b.len(), n * k / BLOCK * Q8_0_BLOCK_BYTES),
        WeightRef::F32(f) => assert_eq!(f.len(), n * k),
    }
    assert!(
        matches!(w, WeightRef::F32(_)) || k.is_multiple_of(BLOCK),
        "k not a multiple of 32"
    );
}

/// y [m, n] (row-major) = x [m, k] · W^T. Panics if the slices do not have the stated sizes
/// (callers check shapes when the weights are loaded).
pub fn matmul(w: WeightRef<'_>, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert_sizes(w, n, k, x, m);
    let mut y = vec![0f32; m * n];
    let nb = k / BLOCK;
    // Groups of at most MAX_M activation rows; within a group the output is [n, mg].
    for m0 in (0..m).step_by(MAX_M) {
        let mg = MAX_M.min(m - m0);
        let xg = &x[m0 * k..(m0 + mg) * k];
        // Q4_1's `min` term needs the sum of each 32-block of x.
        let xsum: Vec<f32> = match w {
            WeightRef::Q4_1(_) => xg.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect(),
            _ => Vec::new(),
        };
        debug_assert!(xsum.is_empty() || xsum.len() == mg * nb);
        let mut yt = vec![0f32; n * mg];
        let out = SharedOut(yt.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(CHUNK), |chunks| {
            for ci in chunks {
                let (r0, r1) = (ci * CHUNK, n.min((ci + 1) * CHUNK));
                // SAFETY: chunks are disjoint row ranges of `yt`, which outlives the call.
                let o = unsafe { std::slice::from_raw_parts_mut(out.at(r0 * mg), (r1 - r0) * mg) };
                rows(w, k, xg, &xsum, mg, r0, o);
            }
        });
        for ni in 0..n {
            for mi in 0..mg {
                y[(m0 + mi) * n + ni] = yt[ni * mg + mi];
            }
        }
    }
    y
}

/// Output rows per parallel task when weights are expanded to f32 for [`matmul_expanded`].
const EXPAND_CHUNK: usize = 64;

thread_local! {
    /// The calling thread's f32 copy of the weight being multiplied (grows to the largest
    /// weight, ~7 MB for SmolLM2's fused gate/up, and is reused: no allocation, no zeroing).
    static EXPANDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// y [m, n] (row-major) = x [m, k] · W^T for many activation rows (prefill).
///
/// W's blocks are expanded to f32 into the calling thread's scratch matrix, split over
/// candle's pool, then one f32 GEMM (the `gemm` crate, as candle's own matmul, on the same
/// rayon pool) writes y without zeroing it first. Same values as multiplying by the
/// dequantized weight; what it saves over candle's `dequantize` + `matmul` is their serial
/// parts: a fresh zeroed weight buffer expanded by one thread, and a zeroed output.
/// Panics if the slices do not have the stated sizes.
pub fn matmul_expanded(w: WeightRef<'_>, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert_sizes(w, n, k, x, m);
    with_expanded(w, n, k, |wf| gemm_into_new(wf, n, k, x, m))
}

/// x [m, k] (row-major) = g [m, n] · W for many rows: the input gradient of
/// [`matmul_expanded`]'s product, with W expanded the same way. Training needs it and no
/// gradient of W (the backbone is frozen). Panics if the slices do not have the stated sizes.
pub fn matmul_expanded_transposed(
    w: WeightRef<'_>,
    n: usize,
    k: usize,
    g: &[f32],
    m: usize,
) -> Vec<f32> {
    assert_sizes(w, n, k, &[], 0);
    assert_eq!(g.len(), m * n, "g is not [m, n]");
    // rhs = W [n, k] itself: row step k, column step 1.
    with_expanded(w, n, k, |wf| gemm_new(g, m, n, wf, k, 1, k as isize))
}

/// Calls `f` with W as f32 [n, k]: the weight itself, or its blocks expanded into the calling
/// thread's scratch matrix, split over candle's pool.
fn with_expanded<R>(w: WeightRef<'_>, n: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    if let WeightRef::F32(wf) = w {
        return f(wf);
    }
    EXPANDED.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.len() < n * k {
            scratch.resize(n * k, 0.0);
        }
        let out = SharedOut(scratch.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(EXPAND_CHUNK), |chunks| {
            for ci in chunks {
                for r in ci * EXPAND_CHUNK..n.min((ci + 1) * EXPAND_CHUNK) {
                    // SAFETY: chunks are disjoint row ranges of `scratch`, which holds at
                    // least n * k values and outlives the call.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.at(r * k), k) };
                    dequantize_row(w, k, r, row);
                }
            }
        });
        f(&scratch[..n * k])
    })
}

fn parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// y [m, n] = x [m, k] · wf^T with wf [n, k] f32, both row-major.
fn gemm_into_new(wf: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    // rhs = wf^T [k, n]: its column j is wf's row j.
    gemm_new(x, m, k, wf, n, k as isize, 1)
}

/// out [m, cols] (row-major) = lhs [m, inner] (row-major) · rhs [inner, cols], rhs read with
/// the given column and row steps. One f32 GEMM (the `gemm` crate, as candle's own matmul, on
/// the same rayon pool); the output is written without being zeroed first.
fn gemm_new(
    lhs: &[f32],
    m: usize,
    inner: usize,
    rhs: &[f32],
    cols: usize,
    rhs_cs: isize,
    rhs_rs: isize,
) -> Vec<f32> {
    assert!(lhs.len() >= m * inner, "lhs is not [m, inner]");
    let last = (inner.saturating_sub(1) as isize * rhs_rs
        + cols.saturating_sub(1) as isize * rhs_cs) as usize;
    assert!(
        inner == 0 || cols == 0 || last < rhs.len(),
        "rhs is too small"
    );
    let mut out: Vec<f32> = Vec::with_capacity(m * cols);
    // SAFETY: lhs holds m * inner values and every rhs element read lies within rhs (both
    // checked above); out has room for m * cols values, and with `read_dst = false` gemm
    // writes every one of them without reading any (dst := beta · lhs · rhs), so they are
    // initialised when the length is set.
    unsafe {
        gemm::gemm(
            m,
            cols,
            inner,
            out.as_mut_ptr(),
            1,
            cols as isize,
            false,
            lhs.as_ptr(),
            1,
            inner as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism(),
        );
        out.set_len(m * cols);
    }
    out
}

/// The output buffer, written by several workers at disjoint offsets.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: only used to hand disjoint sub-slices to the pool's workers.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay within the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Output rows [n0, n0 + out.len() / m) for m ≤ MAX_M activation rows; out is [rows, m].
/// `xsum`: the 32-block sums of x (Q4_1 only).
fn rows(w: WeightRef<'_>, k: usize, x: &[f32], xsum: &[f32], m: usize, n0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: the CPU features were detected at run time; slice sizes were checked
            // by `matmul`.
            unsafe {
                match w {
                    WeightRef::Q4_1(b) => x86::q4_1_rows(b, k, x, xsum, m, n0, out),
                    WeightRef::Q8_0(b) => x86::q8_0_rows(b, k, x, m, n0, out),
                    WeightRef::F32(f) => x86::f32_rows(f, k, x, m, n0, out),
                }
            }
            return;
        }
    }
    generic_rows(w, k, x, m, n0, out)
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    })
}

/// Weight row `r` dequantized into `buf` (length k). Written block by block over fixed-size
/// arrays so that the compiler vectorises it (prefill expands every weight once per forward).
fn dequantize_row(w: WeightRef<'_>, k: usize, r: usize, buf: &mut [f32]) {
    let nb = k / BLOCK;
    match w {
        WeightRef::Q4_1(b) => {
            let blocks = &b[r * nb * Q4_1_BLOCK_BYTES..(r + 1) * nb * Q4_1_BLOCK_BYTES];
            for (blk, out) in blocks
                .chunks_exact(Q4_1_BLOCK_BYTES)
                .zip(buf.chunks_exact_mut(BLOCK))
            {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let mn = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let qs: &[u8; 16] = blk[4..]
                    .try_into()
                    .expect("a Q4_1 block holds 16 bytes of nibbles");
                let (lo, hi) = out.split_at_mut(BLOCK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                    *l = d * (q & 0x0F) as f32 + mn;
                    *h = d * (q >> 4) as f32 + mn;
                }
            }
        }
        WeightRef::Q8_0(b) => {
            let blocks = &b[r * nb * Q8_0_BLOCK_BYTES..(r + 1) * nb * Q8_0_BLOCK_BYTES];
            for (blk, out) in blocks
                .chunks_exact(Q8_0_BLOCK_BYTES)
                .zip(buf.chunks_exact_mut(BLOCK))
            {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let qs: &[u8; 32] = blk[2..].try_into().expect("a Q8_0 block holds 32 bytes");
                for (o, &q) in out.iter_mut().zip(qs) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        WeightRef::F32(f) => buf.copy_from_slice(&f[r * k..(r + 1) * k]),
    }
}

/// Portable fallback: dequantize a row, then dot products.
fn generic_rows(w: WeightRef<'_>, k: usize, x: &[f32], m: usize, n0: usize, out: &mut [f32]) {
    let mut buf = vec![0f32; k];
    for (ri, o) in out.chunks_mut(m).enumerate() {
        dequantize_row(w, k, n0 + ri, &mut buf);
        for (mi, y) in o.iter_mut().enumerate() {
            *y = buf
                .iter()
                .zip(&x[mi * k..(mi + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, MAX_M, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        _mm_cvtss_f32(h)
    }

    /// `acc[mi] += d · (w · x[mi, block])` for the 32 weights of one block (as 4 × 8 floats).
    #[inline(always)]
    unsafe fn accumulate(
        acc: &mut [__m256; MAX_M],
        wv: &[__m256; 4],
        d: __m256,
        x: *const f32,
        k: usize,
        m: usize,
    ) {
        for (mi, a) in acc.iter_mut().enumerate().take(m) {
            let xp = x.add(mi * k);
            let mut s = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xp.add(24)), s);
            *a = _mm256_fmadd_ps(d, s, *a);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_rows(
        w: &[u8],
        k: usize,
        x: &[f32],
        xsum: &[f32],
        m: usize,
        n0: usize,
        out: &mut [f32],
    ) {
        let nb = k / BLOCK;
        let mask = _mm_set1_epi8(0x0F);
        for (ri, o) in out.chunks_mut(m).enumerate() {
            let wr = w.as_ptr().add((n0 + ri) * nb * Q4_1_BLOCK_BYTES);
            let mut acc = [_mm256_setzero_ps(); MAX_M];
            let mut mins = [0f32; MAX_M];
            for b in 0..nb {
                let blk = wr.add(b * Q4_1_BLOCK_BYTES);
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk as *const i32,
                )));
                let d = _mm256_broadcastss_ps(dm);
                let mn = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let wv = [
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                ];
                accumulate(&mut acc, &wv, d, x.as_ptr().add(b * BLOCK), k, m);
                for (mi, total) in mins.iter_mut().enumerate().take(m) {
                    *total += mn * *xsum.get_unchecked(mi * nb + b);
                }
            }
            for mi in 0..m {
                o[mi] = hsum(acc[mi]) + mins[mi];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_rows(w: &[u8], k: usize, x: &[f32], m: usize, n0: usize, out: &mut [f32]) {
        let nb = k / BLOCK;
        for (ri, o) in out.chunks_mut(m).enumerate() {
            let wr = w.as_ptr().add((n0 + ri) * nb * Q8_0_BLOCK_BYTES);
            let mut acc = [_mm256_setzero_ps(); MAX_M];
            for b in 0..nb {
                let blk = wr.add(b * Q8_0_BLOCK_BYTES);
                let dh = std::ptr::read_unaligned(blk as *const u16);
                let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(dh as i32)));
                let qs = blk.add(2);
                let wv = [
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qs as *const _))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64(qs.add(8) as *const _),
                    )),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        qs.add(16) as *const _
                    ))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        qs.add(24) as *const _
                    ))),
                ];
                accumulate(&mut acc, &wv, d, x.as_ptr().add(b * BLOCK), k, m);
            }
            for mi in 0..m {
                o[mi] = hsum(acc[mi]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_rows(w: &[f32], k: usize, x: &[f32], m: usize, n0: usize, out: &mut [f32]) {
        let k8 = k / 8 * 8;
        for (ri, o) in out.chunks_mut(m).enumerate() {
            let wr = &w[(n0 + ri) * k..(n0 + ri + 1) * k];
            let mut acc = [_mm256_setzero_ps(); MAX_M];
            for j in (0..k8).step_by(8) {
                let wv = _mm256_loadu_ps(wr.as_ptr().add(j));
                for (mi, a) in acc.iter_mut().enumerate().take(m) {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(mi * k + j)), *a);
                }
            }
            for mi in 0..m {
                let tail: f32 = (k8..k).map(|j| wr[j] * x[mi * k + j]).sum();
                o[mi] = hsum(acc[mi]) + tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_matrix(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let nb = k / BLOCK;
        let mut w = Vec::new();
        let mut deq = vec![0f32; n * k];
        for r in 0..n {
            for b in 0..nb {
                let d = f16::from_f32(0.01 * (r % 7 + 1) as f32);
                let mn = f16::from_f32(-0.05 * (b + 1) as f32);
                w.extend_from_slice(&d.to_le_bytes());
                w.extend_from_slice(&mn.to_le_bytes());
                for j in 0..16 {
                    let lo = ((r + j) % 16) as u8;
                    let hi = ((r * 3 + j) % 16) as u8;
                    w.push(lo | (hi << 4));
                    deq[r * k + b * 32 + j] = d.to_f32() * lo as f32 + mn.to_f32();
                    deq[r * k + b * 32 + 16 + j] = d.to_f32() * hi as f32 + mn.to_f32();
                }
            }
        }
        (w, deq)
    }

    fn q8_0_matrix(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let nb = k / BLOCK;
        let mut w = Vec::new();
        let mut deq = vec![0f32; n * k];
        for r in 0..n {
            for b in 0..nb {
                let d = f16::from_f32(0.003 * (r % 5 + 1) as f32);
                w.extend_from_slice(&d.to_le_bytes());
                for j in 0..32 {
                    let q = ((r * 7 + b * 3 + j * 11) % 255) as i32 - 127;
                    w.push(q as i8 as u8);
                    deq[r * k + b * 32 + j] = d.to_f32() * q as f32;
                }
            }
        }
        (w, deq)
    }

    /// y [m, n] equals x [m, k] · deq^T (deq: the dequantized weight [n, k]).
    fn assert_product(y: &[f32], x: &[f32], deq: &[f32], m: usize, n: usize, k: usize) {
        for mi in 0..m {
            for ni in 0..n {
                let want: f32 = (0..k).map(|j| x[mi * k + j] * deq[ni * k + j]).sum();
                let got = y[mi * n + ni];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "m={m} ({mi}, {ni}): {got} vs {want}"
                );
            }
        }
    }

    fn check(w: WeightRef<'_>, deq: &[f32], n: usize, k: usize) {
        // m = 1..=6 covers one group, a full group and a partial second group.
        for m in 1..=6 {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
                .collect();
            assert_product(&matmul(w, n, k, &x, m), &x, deq, m, n, k);
            for mi in 0..m {
                for ni in 0..n {
                    let want: f32 = (0..k).map(|j| x[mi * k + j] * deq[ni * k + j]).sum();
                    // The portable path agrees too.
                    let mut out = vec![0f32; 1];
                    let xr = &x[mi * k..(mi + 1) * k];
                    generic_rows(w, k, xr, 1, ni, &mut out);
                    assert!((out[0] - want).abs() <= 1e-4 * want.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn q4_1_matches_dequantized_weights() {
        let (n, k) = (70, 96);
        let (w, deq) = q4_1_matrix(n, k);
        check(WeightRef::Q4_1(&w), &deq, n, k);
    }

    #[test]
    fn q8_0_matches_dequantized_weights() {
        let (n, k) = (45, 64);
        let (w, deq) = q8_0_matrix(n, k);
        check(WeightRef::Q8_0(&w), &deq, n, k);
    }

    #[test]
    fn f32_matches_plain_dot_products_with_a_ragged_k() {
        let (n, k) = (33, 21);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.05)
            .collect();
        check(WeightRef::F32(&w), &w, n, k);
    }

    #[test]
    fn expanded_matmul_matches_dequantized_weights() {
        // Enough rows and columns for several expansion chunks and gemm's parallel split.
        let (n, k, m) = (150, 96, 37);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let (q4, q4_deq) = q4_1_matrix(n, k);
        let (q8, q8_deq) = q8_0_matrix(n, k);
        for (w, deq) in [
            (WeightRef::Q4_1(&q4), &q4_deq),
            (WeightRef::Q8_0(&q8), &q8_deq),
            (WeightRef::F32(&q4_deq), &q4_deq),
        ] {
            // Twice: the second call reuses the thread's scratch matrix.
            for _ in 0..2 {
                assert_product(&matmul_expanded(w, n, k, &x, m), &x, deq, m, n, k);
            }
        }
        // A smaller weight after a larger one uses the front of the same scratch.
        let y = matmul_expanded(
            WeightRef::Q8_0(&q8[..10 * k / BLOCK * Q8_0_BLOCK_BYTES]),
            10,
            k,
            &x,
            m,
        );
        assert!(
            (y[3 * 10 + 4]
                - (0..k)
                    .map(|j| x[3 * k + j] * q8_deq[4 * k + j])
                    .sum::<f32>())
            .abs()
                < 1e-3
        );
    }

    #[test]
    #[should_panic(expected = "x is not [m, k]")]
    fn wrong_activation_size_is_refused() {
        let w = vec![0f32; 8];
        let _ = matmul(WeightRef::F32(&w), 2, 4, &[0.0; 3], 1);
    }
}
