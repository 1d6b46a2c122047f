//! `roe bench generate`: the backbone against llama.cpp (llama-cpp-python, same GGUF, same
//! thread count) in the same run — next-token log-probs on 20 prompts, and single-stream
//! prefill and decode tokens/s.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use roe_backbone::{Backbone, BackboneOptions, KvCache, LoraBatch, QuantKernel, RenderOptions};
use serde::Serialize;

use super::percentile;

/// The same filler text the peer uses when it builds its speed prompt (bench/peers/llamacpp_bench.py).
pub const SPEED_PROMPT: &str =
    "Retrieval of experts: given a query, find the parameter-efficient expert whose training \
data is closest to it, then load that expert into a frozen backbone and answer. \
The capital of France is Paris. The quick brown fox jumps over the lazy dog. ";

#[derive(Debug, Clone, Serialize)]
pub struct SpeedResult {
    pub engine: String,
    pub prefill_tok_per_s: f64,
    pub decode_tok_per_s: f64,
    pub prefill_s: Vec<f64>,
    pub decode_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NumericsResult {
    pub mode: String,
    pub prompts: usize,
    /// Prompts whose token ids equal llama.cpp's.
    pub same_ids: usize,
    /// Prompts whose most likely next token is the same.
    pub same_top1: usize,
    /// Max |ours − llama.cpp| over llama.cpp's top-5 tokens of every prompt.
    pub max_abs_logprob_diff: f64,
    pub mean_abs_logprob_diff: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchReport {
    pub threads: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    pub speed: Vec<SpeedResult>,
    /// roe (default mode) / llama.cpp.
    pub prefill_ratio: Option<f64>,
    pub decode_ratio: Option<f64>,
    pub numerics: Vec<NumericsResult>,
    pub peer: Option<serde_json::Value>,
}

pub struct GenerateBenchSetup<'a> {
    pub gguf: &'a Path,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    /// 20 texts for the numerics comparison.
    pub texts: Vec<String>,
    pub python: Option<&'a Path>,
    pub peer_script: &'a Path,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn argmax_last(bb: &Backbone, hidden: &Tensor, row_len: usize) -> Result<u32> {
    let lp = bb.log_probs_at(hidden, &[(0, row_len - 1)])?;
    Ok(lp.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?)
}

/// Prefill = one forward of `ids` on an empty cache (+ the last position's log-probs); decode
/// = `new_tokens` greedy steps, each one forward of one token. One untimed warm-up first.
fn measure(
    bb: &Backbone,
    ids: &[u32],
    new_tokens: usize,
    repeats: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..=repeats {
        let (e, l) = bb.embed_rows(&[(None, ids)])?;
        let mut cache = KvCache::with_capacity(ids.len() + new_tokens);
        let t = Instant::now();
        let h = bb.forward(&e, &l, &mut cache, &LoraBatch::none())?;
        let mut next = argmax_last(bb, &h, ids.len())?;
        let t_prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..new_tokens {
            let e = bb.embed_ids(&[next])?.unsqueeze(0)?;
            let h = bb.forward(&e, &[1], &mut cache, &LoraBatch::none())?;
            next = argmax_last(bb, &h, 1)?;
        }
        let t_decode = t.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(t_prefill);
            decode.push(t_decode);
        }
    }
    Ok((prefill, decode))
}

fn numerics(
    bb: &Backbone,
    mode: &str,
    ids: &[Vec<u32>],
    peer: &serde_json::Value,
) -> Result<NumericsResult> {
    let results = peer["results"]
        .as_array()
        .context("peer logprobs: no results")?;
    let mut same_ids = 0;
    let mut same_top1 = 0;
    let mut max_diff = 0f64;
    let mut sum_diff = 0f64;
    let mut n_diff = 0usize;
    for (ours_ids, theirs) in ids.iter().zip(results) {
        let their_ids: Vec<u32> = serde_json::from_value(theirs["ids"].clone())?;
        if &their_ids == ours_ids {
            same_ids += 1;
        }
        let top: Vec<u32> = serde_json::from_value(theirs["top_ids"].clone())?;
        let top_lp: Vec<f64> = serde_json::from_value(theirs["top_logprobs"].clone())?;
        let (e, l) = bb.embed_rows(&[(None, ours_ids.as_slice())])?;
        let mut cache = KvCache::new();
        let h = bb.forward(&e, &l, &mut cache, &LoraBatch::none())?;
        let lp = bb
            .log_probs_at(&h, &[(0, ours_ids.len() - 1)])?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let our_top = lp
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32);
        if our_top == top.first().copied() {
            same_top1 += 1;
        }
        for (&id, &theirs) in top.iter().zip(&top_lp) {
            let d = (lp[id as usize] as f64 - theirs).abs();
            max_diff = max_diff.max(d);
            sum_diff += d;
            n_diff += 1;
        }
    }
    Ok(NumericsResult {
        mode: mode.into(),
        prompts: ids.len(),
        same_ids,
        same_top1,
        max_abs_logprob_diff: max_diff,
        mean_abs_logprob_diff: sum_diff / n_diff.max(1) as f64,
    })
}

pub fn run(setup: &GenerateBenchSetup<'_>) -> Result<GenerateBenchReport> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let modes = [
        ("roe (Q4_1 kept, default)", false),
        ("roe (dequantized f32)", true),
    ];
    let mut speed = Vec::new();
    let mut numeric = Vec::new();
    let model = setup.gguf.canonicalize()?;
    let peer_logprobs = match setup.python {
        Some(py) => Some(super::run_peer(
            py,
            setup.peer_script,
            &serde_json::json!({"model": model, "mode": "logprobs", "texts": setup.texts,
                "top_k": 5, "threads": threads}),
        )?),
        None => None,
    };
    for (name, dequantize) in modes {
        let bb = Backbone::load_with(
            setup.gguf,
            None,
            BackboneOptions {
                dequantize,
                kernel: QuantKernel::DequantizeOnTheFly,
            },
        )?;
        let base = bb.encode(SPEED_PROMPT)?;
        let ids: Vec<u32> = (0..setup.prompt_tokens)
            .map(|i| base[i % base.len()])
            .collect();
        let (prefill, decode) = measure(&bb, &ids, setup.new_tokens, setup.repeats)?;
        let r = SpeedResult {
            engine: name.into(),
            prefill_tok_per_s: setup.prompt_tokens as f64 / median(&prefill),
            decode_tok_per_s: setup.new_tokens as f64 / median(&decode),
            prefill_s: prefill,
            decode_s: decode,
        };
        eprintln!(
            "{name}: prefill {:.0} tok/s, decode {:.1} tok/s",
            r.prefill_tok_per_s, r.decode_tok_per_s
        );
        speed.push(r);
        if let Some(peer) = &peer_logprobs {
            let opts = RenderOptions {
                answer_suffix: String::new(),
                ..RenderOptions::default()
            };
            let ids = setup
                .texts
                .iter()
                .map(|t| bb.render_prompt(t, &opts))
                .collect::<roe_backbone::Result<Vec<_>>>()?;
            numeric.push(numerics(&bb, name, &ids, peer)?);
        }
    }
    let mut report = GenerateBenchReport {
        threads,
        prompt_tokens: setup.prompt_tokens,
        new_tokens: setup.new_tokens,
        repeats: setup.repeats,
        speed,
        prefill_ratio: None,
        decode_ratio: None,
        numerics: numeric,
        peer: None,
    };
    if let Some(py) = setup.python {
        let peer = super::run_peer(
            py,
            setup.peer_script,
            &serde_json::json!({"model": model, "mode": "speed", "prompt": SPEED_PROMPT,
                "prompt_tokens": setup.prompt_tokens, "new_tokens": setup.new_tokens,
                "repeats": setup.repeats, "threads": threads}),
        )?;
        let prefill = peer["prefill_tok_per_s"].as_f64().context("peer prefill")?;
        let decode = peer["decode_tok_per_s"].as_f64().context("peer decode")?;
        report.prefill_ratio = Some(report.speed[0].prefill_tok_per_s / prefill);
        report.decode_ratio = Some(report.speed[0].decode_tok_per_s / decode);
        report.speed.push(SpeedResult {
            engine: "llama.cpp (llama-cpp-python)".into(),
            prefill_tok_per_s: prefill,
            decode_tok_per_s: decode,
            prefill_s: serde_json::from_value(peer["prefill_s"].clone()).unwrap_or_default(),
            decode_s: serde_json::from_value(peer["decode_s"].clone()).unwrap_or_default(),
        });
        report.peer = Some(peer);
    }
    Ok(report)
}

pub fn markdown(r: &GenerateBenchReport) -> String {
    let mut md = format!(
        "# Backbone vs llama.cpp (`roe bench generate`)\n\nSmolLM2-135M-Instruct Q4_1 GGUF, {} threads, \
         single stream, same machine, same run. Prefill: {} prompt tokens on an empty cache; \
         decode: {} greedy tokens; median of {} repeats after a warm-up.\n\n\
         | engine | prefill tok/s | decode tok/s |\n|---|---|---|\n",
        r.threads, r.prompt_tokens, r.new_tokens, r.repeats
    );
    for s in &r.speed {
        md.push_str(&format!(
            "| {} | {:.0} | {:.1} |\n",
            s.engine, s.prefill_tok_per_s, s.decode_tok_per_s
        ));
    }
    let ratio = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
    md.push_str(&format!(
        "\nroe (default) / llama.cpp: prefill {}, decode {} (goal for decode ≥ 0.8)\n",
        ratio(r.prefill_ratio),
        ratio(r.decode_ratio)
    ));
    if !r.numerics.is_empty() {
        md.push_str(
            "\n## Next-token log-probs vs llama.cpp\n\n| roe mode | prompts | same ids | same top-1 | max abs diff (top-5) | mean abs diff |\n|---|---|---|---|---|---|\n",
        );
        for n in &r.numerics {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.4} | {:.4} |\n",
                n.mode,
                n.prompts,
                n.same_ids,
                n.same_top1,
                n.max_abs_logprob_diff,
                n.mean_abs_logprob_diff
            ));
        }
    }
    md
}
