//! Inner products over the graph's bf16 vectors, and cache prefetches.
//!
//! Vectors are padded with zeros to a multiple of [`LANES`] bf16 values, so every kernel
//! runs whole registers with no tail. The kernel is chosen once per graph, at run time
//! ([`Kernel::detect`]): AVX-512 BF16 (`vdpbf16ps`, 32 products per instruction with f32
//! sums), else AVX2 + FMA (bf16 widened to f32), else portable code.

/// bf16 values per padded block (one AVX-512 register).
pub(crate) const LANES: usize = 32;

/// Words (two bf16 values each) a vector of `dim` values takes, padded.
pub(crate) fn vector_words(dim: usize) -> usize {
    dim.div_ceil(LANES) * LANES / 2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Avx512Bf16,
    Avx2Fma,
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs (checked at run time, never assumed).
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                return Self::Avx512Bf16;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2Fma;
            }
        }
        Self::Portable
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Avx512Bf16 => "avx512-bf16",
            Self::Avx2Fma => "avx2-fma",
            Self::Portable => "portable",
        }
    }

    /// `a · b` over `words` words of packed bf16 pairs.
    ///
    /// # Safety
    /// `a` and `b` must point at `words` readable words, `words` a multiple of
    /// `LANES / 2`; the kernel must be one [`Self::detect`] returned on this CPU.
    #[inline]
    pub(crate) unsafe fn dot(self, a: *const u32, b: *const u32, words: usize) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => dot_avx512_bf16(a, b, words),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => dot_avx2_fma(a, b, words),
            _ => dot_portable(a, b, words),
        }
    }
}

/// Asks the cache for the `lines` 64-byte lines from `p` (a hint: no effect on results).
#[inline(always)]
pub(crate) fn prefetch(p: *const u32, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for l in 0..lines {
        // SAFETY: prefetching never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.cast::<i8>().wrapping_add(64 * l),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}

#[inline(always)]
fn widen(h: u32) -> (f32, f32) {
    (f32::from_bits(h << 16), f32::from_bits(h & 0xffff_0000))
}

/// # Safety
/// As [`Kernel::dot`].
unsafe fn dot_portable(a: *const u32, b: *const u32, words: usize) -> f32 {
    let (a, b) = (
        std::slice::from_raw_parts(a, words),
        std::slice::from_raw_parts(b, words),
    );
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        for l in 0..4 {
            let ((x0, x1), (y0, y1)) = (widen(x[l]), widen(y[l]));
            acc[2 * l] += x0 * y0;
            acc[2 * l + 1] += x1 * y1;
        }
    }
    acc.iter().sum()
}

/// 32 bf16 values from `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn load_bf16(p: *const u32) -> std::arch::x86_64::__m512bh {
    use std::arch::x86_64::*;
    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_avx512_bf16(a: *const u32, b: *const u32, words: usize) -> f32 {
    use std::arch::x86_64::*;
    // Two sums: one vdpbf16ps waits on the one before it otherwise.
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let blocks = words / 16;
    let mut i = 0;
    while i + 1 < blocks {
        s0 = _mm512_dpbf16_ps(s0, load_bf16(a.add(16 * i)), load_bf16(b.add(16 * i)));
        s1 = _mm512_dpbf16_ps(
            s1,
            load_bf16(a.add(16 * i + 16)),
            load_bf16(b.add(16 * i + 16)),
        );
        i += 2;
    }
    if i < blocks {
        s0 = _mm512_dpbf16_ps(s0, load_bf16(a.add(16 * i)), load_bf16(b.add(16 * i)));
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: *const u32, b: *const u32, words: usize) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..words).step_by(8) {
        let x = _mm256_loadu_si256(a.add(i).cast());
        let y = _mm256_loadu_si256(b.add(i).cast());
        // Low halves shifted up, high halves masked: both become f32 exactly.
        let (xl, yl) = (_mm256_slli_epi32(x, 16), _mm256_slli_epi32(y, 16));
        let (xh, yh) = (_mm256_and_si256(x, hi), _mm256_and_si256(y, hi));
        s0 = _mm256_fmadd_ps(_mm256_castsi256_ps(xl), _mm256_castsi256_ps(yl), s0);
        s1 = _mm256_fmadd_ps(_mm256_castsi256_ps(xh), _mm256_castsi256_ps(yh), s1);
    }
    let s = _mm256_add_ps(s0, s1);
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    _mm_cvtss_f32(q)
}

/// `v` rounded to bf16 (nearest, ties to even), packed in pairs into `out` (zero padded).
pub(crate) fn pack(v: &[f32], out: &mut [u32]) {
    out.fill(0);
    for (i, x) in v.iter().enumerate() {
        let h = half::bf16::from_f32(*x).to_bits() as u32;
        out[i / 2] |= h << (16 * (i % 2));
    }
}

/// The `i`-th value of a packed vector, widened.
pub(crate) fn unpack(words: &[u32], i: usize) -> f32 {
    f32::from_bits(((words[i / 2] >> (16 * (i % 2))) & 0xffff) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_this_cpu_runs_agrees_with_the_exact_product_of_the_rounded_values() {
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect() != Kernel::Portable {
            kernels.push(Kernel::detect());
        }
        #[cfg(target_arch = "x86_64")]
        if Kernel::detect() == Kernel::Avx512Bf16 {
            kernels.push(Kernel::Avx2Fma);
        }
        for dim in [1, 31, 32, 33, 64, 100, 384, 1000] {
            let a: Vec<f32> = (0..dim).map(|_| next()).collect();
            let b: Vec<f32> = (0..dim).map(|_| next()).collect();
            let words = vector_words(dim);
            let (mut pa, mut pb) = (vec![0u32; words], vec![0u32; words]);
            pack(&a, &mut pa);
            pack(&b, &mut pb);
            let exact: f64 = (0..dim)
                .map(|i| unpack(&pa, i) as f64 * unpack(&pb, i) as f64)
                .sum();
            for (i, x) in a.iter().enumerate() {
                assert!((unpack(&pa, i) - x).abs() <= x.abs() / 128.0);
            }
            for k in &kernels {
                // SAFETY: both packed vectors hold `words` words; the kernel runs here.
                let got = unsafe { k.dot(pa.as_ptr(), pb.as_ptr(), words) };
                assert!(
                    (got as f64 - exact).abs() < 1e-4,
                    "{k:?}, dim {dim}: {got} vs {exact}"
                );
            }
        }
    }
}
