//! What routing needs from a sentence encoder: texts in, unit-length vectors out. The
//! models themselves live in `roe-encoder` (all-MiniLM-L6-v2 on candle, and the batching
//! worker the server uses); the library holds any [`Encoder`].

use crate::error::Result;

/// Anything that turns texts into unit-length vectors of one dimension.
pub trait Encoder: Send + Sync {
    /// Stable identifier of the model, recorded in the store.
    fn id(&self) -> &str;
    fn dim(&self) -> usize;
    /// Embeds texts; the result has one L2-normalised row per text, in order.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
    /// False once the encoder cannot embed any more (its worker has died): health then says
    /// NOT_SERVING for the services that need it.
    fn is_healthy(&self) -> bool {
        true
    }
}

/// L2-normalises a vector in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Inner product: the hot loop of search. Eight independent partial sums let the compiler
/// vectorise the loop (a plain `sum()` must add in order and stays scalar). Where the CPU has
/// AVX2 (detected at run time), the same loop compiled for it runs the eight sums in one
/// register instead of two; the arithmetic is the same (no fused multiply-add), so the result
/// is bit for bit the portable one and no ranking can move.
/// The instruction set [`dot`] uses on this CPU.
pub fn dot_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "portable"
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        let (x, y) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vectorised_dot_is_bit_for_bit_the_portable_one() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for n in [0, 1, 7, 8, 9, 383, 384, 385, 1000] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b);
            assert_eq!(got.to_bits(), dot_portable(&a, &b).to_bits(), "n={n}");
            assert!((got as f64 - exact).abs() < 1e-4, "n={n}: {got} vs {exact}");
        }
        // Unequal lengths: the common prefix.
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[1.0, 1.0]), 3.0);
    }
}
