//! Accuracy of the bare backbone, prompt experts and LoRA experts on the task suite, against
//! reference.json.
//!
//! cargo run --release -p roe-backbone --example score_suite -- [--rows N] [--tasks a,b]
//!     [--gen-rows N] [--batch N] [--dequantize] [--ggml]
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use roe_backbone::{
    Adapters, Backbone, BackboneOptions, GenerateParams, Lora, QuantKernel, RenderOptions,
    ScoreRequest, SoftPrompt,
};

struct Row {
    input: String,
    target: String,
    choices: Vec<String>,
}

fn load_task(
    dir: &std::path::Path,
    rows: usize,
) -> Result<(String, Vec<Row>), Box<dyn std::error::Error>> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("task.json"))?)?;
    let format = meta["format"]
        .as_str()
        .unwrap_or("classification")
        .to_string();
    let labels: Vec<String> = meta["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for line in std::fs::read_to_string(dir.join("test.jsonl"))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(rows)
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let choices = v["choices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_else(|| labels.clone());
        out.push(Row {
            input: v["input"].as_str().unwrap_or("").to_string(),
            target: v["target"].as_str().unwrap_or("").to_string(),
            choices,
        });
    }
    Ok((format, out))
}

fn normalize_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(String::from)
        .collect()
}

fn token_f1(pred: &str, target: &str) -> f64 {
    let p = normalize_tokens(pred);
    let t = normalize_tokens(target);
    if p.is_empty() || t.is_empty() {
        return if p.is_empty() && t.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &t {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let prec = common as f64 / p.len() as f64;
    let rec = common as f64 / t.len() as f64;
    2.0 * prec * rec / (prec + rec)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rows: usize = arg("--rows").and_then(|s| s.parse().ok()).unwrap_or(200);
    let gen_rows: usize = arg("--gen-rows")
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.min(rows));
    let batch: usize = arg("--batch").and_then(|s| s.parse().ok()).unwrap_or(4);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let gguf = arg("--gguf").map(PathBuf::from).unwrap_or_else(|| {
        root.join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let tasks_dir =
        PathBuf::from(arg("--tasks-dir").unwrap_or_else(|| "/work/shared/tasks".into()));
    let experts = PathBuf::from(
        arg("--experts").unwrap_or_else(|| "/work/shared/experts/smollm2-135m".into()),
    );
    let opts = BackboneOptions {
        dequantize: args.iter().any(|a| a == "--dequantize"),
        kernel: if args.iter().any(|a| a == "--ggml") {
            QuantKernel::Ggml
        } else {
            QuantKernel::DequantizeOnTheFly
        },
    };
    let bb = Backbone::load_with(&gguf, None, opts)?;
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(experts.join("reference.json"))?)?;
    let mut tasks: Vec<String> = match arg("--tasks") {
        Some(t) => t.split(',').map(String::from).collect(),
        None => std::fs::read_dir(&tasks_dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("test.jsonl").exists())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
    };
    tasks.sort();
    println!("options {opts:?}; first {rows} rows per task (generation: {gen_rows})");
    println!(
        "{:<22} {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6}",
        "task", "bare", "ref", "prompt", "ref", "lora", "ref", "sec"
    );
    let mut sums = [0f64; 6];
    let ropts = RenderOptions {
        eos_id: arg("--end-id").and_then(|s| s.parse().ok()),
        ..RenderOptions::default()
    };
    let start_all = Instant::now();
    for task in &tasks {
        let t0 = Instant::now();
        let (format, data) = load_task(&tasks_dir.join(task), rows)?;
        let sp = SoftPrompt::from_peft_dir(experts.join("prompt").join(task))?;
        let lora = Lora::from_peft_dir(experts.join("lora").join(task))?;
        let configs = [
            Adapters::none(),
            Adapters::prompt(&sp),
            Adapters::lora(&lora),
        ];
        let mut acc = [0f64; 3];
        for (ci, ad) in configs.iter().enumerate() {
            if format == "generation" {
                let mut f1 = 0.0;
                let n = gen_rows.min(data.len());
                for r in &data[..n] {
                    let ids = bb.render_prompt(&r.input, &ropts)?;
                    let g = bb.generate(&ids, *ad, GenerateParams::greedy(24), |_| true)?;
                    f1 += token_f1(&g.text, &r.target);
                }
                acc[ci] = f1 / n as f64;
            } else {
                let mut correct = 0usize;
                for chunk in data.chunks(batch) {
                    let reqs: Vec<ScoreRequest> = chunk
                        .iter()
                        .map(|r| ScoreRequest {
                            input: &r.input,
                            choices: &r.choices,
                            adapters: *ad,
                        })
                        .collect();
                    let outs = bb.score_batch_with(&reqs, &ropts)?;
                    for (r, o) in chunk.iter().zip(outs) {
                        if r.choices[o.best] == r.target {
                            correct += 1;
                        }
                    }
                }
                acc[ci] = correct as f64 / data.len() as f64;
            }
        }
        let refv = &reference["tasks"][task.as_str()];
        let rf = |k: &str| refv[k].as_f64().unwrap_or(f64::NAN);
        let vals = [
            acc[0],
            rf("zero_shot"),
            acc[1],
            rf("prompt"),
            acc[2],
            rf("lora"),
        ];
        for (s, v) in sums.iter_mut().zip(vals) {
            *s += v;
        }
        println!(
            "{:<22} {:>6.3} {:>6.3} | {:>6.3} {:>6.3} | {:>6.3} {:>6.3} | {:>6.1}",
            task,
            vals[0],
            vals[1],
            vals[2],
            vals[3],
            vals[4],
            vals[5],
            t0.elapsed().as_secs_f64()
        );
    }
    let n = tasks.len() as f64;
    println!(
        "{:<22} {:>6.3} {:>6.3} | {:>6.3} {:>6.3} | {:>6.3} {:>6.3} | {:>6.1}",
        "MEAN",
        sums[0] / n,
        sums[1] / n,
        sums[2] / n,
        sums[3] / n,
        sums[4] / n,
        sums[5] / n,
        start_all.elapsed().as_secs_f64()
    );
    Ok(())
}
