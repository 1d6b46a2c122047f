//! Score timing: the same 16 requests (one test row of 16 classification tasks) as one batch
//! on 16 experts, one batch on one expert, and one request at a time.
use std::time::Instant;

use roe_backbone::{Adapters, Backbone, Lora, ScoreRequest, SoftPrompt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let bb = Backbone::load(
        format!("{root}/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        None,
    )?;
    let kind = std::env::args().nth(1).unwrap_or_else(|| "prompt".into());
    let tasks = [
        "email_spam",
        "epistemic_nli",
        "fever_claims",
        "food_reviews",
        "hotel_sentiment",
        "implicatures",
        "language_id",
        "movie_sentiment",
        "presupposition_nli",
        "question_type",
        "quote_topic",
        "sms_spam",
        "snips_intent",
        "social_support",
        "tweet_sentiment",
        "vitaminc",
    ];
    let mut inputs = Vec::new();
    let mut prompts = Vec::new();
    let mut loras = Vec::new();
    for t in tasks {
        let dir = format!("{root}/assets/tasks/{t}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/task.json"))?)?;
        let line = std::fs::read_to_string(format!("{dir}/test.jsonl"))?;
        let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap_or("{}"))?;
        let choices: Vec<String> = v["choices"]
            .as_array()
            .or(meta["labels"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        inputs.push((v["input"].as_str().unwrap_or("").to_string(), choices));
        let ed = format!("{root}/assets/experts/smollm2-135m");
        prompts.push(SoftPrompt::from_peft_dir(format!("{ed}/prompt/{t}"))?);
        loras.push(Lora::from_peft_dir(format!("{ed}/lora/{t}"))?);
    }
    let ad = |i: usize| -> Adapters<'_> {
        if kind == "prompt" {
            Adapters::prompt(&prompts[i])
        } else {
            Adapters::lora(&loras[i])
        }
    };
    let reqs = |one: bool| -> Vec<ScoreRequest<'_>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, (input, choices))| ScoreRequest {
                input,
                choices,
                adapters: ad(if one { 0 } else { i }),
            })
            .collect()
    };
    // The work: every prompt position and every fed continuation position goes through the
    // 30 layers (2 · 106.2M multiply-adds of weights per position); the LM head (2 · 28.3M)
    // runs at each scored position. Attention and norms are left out (a few % here).
    let (mut layer_positions, mut head_positions) = (0usize, 0usize);
    for (i, (input, choices)) in inputs.iter().enumerate() {
        let virtual_tokens = if kind == "prompt" {
            prompts[i].num_virtual_tokens()
        } else {
            0
        };
        layer_positions += virtual_tokens + bb.encode(&format!("{input}\nAnswer:"))?.len();
        for c in choices {
            let n = bb.encode(&format!(" {c}"))?.len() + 1; // + EOS
            layer_positions += n - 1;
            head_positions += n;
        }
    }
    let gflop =
        (2.0 * 106.2e6 * layer_positions as f64 + 2.0 * 28.3e6 * head_positions as f64) / 1e9;
    // What one f32 GEMM of prefill's shape reaches on this machine (candle's matmul).
    let a = candle_core::Tensor::randn(0f32, 1.0, (2048, 576), &candle_core::Device::Cpu)?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (576, 3072), &candle_core::Device::Cpu)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = a.matmul(&w)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak = 2.0 * 2048.0 * 576.0 * 3072.0 / best / 1e9;
    println!(
        "{layer_positions} positions through the layers, {head_positions} through the LM head: \
         {gflop:.0} GFLOP; one [2048x576]x[576x3072] f32 GEMM runs at {peak:.0} GFLOP/s, so \
         these requests need at least {:.2} s",
        gflop / peak
    );
    // Rounds rotate which scenario goes first (the host's speed drifts, and a scenario can
    // leave the allocator or caches in a state the next one inherits).
    for round in 0..6 {
        let mut took = [0f64; 3];
        let only: Option<usize> = std::env::args().nth(2).and_then(|s| s.parse().ok());
        for step in 0..3 {
            let which = (round + step) % 3;
            if only.is_some_and(|o| o != which) {
                continue;
            }
            let t = Instant::now();
            match which {
                0 => {
                    bb.score_batch(&reqs(false))?;
                }
                1 => {
                    bb.score_batch(&reqs(true))?;
                }
                _ => {
                    for r in reqs(false) {
                        bb.score(&r)?;
                    }
                }
            }
            took[which] = t.elapsed().as_secs_f64();
        }
        println!(
            "round {round}: batch 16 experts {:.2}s, batch one expert {:.2}s, one at a time {:.2}s \
             ({:.0} / {:.0} / {:.0} GFLOP/s)",
            took[0],
            took[1],
            took[2],
            gflop / took[0],
            gflop / took[1],
            gflop / took[2]
        );
    }
    Ok(())
}
