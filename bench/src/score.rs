//! `roe bench score`: accuracy of the bare backbone and of every prompt and LoRA expert on each
//! task's test set, against the accuracies PEFT measured (`reference.json`), plus scoring
//! throughput.
//!
//! Every classification row is scored once with both end-of-answer conventions (the canonical
//! rendering's EOS id 2, and id 1, which the reference experts were trained to emit), using
//! [`RenderOptions::alt_end_ids`], so both accuracies come from the same forward passes.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use roe_backbone::metrics::token_f1;
use roe_backbone::{
    Adapters, Backbone, GenerateParams, Lora, RenderOptions, ScoreOutput, ScoreRequest, SoftPrompt,
};
use roe_expert_library::expert::Instance;
use roe_task_suite::Task;
use serde::Serialize;

/// The end-of-answer ids compared: the canonical rendering's EOS, and `<|im_start|>`.
pub const END_IDS: [u32; 2] = [2, 1];

/// Greedy tokens generated per row of generation tasks (the reference's setting).
pub const GENERATION_TOKENS: usize = 24;

/// Scores `rows` (with their choices) under one set of adapters, `batch` rows per call.
pub fn score_rows(
    bb: &Backbone,
    rows: &[Instance],
    adapters: Adapters<'_>,
    opts: &RenderOptions,
    batch: usize,
) -> Result<Vec<ScoreOutput>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let reqs: Vec<ScoreRequest<'_>> = chunk
            .iter()
            .map(|r| ScoreRequest {
                input: &r.input,
                choices: &r.choices,
                adapters,
            })
            .collect();
        out.extend(bb.score_batch_with(&reqs, opts)?);
    }
    Ok(out)
}

/// Index of the best choice when the answer ends with `END_IDS[end]` (from `alt_end_sums`).
pub fn best_with_end(out: &ScoreOutput, end: usize) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, alts) in out.alt_end_sums.iter().enumerate() {
        let v = alts.get(end).copied().unwrap_or(f32::NEG_INFINITY);
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// `out` as if its answers had ended with `END_IDS[end]`: sums and both argmaxes from
/// `alt_end_sums` (unchanged when those were not computed).
pub fn with_end(out: &ScoreOutput, end: usize) -> ScoreOutput {
    if out.alt_end_sums.is_empty() {
        return out.clone();
    }
    let choices: Vec<roe_backbone::ChoiceScore> = out
        .choices
        .iter()
        .zip(&out.alt_end_sums)
        .map(|(c, alts)| {
            let sum = alts.get(end).copied().unwrap_or(c.sum_logprob);
            roe_backbone::ChoiceScore {
                sum_logprob: sum,
                mean_logprob: sum / c.num_tokens.max(1) as f32,
                num_tokens: c.num_tokens,
            }
        })
        .collect();
    let argmax = |f: &dyn Fn(&roe_backbone::ChoiceScore) -> f32| {
        let mut best = 0;
        for (i, c) in choices.iter().enumerate() {
            if f(c) > f(&choices[best]) {
                best = i;
            }
        }
        best
    };
    let best = argmax(&|c| c.sum_logprob);
    let best_by_mean = argmax(&|c| c.mean_logprob);
    ScoreOutput {
        best,
        best_by_mean,
        choices,
        alt_end_sums: Vec::new(),
        prompt_tokens: 0,
        truncated_tokens: 0,
    }
}

/// Render options that also report both end conventions.
pub fn both_ends() -> RenderOptions {
    RenderOptions {
        eos_id: Some(END_IDS[0]),
        alt_end_ids: END_IDS.to_vec(),
        ..RenderOptions::default()
    }
}

/// Greedy answers (at most [`GENERATION_TOKENS`]) and their token F1 against the targets.
pub fn generation_f1(
    bb: &Backbone,
    rows: &[Instance],
    adapters: Adapters<'_>,
) -> Result<Vec<(String, f64)>> {
    let opts = RenderOptions::default();
    rows.iter()
        .map(|r| {
            let ids = bb.render_prompt(&r.input, &opts)?;
            let g = bb.generate(
                &ids,
                adapters,
                GenerateParams::greedy(GENERATION_TOKENS),
                |_| true,
            )?;
            let f1 = token_f1(&g.text, r.target.as_deref().unwrap_or(""));
            Ok((g.text, f1))
        })
        .collect()
}

/// Accuracy under each end convention (index as [`END_IDS`]).
pub fn accuracies(rows: &[Instance], outs: &[ScoreOutput]) -> [f64; 2] {
    let mut correct = [0usize; 2];
    for (r, o) in rows.iter().zip(outs) {
        for (end, c) in correct.iter_mut().enumerate() {
            if r.target.as_deref() == Some(r.choices[best_with_end(o, end)].as_str()) {
                *c += 1;
            }
        }
    }
    correct.map(|c| c as f64 / rows.len().max(1) as f64)
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    /// "bare", "prompt" or "lora".
    pub config: String,
    /// Accuracy with answers ending in id 2 (canonical) — F1 for generation tasks.
    pub end2: f64,
    /// Accuracy with answers ending in id 1 — F1 for generation tasks (same value).
    pub end1: f64,
    /// What PEFT measured.
    pub reference: Option<f64>,
    pub rows: usize,
    pub seconds: f64,
    /// Generation tasks: each row's greedy answer, in row order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub format: String,
    pub configs: Vec<ConfigResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: String,
    pub mean_end2: f64,
    pub mean_end1: f64,
    pub mean_reference: f64,
    /// Tasks within 2 points of the reference (of the tasks that have one).
    pub within_2pt_end2: usize,
    pub within_2pt_end1: usize,
    pub tasks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScoreBenchReport {
    pub rows_per_task: Option<usize>,
    pub generation_rows: usize,
    pub batch: usize,
    pub tasks: Vec<TaskResult>,
    pub summary: Vec<Summary>,
    /// Classification rows scored per second (all configs; each row scores all its choices).
    pub score_rows_per_s: f64,
    pub total_seconds: f64,
}

pub struct ScoreBenchSetup<'a> {
    pub experts_dir: &'a Path,
    pub reference: Option<serde_json::Value>,
    /// Test rows per task (None: all).
    pub rows: Option<usize>,
    pub generation_rows: usize,
    pub batch: usize,
}

fn reference_of(reference: &Option<serde_json::Value>, task: &str, key: &str) -> Option<f64> {
    reference.as_ref()?["tasks"][task][key].as_f64()
}

/// Runs the benchmark over `tasks`, printing one line per task.
pub fn run(bb: &Backbone, tasks: &[Task], setup: &ScoreBenchSetup<'_>) -> Result<ScoreBenchReport> {
    let start = Instant::now();
    let mut results = Vec::new();
    let mut class_rows = 0usize;
    let mut class_secs = 0f64;
    println!(
        "{:<22} {:>13} {:>6} | {:>13} {:>6} | {:>13} {:>6}",
        "task", "bare e2/e1", "ref", "prompt e2/e1", "ref", "lora e2/e1", "ref"
    );
    for task in tasks {
        let name = task.name().to_string();
        let sp = SoftPrompt::from_peft_dir(setup.experts_dir.join("prompt").join(&name))
            .with_context(|| format!("prompt expert of {name}"))?;
        let lora = Lora::from_peft_dir(setup.experts_dir.join("lora").join(&name))
            .with_context(|| format!("LoRA expert of {name}"))?;
        let generation = task.info.format == "generation";
        let n = if generation {
            setup.generation_rows
        } else {
            setup.rows.unwrap_or(usize::MAX)
        };
        let rows: Vec<Instance> = task.test.iter().take(n).cloned().collect();
        let mut configs = Vec::new();
        for (config, key, adapters) in [
            ("bare", "zero_shot", Adapters::none()),
            ("prompt", "prompt", Adapters::prompt(&sp)),
            ("lora", "lora", Adapters::lora(&lora)),
        ] {
            let t0 = Instant::now();
            let mut answers = Vec::new();
            let (end2, end1) = if generation {
                let f1 = generation_f1(bb, &rows, adapters)?;
                let mean = f1.iter().map(|(_, f)| f).sum::<f64>() / f1.len().max(1) as f64;
                answers = f1.into_iter().map(|(a, _)| a).collect();
                (mean, mean)
            } else {
                let outs = score_rows(bb, &rows, adapters, &both_ends(), setup.batch)?;
                let [a2, a1] = accuracies(&rows, &outs);
                (a2, a1)
            };
            let seconds = t0.elapsed().as_secs_f64();
            if !generation {
                class_rows += rows.len();
                class_secs += seconds;
            }
            configs.push(ConfigResult {
                config: config.into(),
                end2,
                end1,
                reference: reference_of(&setup.reference, &name, key),
                rows: rows.len(),
                seconds,
                answers,
            });
        }
        let cell = |c: &ConfigResult| {
            (
                format!("{:.3}/{:.3}", c.end2, c.end1),
                c.reference.map(|r| format!("{r:.3}")).unwrap_or_default(),
            )
        };
        let (b, p, l) = (cell(&configs[0]), cell(&configs[1]), cell(&configs[2]));
        println!(
            "{:<22} {:>13} {:>6} | {:>13} {:>6} | {:>13} {:>6}",
            name, b.0, b.1, p.0, p.1, l.0, l.1
        );
        results.push(TaskResult {
            task: name,
            format: task.info.format.clone(),
            configs,
        });
    }
    let summary = ["bare", "prompt", "lora"]
        .iter()
        .enumerate()
        .map(|(i, config)| {
            let cs: Vec<&ConfigResult> = results.iter().map(|t| &t.configs[i]).collect();
            let mean = |f: &dyn Fn(&ConfigResult) -> f64| {
                cs.iter().map(|c| f(c)).sum::<f64>() / cs.len().max(1) as f64
            };
            let within = |f: &dyn Fn(&ConfigResult) -> f64| {
                cs.iter()
                    .filter(|c| c.reference.is_some_and(|r| (f(c) - r).abs() <= 0.02 + 1e-9))
                    .count()
            };
            Summary {
                config: config.to_string(),
                mean_end2: mean(&|c| c.end2),
                mean_end1: mean(&|c| c.end1),
                mean_reference: mean(&|c| c.reference.unwrap_or(f64::NAN)),
                within_2pt_end2: within(&|c| c.end2),
                within_2pt_end1: within(&|c| c.end1),
                tasks: cs.len(),
            }
        })
        .collect();
    Ok(ScoreBenchReport {
        rows_per_task: setup.rows,
        generation_rows: setup.generation_rows,
        batch: setup.batch,
        tasks: results,
        summary,
        score_rows_per_s: class_rows as f64 / class_secs.max(1e-9),
        total_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The report as Markdown: all 69 figures with their reference and difference.
pub fn markdown(r: &ScoreBenchReport) -> String {
    let mut md =
        String::from("# Backbone and expert accuracy vs reference.json (`roe bench score`)\n\n");
    md.push_str(&format!(
        "Rows per task: {}; generation (reddit_qa, token F1): first {} rows, greedy {} tokens. \
         e2 = answers end with EOS id 2 (the canonical rendering), e1 = with id 1 \
         (`<|im_start|>`, what the reference experts were trained to emit). \
         Δ = ours − reference in points; ✓ = within 2 points.\n\n",
        r.rows_per_task
            .map(|n| n.to_string())
            .unwrap_or_else(|| "all (test.jsonl)".into()),
        r.generation_rows,
        GENERATION_TOKENS
    ));
    md.push_str(
        "| task | config | e2 | e1 | reference | Δ e2 | Δ e1 |\n|---|---|---|---|---|---|---|\n",
    );
    let delta = |v: f64, rf: Option<f64>| match rf {
        Some(rf) => {
            let d = (v - rf) * 100.0;
            format!("{d:+.1}{}", if d.abs() <= 2.0 + 1e-7 { " ✓" } else { "" })
        }
        None => "-".into(),
    };
    for t in &r.tasks {
        for c in &t.configs {
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {} | {} | {} |\n",
                t.task,
                c.config,
                c.end2,
                c.end1,
                c.reference
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_else(|| "-".into()),
                delta(c.end2, c.reference),
                delta(c.end1, c.reference),
            ));
        }
    }
    md.push_str("\n| config | mean e2 | mean e1 | mean reference | within 2 pts (e2) | within 2 pts (e1) |\n|---|---|---|---|---|---|\n");
    for s in &r.summary {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {}/{} | {}/{} |\n",
            s.config,
            s.mean_end2,
            s.mean_end1,
            s.mean_reference,
            s.within_2pt_end2,
            s.tasks,
            s.within_2pt_end1,
            s.tasks
        ));
    }
    md.push_str(&format!(
        "\nScore throughput: {:.2} rows/s (batch {}, every choice of a row scored; all configs); \
         total {:.0} s.\n",
        r.score_rows_per_s, r.batch, r.total_seconds
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use roe_backbone::ChoiceScore;

    fn out(sums: &[f32], alts: &[[f32; 2]]) -> ScoreOutput {
        ScoreOutput {
            choices: sums
                .iter()
                .map(|&s| ChoiceScore {
                    sum_logprob: s,
                    mean_logprob: s / 2.0,
                    num_tokens: 2,
                })
                .collect(),
            best: 0,
            best_by_mean: 0,
            alt_end_sums: alts.iter().map(|a| a.to_vec()).collect(),
            prompt_tokens: 0,
            truncated_tokens: 0,
        }
    }

    #[test]
    fn with_end_rescores_from_the_alternative_sums() {
        // Under end id 2 (index 0) choice 0 wins; under end id 1 (index 1) choice 1 wins.
        let o = out(&[-1.0, -3.0], &[[-1.0, -9.0], [-3.0, -2.0]]);
        assert_eq!(best_with_end(&o, 0), 0);
        assert_eq!(best_with_end(&o, 1), 1);
        let e1 = with_end(&o, 1);
        assert_eq!(e1.best, 1);
        assert_eq!(e1.best_by_mean, 1);
        assert_eq!(e1.choices[0].sum_logprob, -9.0);
        assert_eq!(e1.choices[1].mean_logprob, -1.0);
        assert!(e1.alt_end_sums.is_empty());
        // Without alternatives the output is unchanged.
        let plain = out(&[-1.0, -3.0], &[]);
        assert_eq!(with_end(&plain, 1), plain);
    }

    #[test]
    fn accuracies_count_each_end_convention() {
        let rows = vec![
            Instance {
                input: "x".into(),
                target: Some("b".into()),
                choices: vec!["a".into(), "b".into()],
            },
            Instance {
                input: "y".into(),
                target: Some("a".into()),
                choices: vec!["a".into(), "b".into()],
            },
        ];
        let outs = vec![
            out(&[0.0, 0.0], &[[-1.0, -9.0], [-3.0, -2.0]]), // e2: a, e1: b
            out(&[0.0, 0.0], &[[-1.0, -1.0], [-3.0, -2.0]]), // e2: a, e1: a
        ];
        assert_eq!(accuracies(&rows, &outs), [0.5, 1.0]);
    }
}
