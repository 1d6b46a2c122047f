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

/// Inner product. Eight independent partial sums let the compiler vectorise the loop (a plain
/// `sum()` must add in order and stays scalar); this is the hot loop of search.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
