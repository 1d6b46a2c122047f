//! Routing accuracy on a task library: S instances per expert from each task's train split,
//! Q queries from its test split, several seeds; the routed expert must be the task's own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use roe_expert_library::embedding::Encoder;
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, NewExpert};
use roe_expert_library::retrieval::{Query, RouteOptions};
use roe_expert_library::PeftAdapter;
use roe_task_suite::{as_labeled_query, sample, Task};
use serde::Serialize;

/// One task of the benchmark and the suite it belongs to.
pub struct SuiteTask {
    pub suite: String,
    pub task: Task,
    /// The task's trained expert, if it has one; otherwise a routing-only stand-in is used.
    pub adapter: Option<PeftAdapter>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AbstainCurve {
    pub seen_share_mean: f64,
    pub unseen_share_mean: f64,
    /// (threshold, fraction of correctly routed seen tasks that would abstain, fraction of
    /// unseen tasks that would abstain).
    pub points: Vec<(f32, f64, f64)>,
}

fn abstain_curve(seen: &[f32], unseen: &[f32]) -> AbstainCurve {
    let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    let below =
        |v: &[f32], t: f32| v.iter().filter(|x| **x < t).count() as f64 / v.len().max(1) as f64;
    AbstainCurve {
        seen_share_mean: mean(seen),
        unseen_share_mean: mean(unseen),
        points: [0.05f32, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
            .iter()
            .map(|&t| (t, below(seen, t), below(unseen, t)))
            .collect(),
    }
}

/// One routing configuration to measure.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub options: RouteOptions,
    /// Queries carry their targets (the client has labeled examples).
    pub labeled: bool,
}

impl Variant {
    pub fn new(name: &str, options: RouteOptions) -> Self {
        Self {
            name: name.to_string(),
            options,
            labeled: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AccuracySetup {
    pub s: usize,
    pub q: usize,
    pub seeds: Vec<u64>,
    /// Force HNSW (threshold 0) so that HNSW vs exact agreement is measured on this library.
    pub force_hnsw: bool,
    /// The index engine of the graph when HNSW is on.
    pub engine: roe_expert_library::engine::IndexEngine,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub name: String,
    pub options: RouteOptions,
    pub labeled: bool,
    pub per_task: BTreeMap<String, f64>,
    pub per_suite: BTreeMap<String, f64>,
    pub overall: f64,
    pub confusions: Vec<String>,
    /// Fraction of routed experts that HNSW and exact search agree on.
    pub hnsw_exact_agreement: f64,
    /// Fraction of queries whose top-1 instance HNSW and exact search agree on.
    pub hnsw_exact_top1_agreement: f64,
    /// Winner's share when the task's own expert is in the library (correctly routed only)
    /// and when it is left out (an unseen task), and how thresholds split the two.
    pub abstain: AbstainCurve,
}

/// Seeds a task's sample: the same task gets the same rows for a seed in every run.
fn task_seed(seed: u64, name: &str, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ salt;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h ^ seed.wrapping_mul(0x9E3779B97F4A7C15)
}

/// A valid all-zero soft prompt: routing needs *an* adapter per expert, and the routing-suite
/// tasks have no trained one. Routing never reads adapter weights.
pub fn routing_only_adapter() -> PeftAdapter {
    let zeros = vec![0u8; 20 * 576 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![20, 576], &zeros)
        .expect("static shape");
    let bytes = safetensors::serialize([("prompt_embeddings", view)], None)
        .expect("serialising a static tensor");
    PeftAdapter {
        config_json: r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":20,"token_dim":576}"#
            .to_string(),
        safetensors: bytes,
    }
}

pub fn run(
    tasks: &[SuiteTask],
    encoder: Arc<dyn Encoder>,
    setup: &AccuracySetup,
    variants: &[Variant],
    work_dir: &Path,
) -> Result<Vec<VariantReport>> {
    // (variant, task) -> routed winners over seeds
    let mut winners: Vec<BTreeMap<String, Vec<String>>> = vec![BTreeMap::new(); variants.len()];
    let mut agree = vec![(0usize, 0usize); variants.len()];
    let mut agree_top1 = vec![(0usize, 0usize); variants.len()];
    let mut shares: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); variants.len()];
    let bar = ProgressBar::new((setup.seeds.len() * tasks.len() * 2) as u64).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &seed in &setup.seeds {
        let dir = work_dir.join(format!("library-seed{seed}"));
        let _ = std::fs::remove_dir_all(&dir);
        let config = LibraryConfig {
            index: IndexConfig {
                hnsw_threshold: if setup.force_hnsw {
                    0
                } else {
                    IndexConfig::default().hnsw_threshold
                },
                engine: setup.engine,
                ..IndexConfig::default()
            },
            ..LibraryConfig::default()
        };
        let (library, _) = ExpertLibrary::open(&dir, encoder.clone(), config)?;
        bar.set_message(format!("seed {seed} S"));
        for t in tasks {
            let instances = sample(&t.task.train, setup.s, task_seed(seed, t.task.name(), 1));
            library
                .register(
                    NewExpert {
                        id: t.task.name().to_string(),
                        name: t.task.name().to_string(),
                        description: t.task.info.description.clone(),
                        backbone: None,
                        adapter: t.adapter.clone().unwrap_or_else(routing_only_adapter),
                        instances,
                    },
                    false,
                )
                .with_context(|| format!("registering {}", t.task.name()))?;
            bar.inc(1);
        }
        bar.set_message(format!("seed {seed} Q"));
        for t in tasks {
            let labeled: Vec<Query> =
                sample(&t.task.test, setup.q, task_seed(seed, t.task.name(), 2))
                    .iter()
                    .map(as_labeled_query)
                    .collect();
            let unlabeled: Vec<Query> = labeled
                .iter()
                .map(|q| Query {
                    target: None,
                    ..q.clone()
                })
                .collect();
            let mut vectors_by_format = BTreeMap::new();
            for (vi, variant) in variants.iter().enumerate() {
                let opts = &variant.options;
                let queries = if variant.labeled {
                    &labeled
                } else {
                    &unlabeled
                };
                let vectors = match vectors_by_format.get(&opts.text_format.as_str()) {
                    Some(v) => v,
                    None => {
                        let v = library.embed_queries(queries, opts.text_format)?;
                        vectors_by_format
                            .entry(opts.text_format.as_str())
                            .or_insert(v)
                    }
                };
                let routed = library.route_embedded(queries, vectors, opts)?;
                let winner = routed
                    .ranked
                    .first()
                    .map(|w| w.expert_id.clone())
                    .unwrap_or_default();
                if setup.force_hnsw {
                    let exact = library.route_embedded(
                        queries,
                        vectors,
                        &RouteOptions {
                            exact: true,
                            ..opts.clone()
                        },
                    )?;
                    let exact_winner = exact
                        .ranked
                        .first()
                        .map(|w| w.expert_id.as_str())
                        .unwrap_or("");
                    agree[vi].0 += (exact_winner == winner) as usize;
                    agree[vi].1 += 1;
                    for (a, b) in routed.evidence.iter().zip(&exact.evidence) {
                        agree_top1[vi].0 += (a.first().map(|h| h.point_id)
                            == b.first().map(|h| h.point_id))
                            as usize;
                        agree_top1[vi].1 += 1;
                    }
                }
                if let Some(w) = routed
                    .ranked
                    .first()
                    .filter(|w| w.expert_id == t.task.name())
                {
                    shares[vi].0.push(w.share);
                }
                let unseen = RouteOptions {
                    exclude: vec![t.task.name().to_string()],
                    ..opts.clone()
                };
                if let Some(w) = library
                    .route_embedded(queries, vectors, &unseen)?
                    .ranked
                    .first()
                {
                    shares[vi].1.push(w.share);
                }
                winners[vi]
                    .entry(t.task.name().to_string())
                    .or_default()
                    .push(winner);
            }
            bar.inc(1);
        }
        drop(library);
        let _ = std::fs::remove_dir_all(&dir);
    }
    bar.finish_and_clear();

    let suite_of: BTreeMap<&str, &str> = tasks
        .iter()
        .map(|t| (t.task.name(), t.suite.as_str()))
        .collect();
    Ok(variants
        .iter()
        .zip(winners)
        .zip(agree.iter().zip(&agree_top1))
        .zip(&shares)
        .map(
            |(((variant, per_task_winners), (ag, ag1)), (seen, unseen))| {
                let mut per_task = BTreeMap::new();
                let mut confusion_counts: BTreeMap<String, usize> = BTreeMap::new();
                for (task, ws) in &per_task_winners {
                    let right = ws.iter().filter(|w| *w == task).count();
                    per_task.insert(task.clone(), right as f64 / ws.len() as f64);
                    for w in ws.iter().filter(|w| *w != task) {
                        *confusion_counts
                            .entry(format!("{task} -> {w}"))
                            .or_insert(0) += 1;
                    }
                }
                let mut per_suite: BTreeMap<String, (f64, usize)> = BTreeMap::new();
                for (task, acc) in &per_task {
                    let e = per_suite
                        .entry(suite_of[task.as_str()].to_string())
                        .or_insert((0.0, 0));
                    e.0 += acc;
                    e.1 += 1;
                }
                let overall = per_task.values().sum::<f64>() / per_task.len().max(1) as f64;
                let mut confusions: Vec<(String, usize)> = confusion_counts.into_iter().collect();
                confusions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                VariantReport {
                    name: variant.name.clone(),
                    options: variant.options.clone(),
                    labeled: variant.labeled,
                    per_task,
                    per_suite: per_suite
                        .into_iter()
                        .map(|(k, (s, n))| (k, s / n as f64))
                        .collect(),
                    overall,
                    confusions: confusions
                        .into_iter()
                        .map(|(c, n)| format!("{c} x{n}"))
                        .collect(),
                    hnsw_exact_agreement: if ag.1 > 0 {
                        ag.0 as f64 / ag.1 as f64
                    } else {
                        f64::NAN
                    },
                    hnsw_exact_top1_agreement: if ag1.1 > 0 {
                        ag1.0 as f64 / ag1.1 as f64
                    } else {
                        f64::NAN
                    },
                    abstain: abstain_curve(seen, unseen),
                }
            },
        )
        .collect())
}
