//! `roe bench arrivals`: Generate requests arriving one after another while earlier ones are
//! still generating, with continuous batching (a request joins the running batch between two
//! of its steps) against without it (a request only shares a batch with those that arrive
//! together; later ones start batches of their own, running beside it).
//!
//! Request i (of n) is sent `i * gap` after the round starts. Even requests use the LoRA
//! expert of a classification task on one of its test inputs (short answers: the experts were
//! trained to answer in a few tokens), odd ones the bare backbone on a generation task's
//! question (long answers, up to `max_new_tokens`), so generations overlap and differ in
//! length as they do in service. Both modes send exactly
//! the same requests; greedy decoding makes their answers identical, which the bench checks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roe_backbone::Backbone;
use roe_expert_library::expert::ExpertKind;
use roe_expert_library::library::ExpertLibrary;
use roe_task_suite::Task;
use serde::Serialize;

use super::percentile;
use super::serving::{expert_id, register_all, ServingSetup};
use roe_services::proto::{self, inference_client::InferenceClient};

pub struct ArrivalsSetup<'a> {
    pub experts_dir: &'a std::path::Path,
    pub tasks: &'a [Task],
    pub requests: usize,
    /// Time between two arrivals.
    pub gap: Duration,
    pub max_new_tokens: u32,
    /// Timed rounds per mode (after one warm-up round of each).
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// "join running batches" or "own batch per arrival".
    pub mode: String,
    pub rounds: usize,
    pub requests_per_round: usize,
    /// Tokens streamed per round (all requests).
    pub tokens_per_round: f64,
    /// First arrival to last answer, mean over rounds.
    pub round_s: f64,
    pub tokens_per_s: f64,
    pub p50_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// Request sent to its first token.
    pub p50_first_token_ms: f64,
    pub p99_first_token_ms: f64,
    pub batches_per_round: f64,
    pub joined_per_round: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArrivalsReport {
    pub requests: usize,
    pub gap_ms: f64,
    pub max_new_tokens: u32,
    pub modes: Vec<ModeResult>,
    /// Tokens/s joining / not joining, over all rounds.
    pub join_vs_own_batches: f64,
    /// The same ratio per round (rounds alternate the modes' order): median, min, max.
    pub per_round: [f64; 3],
}

/// One request's latency, time to first token and streamed token ids.
struct Answer {
    latency_ms: f64,
    first_token_ms: f64,
    ids: Vec<u32>,
}

async fn generate(
    mut client: InferenceClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
) -> Result<Answer> {
    let t = Instant::now();
    let mut stream = client.generate(req).await.context("Generate")?.into_inner();
    let mut ids = Vec::new();
    let mut first = None;
    while let Some(m) = stream.message().await? {
        first.get_or_insert_with(|| t.elapsed());
        ids.push(m.token_id);
    }
    Ok(Answer {
        latency_ms: t.elapsed().as_secs_f64() * 1000.0,
        first_token_ms: first.unwrap_or_default().as_secs_f64() * 1000.0,
        ids,
    })
}

/// One round: the requests arrive `gap` apart. Returns the round's wall time (s) and the
/// answers in request order.
async fn round(
    clients: &[InferenceClient<tonic::transport::Channel>],
    reqs: &[proto::GenerateRequest],
    gap: Duration,
) -> Result<(f64, Vec<Answer>)> {
    let start = tokio::time::Instant::now();
    let mut handles = Vec::new();
    for (i, (req, client)) in reqs.iter().zip(clients).enumerate() {
        tokio::time::sleep_until(start + gap * i as u32).await;
        handles.push(tokio::spawn(generate(client.clone(), req.clone())));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await??);
    }
    Ok((start.elapsed().as_secs_f64(), answers))
}

pub async fn run(
    library: Arc<ExpertLibrary>,
    backbone: Arc<Backbone>,
    setup: &ArrivalsSetup<'_>,
) -> Result<ArrivalsReport> {
    let tasks: Vec<Task> = setup
        .tasks
        .iter()
        .filter(|t| t.info.format != "generation" && !t.test.is_empty())
        .take(setup.requests)
        .cloned()
        .collect();
    if tasks.len() < setup.requests {
        bail!(
            "{} requests need as many classification tasks; the suite has {}",
            setup.requests,
            tasks.len()
        );
    }
    {
        let lib = library.clone();
        let experts_dir = setup.experts_dir.to_path_buf();
        let tasks = tasks.clone();
        tokio::task::spawn_blocking(move || {
            register_all(
                &lib,
                &ServingSetup {
                    experts_dir: &experts_dir,
                    tasks: &tasks,
                    concurrency: 0,
                    rounds: 0,
                    generate_tokens: 0,
                },
            )
        })
        .await??;
    }
    // Long answers: the bare backbone on the generation tasks' questions.
    let questions: Vec<&str> = setup
        .tasks
        .iter()
        .filter(|t| t.info.format == "generation")
        .flat_map(|t| t.test.iter().map(|r| r.input.as_str()))
        .collect();
    if questions.len() < setup.requests / 2 {
        bail!(
            "{} requests need {} generation-task rows; the suite has {}",
            setup.requests,
            setup.requests / 2,
            questions.len()
        );
    }
    let reqs: Vec<proto::GenerateRequest> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (expert_id, input) = if i % 2 == 0 {
                (
                    expert_id(ExpertKind::Lora, t.name()),
                    t.test[0].input.clone(),
                )
            } else {
                (String::new(), questions[i / 2].to_string())
            };
            proto::GenerateRequest {
                expert_id,
                input,
                max_new_tokens: setup.max_new_tokens,
                ..Default::default()
            }
        })
        .collect();
    let server = super::BenchServer::with_inference(library, backbone).await?;
    let service = server
        .inference
        .clone()
        .context("the bench server runs no inference service")?;
    let mut clients = Vec::new();
    for _ in 0..reqs.len() {
        clients.push(InferenceClient::connect(server.url.clone()).await?);
    }
    let stats = service.stats();
    let modes = [
        ("join running batches", true),
        ("own batch per arrival", false),
    ];
    let mut wall = [0.0f64; 2];
    let mut tokens = [0usize; 2];
    let mut batches = [0u64; 2];
    let mut joined = [0u64; 2];
    let mut latency: [Vec<f64>; 2] = Default::default();
    let mut first_token: [Vec<f64>; 2] = Default::default();
    let mut answers_of: [Option<Vec<Vec<u32>>>; 2] = Default::default();
    let mut per_round = Vec::new();
    for r in 0..=setup.rounds {
        let mut round_wall = [0.0f64; 2];
        for step in 0..2 {
            // Alternate which mode goes first (the host's speed drifts over minutes).
            let m = (r + step) % 2;
            service.set_join_running_generations(modes[m].1);
            let (b0, j0) = (
                stats.generate_batches.load(Ordering::Relaxed),
                stats.generate_joined.load(Ordering::Relaxed),
            );
            let (w, answers) = round(&clients, &reqs, setup.gap).await?;
            let ids: Vec<Vec<u32>> = answers.iter().map(|a| a.ids.clone()).collect();
            match &answers_of[m] {
                None => answers_of[m] = Some(ids),
                Some(prev) if *prev != ids => {
                    bail!("{}: answers changed between rounds", modes[m].0)
                }
                Some(_) => {}
            }
            round_wall[m] = w;
            if r > 0 {
                wall[m] += w;
                tokens[m] += answers.iter().map(|a| a.ids.len()).sum::<usize>();
                batches[m] += stats.generate_batches.load(Ordering::Relaxed) - b0;
                joined[m] += stats.generate_joined.load(Ordering::Relaxed) - j0;
                latency[m].extend(answers.iter().map(|a| a.latency_ms));
                first_token[m].extend(answers.iter().map(|a| a.first_token_ms));
            }
        }
        if r > 0 {
            // Same tokens in both modes: the rate ratio is the inverse wall-time ratio.
            per_round.push(round_wall[1] / round_wall[0].max(1e-9));
        }
        eprintln!(
            "round {r}{}: join {:.2} s, own batches {:.2} s",
            if r == 0 { " (warm-up)" } else { "" },
            round_wall[0],
            round_wall[1]
        );
    }
    server.stop().await;
    if answers_of[0] != answers_of[1] {
        bail!("the two modes answered differently (greedy decoding should not)");
    }
    let rounds = setup.rounds.max(1) as f64;
    let mut out = Vec::new();
    for m in 0..2 {
        for v in [&mut latency[m], &mut first_token[m]] {
            v.sort_by(f64::total_cmp);
        }
        out.push(ModeResult {
            mode: modes[m].0.into(),
            rounds: setup.rounds,
            requests_per_round: reqs.len(),
            tokens_per_round: tokens[m] as f64 / rounds,
            round_s: wall[m] / rounds,
            tokens_per_s: tokens[m] as f64 / wall[m].max(1e-9),
            p50_latency_ms: percentile(&latency[m], 0.5),
            p99_latency_ms: percentile(&latency[m], 0.99),
            p50_first_token_ms: percentile(&first_token[m], 0.5),
            p99_first_token_ms: percentile(&first_token[m], 0.99),
            batches_per_round: batches[m] as f64 / rounds,
            joined_per_round: joined[m] as f64 / rounds,
        });
    }
    per_round.sort_by(f64::total_cmp);
    Ok(ArrivalsReport {
        requests: reqs.len(),
        gap_ms: setup.gap.as_secs_f64() * 1000.0,
        max_new_tokens: setup.max_new_tokens,
        join_vs_own_batches: out[0].tokens_per_s / out[1].tokens_per_s.max(1e-9),
        per_round: [
            percentile(&per_round, 0.5),
            per_round.first().copied().unwrap_or(f64::NAN),
            per_round.last().copied().unwrap_or(f64::NAN),
        ],
        modes: out,
    })
}

pub fn markdown(r: &ArrivalsReport) -> String {
    let mut md = format!(
        "# Generate requests arriving over time (`roe bench arrivals`)\n\n{n} Generate requests \
         through gRPC on loopback, one every {gap:.0} ms, greedy, at most {t} new tokens; even \
         requests use a classification task's LoRA expert (short answers), odd ones the bare \
         backbone on generation-task questions (long answers). Both modes send the same \
         requests and stream the same tokens; rounds alternate which mode runs first.\n\n\
         | mode | s per round | tokens per round | tokens/s | p50 latency ms | p99 latency ms | p50 first token ms | p99 first token ms | batches per round | joined per round |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        n = r.requests,
        gap = r.gap_ms,
        t = r.max_new_tokens,
    );
    for m in &r.modes {
        md.push_str(&format!(
            "| {} | {:.2} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            m.mode,
            m.round_s,
            m.tokens_per_round,
            m.tokens_per_s,
            m.p50_latency_ms,
            m.p99_latency_ms,
            m.p50_first_token_ms,
            m.p99_first_token_ms,
            m.batches_per_round,
            m.joined_per_round
        ));
    }
    md.push_str(&format!(
        "\nContinuous batching / own batches, tokens/s: {:.2} over all rounds; per round median \
         {:.2} (min {:.2}, max {:.2}).\n",
        r.join_vs_own_batches, r.per_round[0], r.per_round[1], r.per_round[2]
    ));
    md
}
