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
    let lens: Vec<usize> = inputs
        .iter()
        .map(|(i, c)| bb.encode(i).map(|v| (v.len(), c.len())))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(l, c)| l * 1000 + c)
        .collect();
    println!("prompt tokens*1000 + choices: {lens:?}");
    // Rounds rotate which scenario goes first (the host's speed drifts, and a scenario can
    // leave the allocator or caches in a state the next one inherits).
    for round in 0..6 {
        let mut took = [0f64; 3];
        for step in 0..3 {
            let which = (round + step) % 3;
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
            "round {round}: batch 16 experts {:.2}s, batch one expert {:.2}s, one at a time {:.2}s",
            took[0], took[1], took[2]
        );
    }
    Ok(())
}
