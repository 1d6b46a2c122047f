//! Memory over a long mixed load on one real `roe serve` (the `roe` binary beside
//! `roe-bench`): bench/results/soak.{md,json}.
//!
//! A handful of reference experts are registered and the server's RSS is read once it is
//! idle. Then `--clients` clients, each on gRPC and HTTP connections of its own, loop for
//! `--minutes` over the mix a deployment sees: Router.Route, Inference.Score and Generate,
//! HTTP /v1/completions (an expert or `auto`, whole or streamed) and /v1/chat/completions,
//! small experts registered and deleted again, and prompt-tuning jobs started and cancelled a
//! second later. The server's VmRSS (/proc) is sampled throughout and for `--idle-after-secs`
//! after the load.
//!
//! Goals: the RSS after the load and the idle period at most the idle RSS + the configured
//! caches + 256 MiB, and no growth over the last half of the load (its end at most 64 MiB
//! above the median of the samples around its midpoint).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roe_expert_library::Instance;
use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, inference_client::InferenceClient,
    router_client::RouterClient, training_client::TrainingClient,
};
use roe_task_suite::{sample, Task};
use serde::Serialize;
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The reference experts registered before the load, (kind, task): classification tasks
/// with short inputs, so that one op costs about the same whichever expert it draws.
const EXPERTS: [(&str, &str); 6] = [
    ("prompt", "sms_spam"),
    ("prompt", "question_type"),
    ("prompt", "tweet_sentiment"),
    ("lora", "snips_intent"),
    ("lora", "movie_sentiment"),
    ("lora", "language_id"),
];
/// Instances registered with each reference expert.
const INSTANCES: usize = 50;
/// The task whose prompt expert the load's registrations copy, and whose rows its training
/// jobs get.
const CHURN_TASK: &str = "sms_spam";
/// Instances of each expert a client registers during the load.
const CHURN_INSTANCES: usize = 8;
/// Rows of each training job started during the load.
const TRAIN_ROWS: usize = 40;
/// Every this many ops a client registers an expert, or deletes the one it registered.
const CHURN_EVERY: u64 = 20;
/// Every this many ops a client starts a training job and cancels it.
const TRAIN_EVERY: u64 = 50;
/// An op not answered within this is counted as an error (the client goes on).
const OP_TIMEOUT: Duration = Duration::from_secs(120);
/// Time given to the server after the setup before its idle RSS is read (the rebuilt index
/// persisted, the registrations' work done).
const SETTLE: Duration = Duration::from_secs(5);
/// How often the load reports its progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Error messages kept (and printed) in full; the others are only counted.
const LOGGED_ERRORS: usize = 10;
/// The goal's allowance beyond the idle RSS and the configured caches.
const GOAL_HEADROOM_MIB: f64 = 256.0;
/// Growth over the last half of the load still counted as none (allocator noise, the
/// caches' last fills).
const GROWTH_TOLERANCE_MIB: f64 = 64.0;
/// Rows of the Markdown's RSS table.
const TABLE_POINTS: usize = 20;

pub struct SoakInput<'a> {
    pub exe: PathBuf,
    pub models_dir: &'a Path,
    pub encoder: Option<&'a Path>,
    pub tasks_dir: &'a Path,
    pub experts_dir: &'a Path,
    pub minutes: f64,
    pub clients: usize,
    pub idle_after_secs: u64,
    pub sample_ms: u64,
    pub expert_cache_mb: u64,
    pub embedding_cache_mb: u64,
    pub route_cache_mb: u64,
    /// Passed on to `roe serve` after the soak's own flags.
    pub extra_serve_args: Vec<String>,
}

/// One RSS reading of the server: seconds since the load started (past `load_s`: the idle
/// period) and MiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss_mib: f64,
}

/// The server's heap, from its `roe_heap_allocated_bytes` and `roe_heap_free_bytes`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeapMib {
    pub allocated: f64,
    pub kept_free: f64,
}

fn heap_of(metrics_text: Option<&str>) -> Option<HeapMib> {
    let m = metrics_text?;
    Some(HeapMib {
        allocated: metric(m, "roe_heap_allocated_bytes")? / (1u64 << 20) as f64,
        kept_free: metric(m, "roe_heap_free_bytes")? / (1u64 << 20) as f64,
    })
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// The load's length asked for, and what it took (clients finish their last op).
    pub minutes: f64,
    pub load_s: f64,
    pub clients: usize,
    pub idle_after_s: u64,
    pub sample_ms: u64,
    pub expert_cache_mb: u64,
    pub embedding_cache_mb: u64,
    pub route_cache_mb: u64,
    pub extra_serve_args: Vec<String>,
    /// The reference experts registered before the load.
    pub experts: Vec<String>,
    pub idle_rss_mib: f64,
    /// The most of any sample and of the kernel's high-water mark (VmHWM).
    pub peak_rss_mib: f64,
    pub rss_end_of_load_mib: f64,
    pub rss_after_idle_mib: f64,
    pub caches_mib: f64,
    /// idle + caches + 256 MiB.
    pub goal_mib: f64,
    pub goal_met: bool,
    /// RSS at the end of the load less the median of the samples in [45 %, 55 %] of it.
    pub last_half_growth_mib: Option<f64>,
    /// Least-squares slope of the samples over the last half of the load.
    pub last_half_slope_mib_per_min: Option<f64>,
    pub no_growth: bool,
    /// What the server's /metrics says of giving idle memory back (absent where it has no
    /// such metrics).
    pub memory_trims: Option<f64>,
    pub memory_returned_mib: Option<f64>,
    /// Where the heap's memory was (glibc's counts through /metrics): held by live
    /// allocations, or freed and kept by the allocator; at the end of the load and after the
    /// idle time. RSS growth that is "kept" is not a leak.
    pub heap_end_of_load_mib: Option<HeapMib>,
    pub heap_after_idle_mib: Option<HeapMib>,
    /// Calls per op, and those that failed (errors are counted, not fatal).
    pub ops: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub first_errors: Vec<String>,
    /// Every reading, load then idle.
    pub samples: Vec<Sample>,
}

/// The resident set of process `pid` in bytes (VmRSS); None once it is gone.
pub fn rss_of(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// A `kB` line of /proc/<pid>/status.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The middle value (the mean of the two middle ones for an even count); `v` is sorted.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `end_mib` less the median RSS of the load's samples `(t, MiB)` within 5 % of `load_s`
/// around its midpoint (the sample nearest the midpoint when none falls there, as in a short
/// run sampled coarsely). A median, so that one spike at the midpoint does not hide growth.
pub(crate) fn last_half_growth(load: &[(f64, f64)], load_s: f64, end_mib: f64) -> Option<f64> {
    let mid = load_s / 2.0;
    let mut window: Vec<f64> = load
        .iter()
        .filter(|(t, _)| (t - mid).abs() <= 0.05 * load_s)
        .map(|&(_, rss)| rss)
        .collect();
    if window.is_empty() {
        let nearest = load
            .iter()
            .min_by(|a, b| (a.0 - mid).abs().total_cmp(&(b.0 - mid).abs()))?;
        window.push(nearest.1);
    }
    Some(end_mib - median(&mut window)?)
}

/// The least-squares slope of `(seconds, MiB)` points, in MiB per minute; None for fewer
/// than two distinct times.
pub(crate) fn slope_per_min(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_r = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(t, r) in points {
        sxx += (t - mean_t) * (t - mean_t);
        sxy += (t - mean_t) * (r - mean_r);
    }
    if sxx <= 0.0 {
        return None;
    }
    Some(60.0 * sxy / sxx)
}

/// At most `k` indices of `0..n`, evenly spaced, the first and the last among them.
fn evenly_spaced(n: usize, k: usize) -> Vec<usize> {
    if n <= k || k < 2 {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|i| i * (n - 1) / (k - 1)).collect();
    v.dedup();
    v
}

/// `s` cut to `max` characters.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The `roe serve` child; killed when dropped (on an error too).
struct Serve {
    child: std::process::Child,
    log: PathBuf,
}

impl Serve {
    /// Starts `roe serve` with both servers on ports the kernel picks, its log in `log`:
    /// (the server, its gRPC URL, its HTTP root).
    fn start(input: &SoakInput<'_>, data: &Path, log: &Path) -> Result<(Self, String, String)> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&input.exe);
        cmd.args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(input.models_dir)
        .arg("--expert-cache-mb")
        .arg(input.expert_cache_mb.to_string())
        .arg("--embedding-cache-mb")
        .arg(input.embedding_cache_mb.to_string())
        .arg("--route-cache-mb")
        .arg(input.route_cache_mb.to_string());
        if let Some(encoder) = input.encoder {
            cmd.arg("--encoder").arg(encoder);
        }
        cmd.args(&input.extra_serve_args)
            .env("RUST_LOG", "warn")
            .env("ROE_LOG_FORMAT", "text")
            // Keys from the caller's environment would lock the soak's clients out.
            .env_remove("ROE_ADMIN_KEYS")
            .env_remove("ROE_READ_KEYS")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", input.exe.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let serve = Self {
            child,
            log: log.to_path_buf(),
        };
        let mut lines = BufReader::new(stdout);
        let (mut grpc, mut http): (Option<String>, Option<String>) = (None, None);
        let (grpc, http) = loop {
            if let (Some(g), Some(h)) = (&grpc, &http) {
                break (g.clone(), h.clone());
            }
            let mut line = String::new();
            if lines.read_line(&mut line)? == 0 {
                bail!(
                    "roe serve stopped before listening; the end of its log:\n{}",
                    serve.log_tail(30)
                );
            }
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("roe HTTP listening on ") {
                http = Some(format!("http://{addr}"));
            } else if let Some(addr) = line.strip_prefix("roe listening on ") {
                grpc = Some(format!("http://{addr}"));
            }
        };
        // The rest of its stdout is drained: a closed pipe would make its next print fail.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        Ok((serve, grpc, http))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error, with the end of its log, when the server has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "roe serve exited ({status}); the end of its log:\n{}",
                self.log_tail(30)
            );
        }
        Ok(())
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the server's RSS every period on a thread of its own, so that busy runtime
/// threads do not delay the readings.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(bytes) = rss_of(pid) {
                    samples.push(Sample {
                        t_s: t0.elapsed().as_secs_f64(),
                        rss_mib: mib(bytes),
                    });
                }
                std::thread::sleep(every);
            }
            samples
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the readings (within one period) and returns them.
    fn finish(mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("the RSS sampler already finished")?
            .join()
            .map_err(|_| anyhow!("the RSS sampler panicked"))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a client does in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Route,
    Score,
    Generate,
    HttpCompletion,
    HttpChat,
    Register,
    Delete,
    Train,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Route,
        Op::Score,
        Op::Generate,
        Op::HttpCompletion,
        Op::HttpChat,
        Op::Register,
        Op::Delete,
        Op::Train,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Route => "grpc_route",
            Op::Score => "grpc_score",
            Op::Generate => "grpc_generate",
            Op::HttpCompletion => "http_completions",
            Op::HttpChat => "http_chat_completions",
            Op::Register => "register_expert",
            Op::Delete => "delete_expert",
            Op::Train => "train_and_cancel",
        }
    }
}

#[derive(Default)]
struct Counts {
    ops: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
    first_errors: Vec<String>,
}

/// Calls and errors per op, shared by the clients.
struct Stats(Mutex<Counts>);

impl Stats {
    fn new() -> Self {
        let mut counts = Counts::default();
        for op in Op::ALL {
            counts.ops.insert(op.name(), 0);
            counts.errors.insert(op.name(), 0);
        }
        Self(Mutex::new(counts))
    }

    fn record(&self, op: Op, error: Option<anyhow::Error>) {
        let mut c = self.0.lock();
        *c.ops.entry(op.name()).or_default() += 1;
        if let Some(e) = error {
            *c.errors.entry(op.name()).or_default() += 1;
            if c.first_errors.len() < LOGGED_ERRORS {
                let line = format!("{}: {}", op.name(), clip(&format!("{e:#}"), 300));
                eprintln!("soak: {line}");
                c.first_errors.push(line);
            }
        }
    }

    /// (calls, errors) over every op.
    fn totals(&self) -> (u64, u64) {
        let c = self.0.lock();
        (c.ops.values().sum(), c.errors.values().sum())
    }
}

struct SoakExpert {
    id: String,
    task: Task,
}

/// What the clients share: the experts they call, what they register and train, the counts.
struct Shared {
    experts: Vec<SoakExpert>,
    churn_task: Task,
    churn_adapter: proto::PeftAdapter,
    stats: Stats,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn instances(rows: &[Instance], n: usize, seed: u64) -> Vec<proto::Instance> {
    sample(rows, n, seed)
        .into_iter()
        .map(|i| proto::Instance {
            input: i.input,
            target: i.target,
            choices: i.choices,
        })
        .collect()
}

/// At most four of a row's choices, its target among them.
fn few_choices(row: &Instance) -> Vec<String> {
    let mut choices: Vec<String> = row.choices.iter().take(4).cloned().collect();
    if let Some(target) = &row.target {
        if !choices.contains(target) {
            choices.truncate(3);
            choices.push(target.clone());
        }
    }
    if choices.is_empty() {
        choices = vec!["yes".into(), "no".into()];
    }
    choices
}

fn peft(experts: &Path, kind: &str, task: &str) -> Result<proto::PeftAdapter> {
    let dir = experts.join(kind).join(task);
    Ok(proto::PeftAdapter {
        adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json"))
            .with_context(|| format!("reading {}", dir.display()))?,
        adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))
            .with_context(|| format!("reading {}", dir.display()))?,
    })
}

/// One client: its own gRPC channel (one HTTP/2 connection) and HTTP connection pool, as a
/// separate process would have.
struct SoakClient {
    index: usize,
    shared: Arc<Shared>,
    router: RouterClient<Channel>,
    inference: InferenceClient<Channel>,
    library: ExpertLibraryClient<Channel>,
    training: TrainingClient<Channel>,
    http: HttpClient,
    completions: hyper::Uri,
    chat: hyper::Uri,
    rng: StdRng,
    /// Ops so far (offset per client).
    n: u64,
    /// Names of the experts and jobs this client creates.
    serial: u64,
    /// The expert this client registered and has not deleted yet.
    registered: Option<String>,
}

impl SoakClient {
    async fn connect(
        index: usize,
        shared: Arc<Shared>,
        grpc: &str,
        http_root: &str,
    ) -> Result<Self> {
        let channel = Channel::from_shared(grpc.to_string())?
            .connect()
            .await
            .with_context(|| format!("connecting to {grpc}"))?;
        Ok(Self {
            index,
            shared,
            router: RouterClient::new(channel.clone()),
            inference: InferenceClient::new(channel.clone()),
            library: ExpertLibraryClient::new(channel.clone()),
            training: TrainingClient::new(channel),
            http: Client::builder(TokioExecutor::new()).build_http(),
            completions: format!("{http_root}/v1/completions").parse()?,
            chat: format!("{http_root}/v1/chat/completions").parse()?,
            rng: StdRng::seed_from_u64(0x50a4 + index as u64),
            // Staggered, so that the clients do not all register or train at once.
            n: index as u64 * 7,
            serial: 0,
            registered: None,
        })
    }

    /// Ops until `deadline`; then the expert it still holds is deleted, so that the library
    /// ends as it began.
    async fn run(mut self, deadline: Instant) {
        while Instant::now() < deadline {
            let op = self.next_op();
            self.step(op).await;
        }
        if self.registered.is_some() {
            self.step(Op::Delete).await;
        }
    }

    fn next_op(&mut self) -> Op {
        self.n += 1;
        if self.n.is_multiple_of(TRAIN_EVERY) {
            return Op::Train;
        }
        if self.n.is_multiple_of(CHURN_EVERY) {
            return if self.registered.is_some() {
                Op::Delete
            } else {
                Op::Register
            };
        }
        match self.rng.random_range(0..100u32) {
            0..25 => Op::Route,
            25..50 => Op::Score,
            50..65 => Op::Generate,
            65..85 => Op::HttpCompletion,
            _ => Op::HttpChat,
        }
    }

    async fn step(&mut self, op: Op) {
        let result = match tokio::time::timeout(OP_TIMEOUT, self.call(op)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("no answer within {OP_TIMEOUT:?}")),
        };
        self.shared.stats.record(op, result.err());
    }

    async fn call(&mut self, op: Op) -> Result<()> {
        match op {
            Op::Route => self.route().await,
            Op::Score => self.score().await,
            Op::Generate => self.generate().await,
            Op::HttpCompletion => self.http_completion().await,
            Op::HttpChat => self.http_chat().await,
            Op::Register => self.register().await,
            Op::Delete => self.delete().await,
            Op::Train => self.train().await,
        }
    }

    fn pick(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// A test row of `task` (setup checked that it has some).
    fn test_row<'t>(&mut self, task: &'t Task) -> &'t Instance {
        &task.test[self.pick(task.test.len())]
    }

    /// A quarter of the calls go to the bare backbone (""), the rest to `id`.
    fn expert_or_bare(&mut self, id: &str) -> String {
        if self.pick(4) == 0 {
            String::new()
        } else {
            id.to_string()
        }
    }

    async fn route(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let task = &shared.experts[self.pick(shared.experts.len())].task;
        let queries = (0..4)
            .map(|_| {
                let row = self.test_row(task);
                proto::Query {
                    input: row.input.clone(),
                    choices: row.choices.clone(),
                    target: None,
                }
            })
            .collect();
        self.router
            .route(proto::RouteRequest {
                min_library_seq: Default::default(),
                queries,
                options: None,
            })
            .await?;
        Ok(())
    }

    async fn score(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let expert = &shared.experts[self.pick(shared.experts.len())];
        let expert_id = self.expert_or_bare(&expert.id);
        let row = self.test_row(&expert.task);
        self.inference
            .score(proto::ScoreRequest {
                expert_id,
                input: row.input.clone(),
                choices: few_choices(row),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn generate(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let expert = &shared.experts[self.pick(shared.experts.len())];
        let expert_id = self.expert_or_bare(&expert.id);
        let input = self.test_row(&expert.task).input.clone();
        let max_new_tokens = self.rng.random_range(8..=16u32);
        let mut stream = self
            .inference
            .generate(proto::GenerateRequest {
                expert_id,
                input,
                max_new_tokens,
                temperature: 0.0,
                ..Default::default()
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }

    async fn http_completion(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let expert = &shared.experts[self.pick(shared.experts.len())];
        // A quarter routed by the prompt itself.
        let model = if self.pick(4) == 0 {
            "auto".to_string()
        } else {
            expert.id.clone()
        };
        let prompt = self.test_row(&expert.task).input.clone();
        let stream = self.pick(3) == 0;
        let mut body = json!({
            "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream,
        });
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        post(self.http.clone(), self.completions.clone(), body, stream).await
    }

    async fn http_chat(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let expert = &shared.experts[self.pick(shared.experts.len())];
        let content = self.test_row(&expert.task).input.clone();
        let stream = self.pick(3) == 0;
        let mut body = json!({
            "model": "base",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0, "stream": stream,
        });
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        post(self.http.clone(), self.chat.clone(), body, stream).await
    }

    /// A small expert under a new id: the churn task's prompt expert with a few instances
    /// (different ones each time, so that the embedding cache sees new texts too).
    async fn register(&mut self) -> Result<()> {
        self.serial += 1;
        let id = format!("soak-c{}-{}", self.index, self.serial);
        let shared = Arc::clone(&self.shared);
        let seed = ((self.index as u64) << 32) | self.serial;
        self.library
            .register_expert(proto::RegisterExpertRequest {
                id: id.clone(),
                name: id.clone(),
                description: shared.churn_task.info.description.clone(),
                adapter: Some(shared.churn_adapter.clone()),
                instances: instances(&shared.churn_task.train, CHURN_INSTANCES, seed),
                ..Default::default()
            })
            .await?;
        self.registered = Some(id);
        Ok(())
    }

    async fn delete(&mut self) -> Result<()> {
        // Taken even when the delete fails: the next churn op registers a new one.
        let Some(id) = self.registered.take() else {
            return Ok(());
        };
        self.library
            .delete_expert(proto::DeleteExpertRequest {
                expected_version: Default::default(),
                id,
            })
            .await?;
        Ok(())
    }

    /// A prompt-tuning job on a few rows, cancelled a second later (queued or running).
    async fn train(&mut self) -> Result<()> {
        self.serial += 1;
        let id = format!("soak-train-c{}-{}", self.index, self.serial);
        let shared = Arc::clone(&self.shared);
        let task = &shared.churn_task;
        let seed = ((self.index as u64) << 32) | self.serial;
        let job = self
            .training
            .start_training(proto::StartTrainingRequest {
                expert_id: id.clone(),
                name: id,
                description: task.info.description.clone(),
                kind: proto::ExpertKind::Prompt as i32,
                rows: instances(&task.train, TRAIN_ROWS, seed),
                task_description: task.info.description.clone(),
                labels: task.info.labels.clone(),
                // Far more steps than a second holds: the job never registers an expert.
                recipe: Some(proto::TrainingRecipe {
                    steps: Some(500),
                    batch_size: Some(8),
                    warmup_steps: Some(2),
                    held_out_fraction: Some(0.2),
                    max_eval_rows: Some(24),
                    instances: Some(20),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .job
            .context("StartTraining answered no job")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.training
            .cancel_training(proto::CancelTrainingRequest { job_id: job.id })
            .await?;
        Ok(())
    }
}

/// POSTs `body` and reads the whole answer, as a client does (a stream to `[DONE]`). Owned
/// arguments: the future holds no borrow of its client.
async fn post(http: HttpClient, url: hyper::Uri, body: Value, stream: bool) -> Result<()> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = http.request(req).await?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    if !status.is_success() {
        bail!("HTTP {status}: {}", clip(&text, 300));
    }
    if stream && !text.contains("data: [DONE]") {
        bail!("the stream ended without [DONE]");
    }
    Ok(())
}

/// The server's /metrics text (None when it has none or does not answer).
async fn metrics(http_root: &str) -> Option<String> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::get(format!("{http_root}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let res = client.request(req).await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    let bytes = res.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The value of an unlabelled sample `name` in Prometheus' text format.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub async fn run(input: SoakInput<'_>) -> Result<SoakReport> {
    if !input.minutes.is_finite() || input.minutes <= 0.0 {
        bail!("--minutes must be a positive number");
    }
    if input.clients == 0 {
        bail!("--clients must be at least 1");
    }
    // Everything read from disk first: a missing file fails before the server starts.
    let churn_task = Task::load(input.tasks_dir.join(CHURN_TASK))
        .with_context(|| format!("task {CHURN_TASK}"))?;
    let churn_adapter = peft(input.experts_dir, "prompt", CHURN_TASK)?;
    let mut experts = Vec::new();
    let mut registrations = Vec::new();
    for (kind, name) in EXPERTS {
        let task =
            Task::load(input.tasks_dir.join(name)).with_context(|| format!("task {name}"))?;
        if task.train.is_empty() || task.test.is_empty() {
            bail!("task {name} has no train or no test rows");
        }
        let id = format!("{name}-{kind}");
        registrations.push(proto::RegisterExpertRequest {
            id: id.clone(),
            name: id.clone(),
            description: task.info.description.clone(),
            adapter: Some(peft(input.experts_dir, kind, name)?),
            instances: instances(&task.train, INSTANCES, 0),
            ..Default::default()
        });
        experts.push(SoakExpert { id, task });
    }
    if churn_task.train.is_empty() {
        bail!("task {CHURN_TASK} has no train rows");
    }

    let tmp = tempfile::tempdir()?;
    // Declared after `tmp`: the server is killed before its folder goes.
    let (mut serve, grpc, http_root) = Serve::start(
        &input,
        &tmp.path().join("library"),
        &tmp.path().join("serve.log"),
    )?;
    let pid = serve.pid();
    eprintln!("soak: roe serve (pid {pid}) on {grpc} (gRPC) and {http_root} (HTTP)");
    let mut library = ExpertLibraryClient::connect(grpc.clone())
        .await
        .with_context(|| format!("connecting to {grpc}"))?;
    for r in registrations {
        let id = r.id.clone();
        library
            .register_expert(r)
            .await
            .with_context(|| format!("registering {id}"))?;
    }
    drop(library);
    tokio::time::sleep(SETTLE).await;
    serve.check_alive()?;
    let idle = rss_of(pid).context("reading the server's RSS")?;
    eprintln!(
        "soak: {} experts registered; idle RSS {:.0} MiB; {} clients for {:.1} min ...",
        experts.len(),
        mib(idle),
        input.clients,
        input.minutes
    );
    let expert_ids: Vec<String> = experts.iter().map(|e| e.id.clone()).collect();

    let shared = Arc::new(Shared {
        experts,
        churn_task,
        churn_adapter,
        stats: Stats::new(),
    });
    let mut clients = Vec::with_capacity(input.clients);
    for i in 0..input.clients {
        clients.push(SoakClient::connect(i, shared.clone(), &grpc, &http_root).await?);
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(input.minutes * 60.0);
    let sampler = Sampler::start(pid, Duration::from_millis(input.sample_ms.max(10)), t0);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.run(deadline)))
        .collect();
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(PROGRESS_EVERY)).await;
        let (ops, errors) = shared.stats.totals();
        eprintln!(
            "soak: {:.1} of {:.1} min, {ops} ops ({errors} errors), RSS {} MiB",
            t0.elapsed().as_secs_f64() / 60.0,
            input.minutes,
            rss_of(pid)
                .map(|b| format!("{:.0}", mib(b)))
                .unwrap_or_else(|| "?".into())
        );
    }
    for t in tasks {
        t.await.context("a soak client panicked")?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    serve.check_alive()?;
    let end_of_load = rss_of(pid).context("reading the server's RSS")?;
    let heap_end_of_load = heap_of(metrics(&http_root).await.as_deref());
    eprintln!(
        "soak: load done after {load_s:.0} s, RSS {:.0} MiB; idle for {} s ...",
        mib(end_of_load),
        input.idle_after_secs
    );
    tokio::time::sleep(Duration::from_secs(input.idle_after_secs)).await;
    serve.check_alive()?;
    let after_idle = rss_of(pid).context("reading the server's RSS")?;
    let hwm = status_kib(pid, "VmHWM:").map(|kib| kib * 1024);
    let samples = sampler.finish()?;
    // Read after the last RSS reading: the request is work of its own.
    let metrics_text = metrics(&http_root).await;
    drop(serve);

    let load: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t_s <= load_s)
        .map(|s| (s.t_s, s.rss_mib))
        .collect();
    let second_half: Vec<(f64, f64)> = load
        .iter()
        .copied()
        .filter(|&(t, _)| t >= load_s / 2.0)
        .collect();
    let (idle_mib, end_mib, after_mib) = (mib(idle), mib(end_of_load), mib(after_idle));
    let growth = last_half_growth(&load, load_s, end_mib);
    let caches_mib =
        (input.expert_cache_mb + input.embedding_cache_mb + input.route_cache_mb) as f64;
    let goal_mib = idle_mib + caches_mib + GOAL_HEADROOM_MIB;
    let peak_rss_mib = samples
        .iter()
        .map(|s| s.rss_mib)
        .chain([end_mib, after_mib, hwm.map(mib).unwrap_or(0.0)])
        .fold(idle_mib, f64::max);
    let counts = std::mem::take(&mut *shared.stats.0.lock());
    let to_strings = |m: BTreeMap<&'static str, u64>| -> BTreeMap<String, u64> {
        m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    Ok(SoakReport {
        minutes: input.minutes,
        load_s,
        clients: input.clients,
        idle_after_s: input.idle_after_secs,
        sample_ms: input.sample_ms,
        expert_cache_mb: input.expert_cache_mb,
        embedding_cache_mb: input.embedding_cache_mb,
        route_cache_mb: input.route_cache_mb,
        extra_serve_args: input.extra_serve_args.clone(),
        experts: expert_ids,
        idle_rss_mib: idle_mib,
        peak_rss_mib,
        rss_end_of_load_mib: end_mib,
        rss_after_idle_mib: after_mib,
        caches_mib,
        goal_mib,
        goal_met: after_mib <= goal_mib,
        last_half_growth_mib: growth,
        last_half_slope_mib_per_min: slope_per_min(&second_half),
        no_growth: growth.is_some_and(|g| g <= GROWTH_TOLERANCE_MIB),
        memory_trims: metrics_text
            .as_deref()
            .and_then(|m| metric(m, "roe_memory_trims_total")),
        memory_returned_mib: metrics_text
            .as_deref()
            .and_then(|m| metric(m, "roe_memory_returned_bytes_total"))
            .map(|b| b / (1u64 << 20) as f64),
        heap_end_of_load_mib: heap_end_of_load,
        heap_after_idle_mib: heap_of(metrics_text.as_deref()),
        ops: to_strings(counts.ops),
        errors: to_strings(counts.errors),
        first_errors: counts.first_errors,
        samples,
    })
}

pub fn markdown(r: &SoakReport) -> String {
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let signed = |x: Option<f64>, unit: &str| {
        x.map(|v| format!("{v:+.1} {unit}"))
            .unwrap_or_else(|| "n/a".into())
    };
    let extra = if r.extra_serve_args.is_empty() {
        String::new()
    } else {
        format!("; `{}`", r.extra_serve_args.join(" "))
    };
    let mut md = format!(
        "# Soak: memory under a long mixed load\n\n\
         `roe bench soak`: one `roe serve` (gRPC and HTTP; caches: experts {} MiB, embeddings \
         {} MiB, routes {} MiB{extra}) with {} reference experts ({}). {} clients, each on \
         gRPC and HTTP connections of its own, loop for {:.1} min ({:.0} s) over a mix: gRPC \
         Route (4 test rows), Score (an expert or the bare backbone, up to 4 choices) and \
         Generate (8-16 greedy tokens, the stream read to the end); HTTP /v1/completions (an \
         expert or `auto`, 8 tokens, a third streamed with usage) and /v1/chat/completions \
         (`base`); every {CHURN_EVERY}th op of a client registers a small expert or deletes \
         the one it registered, every {TRAIN_EVERY}th starts a prompt-tuning job and cancels \
         it a second later. Then {} s idle. RSS: the server's VmRSS from /proc every {} ms.\n\n\
         | RSS | MiB |\n|---|---|\n\
         | idle, after the setup | {:.0} |\n\
         | peak | {:.0} |\n\
         | end of the load | {:.0} |\n\
         | after {} s idle | {:.0} |\n\
         | goal: idle + caches ({:.0}) + {GOAL_HEADROOM_MIB:.0} | {:.0} |\n\n\
         - After the load and {} s idle: **{:.0} MiB** against at most {:.0} MiB: {}.\n\
         - Last half of the load: its end less the median around its midpoint {}, \
         least-squares slope {}; no growth (at most {GROWTH_TOLERANCE_MIB:.0} MiB): {}.\n",
        r.expert_cache_mb,
        r.embedding_cache_mb,
        r.route_cache_mb,
        r.experts.len(),
        r.experts.join(", "),
        r.clients,
        r.minutes,
        r.load_s,
        r.idle_after_s,
        r.sample_ms,
        r.idle_rss_mib,
        r.peak_rss_mib,
        r.rss_end_of_load_mib,
        r.idle_after_s,
        r.rss_after_idle_mib,
        r.caches_mib,
        r.goal_mib,
        r.idle_after_s,
        r.rss_after_idle_mib,
        r.goal_mib,
        verdict(r.goal_met),
        signed(r.last_half_growth_mib, "MiB"),
        signed(r.last_half_slope_mib_per_min, "MiB/min"),
        verdict(r.no_growth),
    );
    if let Some(trims) = r.memory_trims {
        md += &format!(
            "- The server gave idle memory back {trims:.0} times ({} MiB in all).\n",
            r.memory_returned_mib
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    for (when, heap) in [
        ("at the end of the load", r.heap_end_of_load_mib),
        ("after the idle time", r.heap_after_idle_mib),
    ] {
        if let Some(h) = heap {
            md += &format!(
                "- Heap {when}: {:.0} MiB held by live allocations, {:.0} MiB in the \
                 allocator's free lists (resident or already returned).\n",
                h.allocated, h.kept_free
            );
        }
    }
    md += "\n## RSS over time\n\n| t s | phase | RSS MiB |\n|---|---|---|\n";
    for i in evenly_spaced(r.samples.len(), TABLE_POINTS) {
        let s = &r.samples[i];
        let phase = if s.t_s <= r.load_s { "load" } else { "idle" };
        md += &format!("| {:.0} | {phase} | {:.0} |\n", s.t_s, s.rss_mib);
    }
    md += "\n## Operations\n\n| op | calls | errors |\n|---|---|---|\n";
    for (op, calls) in &r.ops {
        let errors = r.errors.get(op).copied().unwrap_or(0);
        md += &format!("| {op} | {calls} | {errors} |\n");
    }
    if !r.first_errors.is_empty() {
        md += "\nFirst errors:\n\n";
        for e in &r.first_errors {
            md += &format!("- {}\n", e.replace('\n', " "));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::{evenly_spaced, last_half_growth, slope_per_min};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn growth_is_the_end_less_the_median_around_the_midpoint() {
        // 100 MiB growing 0.5 MiB/s for 100 s: 125 MiB at the midpoint.
        let rising: Vec<(f64, f64)> = (0..=100)
            .map(|t| (t as f64, 100.0 + 0.5 * t as f64))
            .collect();
        assert_eq!(last_half_growth(&rising, 100.0, 160.0), Some(35.0));
        // Flat, with a spike at the midpoint: the median leaves it out.
        let mut flat: Vec<(f64, f64)> = (0..=100).map(|t| (t as f64, 200.0)).collect();
        flat[50].1 = 900.0;
        assert_eq!(last_half_growth(&flat, 100.0, 210.0), Some(10.0));
        // No sample within 5 % of the midpoint: the nearest one (40 s).
        let sparse = [(0.0, 100.0), (40.0, 120.0), (90.0, 150.0)];
        assert_eq!(last_half_growth(&sparse, 100.0, 150.0), Some(30.0));
        assert_eq!(last_half_growth(&[], 100.0, 150.0), None);
    }

    #[test]
    fn slope_is_least_squares_in_mib_per_minute() {
        let half: Vec<(f64, f64)> = (50..=100)
            .map(|t| (t as f64, 100.0 + 0.5 * t as f64))
            .collect();
        let slope = slope_per_min(&half).unwrap();
        assert!(close(slope, 30.0), "{slope}");
        // Noise around a line: the fit, not the ends. Points (0, 1), (60, 5), (120, 3):
        // mean t 60, mean r 3; sxy = (-60)(-2) + 0 + 60 * 0 = 120, sxx = 7200.
        let noisy = slope_per_min(&[(0.0, 1.0), (60.0, 5.0), (120.0, 3.0)]).unwrap();
        assert!(close(noisy, 1.0), "{noisy}");
        assert_eq!(slope_per_min(&[(5.0, 1.0)]), None);
        assert_eq!(slope_per_min(&[(5.0, 1.0), (5.0, 2.0)]), None);
    }

    #[test]
    fn table_points_are_evenly_spaced_with_both_ends() {
        assert_eq!(evenly_spaced(5, 20), vec![0, 1, 2, 3, 4]);
        let v = evenly_spaced(1000, 20);
        assert_eq!(v.len(), 20);
        assert_eq!((v[0], v[19]), (0, 999));
    }
}
