//! `roe bench answer`: end-to-end latency of route-and-answer (`roe.v1.Answerer`) through
//! gRPC on loopback with concurrent clients: each request carries Q example queries of a task
//! (routing) and inputs of that task to answer by Score.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use roe_backbone::Backbone;
use roe_expert_library::library::ExpertLibrary;
use roe_task_suite::{sample, Task};
use serde::Serialize;

use super::percentile;
use roe_services::proto::{self, answerer_client::AnswererClient};

#[derive(Debug, Clone, Serialize)]
pub struct AnswerLatencyReport {
    pub experts: usize,
    pub s: usize,
    pub q: usize,
    pub inputs_per_request: usize,
    pub clients: usize,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub requests_per_s: f64,
    /// Requests answered by the expert of the task the queries came from.
    pub routed_to_own_expert: usize,
}

pub struct AnswerSetup<'a> {
    pub tasks: &'a [Task],
    pub q: usize,
    pub inputs: usize,
    pub clients: usize,
    pub per_client: usize,
}

/// One prepared request and the expert that should answer it.
struct Job {
    request: proto::AnswerRequest,
    own: String,
}

fn jobs(setup: &AnswerSetup<'_>) -> Vec<Job> {
    let to_query = |i: &roe_expert_library::expert::Instance| proto::Query {
        input: i.input.clone(),
        choices: i.choices.clone(),
        target: None,
    };
    setup
        .tasks
        .iter()
        .filter(|t| t.info.format != "generation" && t.test.len() > setup.q)
        .enumerate()
        .map(|(n, t)| {
            let queries = sample(&t.test, setup.q, n as u64);
            // Inputs to answer: test rows after the first `q` of a fixed order.
            let inputs = t
                .test
                .iter()
                .rev()
                .take(setup.inputs)
                .map(|i| proto::AnswerInput {
                    input: i.input.clone(),
                    choices: i.choices.clone(),
                })
                .collect();
            Job {
                request: proto::AnswerRequest {
                    queries: queries.iter().map(to_query).collect(),
                    inputs,
                    mode: proto::AnswerMode::Score as i32,
                    ..Default::default()
                },
                own: format!("{}/prompt", t.name()),
            }
        })
        .collect()
}

/// Serves `library` (already holding the experts, S instances each) and measures.
pub async fn run(
    library: Arc<ExpertLibrary>,
    backbone: Arc<Backbone>,
    s: usize,
    setup: &AnswerSetup<'_>,
) -> Result<AnswerLatencyReport> {
    let experts = library.len();
    let server = super::BenchServer::with_inference(library, backbone).await?;
    let url = server.url.clone();
    let jobs = Arc::new(jobs(setup));
    anyhow::ensure!(
        !jobs.is_empty(),
        "no task has more than {} test rows",
        setup.q
    );
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in 0..setup.clients {
        let (url, jobs, per_client) = (url.clone(), jobs.clone(), setup.per_client);
        handles.push(tokio::spawn(async move {
            let mut client = AnswererClient::connect(url).await?;
            let mut out = Vec::new();
            // One untimed warm-up request per client, then the timed ones.
            for i in 0..=per_client {
                let job = &jobs[(c * (per_client + 1) + i) % jobs.len()];
                let t = Instant::now();
                let r = client.answer(job.request.clone()).await?.into_inner();
                if i > 0 {
                    out.push((t.elapsed().as_secs_f64() * 1000.0, r.expert_id == job.own));
                }
            }
            anyhow::Ok(out)
        }));
    }
    let mut times = Vec::new();
    let mut own = 0;
    for h in handles {
        for (ms, ok) in h.await?? {
            times.push(ms);
            own += usize::from(ok);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    server.stop().await;
    times.sort_by(f64::total_cmp);
    Ok(AnswerLatencyReport {
        experts,
        s,
        q: setup.q,
        inputs_per_request: setup.inputs,
        clients: setup.clients,
        requests: times.len(),
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        mean_ms: times.iter().sum::<f64>() / times.len().max(1) as f64,
        requests_per_s: (setup.clients * (setup.per_client + 1)) as f64 / wall,
        routed_to_own_expert: own,
    })
}

pub fn markdown(r: &AnswerLatencyReport) -> String {
    format!(
        "# Route-and-answer latency (`roe bench answer`)\n\n`roe.v1.Answerer` through gRPC on \
         loopback, single process (library + router + inference). Library: {} prompt experts, \
         S={}. Each request: Q={} unlabeled example queries of one task (routing) and {} \
         input(s) of that task answered by Score with the winner. {} concurrent clients, {} \
         timed requests (after one warm-up request per client).\n\n\
         | p50 ms | p99 ms | mean ms | requests/s | routed to the task's own expert |\n\
         |---|---|---|---|---|\n| {:.0} | {:.0} | {:.0} | {:.2} | {}/{} |\n",
        r.experts,
        r.s,
        r.q,
        r.inputs_per_request,
        r.clients,
        r.requests,
        r.p50_ms,
        r.p99_ms,
        r.mean_ms,
        r.requests_per_s,
        r.routed_to_own_expert,
        r.requests
    )
}
