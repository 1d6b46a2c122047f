//! Rough timings of the forward pass in both modes.
use std::time::Instant;

use roe_backbone::{Backbone, BackboneOptions, KvCache, LoraBatch, QuantKernel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .to_string()
    });
    let modes: Vec<BackboneOptions> = match std::env::args().nth(2).as_deref() {
        Some("all") => vec![
            BackboneOptions {
                dequantize: false,
                kernel: QuantKernel::DequantizeOnTheFly,
            },
            BackboneOptions {
                dequantize: true,
                kernel: QuantKernel::DequantizeOnTheFly,
            },
            BackboneOptions {
                dequantize: false,
                kernel: QuantKernel::Ggml,
            },
        ],
        _ => vec![
            BackboneOptions {
                dequantize: false,
                kernel: QuantKernel::DequantizeOnTheFly,
            },
            BackboneOptions {
                dequantize: true,
                kernel: QuantKernel::DequantizeOnTheFly,
            },
        ],
    };
    for opts in modes {
        let t0 = Instant::now();
        let bb = Backbone::load_with(&path, None, opts)?;
        println!("{opts:?}: load {:?}", t0.elapsed());
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let ids = bb.encode(&text)?;
        for n in [32usize, 128, 384] {
            let ids = &ids[..n];
            let (e, l) = bb.embed_rows(&[(None, ids)])?;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let mut c = KvCache::new();
                let t = Instant::now();
                let h = bb.forward(&e, &l, &mut c, &LoraBatch::none())?;
                let _ = bb.log_probs_at(&h, &[(0, n - 1)])?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "  prefill {n:4} tokens: {:.1} ms ({:.0} tok/s)",
                best * 1e3,
                n as f64 / best
            );
        }
        // decode
        let (e, l) = bb.embed_rows(&[(None, &ids[..100])])?;
        let mut c = KvCache::with_capacity(64);
        bb.forward(&e, &l, &mut c, &LoraBatch::none())?;
        let t = Instant::now();
        for i in 0..32 {
            let e = bb.embed_ids(&[ids[100 + i]])?.unsqueeze(0)?;
            let h = bb.forward(&e, &[1], &mut c, &LoraBatch::none())?;
            let _ = bb.logits(&bb.gather_positions(&h, &[(0, 0)])?)?;
        }
        println!(
            "  decode: {:.1} ms/token",
            t.elapsed().as_secs_f64() * 1e3 / 32.0
        );
        // lm head alone for 32 rows
        let (e, l) = bb.embed_rows(&[(None, &ids[..32])])?;
        let mut c = KvCache::new();
        let h = bb.forward(&e, &l, &mut c, &LoraBatch::none())?;
        let at: Vec<(usize, usize)> = (0..32).map(|j| (0, j)).collect();
        let t = Instant::now();
        let _ = bb.log_probs_at(&h, &at)?;
        println!(
            "  lm head 32 rows: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
