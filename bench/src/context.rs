//! Long prompts (`roe bench context`): time and peak resident memory of Score and Generate
//! with prompts of 512, 2,048 and 8,192 tokens (the backbone's context, less the answer) on
//! the real backbone, prompts run in passes of `--max-batch-prefill-tokens`; the same prompts'
//! prefill through llama.cpp (its own passes of 512) in the same run, and one pass without
//! the budget for the memory it bounds.
//!
//! Peak memory is the process's high-water mark (VmHWM), reset before each case by writing 5
//! to /proc/self/clear_refs (Linux), so each row is that case's own peak.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use roe_backbone::{Adapters, Backbone, GenerateParams};
use serde::Serialize;

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct ContextCase {
    /// "score", "generate" or "score, one pass".
    pub mode: String,
    pub prompt_tokens: usize,
    /// Positions of one prefill pass.
    pub max_batch_prefill_tokens: usize,
    /// Median seconds of the whole call (Score: prompt and choices; Generate: prompt and
    /// `new_tokens` greedy tokens).
    pub seconds: f64,
    /// Median seconds to the first generated token (Generate only).
    pub first_token_seconds: Option<f64>,
    pub prompt_tok_per_s: f64,
    /// Resident memory before the case and its peak during it (MiB).
    pub rss_before_mib: f64,
    pub peak_rss_mib: f64,
    /// llama.cpp's prefill of as many tokens (median seconds) and its process's peak.
    pub peer_prefill_seconds: Option<f64>,
    pub peer_peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextReport {
    pub backbone: String,
    pub context_length: usize,
    pub repeats: usize,
    pub new_tokens: usize,
    pub cases: Vec<ContextCase>,
}

pub struct ContextSetup<'a> {
    pub gguf: &'a Path,
    pub lengths: Vec<usize>,
    pub max_batch_prefill_tokens: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    /// Also run the longest Score in one pass (no prefill budget), for its memory.
    pub one_pass: bool,
    pub python: Option<&'a Path>,
    pub peer_script: &'a Path,
}

fn mib(bytes: Option<u64>) -> f64 {
    bytes.map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
}

/// Resets this process's peak resident memory to its current resident memory.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    crate::percentile(&xs, 0.5)
}

/// A passage of exactly `tokens` prompt ids once rendered (the canonical suffix included):
/// sentences of the sample text repeated, then cut to length by ids.
fn prompt_ids(bb: &Backbone, tokens: usize) -> Result<Vec<u32>> {
    let sentence = "The river carries silt from the hills to the delta, where farmers plant \
                    rice in the spring and fish in the autumn. ";
    let base = bb.encode(sentence)?;
    let suffix = bb.encode("\nAnswer:")?;
    let body = tokens.saturating_sub(suffix.len());
    let mut ids: Vec<u32> = (0..body).map(|i| base[i % base.len()]).collect();
    ids.extend(suffix);
    Ok(ids)
}

fn measure_case(
    bb: &Backbone,
    mode: &str,
    ids: &[u32],
    setup: &ContextSetup<'_>,
) -> Result<ContextCase> {
    let choices = [" rice".to_string(), " wheat".to_string()];
    let mut seconds = Vec::new();
    let mut first = Vec::new();
    let rss_before = crate::rss_bytes();
    reset_peak();
    for rep in 0..=setup.repeats {
        let t = Instant::now();
        if mode.starts_with("score") {
            let continuations = choices
                .iter()
                .map(|c| bb.render_choice(c, &bb.serving_render_options()))
                .collect::<roe_backbone::Result<Vec<_>>>()?;
            let out = bb.score_ids(&[roe_backbone::ScoreIdsRequest {
                prompt_ids: ids.to_vec(),
                continuations,
                prompt: None,
                lora: None,
                alt_end_ids: Vec::new(),
                truncated_tokens: 0,
            }])?;
            anyhow::ensure!(out[0].prompt_tokens == ids.len(), "the prompt was cut");
        } else {
            let mut first_at = None;
            bb.generate(
                ids,
                Adapters::none(),
                GenerateParams {
                    stop_at_eos: false,
                    ..GenerateParams::greedy(setup.new_tokens)
                },
                |_| {
                    first_at.get_or_insert_with(|| t.elapsed().as_secs_f64());
                    true
                },
            )?;
            if rep > 0 {
                first.push(first_at.unwrap_or(f64::NAN));
            }
        }
        if rep > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    let peak = crate::startup::peak_rss_bytes();
    let seconds = median(seconds);
    let first_token_seconds = (!first.is_empty()).then(|| median(first));
    let prompt_time = first_token_seconds.unwrap_or(seconds);
    eprintln!(
        "{mode} {} tokens: {seconds:.2} s, peak {:.0} MiB",
        ids.len(),
        mib(peak)
    );
    Ok(ContextCase {
        mode: mode.to_string(),
        prompt_tokens: ids.len(),
        max_batch_prefill_tokens: bb.max_batch_prefill_tokens(),
        seconds,
        first_token_seconds,
        prompt_tok_per_s: ids.len() as f64 / prompt_time,
        rss_before_mib: mib(rss_before),
        peak_rss_mib: mib(peak),
        peer_prefill_seconds: None,
        peer_peak_rss_mib: None,
    })
}

pub fn run(setup: &ContextSetup<'_>) -> Result<ContextReport> {
    let bb = Backbone::load(setup.gguf, None)
        .with_context(|| format!("loading {}", setup.gguf.display()))?
        .with_max_batch_prefill_tokens(setup.max_batch_prefill_tokens);
    let context = bb.context_length();
    let mut cases = Vec::new();
    for &len in &setup.lengths {
        // The answer's room: a Score's longest choice, a Generate's new tokens.
        let len = len.min(context - setup.new_tokens);
        let ids = prompt_ids(&bb, len)?;
        let mut peer = None;
        if let Some(py) = setup.python {
            let reply = crate::run_peer(
                py,
                setup.peer_script,
                &serde_json::json!({"model": setup.gguf, "mode": "speed",
                    "prompt_tokens": len, "new_tokens": setup.new_tokens,
                    "repeats": setup.repeats, "threads": crate::host::Host::detect().threads,
                    "n_ctx": context}),
            )?;
            let prefill: Vec<f64> = serde_json::from_value(reply["prefill_s"].clone())?;
            peer = Some((median(prefill), reply["peak_rss_kb"].as_f64()));
        }
        for mode in ["score", "generate"] {
            let mut case = measure_case(&bb, mode, &ids, setup)?;
            if let Some((seconds, rss_kb)) = peer {
                case.peer_prefill_seconds = Some(seconds);
                case.peer_peak_rss_mib = rss_kb.map(|kb| kb / 1024.0);
            }
            cases.push(case);
        }
    }
    if setup.one_pass {
        let len = setup.lengths.iter().copied().max().unwrap_or(512);
        let len = len.min(context - setup.new_tokens);
        let whole = Backbone::load(setup.gguf, None)?.with_max_batch_prefill_tokens(context);
        let ids = prompt_ids(&whole, len)?;
        cases.push(measure_case(&whole, "score, one pass", &ids, setup)?);
    }
    Ok(ContextReport {
        backbone: setup.gguf.display().to_string(),
        context_length: context,
        repeats: setup.repeats,
        new_tokens: setup.new_tokens,
        cases,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

pub fn markdown(r: &ContextReport) -> String {
    let mut md = format!(
        "# Long prompts (`roe bench context`)\n\nSmolLM2-135M-Instruct Q4_1 GGUF (context {} \
         tokens), median of {} runs after a warm-up. Score: the prompt and two one-word choices; \
         Generate: the prompt and {} greedy tokens (first token = the prompt's prefill). Peak: \
         the process's resident high-water mark during the case (reset before it); the backbone \
         and tokenizer are ~{} MiB of it before any prompt. llama.cpp: llama-cpp-python built \
         natively, `eval()` of the same number of ids (its own passes of 512), its process's \
         peak.\n\n\
         | mode | prompt tokens | pass tokens | seconds | first token s | prompt tok/s | peak RSS MiB | \
         llama.cpp prefill s | roe / llama.cpp prefill time | llama.cpp peak MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        r.context_length,
        r.repeats,
        r.new_tokens,
        r.cases.first().map_or(0.0, |c| c.rss_before_mib).round()
    );
    if r.cases.iter().all(|c| c.peer_prefill_seconds.is_none()) {
        md = md.replace(
            "llama.cpp: llama-cpp-python built natively",
            "llama.cpp (not measured in this run; columns –): llama-cpp-python built natively",
        );
    }
    for c in &r.cases {
        let prompt_time = c.first_token_seconds.unwrap_or(c.seconds);
        let ratio = c.peer_prefill_seconds.map(|p| prompt_time / p);
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            c.mode,
            c.prompt_tokens,
            c.max_batch_prefill_tokens,
            c.seconds,
            opt(c.first_token_seconds, 2),
            c.prompt_tok_per_s,
            c.peak_rss_mib,
            opt(c.peer_prefill_seconds, 2),
            ratio.map_or("–".into(), |r| format!("{r:.2}x")),
            opt(c.peer_peak_rss_mib, 0),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_resets_to_the_current_resident_memory() {
        // A large allocation raises the peak; after it is freed and the peak reset, the peak
        // is back near the resident memory.
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        let high = crate::startup::peak_rss_bytes().unwrap();
        drop(big);
        super::reset_peak();
        let after = crate::startup::peak_rss_bytes().unwrap();
        assert!(
            high >= after + (200 << 20),
            "high {high}, after reset {after}"
        );
    }
}
