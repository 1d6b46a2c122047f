//! `roe eval`: the Retrieval-of-Experts loop measured on the task suite, in process.
//!
//! For every task: the bare backbone; the oracle (the task's own LoRA and prompt experts);
//! RoE-routed (S instances per expert in the library, Q unlabeled test queries, the default
//! strategy); all LoRA experts merged into one (the multitask baseline); the ensemble of the
//! task's prompt and LoRA experts (majority vote, ties by summed log-likelihood); and
//! leave-one-out — the task's own expert removed from the library, routed among the others
//! (the paper's unseen-task setting) — with the abstain threshold swept to show when falling
//! back to the bare backbone or the merged expert is better.
//!
//! Scores of one (adapter, task) pair are computed once and reused by every column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use roe_backbone::{ensemble_vote, Adapters, Backbone, Lora, ScoreOutput, SoftPrompt};
use roe_expert_library::embedding::Encoder;
use roe_expert_library::expert::{BackboneSpec, Instance};
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, NewExpert};
use roe_expert_library::merge::{merge_adapters, PromptMergeMode};
use roe_expert_library::retrieval::RouteOptions;
use roe_expert_library::PeftAdapter;
use roe_task_suite::{as_query, sample, Task};
use serde::Serialize;

use crate::score::{both_ends, generation_f1, score_rows, with_end, END_IDS};

/// Abstain thresholds swept for leave-one-out (0: never abstain).
pub const THRESHOLDS: [f32; 7] = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];

pub struct EvalSetup {
    pub experts_dir: PathBuf,
    /// Instances per expert in the library.
    pub s: usize,
    /// Queries per task for routing (unlabeled test rows).
    pub q: usize,
    /// Test rows answered per classification task.
    pub rows: usize,
    /// Test rows answered per generation task.
    pub generation_rows: usize,
    pub batch: usize,
    pub seed: u64,
    /// Index into [`END_IDS`]: the id answers end with when scored.
    pub end: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutedPick {
    pub expert: Option<String>,
    pub share: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskEval {
    pub task: String,
    pub format: String,
    pub rows: usize,
    pub bare: f64,
    pub oracle_lora: f64,
    pub oracle_prompt: f64,
    pub routed: f64,
    pub routed_pick: RoutedPick,
    pub merged_all: f64,
    /// None for generation tasks (no choices to vote on).
    pub ensemble: Option<f64>,
    pub leave_one_out: f64,
    pub leave_one_out_pick: RoutedPick,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThresholdRow {
    pub threshold: f32,
    /// Tasks where leave-one-out routing abstained.
    pub abstained: usize,
    pub mean_fallback_bare: f64,
    pub mean_fallback_merged: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Experts in the library (one LoRA expert per task of the suite).
    pub library_experts: usize,
    /// The id scored answers end with.
    pub end_id: u32,
    pub s: usize,
    pub q: usize,
    pub rows_per_task: usize,
    pub generation_rows: usize,
    pub tasks: Vec<TaskEval>,
    pub means: Vec<(String, f64)>,
    pub routed_correct: usize,
    pub leave_one_out_thresholds: Vec<ThresholdRow>,
    /// Tasks where leave-one-out beat the bare backbone / where it lost to it.
    pub loo_helps: Vec<String>,
    pub loo_hurts: Vec<String>,
    pub seconds: f64,
}

fn lora_id(task: &str) -> String {
    format!("lora-{task}")
}

fn task_of(id: &str) -> &str {
    id.strip_prefix("lora-").unwrap_or(id)
}

/// The answer rows of a task and how they are judged.
struct Answering<'a> {
    task: &'a Task,
    rows: Vec<Instance>,
    generation: bool,
}

/// Per-row outputs of one adapter on one task: scores (classification) or F1 (generation).
#[derive(Clone)]
enum Outcome {
    Scores(Vec<ScoreOutput>),
    F1(Vec<f64>),
}

impl Outcome {
    fn metric(&self, rows: &[Instance]) -> f64 {
        match self {
            Outcome::F1(f) => f.iter().sum::<f64>() / f.len().max(1) as f64,
            Outcome::Scores(outs) => {
                let correct = rows
                    .iter()
                    .zip(outs)
                    .filter(|(r, o)| r.target.as_deref() == Some(r.choices[o.best].as_str()))
                    .count();
                correct as f64 / rows.len().max(1) as f64
            }
        }
    }
}

struct Evaluator<'a> {
    bb: &'a Backbone,
    setup: &'a EvalSetup,
    loras: HashMap<String, Lora>,
    merged: Lora,
    memo: HashMap<(String, String), Outcome>,
}

impl Evaluator<'_> {
    /// Outputs of `adapter` ("bare", "merged", "prompt-<task>" or a LoRA expert id) on `a`.
    fn outcome(&mut self, adapter: &str, a: &Answering<'_>) -> Result<Outcome> {
        let key = (adapter.to_string(), a.task.name().to_string());
        if let Some(o) = self.memo.get(&key) {
            return Ok(o.clone());
        }
        let prompt;
        let adapters = match adapter {
            "bare" => Adapters::none(),
            "merged" => Adapters::lora(&self.merged),
            p if p.starts_with("prompt-") => {
                let dir = self
                    .setup
                    .experts_dir
                    .join("prompt")
                    .join(&p["prompt-".len()..]);
                prompt = SoftPrompt::from_peft_dir(&dir)
                    .with_context(|| format!("prompt expert {}", dir.display()))?;
                Adapters::prompt(&prompt)
            }
            id => Adapters::lora(
                self.loras
                    .get(id)
                    .with_context(|| format!("no LoRA expert {id}"))?,
            ),
        };
        let t = Instant::now();
        let out = if a.generation {
            Outcome::F1(
                generation_f1(self.bb, &a.rows, adapters)?
                    .into_iter()
                    .map(|(_, f1)| f1)
                    .collect(),
            )
        } else {
            Outcome::Scores(
                score_rows(self.bb, &a.rows, adapters, &both_ends(), self.setup.batch)?
                    .iter()
                    .map(|o| with_end(o, self.setup.end))
                    .collect(),
            )
        };
        eprintln!(
            "  {:<28} on {:<22} {:.3}  ({:.0} s)",
            adapter,
            a.task.name(),
            out.metric(&a.rows),
            t.elapsed().as_secs_f64()
        );
        self.memo.insert(key, out.clone());
        Ok(out)
    }
}

fn pick(route: &roe_expert_library::retrieval::RouteResult) -> RoutedPick {
    RoutedPick {
        expert: route.ranked.first().map(|e| e.expert_id.clone()),
        share: route.ranked.first().map(|e| e.share).unwrap_or(0.0),
    }
}

pub fn run(
    bb: &Backbone,
    encoder: Arc<dyn Encoder>,
    tasks: &[Task],
    setup: &EvalSetup,
    only: &[String],
) -> Result<EvalReport> {
    let started = Instant::now();
    let spec = BackboneSpec::smollm2_135m();
    // The library: every task's LoRA expert with S sampled training instances.
    let work = tempfile::tempdir()?;
    let (library, _) = ExpertLibrary::open(work.path(), encoder, LibraryConfig::default())?;
    let mut adapters = Vec::new();
    let mut loras = HashMap::new();
    eprintln!("registering {} LoRA experts (S={})", tasks.len(), setup.s);
    for task in tasks {
        let dir = setup.experts_dir.join("lora").join(task.name());
        let adapter = PeftAdapter::from_dir(&dir)?;
        library.register(
            NewExpert {
                id: lora_id(task.name()),
                name: task.name().to_string(),
                description: task.info.description.clone(),
                backbone: None,
                adapter: adapter.clone(),
                instances: sample(&task.train, setup.s, setup.seed),
            },
            false,
        )?;
        loras.insert(lora_id(task.name()), Lora::from_peft_dir(&dir)?);
        adapters.push(adapter);
    }
    eprintln!("merging all {} LoRA experts (uniform)", adapters.len());
    let merged = merge_adapters(&adapters, None, PromptMergeMode::Average, &spec)?;
    let merged = Lora::from_peft_bytes(&merged.adapter.config_json, &merged.adapter.safetensors)?;
    let mut ev = Evaluator {
        bb,
        setup,
        loras,
        merged,
        memo: HashMap::new(),
    };

    let mut results = Vec::new();
    for task in tasks {
        let name = task.name();
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("{name}");
        let generation = task.info.format == "generation";
        let n = if generation {
            setup.generation_rows
        } else {
            setup.rows
        };
        let a = Answering {
            task,
            rows: task.test.iter().take(n).cloned().collect(),
            generation,
        };
        let queries: Vec<_> = sample(&task.test, setup.q, setup.seed + 1)
            .iter()
            .map(as_query)
            .collect();
        let routed = library.route(&queries, &RouteOptions::default())?;
        let loo = library.route(
            &queries,
            &RouteOptions {
                exclude: vec![lora_id(name)],
                ..RouteOptions::default()
            },
        )?;
        let routed_pick = pick(&routed);
        let loo_pick = pick(&loo);

        let bare = ev.outcome("bare", &a)?;
        let own = ev.outcome(&lora_id(name), &a)?;
        let own_prompt = ev.outcome(&format!("prompt-{name}"), &a)?;
        let merged = ev.outcome("merged", &a)?;
        let routed_out = match &routed_pick.expert {
            Some(id) => ev.outcome(id, &a)?,
            None => bare.clone(),
        };
        let loo_out = match &loo_pick.expert {
            Some(id) => ev.outcome(id, &a)?,
            None => bare.clone(),
        };
        let ensemble = match (&own_prompt, &own) {
            (Outcome::Scores(p), Outcome::Scores(l)) => {
                let votes = p
                    .iter()
                    .zip(l)
                    .map(|(p, l)| {
                        ensemble_vote(&[p.clone(), l.clone()]).map(|v| ScoreOutput {
                            best: v.best,
                            ..p.clone()
                        })
                    })
                    .collect::<roe_backbone::Result<Vec<_>>>()?;
                Some(Outcome::Scores(votes).metric(&a.rows))
            }
            _ => None,
        };
        results.push(TaskEval {
            task: name.to_string(),
            format: task.info.format.clone(),
            rows: a.rows.len(),
            bare: bare.metric(&a.rows),
            oracle_lora: own.metric(&a.rows),
            oracle_prompt: own_prompt.metric(&a.rows),
            routed: routed_out.metric(&a.rows),
            routed_pick,
            merged_all: merged.metric(&a.rows),
            ensemble,
            leave_one_out: loo_out.metric(&a.rows),
            leave_one_out_pick: loo_pick,
        });
    }

    let mean = |f: &dyn Fn(&TaskEval) -> Option<f64>| {
        let v: Vec<f64> = results.iter().filter_map(f).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let means = vec![
        ("bare".to_string(), mean(&|t| Some(t.bare))),
        ("oracle (LoRA)".into(), mean(&|t| Some(t.oracle_lora))),
        ("oracle (prompt)".into(), mean(&|t| Some(t.oracle_prompt))),
        ("RoE-routed (LoRA)".into(), mean(&|t| Some(t.routed))),
        ("merged all (LoRA)".into(), mean(&|t| Some(t.merged_all))),
        ("ensemble prompt+LoRA".into(), mean(&|t| t.ensemble)),
        (
            "leave-one-out routed".into(),
            mean(&|t| Some(t.leave_one_out)),
        ),
    ];
    let routed_correct = results
        .iter()
        .filter(|t| t.routed_pick.expert.as_deref().map(task_of) == Some(t.task.as_str()))
        .count();
    let leave_one_out_thresholds = THRESHOLDS
        .iter()
        .map(|&th| {
            let abstains = |t: &TaskEval| t.leave_one_out_pick.share < th;
            let with = |fallback: &dyn Fn(&TaskEval) -> f64| {
                results
                    .iter()
                    .map(|t| {
                        if abstains(t) {
                            fallback(t)
                        } else {
                            t.leave_one_out
                        }
                    })
                    .sum::<f64>()
                    / results.len().max(1) as f64
            };
            ThresholdRow {
                threshold: th,
                abstained: results.iter().filter(|t| abstains(t)).count(),
                mean_fallback_bare: with(&|t| t.bare),
                mean_fallback_merged: with(&|t| t.merged_all),
            }
        })
        .collect();
    let loo_helps = results
        .iter()
        .filter(|t| t.leave_one_out > t.bare + 1e-9)
        .map(|t| t.task.clone())
        .collect();
    let loo_hurts = results
        .iter()
        .filter(|t| t.leave_one_out + 1e-9 < t.bare)
        .map(|t| t.task.clone())
        .collect();
    Ok(EvalReport {
        library_experts: tasks.len(),
        end_id: END_IDS[setup.end],
        s: setup.s,
        q: setup.q,
        rows_per_task: setup.rows,
        generation_rows: setup.generation_rows,
        tasks: results,
        means,
        routed_correct,
        leave_one_out_thresholds,
        loo_helps,
        loo_hurts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn short(id: &Option<String>) -> String {
    id.as_deref().map(task_of).unwrap_or("(none)").to_string()
}

pub fn markdown(r: &EvalReport, chart: Option<&Path>) -> String {
    let mut md = format!(
        "# Evaluation: Retrieval of Experts on the task suite (`roe eval`)\n\n\
         SmolLM2-135M-Instruct (Q4_1) with the suite's PEFT experts; answers scored ending \
         with id {}. First {} test rows per \
         classification task (accuracy), {} rows of generation tasks (token F1). Library: the \
         {} LoRA experts with S={} training instances each; routing: Q={} unlabeled test \
         queries, default (hybrid) strategy. Leave-one-out removes the task's own expert before \
         routing. Merged = uniform average of all LoRA deltas (one model for every task).\n\n",
        r.end_id, r.rows_per_task, r.generation_rows, r.library_experts, r.s, r.q
    );
    if let Some(c) = chart {
        md.push_str(&format!(
            "![mean accuracy per configuration]({})\n\n",
            c.file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        ));
    }
    md.push_str("| task | bare | oracle LoRA | oracle prompt | routed (expert) | merged all | ensemble | leave-one-out (expert, share) |\n|---|---|---|---|---|---|---|---|\n");
    for t in &r.tasks {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} ({}) | {:.3} | {} | {:.3} ({}, {:.2}) |\n",
            t.task,
            t.bare,
            t.oracle_lora,
            t.oracle_prompt,
            t.routed,
            short(&t.routed_pick.expert),
            t.merged_all,
            t.ensemble
                .map(|e| format!("{e:.3}"))
                .unwrap_or_else(|| "-".into()),
            t.leave_one_out,
            short(&t.leave_one_out_pick.expert),
            t.leave_one_out_pick.share
        ));
    }
    md.push_str("\n| configuration | mean |\n|---|---|\n");
    for (name, v) in &r.means {
        md.push_str(&format!("| {name} | {v:.3} |\n"));
    }
    md.push_str(&format!(
        "\nRouted to the task's own expert: {}/{} tasks. Ensemble mean is over classification tasks only.\n",
        r.routed_correct,
        r.tasks.len()
    ));
    md.push_str("\n## Leave-one-out: the abstain threshold\n\nWhen the winner's share is below the threshold, roe answers with the fallback instead.\n\n| threshold | tasks abstained | mean, fallback = bare | mean, fallback = merged |\n|---|---|---|---|\n");
    for t in &r.leave_one_out_thresholds {
        md.push_str(&format!(
            "| {:.1} | {} | {:.3} | {:.3} |\n",
            t.threshold, t.abstained, t.mean_fallback_bare, t.mean_fallback_merged
        ));
    }
    md.push_str(&format!(
        "\nLeave-one-out routing beats the bare backbone on: {}.\nIt loses to the bare backbone on: {}.\n\nTotal time {:.0} s.\n",
        if r.loo_helps.is_empty() { "none".to_string() } else { r.loo_helps.join(", ") },
        if r.loo_hurts.is_empty() { "none".to_string() } else { r.loo_hurts.join(", ") },
        r.seconds
    ));
    md
}

/// `roe eval` arguments.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    #[arg(long, default_value_t = 100)]
    s: usize,
    #[arg(long, default_value_t = 32)]
    q: usize,
    /// Test rows answered per classification task.
    #[arg(long, default_value_t = 40)]
    rows: usize,
    /// Test rows answered per generation task.
    #[arg(long, default_value_t = 20)]
    generation_rows: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The id scored answers end with: 1 (`<|im_start|>`, what the suite's experts were
    /// trained to emit) or 2 (EOS, the canonical rendering).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    end_id: u32,
    /// Only these tasks (comma-separated); the library still holds them all.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// Cache of embedded rows (speeds up reruns; never affects results).
    #[arg(long, default_value = "bench/cache")]
    cache_dir: PathBuf,
    /// Where the JSON goes; the Markdown table and the PNG chart are written beside it.
    #[arg(long, default_value = "bench/results/eval.json")]
    json: PathBuf,
}

/// Runs `roe eval`: prints the table and writes JSON, Markdown and PNG.
pub fn cmd(models_dir: &Path, encoder: Option<&Path>, a: EvalArgs) -> Result<()> {
    let bb = roe_cli::models::load_backbone(models_dir, a.backbone.as_deref())?;
    let encoder = crate::caching_encoder::load_cached_encoder(models_dir, encoder, &a.cache_dir)?;
    let all = roe_task_suite::load_suite(&a.tasks_dir)
        .with_context(|| format!("loading {}", a.tasks_dir.display()))?;
    let setup = EvalSetup {
        experts_dir: a.experts.clone(),
        s: a.s,
        q: a.q,
        rows: a.rows,
        generation_rows: a.generation_rows,
        batch: a.batch,
        seed: a.seed,
        end: END_IDS
            .iter()
            .position(|&e| e == a.end_id)
            .context("--end-id: 1 or 2")?,
    };
    let report = run(&bb, encoder, &all, &setup, &a.tasks)?;
    // The chart goes beside the JSON: <dir>/<name>.png.
    let png = crate::cli::beside(&a.json, "png");
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let chart = match crate::eval_chart::draw(&report, &png) {
        Ok(()) => Some(png.as_path()),
        Err(e) => {
            tracing::warn!(error = %e, "chart not drawn");
            None
        }
    };
    let md = markdown(&report, chart);
    println!("{md}");
    crate::cli::save_report(&a.json, &report, &md)
}
