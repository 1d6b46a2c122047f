//! `roe bench ...` subcommands.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use roe_expert_library::expert::TextFormat;
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, NewExpert};
use roe_expert_library::retrieval::RouteOptions;
use roe_expert_library::PeftAdapter;
use roe_task_suite::{load_suite, sample};

use super::routing_accuracy::{
    self, routing_only_adapter, AccuracySetup, SuiteTask, Variant, VariantReport,
};
use super::{
    answer, arrivals, encoder, generate, hnsw, latency, machine, score, serving, write_results,
};
use roe_cli::models;
use roe_services::proto;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Routing accuracy (ELM vs default), HNSW/exact agreement and gRPC Route latency on the
    /// 41-expert library.
    Routing(RoutingArgs),
    /// Encoder throughput against sentence-transformers (needs scripts/setup-peers.sh).
    Encoder(EncoderArgs),
    /// HNSW at scale on synthetic vectors.
    Hnsw(HnswArgs),
    /// Library start-up at scale: cold (rebuild the index from sled, then persist it) and
    /// warm (reload the persisted index), each open in a fresh process.
    Startup(StartupArgs),
    /// Accuracy of the bare backbone and all prompt and LoRA experts on every task's test set
    /// against reference.json, and Score throughput.
    Score(ScoreArgs),
    /// Backbone prefill/decode tokens/s and next-token log-probs against llama.cpp
    /// (needs scripts/setup-peers.sh for the peer).
    Generate(GenerateArgs),
    /// Long prompts: time and peak memory of Score and Generate at 512, 2k and 8k-token
    /// prompts, run in passes of --max-batch-prefill-tokens, against llama.cpp's prefill.
    Context(ContextArgs),
    /// Score throughput through gRPC: 16 concurrent requests on 16 experts vs one expert vs
    /// one at a time, and expert cold-load latency.
    Serving(ServingArgs),
    /// Generate requests arriving one after another: continuous batching (joining the
    /// running batch) against a batch per arrival.
    Arrivals(ArrivalsArgs),
    /// End-to-end route-and-answer latency (Answerer, Q queries + Score) with concurrent clients.
    Answer(AnswerArgs),
    /// Training speed of prompt tuning and LoRA against Hugging Face PEFT on PyTorch CPU
    /// (same recipe, rows and batches; needs scripts/setup-peers.sh for the peer).
    Train(TrainArgs),
    /// The whole loop on the full recipe: a task with no expert in the library is trained
    /// through roe.v1.Training, registered, routed to and answered (results accumulate per
    /// kind and task).
    TrainLoop(TrainLoopArgs),
    /// Parity of roe-trained experts with the reference experts: each task trained with the
    /// default recipe, measured on its test rows; results accumulate in the JSON (one row
    /// per kind and task, replaced when run again).
    TrainParity(TrainParityArgs),
    /// Resource attacks (upload memory, disk after deletes), CPU after a deadline, auth
    /// overhead and a kill -9 crash loop against real `roe serve` processes.
    Reliability(ReliabilityArgs),
    /// Memory under a long mixed load on one real `roe serve`: routes, scores and
    /// generations over gRPC and HTTP, registrations and cancelled training from concurrent
    /// clients; RSS over time, after the load and after an idle period.
    Soak(SoakArgs),
    /// HTTP /v1/completions (whole and streamed) against gRPC Generate for the same requests
    /// on one real `roe serve`.
    Http(HttpArgs),
    /// Replicas of `roe serve` sharing one library in PostgreSQL (needs a server whose role
    /// may CREATE DATABASE): propagation lag between replicas, read-your-writes with
    /// min_library_seq, write and Route latency against a sled server, replica start at scale.
    Replicas(ReplicasArgs),
}

#[derive(Args)]
pub struct ReplicasArgs {
    /// PostgreSQL as a role that may CREATE DATABASE: the run creates `roe_bench_<random>`
    /// there (one more per --startup-vectors size) and drops it at the end.
    #[arg(
        long,
        env = "ROE_BENCH_DATABASE_URL",
        default_value = crate::replicas::DEFAULT_ADMIN_URL,
        hide_env_values = true
    )]
    database_url: String,
    /// Replicas on the database (the first writes, the others follow).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Writes of the propagation and read-your-writes runs, and of the write throughput
    /// run; a quarter of it per kind for write latency (default 200; --quick: 10).
    #[arg(long)]
    writes: Option<usize>,
    /// Library sizes (vectors) of the replica start measurements, comma separated (default
    /// 100000,1000000; --quick: 2000).
    #[arg(long, value_delimiter = ',')]
    startup_vectors: Option<Vec<usize>>,
    /// Tiny sizes, for a smoke test (flags given explicitly still win).
    #[arg(long)]
    quick: bool,
    /// The replicas' --follow-interval-ms (roe serve's default).
    #[arg(long, default_value_t = 2000)]
    follow_interval_ms: u64,
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// The `roe` binary (default: beside this one).
    #[arg(long)]
    roe: Option<PathBuf>,
    /// Where replicas.md and replicas.json go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Args)]
pub struct SoakArgs {
    /// Length of the load (the goal is judged at 10 minutes or more; CI runs it shorter).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Concurrent clients, each with gRPC and HTTP connections of its own.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds the RSS is followed after the load, the server idle.
    #[arg(long, default_value_t = 60)]
    idle_after_secs: u64,
    /// Milliseconds between two RSS readings.
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
    /// The server's --expert-cache-mb (the caches count in the goal).
    #[arg(long, default_value_t = 64)]
    expert_cache_mb: u64,
    /// The server's --embedding-cache-mb.
    #[arg(long, default_value_t = 16)]
    embedding_cache_mb: u64,
    /// The server's --route-cache-mb.
    #[arg(long, default_value_t = 8)]
    route_cache_mb: u64,
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// The `roe` binary (default: beside this one).
    #[arg(long)]
    roe: Option<PathBuf>,
    /// More arguments of `roe serve`, e.g. `--extra-serve-args --idle-trim-ms 0`. Last on
    /// the line: every argument after it is passed on.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    extra_serve_args: Vec<String>,
    #[arg(long, default_value = "bench/results/soak.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct HttpArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// The LoRA expert that answers (its test rows are the prompts).
    #[arg(long, default_value = "reddit_qa")]
    task: String,
    /// Rounds of the three calls.
    #[arg(long, default_value_t = 60)]
    rounds: usize,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// The `roe` binary (default: beside this one).
    #[arg(long)]
    roe: Option<PathBuf>,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Args)]
pub struct ReliabilityArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// `kill -9` rounds of the crash loop.
    #[arg(long, default_value_t = 50)]
    kills: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Measure only these parts (upload, deadlines, disk, auth, crash); the others keep
    /// their figures from the results already there.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(crate::reliability::PARTS))]
    only: Option<Vec<String>>,
    /// Measure only these deadline calls (Route, Score, Answer); the others keep their rows
    /// from the results already there.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(crate::reliability::DEADLINE_CALLS))]
    deadline_calls: Option<Vec<String>>,
    /// The `roe` binary (default: beside this one).
    #[arg(long)]
    roe: Option<PathBuf>,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Args)]
pub struct TrainLoopArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// The new task (classification or multiple choice); the library gets every other task.
    #[arg(long, default_value = "snips_intent")]
    task: String,
    #[arg(long, default_value = "lora")]
    kind: String,
    /// Instances per library expert.
    #[arg(long, default_value_t = 100)]
    s: usize,
    #[arg(long, default_value_t = 16)]
    q: usize,
    #[arg(long, default_value_t = 20)]
    route_draws: usize,
    #[arg(long, default_value_t = 1000)]
    answer_rows: usize,
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// Cache of embedded rows (speeds up reruns; never affects results).
    #[arg(long, default_value = "bench/cache")]
    cache_dir: PathBuf,
    #[arg(long, default_value = "bench/results/train-loop.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct TrainParityArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    /// Tasks to train, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    tasks: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "prompt")]
    kinds: Vec<String>,
    #[arg(long, default_value = "assets/experts/smollm2-135m/reference.json")]
    reference: PathBuf,
    #[arg(long, default_value_t = 60)]
    generation_rows: usize,
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/train-parity.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "assets/tasks/sms_spam")]
    task: PathBuf,
    /// Kinds to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "prompt,lora")]
    kinds: Vec<String>,
    /// Timed steps per kind (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Python with torch and peft (default: .venv/bin/python if present).
    #[arg(long, env = "ROE_PEERS_PYTHON")]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/peers/peft_train.py")]
    peer_script: PathBuf,
    /// Measure roe alone.
    #[arg(long)]
    no_peer: bool,
    /// roe's index engines to measure, in order (the first is the `roe` of older reports).
    #[arg(long, value_delimiter = ',', default_value = "graph,hnsw_rs")]
    engines: Vec<roe_expert_library::engine::IndexEngine>,
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// Score requests timed idle and while a job trains (0: skip that part).
    #[arg(long, default_value_t = 60)]
    serving_requests: usize,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    #[arg(long, default_value = "bench/results/train.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct AnswerArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    #[arg(long, default_value_t = 100)]
    s: usize,
    #[arg(long, default_value_t = 32)]
    q: usize,
    /// Inputs answered (by Score) per request.
    #[arg(long, default_value_t = 1)]
    inputs: usize,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// Cache of embedded rows (speeds up reruns; never affects results).
    #[arg(long, default_value = "bench/cache")]
    cache_dir: PathBuf,
    #[arg(long, default_value = "bench/results/answer.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct ServingArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Timed rounds per scenario (after one warm-up round).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// max_new_tokens of the Generate scenarios.
    #[arg(long, default_value_t = 64)]
    generate_tokens: u32,
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/serving.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct ArrivalsArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// Requests per round (half on LoRA experts, half on the bare backbone).
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Milliseconds between two arrivals.
    #[arg(long, default_value_t = 400)]
    gap_ms: u64,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: u32,
    /// Timed rounds per mode (after one warm-up round of each).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/arrivals.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Task suite whose test inputs give the 20 prompts of the log-prob comparison.
    #[arg(long, default_value = "assets/tasks")]
    suite: PathBuf,
    /// Python with llama-cpp-python (default: .venv/bin/python if present).
    #[arg(long, env = "ROE_PEERS_PYTHON")]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/peers/llamacpp_bench.py")]
    peer_script: PathBuf,
    /// Measure roe alone.
    #[arg(long)]
    no_peer: bool,
    /// roe's index engines to measure, in order (the first is the `roe` of older reports).
    #[arg(long, value_delimiter = ',', default_value = "graph,hnsw_rs")]
    engines: Vec<roe_expert_library::engine::IndexEngine>,
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/generate.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct ContextArgs {
    /// Prompt lengths in tokens (each at most the context less --new-tokens).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    lengths: Vec<usize>,
    #[arg(long, default_value_t = roe_backbone::DEFAULT_MAX_BATCH_PREFILL_TOKENS)]
    max_batch_prefill_tokens: usize,
    /// Greedy tokens of each Generate (and the room kept for them in the context).
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Skip the longest Score in one pass (no prefill budget).
    #[arg(long)]
    no_one_pass: bool,
    /// Python with llama-cpp-python (default: .venv/bin/python if present).
    #[arg(long, env = "ROE_PEERS_PYTHON")]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/peers/llamacpp_bench.py")]
    peer_script: PathBuf,
    /// Measure roe alone.
    #[arg(long)]
    no_peer: bool,
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/context.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long, default_value = "assets/tasks")]
    tasks_dir: PathBuf,
    /// PEFT experts (prompt/<task>, lora/<task>) and reference.json.
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// Test rows per task (default: all).
    #[arg(long)]
    rows: Option<usize>,
    /// Rows of generation tasks (the reference used 60).
    #[arg(long, default_value_t = 60)]
    generation_rows: usize,
    /// Rows per scoring call.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Only these tasks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Backbone GGUF file (default: <models-dir>/SmolLM2-135M-Instruct/...Q4_1.gguf).
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/score.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct StartupArgs {
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    /// Where the synthetic library is written (removed afterwards).
    #[arg(long, default_value = "bench/cache/startup-library")]
    dir: PathBuf,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 100)]
    ef_construction: usize,
    #[arg(long, default_value = "bench/results/startup.json")]
    json: PathBuf,
    /// Internal: one open of an existing library at --dir in this process (`rebuild`: then
    /// persist its index; `reload`), its report printed as one JSON line.
    #[arg(long, hide = true)]
    phase: Option<String>,
}

#[derive(Args)]
pub struct RoutingArgs {
    #[arg(long, default_value = "assets/tasks")]
    dev_suite: PathBuf,
    #[arg(long, default_value = "assets/tasks-routing")]
    routing_suite: PathBuf,
    /// PEFT experts (prompt/<task>); tasks without one get a routing-only zero prompt.
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    #[arg(long, default_value_t = 100)]
    s: usize,
    #[arg(long, default_value_t = 32)]
    q: usize,
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Where the JSON report goes (a Markdown table is written beside it).
    #[arg(long, default_value = "bench/results/routing.json")]
    json: PathBuf,
    /// Cache of embedded rows (speeds up reruns; never affects results).
    #[arg(long, default_value = "bench/cache")]
    cache_dir: PathBuf,
    #[arg(long)]
    skip_latency: bool,
    /// Extra hybrid settings to measure: `knn,centroid,lexical,t_centroid,t_lexical,top_k;...`.
    #[arg(long, default_value = "")]
    grid: String,
    #[arg(long)]
    skip_agreement: bool,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    requests_per_client: usize,
    /// Only Route latency, fresh queries and repeated ones (the embedding cache), written to
    /// bench/results/route-latency.{md,json}; the accuracy results are left as they are.
    #[arg(long)]
    latency_only: bool,
}

#[derive(Args)]
pub struct EncoderArgs {
    #[arg(long, default_value = "assets/tasks")]
    suite: PathBuf,
    /// Texts embedded (drawn from the suite's test inputs).
    #[arg(long, default_value_t = 512)]
    texts: usize,
    /// Python with sentence-transformers (default: .venv/bin/python if present).
    #[arg(long, env = "ROE_PEERS_PYTHON")]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/peers/st_embed.py")]
    peer_script: PathBuf,
    /// Measure roe alone.
    #[arg(long)]
    no_peer: bool,
    /// roe's index engines to measure, in order (the first is the `roe` of older reports).
    #[arg(long, value_delimiter = ',', default_value = "graph,hnsw_rs")]
    engines: Vec<roe_expert_library::engine::IndexEngine>,
    #[arg(long, default_value = "bench/results/encoder.json")]
    json: PathBuf,
}

#[derive(Args)]
pub struct HnswArgs {
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 100)]
    ef_construction: usize,
    /// ef_search of the Q=32 batched search (the index's default unless given).
    #[arg(long)]
    ef_search: Option<usize>,
    /// ef_search values of the recall/latency curve.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "16,32,48,64,96,128,160,192,256"
    )]
    ef_sweep: Vec<usize>,
    /// Clusters of the synthetic data (default: one per 20 vectors).
    #[arg(long)]
    clusters: Option<usize>,
    /// Python with hnswlib (default: .venv/bin/python if present).
    #[arg(long, env = "ROE_PEERS_PYTHON")]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/peers/hnswlib_bench.py")]
    peer_script: PathBuf,
    /// Where the vectors are written for the peer (removed afterwards).
    #[arg(long, default_value = "target/hnsw-bench")]
    work_dir: PathBuf,
    /// Measure roe alone.
    #[arg(long)]
    no_peer: bool,
    /// roe's index engines to measure, in order (the first is the `roe` of older reports).
    #[arg(long, value_delimiter = ',', default_value = "graph,hnsw_rs")]
    engines: Vec<roe_expert_library::engine::IndexEngine>,
    #[arg(long, default_value = "bench/results/hnsw.json")]
    json: PathBuf,
}

pub fn run(
    models_dir: &Path,
    encoder: Option<&Path>,
    _server: &str,
    cmd: BenchCommand,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    match cmd {
        BenchCommand::Routing(a) => routing(models_dir, encoder, a, rt),
        BenchCommand::Encoder(a) => encoder_bench(models_dir, encoder, a),
        BenchCommand::Hnsw(a) => hnsw_bench(a),
        BenchCommand::Startup(a) => startup_bench(a),
        BenchCommand::Score(a) => score_bench(models_dir, a),
        BenchCommand::Generate(a) => generate_bench(models_dir, a),
        BenchCommand::Context(a) => context_bench(models_dir, a),
        BenchCommand::Serving(a) => serving_bench(models_dir, encoder, a, rt),
        BenchCommand::Arrivals(a) => arrivals_bench(models_dir, encoder, a, rt),
        BenchCommand::Answer(a) => answer_bench(models_dir, encoder, a, rt),
        BenchCommand::Train(a) => train_bench(models_dir, a),
        BenchCommand::TrainParity(a) => train_parity(models_dir, a),
        BenchCommand::TrainLoop(a) => train_loop_bench(models_dir, encoder, a, rt),
        BenchCommand::Reliability(a) => reliability_bench(models_dir, a, rt),
        BenchCommand::Soak(a) => soak_bench(models_dir, encoder, a, rt),
        BenchCommand::Replicas(a) => replicas_bench(models_dir, encoder, a, rt),
        BenchCommand::Http(a) => {
            let exe = match a.roe {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("roe"),
            };
            rt.block_on(crate::http::run(crate::http::HttpBenchInput {
                exe,
                models_dir,
                tasks_dir: &a.tasks_dir,
                experts_dir: &a.experts,
                task: a.task,
                rounds: a.rounds,
                max_tokens: a.max_tokens,
                out: &a.out,
            }))
        }
    }
}

fn expert_kinds(names: &[String]) -> Result<Vec<roe_expert_library::ExpertKind>> {
    names
        .iter()
        .map(|k| match k.as_str() {
            "prompt" => Ok(roe_expert_library::ExpertKind::Prompt),
            "lora" => Ok(roe_expert_library::ExpertKind::Lora),
            o => anyhow::bail!("unknown kind {o:?} (prompt or lora)"),
        })
        .collect()
}

fn reliability_bench(
    models_dir: &Path,
    a: ReliabilityArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let exe = match a.roe {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("roe"),
    };
    if !exe.is_file() {
        anyhow::bail!(
            "no roe binary at {} (cargo build --release --bin roe)",
            exe.display()
        );
    }
    let input = crate::reliability::ReliabilityInput {
        exe,
        models_dir,
        tasks_dir: &a.tasks_dir,
        experts_dir: &a.experts,
        kills: a.kills,
        seed: a.seed,
        only: a.only,
        deadline_calls: a.deadline_calls,
        earlier: {
            let path = a.out.join("reliability.json");
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
                Err(_) => serde_json::Value::Null,
            }
        },
    };
    let (json, md) = rt.block_on(crate::reliability::run(input))?;
    crate::write_results(&a.out, "reliability", &json, &md)?;
    println!("{md}");
    Ok(())
}

fn soak_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: SoakArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let exe = match a.roe {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("roe"),
    };
    if !exe.is_file() {
        anyhow::bail!(
            "no roe binary at {} (cargo build --release --bin roe)",
            exe.display()
        );
    }
    let report = rt.block_on(crate::soak::run(crate::soak::SoakInput {
        exe,
        models_dir,
        encoder: enc,
        tasks_dir: &a.tasks_dir,
        experts_dir: &a.experts,
        minutes: a.minutes,
        clients: a.clients,
        idle_after_secs: a.idle_after_secs,
        sample_ms: a.sample_ms,
        expert_cache_mb: a.expert_cache_mb,
        embedding_cache_mb: a.embedding_cache_mb,
        route_cache_mb: a.route_cache_mb,
        extra_serve_args: a.extra_serve_args,
    }))?;
    let md = crate::soak::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

fn replicas_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: ReplicasArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let exe = match a.roe {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("roe"),
    };
    if !exe.is_file() {
        anyhow::bail!(
            "no roe binary at {} (cargo build --release --bin roe)",
            exe.display()
        );
    }
    let input = crate::replicas::ReplicasInput {
        exe,
        models_dir,
        encoder: enc,
        tasks_dir: &a.tasks_dir,
        experts_dir: &a.experts,
        admin_url: a.database_url,
        replicas: a.replicas,
        writes: a.writes.unwrap_or(if a.quick { 10 } else { 200 }),
        startup_vectors: a.startup_vectors.unwrap_or_else(|| {
            if a.quick {
                vec![2_000]
            } else {
                vec![100_000, 1_000_000]
            }
        }),
        follow_interval_ms: a.follow_interval_ms,
        quick: a.quick,
    };
    let (json, md) = crate::replicas::run(&input, rt)?;
    write_results(&a.out, "replicas", &json, &md)?;
    println!("{md}");
    Ok(())
}

fn train_parity(models_dir: &Path, a: TrainParityArgs) -> Result<()> {
    let kinds = expert_kinds(&a.kinds)?;
    let bb = models::load_backbone(models_dir, a.backbone.as_deref())?;
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&a.reference)?)?;
    let mut rows: Vec<crate::train::ParityRow> = std::fs::read_to_string(&a.json)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| serde_json::from_value(v["rows"].clone()).ok())
        .unwrap_or_default();
    for task in &a.tasks {
        for &kind in &kinds {
            let r = crate::train::parity_run(
                &bb,
                kind,
                &a.tasks_dir.join(task),
                &reference,
                a.generation_rows,
            )?;
            println!(
                "{} {}: roe {:.3}, reference {:.3} ({:+.3}), {:.1} min",
                r.kind,
                r.task,
                r.roe,
                r.reference,
                r.roe - r.reference,
                r.train_seconds / 60.0
            );
            rows.retain(|x| !(x.kind == r.kind && x.task == r.task));
            rows.push(r);
            rows.sort_by(|x, y| (&x.kind, &x.task).cmp(&(&y.kind, &y.task)));
            let md = crate::train::parity_markdown(&rows);
            let json = serde_json::json!({"machine": machine(), "rows": rows});
            let (dir, name) = split(&a.json);
            write_results(&dir, &name, &json, &md)?;
        }
    }
    println!("{}", crate::train::parity_markdown(&rows));
    Ok(())
}

fn train_loop_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: TrainLoopArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let kind = expert_kinds(std::slice::from_ref(&a.kind))?[0];
    let backbone = Arc::new(models::load_backbone(models_dir, a.backbone.as_deref())?);
    let tasks = load_suite(&a.tasks_dir)?;
    let task = tasks
        .iter()
        .find(|t| t.name() == a.task)
        .with_context(|| format!("no task {:?} in {}", a.task, a.tasks_dir.display()))?;
    let work = tempfile::tempdir()?;
    let others = tasks.iter().filter(|t| t.name() != a.task);
    let library = prompt_library(
        models_dir,
        enc,
        &a.cache_dir,
        work.path(),
        others,
        &a.experts,
        a.s,
    )?;
    let setup = crate::train_loop::LoopSetup {
        task,
        kind,
        q: a.q,
        route_draws: a.route_draws,
        answer_rows: a.answer_rows,
    };
    let report = rt.block_on(crate::train_loop::run(Arc::new(library), backbone, &setup))?;
    println!("{}", crate::train_loop::markdown(&report));
    let mut reports: Vec<crate::train_loop::LoopReport> = std::fs::read_to_string(&a.json)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| serde_json::from_value(v["runs"].clone()).ok())
        .unwrap_or_default();
    reports.retain(|r| !(r.kind == report.kind && r.task == report.task));
    reports.push(report);
    reports.sort_by(|x, y| (&x.kind, &x.task).cmp(&(&y.kind, &y.task)));
    let md = crate::train_loop::TITLE.to_string()
        + &reports
            .iter()
            .map(crate::train_loop::markdown)
            .collect::<Vec<_>>()
            .join("\n");
    let json = serde_json::json!({"machine": machine(), "runs": reports});
    let (dir, name) = split(&a.json);
    write_results(&dir, &name, &json, &md)
}

fn train_bench(models_dir: &Path, a: TrainArgs) -> Result<()> {
    let kinds = expert_kinds(&a.kinds)?;
    let gguf = a
        .backbone
        .clone()
        .unwrap_or_else(|| models::backbone_path(models_dir));
    let python = if a.no_peer {
        None
    } else {
        crate::peer_python(a.python.as_deref())
    };
    let reports = crate::train::run(&crate::train::TrainBenchArgs {
        gguf: &gguf,
        task_dir: &a.task,
        kinds: &kinds,
        steps: a.steps.max(1),
        warmup: 1,
        python,
        peer_script: &a.peer_script,
    })?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let task = a
        .task
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut md = crate::train::markdown(&task, &reports, loadavg.trim());
    let serving = if a.serving_requests > 0 {
        let s = crate::train::serving_while_training(
            &gguf,
            &models::encoder_dir(models_dir, None),
            &a.experts,
            &a.task,
            a.serving_requests,
        )?;
        md.push_str(&format!(
            "\n## Serving while training\n\nOne process: Score (one client, one request at a time, the reference `sms_spam` prompt expert, {} requests) idle, then while a prompt-tuning job of the default recipe trains beside it on the same backbone and cores.\n\n| | p50 ms | p99 ms |\n|---|---|---|\n| idle | {:.1} | {:.1} |\n| while training | {:.1} | {:.1} |\n\nTraining went on at {:.3} steps/s meanwhile.\n",
            s.requests, s.idle_p50_ms, s.idle_p99_ms, s.training_p50_ms, s.training_p99_ms, s.training_steps_per_s
        ));
        Some(s)
    } else {
        None
    };
    println!("{md}");
    let json = serde_json::json!({"task": task, "machine": machine(), "loadavg": loadavg.trim(), "kinds": reports, "serving_while_training": serving});
    let (dir, name) = split(&a.json);
    write_results(&dir, &name, &json, &md)?;
    println!("wrote {}/{name}.json and .md", dir.display());
    Ok(())
}

fn score_bench(models_dir: &Path, a: ScoreArgs) -> Result<()> {
    let bb = models::load_backbone(models_dir, a.backbone.as_deref())?;
    let mut tasks =
        load_suite(&a.tasks_dir).with_context(|| format!("loading {}", a.tasks_dir.display()))?;
    if !a.tasks.is_empty() {
        tasks.retain(|t| a.tasks.iter().any(|n| n == t.name()));
    }
    let reference_path = a.experts.join("reference.json");
    let reference = std::fs::read_to_string(&reference_path)
        .ok()
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .with_context(|| format!("parsing {}", reference_path.display()))?;
    let setup = score::ScoreBenchSetup {
        experts_dir: &a.experts,
        reference,
        rows: a.rows,
        generation_rows: a.generation_rows,
        batch: a.batch,
    };
    let report = score::run(&bb, &tasks, &setup)?;
    let md = score::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

fn generate_bench(models_dir: &Path, a: GenerateArgs) -> Result<()> {
    let gguf = a
        .backbone
        .clone()
        .unwrap_or_else(|| models::backbone_path(models_dir));
    // 20 prompts: the first short test input of each task, rendered canonically.
    let mut texts = Vec::new();
    for t in load_suite(&a.suite)? {
        if let Some(i) = t.test.iter().find(|i| i.input.len() < 600) {
            texts.push(format!("{}\nAnswer:", i.input));
        }
    }
    texts.truncate(20);
    let python = if a.no_peer {
        None
    } else {
        super::peer_python(a.python.as_deref())
    };
    if python.is_none() && !a.no_peer {
        eprintln!("no peer Python (run scripts/setup-peers.sh): llama.cpp not measured");
    }
    let setup = generate::GenerateBenchSetup {
        gguf: &gguf,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        repeats: a.repeats,
        texts,
        python: python.as_deref(),
        peer_script: &a.peer_script,
    };
    let report = generate::run(&setup)?;
    let md = generate::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

fn context_bench(models_dir: &Path, a: ContextArgs) -> Result<()> {
    let gguf = a
        .backbone
        .clone()
        .unwrap_or_else(|| models::backbone_path(models_dir));
    let python = if a.no_peer {
        None
    } else {
        super::peer_python(a.python.as_deref())
    };
    if python.is_none() && !a.no_peer {
        eprintln!("no peer Python (run scripts/setup-peers.sh): llama.cpp not measured");
    }
    let setup = super::context::ContextSetup {
        gguf: &gguf,
        lengths: a.lengths.clone(),
        max_batch_prefill_tokens: a.max_batch_prefill_tokens,
        new_tokens: a.new_tokens,
        repeats: a.repeats,
        one_pass: !a.no_one_pass,
        python: python.as_deref(),
        peer_script: &a.peer_script,
    };
    let report = super::context::run(&setup)?;
    let md = super::context::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

/// What the serving benches run on: the backbone, and an empty library (in a temporary
/// folder, removed when the returned guard drops) embedding with the plain encoder.
fn serving_parts(
    models_dir: &Path,
    enc: Option<&Path>,
    backbone: Option<&Path>,
) -> Result<(
    Arc<roe_backbone::Backbone>,
    Arc<ExpertLibrary>,
    tempfile::TempDir,
)> {
    let backbone = Arc::new(models::load_backbone(models_dir, backbone)?);
    let encoder: Arc<dyn roe_expert_library::embedding::Encoder> =
        Arc::new(models::load_encoder(models_dir, enc)?);
    let work = tempfile::tempdir()?;
    let (library, _) = ExpertLibrary::open(work.path(), encoder, LibraryConfig::default())?;
    Ok((backbone, Arc::new(library), work))
}

fn serving_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: ServingArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let (backbone, library, _work) = serving_parts(models_dir, enc, a.backbone.as_deref())?;
    let tasks = load_suite(&a.tasks_dir)?;
    let setup = serving::ServingSetup {
        experts_dir: &a.experts,
        tasks: &tasks,
        concurrency: a.concurrency,
        rounds: a.rounds,
        generate_tokens: a.generate_tokens,
    };
    let report = rt.block_on(serving::run(library, backbone, &setup))?;
    let md = serving::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

fn arrivals_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: ArrivalsArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let (backbone, library, _work) = serving_parts(models_dir, enc, a.backbone.as_deref())?;
    let tasks = load_suite(&a.tasks_dir)?;
    let setup = arrivals::ArrivalsSetup {
        experts_dir: &a.experts,
        tasks: &tasks,
        requests: a.requests,
        gap: std::time::Duration::from_millis(a.gap_ms),
        max_new_tokens: a.max_new_tokens,
        rounds: a.rounds,
    };
    let report = rt.block_on(arrivals::run(library, backbone, &setup))?;
    let md = arrivals::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

fn answer_bench(
    models_dir: &Path,
    enc: Option<&Path>,
    a: AnswerArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let backbone = Arc::new(models::load_backbone(models_dir, a.backbone.as_deref())?);
    let work = tempfile::tempdir()?;
    let tasks = load_suite(&a.tasks_dir)?;
    let library = prompt_library(
        models_dir,
        enc,
        &a.cache_dir,
        work.path(),
        &tasks,
        &a.experts,
        a.s,
    )?;
    let setup = answer::AnswerSetup {
        tasks: &tasks,
        q: a.q,
        inputs: a.inputs,
        clients: a.clients,
        per_client: a.requests_per_client,
    };
    let report = rt.block_on(answer::run(Arc::new(library), backbone, a.s, &setup))?;
    let md = answer::markdown(&report);
    println!("{md}");
    save_report(&a.json, &report, &md)
}

/// A library in `dir` of `tasks`' reference prompt experts (`<task>/prompt`, S instances
/// each), reopened for serving. Registration embeds through the cache; Route requests embed
/// their queries for real (the serving encoder batches concurrent requests).
fn prompt_library<'a>(
    models_dir: &Path,
    enc: Option<&Path>,
    cache_dir: &Path,
    dir: &Path,
    tasks: impl IntoIterator<Item = &'a roe_task_suite::Task>,
    experts: &Path,
    s: usize,
) -> Result<ExpertLibrary> {
    {
        let cached = crate::caching_encoder::load_cached_encoder(models_dir, enc, cache_dir)?;
        let (library, _) = ExpertLibrary::open(dir, cached, LibraryConfig::default())?;
        for t in tasks {
            let peft = experts.join("prompt").join(t.name());
            if peft.is_dir() {
                library.register(
                    NewExpert {
                        id: format!("{}/prompt", t.name()),
                        name: t.name().to_string(),
                        description: t.info.description.clone(),
                        backbone: None,
                        adapter: PeftAdapter::from_dir(&peft)?,
                        instances: sample(&t.train, s, 0),
                    },
                    false,
                )?;
            }
        }
    }
    let serving: Arc<dyn roe_expert_library::embedding::Encoder> =
        Arc::new(models::load_serving_encoder(models_dir, enc)?);
    Ok(ExpertLibrary::open(dir, serving, LibraryConfig::default())?.0)
}

/// The folder and the base name of the results `--json <path>` names: they are written as
/// `<dir>/<name>.json` and `<dir>/<name>.md`. Only a `.json` or `.md` extension is taken off;
/// any other dot belongs to the name (`out/run.v2` writes `out/run.v2.json`, not
/// `out/run.json`).
fn split(json: &Path) -> (PathBuf, String) {
    let dir = json
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let ours = json
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json") || e.eq_ignore_ascii_case("md"));
    let name = if ours {
        json.file_stem()
    } else {
        json.file_name()
    };
    let name = name
        .map(|s| s.to_string_lossy().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "result".into());
    (dir, name)
}

/// The file beside the results `--json <path>` names, with `extension` (a chart:
/// `<dir>/<name>.png`), the same base name as [`split`] gives.
pub(crate) fn beside(json: &Path, extension: &str) -> PathBuf {
    let (dir, name) = split(json);
    dir.join(format!("{name}.{extension}"))
}

/// Writes a single-report benchmark (with the machine it ran on) as JSON and Markdown.
pub(crate) fn save_report(json: &Path, report: &impl serde::Serialize, md: &str) -> Result<()> {
    let (dir, name) = split(json);
    write_results(
        &dir,
        &name,
        &serde_json::json!({"machine": machine(), "report": report}),
        md,
    )
}

fn load_tasks(a: &RoutingArgs) -> Result<Vec<SuiteTask>> {
    let mut tasks = Vec::new();
    for (suite, root) in [("dev", &a.dev_suite), ("routing", &a.routing_suite)] {
        for task in load_suite(root).with_context(|| format!("loading {}", root.display()))? {
            let dir = a.experts.join("prompt").join(task.name());
            let adapter = dir
                .is_dir()
                .then(|| PeftAdapter::from_dir(&dir))
                .transpose()?;
            tasks.push(SuiteTask {
                suite: suite.into(),
                task,
                adapter,
            });
        }
    }
    Ok(tasks)
}

fn routing(
    models_dir: &Path,
    enc: Option<&Path>,
    a: RoutingArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let cached = crate::caching_encoder::load_cached_encoder(models_dir, enc, &a.cache_dir)?;
    let tasks = load_tasks(&a)?;
    if a.latency_only {
        return route_latency_only(models_dir, enc, &a, cached, &tasks, rt);
    }
    let variants = vec![
        Variant::new(
            "elm (paper) / instance",
            RouteOptions::elm(TextFormat::Instance),
        ),
        Variant::new(
            "elm (paper) / choice_instance",
            RouteOptions::elm(TextFormat::ChoiceInstance),
        ),
        Variant::new(
            "hybrid / instance",
            RouteOptions {
                text_format: TextFormat::Instance,
                ..RouteOptions::default()
            },
        ),
        Variant::new("hybrid (default)", RouteOptions::default()),
        Variant {
            labeled: true,
            ..Variant::new("hybrid (default), labeled queries", RouteOptions::default())
        },
    ];
    // Extra hybrid settings to compare, as `knn,centroid,lexical,t_centroid,t_lexical,top_k;...`.
    let mut variants = variants;
    for spec in a.grid.split(';').filter(|s| !s.trim().is_empty()) {
        let v: Vec<f32> = spec
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--grid entry {spec:?}"))?;
        anyhow::ensure!(v.len() == 6, "--grid entry {spec:?} needs 6 numbers");
        let options = RouteOptions {
            top_k: v[5] as usize,
            hybrid: roe_expert_library::retrieval::HybridParams {
                knn_weight: v[0],
                centroid_weight: v[1],
                lexical_weight: v[2],
                centroid_temperature: v[3],
                lexical_temperature: v[4],
            },
            ..RouteOptions::default()
        };
        variants.push(Variant::new(&format!("hybrid[{spec}]"), options));
    }
    let seeds: Vec<u64> = (0..a.seeds).collect();
    let work = tempfile::tempdir()?;
    eprintln!(
        "routing accuracy: {} tasks, S={}, Q={}, {} seeds",
        tasks.len(),
        a.s,
        a.q,
        seeds.len()
    );
    let setup = AccuracySetup {
        s: a.s,
        q: a.q,
        seeds: seeds.clone(),
        force_hnsw: false,
        engine: Default::default(),
    };
    let reports = routing_accuracy::run(&tasks, cached.clone(), &setup, &variants, work.path())?;
    let agreement: Vec<VariantReport> = if a.skip_agreement {
        Vec::new()
    } else {
        let mut all = Vec::new();
        for engine in roe_expert_library::engine::IndexEngine::ALL {
            eprintln!("HNSW vs exact agreement (HNSW forced on, engine {engine})");
            let setup = AccuracySetup {
                force_hnsw: true,
                engine,
                ..setup.clone()
            };
            let pick = [variants[1].clone(), variants[3].clone()];
            for mut r in routing_accuracy::run(&tasks, cached.clone(), &setup, &pick, work.path())?
            {
                r.name = format!("{} [{engine}]", r.name);
                all.push(r);
            }
        }
        all
    };
    let latency = if a.skip_latency {
        None
    } else {
        eprintln!("Route latency through gRPC: {} clients", a.clients);
        // Register with the cached encoder, then serve with the real one: queries are embedded
        // for real on every request.
        let dir = work.path().join("latency-library");
        register_latency_library(&dir, cached.clone(), &tasks, a.s)?;
        let real: Arc<dyn roe_expert_library::embedding::Encoder> =
            Arc::new(models::load_serving_encoder(models_dir, enc)?);
        let (lib, _) = ExpertLibrary::open(&dir, real, LibraryConfig::default())?;
        Some(rt.block_on(latency::route_latency(
            Arc::new(lib),
            latency_query_sets(&tasks, a.q),
            a.clients,
            a.requests_per_client,
        ))?)
    };

    let baseline: serde_json::Value =
        std::fs::read_to_string("assets/reference/elm_routing_baseline.json")
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
    let mut md = String::new();
    md.push_str(&format!(
        "# Routing benchmark\n\n41-expert library (23 dev + 18 routing-suite tasks), S={} instances per expert from train, Q={} queries from test, {} seeds. Accuracy = fraction of (task, seed) routed to the task's own expert. Encoder linear layers: {}.\n\n",
        a.s, a.q, seeds.len(),
        roe_cli::models::encoder_precision()?.in_effect()?
    ));
    md.push_str("| strategy | dev | routing | overall |\n|---|---|---|---|\n");
    for fmt in ["instance", "choice_instance"] {
        if let Some(b) = baseline.get(fmt) {
            md.push_str(&format!(
                "| peer: ELM paper code / {fmt} (reference file) | {:.3} | {:.3} | {:.3} |\n",
                b["dev"].as_f64().unwrap_or(f64::NAN),
                b["routing"].as_f64().unwrap_or(f64::NAN),
                b["overall"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    let mut table = String::new();
    for r in &reports {
        let line = format!(
            "| {} | {:.3} | {:.3} | {:.3} |\n",
            r.name,
            r.per_suite.get("dev").copied().unwrap_or(f64::NAN),
            r.per_suite.get("routing").copied().unwrap_or(f64::NAN),
            r.overall
        );
        table.push_str(&line);
    }
    md.push_str(&table);
    println!(
        "{:<34} {:>6} {:>8} {:>8}",
        "strategy", "dev", "routing", "overall"
    );
    for r in &reports {
        println!(
            "{:<34} {:>6.3} {:>8.3} {:>8.3}",
            r.name,
            r.per_suite.get("dev").copied().unwrap_or(f64::NAN),
            r.per_suite.get("routing").copied().unwrap_or(f64::NAN),
            r.overall
        );
    }
    md.push_str("\n## Per task\n\n| task |");
    for r in &reports {
        md.push_str(&format!(" {} |", r.name));
    }
    md.push_str("\n|---|");
    for _ in &reports {
        md.push_str("---|");
    }
    md.push('\n');
    if let Some(first) = reports.first() {
        for task in first.per_task.keys() {
            md.push_str(&format!("| {task} |"));
            for r in &reports {
                md.push_str(&format!(
                    " {:.2} |",
                    r.per_task.get(task).copied().unwrap_or(f64::NAN)
                ));
            }
            md.push('\n');
        }
    }
    for r in &reports {
        md.push_str(&format!("\n### Confusions: {}\n\n", r.name));
        for c in r.confusions.iter().take(15) {
            md.push_str(&format!("- {c}\n"));
        }
    }
    md.push_str("\n## Abstaining: winner's share, seen vs unseen tasks\n\nSeen: the task's own expert is in the library and won. Unseen: the same queries with the task's own expert excluded (leave-one-out). A threshold abstains below it.\n\n| strategy | mean share seen | mean share unseen |");
    let thresholds: Vec<f32> = reports
        .first()
        .map(|r| r.abstain.points.iter().map(|p| p.0).collect())
        .unwrap_or_default();
    for t in &thresholds {
        md.push_str(&format!(" t={t}: seen/unseen abstain |"));
    }
    md.push_str("\n|---|---|---|");
    for _ in &thresholds {
        md.push_str("---|");
    }
    md.push('\n');
    for r in &reports {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} |",
            r.name, r.abstain.seen_share_mean, r.abstain.unseen_share_mean
        ));
        for p in &r.abstain.points {
            md.push_str(&format!(" {:.2} / {:.2} |", p.1, p.2));
        }
        md.push('\n');
    }
    if !agreement.is_empty() {
        md.push_str("\n## HNSW vs exact search (HNSW forced on for the 41-expert library)\n\n| strategy | routed expert agreement | per-query top-1 agreement | accuracy with HNSW |\n|---|---|---|---|\n");
        for r in &agreement {
            md.push_str(&format!(
                "| {} | {:.4} | {:.4} | {:.3} |\n",
                r.name, r.hnsw_exact_agreement, r.hnsw_exact_top1_agreement, r.overall
            ));
            println!(
                "HNSW/exact agreement {:<28} routed {:.4}  top-1 {:.4}",
                r.name, r.hnsw_exact_agreement, r.hnsw_exact_top1_agreement
            );
        }
    }
    if let Some(l) = &latency {
        md.push_str(&format!("\n## Route latency through gRPC (loopback, real encoder, default strategy)\n\n| clients | Q | requests | p50 ms | p99 ms | mean ms | requests/s |\n|---|---|---|---|---|---|---|\n| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            l.clients, l.queries_per_request, l.requests, l.p50_ms, l.p99_ms, l.mean_ms, l.requests_per_s));
        println!(
            "Route latency: {} clients, Q={}: p50 {:.1} ms, p99 {:.1} ms, {:.2} req/s",
            l.clients, l.queries_per_request, l.p50_ms, l.p99_ms, l.requests_per_s
        );
    }
    let json = serde_json::json!({
        "setup": {"s": a.s, "q": a.q, "seeds": seeds, "tasks": tasks.len()},
        "machine": machine(),
        "peer_baseline": baseline,
        "variants": reports,
        "hnsw_agreement": agreement,
        "latency": latency,
    });
    let (dir, name) = split(&a.json);
    write_results(&dir, &name, &json, &md)?;
    println!("wrote {}/{name}.json and .md", dir.display());
    Ok(())
}

/// The routing benchmark's library in `dir`: every task's expert with `s` train rows,
/// registered through `encoder` (the bench's cache of embedded rows).
fn register_latency_library(
    dir: &Path,
    encoder: Arc<dyn roe_expert_library::embedding::Encoder>,
    tasks: &[SuiteTask],
    s: usize,
) -> Result<()> {
    let (lib, _) = ExpertLibrary::open(dir, encoder, LibraryConfig::default())?;
    for t in tasks {
        lib.register(
            NewExpert {
                id: t.task.name().into(),
                name: t.task.name().into(),
                description: String::new(),
                backbone: None,
                adapter: t.adapter.clone().unwrap_or_else(routing_only_adapter),
                instances: sample(&t.task.train, s, 0),
            },
            false,
        )?;
    }
    Ok(())
}

/// One Route request's queries per task: `q` of its test rows.
fn latency_query_sets(tasks: &[SuiteTask], q: usize) -> Vec<Vec<proto::Query>> {
    tasks
        .iter()
        .map(|t| {
            sample(&t.task.test, q, 99)
                .iter()
                .map(|i| proto::Query {
                    input: i.input.clone(),
                    choices: i.choices.clone(),
                    target: None,
                })
                .collect()
        })
        .collect()
}

/// Route latency through gRPC on the routing library: fresh queries through the real
/// encoder, then the same query sets again through the embedding cache (`roe serve`'s
/// default), warmed by one pass over every set.
fn route_latency_only(
    models_dir: &Path,
    enc: Option<&Path>,
    a: &RoutingArgs,
    cached: Arc<dyn roe_expert_library::embedding::Encoder>,
    tasks: &[SuiteTask],
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let work = tempfile::tempdir()?;
    let dir = work.path().join("latency-library");
    register_latency_library(&dir, cached, tasks, a.s)?;
    let sets = latency_query_sets(tasks, a.q);
    let batching: Arc<dyn roe_expert_library::embedding::Encoder> =
        Arc::new(models::load_serving_encoder(models_dir, enc)?);
    // Fresh: every request's queries go through the encoder (and no route is remembered).
    let no_route_cache = LibraryConfig {
        route_cache_bytes: 0,
        ..LibraryConfig::default()
    };
    let fresh = {
        let (lib, _) = ExpertLibrary::open(&dir, batching.clone(), no_route_cache.clone())?;
        rt.block_on(latency::route_latency(
            Arc::new(lib),
            sets.clone(),
            a.clients,
            a.requests_per_client,
        ))?
    };
    // Repeated: the same sets, their vectors in the embedding cache; first with the route
    // cache off (every route searched and voted again), then as `roe serve` runs by default,
    // with it.
    let caching = Arc::new(roe_encoder::CachingEncoder::new(batching, 64 << 20));
    let repeat = |config: LibraryConfig| -> Result<(
        latency::LatencyReport,
        Option<roe_expert_library::RouteCacheStats>,
    )> {
        let (lib, _) = ExpertLibrary::open(&dir, caching.clone(), config)?;
        let lib = Arc::new(lib);
        for set in &sets {
            let queries: Vec<_> = set
                .iter()
                .cloned()
                .map(roe_services::convert::query_from_proto)
                .collect();
            lib.route(&queries, &RouteOptions::default())?;
        }
        let report = rt.block_on(latency::route_latency(
            lib.clone(),
            sets.clone(),
            a.clients,
            a.requests_per_client,
        ))?;
        Ok((report, lib.route_cache_stats()))
    };
    let (searched, _) = repeat(no_route_cache)?;
    let (repeated, route_cache) = repeat(LibraryConfig {
        route_cache_bytes: roe_expert_library::library::DEFAULT_ROUTE_CACHE_BYTES,
        ..LibraryConfig::default()
    })?;
    let route_cache = route_cache.unwrap_or_default();
    use std::sync::atomic::Ordering::Relaxed;
    let (hits, misses) = (
        caching.stats().hits.load(Relaxed),
        caching.stats().misses.load(Relaxed),
    );
    let row = |name: &str, l: &latency::LatencyReport| {
        format!(
            "| {name} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            l.clients,
            l.queries_per_request,
            l.requests,
            l.p50_ms,
            l.p99_ms,
            l.mean_ms,
            l.requests_per_s
        )
    };
    let md = format!(
        "# Route latency through gRPC\n\n`roe bench routing --latency-only`: the {} experts of \
         the routing benchmark (S={}), Q={} test queries per request, {} concurrent clients, \
         loopback gRPC, the real encoder, default strategy. Fresh: every query embedded, no \
         route cache. Repeated: the same query sets again, after one warm-up pass over every \
         set, their vectors in the embedding cache (`roe serve --embedding-cache-mb`, default \
         64; it answered {hits} texts and embedded {misses}): once with the route cache off \
         (each route searched and voted again), once with it on (`roe serve --route-cache-mb 16`; {} hits, {} misses, the misses being the warm-up pass).\n\n\
         | queries | clients | Q | requests | p50 ms | p99 ms | mean ms | routes/s |\n\
         |---|---|---|---|---|---|---|---|\n{}{}{}",
        tasks.len(),
        a.s,
        a.q,
        a.clients,
        route_cache.hits,
        route_cache.misses,
        row("fresh", &fresh),
        row("repeated, embedding cache only", &searched),
        row("repeated, embedding + route cache", &repeated),
    );
    let json = serde_json::json!({
        "setup": {"s": a.s, "q": a.q, "tasks": tasks.len(), "clients": a.clients},
        "machine": machine(),
        "fresh": fresh,
        "repeated_searched": searched,
        "repeated": repeated,
        "cache": {"hits": hits, "misses": misses},
        "route_cache": {"hits": route_cache.hits, "misses": route_cache.misses},
    });
    let (out, _) = split(&a.json);
    write_results(&out, "route-latency", &json, &md)?;
    println!("{md}");
    Ok(())
}

fn encoder_bench(models_dir: &Path, enc: Option<&Path>, a: EncoderArgs) -> Result<()> {
    let tasks = load_suite(&a.suite)?;
    let mut texts: Vec<String> = Vec::new();
    let per = a.texts.div_ceil(tasks.len().max(1));
    for t in &tasks {
        texts.extend(sample(&t.test, per, 5).into_iter().map(|i| i.input));
    }
    texts.truncate(a.texts);
    let python = if a.no_peer {
        None
    } else {
        a.python.clone().or_else(|| {
            let p = PathBuf::from(".venv/bin/python");
            p.exists().then_some(p)
        })
    };
    let dir = models::encoder_dir(models_dir, enc);
    let r = encoder::run(&dir, texts, python.as_deref(), &a.peer_script)?;
    let f32_row = match (r.f32_sentences_per_s, r.min_cosine_vs_f32) {
        (Some(rate), Some(cos)) => format!(
            "| roe, f32 path (the fallback; same run) | {rate:.1} |\n\nbf16 / f32 path: {:.2}x; least cosine between the bf16 and f32 paths' vectors over the {} texts: {cos:.6}\n",
            r.roe_sentences_per_s / rate,
            r.texts
        ),
        _ => String::new(),
    };
    let md = format!(
        "# Encoder benchmark\n\n{} texts (test inputs of the dev suite), batch {}, same machine, same run, best of 3 passes each. roe's linear layers: **{}** (chosen at run time: bf16 where the CPU has AVX-512 BF16).\n\n| engine | sentences/s |\n|---|---|\n| roe ({}, all-MiniLM-L6-v2) | {:.1} |\n| sentence-transformers (fp32) | {} |\n{}\nratio roe / sentence-transformers: **{}**\n\nmin cosine between roe's and sentence-transformers' vectors: {}\n\nroe's allocator: {}\n",
        r.texts, r.batch_size, r.precision, r.precision, r.roe_sentences_per_s,
        r.peer_sentences_per_s.map(|p| format!("{p:.1}")).unwrap_or_else(|| "not run".into()),
        f32_row,
        r.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into()),
        r.min_cosine_vs_peer.map(|x| format!("{x:.6}")).unwrap_or_else(|| "n/a".into()),
        if std::env::var_os("ROE_DEFAULT_MALLOC").is_some() {
            "glibc defaults (ROE_DEFAULT_MALLOC set)"
        } else {
            "glibc keeping freed memory (roe's default, see cli/src/process.rs)"
        },
    );
    println!("{md}");
    save_report(&a.json, &r, &md)?;
    Ok(())
}

fn hnsw_bench(a: HnswArgs) -> Result<()> {
    let defaults = IndexConfig::default();
    let config = IndexConfig {
        max_connections: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef_search.unwrap_or(defaults.ef_search),
        ..defaults
    };
    let python = if a.no_peer {
        None
    } else {
        super::peer_python(a.python.as_deref())
    };
    if !a.no_peer && python.is_none() {
        anyhow::bail!("no peer Python: run scripts/setup-peers.sh, pass --python, or --no-peer");
    }
    let peer = python.as_deref().map(|python| hnsw::Peer {
        python,
        script: &a.peer_script,
        work_dir: &a.work_dir,
    });
    let r = hnsw::run(
        a.n,
        a.queries,
        a.clusters.unwrap_or((a.n / 20).max(1)),
        config,
        &a.ef_sweep,
        &a.engines,
        peer,
    )?;
    let md = hnsw_markdown(&r);
    println!("{md}");
    save_report(&a.json, &r, &md)?;
    let png = beside(&a.json, "png");
    hnsw::draw_curve(&r, &png)?;
    println!("curve: {}", png.display());
    Ok(())
}

fn hnsw_markdown(r: &hnsw::HnswReport) -> String {
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.0}", b as f64 / 1048576.0))
            .unwrap_or_else(|| "n/a".into())
    };
    let kernels: Vec<String> = r
        .engines
        .iter()
        .map(|e| format!("{}: {}", e.engine, e.kernels.as_deref().unwrap_or("none")))
        .collect();
    let mut md = format!(
        "# HNSW at scale: roe's engines against hnswlib\n\n{} synthetic normalised {}-d vectors ({} clusters; \
         queries are {} perturbed stored points), M={}, ef_construction={}, all built with {} \
         threads on the same vectors; single-query search on one thread; recall@10 against the \
         exact top-10 (a batched exact scan). Raw vectors: {:.0} MiB (f32). roe's engines run \
         through roe's index (`--index-engine`): `graph` is roe's own HNSW, vectors in bf16 \
         beside their links; `hnsw_rs` is the hnsw_rs crate on f32 vectors; both have their \
         candidates scored again on roe's own f32 rows (kernels: {}). RSS growth is the \
         process's resident memory after the build less before it, the vectors already loaded \
         (roe's index holds its own f32 copy of them); the first engine is measured first, the \
         others in the same process after it was dropped, where freed memory the allocator \
         reuses can make their growth read low; hnswlib runs in a process of its own. \
         Unreachable: live points no graph search can reach after the build.\n\n\
         | index | build s | RSS growth MiB | RSS / raw vectors | unreachable points |\n|---|---|---|---|---|\n",
        r.vectors,
        r.dim,
        r.clusters,
        r.queries,
        r.max_connections,
        r.ef_construction,
        r.build_threads,
        r.raw_vector_bytes as f64 / 1048576.0,
        kernels.join("; "),
    );
    let ratio_raw = |b: Option<u64>| {
        b.map(|b| format!("{:.2}x", b as f64 / r.raw_vector_bytes as f64))
            .unwrap_or_else(|| "n/a".into())
    };
    let mut sides: Vec<(String, &hnsw::SideReport, String)> = r
        .engines
        .iter()
        .map(|e| {
            (
                format!("roe `{}`", e.engine),
                &e.side,
                e.unreachable_points.to_string(),
            )
        })
        .collect();
    if let Some(h) = &r.hnswlib {
        sides.push(("hnswlib".to_string(), h, "n/a".to_string()));
    }
    for (name, s, unreachable) in &sides {
        md += &format!(
            "| {name} | {:.1} | {} | {} | {unreachable} |\n",
            s.build_s,
            mib(s.rss_growth_bytes),
            ratio_raw(s.rss_growth_bytes)
        );
    }
    md += "\n| ef_search |";
    for (name, _, _) in &sides {
        md += &format!(" {name} p50 ms | {name} p99 ms | {name} recall@10 |");
    }
    md += "\n|---|";
    for _ in &sides {
        md += "---|---|---|";
    }
    md += "\n";
    for (i, p) in r.roe.curve.iter().enumerate() {
        md += &format!("| {} |", p.ef_search);
        for (_, s, _) in &sides {
            match s.curve.get(i) {
                Some(c) => {
                    md += &format!(
                        " {:.3} | {:.3} | {:.4} |",
                        c.p50_ms, c.p99_ms, c.recall_at_10
                    )
                }
                None => md += " n/a | n/a | n/a |",
            }
        }
        md += "\n";
    }
    md += &format!("\nExact scan p50: {:.2} ms per query.", r.exact_scan_p50_ms);
    for e in &r.engines {
        md += &format!(
            " `{}`: the {} queries of one Route searched together (`search_many`, ef_search={}, \
             k=10) p50 {:.2} ms, p99 {:.2} ms.",
            e.engine, r.route_q, r.route_ef_search, e.route_search_p50_ms, e.route_search_p99_ms
        );
    }
    md += "\n";
    if let Some(h) = &r.hnswlib {
        md += "\n## Ratios (each engine / hnswlib, same run)\n\n";
        for e in &r.engines {
            let s = &e.side;
            md += &format!(
                "- `{}` build: {:.2}x (goal <= 1.5x)\n",
                e.engine,
                s.build_s / h.build_s
            );
            if let (Some(a), Some(b)) = (s.rss_growth_bytes, h.rss_growth_bytes) {
                md += &format!(
                    "- `{}` RSS growth: {:.2}x hnswlib's; {:.2}x the raw vectors (goal <= 2x)\n",
                    e.engine,
                    a as f64 / b as f64,
                    a as f64 / r.raw_vector_bytes as f64
                );
            }
            match (s.fastest_at(0.95), h.fastest_at(0.95)) {
                (Some(a), Some(b)) => {
                    md += &format!(
                        "- `{}` search p50 at recall@10 >= 0.95 (each side's fastest such ef_search): {:.3} ms (ef {}, recall {:.4}), hnswlib {:.3} ms (ef {}, recall {:.4}): {:.2}x (goal <= 1.2x)\n",
                        e.engine, a.p50_ms, a.ef_search, a.recall_at_10, b.p50_ms, b.ef_search, b.recall_at_10, a.p50_ms / b.p50_ms
                    )
                }
                _ => {
                    md += &format!(
                        "- `{}` or hnswlib never reached recall@10 0.95 on this sweep\n",
                        e.engine
                    )
                }
            }
        }
        if let Some(v) = &r.hnswlib_versions {
            md += &format!("\nPeer: {v}\n");
        }
    }
    md
}

fn startup_bench(a: StartupArgs) -> Result<()> {
    let index = IndexConfig {
        max_connections: a.m,
        ef_construction: a.ef_construction,
        ..IndexConfig::default()
    };
    if let Some(phase) = &a.phase {
        let persist = match phase.as_str() {
            "rebuild" => true,
            "reload" => false,
            o => anyhow::bail!("unknown phase {o:?} (rebuild or reload)"),
        };
        let r = super::startup::open_phase(&a.dir, index, persist)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    eprintln!(
        "writing {} synthetic vectors through the store, then opening the library twice ...",
        a.n
    );
    let r = super::startup::run(a.n, &a.dir, index.clone());
    let _ = std::fs::remove_dir_all(&a.dir);
    let r = r?;
    let mib = |b: u64| format!("{:.0}", b as f64 / 1048576.0);
    let opt_mib = |b: Option<u64>| b.map(mib).unwrap_or_else(|| "n/a".into());
    let row = |name: &str, p: &super::startup::OpenPhase| {
        format!(
            "| {name} | {} | {:.1} | {:.1} | {} | {} |\n",
            p.index,
            p.open_s,
            p.index_s,
            opt_mib(p.rss_after_open_bytes),
            opt_mib(p.peak_rss_bytes)
        )
    };
    let md = format!(
        "# Library start-up at scale\n\n\
         {} stored vectors in {} experts (synthetic, 384-d), written through the real sled store \
         in {:.1} s ({} MiB). The library is then opened twice, each time in a fresh process: \
         cold, with no persisted index, reading every vector from sled and rebuilding the index \
         (HNSW: {}, M={}, ef_construction={}), then persisting the graphs (graph files \
         into roe-index/ in the library directory: {:.1} s, {} MiB on disk); and warm, reading \
         the vectors again and reloading the persisted graphs.\n\n\
         | open | index | open s | of which index s | RSS after open MiB | peak RSS MiB |\n\
         |---|---|---|---|---|---|\n{}{}",
        r.vectors,
        r.experts,
        r.write_s,
        mib(r.store_bytes),
        r.cold.hnsw,
        index.max_connections,
        index.ef_construction,
        r.cold.persist_s.unwrap_or(f64::NAN),
        mib(r.cold.dump_bytes),
        row("cold (rebuild)", &r.cold),
        row("warm (reload)", &r.warm),
    );
    let mut md = md;
    if let Some(route) = &r.warm.route {
        md += &format!(
            "\nOn the reloaded index (warm process): Route with Q={} precomputed query vectors \
             (no encoder time; default hybrid options; each set perturbed copies of one \
             expert's stored vectors), {} routes: **p50 {:.1} ms**, p99 {:.1} ms, top expert right \
             {}/{}.",
            route.q, route.routes, route.p50_ms, route.p99_ms, route.correct, route.routes
        );
    }
    if let Some(s) = r.warm.register_s {
        md += &format!(
            " Registering one more expert of 1,000 instances there (synthetic encoder, sled \
             write, graph insertion, lexical refresh): **{s:.2} s**.\n"
        );
    }
    if let (Some(idle), Some(busy)) = (&r.warm.route_idle, &r.warm.route_while_registering) {
        md += &format!(
            "\n## Route while experts register\n\nThe same Route (Q={}), {} routes idle and {} \
             routes while another thread registers experts of 1,000 instances back to back ({} \
             registered meanwhile; graph insertion runs without the routing lock):\n\n\
             | | p50 ms | p99 ms | top expert right |\n|---|---|---|---|\n\
             | idle | {:.1} | {:.1} | {}/{} |\n| while registering | {:.1} | {:.1} | {}/{} |\n\n\
             p99 while registering / idle p99: **{:.2}x** (goal <= 2x).\n",
            idle.q,
            idle.routes,
            busy.routes,
            r.warm.registered_while_routing.unwrap_or(0),
            idle.p50_ms,
            idle.p99_ms,
            idle.correct,
            idle.routes,
            busy.p50_ms,
            busy.p99_ms,
            busy.correct,
            busy.routes,
            busy.p99_ms / idle.p99_ms
        );
    }
    println!("{md}");
    save_report(&a.json, &r, &md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{beside, split};
    use std::path::{Path, PathBuf};

    fn names(json: &str) -> (PathBuf, String) {
        split(Path::new(json))
    }

    #[test]
    fn json_and_md_extensions_are_taken_off() {
        assert_eq!(
            names("bench/results/routing.json"),
            (PathBuf::from("bench/results"), "routing".to_string())
        );
        assert_eq!(
            names("out/report.md"),
            (PathBuf::from("out"), "report".to_string())
        );
        assert_eq!(
            names("out/run.v2.json"),
            (PathBuf::from("out"), "run.v2".to_string())
        );
    }

    #[test]
    fn a_name_without_our_extension_keeps_every_dot() {
        assert_eq!(
            names("out/run.v2/report"),
            (PathBuf::from("out/run.v2"), "report".to_string())
        );
        assert_eq!(
            names("out/routing.v2"),
            (PathBuf::from("out"), "routing.v2".to_string())
        );
        assert_eq!(names("report"), (PathBuf::from("."), "report".to_string()));
        assert_eq!(
            beside(Path::new("out/routing.v2"), "png"),
            PathBuf::from("out/routing.v2.png")
        );
        assert_eq!(
            beside(Path::new("bench/results/hnsw.json"), "png"),
            PathBuf::from("bench/results/hnsw.png")
        );
    }
}
