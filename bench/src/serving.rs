//! `roe bench serving`: the inference service under concurrent Score requests through gRPC on
//! loopback — 16 concurrent requests on 16 different experts against the same 16 requests on
//! one expert and against one request at a time — and expert cold-load latency.
//!
//! The three scenarios score exactly the same inputs and choices; only which expert each
//! request names differs, so the ratios isolate the cost of mixing experts in one batch.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use roe_backbone::Backbone;
use roe_expert_library::expert::{ExpertKind, Instance};
use roe_expert_library::library::{ExpertLibrary, NewExpert};
use roe_expert_library::PeftAdapter;
use roe_task_suite::Task;
use serde::Serialize;

use super::percentile;
use roe_services::proto::{self, inference_client::InferenceClient};

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// "score" or "generate".
    pub op: String,
    pub kind: String,
    pub scenario: String,
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// `score_batch` calls the scheduler made per round (1 = every request in one batch).
    pub batches_per_round: f64,
    /// Generate: tokens streamed per second (all requests together).
    pub tokens_per_s: Option<f64>,
    /// Seconds per round the service spent inside the backbone's `score_batch` (the rest of
    /// a round's wall time is gRPC, scheduling and waiting).
    pub backbone_s_per_round: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColdLoad {
    pub kind: String,
    pub experts: usize,
    /// Median over experts of (first request − the same request again).
    pub median_load_ms: f64,
    pub max_load_ms: f64,
    pub median_cold_request_ms: f64,
    pub median_warm_request_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServingReport {
    pub concurrency: usize,
    pub rounds: usize,
    pub generate_tokens: u32,
    pub scenarios: Vec<ScenarioResult>,
    /// Per kind: 16 experts / one expert (goal ≥ 0.9) and 16 experts / one at a time (goal ≥ 3).
    pub ratios: Vec<serde_json::Value>,
    pub cold_load: Vec<ColdLoad>,
}

pub struct ServingSetup<'a> {
    pub experts_dir: &'a Path,
    pub tasks: &'a [Task],
    pub concurrency: usize,
    pub rounds: usize,
    /// max_new_tokens of the Generate scenarios.
    pub generate_tokens: u32,
}

/// What the scenarios' requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Score every choice of the row.
    Score,
    /// Generate greedily after the row's input, streaming up to this many tokens.
    Generate(u32),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Score => "score",
            Op::Generate(_) => "generate",
        }
    }
}

pub(super) fn expert_id(kind: ExpertKind, task: &str) -> String {
    format!("{}-{task}", kind.as_str())
}

/// One request; returns its latency (ms) and the tokens it streamed (Generate).
async fn request(
    client: &mut InferenceClient<tonic::transport::Channel>,
    expert: &str,
    row: &Instance,
    op: Op,
) -> Result<(f64, usize)> {
    let t = Instant::now();
    let tokens = match op {
        Op::Score => {
            client
                .score(proto::ScoreRequest {
                    min_library_seq: Default::default(),
                    expert_id: expert.to_string(),
                    input: row.input.clone(),
                    choices: row.choices.clone(),
                    truncate: false,
                })
                .await
                .with_context(|| format!("Score with {expert}"))?;
            0
        }
        Op::Generate(max_new_tokens) => {
            let mut stream = client
                .generate(proto::GenerateRequest {
                    expert_id: expert.to_string(),
                    input: row.input.clone(),
                    max_new_tokens,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("Generate with {expert}"))?
                .into_inner();
            let mut n = 0;
            while stream.message().await?.is_some() {
                n += 1;
            }
            n
        }
    };
    Ok((t.elapsed().as_secs_f64() * 1000.0, tokens))
}

async fn score(
    client: &mut InferenceClient<tonic::transport::Channel>,
    expert: &str,
    row: &Instance,
) -> Result<f64> {
    Ok(request(client, expert, row, Op::Score).await?.0)
}

/// Opens one connection per job.
async fn connect_all(
    url: &str,
    n: usize,
) -> Result<Vec<InferenceClient<tonic::transport::Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(InferenceClient::connect(url.to_string()).await?);
    }
    Ok(clients)
}

/// One round of the requests `(expert, row)`: all at once on separate connections, or one
/// after another. Returns the wall time (s), each request's latency (ms) and the tokens
/// streamed.
async fn round(
    clients: &mut [InferenceClient<tonic::transport::Channel>],
    jobs: &[(String, Instance)],
    concurrent: bool,
    op: Op,
) -> Result<(f64, Vec<f64>, usize)> {
    let t = Instant::now();
    let mut times = Vec::new();
    let mut tokens = 0;
    if concurrent {
        let mut handles = Vec::new();
        for ((expert, row), client) in jobs.iter().zip(clients.iter()) {
            let (expert, row, mut client) = (expert.clone(), row.clone(), client.clone());
            handles.push(tokio::spawn(async move {
                request(&mut client, &expert, &row, op).await
            }));
        }
        for h in handles {
            let (ms, n) = h.await??;
            times.push(ms);
            tokens += n;
        }
    } else {
        for ((expert, row), client) in jobs.iter().zip(clients.iter_mut()) {
            let (ms, n) = request(client, expert, row, op).await?;
            times.push(ms);
            tokens += n;
        }
    }
    Ok((t.elapsed().as_secs_f64(), times, tokens))
}

pub(super) fn register_all(library: &ExpertLibrary, setup: &ServingSetup<'_>) -> Result<()> {
    for task in setup.tasks {
        for kind in [ExpertKind::Prompt, ExpertKind::Lora] {
            let dir = setup.experts_dir.join(kind.as_str()).join(task.name());
            if !dir.is_dir() {
                continue;
            }
            library.register(
                NewExpert {
                    id: expert_id(kind, task.name()),
                    name: task.name().to_string(),
                    description: task.info.description.clone(),
                    backbone: None,
                    adapter: PeftAdapter::from_dir(&dir)?,
                    // Routing is not measured here: a few instances suffice.
                    instances: task.train.iter().take(2).cloned().collect(),
                },
                false,
            )?;
        }
    }
    Ok(())
}

pub async fn run(
    library: Arc<ExpertLibrary>,
    backbone: Arc<Backbone>,
    setup: &ServingSetup<'_>,
) -> Result<ServingReport> {
    let lib = library.clone();
    {
        let setup_tasks: Vec<Task> = setup.tasks.to_vec();
        let experts_dir = setup.experts_dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            register_all(
                &lib,
                &ServingSetup {
                    experts_dir: &experts_dir,
                    tasks: &setup_tasks,
                    concurrency: 0,
                    rounds: 0,
                    generate_tokens: 0,
                },
            )
        })
        .await??;
    }
    let server = super::BenchServer::with_inference(library, backbone).await?;
    let url = server.url.clone();
    let mut client = InferenceClient::connect(url.clone()).await?;

    // Cold load: the first request of every expert loads it (the service times the load:
    // library read, parse, checks); the same request again is warm.
    let stats = server
        .inference
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the bench server runs no inference service"))?;
    let load_micros = || stats.stats().expert_load_micros.load(Ordering::Relaxed);
    let score_batches = || {
        stats.stats().score_batches.load(Ordering::Relaxed)
            + stats.stats().generate_batches.load(Ordering::Relaxed)
    };
    let score_micros = || stats.stats().score_batch_micros.load(Ordering::Relaxed);
    let mut cold_load = Vec::new();
    for kind in [ExpertKind::Prompt, ExpertKind::Lora] {
        let (mut loads, mut colds, mut warms) = (Vec::new(), Vec::new(), Vec::new());
        // Classification tasks only: Score needs choices.
        for task in setup.tasks.iter().filter(|t| t.info.format != "generation") {
            let Some(row) = task.test.first() else {
                continue;
            };
            let id = expert_id(kind, task.name());
            let before = load_micros();
            let cold = score(&mut client, &id, row).await?;
            loads.push((load_micros() - before) as f64 / 1000.0);
            let warm = score(&mut client, &id, row).await?;
            colds.push(cold);
            warms.push(warm);
        }
        for v in [&mut loads, &mut colds, &mut warms] {
            v.sort_by(f64::total_cmp);
        }
        cold_load.push(ColdLoad {
            kind: kind.as_str().into(),
            experts: loads.len(),
            median_load_ms: percentile(&loads, 0.5),
            max_load_ms: loads.last().copied().unwrap_or(f64::NAN),
            median_cold_request_ms: percentile(&colds, 0.5),
            median_warm_request_ms: percentile(&warms, 0.5),
        });
    }

    // The same 16 inputs (one test row of each of 16 tasks) in every scenario.
    let tasks: Vec<&Task> = setup
        .tasks
        .iter()
        .filter(|t| t.info.format != "generation" && !t.test.is_empty())
        .take(setup.concurrency)
        .collect();
    let rows: Vec<Instance> = tasks.iter().map(|t| t.test[0].clone()).collect();
    let mut scenarios_out = Vec::new();
    let mut ratios = Vec::new();
    let ops = [Op::Score, Op::Generate(setup.generate_tokens)];
    for (op, kind) in ops
        .into_iter()
        .flat_map(|op| [ExpertKind::Prompt, ExpertKind::Lora].map(|k| (op, k)))
    {
        let own: Vec<(String, Instance)> = tasks
            .iter()
            .zip(&rows)
            .map(|(t, r)| (expert_id(kind, t.name()), r.clone()))
            .collect();
        let one: Vec<(String, Instance)> = rows
            .iter()
            .map(|r| (expert_id(kind, tasks[0].name()), r.clone()))
            .collect();
        let scenarios = [
            (
                format!("{} concurrent, {} experts", own.len(), own.len()),
                &own,
                true,
            ),
            (format!("{} concurrent, one expert", one.len()), &one, true),
            (format!("one at a time, {} experts", own.len()), &own, false),
        ];
        let mut clients = Vec::new();
        for (_, jobs, _) in &scenarios {
            clients.push(connect_all(&url, jobs.len()).await?);
        }
        // Rounds interleave the scenarios and rotate their order (A B C, B C A, C A B, ...), so
        // that the machine's speed, which drifts by 10-20% over minutes on this shared host,
        // weighs on each alike, and no scenario always follows the same one.
        let mut wall = [0.0f64; 3];
        let mut lat: [Vec<f64>; 3] = Default::default();
        let mut batches = [0u64; 3];
        let mut backbone_micros = [0u64; 3];
        let mut tokens = [0usize; 3];
        // Per timed round: [16 experts / one expert, 16 experts / one at a time] in requests/s.
        let mut round_ratios: Vec<[f64; 2]> = Vec::new();
        for r in 0..=setup.rounds {
            let mut round_wall = [0.0f64; 3];
            for step in 0..scenarios.len() {
                let i = (r + step) % scenarios.len();
                let (_, jobs, concurrent) = &scenarios[i];
                let (before, micros_before) = (score_batches(), score_micros());
                let (w, times, n) = round(&mut clients[i], jobs, *concurrent, op).await?;
                round_wall[i] = w;
                if r > 0 {
                    wall[i] += w;
                    lat[i].extend(times);
                    tokens[i] += n;
                    batches[i] += score_batches() - before;
                    backbone_micros[i] += score_micros() - micros_before;
                }
            }
            if r > 0 {
                // Same number of requests in each scenario: the rate ratio is the inverse
                // wall-time ratio.
                round_ratios.push([
                    round_wall[1] / round_wall[0].max(1e-9),
                    round_wall[2] / round_wall[0].max(1e-9),
                ]);
            }
        }
        let mut rates = Vec::new();
        for (i, (name, _, _)) in scenarios.iter().enumerate() {
            let lat = &mut lat[i];
            lat.sort_by(f64::total_cmp);
            let r = ScenarioResult {
                op: op.name().into(),
                kind: kind.as_str().into(),
                scenario: name.clone(),
                requests: lat.len(),
                seconds: wall[i],
                requests_per_s: lat.len() as f64 / wall[i].max(1e-9),
                p50_ms: percentile(lat, 0.5),
                p99_ms: percentile(lat, 0.99),
                batches_per_round: batches[i] as f64 / setup.rounds.max(1) as f64,
                backbone_s_per_round: backbone_micros[i] as f64 / 1e6 / setup.rounds.max(1) as f64,
                tokens_per_s: matches!(op, Op::Generate(_))
                    .then(|| tokens[i] as f64 / wall[i].max(1e-9)),
            };
            eprintln!(
                "{} {} / {}: {:.2} req/s, p50 {:.0} ms, {:.1} batches and {:.2} s in the backbone per round",
                r.op,
                r.kind,
                r.scenario,
                r.requests_per_s,
                r.p50_ms,
                r.batches_per_round,
                r.backbone_s_per_round
            );
            rates.push(r.requests_per_s);
            scenarios_out.push(r);
        }
        let per_round = |k: usize| {
            let mut v: Vec<f64> = round_ratios.iter().map(|r| r[k]).collect();
            v.sort_by(f64::total_cmp);
            serde_json::json!({
                "median": percentile(&v, 0.5),
                "min": v.first().copied().unwrap_or(f64::NAN),
                "max": v.last().copied().unwrap_or(f64::NAN),
            })
        };
        ratios.push(serde_json::json!({
            "op": op.name(),
            "kind": kind.as_str(),
            "mixed_vs_one_expert": rates[0] / rates[1],
            "mixed_vs_one_at_a_time": rates[0] / rates[2],
            "mixed_vs_one_expert_per_round": per_round(0),
            "mixed_vs_one_at_a_time_per_round": per_round(1),
        }));
    }
    server.stop().await;
    Ok(ServingReport {
        concurrency: rows.len(),
        rounds: setup.rounds,
        generate_tokens: setup.generate_tokens,
        scenarios: scenarios_out,
        ratios,
        cold_load,
    })
}

pub fn markdown(r: &ServingReport) -> String {
    let mut md = format!(
        "# Inference serving (`roe bench serving`)\n\nRequests through gRPC on loopback: Score \
         (one test row each of {n} classification tasks, all choices scored) and Generate (the \
         same inputs, greedy, at most {tokens} new tokens, streamed), {rounds} rounds after a \
         warm-up round, the scenarios' rounds interleaved in rotating order (the host's speed \
         drifts). The scenarios send the same inputs; only the experts differ.\n\n\
         | op | kind | scenario | requests/s | tokens/s | p50 ms | p99 ms | batches per round | s in the backbone per round |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        n = r.concurrency,
        rounds = r.rounds,
        tokens = r.generate_tokens,
    );
    for s in &r.scenarios {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {} |\n",
            s.op,
            s.kind,
            s.scenario,
            s.requests_per_s,
            s.tokens_per_s
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
            s.p50_ms,
            s.p99_ms,
            s.batches_per_round,
            if s.op == "score" {
                format!("{:.2}", s.backbone_s_per_round)
            } else {
                "-".into()
            }
        ));
    }
    md.push_str(
        "\nThroughput ratios: over all rounds, and the median (min–max) of the rounds' own \
         ratios (each round runs the scenarios back to back, so drift weighs less on it).\n\n\
         | op | kind | 16 experts / one expert (goal ≥ 0.9) | per round | 16 experts / one at a time (goal ≥ 3) | per round |\n\
         |---|---|---|---|---|---|\n",
    );
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let spread = |v: &serde_json::Value| {
        format!(
            "{:.2} ({:.2}–{:.2})",
            num(&v["median"]),
            num(&v["min"]),
            num(&v["max"])
        )
    };
    for x in &r.ratios {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.2} | {} |\n",
            x["op"].as_str().unwrap_or(""),
            x["kind"].as_str().unwrap_or(""),
            num(&x["mixed_vs_one_expert"]),
            spread(&x["mixed_vs_one_expert_per_round"]),
            num(&x["mixed_vs_one_at_a_time"]),
            spread(&x["mixed_vs_one_at_a_time_per_round"]),
        ));
    }
    md.push_str("\n## Expert cold load\n\nLoad = the time the inference service spends on a cache miss (weights read from the sled library, parsed, checked against the backbone), timed inside the service on the first Score request of each expert; the same request again is warm.\n\n| kind | experts | median load ms | max load ms | median cold request ms | median warm request ms |\n|---|---|---|---|---|---|\n");
    for c in &r.cold_load {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} |\n",
            c.kind,
            c.experts,
            c.median_load_ms,
            c.max_load_ms,
            c.median_cold_request_ms,
            c.median_warm_request_ms
        ));
    }
    md
}
