//! `roe bench train-loop`: the whole loop on the full recipe, through gRPC on loopback. A task
//! the library has no expert for is trained from its rows (streamed in, the kind's default
//! recipe), registered by the job, routed to for its own test queries, and answers its test
//! rows through `roe.v1.Answerer` against the bare backbone on the same rows.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use roe_backbone::Backbone;
use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::ExpertKind;
use roe_task_suite::{sample, Task};
use serde::Serialize;

use roe_services::proto::{
    self, answerer_client::AnswererClient, inference_client::InferenceClient,
    router_client::RouterClient, training_client::TrainingClient,
};

pub struct LoopSetup<'a> {
    pub task: &'a Task,
    pub kind: ExpertKind,
    /// Example queries per Route and Answer request.
    pub q: usize,
    /// Route requests, each with its own draw of test queries.
    pub route_draws: usize,
    /// Test rows answered (all when larger).
    pub answer_rows: usize,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LoopReport {
    pub task: String,
    pub kind: String,
    pub expert_id: String,
    pub library_experts: usize,
    pub train_rows: u32,
    pub held_out_rows: u32,
    pub steps: u32,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
    pub metric: String,
    pub held_out_score: Option<f64>,
    pub held_out_baseline: Option<f64>,
    pub registered_instances: u64,
    pub q: usize,
    pub routes: usize,
    pub routed_to_trained: usize,
    pub answer_rows: usize,
    pub answered_by_trained: usize,
    pub answer_accuracy: f64,
    pub bare_accuracy: f64,
}

fn to_query(i: &roe_expert_library::Instance) -> proto::Query {
    proto::Query {
        input: i.input.clone(),
        choices: i.choices.clone(),
        target: None,
    }
}

fn is_correct(row: &roe_expert_library::Instance, best: u32) -> bool {
    row.choices.get(best as usize).map(String::as_str) == row.target.as_deref()
}

/// Serves `library` (the other tasks' experts) with inference and training on `backbone`,
/// then runs the loop for `setup.task`.
pub async fn run(
    library: Arc<ExpertLibrary>,
    backbone: Arc<Backbone>,
    setup: &LoopSetup<'_>,
) -> Result<LoopReport> {
    let t = setup.task;
    anyhow::ensure!(
        t.info.format != "generation",
        "{}: the loop answers by Score; pick a classification or multiple-choice task",
        t.name()
    );
    let library_experts = library.len();
    let work = tempfile::tempdir()?;
    let jobs = Arc::new(roe_trainer::TrainingJobs::open(
        work.path().join("training"),
        backbone.clone(),
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        library.clone(),
        Default::default(),
    )?);
    let inference = Arc::new(roe_serving::BackboneInference::over_library(
        backbone,
        library.clone(),
        roe_serving::ServingConfig::default(),
    ));
    let server = super::BenchServer::start(
        library,
        roe_services::server::ServeOptions {
            inference: Some(inference),
            training: Some(jobs),
            ..Default::default()
        },
    )
    .await?;
    let expert_id = format!("{}_trained", t.name());

    // Train: the CLI's path, rows streamed in, every recipe field the kind's default.
    let mut training = TrainingClient::connect(server.url.clone()).await?;
    let kind = match setup.kind {
        ExpertKind::Prompt => proto::ExpertKind::Prompt,
        ExpertKind::Lora => proto::ExpertKind::Lora,
    };
    let request = proto::StartTrainingRequest {
        expert_id: expert_id.clone(),
        name: t.name().into(),
        description: t.info.description.clone(),
        kind: kind as i32,
        rows: t
            .train
            .iter()
            .cloned()
            .map(roe_services::convert::instance_to_proto)
            .collect(),
        task_description: t.info.description.clone(),
        labels: t.info.labels.clone(),
        recipe: None,
        new_version: false,
        ensemble_size: 0,
    };
    let started = Instant::now();
    let job = training
        .start_training_stream(tokio_stream::iter(
            roe_services::convert::start_training_chunks(request),
        ))
        .await?
        .into_inner()
        .job
        .context("no job")?;
    let mut stream = training
        .watch_training(proto::WatchTrainingRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    let mut last = job;
    let mut tokens_per_s = Vec::new();
    while let Some(j) = stream.message().await? {
        if j.phase == "training" && j.step > 0 && j.step % 20 == 0 && j.tokens_per_s > 0.0 {
            eprintln!(
                "{} step {}/{} loss {:.4} ({:.0} tok/s, ETA {:.0} s)",
                expert_id, j.step, j.total_steps, j.loss, j.tokens_per_s, j.eta_s
            );
        }
        if j.tokens_per_s > 0.0 {
            tokens_per_s.push(j.tokens_per_s);
        }
        last = j;
    }
    let train_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        last.state == proto::TrainingState::Succeeded as i32,
        "the job ended {:?}: {}",
        last.state,
        last.error
    );
    let registered = roe_services::proto::expert_library_client::ExpertLibraryClient::connect(
        server.url.clone(),
    )
    .await?
    .get_expert(proto::GetExpertRequest {
        min_library_seq: Default::default(),
        id: expert_id.clone(),
        include_instances: false,
        include_adapter: false,
    })
    .await?
    .into_inner()
    .expert
    .context("no expert")?;

    // Route: each draw of Q test queries should pick the new expert.
    let mut router = RouterClient::connect(server.url.clone()).await?;
    let mut routed_to_trained = 0;
    for draw in 0..setup.route_draws {
        let queries = sample(&t.test, setup.q, draw as u64);
        let r = router
            .route(proto::RouteRequest {
                min_library_seq: Default::default(),
                queries: queries.iter().map(to_query).collect(),
                options: None,
            })
            .await?
            .into_inner();
        routed_to_trained += usize::from(r.expert_id == expert_id);
    }

    // Answer the test rows (64 per request, each with its own Q queries) and score the same
    // rows on the bare backbone.
    let rows: Vec<_> = t.test.iter().take(setup.answer_rows).cloned().collect();
    let mut answerer = AnswererClient::connect(server.url.clone()).await?;
    let mut inference = InferenceClient::connect(server.url.clone()).await?;
    let (mut answered_by_trained, mut right, mut bare_right) = (0, 0, 0);
    for (n, batch) in rows.chunks(64).enumerate() {
        let queries = sample(&t.test, setup.q, 1000 + n as u64);
        let r = answerer
            .answer(proto::AnswerRequest {
                queries: queries.iter().map(to_query).collect(),
                inputs: batch
                    .iter()
                    .map(|i| proto::AnswerInput {
                        input: i.input.clone(),
                        choices: i.choices.clone(),
                    })
                    .collect(),
                mode: proto::AnswerMode::Score as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        if r.expert_id == expert_id {
            answered_by_trained += batch.len();
        }
        for (row, a) in batch.iter().zip(&r.answers) {
            if let Some(proto::answer::Kind::Score(s)) = &a.kind {
                right += usize::from(is_correct(row, s.best));
            }
        }
    }
    for row in &rows {
        let s = inference
            .score(proto::ScoreRequest {
                min_library_seq: Default::default(),
                expert_id: String::new(),
                input: row.input.clone(),
                choices: row.choices.clone(),
                truncate: false,
            })
            .await?
            .into_inner();
        bare_right += usize::from(is_correct(row, s.best));
    }
    server.stop().await;
    tokens_per_s.sort_by(f64::total_cmp);
    Ok(LoopReport {
        task: t.name().into(),
        kind: setup.kind.as_str().into(),
        expert_id,
        library_experts,
        train_rows: last.train_rows,
        held_out_rows: last.held_out_rows,
        steps: last.step,
        train_seconds,
        tokens_per_s: crate::percentile(&tokens_per_s, 0.5),
        final_loss: last.loss,
        metric: last.metric.clone(),
        held_out_score: last.held_out_score,
        held_out_baseline: last.held_out_baseline,
        registered_instances: registered.num_instances,
        q: setup.q,
        routes: setup.route_draws,
        routed_to_trained,
        answer_rows: rows.len(),
        answered_by_trained,
        answer_accuracy: right as f64 / rows.len().max(1) as f64,
        bare_accuracy: bare_right as f64 / rows.len().max(1) as f64,
    })
}

pub const TITLE: &str =
    "# The whole loop: a new task trained, registered, routed to and answered\n\n";

/// One run's section of the results page (under [`TITLE`]).
pub fn markdown(r: &LoopReport) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    format!(
        "## `{task}`, {kind}\n\n\
         `{task}` (no expert of it in the library of {lib} other tasks' reference prompt experts, \
         S 100 each) trained as a {kind} expert through `roe.v1.Training` on a real server on \
         loopback: its {rows} train rows streamed in (StartTrainingStream), every recipe field the \
         kind's default. The job registered `{id}` with {inst} instances; then Route with Q {q} of \
         its test queries ({routes} draws) and Answerer (Score mode, 64 inputs a request, Q {q}) on \
         {answer_rows} test rows, against the bare backbone on the same rows.\n\n\
         | step | value |\n|---|---|\n\
         | trained rows / held out | {train_rows} / {held} |\n\
         | steps, wall time | {steps}, {mins:.1} min ({tps:.0} tokens/s median) |\n\
         | final loss | {loss:.4} |\n\
         | held-out {metric} (bare backbone) | {hs} ({hb}) |\n\
         | Route picks `{id}` | {rt} of {routes} |\n\
         | Answer answered by `{id}` | {abt} of {answer_rows} rows |\n\
         | Answer accuracy on the test rows | **{acc:.3}** |\n\
         | bare backbone on the same rows | {bare:.3} |\n",
        task = r.task,
        lib = r.library_experts,
        kind = r.kind,
        rows = r.train_rows + r.held_out_rows,
        id = r.expert_id,
        inst = r.registered_instances,
        q = r.q,
        routes = r.routes,
        answer_rows = r.answer_rows,
        train_rows = r.train_rows,
        held = r.held_out_rows,
        steps = r.steps,
        mins = r.train_seconds / 60.0,
        tps = r.tokens_per_s,
        loss = r.final_loss,
        metric = r.metric,
        hs = opt(r.held_out_score),
        hb = opt(r.held_out_baseline),
        rt = r.routed_to_trained,
        abt = r.answered_by_trained,
        acc = r.answer_accuracy,
        bare = r.bare_accuracy,
    )
}
