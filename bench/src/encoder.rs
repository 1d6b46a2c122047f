//! Encoder throughput (sentences/s at batch 32) against sentence-transformers on the same
//! machine in the same run, and agreement of the vectors on the same inputs.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use roe_encoder::{BertEncoder, Encoder, Precision};
use roe_expert_library::embedding::dot;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EncoderReport {
    pub texts: usize,
    pub batch_size: usize,
    /// The linear layers' precision on this CPU (`auto`): bf16 or f32.
    pub precision: String,
    pub roe_sentences_per_s: f64,
    /// The f32 path on the same texts, same run (absent when it is the one measured).
    pub f32_sentences_per_s: Option<f64>,
    /// Least cosine between the measured path's vectors and the f32 path's.
    pub min_cosine_vs_f32: Option<f64>,
    pub peer_sentences_per_s: Option<f64>,
    /// roe / sentence-transformers (goal >= 1.0).
    pub ratio: Option<f64>,
    pub min_cosine_vs_peer: Option<f64>,
    pub peer: Option<serde_json::Value>,
}

/// Timed passes per engine (the best is reported, for roe and the peer alike).
const REPEATS: usize = 3;

pub fn run(
    encoder_dir: &Path,
    texts: Vec<String>,
    python: Option<&Path>,
    peer_script: &Path,
) -> Result<EncoderReport> {
    let batch_size = 32;
    let timed = |precision| -> Result<(String, f64, Vec<Vec<f32>>)> {
        let encoder =
            BertEncoder::load_with(encoder_dir, roe_encoder::ENCODER_MAX_TOKENS, precision)?
                .with_batch_size(batch_size);
        encoder.embed(&texts[..batch_size.min(texts.len())])?; // warm-up
                                                               // The best of REPEATS passes, as the peer reports its own: this host's speed moves
                                                               // between passes, and the best pass is the one least disturbed.
        let mut best = f64::INFINITY;
        let mut vectors = Vec::new();
        for _ in 0..REPEATS {
            let t = Instant::now();
            vectors = encoder.embed(&texts)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok((
            encoder.precision().to_string(),
            texts.len() as f64 / best,
            vectors,
        ))
    };
    let (precision, roe_rate, ours) = timed(roe_cli::models::encoder_precision()?)?;
    let (f32_rate, min_cos_f32) = if precision == "f32" {
        (None, None)
    } else {
        let (_, rate, plain) = timed(Precision::F32)?;
        let min = ours
            .iter()
            .zip(&plain)
            .map(|(a, b)| dot(a, b) as f64)
            .fold(f64::INFINITY, f64::min);
        (Some(rate), Some(min))
    };
    let mut report = EncoderReport {
        texts: texts.len(),
        batch_size,
        precision,
        roe_sentences_per_s: roe_rate,
        f32_sentences_per_s: f32_rate,
        min_cosine_vs_f32: min_cos_f32,
        peer_sentences_per_s: None,
        ratio: None,
        min_cosine_vs_peer: None,
        peer: None,
    };
    let Some(python) = python else {
        tracing::warn!(
            "no peer Python (run scripts/setup-peers.sh): sentence-transformers not measured"
        );
        return Ok(report);
    };
    let model_dir = encoder_dir.canonicalize()?;
    let peer = super::run_peer(
        python,
        peer_script,
        &serde_json::json!({"model_dir": model_dir, "texts": texts, "batch_size": batch_size, "mode": "throughput", "repeats": REPEATS,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)}),
    )?;
    let rate = peer["sentences_per_s"].as_f64();
    let embedded = super::run_peer(
        python,
        peer_script,
        &serde_json::json!({"model_dir": model_dir, "texts": texts, "batch_size": batch_size, "mode": "embed"}),
    )?;
    let theirs: Vec<Vec<f32>> = serde_json::from_value(embedded["embeddings"].clone())?;
    let min_cos = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| dot(a, b) as f64 / (dot(b, b) as f64).sqrt())
        .fold(f64::INFINITY, f64::min);
    report.peer_sentences_per_s = rate;
    report.ratio = rate.map(|r| roe_rate / r);
    report.min_cosine_vs_peer = Some(min_cos);
    report.peer = Some(peer);
    Ok(report)
}
