//! Replicas of `roe serve` sharing one expert library in PostgreSQL, measured as real
//! processes on 127.0.0.1 (the `roe` binary beside `roe-bench`): bench/results/replicas.{md,json}.
//!
//! The run creates a database of its own (`roe_bench_<random>`) on the server that
//! `--database-url` names, starts `--replicas` router replicas on it (`--no-inference`: the
//! encoder loads in each, the backbone in none) and one sled `roe serve` beside them, and
//! measures:
//!
//! 1. Propagation: a registration acknowledged by replica A, then `GetExpert` on every other
//!    replica every millisecond until it answers; the lag is the time from A's ack to that
//!    answer. Then read-your-writes: after each ack, `GetExpert` with `min_library_seq` on
//!    every follower must find the expert at once.
//! 2. Write latency per kind (register a prompt expert, register a LoRA expert, add 10
//!    instances, delete) on replica A against the sled server, the calls alternated so that
//!    both see the same machine; and writes/s with concurrent clients.
//! 3. Route latency (Q=32) on replica A against the sled server holding the same experts:
//!    fresh query sets (texts neither server has seen) and the same requests repeated (the
//!    embedding and route caches, as `roe serve` runs by default); routes/s with concurrent
//!    clients.
//! 4. Replica start at each `--startup-vectors` size: a synthetic library written straight
//!    into a database of its own through `PgStore` and into a sled folder through
//!    `SledStore` (`startup::write_synthetic`), then `roe serve` timed to its listening line:
//!    a replica with an empty data dir (everything read from the database, the index built),
//!    the same replica restarted after SIGTERM (its index dump reloaded), and sled opened
//!    twice (the second start reloads its dump).
//!
//! Every database the run creates is dropped at its end, also when it fails. PostgreSQL's
//! blocking client runs a runtime of its own, so everything that touches the database
//! directly runs outside the async parts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use roe_expert_library::embedding::Encoder;
use roe_expert_library::persist::dump_bytes;
use roe_expert_library::store::SledStore;
use roe_expert_library::Instance;
use roe_library_pg::{redact, with_dbname, PgConfig, PgStore};
use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, router_client::RouterClient,
};
use roe_task_suite::{sample, Task};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Code;

use crate::percentile;
use crate::startup::{dir_size, write_synthetic};

/// The admin URL when neither `--database-url` nor `ROE_BENCH_DATABASE_URL` names one.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The task whose experts (prompt and LoRA) the write measurements register.
const WRITE_TASK: &str = "sms_spam";
/// Instances of each expert registered by the write measurements, and added by AddInstances.
const WRITE_INSTANCES: usize = 10;
/// Seeds of the instance sets the latency and throughput writes send: always the same
/// texts, embedded once in a warm-up write, so that the figures are the write path (request,
/// store, index), not the encoder, which costs the same whatever the store.
const WRITE_SEED: u64 = 1_000;
const ADD_SEED: u64 = 1_001;
/// How often a follower is asked whether a write has arrived.
const POLL: Duration = Duration::from_millis(1);
/// A write a follower has not shown by then counts as not seen (the follow interval's
/// fallback read is 2 s by default).
const GIVE_UP: Duration = Duration::from_secs(10);
/// Queries per Route request.
const Q: usize = 32;
/// Train rows registered with each expert of the route library (as the routing benchmark).
const ROUTE_INSTANCES: usize = 100;
const QUICK_ROUTE_INSTANCES: usize = 20;
/// Fresh query sets in a quick run (a full run uses every disjoint set the test rows hold).
const QUICK_ROUTE_SETS: usize = 24;
/// Seed of the shuffle that cuts each task's test rows into disjoint query sets.
const FRESH_SEED: u64 = 7;
/// Concurrent clients of the route throughput runs.
const ROUTE_CLIENTS: usize = 4;
/// The repeated throughput run sends each repeated set this many times.
const REPEAT_ROUNDS: usize = 4;
/// Concurrent writers per replica in the write throughput run (the sled server gets as
/// many writers in all as the replicas together).
const WRITERS_PER_REPLICA: usize = 2;
/// Instances per synthetic expert of the start-up libraries: few experts, large COPYs.
const STARTUP_PER_EXPERT: usize = 10_000;
/// How long a start-up measurement waits for a rebuilt index's "index persisted" line: a
/// base plus this per million vectors (1M vectors dump in seconds; the margin is for slow
/// disks). Past it the phase is reported without a persist time.
const PERSIST_WAIT_BASE: Duration = Duration::from_secs(120);
const PERSIST_WAIT_PER_MILLION: Duration = Duration::from_secs(600);

/// Goals the report judges.
const GOAL_PROPAGATION_P99_MS: f64 = 100.0;
const GOAL_WRITE_RATIO: f64 = 2.0;
const GOAL_ROUTE_RATIO: f64 = 1.1;

pub struct ReplicasInput<'a> {
    /// The `roe` binary.
    pub exe: PathBuf,
    pub models_dir: &'a Path,
    pub encoder: Option<&'a Path>,
    pub tasks_dir: &'a Path,
    pub experts_dir: &'a Path,
    /// A role that may CREATE DATABASE; its own database is only used to create and drop
    /// the run's.
    pub admin_url: String,
    pub replicas: usize,
    pub writes: usize,
    pub startup_vectors: Vec<usize>,
    /// The replicas' `--follow-interval-ms`.
    pub follow_interval_ms: u64,
    pub quick: bool,
}

/// Latency figures of one series, in milliseconds (NaN, written as null, when empty).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct FollowerLag {
    pub replica: String,
    pub lag: Summary,
    /// Writes the follower had not shown after [`GIVE_UP`].
    pub not_seen: usize,
    pub lags_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Propagation {
    pub writes: usize,
    pub poll_ms: f64,
    pub give_up_s: f64,
    /// RegisterExpert on A, client side (10 new texts embedded each).
    pub ack: Summary,
    pub ack_ms: Vec<f64>,
    pub followers: Vec<FollowerLag>,
    /// Every follower's lags together.
    pub overall: Summary,
    pub not_seen: usize,
}

#[derive(Debug, Serialize)]
pub struct Consistency {
    pub writes: usize,
    /// GetExpert with min_library_seq, one per follower per write.
    pub reads: usize,
    pub misses: usize,
    pub first_misses: Vec<String>,
    pub read: Summary,
    pub read_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct KindLatency {
    pub kind: String,
    pub pg: Summary,
    pub sled: Summary,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub pg_ms: Vec<f64>,
    pub sled_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub servers: usize,
    pub clients: usize,
    pub requests: usize,
    pub seconds: f64,
    pub per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct RouteCase {
    pub pg: Summary,
    pub sled: Summary,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// Requests both servers gave the same winner (they hold the same experts).
    pub same_winner: usize,
    pub pg_ms: Vec<f64>,
    pub sled_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct RoutePart {
    pub q: usize,
    pub experts: usize,
    pub instances_per_expert: usize,
    /// Query sets timed one at a time (each sent to both servers).
    pub fresh: RouteCase,
    /// The same requests again.
    pub repeated: RouteCase,
    /// Other fresh sets, each sent once by concurrent clients.
    pub pg_fresh_throughput: Throughput,
    pub sled_fresh_throughput: Throughput,
    /// The repeated sets, [`REPEAT_ROUNDS`] times each, by concurrent clients.
    pub pg_repeated_throughput: Throughput,
    pub sled_repeated_throughput: Throughput,
}

/// One `roe serve` start, timed from spawn to its "roe listening on" line.
#[derive(Debug, Serialize)]
pub struct StartPhase {
    /// `postgresql` or `sled`.
    pub store: String,
    pub phase: String,
    pub listening_s: f64,
    /// From the server's "library loaded" log line.
    pub library_open_s: Option<f64>,
    pub vectors: Option<u64>,
    pub index_reloaded: Option<bool>,
    /// Persisting the rebuilt index after the listening line (its "index persisted" line).
    pub persist_s: Option<f64>,
    pub rss_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// SIGTERM to exit.
    pub stop_s: f64,
    /// The index dump in the data dir after the clean shutdown.
    pub dump_mib: f64,
}

#[derive(Debug, Serialize)]
pub struct StartupSize {
    pub vectors: usize,
    pub experts: usize,
    pub per_expert: usize,
    pub pg_write_s: f64,
    pub pg_database_mib: Option<f64>,
    pub sled_write_s: f64,
    pub sled_mib: f64,
    pub phases: Vec<StartPhase>,
}

#[derive(Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct ReplicasReport {
    /// UTC date of the run.
    pub date: String,
    pub quick: bool,
    /// The admin URL, password hidden.
    pub database: String,
    pub postgres_version: Option<String>,
    pub replicas: usize,
    pub follow_interval_ms: u64,
    /// Hardware threads of this machine (shared by every process of the run).
    pub threads: usize,
    pub goals: Vec<Goal>,
    pub propagation: Propagation,
    pub consistency: Consistency,
    pub writes: Vec<KindLatency>,
    pub pg_write_throughput: Throughput,
    pub sled_write_throughput: Throughput,
    pub route: RoutePart,
    pub startup: Vec<StartupSize>,
}

// ------------------------------------------------------------------------ pure helpers

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

pub(crate) fn summarize(values_ms: &[f64]) -> Summary {
    let mut v = values_ms.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Summary {
        n: v.len(),
        p50_ms: percentile(&v, 0.5),
        p95_ms: percentile(&v, 0.95),
        p99_ms: percentile(&v, 0.99),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
        mean_ms: if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        },
    }
}

/// `a / b`; NaN when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// The UTC calendar date (`YYYY-MM-DD`) of a Unix time (Howard Hinnant's days-to-civil).
pub(crate) fn utc_date(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The value of `name=` in a text log line (`... library loaded experts=3 vectors=30 ...`).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
}

/// Replica names: A, B, C, ...
fn replica_name(i: usize) -> String {
    char::from(b'A' + (i % 26) as u8).to_string()
}

/// One Route request's worth of queries, drawn from one task's test rows.
#[derive(Debug, Clone)]
struct RouteSet {
    task: String,
    queries: Vec<proto::Query>,
}

impl RouteSet {
    fn request(&self) -> proto::RouteRequest {
        proto::RouteRequest {
            queries: self.queries.clone(),
            options: None,
            min_library_seq: 0,
        }
    }
}

/// Query sets of `q` test rows each, no row in two sets: each task's rows shuffled once and
/// cut into chunks, the tasks taken in turn (so that consecutive requests route to different
/// experts), at most `limit`. Fresh texts make every route embed all its queries and miss
/// the route cache, on each server alike.
fn fresh_route_sets(tasks: &[(&str, &[Instance])], q: usize, limit: usize) -> Vec<RouteSet> {
    let per_task: Vec<Vec<Vec<proto::Query>>> = tasks
        .iter()
        .map(|&(_, rows)| {
            sample(rows, rows.len(), FRESH_SEED)
                .chunks_exact(q)
                .map(|chunk| {
                    chunk
                        .iter()
                        .map(|i| proto::Query {
                            input: i.input.clone(),
                            choices: i.choices.clone(),
                            target: None,
                        })
                        .collect::<Vec<proto::Query>>()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let rounds = per_task.iter().map(Vec::len).max().unwrap_or(0);
    let mut sets = Vec::new();
    for r in 0..rounds {
        for ((name, _), chunks) in tasks.iter().zip(&per_task) {
            if let Some(queries) = chunks.get(r) {
                sets.push(RouteSet {
                    task: name.to_string(),
                    queries: queries.clone(),
                });
            }
        }
    }
    sets.truncate(limit);
    sets
}

// ------------------------------------------------------------------------ fixtures

fn peft(experts: &Path, kind: &str, task: &str) -> Result<proto::PeftAdapter> {
    let dir = experts.join(kind).join(task);
    Ok(proto::PeftAdapter {
        adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json"))
            .with_context(|| format!("reading {}", dir.display()))?,
        adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))
            .with_context(|| format!("reading {}", dir.display()))?,
    })
}

fn proto_instances(rows: Vec<Instance>) -> Vec<proto::Instance> {
    rows.into_iter()
        .map(|i| proto::Instance {
            input: i.input,
            target: i.target,
            choices: i.choices,
        })
        .collect()
}

/// A registration of `adapter` under `id` with `n` of `task`'s train rows drawn with `seed`
/// (as cli/tests/common's `register_request` builds them).
fn register_request(
    id: &str,
    adapter: &proto::PeftAdapter,
    task: &Task,
    n: usize,
    seed: u64,
) -> proto::RegisterExpertRequest {
    proto::RegisterExpertRequest {
        id: id.into(),
        name: id.into(),
        description: task.info.description.clone(),
        adapter: Some(adapter.clone()),
        instances: proto_instances(sample(&task.train, n, seed)),
        ..Default::default()
    }
}

/// What the live measurements send, read from disk before any server starts.
struct Fixtures {
    write_task: Task,
    prompt: proto::PeftAdapter,
    lora: proto::PeftAdapter,
    /// Every suite task's prompt expert, registered on replica A and on the sled server.
    route_experts: Vec<proto::RegisterExpertRequest>,
    route_instances: usize,
    route_sets: Vec<RouteSet>,
}

fn fixtures(input: &ReplicasInput<'_>) -> Result<Fixtures> {
    let write_task = Task::load(input.tasks_dir.join(WRITE_TASK))
        .with_context(|| format!("loading task {WRITE_TASK}"))?;
    if write_task.train.len() < 2 * WRITE_INSTANCES {
        bail!("task {WRITE_TASK} has too few train rows");
    }
    let prompt = peft(input.experts_dir, "prompt", WRITE_TASK)?;
    let lora = peft(input.experts_dir, "lora", WRITE_TASK)?;
    let route_instances = if input.quick {
        QUICK_ROUTE_INSTANCES
    } else {
        ROUTE_INSTANCES
    };
    let tasks = roe_task_suite::load_suite(input.tasks_dir)
        .with_context(|| format!("loading the tasks in {}", input.tasks_dir.display()))?;
    let mut route_tasks = Vec::new();
    let mut route_experts = Vec::new();
    for task in tasks {
        if !input.experts_dir.join("prompt").join(task.name()).is_dir() {
            continue;
        }
        let adapter = peft(input.experts_dir, "prompt", task.name())?;
        route_experts.push(register_request(
            task.name(),
            &adapter,
            &task,
            route_instances,
            0,
        ));
        route_tasks.push(task);
    }
    let named: Vec<(&str, &[Instance])> = route_tasks
        .iter()
        .map(|t| (t.name(), t.test.as_slice()))
        .collect();
    let limit = if input.quick {
        QUICK_ROUTE_SETS
    } else {
        usize::MAX
    };
    let route_sets = fresh_route_sets(&named, Q, limit);
    if route_sets.len() < 4 {
        bail!(
            "the tasks in {} give {} query sets of {Q} test rows; at least 4 are needed",
            input.tasks_dir.display(),
            route_sets.len()
        );
    }
    Ok(Fixtures {
        write_task,
        prompt,
        lora,
        route_experts,
        route_instances,
        route_sets,
    })
}

// ------------------------------------------------------------------------ the database

/// A plain connection, with a connect timeout unless the URL sets one.
fn pg_connect(url: &str) -> Result<postgres::Client> {
    let mut config = postgres::Config::from_str(url)
        .with_context(|| format!("{} is not a PostgreSQL URL", redact(url)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .connect(postgres::NoTls)
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// A database made for this run, dropped (its sessions terminated first) when the value is,
/// on an error too.
struct BenchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    fn create(admin_url: &str, name: &str) -> Result<Self> {
        // Ours, so no quoting: lowercase letters, digits and underscores.
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bail!("database name {name:?} needs quoting");
        }
        let mut admin = pg_connect(admin_url).context(
            "the replicas benchmark needs a PostgreSQL server whose role may CREATE DATABASE \
             (--database-url or ROE_BENCH_DATABASE_URL)",
        )?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating database {name} on {}", redact(admin_url)))?;
        Ok(Self {
            admin_url: admin_url.to_string(),
            name: name.to_string(),
            url: with_dbname(admin_url, name),
        })
    }

    fn size_bytes(&self) -> Option<u64> {
        let mut admin = pg_connect(&self.admin_url).ok()?;
        let row = admin
            .query_one("SELECT pg_database_size($1::name)", &[&self.name])
            .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        let dropped = pg_connect(&self.admin_url).and_then(|mut admin| {
            // FORCE terminates the sessions too; terminating first also covers a session
            // that reconnects in between.
            let _ = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            );
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .map_err(anyhow::Error::from)
        });
        match dropped {
            Ok(()) => eprintln!("replicas: dropped database {}", self.name),
            Err(e) => eprintln!(
                "replicas: could not drop database {} (drop it by hand): {e:#}",
                self.name
            ),
        }
    }
}

fn postgres_version(admin_url: &str) -> Option<String> {
    let mut admin = pg_connect(admin_url).ok()?;
    let row = admin
        .query_one("SELECT current_setting('server_version')", &[])
        .ok()?;
    row.get::<_, Option<String>>(0)
}

// ------------------------------------------------------------------------ processes

/// A `roe serve` child on 127.0.0.1 (a port the kernel picks); killed when dropped, on an
/// error too. Its stderr is kept in memory: the start-up measurements read its log lines,
/// and an error shows its end.
struct Serve {
    name: String,
    child: Child,
    url: String,
    /// Seconds from spawn to the "roe listening on" line.
    listening_s: f64,
    log: Arc<Mutex<String>>,
}

impl Serve {
    /// Starts `roe serve --no-inference` on `data_dir`, on the database `database_url` when
    /// given (a replica), and waits for its listening line. `rust_log` sets what it logs.
    fn start(
        name: &str,
        input: &ReplicasInput<'_>,
        data_dir: &Path,
        database_url: Option<&str>,
        rust_log: &str,
    ) -> Result<Self> {
        let mut cmd = Command::new(&input.exe);
        cmd.args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--no-inference",
            "--data-dir",
        ])
        .arg(data_dir)
        .arg("--models-dir")
        .arg(input.models_dir);
        if let Some(encoder) = input.encoder {
            cmd.arg("--encoder").arg(encoder);
        }
        if let Some(url) = database_url {
            cmd.args(["--database-url", url, "--follow-interval-ms"])
                .arg(input.follow_interval_ms.to_string());
        }
        cmd.env("RUST_LOG", rust_log)
            .env("ROE_LOG_FORMAT", "text")
            // No HTTP server: the benchmark speaks gRPC, and the default port is shared.
            .env("ROE_HTTP_ADDR", "")
            // The caller's environment must not turn the sled server into a replica, lock the
            // clients out or change the role.
            .env_remove("ROE_DATABASE_URL")
            .env_remove("ROE_ADMIN_KEYS")
            .env_remove("ROE_READ_KEYS")
            .env_remove("ROE_ROLE")
            .env_remove("ROE_LIBRARY_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", input.exe.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("the server's stderr")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let mut s = sink.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        // Made before the wait so that an error on the way kills the child.
        let mut serve = Self {
            name: name.to_string(),
            child,
            url: String::new(),
            listening_s: 0.0,
            log,
        };
        let mut lines = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line)? == 0 {
                // Let the stderr reader catch up with the last words.
                std::thread::sleep(Duration::from_millis(200));
                bail!(
                    "{}: roe serve stopped before listening; the end of its log:\n{}",
                    serve.name,
                    serve.log_tail(30)
                );
            }
            if let Some(addr) = line.trim().strip_prefix("roe listening on ") {
                serve.listening_s = started.elapsed().as_secs_f64();
                serve.url = format!("http://{addr}");
                break;
            }
        }
        // The rest of its stdout is drained: a closed pipe would fail its next print.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        Ok(serve)
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The first log line holding `needle`, waiting up to `timeout` for it.
    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; the end of its log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if Instant::now() > until {
                bail!("{} logged no {needle:?} within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `kB` line of /proc/<pid>/status, in bytes (VmRSS, VmHWM: the peak).
    fn status_bytes(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, as `docker stop` sends (the server drains and persists its index), and wait;
    /// returns the seconds to exit.
    fn stop(mut self) -> Result<f64> {
        let t = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        let status = self.child.wait()?;
        if !status.success() {
            eprintln!(
                "replicas: {} exited with {status} after SIGTERM; the end of its log:\n{}",
                self.name,
                self.log_tail(10)
            );
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------ the run

/// Runs every measurement; returns the JSON and the Markdown of the report.
pub fn run(
    input: &ReplicasInput<'_>,
    rt: &tokio::runtime::Runtime,
) -> Result<(serde_json::Value, String)> {
    if !(2..=26).contains(&input.replicas) {
        bail!("--replicas must be 2 to 26 (one writes, the others follow)");
    }
    if input.writes == 0 {
        bail!("--writes must be at least 1");
    }
    if input.startup_vectors.contains(&0) {
        bail!("--startup-vectors must be positive");
    }
    let date = utc_date(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    // Everything read from disk first: a missing file fails before anything starts.
    let fx = fixtures(input)?;
    // The synthetic libraries are marked with the id of the encoder `roe serve` loads, which
    // checks it at open (the vectors are synthetic; only the id and the dimension matter).
    let encoder_id = roe_cli::models::load_serving_encoder(input.models_dir, input.encoder)?
        .id()
        .to_string();
    let work = tempfile::tempdir()?;
    let base = format!("roe_bench_{:016x}", rand::random::<u64>());
    let postgres_version = postgres_version(&input.admin_url);

    let live = {
        let db = BenchDatabase::create(&input.admin_url, &base)?;
        eprintln!(
            "replicas: database {base}; starting {} replicas and a sled server ...",
            input.replicas
        );
        let mut replicas = Vec::with_capacity(input.replicas);
        for i in 0..input.replicas {
            let name = replica_name(i);
            replicas.push(Serve::start(
                &format!("replica {name}"),
                input,
                &work.path().join(format!("replica-{name}")),
                Some(db.url.as_str()),
                "warn",
            )?);
        }
        let sled = Serve::start(
            "sled server",
            input,
            &work.path().join("sled"),
            None,
            "warn",
        )?;
        let urls: Vec<(String, String)> = replicas
            .iter()
            .enumerate()
            .map(|(i, s)| (replica_name(i), s.url.clone()))
            .collect();
        let measured = rt.block_on(measure_live(input, &fx, &urls, &sled.url));
        let measured = measured.map_err(|e| {
            let tails: Vec<String> = replicas
                .iter()
                .chain([&sled])
                .map(|s| format!("{}:\n{}", s.name, s.log_tail(10)))
                .collect();
            e.context(format!("the servers' logs end:\n{}", tails.join("\n")))
        });
        // The servers go before their database.
        drop(sled);
        drop(replicas);
        drop(db);
        measured?
    };

    let mut startup = Vec::new();
    for &n in &input.startup_vectors {
        startup.push(startup_size(input, &encoder_id, &base, work.path(), n)?);
    }

    let mut report = ReplicasReport {
        date,
        quick: input.quick,
        database: redact(&input.admin_url),
        postgres_version,
        replicas: input.replicas,
        follow_interval_ms: input.follow_interval_ms,
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        goals: Vec::new(),
        propagation: live.propagation,
        consistency: live.consistency,
        writes: live.writes,
        pg_write_throughput: live.pg_write_throughput,
        sled_write_throughput: live.sled_write_throughput,
        route: live.route,
        startup,
    };
    report.goals = goals(&report);
    let md = markdown(&report);
    let json = serde_json::json!({
        "machine": crate::machine(),
        "report": serde_json::to_value(&report)?,
    });
    Ok((json, md))
}

/// What the live servers measured.
struct Live {
    propagation: Propagation,
    consistency: Consistency,
    writes: Vec<KindLatency>,
    pg_write_throughput: Throughput,
    sled_write_throughput: Throughput,
    route: RoutePart,
}

/// A server's gRPC clients, on one connection.
#[derive(Clone)]
struct Grpc {
    name: String,
    url: String,
    library: ExpertLibraryClient<Channel>,
    router: RouterClient<Channel>,
}

impl Grpc {
    async fn connect(name: &str, url: &str) -> Result<Self> {
        let channel = Channel::from_shared(url.to_string())?
            .connect()
            .await
            .with_context(|| format!("connecting to {name} at {url}"))?;
        Ok(Self {
            name: name.to_string(),
            url: url.to_string(),
            library: ExpertLibraryClient::new(channel.clone()),
            router: RouterClient::new(channel),
        })
    }
}

/// Parts 1 to 3, on running servers: `replicas` as (name, gRPC URL), the first one writes.
async fn measure_live(
    input: &ReplicasInput<'_>,
    fx: &Fixtures,
    replicas: &[(String, String)],
    sled_url: &str,
) -> Result<Live> {
    let mut servers = Vec::with_capacity(replicas.len());
    for (name, url) in replicas {
        servers.push(Grpc::connect(&format!("replica {name}"), url).await?);
    }
    let sled = Grpc::connect("sled server", sled_url).await?;
    let (a, followers) = servers.split_first().context("no replica")?;

    eprintln!(
        "replicas: registering {} experts ({} instances each) on replica A and the sled server ...",
        fx.route_experts.len(),
        fx.route_instances
    );
    let (last_seq, _) = tokio::try_join!(
        register_all(a.library.clone(), &fx.route_experts),
        register_all(sled.library.clone(), &fx.route_experts),
    )?;
    // The followers catch up before anything is timed, so that their work is not in it.
    let last_id = &fx.route_experts.last().context("no route expert")?.id;
    for f in followers {
        wait_applied(f, last_id, last_seq).await?;
    }

    eprintln!("replicas: Route latency (Q={Q}), replica A against the sled server ...");
    let route = route_part(a, &sled, fx).await?;
    eprintln!("replicas: propagation of {} writes ...", input.writes);
    let propagation = propagation(a, followers, fx, input.writes).await?;
    eprintln!("replicas: read-your-writes with min_library_seq ...");
    let consistency = consistency(a, followers, fx, input.writes).await?;
    let per_kind = (input.writes / 4).max(1);
    eprintln!("replicas: write latency, {per_kind} of each kind ...");
    let writes = write_latency(a, &sled, fx, per_kind).await?;
    eprintln!("replicas: write throughput ...");
    let replica_urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let writers = WRITERS_PER_REPLICA * servers.len();
    let pg_write_throughput =
        write_throughput(&replica_urls, writers, input.writes, "tp-pg", fx).await?;
    let sled_write_throughput = write_throughput(
        std::slice::from_ref(&sled.url),
        writers,
        input.writes,
        "tp-sled",
        fx,
    )
    .await?;
    Ok(Live {
        propagation,
        consistency,
        writes,
        pg_write_throughput,
        sled_write_throughput,
        route,
    })
}

/// Registers `requests` one after another; returns the last write's seq.
async fn register_all(
    mut client: ExpertLibraryClient<Channel>,
    requests: &[proto::RegisterExpertRequest],
) -> Result<u64> {
    let mut seq = 0;
    for r in requests {
        seq = client
            .register_expert(r.clone())
            .await
            .with_context(|| format!("registering {}", r.id))?
            .into_inner()
            .library_seq;
    }
    Ok(seq)
}

/// Waits until `server` has applied `seq` (a read with min_library_seq answers).
async fn wait_applied(server: &Grpc, id: &str, seq: u64) -> Result<()> {
    let mut client = server.library.clone();
    let started = Instant::now();
    loop {
        let asked = client
            .get_expert(proto::GetExpertRequest {
                id: id.to_string(),
                min_library_seq: seq,
                ..Default::default()
            })
            .await;
        match asked {
            Ok(_) => return Ok(()),
            // Not applied within --min-seq-wait-ms: ask again, for a while.
            Err(s)
                if s.code() == Code::Unavailable
                    && started.elapsed() < Duration::from_secs(120) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => {
                return Err(anyhow::Error::new(s)
                    .context(format!("{} never applied seq {seq}", server.name)))
            }
        }
    }
}

// ---------------------------------------------------------------- 1. propagation

/// Polls `id` on a follower every [`POLL`] until it answers: ms from `t0` (A's ack) to that
/// answer; None after [`GIVE_UP`].
async fn lag_until_found(
    mut client: ExpertLibraryClient<Channel>,
    id: String,
    t0: Instant,
) -> Result<Option<f64>> {
    loop {
        let asked = client
            .get_expert(proto::GetExpertRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await;
        match asked {
            Ok(_) => return Ok(Some(ms(t0.elapsed()))),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(anyhow::Error::new(s).context(format!("GetExpert {id}"))),
        }
        if t0.elapsed() > GIVE_UP {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One write at a time on A (the next once every follower has shown the last), so that the
/// lag is the followers', not a queue's.
async fn propagation(
    a: &Grpc,
    followers: &[Grpc],
    fx: &Fixtures,
    writes: usize,
) -> Result<Propagation> {
    let mut writer = a.library.clone();
    let mut ack_ms = Vec::with_capacity(writes);
    let mut lags: Vec<Vec<f64>> = vec![Vec::with_capacity(writes); followers.len()];
    let mut not_seen = vec![0usize; followers.len()];
    for i in 0..writes {
        let id = format!("prop-{i}");
        // New rows each time (seed i), as registrations bring.
        let request = register_request(&id, &fx.prompt, &fx.write_task, WRITE_INSTANCES, i as u64);
        let sent = Instant::now();
        writer
            .register_expert(request)
            .await
            .with_context(|| format!("registering {id} on replica A"))?;
        let t0 = Instant::now();
        ack_ms.push(ms(t0.duration_since(sent)));
        let polls: Vec<_> = followers
            .iter()
            .map(|f| tokio::spawn(lag_until_found(f.library.clone(), id.clone(), t0)))
            .collect();
        for (k, poll) in polls.into_iter().enumerate() {
            match poll.await?? {
                Some(lag) => lags[k].push(lag),
                None => not_seen[k] += 1,
            }
        }
    }
    let all: Vec<f64> = lags.iter().flatten().copied().collect();
    Ok(Propagation {
        writes,
        poll_ms: ms(POLL),
        give_up_s: GIVE_UP.as_secs_f64(),
        ack: summarize(&ack_ms),
        ack_ms,
        followers: followers
            .iter()
            .zip(lags)
            .zip(&not_seen)
            .map(|((f, lags_ms), &not_seen)| FollowerLag {
                replica: f.name.clone(),
                lag: summarize(&lags_ms),
                not_seen,
                lags_ms,
            })
            .collect(),
        overall: summarize(&all),
        not_seen: not_seen.iter().sum(),
    })
}

/// The read-your-writes contract: right after each ack on A, GetExpert with the write's
/// library_seq on every follower at once must find it (the follower waits until it has
/// applied the seq, at most --min-seq-wait-ms). Separate writes from the propagation run:
/// a read that passes min_library_seq may hurry a follower, which would flatter the lags.
async fn consistency(
    a: &Grpc,
    followers: &[Grpc],
    fx: &Fixtures,
    writes: usize,
) -> Result<Consistency> {
    let mut writer = a.library.clone();
    let (mut reads, mut misses) = (0, 0);
    let mut first_misses = Vec::new();
    let mut read_ms = Vec::with_capacity(writes * followers.len());
    for i in 0..writes {
        let id = format!("ryw-{i}");
        let request = register_request(
            &id,
            &fx.prompt,
            &fx.write_task,
            WRITE_INSTANCES,
            (writes + i) as u64,
        );
        let seq = writer
            .register_expert(request)
            .await
            .with_context(|| format!("registering {id} on replica A"))?
            .into_inner()
            .library_seq;
        let asks: Vec<_> = followers
            .iter()
            .map(|f| {
                let mut client = f.library.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let answer = client
                        .get_expert(proto::GetExpertRequest {
                            id,
                            min_library_seq: seq,
                            ..Default::default()
                        })
                        .await;
                    (
                        ms(t.elapsed()),
                        answer
                            .map(|_| ())
                            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
                    )
                })
            })
            .collect();
        for (k, ask) in asks.into_iter().enumerate() {
            let (took, answer) = ask.await?;
            reads += 1;
            read_ms.push(took);
            if let Err(e) = answer {
                misses += 1;
                if first_misses.len() < 10 {
                    first_misses.push(format!("{} {id} at seq {seq}: {e}", followers[k].name));
                }
            }
        }
    }
    Ok(Consistency {
        writes,
        reads,
        misses,
        first_misses,
        read: summarize(&read_ms),
        read_ms,
    })
}

// ---------------------------------------------------------------- 2. writes

#[derive(Debug, Clone, Copy)]
enum WriteKind {
    RegisterPrompt,
    RegisterLora,
    AddInstances,
    Delete,
}

impl WriteKind {
    /// In the order of each round: the LoRA registered in a round is deleted in it.
    const ALL: [WriteKind; 4] = [
        WriteKind::RegisterPrompt,
        WriteKind::RegisterLora,
        WriteKind::AddInstances,
        WriteKind::Delete,
    ];

    fn name(self) -> &'static str {
        match self {
            WriteKind::RegisterPrompt => "register prompt",
            WriteKind::RegisterLora => "register LoRA",
            WriteKind::AddInstances => "add 10 instances",
            WriteKind::Delete => "delete",
        }
    }
}

enum WriteRequest {
    // Boxed: a registration is several times the size of the others.
    Register(Box<proto::RegisterExpertRequest>),
    Add(proto::AddInstancesRequest),
    Delete(proto::DeleteExpertRequest),
}

/// The request of `kind` in a round on experts `prompt_id` and `lora_id`.
fn write_request(kind: WriteKind, prompt_id: &str, lora_id: &str, fx: &Fixtures) -> WriteRequest {
    let task = &fx.write_task;
    match kind {
        WriteKind::RegisterPrompt => WriteRequest::Register(Box::new(register_request(
            prompt_id,
            &fx.prompt,
            task,
            WRITE_INSTANCES,
            WRITE_SEED,
        ))),
        WriteKind::RegisterLora => WriteRequest::Register(Box::new(register_request(
            lora_id,
            &fx.lora,
            task,
            WRITE_INSTANCES,
            WRITE_SEED,
        ))),
        WriteKind::AddInstances => WriteRequest::Add(proto::AddInstancesRequest {
            id: prompt_id.to_string(),
            instances: proto_instances(sample(&task.train, WRITE_INSTANCES, ADD_SEED)),
            expected_version: None,
        }),
        WriteKind::Delete => WriteRequest::Delete(proto::DeleteExpertRequest {
            id: lora_id.to_string(),
            expected_version: None,
        }),
    }
}

/// Sends a write (built beforehand, out of the timing); ms to its answer.
async fn send_write(
    client: &mut ExpertLibraryClient<Channel>,
    request: WriteRequest,
) -> Result<f64> {
    let t = Instant::now();
    match request {
        WriteRequest::Register(r) => {
            client.register_expert(*r).await?;
        }
        WriteRequest::Add(r) => {
            client.add_instances(r).await?;
        }
        WriteRequest::Delete(r) => {
            client.delete_expert(r).await?;
        }
    }
    Ok(ms(t.elapsed()))
}

/// Each kind `per_kind` times on replica A and on the sled server, every call alternated
/// between the two (which goes first alternating too), after one untimed round on each that
/// puts the rows' vectors in both embedding caches. The other replicas follow meanwhile, as
/// in a deployment.
async fn write_latency(
    pg: &Grpc,
    sled: &Grpc,
    fx: &Fixtures,
    per_kind: usize,
) -> Result<Vec<KindLatency>> {
    let mut clients = [pg.library.clone(), sled.library.clone()];
    let names = [pg.name.as_str(), sled.name.as_str()];
    for (client, name) in clients.iter_mut().zip(names) {
        for kind in WriteKind::ALL {
            send_write(client, write_request(kind, "warm-prompt", "warm-lora", fx))
                .await
                .with_context(|| format!("warm-up {} on {name}", kind.name()))?;
        }
    }
    let mut times: [[Vec<f64>; 2]; 4] = Default::default();
    for i in 0..per_kind {
        let (prompt_id, lora_id) = (format!("wp-{i}"), format!("wl-{i}"));
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for (k, kind) in WriteKind::ALL.into_iter().enumerate() {
            for s in order {
                let request = write_request(kind, &prompt_id, &lora_id, fx);
                let took = send_write(&mut clients[s], request)
                    .await
                    .with_context(|| format!("{} {i} on {}", kind.name(), names[s]))?;
                times[k][s].push(took);
            }
        }
    }
    Ok(WriteKind::ALL
        .into_iter()
        .zip(times)
        .map(|(kind, [pg_ms, sled_ms])| {
            let (pg, sled) = (summarize(&pg_ms), summarize(&sled_ms));
            KindLatency {
                kind: kind.name().to_string(),
                p50_ratio: ratio(pg.p50_ms, sled.p50_ms),
                p99_ratio: ratio(pg.p99_ms, sled.p99_ms),
                pg,
                sled,
                pg_ms,
                sled_ms,
            }
        })
        .collect())
}

/// `total` registrations of small prompt experts by `clients` concurrent clients, each on a
/// connection of its own, spread over `urls` in turn; every server's embedding cache warmed
/// first with the rows they all send.
async fn write_throughput(
    urls: &[String],
    clients: usize,
    total: usize,
    prefix: &str,
    fx: &Fixtures,
) -> Result<Throughput> {
    let template = register_request("", &fx.prompt, &fx.write_task, WRITE_INSTANCES, WRITE_SEED);
    for (s, url) in urls.iter().enumerate() {
        let mut client = ExpertLibraryClient::connect(url.clone()).await?;
        let mut warm = template.clone();
        warm.id = format!("{prefix}-warm-{s}");
        warm.name = warm.id.clone();
        client.register_expert(warm).await?;
    }
    let mut connected = Vec::with_capacity(clients);
    for j in 0..clients {
        connected.push(ExpertLibraryClient::connect(urls[j % urls.len()].clone()).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            let (next, template, prefix) = (next.clone(), template.clone(), prefix.to_string());
            tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        return anyhow::Ok(());
                    }
                    let mut request = template.clone();
                    request.id = format!("{prefix}-{k}");
                    request.name = request.id.clone();
                    client.register_expert(request).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(Throughput {
        servers: urls.len(),
        clients,
        requests: total,
        seconds,
        per_s: total as f64 / seconds,
    })
}

// ---------------------------------------------------------------- 3. routes

async fn route_once(client: &mut RouterClient<Channel>, set: &RouteSet) -> Result<(f64, String)> {
    let request = set.request();
    let t = Instant::now();
    let routed = client
        .route(request)
        .await
        .with_context(|| format!("Route on a set of {}", set.task))?
        .into_inner();
    Ok((ms(t.elapsed()), routed.expert_id))
}

/// Every set once on each server, one request at a time, which server goes first
/// alternating, so that both see the same machine.
async fn route_pairs(pg: &Grpc, sled: &Grpc, sets: &[RouteSet]) -> Result<RouteCase> {
    let (mut pg_router, mut sled_router) = (pg.router.clone(), sled.router.clone());
    let (mut pg_ms, mut sled_ms) = (Vec::new(), Vec::new());
    let mut same_winner = 0;
    for (i, set) in sets.iter().enumerate() {
        let ((p, p_winner), (s, s_winner)) = if i % 2 == 0 {
            let p = route_once(&mut pg_router, set).await?;
            (p, route_once(&mut sled_router, set).await?)
        } else {
            let s = route_once(&mut sled_router, set).await?;
            (route_once(&mut pg_router, set).await?, s)
        };
        pg_ms.push(p);
        sled_ms.push(s);
        same_winner += usize::from(p_winner == s_winner);
    }
    let (pg_sum, sled_sum) = (summarize(&pg_ms), summarize(&sled_ms));
    Ok(RouteCase {
        p50_ratio: ratio(pg_sum.p50_ms, sled_sum.p50_ms),
        p99_ratio: ratio(pg_sum.p99_ms, sled_sum.p99_ms),
        pg: pg_sum,
        sled: sled_sum,
        same_winner,
        pg_ms,
        sled_ms,
    })
}

/// `total` routes over `sets` (in turn) from `clients` concurrent clients, each on a
/// connection of its own.
async fn route_throughput(
    url: &str,
    sets: &[RouteSet],
    clients: usize,
    total: usize,
) -> Result<Throughput> {
    let sets: Arc<Vec<RouteSet>> = Arc::new(sets.to_vec());
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        connected.push(RouterClient::connect(url.to_string()).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            let (next, sets) = (next.clone(), sets.clone());
            tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        return anyhow::Ok(());
                    }
                    client.route(sets[k % sets.len()].request()).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(Throughput {
        servers: 1,
        clients,
        requests: total,
        seconds,
        per_s: total as f64 / seconds,
    })
}

/// Two thirds of the fresh sets are timed one at a time, fresh and then repeated; the other
/// third is kept unseen for the fresh throughput run.
async fn route_part(pg: &Grpc, sled: &Grpc, fx: &Fixtures) -> Result<RoutePart> {
    let timed = (fx.route_sets.len() * 2 / 3).max(1);
    let (timed_sets, spare_sets) = fx.route_sets.split_at(timed);
    // Warm-up, untimed: connections and first-call work, on rows both servers registered
    // (not on the timed sets, which must stay unseen).
    let warm = RouteSet {
        task: WRITE_TASK.into(),
        queries: sample(&fx.write_task.train, Q, 0)
            .into_iter()
            .map(|i| proto::Query {
                input: i.input,
                choices: i.choices,
                target: None,
            })
            .collect(),
    };
    route_once(&mut pg.router.clone(), &warm).await?;
    route_once(&mut sled.router.clone(), &warm).await?;
    let fresh = route_pairs(pg, sled, timed_sets).await?;
    let repeated = route_pairs(pg, sled, timed_sets).await?;
    let pg_fresh_throughput =
        route_throughput(&pg.url, spare_sets, ROUTE_CLIENTS, spare_sets.len()).await?;
    let sled_fresh_throughput =
        route_throughput(&sled.url, spare_sets, ROUTE_CLIENTS, spare_sets.len()).await?;
    let rounds = timed_sets.len() * REPEAT_ROUNDS;
    let pg_repeated_throughput =
        route_throughput(&pg.url, timed_sets, ROUTE_CLIENTS, rounds).await?;
    let sled_repeated_throughput =
        route_throughput(&sled.url, timed_sets, ROUTE_CLIENTS, rounds).await?;
    Ok(RoutePart {
        q: Q,
        experts: fx.route_experts.len(),
        instances_per_expert: fx.route_instances,
        fresh,
        repeated,
        pg_fresh_throughput,
        sled_fresh_throughput,
        pg_repeated_throughput,
        sled_repeated_throughput,
    })
}

// ---------------------------------------------------------------- 4. replica start

/// One library of `n` synthetic vectors in a database of its own and in a sled folder, each
/// opened by `roe serve` twice.
fn startup_size(
    input: &ReplicasInput<'_>,
    encoder_id: &str,
    base: &str,
    work: &Path,
    n: usize,
) -> Result<StartupSize> {
    let per_expert = STARTUP_PER_EXPERT.min(n);
    let db = BenchDatabase::create(&input.admin_url, &format!("{base}_v{n}"))?;
    eprintln!(
        "replicas: writing {n} synthetic vectors into PostgreSQL (database {}) ...",
        db.name
    );
    let t = Instant::now();
    let experts = {
        let store = PgStore::connect(&PgConfig::new(db.url.clone()))
            .with_context(|| format!("opening a PgStore on {}", db.name))?;
        write_synthetic(&store, n, per_expert, encoder_id)?
    };
    let pg_write_s = t.elapsed().as_secs_f64();
    let pg_database_mib = db.size_bytes().map(mib);
    eprintln!("replicas: ... {pg_write_s:.1} s; the same into sled ...");
    let sled_dir = work.join(format!("sled-{n}"));
    let t = Instant::now();
    {
        // Closed before `roe serve` opens the folder (sled locks it).
        let store = SledStore::open(&sled_dir)?;
        write_synthetic(&store, n, per_expert, encoder_id)?;
    }
    let sled_write_s = t.elapsed().as_secs_f64();
    let sled_mib = mib(dir_size(&sled_dir));

    let pg_dir = work.join(format!("replica-{n}"));
    let phases = vec![
        start_phase(
            input,
            "postgresql",
            "fresh: empty data dir",
            &pg_dir,
            Some(db.url.as_str()),
            n,
        )?,
        start_phase(
            input,
            "postgresql",
            "restart after SIGTERM",
            &pg_dir,
            Some(db.url.as_str()),
            n,
        )?,
        start_phase(input, "sled", "first start: no dump", &sled_dir, None, n)?,
        start_phase(input, "sled", "warm: second start", &sled_dir, None, n)?,
    ];
    let _ = std::fs::remove_dir_all(&pg_dir);
    let _ = std::fs::remove_dir_all(&sled_dir);
    Ok(StartupSize {
        vectors: n,
        experts,
        per_expert,
        pg_write_s,
        pg_database_mib,
        sled_write_s,
        sled_mib,
        phases,
    })
}

/// Starts `roe serve` on `dir` (a replica on `database_url`, else sled), times it to its
/// listening line, waits for a rebuilt index to be persisted (the next start reloads it
/// only then), reads its memory and stops it with SIGTERM.
fn start_phase(
    input: &ReplicasInput<'_>,
    store: &str,
    phase: &str,
    dir: &Path,
    database_url: Option<&str>,
    vectors: usize,
) -> Result<StartPhase> {
    eprintln!("replicas: {vectors} vectors, {store}, {phase} ...");
    // info: the "library loaded" and "index persisted" lines are what it reports.
    let mut serve = Serve::start(
        &format!("{store} ({phase})"),
        input,
        dir,
        database_url,
        "info",
    )?;
    // Logged before the listening line.
    let loaded = serve.wait_for_log("library loaded", Duration::from_secs(10))?;
    let index_reloaded = log_field(&loaded, "index_reloaded").map(|v| v == "true");
    let persist_s = if index_reloaded == Some(false) {
        let wait = PERSIST_WAIT_BASE + PERSIST_WAIT_PER_MILLION.mul_f64(vectors as f64 / 1e6);
        match serve.wait_for_log("index persisted", wait) {
            Ok(line) => log_field(&line, "seconds").and_then(|s| s.parse().ok()),
            Err(e) => {
                eprintln!("replicas: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let rss_mib = serve.status_bytes("VmRSS:").map(mib);
    let peak_rss_mib = serve.status_bytes("VmHWM:").map(mib);
    let listening_s = serve.listening_s;
    let stop_s = serve.stop()?;
    let phase = StartPhase {
        store: store.to_string(),
        phase: phase.to_string(),
        listening_s,
        library_open_s: log_field(&loaded, "seconds").and_then(|s| s.parse().ok()),
        vectors: log_field(&loaded, "vectors").and_then(|s| s.parse().ok()),
        index_reloaded,
        persist_s,
        rss_mib,
        peak_rss_mib,
        stop_s,
        dump_mib: mib(dump_bytes(dir)),
    };
    eprintln!(
        "replicas: ... listening after {:.1} s (index {})",
        phase.listening_s,
        match phase.index_reloaded {
            Some(true) => "reloaded",
            Some(false) => "rebuilt",
            None => "?",
        }
    );
    Ok(phase)
}

// ---------------------------------------------------------------- the report

fn goals(r: &ReplicasReport) -> Vec<Goal> {
    let p = &r.propagation;
    let mut goals = vec![
        Goal {
            goal: format!(
                "propagation p99, {} followers together (GetExpert every {:.0} ms)",
                p.followers.len(),
                p.poll_ms
            ),
            measured: format!(
                "{:.1} ms ({} not seen in {:.0} s)",
                p.overall.p99_ms, p.not_seen, p.give_up_s
            ),
            target: format!("<= {GOAL_PROPAGATION_P99_MS:.0} ms"),
            met: p.not_seen == 0 && p.overall.p99_ms <= GOAL_PROPAGATION_P99_MS,
        },
        Goal {
            goal: "read-your-writes misses (GetExpert with min_library_seq right after the ack)"
                .into(),
            measured: format!("{} of {}", r.consistency.misses, r.consistency.reads),
            target: "0".into(),
            met: r.consistency.misses == 0,
        },
    ];
    for k in &r.writes {
        goals.push(Goal {
            goal: format!("write latency PostgreSQL / sled: {}", k.kind),
            measured: format!("p50 {:.2}x, p99 {:.2}x", k.p50_ratio, k.p99_ratio),
            target: format!("<= {GOAL_WRITE_RATIO}x"),
            met: k.p50_ratio <= GOAL_WRITE_RATIO && k.p99_ratio <= GOAL_WRITE_RATIO,
        });
    }
    for (name, c) in [("fresh", &r.route.fresh), ("repeated", &r.route.repeated)] {
        goals.push(Goal {
            goal: format!(
                "Route latency PostgreSQL replica / sled, Q={}, {name}",
                r.route.q
            ),
            measured: format!("p50 {:.2}x, p99 {:.2}x", c.p50_ratio, c.p99_ratio),
            target: format!("<= {GOAL_ROUTE_RATIO}x"),
            met: c.p50_ratio <= GOAL_ROUTE_RATIO && c.p99_ratio <= GOAL_ROUTE_RATIO,
        });
    }
    goals
}

/// A number for a table: `n/a` for NaN or a missing value.
fn num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "n/a".into(),
    }
}

fn summary_cells(s: &Summary) -> String {
    format!(
        "{} | {} | {} | {} | {}",
        s.n,
        num(Some(s.p50_ms), 1),
        num(Some(s.p95_ms), 1),
        num(Some(s.p99_ms), 1),
        num(Some(s.max_ms), 1)
    )
}

pub fn markdown(r: &ReplicasReport) -> String {
    let p = &r.propagation;
    let rt = &r.route;
    let followers: Vec<&str> = p.followers.iter().map(|f| f.replica.as_str()).collect();
    let mut md = String::from("# Replicas sharing one library in PostgreSQL\n\n");
    md += &format!(
        "Date: {} (UTC). PostgreSQL {} at {}.{}\n\n",
        r.date,
        r.postgres_version.as_deref().unwrap_or("(version unknown)"),
        r.database,
        if r.quick {
            " **Quick smoke run (`--quick`): sizes too small to judge the goals by.**"
        } else {
            ""
        }
    );
    md += &format!(
        "`roe bench replicas`: {} replicas of `roe serve --no-inference --database-url` (A \
         writes; {} follow the change log: woken by notifications, reading it at least every \
         {} ms) on one database created for the run and dropped after it, and one `roe serve \
         --no-inference` on sled (a data dir of its own), all on 127.0.0.1, the servers' other \
         flags at their defaults (embedding cache 64 MiB, route cache 16 MiB). This machine \
         has {} hardware threads, shared by every replica, the sled server, PostgreSQL and \
         the client: on 2 cores, three replicas measure the overhead of replication \
         (following the log, the database's round trips), not scale-up. The per-replica \
         figures under Sizing are what a deployment on more cores is sized from.\n\n",
        r.replicas,
        followers.join(", "),
        r.follow_interval_ms,
        r.threads
    );

    md += "## Goals\n\n| goal | measured | target | |\n|---|---|---|---|\n";
    for g in &r.goals {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            g.goal,
            g.measured,
            g.target,
            if g.met { "met" } else { "**missed**" }
        );
    }

    md += &format!(
        "\n## Propagation\n\n{} registrations on A, one at a time (a prompt expert of {} \
         new train rows of {WRITE_TASK} each). From A's ack, every follower is asked \
         GetExpert (no min_library_seq) every {:.0} ms until it answers; the lag is the time \
         from the ack to that answer, so it includes one call's round trip and up to one \
         polling period. The next write waits for every follower.\n\n\
         | follower | writes | p50 ms | p95 ms | p99 ms | max ms | not seen in {:.0} s |\n\
         |---|---|---|---|---|---|---|\n",
        p.writes, WRITE_INSTANCES, p.poll_ms, p.give_up_s
    );
    for f in &p.followers {
        md += &format!(
            "| {} | {} | {} |\n",
            f.replica,
            summary_cells(&f.lag),
            f.not_seen
        );
    }
    md += &format!(
        "| all | {} | {} |\n\nA's RegisterExpert (embedding the new rows included): p50 {} ms, \
         p99 {} ms.\n",
        summary_cells(&p.overall),
        p.not_seen,
        num(Some(p.ack.p50_ms), 1),
        num(Some(p.ack.p99_ms), 1)
    );

    let c = &r.consistency;
    md += &format!(
        "\n## Read-your-writes\n\n{} more registrations on A; right after each ack, GetExpert \
         with the write's library_seq as min_library_seq on every follower at once: **{} \
         misses** of {} reads (a follower that has not applied the seq waits for it, at most \
         --min-seq-wait-ms, 2 s by default). Those reads took p50 {} ms, p99 {} ms, max {} \
         ms.\n",
        c.writes,
        c.misses,
        c.reads,
        num(Some(c.read.p50_ms), 1),
        num(Some(c.read.p99_ms), 1),
        num(Some(c.read.max_ms), 1)
    );
    for m in &c.first_misses {
        md += &format!("- {m}\n");
    }

    md += &format!(
        "\n## Write latency per kind\n\nOn replica A (PostgreSQL; the other replicas follow \
         meanwhile) and on the sled server, {} of each kind, each call sent to both, which \
         first alternating. The rows sent are the same every time and were embedded once in \
         an untimed warm-up round on each server, so that the figures are the write path \
         (request, store, index), not the encoder. Client-side ms.\n\n\
         | kind | PG p50 | PG p99 | sled p50 | sled p99 | p50 PG/sled | p99 PG/sled |\n\
         |---|---|---|---|---|---|---|\n",
        r.writes.first().map_or(0, |k| k.pg.n)
    );
    for k in &r.writes {
        md += &format!(
            "| {} | {} | {} | {} | {} | {}x | {}x |\n",
            k.kind,
            num(Some(k.pg.p50_ms), 1),
            num(Some(k.pg.p99_ms), 1),
            num(Some(k.sled.p50_ms), 1),
            num(Some(k.sled.p99_ms), 1),
            num(Some(k.p50_ratio), 2),
            num(Some(k.p99_ratio), 2)
        );
    }
    let (pw, sw) = (&r.pg_write_throughput, &r.sled_write_throughput);
    md += &format!(
        "\nWrites/s: {} registrations (prompt expert, {} cached rows) from {} concurrent \
         clients: **{} /s** spread over the {} replicas (one database), {} /s on the sled \
         server.\n",
        pw.requests,
        WRITE_INSTANCES,
        pw.clients,
        num(Some(pw.per_s), 1),
        pw.servers,
        num(Some(sw.per_s), 1)
    );

    md += &format!(
        "\n## Route latency (Q={})\n\nReplica A against the sled server, both holding the \
         same {} prompt experts ({} train rows each). Fresh: {} query sets of {} test rows, no \
         row in two sets, so each route embeds all its queries on either server; each set \
         sent to both, one request at a time, which first alternating. Repeated: the same \
         requests again (embedding and route caches). Client-side ms.\n\n\
         | | PG p50 | PG p99 | sled p50 | sled p99 | p50 PG/sled | p99 PG/sled | same winner |\n\
         |---|---|---|---|---|---|---|---|\n",
        rt.q, rt.experts, rt.instances_per_expert, rt.fresh.pg.n, rt.q
    );
    for (name, case) in [("fresh", &rt.fresh), ("repeated", &rt.repeated)] {
        md += &format!(
            "| {name} | {} | {} | {} | {} | {}x | {}x | {}/{} |\n",
            num(Some(case.pg.p50_ms), 1),
            num(Some(case.pg.p99_ms), 1),
            num(Some(case.sled.p50_ms), 1),
            num(Some(case.sled.p99_ms), 1),
            num(Some(case.p50_ratio), 2),
            num(Some(case.p99_ratio), 2),
            case.same_winner,
            case.pg.n
        );
    }
    md += &format!(
        "\nRoutes/s with {} concurrent clients: fresh ({} other unseen sets, once each) {} on \
         the replica, {} on sled; repeated ({} requests) {} on the replica, {} on sled.\n",
        rt.pg_fresh_throughput.clients,
        rt.pg_fresh_throughput.requests,
        num(Some(rt.pg_fresh_throughput.per_s), 1),
        num(Some(rt.sled_fresh_throughput.per_s), 1),
        rt.pg_repeated_throughput.requests,
        num(Some(rt.pg_repeated_throughput.per_s), 1),
        num(Some(rt.sled_repeated_throughput.per_s), 1)
    );

    md += &format!(
        "\n## Replica start\n\nA synthetic library (384-d vectors in experts of up to {} \
         instances, the routing-only prompt adapter) written straight into a database of its \
         own through PgStore (binary COPY of the instances) and into a sled folder through \
         SledStore. Then `roe serve --no-inference`, timed from spawn to its listening line \
         (the encoder model loads too): a replica on an empty data dir (every vector read \
         from the database, the index built), the same replica again after SIGTERM (its index \
         dump reloaded, the vectors read again), and sled started twice (the second start \
         reloads the dump the first persisted). Library open: the server's own \"library \
         loaded\" figure. Persisted: the rebuilt index dumped after the listening line. Peak \
         RSS: VmHWM before the SIGTERM.\n",
        STARTUP_PER_EXPERT
    );
    for s in &r.startup {
        md += &format!(
            "\n### {} vectors ({} experts)\n\nWritten in {} s into PostgreSQL (database {} \
             MiB), {} s into sled ({} MiB).\n\n\
             | store | start | to listening s | library open s | index | persisted s | RSS MiB | peak RSS MiB | dump MiB |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            s.vectors,
            s.experts,
            num(Some(s.pg_write_s), 1),
            num(s.pg_database_mib, 0),
            num(Some(s.sled_write_s), 1),
            num(Some(s.sled_mib), 0)
        );
        for ph in &s.phases {
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                ph.store,
                ph.phase,
                num(Some(ph.listening_s), 2),
                num(ph.library_open_s, 2),
                match ph.index_reloaded {
                    Some(true) => "reloaded",
                    Some(false) => "rebuilt",
                    None => "?",
                },
                num(ph.persist_s, 2),
                num(ph.rss_mib, 0),
                num(ph.peak_rss_mib, 0),
                num(Some(ph.dump_mib), 0)
            );
        }
    }

    md += &format!(
        "\n## Sizing\n\n\
         - Reads: one replica sustained **{} fresh routes/s** (Q={}, every query embedded: \
         the encoder is the work) and **{} repeated routes/s** (caches) with {} concurrent \
         clients on {} threads. Routes are answered from each replica's memory, without the \
         database, so N replicas on machines like this one answer about N times as many.\n\
         - Writes: the database took **{} registrations/s** from {} clients over {} replicas \
         (sled alone: {} /s). Every write takes the change log's head row for its \
         transaction, so writes queue on the database whatever the number of replicas: this \
         is the library's write budget on this machine, not a per-replica one. Every replica \
         also applies every write (a read of the log and of the write's instances).\n\
         - Freshness: followers showed a write {} ms (p50) and {} ms (p99) after its ack; \
         a client that needs its own write on another replica passes min_library_seq.\n",
        num(Some(rt.pg_fresh_throughput.per_s), 1),
        rt.q,
        num(Some(rt.pg_repeated_throughput.per_s), 1),
        rt.pg_fresh_throughput.clients,
        r.threads,
        num(Some(pw.per_s), 1),
        pw.clients,
        pw.servers,
        num(Some(sw.per_s), 1),
        num(Some(p.overall.p50_ms), 1),
        num(Some(p.overall.p99_ms), 1)
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
    }

    #[test]
    fn summaries_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!(s.n, 100);
        assert_eq!(s.p50_ms, 51.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.mean_ms, 50.5);
        let empty = summarize(&[]);
        assert_eq!(empty.n, 0);
        assert!(empty.p99_ms.is_nan() && empty.max_ms.is_nan());
        assert!(ratio(1.0, 0.0).is_nan());
    }

    #[test]
    fn fresh_sets_never_repeat_a_row() {
        let rows = |task: &str, n: usize| -> Vec<Instance> {
            (0..n)
                .map(|i| Instance {
                    input: format!("{task} row {i}"),
                    target: None,
                    choices: vec![],
                })
                .collect()
        };
        let (a, b) = (rows("a", 70), rows("b", 40));
        let named: [(&str, &[Instance]); 2] = [("a", a.as_slice()), ("b", b.as_slice())];
        let sets = fresh_route_sets(&named, 16, usize::MAX);
        // 70 rows give 4 sets of 16, 40 give 2; the tasks alternate while both have some.
        let tasks: Vec<&str> = sets.iter().map(|s| s.task.as_str()).collect();
        assert_eq!(tasks, ["a", "b", "a", "b", "a", "a"]);
        let mut texts: Vec<&str> = sets
            .iter()
            .flat_map(|s| s.queries.iter().map(|q| q.input.as_str()))
            .collect();
        assert!(sets.iter().all(|s| s.queries.len() == 16));
        let n = texts.len();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), n);
        assert_eq!(fresh_route_sets(&named, 16, 3).len(), 3);
    }

    #[test]
    fn log_fields_are_read() {
        let line = "2025-01-01T00:00:00Z  INFO roe: library loaded experts=100 \
                    vectors=1000000 seconds=12.5 index_reloaded=true";
        assert_eq!(log_field(line, "vectors"), Some("1000000"));
        assert_eq!(log_field(line, "seconds"), Some("12.5"));
        assert_eq!(log_field(line, "index_reloaded"), Some("true"));
        assert_eq!(log_field(line, "missing"), None);
    }
}
