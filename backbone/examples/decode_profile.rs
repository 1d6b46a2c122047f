//! Decode-step timing for profiling: prefill 256 tokens, then N greedy steps.
use std::time::Instant;

use roe_backbone::{Backbone, KvCache, LoraBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let bb = Backbone::load(path, None)?;
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let ids = bb.encode(&text)?;
    let ids = &ids[..256];
    let (e, l) = bb.embed_rows(&[(None, ids)])?;
    let mut c0 = KvCache::with_capacity(256 + steps);
    bb.forward(&e, &l, &mut c0, &LoraBatch::none())?;
    for _ in 0..3 {
        let mut c = c0.select_rows(&[0], steps)?;
        let mut next = 42u32;
        let t = Instant::now();
        for _ in 0..steps {
            let e = bb.embed_ids(&[next])?.unsqueeze(0)?;
            let h = bb.forward(&e, &[1], &mut c, &LoraBatch::none())?;
            let lp = bb.log_probs_at(&h, &[(0, 0)])?;
            next = lp.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "decode {:.2} ms/token ({:.1} tok/s)",
            s * 1e3 / steps as f64,
            steps as f64 / s
        );
    }
    Ok(())
}
