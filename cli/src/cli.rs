//! The `roe` command line: a thin client of the gRPC API (plus `serve` and `bench`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::models;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, Limits};
use roe_expert_library::PeftAdapter;
use roe_services::auth::{ApiKeys, AuthLayer, ClientKey, KeyedChannel};
use roe_services::library_service::{least_upload_budget, UploadLimits};
use roe_services::load_shed::ConcurrencyLimitLayer;
use roe_services::proto::{
    self, answerer_client::AnswererClient, expert_library_client::ExpertLibraryClient,
    inference_client::InferenceClient, router_client::RouterClient,
};
use roe_services::remote::{RemoteExpertSource, RemoteRouter, RemoteTimeouts};
use roe_services::server::{serve, serve_inference, ServeOptions, MAX_MESSAGE_BYTES};
use roe_services::tls::ClientTls;
use roe_serving::{BackboneInference, RequestLimits, ServingConfig};
use roe_task_suite::{load_suite, read_instances, sample, Task};

#[derive(Parser)]
#[command(
    name = "roe",
    version,
    about = "Retrieval-of-Experts: route a task to the expert that fits it"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    /// Log lines as text (colours only on a terminal) or as JSON objects, one per line.
    #[arg(long, env = "ROE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Folder holding the models (filled by scripts/fetch-models.sh); any local folder works.
    #[arg(long, env = "ROE_MODELS_DIR", default_value = "models", global = true)]
    pub models_dir: PathBuf,
    /// Encoder model folder (default: <models-dir>/all-MiniLM-L6-v2).
    #[arg(long, env = "ROE_ENCODER", global = true)]
    pub encoder: Option<PathBuf>,
    /// Server address for client commands.
    #[arg(
        long,
        env = "ROE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// API key sent to the server (`authorization: Bearer <key>`).
    #[arg(long, env = "ROE_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) to trust for an https:// server besides the system's roots (a
    /// private CA, or a self-signed server's own certificate: one made as a CA, as `openssl
    /// req -x509` does, is accepted when the server presents exactly it).
    #[arg(long, env = "ROE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Name the server's certificate must carry when the URL names it otherwise (e.g.
    /// `localhost` for https://127.0.0.1:50051).
    #[arg(long, env = "ROE_TLS_DOMAIN", global = true)]
    pub tls_domain: Option<String>,
}

impl Global {
    /// How this process checks the servers it calls over https.
    pub fn client_tls(&self) -> Result<ClientTls> {
        Ok(ClientTls::new(
            self.tls_ca.as_deref(),
            self.tls_domain.as_deref(),
        )?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (library + router, health, reflection).
    Serve(Box<ServeArgs>),
    /// Manage experts in the library.
    #[command(subcommand)]
    Expert(ExpertCommand),
    /// Rank the experts for a task given by example queries.
    Route(RouteArgs),
    /// Score answer choices for an input with an expert (or the bare backbone).
    Score(ScoreArgs),
    /// Generate an answer for an input with an expert, printing tokens as they stream.
    Generate(GenerateArgs),
    /// Route a task by example inputs and answer inputs with the winning expert (or the
    /// server's fallback when routing abstains), in one call.
    Answer(AnswerArgs),
    /// Training jobs: list, follow, cancel (start one with `roe expert train`).
    #[command(subcommand)]
    Train(crate::training::TrainCommand),
    /// Benchmarks; results go to bench/results/ (runs `roe-bench`, built beside `roe` by
    /// `cargo build --release --bin roe-bench`; `roe bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// TLS certificates for a private deployment.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The evaluation report (bare, oracle, routed, merged, ensemble, leave-one-out) under
    /// bench/results/eval.{md,json,png} (runs `roe-bench eval`).
    #[command(disable_help_flag = true)]
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Make a private CA (ca.pem, for clients' --tls-ca) and a server certificate it signs
    /// (cert.pem and key.pem, for roe serve --tls-cert/--tls-key) in --out-dir; the CA's key
    /// is not kept.
    SelfSigned(crate::tls::SelfSignedArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "ROE_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Where the HTTP API listens: OpenAI-compatible completions and chat (model "auto"
    /// routes), roe's JSON endpoints, /openapi.json and Prometheus /metrics. Empty: no HTTP
    /// server. Default 127.0.0.1:8080; not served by --role inference (the router process
    /// serves it).
    #[arg(long, env = "ROE_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Where the sled library lives; with --database-url, only this replica's dump of its
    /// index (and the training jobs' files).
    #[arg(long, env = "ROE_DATA_DIR", default_value = "data/library")]
    data_dir: PathBuf,
    /// Keep the library in PostgreSQL (postgres://user:password@host:port/db), shared by
    /// every replica given the same URL: each follows the database's change log. Without
    /// it, the library is sled's files under --data-dir (one process).
    #[arg(long, env = "ROE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Idle connections kept to the database (with --database-url).
    #[arg(long, env = "ROE_DATABASE_POOL", default_value_t = 4)]
    database_pool: usize,
    /// With --database-url: the longest a replica goes without reading the change log when
    /// no notification arrives (notifications are only a doorbell; ms).
    #[arg(long, env = "ROE_FOLLOW_INTERVAL_MS", default_value_t = 2000)]
    follow_interval_ms: u64,
    /// Longest a read that passes min_library_seq waits for this replica to apply it before
    /// UNAVAILABLE (ms; the request's deadline also bounds it).
    #[arg(long, env = "ROE_MIN_SEQ_WAIT_MS", default_value_t = 2000)]
    min_seq_wait_ms: u64,
    /// Abstain when the winner's share of the evidence is below this (0: never).
    #[arg(long, env = "ROE_ABSTAIN_THRESHOLD", default_value_t = 0.0)]
    abstain_threshold: f32,
    /// Live vectors from which on HNSW replaces the exact scan.
    #[arg(long, default_value_t = 20_000)]
    hnsw_threshold: usize,
    /// The HNSW implementation: `graph` (roe's own, the measured fastest) or `hnsw_rs`.
    /// Recorded in the persisted index: a dump of the other engine is rebuilt at start.
    #[arg(long, env = "ROE_INDEX_ENGINE", default_value = "graph")]
    index_engine: roe_expert_library::engine::IndexEngine,
    /// Backbone GGUF file (default:
    /// <models-dir>/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, env = "ROE_BACKBONE")]
    backbone: Option<PathBuf>,
    /// Serve only the library and router (no backbone, no Inference service).
    #[arg(long)]
    no_inference: bool,
    /// Expert that answers `roe answer` / Answerer calls when routing abstains (default: the
    /// bare backbone); checked at start.
    #[arg(long, env = "ROE_FALLBACK_EXPERT")]
    fallback_expert: Option<String>,
    /// What this process serves: `all` (library, router and inference in one process),
    /// `router` (library and router, no backbone) or `inference` (Inference and Answerer on
    /// the backbone; experts and routing from --library-url; no data dir, no encoder).
    #[arg(long, env = "ROE_ROLE", value_enum, default_value_t = ServeRole::All)]
    role: ServeRole,
    /// With --role inference: the `roe serve --role router` process whose ExpertLibrary and
    /// Router this process uses, e.g. http://127.0.0.1:50052.
    #[arg(long, env = "ROE_LIBRARY_URL")]
    library_url: Option<String>,
    #[command(flatten)]
    serving: ServingArgs,
    /// Where training jobs keep their rows, state and checkpoints (default:
    /// <data-dir>/training).
    #[arg(long, env = "ROE_TRAINING_DIR")]
    training_dir: Option<PathBuf>,
    /// Training jobs run at once (each uses every core); others wait in the queue.
    #[arg(long, env = "ROE_TRAINING_WORKERS", default_value_t = 1)]
    training_workers: usize,
    /// Training jobs that may wait beyond the running ones.
    #[arg(long, env = "ROE_TRAINING_QUEUE", default_value_t = 16)]
    training_queue: usize,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    limits: LimitsArgs,
    /// Serve gRPC and the HTTP API over TLS (HTTPS) with this certificate chain (PEM); needs
    /// --tls-key. `roe tls self-signed` makes one for a private deployment.
    #[arg(long, env = "ROE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "ROE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve the HTTP API in plaintext beyond loopback although API keys are set (they and
    /// the prompts then cross the network in clear): behind a proxy that terminates TLS, or
    /// a port published only on the host's loopback (docker compose).
    #[arg(long, env = "ROE_HTTP_ALLOW_PLAINTEXT")]
    http_allow_plaintext: bool,
    /// Requests in flight (streams count until they end) past which calls are refused with
    /// RESOURCE_EXHAUSTED; health is never refused. 0: no bound.
    #[arg(long, env = "ROE_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    max_concurrent_requests: usize,
    /// After SIGTERM or Ctrl-C, how long requests in flight may take to finish (ms).
    #[arg(long, env = "ROE_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// After this long without work (ms of the process using next to no CPU), return the
    /// freed heap memory kept for reuse to the kernel; 0: never (the resident size then stays
    /// at its high-water mark).
    #[arg(long, env = "ROE_IDLE_TRIM_MS", default_value_t = 2_000)]
    idle_trim_ms: u64,
    /// Freed heap memory kept for reuse past which it is returned to the kernel at once, busy
    /// or not (MiB; 0: no bound, only --idle-trim-ms returns it).
    #[arg(long, env = "ROE_MAX_KEPT_FREE_MB", default_value_t = 512)]
    max_kept_free_mb: u64,
}

impl ServeArgs {
    /// The server's TLS identity, read before anything slow is loaded.
    fn tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(roe_services::tls::server_config(cert, key)?)),
            _ => Ok(None),
        }
    }

    /// The HTTP API's TLS configuration, from the same files as gRPC's.
    fn https(&self) -> Result<Option<roe_services::tls::HttpsConfig>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(roe_services::tls::https_config(cert, key)?)),
            _ => Ok(None),
        }
    }

    /// The serving core's configuration, with the request limits of `--max-*`.
    fn config(&self) -> ServingConfig {
        ServingConfig {
            limits: self.limits.requests(),
            ..self.serving.config()
        }
    }

    fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Who may call the server (`roe serve`).
#[derive(Args)]
struct AccessArgs {
    /// Keys that may write and read: comma separated, or @FILE with one per line; NAME:KEY
    /// names a key in the logs. Several at once allow rotation.
    #[arg(
        long,
        env = "ROE_ADMIN_KEYS",
        default_value = "",
        hide_env_values = true
    )]
    admin_keys: String,
    /// Keys that may only read (route, score, generate, answer, get, list, watch).
    #[arg(
        long,
        env = "ROE_READ_KEYS",
        default_value = "",
        hide_env_values = true
    )]
    read_keys: String,
    /// Reflection needs a read key (default: public, like health).
    #[arg(long, env = "ROE_PRIVATE_REFLECTION")]
    private_reflection: bool,
    /// Serve beyond loopback without API keys: anyone who reaches the port may write.
    #[arg(long, env = "ROE_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
}

/// Whether every address `addr` resolves to is loopback (only this machine reaches it).
async fn is_loopback(addr: &str) -> Result<bool> {
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .collect();
    Ok(resolved.iter().all(|a| a.ip().is_loopback()))
}

/// API keys sent in clear are as good as published, and prompts with them: the HTTP API in
/// plaintext beyond loopback with keys set is refused at start, as an open server is, unless
/// asked for (TLS terminated by a proxy in front, a port published only on loopback).
async fn refuse_plaintext_http(addr: &str, keys: &ApiKeys, allowed: bool) -> Result<()> {
    if keys.is_empty() || is_loopback(addr).await? {
        return Ok(());
    }
    if !allowed {
        bail!(
            "refusing to serve the HTTP API on {addr} in plaintext with API keys: the keys and \
             the prompts would cross the network in clear. Set --tls-cert and --tls-key \
             (HTTPS, the same as gRPC's), bind --http-addr to 127.0.0.1, or pass \
             --http-allow-plaintext (behind a proxy that terminates TLS)"
        );
    }
    tracing::warn!(
        %addr,
        "the HTTP API is served in plaintext beyond loopback (--http-allow-plaintext): API keys \
         and prompts cross the network in clear up to whatever terminates TLS"
    );
    Ok(())
}

impl AccessArgs {
    /// The key check for every service, refusing to expose an open server by accident.
    async fn layer(&self, addr: &str) -> Result<AuthLayer> {
        let keys = ApiKeys::parse(&self.admin_keys, &self.read_keys)?;
        if keys.is_empty() {
            let loopback = is_loopback(addr).await?;
            if !loopback && !self.allow_unauthenticated {
                bail!(
                    "refusing to serve {addr} without API keys: anyone who reaches it could \
                     delete the library. Set --admin-keys (and --read-keys), bind to \
                     127.0.0.1, or pass --allow-unauthenticated"
                );
            }
            tracing::warn!(
                %addr,
                "no API keys: every client that reaches the port may read and write"
            );
        } else {
            tracing::info!(keys = keys.len(), "API keys required (health is public)");
        }
        Ok(AuthLayer::new(Arc::new(keys), !self.private_reflection))
    }
}

/// How much one client may store and ask for (`roe serve`); a refusal names the field and
/// the limit.
#[derive(Args)]
struct LimitsArgs {
    /// Quota: experts the library may hold.
    #[arg(long, env = "ROE_MAX_EXPERTS", default_value_t = Limits::default().max_experts)]
    max_experts: usize,
    /// Quota: bytes the library may hold (adapters, instances and their vectors).
    #[arg(long, env = "ROE_MAX_LIBRARY_BYTES", default_value_t = Limits::default().max_library_bytes)]
    max_library_bytes: u64,
    /// Bytes of one adapter's weights file (below the 64 MiB message, so that every expert
    /// can be read back whole).
    #[arg(long, env = "ROE_MAX_ADAPTER_BYTES", default_value_t = Limits::default().max_adapter_bytes)]
    max_adapter_bytes: usize,
    /// Bytes that registrations in progress may hold at once: a unary one its message, a
    /// streamed one its header and announced weights (--max-adapter-bytes unannounced) and
    /// each instance it streams. A registration waits for room up to
    /// --upload-queue-timeout-ms. Default: 4 × --max-adapter-bytes (240 MiB); at least the
    /// largest registration (64 MiB, or --max-adapter-bytes and 1 MiB); 0: no bound.
    #[arg(long, env = "ROE_MAX_UPLOAD_BYTES_IN_FLIGHT")]
    max_upload_bytes_in_flight: Option<u64>,
    /// How long a registration waits for room under --max-upload-bytes-in-flight (or a place
    /// under --max-concurrent-uploads) before RESOURCE_EXHAUSTED (ms).
    #[arg(long, env = "ROE_UPLOAD_QUEUE_TIMEOUT_MS", default_value_t = 10_000)]
    upload_queue_timeout_ms: u64,
    /// Streamed registrations at once (each holds its place for as long as its client
    /// sends); 0: no bound. Unary registrations are bounded by their bytes only.
    #[arg(long, env = "ROE_MAX_CONCURRENT_UPLOADS", default_value_t = 0)]
    max_concurrent_uploads: usize,
    /// Bytes of one input, target, description or query.
    #[arg(long, env = "ROE_MAX_TEXT_BYTES", default_value_t = Limits::default().max_text_bytes)]
    max_text_bytes: usize,
    /// Bytes of one choice, everywhere a choice is sent.
    #[arg(long, env = "ROE_MAX_CHOICE_BYTES", default_value_t = Limits::default().max_choice_bytes)]
    max_choice_bytes: usize,
    /// Bytes of text (queries and their choices) in one Route request.
    #[arg(long, env = "ROE_MAX_ROUTE_TEXT_BYTES", default_value_t = Limits::default().max_route_text_bytes)]
    max_route_text_bytes: usize,
    /// Bytes of text one Answer or ScoreEnsemble call may have the backbone read (inputs,
    /// choices, members together).
    #[arg(long, env = "ROE_MAX_WORK_BYTES", default_value_t = RequestLimits::default().max_work_bytes)]
    max_work_bytes: usize,
    /// Input tokens (prompt and soft prompt) of one Score, Generate or Answer input; 0: the
    /// backbone's context (8,192 for SmolLM2). A prompt must also leave room for its answer
    /// in the context; past either, the request is refused naming its field, or cut from the
    /// front when it asks to `truncate`.
    #[arg(long, env = "ROE_MAX_INPUT_LENGTH", default_value_t = 0)]
    max_input_length: usize,
}

impl LimitsArgs {
    fn library(&self) -> Limits {
        Limits {
            max_experts: self.max_experts,
            max_library_bytes: self.max_library_bytes,
            max_adapter_bytes: self.max_adapter_bytes,
            max_text_bytes: self.max_text_bytes,
            max_choice_bytes: self.max_choice_bytes,
            max_route_text_bytes: self.max_route_text_bytes,
            ..Limits::default()
        }
    }

    /// The bounds on registrations in progress; a byte budget too small for the largest
    /// registration the limits allow is refused at start (that registration could never pass).
    fn uploads(&self) -> Result<UploadLimits> {
        let least = least_upload_budget(self.max_adapter_bytes);
        let bytes_in_flight = match self.max_upload_bytes_in_flight {
            None => (self.max_adapter_bytes as u64).saturating_mul(4).max(least),
            Some(bytes) if bytes > 0 && bytes < least => bail!(
                "--max-upload-bytes-in-flight {bytes}: below the largest registration the limits \
                 allow, {least} bytes (a 64 MiB message, or --max-adapter-bytes and 1 MiB); \
                 raise it, or give 0 for no bound"
            ),
            Some(bytes) => bytes,
        };
        Ok(UploadLimits {
            bytes_in_flight,
            queue_timeout: std::time::Duration::from_millis(self.upload_queue_timeout_ms),
            max_streams: self.max_concurrent_uploads,
        })
    }

    fn requests(&self) -> RequestLimits {
        RequestLimits {
            max_choice_bytes: self.max_choice_bytes,
            max_work_bytes: self.max_work_bytes,
            max_input_tokens: self.max_input_length,
            ..RequestLimits::default()
        }
    }
}

/// The serving core's batching, queues, cache and remote deadlines (`roe serve`).
#[derive(Args)]
struct ServingArgs {
    /// Score requests one backbone pass may merge.
    #[arg(long, env = "ROE_MAX_SCORE_BATCH", default_value_t = ServingConfig::default().max_score_batch)]
    max_score_batch: usize,
    /// How long the Score queue waits for company after a request arrives (ms).
    #[arg(long, env = "ROE_SCORE_BATCH_WAIT_MS", default_value_t = 5)]
    score_batch_wait_ms: u64,
    /// Rows one generation batch may hold (at most 16).
    #[arg(long, env = "ROE_MAX_GENERATE_BATCH", default_value_t = ServingConfig::default().max_generate_batch)]
    max_generate_batch: usize,
    /// How long the generation queue waits for company after a request arrives (ms).
    #[arg(long, env = "ROE_GENERATE_BATCH_WAIT_MS", default_value_t = 10)]
    generate_batch_wait_ms: u64,
    /// Let generations join a batch that is already running (continuous batching).
    #[arg(long, env = "ROE_JOIN_RUNNING_GENERATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    join_running_generations: bool,
    /// Submissions each queue holds before callers wait.
    #[arg(long, env = "ROE_QUEUE_CAPACITY", default_value_t = ServingConfig::default().queue_capacity)]
    queue_capacity: usize,
    /// Memory for loaded experts (MiB of weights).
    #[arg(long, env = "ROE_EXPERT_CACHE_MB", default_value_t = 512)]
    expert_cache_mb: u64,
    /// Positions one prompt forward pass holds over all its rows: a longer prompt runs in
    /// chunks of this many, which bounds a pass's attention scores (an 8,192-token prompt in
    /// one pass would hold 2.4 GB of them); short prompts share passes up to it.
    #[arg(long, env = "ROE_MAX_BATCH_PREFILL_TOKENS", default_value_t = roe_backbone::DEFAULT_MAX_BATCH_PREFILL_TOKENS)]
    max_batch_prefill_tokens: usize,
    /// Memory for the vectors of texts already embedded (MiB; 0: no cache): a query or an
    /// instance seen before is not embedded again.
    #[arg(long, env = "ROE_EMBEDDING_CACHE_MB", default_value_t = 64)]
    embedding_cache_mb: u64,
    /// Memory for the results of routes already answered (MiB; 0: no cache): the same
    /// queries with the same options, on a library unchanged since, are answered without any
    /// work. Any write to the library makes earlier results unreachable.
    #[arg(long, env = "ROE_ROUTE_CACHE_MB", default_value_t = 16)]
    route_cache_mb: u64,
    /// With --role inference: deadline of each call to the router process (ms).
    #[arg(long, env = "ROE_REMOTE_TIMEOUT_MS", default_value_t = 30_000)]
    remote_timeout_ms: u64,
    /// With --role inference: time to connect to the router process (ms).
    #[arg(long, env = "ROE_REMOTE_CONNECT_TIMEOUT_MS", default_value_t = 3_000)]
    remote_connect_timeout_ms: u64,
}

impl ServingArgs {
    fn config(&self) -> ServingConfig {
        use std::time::Duration;
        ServingConfig {
            max_score_batch: self.max_score_batch,
            score_batch_wait: Duration::from_millis(self.score_batch_wait_ms),
            max_generate_batch: self.max_generate_batch,
            generate_batch_wait: Duration::from_millis(self.generate_batch_wait_ms),
            join_running_generations: self.join_running_generations,
            queue_capacity: self.queue_capacity,
            expert_cache_bytes: self.expert_cache_mb << 20,
            ..ServingConfig::default()
        }
    }

    fn remote_timeouts(&self) -> RemoteTimeouts {
        use std::time::Duration;
        RemoteTimeouts {
            connect: Duration::from_millis(self.remote_connect_timeout_ms),
            request: Duration::from_millis(self.remote_timeout_ms),
        }
    }
}

/// The processes of a split deployment (`roe serve --role ...`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum ServeRole {
    /// Library, router and inference in one process (the default).
    All,
    /// Library and router only.
    Router,
    /// Inference (and Answerer) only, reading experts from --library-url.
    Inference,
}

#[derive(Args)]
struct AnswerArgs {
    /// What to answer: JSON lines of {"input", "choices"?, "target"?}, or a task folder (rows
    /// of its test split). Rows with choices are scored; without, generated.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Example inputs of the task to route by (same formats; default: the inputs).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Rows drawn from a task folder given to --inputs.
    #[arg(long, default_value_t = 8)]
    num_inputs: usize,
    /// Rows drawn from a task folder given to --queries.
    #[arg(long = "num-queries", default_value_t = 32)]
    num_queries: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send the queries' targets too (labeled examples of the task).
    #[arg(long)]
    labeled: bool,
    /// Generate text for every input instead of scoring its choices.
    #[arg(long)]
    generate: bool,
    /// With --generate; 0: the server's default (64).
    #[arg(long, default_value_t = 0)]
    max_new_tokens: u32,
    /// Fall back when the winner's share is below this (default: the server's).
    #[arg(long)]
    abstain_threshold: Option<f32>,
    /// Keep the input's last tokens that fit when it is longer than the backbone may read
    /// (its context less the answer's tokens), instead of an error; the cut is reported.
    #[arg(long)]
    truncate: bool,
    /// Print the whole response as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    /// Expert id (empty or omitted: the bare backbone).
    #[arg(long, default_value = "")]
    expert: String,
    #[arg(long)]
    input: String,
    /// An answer choice (repeat for each).
    #[arg(long = "choice", required = true)]
    choices: Vec<String>,
    /// Keep the input's last tokens that fit when it is longer than the backbone may read
    /// (its context less the answer's tokens), instead of an error; the cut is reported.
    #[arg(long)]
    truncate: bool,
    /// Print the whole response as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Expert id (empty or omitted: the bare backbone).
    #[arg(long, default_value = "")]
    expert: String,
    #[arg(long)]
    input: String,
    /// 0: the server's default (64).
    #[arg(long, default_value_t = 0)]
    max_new_tokens: u32,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0: 1.0.
    #[arg(long, default_value_t = 0.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// A stop string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Keep the input's last tokens that fit when it is longer than the backbone may read
    /// (its context less the answer's tokens), instead of an error; the cut is reported.
    #[arg(long)]
    truncate: bool,
}

#[derive(Subcommand)]
enum ExpertCommand {
    /// Register an expert from a PEFT directory and a file (or task folder) of instances.
    Add(AddArgs),
    /// Register one expert per task of a suite, from a folder of PEFT experts.
    AddSuite(AddSuiteArgs),
    /// List experts.
    Ls {
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Show one expert.
    Show {
        id: String,
        /// Also print its instances.
        #[arg(long)]
        instances: bool,
    },
    /// Delete an expert.
    Rm { id: String },
    /// Merge experts of one kind into a new expert (LoRA: weighted sum of the deltas, rank =
    /// sum of ranks; prompt: weighted average, or --concat).
    Merge(MergeArgs),
    /// Train an expert on the frozen backbone (prompt tuning or LoRA) from a task folder or
    /// labeled rows; it is registered when done. Follows the job with a progress bar.
    Train(Box<crate::training::TrainArgs>),
    /// Write an expert's PEFT folder (loads in Hugging Face PEFT).
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct MergeArgs {
    /// Id of the merged expert.
    #[arg(long)]
    id: String,
    /// Source expert ids, comma separated.
    #[arg(long = "from", value_delimiter = ',', required = true)]
    from: Vec<String>,
    /// One relative weight per source, comma separated (normalised to sum 1; default uniform).
    #[arg(long, value_delimiter = ',', conflicts_with = "concat")]
    weights: Option<Vec<f64>>,
    /// Prompt experts: concatenate the prompts instead of averaging them.
    #[arg(long)]
    concat: bool,
    #[arg(long, default_value = "")]
    name: String,
    /// Default: "merged from a, b (weights ...)".
    #[arg(long, default_value = "")]
    description: String,
    /// Replace an existing expert with a new version.
    #[arg(long)]
    new_version: bool,
}

#[derive(Args)]
struct AddArgs {
    /// PEFT directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    peft: PathBuf,
    /// JSON lines of {"input", "target"?, "choices"?}, or a task folder (task.json + train.jsonl).
    #[arg(long)]
    instances: PathBuf,
    /// Instances sampled into the library (S).
    #[arg(long, default_value_t = 100)]
    sample: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Expert id (default: the task's name or the PEFT folder's name).
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// Replace an existing expert with a new version.
    #[arg(long)]
    new_version: bool,
}

#[derive(Args)]
struct AddSuiteArgs {
    /// Folder of task folders.
    #[arg(long, default_value = "assets/tasks")]
    tasks: PathBuf,
    /// Folder with prompt/<task> and lora/<task> PEFT experts.
    #[arg(long, default_value = "assets/experts/smollm2-135m")]
    experts: PathBuf,
    /// Which experts: prompt, lora or both.
    #[arg(long, default_value = "prompt")]
    kind: String,
    #[arg(long, default_value_t = 100)]
    sample: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip experts that already exist instead of failing.
    #[arg(long)]
    skip_existing: bool,
}

#[derive(Args)]
struct RouteArgs {
    /// Query texts.
    #[arg(long = "query", short = 'q')]
    queries: Vec<String>,
    /// JSON lines of {"input", "choices"?} (or a task folder: queries drawn from test.jsonl).
    #[arg(long)]
    from: Option<PathBuf>,
    /// Route every task of a suite with queries from its test split and print a table.
    #[arg(long, conflicts_with_all = ["queries", "from"])]
    suite: Option<PathBuf>,
    /// Queries drawn per task (Q) with --from DIR or --suite.
    #[arg(long = "num-queries", default_value_t = 32)]
    num_queries: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// elm or hybrid (default: the server's).
    #[arg(long)]
    strategy: Option<String>,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// instance or choice_instance.
    #[arg(long)]
    text_format: Option<String>,
    /// prompt or lora.
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    abstain_threshold: Option<f32>,
    /// Send the rows' targets too (labeled examples of the task), with --from or --suite.
    #[arg(long)]
    labeled: bool,
    /// Print the whole response as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    // The server logs its work; client commands and benchmarks print tables, so only warnings.
    let default_filter = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colour escapes only where a person reads them, never into files or collectors.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(a) => {
            let served = rt.block_on(cmd_serve(&cli.global, *a));
            // Past the drain deadline, blocking work still running (a request the server
            // stopped waiting for) must not hold the process.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            served
        }
        Command::Expert(c) => rt.block_on(cmd_expert(&cli.global, c)),
        Command::Route(a) => rt.block_on(cmd_route(&cli.global, a)),
        Command::Score(a) => rt.block_on(cmd_score(&cli.global, a)),
        Command::Generate(a) => rt.block_on(cmd_generate(&cli.global, a)),
        Command::Answer(a) => rt.block_on(cmd_answer(&cli.global, a)),
        Command::Train(c) => rt.block_on(crate::training::cmd_train(&cli.global, c)),
        Command::Bench { args } => run_bench(&cli.global, None, args),
        Command::Eval { args } => run_bench(&cli.global, Some("eval"), args),
        Command::Tls(TlsCommand::SelfSigned(a)) => crate::tls::cmd_self_signed(&a),
    }
}

/// Runs the `roe-bench` binary that sits beside this one with the global options, so the
/// benchmarks (and their plotting and peers) stay out of the `roe` binary.
fn run_bench(g: &Global, first: Option<&str>, args: Vec<std::ffi::OsString>) -> Result<()> {
    let exe = std::env::current_exe().context("locating the roe binary")?;
    let bench = exe.with_file_name(format!("roe-bench{}", std::env::consts::EXE_SUFFIX));
    if !bench.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bin roe-bench`",
            bench.display()
        );
    }
    let mut cmd = std::process::Command::new(&bench);
    cmd.arg("--models-dir").arg(&g.models_dir);
    if let Some(encoder) = &g.encoder {
        cmd.arg("--encoder").arg(encoder);
    }
    cmd.arg("--server").arg(&g.server);
    cmd.args(first).args(args);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bench.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Where the HTTP API listens unless told otherwise.
const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

async fn cmd_serve(g: &Global, a: ServeArgs) -> Result<()> {
    crate::process::spawn_memory_returner(crate::process::MemoryReturn {
        idle: std::time::Duration::from_millis(a.idle_trim_ms),
        max_kept_bytes: a.max_kept_free_mb << 20,
    });
    match a.role {
        ServeRole::Inference => return cmd_serve_inference(g, a).await,
        _ if a.library_url.is_some() => bail!(
            "--library-url is for --role inference; roles all and router hold the library \
             themselves"
        ),
        _ => {}
    }
    // Keys are checked first: a server that would be exposed fails before loading anything.
    let auth = a.access.layer(&a.addr).await?;
    let http_addr = a
        .http_addr
        .clone()
        .unwrap_or_else(|| DEFAULT_HTTP_ADDR.to_string());
    let tls = a.tls()?;
    let https = if http_addr.is_empty() {
        None
    } else {
        a.access.layer(&http_addr).await?;
        let https = a.https()?;
        if https.is_none() {
            refuse_plaintext_http(&http_addr, auth.keys(), a.http_allow_plaintext).await?;
        }
        https
    };
    let uploads = a.limits.uploads()?;
    tracing::info!(
        bytes_in_flight = uploads.bytes_in_flight,
        queue_timeout_ms = uploads.queue_timeout.as_millis() as u64,
        max_streams = uploads.max_streams,
        "upload bounds"
    );
    // Installed before anything records: the exporter /metrics renders.
    let metrics = roe_http::metrics::install();
    // The router role is the library and router of the single process, without the backbone.
    let no_inference = a.no_inference || a.role == ServeRole::Router;
    let encoder: Arc<dyn roe_expert_library::embedding::Encoder> = {
        let batching = Arc::new(models::load_serving_encoder(
            &g.models_dir,
            g.encoder.as_deref(),
        )?);
        match a.serving.embedding_cache_mb {
            0 => batching,
            mb => Arc::new(roe_encoder::CachingEncoder::new(batching, mb << 20)),
        }
    };
    // Loaded first so that registration validates experts against the shape of the model
    // that will run them, not a built-in one.
    let backbone = if no_inference {
        None
    } else {
        Some(Arc::new(load_backbone(g, &a).await?))
    };
    let mut config = LibraryConfig {
        index: roe_expert_library::index::IndexConfig {
            hnsw_threshold: a.hnsw_threshold,
            engine: a.index_engine,
            ..Default::default()
        },
        limits: a.limits.library(),
        route_cache_bytes: a.serving.route_cache_mb << 20,
        ..Default::default()
    };
    match &backbone {
        Some(bb) => config.backbones[0].shape = bb.model_shape(),
        // The router role runs no model, but checks registrations against the backbone the
        // inference processes run: its GGUF header, when the file is here.
        None => {
            let path = backbone_file(g, &a);
            match roe_backbone::BackboneConfig::read(&path) {
                Ok(c) => config.backbones[0].shape = c.model_shape(),
                Err(e) if a.backbone.is_some() => {
                    return Err(e).with_context(|| format!("reading {}", path.display()))
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "no backbone header to check registrations against; using SmolLM2-135M's shape"
                ),
            }
        }
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let (library, report) = match &a.database_url {
        None => ExpertLibrary::open(&a.data_dir, encoder, config)?,
        Some(url) => {
            let pg = roe_library_pg::PgConfig {
                url: url.clone(),
                pool_size: a.database_pool.max(1),
                ..roe_library_pg::PgConfig::default()
            };
            let dir = a.data_dir.clone();
            tokio::task::spawn_blocking(move || {
                let store = roe_library_pg::PgStore::connect(&pg)?;
                tracing::info!(database = %store.url_redacted(), "library in PostgreSQL");
                ExpertLibrary::open_shared(Arc::new(store), &dir, encoder, config)
            })
            .await??
        }
    };
    tracing::info!(
        experts = report.experts,
        vectors = report.vectors,
        seconds = report.seconds,
        index_reloaded = report.index.is_reloaded(),
        "library loaded"
    );
    let library = Arc::new(library);
    // A replica on a shared library applies the other replicas' writes as they commit.
    ExpertLibrary::follow(
        &library,
        std::time::Duration::from_millis(a.follow_interval_ms.max(10)),
    )?;
    if !report.index.is_reloaded() {
        // Rebuilt (first start, or after a crash): dump it now, not only at a clean shutdown,
        // so that a crash loop does not rebuild the graphs at every start. Writes wait for
        // the dump; routing does not.
        let library = library.clone();
        tokio::task::spawn_blocking(move || match library.persist_index() {
            Ok(Some(r)) => tracing::info!(report = ?r, "rebuilt index persisted"),
            Ok(None) => {}
            Err(e) => tracing::warn!("could not persist the rebuilt index: {e}"),
        });
    }
    let training_backbone = backbone.clone();
    let inference = backbone.map(|bb| {
        let inference = BackboneInference::over_library(bb, library.clone(), a.config());
        // The configuration in effect (batch sizes brought within what the queues run).
        tracing::info!(config = ?inference.config(), "serving configuration");
        Arc::new(inference)
    });
    let fallback_expert = a.fallback_expert.clone().unwrap_or_default();
    match &inference {
        Some(svc) => check_fallback(svc, &fallback_expert).await?,
        None if !fallback_expert.is_empty() => {
            bail!("--fallback-expert needs the Inference service (drop --no-inference)")
        }
        None => {}
    }
    // Training needs the backbone and the library in this process.
    let training = match training_backbone {
        Some(bb) => {
            let dir = a
                .training_dir
                .clone()
                .unwrap_or_else(|| a.data_dir.join("training"));
            let jobs = roe_trainer::TrainingJobs::open(
                &dir,
                bb,
                base_model_name(&library.backbone(None)?.name),
                library.clone(),
                roe_trainer::JobsConfig {
                    workers: a.training_workers,
                    max_queued: a.training_queue,
                },
            )
            .with_context(|| format!("opening the training jobs in {}", dir.display()))?;
            Some(Arc::new(jobs))
        }
        None => None,
    };
    let listener = bind(&a.addr).await?;
    let route_defaults = roe_expert_library::RouteOptions {
        abstain_threshold: a.abstain_threshold,
        ..Default::default()
    };
    let concurrency = ConcurrencyLimitLayer::new(a.max_concurrent_requests);
    let http = if http_addr.is_empty() {
        None
    } else {
        let router = Arc::new(roe_serving::LocalRouter::new(
            library.clone(),
            route_defaults.clone(),
        ));
        let answerer = inference.clone().map(|i| {
            Arc::new(roe_serving::BackboneAnswerer::new(
                i,
                router.clone(),
                fallback_expert.clone(),
            ))
        });
        let mut state =
            roe_http::HttpState::new(library.clone(), router, inference.clone(), answerer);
        state.keys = auth.keys().clone();
        state.limit = concurrency.permits();
        state.metrics = metrics;
        state.min_seq_wait = std::time::Duration::from_millis(a.min_seq_wait_ms);
        let listener = tokio::net::TcpListener::bind(&http_addr)
            .await
            .with_context(|| format!("binding --http-addr {http_addr}"))?;
        // Tests read this line (the scheme follows from --tls-cert).
        println!("roe HTTP listening on {}", listener.local_addr()?);
        Some((listener, state, https))
    };
    let options = ServeOptions {
        min_seq_wait: std::time::Duration::from_millis(a.min_seq_wait_ms),
        auth,
        concurrency,
        uploads,
        tls,
        route_defaults,
        inference,
        fallback_expert,
        route_client: None,
        training,
    };
    let drain = a.drain_timeout();
    serve_with_drain(drain, |shutdown| async move {
        // Both servers stop on the same signal.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some((listener, state, https)) = http {
            let shutdown = until(stopped.clone());
            tokio::spawn(async move {
                if let Err(e) = roe_http::serve(listener, state, https, shutdown).await {
                    tracing::error!("the HTTP server stopped: {e}");
                }
            });
        }
        serve(listener, library, options, until(stopped)).await
    })
    .await
}

/// What trained adapters name as their base model: the Hugging Face id PEFT loads for roe's
/// default backbone, else the backbone's name in the library.
fn base_model_name(backbone: &str) -> String {
    match backbone {
        "smollm2-135m" => "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        other => other.into(),
    }
}

/// A fallback that cannot answer is a configuration error: fail at start, not per request.
async fn check_fallback(inference: &BackboneInference, fallback_expert: &str) -> Result<()> {
    if fallback_expert.is_empty() {
        return Ok(());
    }
    inference
        .check_expert(fallback_expert)
        .await
        .map_err(|e| anyhow::anyhow!("--fallback-expert {fallback_expert:?}: {e}"))?;
    tracing::info!(expert = %fallback_expert, "fallback expert checked");
    Ok(())
}

/// Binds the server's address and says where it listens (tests read that line).
async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("roe listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// Serves until Ctrl-C or SIGTERM, then lets the requests in flight finish for at most
/// `drain` (a client watching a training job, or a long generation, would otherwise hold the
/// shutdown for as long as it likes).
async fn serve_with_drain<F>(
    drain: std::time::Duration,
    serve: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut stopping = rx.clone();
    let shutdown = Box::pin(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let mut stopping = rx;
    let deadline = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        served = serve(shutdown) => Ok(served?),
        _ = deadline => {
            tracing::warn!(?drain, "drain deadline passed: closing the requests still running");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` sends).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

/// The backbone GGUF `roe serve` runs (or checks registrations against).
fn backbone_file(g: &Global, a: &ServeArgs) -> PathBuf {
    a.backbone
        .clone()
        .unwrap_or_else(|| models::backbone_path(&g.models_dir))
}

async fn load_backbone(g: &Global, a: &ServeArgs) -> Result<roe_backbone::Backbone> {
    let path = backbone_file(g, a);
    let t = std::time::Instant::now();
    let backbone = tokio::task::spawn_blocking({
        let path = path.clone();
        let prefill = a.serving.max_batch_prefill_tokens;
        move || {
            roe_backbone::Backbone::load(&path, None)
                .map(|b| b.with_max_batch_prefill_tokens(prefill))
        }
    })
    .await?
    .with_context(|| {
        format!(
            "loading the backbone from {} (run scripts/fetch-models.sh, pass --backbone / \
             ROE_BACKBONE, or --no-inference)",
            path.display()
        )
    })?;
    tracing::info!(
        path = %path.display(),
        seconds = t.elapsed().as_secs_f64(),
        context_length = backbone.context_length(),
        max_batch_prefill_tokens = backbone.max_batch_prefill_tokens(),
        "backbone loaded"
    );
    Ok(backbone)
}

/// `roe serve --role inference`: the backbone with `roe.v1.Inference` and `roe.v1.Answerer`;
/// experts (metadata, and weights on a cache miss) and routing come from the router process
/// at --library-url. No sled library and no encoder here.
async fn cmd_serve_inference(g: &Global, a: ServeArgs) -> Result<()> {
    let Some(url) = a.library_url.clone() else {
        bail!(
            "--role inference needs --library-url (ROE_LIBRARY_URL): the address of a \
             `roe serve --role router`"
        );
    };
    if a.no_inference {
        bail!("--no-inference contradicts --role inference");
    }
    // The HTTP API needs the library: the router process serves it (an image's
    // ROE_HTTP_ADDR must not stop an inference process from starting).
    if let Some(addr) = a.http_addr.as_ref().filter(|h| !h.is_empty()) {
        tracing::warn!(
            %addr,
            "--http-addr is not used by --role inference: the router process serves the HTTP API"
        );
    }
    let auth = a.access.layer(&a.addr).await?;
    let tls = a.tls()?;
    let timeouts = a.serving.remote_timeouts();
    // This process's calls to the router process carry --api-key (a read key suffices).
    let key = ClientKey::new(g.api_key.as_deref())?;
    let peer_tls = g.client_tls()?;
    let experts = Arc::new(RemoteExpertSource::new(
        &url,
        timeouts,
        key.clone(),
        &peer_tls,
    )?);
    let route_client = Arc::new(RemoteRouter::new(&url, timeouts, key, &peer_tls)?);
    let backbone = load_backbone(g, &a).await?;
    // Experts are registered for the library's default backbone; the router process runs
    // the same default configuration.
    let backbone_name = LibraryConfig::default()
        .backbones
        .first()
        .map(|b| b.name.clone())
        .unwrap_or_default();
    let svc = Arc::new(BackboneInference::start(
        Arc::new(backbone),
        experts,
        backbone_name,
        a.config(),
    ));
    tracing::info!(config = ?svc.config(), ?timeouts, "serving configuration");
    let fallback_expert = a.fallback_expert.clone().unwrap_or_default();
    check_fallback(&svc, &fallback_expert).await?;
    let listener = bind(&a.addr).await?;
    tracing::info!(library = %url, "inference only; experts and routing from the library process");
    let options = ServeOptions {
        auth,
        concurrency: ConcurrencyLimitLayer::new(a.max_concurrent_requests),
        fallback_expert,
        route_client: Some(route_client),
        training: None,
        tls,
        ..ServeOptions::default()
    };
    let drain = a.drain_timeout();
    serve_with_drain(drain, |shutdown| {
        serve_inference(listener, svc, options, shutdown)
    })
    .await
}

/// A connection to --server whose calls carry --api-key.
pub(crate) async fn channel(g: &Global) -> Result<KeyedChannel> {
    let key = ClientKey::new(g.api_key.as_deref())?;
    let endpoint = tonic::transport::Endpoint::from_shared(g.server.clone())
        .with_context(|| format!("--server {:?} is not a URL", g.server))?;
    let channel = g
        .client_tls()?
        .apply(endpoint)?
        .connect()
        .await
        .with_context(|| format!("connecting to {} (is `roe serve` running?)", g.server))?;
    Ok(KeyedChannel::new(channel, key))
}

pub(crate) async fn library_client(g: &Global) -> Result<ExpertLibraryClient<KeyedChannel>> {
    let c = ExpertLibraryClient::new(channel(g).await?);
    Ok(c.max_encoding_message_size(MAX_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_MESSAGE_BYTES))
}

pub(crate) fn to_proto_instances(v: Vec<roe_expert_library::Instance>) -> Vec<proto::Instance> {
    v.into_iter()
        .map(roe_services::convert::instance_to_proto)
        .collect()
}

/// Instances from a JSON-lines file, or the train split of a task folder.
fn load_instances(path: &Path) -> Result<(Vec<roe_expert_library::Instance>, Option<Task>)> {
    if path.is_dir() {
        let task = Task::load(path)?;
        Ok((task.train.clone(), Some(task)))
    } else {
        Ok((read_instances(path, &[])?, None))
    }
}

fn kind_name(k: i32) -> &'static str {
    match proto::ExpertKind::try_from(k) {
        Ok(proto::ExpertKind::Prompt) => "prompt",
        Ok(proto::ExpertKind::Lora) => "lora",
        _ => "?",
    }
}

async fn cmd_expert(g: &Global, c: ExpertCommand) -> Result<()> {
    let mut client = library_client(g).await?;
    match c {
        ExpertCommand::Train(a) => crate::training::cmd_expert_train(g, *a).await?,
        ExpertCommand::Export { id, out } => crate::training::cmd_export(g, id, out).await?,
        ExpertCommand::Add(a) => {
            let adapter = PeftAdapter::from_dir(&a.peft)?;
            let (all, task) = load_instances(&a.instances)?;
            let instances = sample(&all, a.sample, a.seed);
            let id =
                a.id.clone()
                    .or_else(|| task.as_ref().map(|t| t.name().to_string()))
                    .unwrap_or_else(|| {
                        a.peft
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default()
                    });
            let description = if a.description.is_empty() {
                task.as_ref()
                    .map(|t| t.info.description.clone())
                    .unwrap_or_default()
            } else {
                a.description
            };
            // The server checks what arrived against these before storing anything.
            let (safetensors_bytes, safetensors_sha256) = (
                Some(adapter.safetensors.len() as u64),
                adapter.safetensors_sha256_hex(),
            );
            let resp = client
                .register_expert(proto::RegisterExpertRequest {
                    expected_version: Default::default(),
                    id: id.clone(),
                    name: id,
                    description,
                    backbone: String::new(),
                    adapter: Some(proto::PeftAdapter {
                        adapter_config_json: adapter.config_json,
                        adapter_model_safetensors: adapter.safetensors,
                    }),
                    instances: to_proto_instances(instances),
                    new_version: a.new_version,
                    safetensors_bytes,
                    safetensors_sha256,
                })
                .await?
                .into_inner();
            if let Some(e) = resp.expert {
                println!(
                    "registered {} v{} ({}, {} instances)",
                    e.id,
                    e.version,
                    kind_name(e.kind),
                    e.num_instances
                );
            }
        }
        ExpertCommand::AddSuite(a) => {
            let kinds: Vec<&str> = match a.kind.as_str() {
                "both" => vec!["prompt", "lora"],
                "prompt" => vec!["prompt"],
                "lora" => vec!["lora"],
                other => bail!("--kind: {other:?} is not prompt, lora or both"),
            };
            let tasks = load_suite(&a.tasks)?;
            let bar = ProgressBar::new((tasks.len() * kinds.len()) as u64).with_style(
                ProgressStyle::with_template("registering [{bar:40}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            for task in &tasks {
                for kind in &kinds {
                    let dir = a.experts.join(kind).join(task.name());
                    if !dir.is_dir() {
                        bar.println(format!(
                            "skip {}: no {kind} expert at {}",
                            task.name(),
                            dir.display()
                        ));
                        bar.inc(1);
                        continue;
                    }
                    bar.set_message(task.name().to_string());
                    let id = if kinds.len() > 1 {
                        format!("{}/{kind}", task.name())
                    } else {
                        task.name().to_string()
                    };
                    let adapter = PeftAdapter::from_dir(&dir)?;
                    let (safetensors_bytes, safetensors_sha256) = (
                        Some(adapter.safetensors.len() as u64),
                        adapter.safetensors_sha256_hex(),
                    );
                    let res = client
                        .register_expert(proto::RegisterExpertRequest {
                            expected_version: Default::default(),
                            id: id.clone(),
                            name: id.clone(),
                            description: task.info.description.clone(),
                            backbone: String::new(),
                            adapter: Some(proto::PeftAdapter {
                                adapter_config_json: adapter.config_json,
                                adapter_model_safetensors: adapter.safetensors,
                            }),
                            instances: to_proto_instances(sample(&task.train, a.sample, a.seed)),
                            new_version: false,
                            safetensors_bytes,
                            safetensors_sha256,
                        })
                        .await;
                    match res {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::AlreadyExists && a.skip_existing => {
                            bar.println(format!("exists {id}"));
                        }
                        Err(s) => return Err(s).with_context(|| format!("registering {id}")),
                    }
                    bar.inc(1);
                }
            }
            bar.finish_and_clear();
            println!(
                "{} experts in the library",
                client
                    .list_experts(proto::ListExpertsRequest {
                        min_library_seq: Default::default(),
                        page_size: 1,
                        page_token: String::new()
                    })
                    .await?
                    .into_inner()
                    .total
            );
        }
        ExpertCommand::Ls { page_size } => {
            let mut token = String::new();
            println!(
                "{:<44} {:<7} {:>3} {:>9} {:<14}",
                "id", "kind", "ver", "instances", "backbone"
            );
            loop {
                let page = client
                    .list_experts(proto::ListExpertsRequest {
                        min_library_seq: Default::default(),
                        page_size,
                        page_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                for e in &page.experts {
                    println!(
                        "{:<44} {:<7} {:>3} {:>9} {:<14}",
                        e.id,
                        kind_name(e.kind),
                        e.version,
                        e.num_instances,
                        e.backbone
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        ExpertCommand::Show { id, instances } => {
            let r = client
                .get_expert(proto::GetExpertRequest {
                    min_library_seq: Default::default(),
                    id,
                    include_instances: instances,
                    include_adapter: false,
                })
                .await?
                .into_inner();
            let e = r.expert.context("server sent no expert")?;
            println!("id:          {}\nname:        {}\nkind:        {}\nversion:     {}\nbackbone:    {}\ninstances:   {}\nweights:     {} bytes, adapter_model.safetensors sha256 {} (with the config: {})\ndescription: {}",
                e.id, e.name, kind_name(e.kind), e.version, e.backbone, e.num_instances, e.weights_bytes,
                if e.safetensors_sha256.is_empty() { "-" } else { &e.safetensors_sha256 },
                e.weights_sha256, e.description);
            if e.lora_r > 0 {
                println!(
                    "lora:        r={} alpha={} on {:?}",
                    e.lora_r, e.lora_alpha, e.target_modules
                );
            } else {
                println!("prompt:      {} virtual tokens", e.num_virtual_tokens);
            }
            if let Some(t) = &e.training {
                let score =
                    |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
                println!(
                    "trained:     job {}, {} steps on {} rows, final loss {:.4}, held-out {} {} (bare {}) on {} rows",
                    t.job_id, t.steps, t.train_rows, t.final_loss, t.metric,
                    score(t.held_out_score), score(t.held_out_baseline), t.held_out_rows
                );
                println!("recipe:      {}", t.recipe_json);
            }
            for i in r.instances {
                println!(
                    "- {}",
                    serde_json::json!({"input": i.input, "target": i.target, "choices": i.choices})
                );
            }
        }
        ExpertCommand::Merge(a) => {
            if let Some(w) = &a.weights {
                if w.len() != a.from.len() {
                    bail!(
                        "--weights: {} weights for {} sources in --from",
                        w.len(),
                        a.from.len()
                    );
                }
            }
            let sources = a
                .from
                .iter()
                .enumerate()
                .map(|(i, id)| proto::MergeSource {
                    expert_id: id.trim().to_string(),
                    weight: a.weights.as_ref().and_then(|w| w.get(i).copied()),
                })
                .collect();
            let mode = if a.concat {
                proto::PromptMergeMode::Concat
            } else {
                proto::PromptMergeMode::Unspecified
            };
            let e = client
                .merge_experts(proto::MergeExpertsRequest {
                    expected_version: Default::default(),
                    id: a.id,
                    name: a.name,
                    description: a.description,
                    sources,
                    prompt_mode: mode as i32,
                    new_version: a.new_version,
                })
                .await?
                .into_inner()
                .expert
                .context("server sent no expert")?;
            let shape = if e.lora_r > 0 {
                format!("r={} on {:?}", e.lora_r, e.target_modules)
            } else {
                format!("{} virtual tokens", e.num_virtual_tokens)
            };
            println!(
                "merged {} v{} ({}, {shape}, {} instances): {}",
                e.id,
                e.version,
                kind_name(e.kind),
                e.num_instances,
                e.description
            );
        }
        ExpertCommand::Rm { id } => {
            let r = client
                .delete_expert(proto::DeleteExpertRequest {
                    expected_version: Default::default(),
                    id,
                })
                .await?
                .into_inner();
            if let Some(e) = r.expert {
                println!("deleted {} v{}", e.id, e.version);
            }
        }
    }
    Ok(())
}

fn route_options(a: &RouteArgs) -> Result<proto::RouteOptions> {
    Ok(proto::RouteOptions {
        strategy: match a.strategy.as_deref() {
            None => proto::Strategy::Unspecified,
            Some("elm") => proto::Strategy::Elm,
            Some("hybrid") => proto::Strategy::Hybrid,
            Some(o) => bail!("--strategy: {o:?} is not elm or hybrid"),
        } as i32,
        top_k: a.top_k,
        text_format: match a.text_format.as_deref() {
            None => proto::TextFormat::Unspecified,
            Some("instance") => proto::TextFormat::Instance,
            Some("choice_instance") => proto::TextFormat::ChoiceInstance,
            Some(o) => bail!("--text-format: {o:?} is not instance or choice_instance"),
        } as i32,
        kind: match a.kind.as_deref() {
            None => proto::ExpertKind::Unspecified,
            Some("prompt") => proto::ExpertKind::Prompt,
            Some("lora") => proto::ExpertKind::Lora,
            Some(o) => bail!("--kind: {o:?} is not prompt or lora"),
        } as i32,
        abstain_threshold: a.abstain_threshold,
        ..Default::default()
    })
}

/// Instances as queries; with `labeled` their targets go along.
fn to_queries(v: &[roe_expert_library::Instance], labeled: bool) -> Vec<proto::Query> {
    v.iter()
        .map(|i| proto::Query {
            input: i.input.clone(),
            choices: i.choices.clone(),
            target: if labeled { i.target.clone() } else { None },
        })
        .collect()
}

async fn cmd_route(g: &Global, a: RouteArgs) -> Result<()> {
    let mut client =
        RouterClient::new(channel(g).await?).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let options = route_options(&a)?;
    if let Some(suite) = &a.suite {
        let tasks = load_suite(suite)?;
        println!(
            "{:<44} {:<44} {:>5} {:>6} {:>6}",
            "task", "routed expert", "votes", "share", "ok"
        );
        let mut right = 0;
        for t in &tasks {
            let queries = to_queries(&sample(&t.test, a.num_queries, a.seed), a.labeled);
            let r = client
                .route(proto::RouteRequest {
                    min_library_seq: Default::default(),
                    queries,
                    options: Some(options.clone()),
                })
                .await?
                .into_inner();
            let top = r.ranked.first();
            let winner = if r.abstain {
                "(abstain)".to_string()
            } else {
                r.expert_id.clone()
            };
            let ok = winner == t.name() || winner.starts_with(&format!("{}/", t.name()));
            right += ok as usize;
            println!(
                "{:<44} {:<44} {:>5} {:>6.2} {:>6}",
                t.name(),
                winner,
                top.map(|w| w.votes).unwrap_or(0),
                top.map(|w| w.share).unwrap_or(0.0),
                if ok { "yes" } else { "NO" }
            );
        }
        println!(
            "routed {right}/{} tasks to their own expert (Q={}, seed {})",
            tasks.len(),
            a.num_queries,
            a.seed
        );
        return Ok(());
    }
    let mut queries: Vec<proto::Query> = a
        .queries
        .iter()
        .map(|q| proto::Query {
            input: q.clone(),
            choices: vec![],
            target: None,
        })
        .collect();
    if let Some(from) = &a.from {
        let rows = if from.is_dir() {
            sample(&Task::load(from)?.test, a.num_queries, a.seed)
        } else {
            read_instances(from, &[])?
        };
        queries.extend(to_queries(&rows, a.labeled));
    }
    if queries.is_empty() {
        bail!("give queries with --query TEXT, --from FILE|TASK_DIR, or --suite DIR");
    }
    let r = client
        .route(proto::RouteRequest {
            min_library_seq: Default::default(),
            queries,
            options: Some(options),
        })
        .await?
        .into_inner();
    if a.json {
        let ranked: Vec<_> = r
            .ranked
            .iter()
            .map(|s| {
                serde_json::json!({
            "expert_id": s.expert_id, "score": s.score, "votes": s.votes, "share": s.share,
            "mean_similarity": s.mean_similarity, "centroid_similarity": s.centroid_similarity,
            "lexical_similarity": s.lexical_similarity})
            })
            .collect();
        let evidence: Vec<_> = r
            .evidence
            .iter()
            .map(|e| {
                e.hits
                    .iter()
                    .map(|h| {
                        serde_json::json!({
            "expert_id": h.expert_id, "point_id": h.point_id, "similarity": h.similarity})
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
            "expert_id": r.expert_id, "abstain": r.abstain, "ranked": ranked, "evidence": evidence}))?
        );
        return Ok(());
    }
    println!(
        "{:<44} {:>8} {:>5} {:>6} {:>8}",
        "expert", "score", "votes", "share", "mean_sim"
    );
    for s in r.ranked.iter().take(10) {
        println!(
            "{:<44} {:>8.4} {:>5} {:>6.3} {:>8.3}",
            s.expert_id, s.score, s.votes, s.share, s.mean_similarity
        );
    }
    if r.abstain {
        println!("abstain: no expert's share reaches the threshold");
    } else {
        println!("winner: {}", r.expert_id);
    }
    Ok(())
}

async fn inference_client(g: &Global) -> Result<InferenceClient<KeyedChannel>> {
    Ok(InferenceClient::new(channel(g).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

async fn cmd_score(g: &Global, a: ScoreArgs) -> Result<()> {
    let mut client = inference_client(g).await?;
    let r = client
        .score(proto::ScoreRequest {
            min_library_seq: Default::default(),
            expert_id: a.expert,
            input: a.input,
            choices: a.choices,
            truncate: a.truncate,
        })
        .await?
        .into_inner();
    if a.json {
        let choices: Vec<serde_json::Value> = r
            .choices
            .iter()
            .map(|c| {
                serde_json::json!({
                    "choice": c.choice,
                    "sum_logprob": c.sum_logprob,
                    "mean_logprob": c.mean_logprob,
                    "num_tokens": c.num_tokens,
                })
            })
            .collect();
        let v = serde_json::json!({
            "expert_id": r.expert_id,
            "choices": choices,
            "best": r.best,
            "best_by_mean": r.best_by_mean,
            "prompt_tokens": r.prompt_tokens,
            "truncated_tokens": r.truncated_tokens,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>12} {:>12} {:>7}",
        "choice", "sum_logprob", "mean_logprob", "tokens"
    );
    for (i, c) in r.choices.iter().enumerate() {
        let mark = if i as u32 == r.best { " *" } else { "" };
        println!(
            "{:<32} {:>12.4} {:>12.4} {:>7}{mark}",
            c.choice, c.sum_logprob, c.mean_logprob, c.num_tokens
        );
    }
    if let Some(best) = r.choices.get(r.best as usize) {
        println!("best: {}", best.choice);
    }
    if r.truncated_tokens > 0 {
        eprintln!(
            "[input cut to its last {} tokens: {} cut]",
            r.prompt_tokens, r.truncated_tokens
        );
    }
    Ok(())
}

async fn cmd_generate(g: &Global, a: GenerateArgs) -> Result<()> {
    use std::io::Write;
    let mut client = inference_client(g).await?;
    let mut stream = client
        .generate(proto::GenerateRequest {
            min_library_seq: Default::default(),
            expert_id: a.expert,
            input: a.input,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            stop: a.stop,
            truncate: a.truncate,
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout();
    let mut finish = String::new();
    let mut tokens = 0usize;
    let mut cut = 0;
    while let Some(msg) = stream.message().await? {
        tokens += 1;
        cut = cut.max(msg.truncated_tokens);
        write!(out, "{}", msg.text)?;
        out.flush()?;
        if !msg.finish_reason.is_empty() {
            finish = msg.finish_reason;
        }
    }
    writeln!(out)?;
    if cut > 0 {
        eprintln!("[input cut from the front: {cut} tokens]");
    }
    eprintln!("[{tokens} tokens, finish: {finish}]");
    Ok(())
}

/// Inputs of `roe answer`: a JSON-lines file (all rows) or a task folder (`num` rows of its
/// test split, drawn with `seed`; classification rows get the task's labels as choices).
fn answer_rows(path: &Path, num: usize, seed: u64) -> Result<Vec<roe_expert_library::Instance>> {
    if path.is_dir() {
        Ok(sample(&Task::load(path)?.test, num, seed))
    } else {
        Ok(read_instances(path, &[])?)
    }
}

/// Ellipsised to `n` characters, on one line.
fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}...", one_line.chars().take(n).collect::<String>())
    }
}

async fn cmd_answer(g: &Global, a: AnswerArgs) -> Result<()> {
    let inputs = match &a.inputs {
        Some(p) => answer_rows(p, a.num_inputs, a.seed)?,
        None => Vec::new(),
    };
    let queries = match &a.queries {
        // Another draw than the inputs' when both come from one task folder.
        Some(p) => answer_rows(p, a.num_queries, a.seed.wrapping_add(1))?,
        None => Vec::new(),
    };
    if inputs.is_empty() && queries.is_empty() {
        bail!("give --inputs FILE|TASK_DIR (what to answer) and/or --queries FILE|TASK_DIR");
    }
    // Targets of the answered rows (the inputs, else the queries) to report accuracy.
    let answered = if inputs.is_empty() { &queries } else { &inputs };
    let targets: Vec<Option<String>> = answered.iter().map(|i| i.target.clone()).collect();
    let texts: Vec<String> = answered.iter().map(|i| i.input.clone()).collect();
    let mut client = AnswererClient::new(channel(g).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let r = client
        .answer(proto::AnswerRequest {
            queries: to_queries(&queries, a.labeled),
            inputs: inputs
                .into_iter()
                .map(|i| proto::AnswerInput {
                    input: i.input,
                    choices: i.choices,
                })
                .collect(),
            route: Some(proto::RouteOptions {
                abstain_threshold: a.abstain_threshold,
                ..Default::default()
            }),
            mode: if a.generate {
                proto::AnswerMode::Generate
            } else {
                proto::AnswerMode::Unspecified
            } as i32,
            max_new_tokens: a.max_new_tokens,
            truncate: a.truncate,
            ..Default::default()
        })
        .await?
        .into_inner();
    // The answer's text: the chosen choice (Score) or the generated text.
    let answer_text = |ans: &proto::Answer| match &ans.kind {
        Some(proto::answer::Kind::Score(s)) => s
            .choices
            .get(s.best as usize)
            .map(|c| c.choice.clone())
            .unwrap_or_default(),
        Some(proto::answer::Kind::Generated(gen)) => gen.text.clone(),
        None => String::new(),
    };
    let answered_by = if r.expert_id.is_empty() {
        "(bare backbone)".to_string()
    } else {
        r.expert_id.clone()
    };
    let ranked = r
        .routing
        .as_ref()
        .map(|x| x.ranked.as_slice())
        .unwrap_or(&[]);
    if a.json {
        let answers: Vec<_> = r
            .answers
            .iter()
            .zip(&texts)
            .map(|(ans, input)| match &ans.kind {
                Some(proto::answer::Kind::Score(s)) => serde_json::json!({
                    "input": input,
                    "answer": answer_text(ans),
                    "best": s.best,
                    "choices": s.choices.iter().map(|c| serde_json::json!({
                        "choice": c.choice, "sum_logprob": c.sum_logprob,
                        "mean_logprob": c.mean_logprob})).collect::<Vec<_>>(),
                }),
                Some(proto::answer::Kind::Generated(gen)) => serde_json::json!({
                    "input": input, "answer": gen.text, "finish_reason": gen.finish_reason}),
                None => serde_json::json!({"input": input}),
            })
            .collect();
        let ranked: Vec<_> = ranked
            .iter()
            .map(|s| {
                serde_json::json!({"expert_id": s.expert_id, "score": s.score,
                "votes": s.votes, "share": s.share})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "expert_id": r.expert_id,
                "fell_back": r.fell_back,
                "fallback_reason": r.fallback_reason,
                "routing": {
                    "expert_id": r.routing.as_ref().map(|x| x.expert_id.clone()),
                    "abstain": r.routing.as_ref().map(|x| x.abstain),
                    "ranked": ranked,
                },
                "answers": answers,
            }))?
        );
        return Ok(());
    }
    if r.fell_back {
        println!("fell back to {answered_by}: {}", r.fallback_reason);
    } else {
        println!(
            "routed to {answered_by} (share {:.2})",
            ranked.first().map(|s| s.share).unwrap_or(0.0)
        );
    }
    let runners_up: Vec<String> = ranked
        .iter()
        .take(3)
        .map(|s| format!("{} {:.2}", s.expert_id, s.share))
        .collect();
    println!("ranking: {}", runners_up.join(", "));
    let mut right = 0;
    let mut labeled = 0;
    for (n, ((ans, input), target)) in r.answers.iter().zip(&texts).zip(&targets).enumerate() {
        let text = answer_text(ans);
        let mark = match target {
            Some(t) if matches!(ans.kind, Some(proto::answer::Kind::Score(_))) => {
                labeled += 1;
                right += (text == *t) as usize;
                if text == *t {
                    "  (right)".to_string()
                } else {
                    format!("  (target: {t})")
                }
            }
            _ => String::new(),
        };
        println!("[{n}] {}  <-  {}{mark}", clip(&text, 60), clip(input, 60));
    }
    if labeled > 0 {
        println!("right: {right}/{labeled}");
    }
    Ok(())
}
