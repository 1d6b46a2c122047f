//! Resource attacks, deadlines, auth overhead and a crash loop against real `roe serve`
//! processes (the `roe` binary built beside `roe-bench`), measured from outside as a client
//! and from /proc as the operator sees the server: bench/results/reliability.{md,json}.
//!
//! - Upload memory: peak RSS (VmHWM, reset through /proc/PID/clear_refs) while the largest
//!   allowed adapter is streamed in, against its size and the idle RSS.
//! - Disk: the library's files after registering large adapters and deleting them all, and
//!   after a restart (when the store compacts), against an empty library's.
//! - Deadlines: the server's CPU seconds (utime + stime) spent after a client's deadline
//!   passed, for in-limit Route, Score and Answer calls chosen to be expensive; and what the
//!   same calls cost when allowed to finish (the most one in-limit call costs).
//! - Auth: Route latency through a server checking keys against one that does not, calls
//!   alternated so that both see the same machine.
//! - Crash loop: `kill -9` at random moments during concurrent registrations, deletes and
//!   streamed uploads; after each restart every acknowledged write is there, every
//!   acknowledged delete gone, and the rebuilt index is dumped without a clean shutdown.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::startup::dir_size;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use roe_peft::{LoraAdapter, LoraBlock, LoraConfig, LoraTarget, ModelShape};
use roe_services::auth::ClientKey;
use roe_services::proto::{
    self, answerer_client::AnswererClient, expert_library_client::ExpertLibraryClient,
    inference_client::InferenceClient, router_client::RouterClient,
};
use roe_task_suite::{sample, Task};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "reliability-bench-admin-key-0001";

/// A `roe serve` child process; killed when dropped.
struct Serve {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(exe: &Path, data: &Path, models: &Path, flags: &[&str]) -> Result<Self> {
        let mut child = Command::new(exe)
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .arg("--models-dir")
            .arg(models)
            .args(flags)
            .env("RUST_LOG", "info")
            .env("ROE_LOG_FORMAT", "text")
            .env("ROE_HTTP_ADDR", "")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let mut s = sink.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("roe listening on ") else {
            let _ = child.kill();
            bail!(
                "roe serve did not start: {line:?}\n{}",
                tail(&log.lock(), 20)
            );
        };
        Ok(Self {
            addr: format!("http://{addr}"),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged on opening its library: (vectors, whether the index was
    /// reloaded from its dump); waits up to 10 s for the line.
    async fn opened(&self) -> Option<(u64, bool)> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .log
                .lock()
                .lines()
                .find(|l| l.contains("library loaded"))
                .map(|l| {
                    let field = |name: &str| {
                        l.split_whitespace()
                            .find_map(|w| w.strip_prefix(name))
                            .map(str::to_owned)
                    };
                    (
                        field("vectors=").and_then(|v| v.parse().ok()).unwrap_or(0),
                        field("index_reloaded=").as_deref() == Some("true"),
                    )
                });
            if found.is_some() || Instant::now() > until {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines the server logged.
    fn log_tail(&self, n: usize) -> String {
        tail(&self.log.lock(), n)
    }

    /// SIGKILL, as a crash.
    fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a clean shutdown.
    fn stop(mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        self.child.wait()?;
        Ok(())
    }

    async fn channel(&self) -> Result<InterceptedService<Channel, ClientKey>> {
        let channel = Channel::from_shared(self.addr.clone())?.connect().await?;
        Ok(InterceptedService::new(
            channel,
            ClientKey::new(Some(ADMIN_KEY))?,
        ))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn proc_status_bytes(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("status line")?
        .parse()?;
    Ok(kb * 1024)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of {pid}"))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32, ticks: f64) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    Ok((utime + stime) / ticks)
}

fn mb(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn peft(experts: &Path, kind: &str, task: &str) -> Result<proto::PeftAdapter> {
    let dir = experts.join(kind).join(task);
    Ok(proto::PeftAdapter {
        adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json"))
            .with_context(|| format!("reading {}", dir.display()))?,
        adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))?,
    })
}

fn register(
    id: &str,
    adapter: proto::PeftAdapter,
    task: &Task,
    s: usize,
) -> proto::RegisterExpertRequest {
    proto::RegisterExpertRequest {
        id: id.into(),
        name: id.into(),
        description: task.info.description.clone(),
        adapter: Some(adapter),
        instances: sample(&task.train, s, 0)
            .into_iter()
            .map(|i| proto::Instance {
                input: i.input,
                target: i.target,
                choices: i.choices,
            })
            .collect(),
        ..Default::default()
    }
}

/// A LoRA on every projection of every layer whose weights file is just under `max_bytes`.
fn large_lora(max_bytes: usize, seed: u64) -> Result<proto::PeftAdapter> {
    let shape = ModelShape::smollm2_135m();
    let per_rank: usize = LoraTarget::ALL
        .iter()
        .map(|t| {
            let (i, o) = t.dims(&shape);
            4 * (i + o) * shape.num_layers
        })
        .sum();
    // Room for the safetensors header.
    let rank = (max_bytes - (1 << 20)) / per_rank;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut blocks = Vec::new();
    for layer in 0..shape.num_layers {
        for target in LoraTarget::ALL {
            let (i, o) = target.dims(&shape);
            blocks.push(LoraBlock {
                layer,
                target,
                a: (0..rank * i)
                    .map(|_| rng.random_range(-0.01..0.01))
                    .collect(),
                b: (0..o * rank)
                    .map(|_| rng.random_range(-0.01..0.01))
                    .collect(),
            });
        }
    }
    let config = LoraConfig::new(rank, 2.0 * rank as f64, LoraTarget::ALL.to_vec());
    let files = LoraAdapter::new(config, blocks, &shape)?.to_peft()?;
    Ok(proto::PeftAdapter {
        adapter_config_json: files.config_json,
        adapter_model_safetensors: files.safetensors,
    })
}

/// A streamed registration: the header (length and checksum announced), 1 MiB chunks.
fn chunks(mut req: proto::RegisterExpertRequest) -> Vec<proto::RegisterExpertChunk> {
    use proto::register_expert_chunk::Part;
    use sha2::Digest;
    let weights = req
        .adapter
        .as_mut()
        .map(|a| std::mem::take(&mut a.adapter_model_safetensors))
        .unwrap_or_default();
    req.safetensors_bytes = Some(weights.len() as u64);
    req.safetensors_sha256 = format!("{:x}", sha2::Sha256::digest(&weights));
    let mut out = vec![proto::RegisterExpertChunk {
        part: Some(Part::Header(req)),
    }];
    out.extend(weights.chunks(1 << 20).map(|c| proto::RegisterExpertChunk {
        part: Some(Part::SafetensorsChunk(c.to_vec())),
    }));
    out
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DeadlineRow {
    call: String,
    what: String,
    full_cpu_s: f64,
    full_wall_s: f64,
    deadline_ms: u64,
    status: String,
    cpu_after_deadline_s: f64,
}

/// CPU the server spends after the client's deadline, and what the call costs in full.
async fn deadline_row<F, Fut>(
    pid: u32,
    ticks: f64,
    call: &str,
    what: &str,
    deadline: Duration,
    mut run: F,
) -> Result<DeadlineRow>
where
    F: FnMut(Option<Duration>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let idle_rate = {
        let c0 = cpu_seconds(pid, ticks)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        (cpu_seconds(pid, ticks)? - c0) / 2.0
    };
    eprintln!("{call}: in full ...");
    let c0 = cpu_seconds(pid, ticks)?;
    let t0 = Instant::now();
    run(None)
        .await
        .map_err(|e| anyhow::anyhow!("{call} in full failed: {e}"))?;
    let full_wall_s = t0.elapsed().as_secs_f64();
    let full_cpu_s = cpu_seconds(pid, ticks)? - c0;
    // Let anything left from it settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("{call}: {full_cpu_s:.1} CPU s in full; with a {deadline:?} deadline ...");
    let status = match run(Some(deadline)).await {
        Ok(()) => "finished within the deadline".to_string(),
        Err(e) => format!("{:?}", e.code()),
    };
    let at = cpu_seconds(pid, ticks)?;
    let seen = Instant::now();
    // Until the server's CPU stops growing beyond its idle rate for a second (at most 60 s).
    let mut last = at;
    let mut quiet_since = Instant::now();
    while seen.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = cpu_seconds(pid, ticks)?;
        if now - last > idle_rate * 0.2 + 0.02 {
            quiet_since = Instant::now();
        }
        last = now;
        if quiet_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let after = (last - at - idle_rate * seen.elapsed().as_secs_f64()).max(0.0);
    eprintln!("{call}: {status}; {after:.2} CPU s after the deadline");
    Ok(DeadlineRow {
        call: call.into(),
        what: what.into(),
        full_cpu_s,
        full_wall_s,
        deadline_ms: deadline.as_millis() as u64,
        status,
        cpu_after_deadline_s: after,
    })
}

fn with_deadline<T>(message: T, deadline: Option<Duration>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(d) = deadline {
        r.set_timeout(d);
    }
    r
}

pub struct ReliabilityInput<'a> {
    pub exe: PathBuf,
    pub models_dir: &'a Path,
    pub tasks_dir: &'a Path,
    pub experts_dir: &'a Path,
    pub kills: usize,
    pub seed: u64,
    /// The parts to measure (`upload`, `deadlines`, `disk`, `auth`, `crash`); `None`: all.
    /// The others keep their figures from `earlier`.
    pub only: Option<Vec<String>>,
    /// The deadline calls to measure (`Route`, `Score`, `Answer`); `None`: all. The others
    /// keep their rows from `earlier`.
    pub deadline_calls: Option<Vec<String>>,
    /// An earlier run's results (`Null` when none).
    pub earlier: serde_json::Value,
}

/// The parts of a run, in the order they run.
pub const PARTS: [&str; 5] = ["upload", "deadlines", "disk", "auth", "crash"];
/// The calls the deadline part measures.
pub const DEADLINE_CALLS: [&str; 3] = ["Route", "Score", "Answer"];

impl ReliabilityInput<'_> {
    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }

    fn wants_call(&self, call: &str) -> bool {
        self.wants("deadlines")
            && self
                .deadline_calls
                .as_ref()
                .is_none_or(|c| c.iter().any(|x| x.eq_ignore_ascii_case(call)))
    }

    /// The earlier figures of a part left out of this run.
    fn earlier(&self, key: &str) -> Result<serde_json::Value> {
        match &self.earlier[key] {
            serde_json::Value::Null => {
                bail!("{key} is not measured in this run and no earlier results hold it")
            }
            v => Ok(v.clone()),
        }
    }
}

pub async fn run(input: ReliabilityInput<'_>) -> Result<(serde_json::Value, String)> {
    let work = tempfile::tempdir()?;
    let keys = format!("bench:{ADMIN_KEY}");
    let task_names = [
        "sms_spam",
        "question_type",
        "tweet_sentiment",
        "snips_intent",
    ];
    let tasks: Vec<Task> = task_names
        .iter()
        .map(|t| Task::load(input.tasks_dir.join(t)).with_context(|| format!("task {t}")))
        .collect::<Result<_>>()?;
    let limits = roe_expert_library::library::Limits::default();
    let mut upload = serde_json::Value::Null;
    let mut deadlines: Vec<serde_json::Value> = Vec::new();
    if input.wants("upload") || input.wants("deadlines") {
        (upload, deadlines) =
            upload_and_deadlines(&input, &tasks, &limits, &keys, work.path()).await?;
    }
    if !input.wants("upload") {
        upload = input.earlier("upload")?;
    }
    // The rows of calls not measured now, from the earlier run, in the usual order.
    let earlier_rows: Vec<serde_json::Value> = input.earlier["deadlines"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut rows = Vec::new();
    for call in DEADLINE_CALLS {
        let from = if input.wants_call(call) {
            &deadlines
        } else {
            &earlier_rows
        };
        rows.extend(from.iter().filter(|r| r["call"] == call).cloned());
    }
    let deadlines = rows;
    let disk = if input.wants("disk") {
        disk_after_deletes(&input, &tasks, work.path()).await?
    } else {
        input.earlier("disk")?
    };
    let auth = if input.wants("auth") {
        auth_overhead(&input, &tasks, &keys, work.path()).await?
    } else {
        input.earlier("auth")?
    };
    let crash = if input.wants("crash") {
        crash_loop(&input, &tasks[0], work.path()).await?
    } else {
        input.earlier("crash_loop")?
    };
    let measured: Vec<String> = PARTS
        .iter()
        .filter(|p| input.wants(p))
        .map(|p| match (*p, &input.deadline_calls) {
            ("deadlines", Some(calls)) => format!("deadlines ({})", calls.join(", ")),
            _ => p.to_string(),
        })
        .collect();
    let json = serde_json::json!({
        "machine": crate::machine(),
        "measured_in_this_run": measured,
        "upload": upload,
        "disk": disk,
        "deadlines": deadlines,
        "auth": auth,
        "crash_loop": crash,
    });
    let md = markdown(&json);
    Ok((json, md))
}

/// One server with the backbone, keys on: the largest upload's memory, then the expensive
/// in-limit calls in full and with a deadline (those `input` asks for).
async fn upload_and_deadlines(
    input: &ReliabilityInput<'_>,
    tasks: &[Task],
    limits: &roe_expert_library::library::Limits,
    keys: &str,
    work: &Path,
) -> Result<(serde_json::Value, Vec<serde_json::Value>)> {
    let ticks = clock_ticks();
    let data = work.join("main");
    let server = Serve::start(&input.exe, &data, input.models_dir, &["--admin-keys", keys])?;
    let pid = server.pid();
    let channel = server.channel().await?;
    let mut lib = ExpertLibraryClient::new(channel.clone())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    for t in tasks {
        lib.register_expert(register(
            t.name(),
            peft(input.experts_dir, "prompt", t.name())?,
            t,
            50,
        ))
        .await?;
    }
    // Warm the backbone and the encoder so that first-use costs are not counted below.
    let mut inference = InferenceClient::new(channel.clone());
    inference
        .score(proto::ScoreRequest {
            min_library_seq: Default::default(),
            expert_id: "sms_spam".into(),
            input: "warm up".into(),
            choices: vec!["ham".into(), "spam".into()],
            truncate: false,
        })
        .await?;

    eprintln!(
        "upload: building an adapter of at most {} bytes ...",
        limits.max_adapter_bytes
    );
    let big = large_lora(limits.max_adapter_bytes, input.seed)?;
    let upload_bytes = big.adapter_model_safetensors.len() as u64;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = proc_status_bytes(pid, "VmRSS:")?;
    reset_peak(pid)?;
    let t0 = Instant::now();
    lib.register_expert_stream(tokio_stream::iter(chunks(register(
        "big",
        big.clone(),
        &tasks[0],
        8,
    ))))
    .await?;
    let upload_s = t0.elapsed().as_secs_f64();
    let upload_peak = proc_status_bytes(pid, "VmHWM:")?;
    let upload_ratio = upload_peak.saturating_sub(idle_rss) as f64 / upload_bytes as f64;
    eprintln!(
        "upload: {:.1} MiB in {upload_s:.1} s, idle RSS {:.0} MiB, peak {:.0} MiB ({upload_ratio:.2}x the upload above idle)",
        mb(upload_bytes),
        mb(idle_rss),
        mb(upload_peak)
    );
    lib.delete_expert(proto::DeleteExpertRequest {
        expected_version: Default::default(),
        id: "big".into(),
    })
    .await?;

    // Expensive in-limit calls.
    let router = RouterClient::new(channel.clone());
    let answerer = AnswererClient::new(channel.clone());
    let route_queries: Vec<proto::Query> = {
        let per = limits.max_route_text_bytes / limits.max_queries;
        let rows = sample(&tasks[1].test, 64, 1);
        (0..limits.max_queries)
            .map(|i| {
                let base = &rows[i % rows.len()].input;
                let mut text = String::new();
                while text.len() + base.len() + 1 < per {
                    text.push_str(base);
                    text.push(' ');
                }
                proto::Query {
                    input: text,
                    choices: vec![],
                    target: None,
                }
            })
            .collect()
    };
    let score_input = "Tell me whether this message is spam. ".repeat(200); // ~7.6 KB
    let score_choices: Vec<String> = (0..64)
        .map(|i| format!("choice {i}: {}", "a plausible long answer ".repeat(33)))
        .collect();
    let answer_inputs: Vec<proto::AnswerInput> = sample(&tasks[0].test, 64, 2)
        .into_iter()
        .map(|r| proto::AnswerInput {
            input: format!("{} {}", r.input, "please read carefully ".repeat(150)),
            choices: r.choices,
        })
        .collect();
    let deadline = Duration::from_secs(1);
    let mut deadlines = Vec::new();
    if input.wants_call("Route") {
        deadlines.push(
            deadline_row(
                pid,
                ticks,
                "Route",
                &format!(
                    "{} queries, {} KiB of text",
                    route_queries.len(),
                    route_queries.iter().map(|q| q.input.len()).sum::<usize>() >> 10
                ),
                deadline,
                |d| {
                    let mut router = router.clone();
                    let queries = route_queries.clone();
                    async move {
                        router
                            .route(with_deadline(
                                proto::RouteRequest {
                                    min_library_seq: Default::default(),
                                    queries,
                                    options: None,
                                },
                                d,
                            ))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await?,
        );
    }
    if input.wants_call("Score") {
        deadlines.push(
            deadline_row(
                pid,
                ticks,
                "Score",
                &format!(
                    "{} KiB input, {} choices of {} bytes",
                    score_input.len() >> 10,
                    score_choices.len(),
                    score_choices[0].len()
                ),
                deadline,
                |d| {
                    let mut inference = inference.clone();
                    let (input, choices) = (score_input.clone(), score_choices.clone());
                    async move {
                        inference
                            .score(with_deadline(
                                proto::ScoreRequest {
                                    min_library_seq: Default::default(),
                                    expert_id: "sms_spam".into(),
                                    input,
                                    choices,
                                    truncate: false,
                                },
                                d,
                            ))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await?,
        );
    }
    if input.wants_call("Answer") {
        deadlines.push(
            deadline_row(
                pid,
                ticks,
                "Answer",
                &format!(
                    "{} inputs, {} KiB to read",
                    answer_inputs.len(),
                    answer_inputs
                        .iter()
                        .map(|i| i.input.len() + i.choices.iter().map(String::len).sum::<usize>())
                        .sum::<usize>()
                        >> 10
                ),
                deadline,
                |d| {
                    let mut answerer = answerer.clone();
                    let inputs = answer_inputs.clone();
                    async move {
                        answerer
                            .answer(with_deadline(
                                proto::AnswerRequest {
                                    inputs,
                                    ..Default::default()
                                },
                                d,
                            ))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await?,
        );
    }
    server.stop()?;
    let upload = serde_json::json!({
        "bytes": upload_bytes,
        "seconds": upload_s,
        "idle_rss_bytes": idle_rss,
        "peak_rss_bytes": upload_peak,
        "peak_above_idle_over_size": upload_ratio,
        "goal": "<= 1.5",
    });
    let rows = deadlines
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    Ok((upload, rows))
}

/// Large adapters registered, all deleted, a restart: the library's bytes on disk at each
/// step.
async fn disk_after_deletes(
    input: &ReliabilityInput<'_>,
    tasks: &[Task],
    work: &Path,
) -> Result<serde_json::Value> {
    let limits = roe_expert_library::library::Limits::default();
    let big = large_lora(limits.max_adapter_bytes, input.seed)?;
    eprintln!("disk: an empty library, then 3 large adapters registered and deleted ...");
    let empty_dir = work.join("empty");
    Serve::start(
        &input.exe,
        &empty_dir,
        input.models_dir,
        &["--no-inference"],
    )?
    .stop()?;
    let empty_bytes = dir_size(&empty_dir);
    let disk_dir = work.join("disk");
    let server = Serve::start(&input.exe, &disk_dir, input.models_dir, &["--no-inference"])?;
    let mut lib = ExpertLibraryClient::new(server.channel().await?)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    for i in 0..3 {
        lib.register_expert_stream(tokio_stream::iter(chunks(register(
            &format!("big{i}"),
            big.clone(),
            &tasks[0],
            8,
        ))))
        .await?;
    }
    let full_bytes = dir_size(&disk_dir);
    for i in 0..3 {
        lib.delete_expert(proto::DeleteExpertRequest {
            expected_version: Default::default(),
            id: format!("big{i}"),
        })
        .await?;
    }
    let deleted_bytes = dir_size(&disk_dir);
    server.stop()?;
    let server = Serve::start(&input.exe, &disk_dir, input.models_dir, &["--no-inference"])?;
    let compaction_log: Vec<String> = server
        .log
        .lock()
        .lines()
        .filter(|l| l.contains("compact"))
        .map(str::to_owned)
        .collect();
    server.stop()?;
    let restarted_bytes = dir_size(&disk_dir);
    eprintln!(
        "disk: empty {:.1} MiB, 3 adapters {:.1} MiB, deleted {:.1} MiB, restarted {:.1} MiB",
        mb(empty_bytes),
        mb(full_bytes),
        mb(deleted_bytes),
        mb(restarted_bytes)
    );

    Ok(serde_json::json!({
        "empty_library_bytes": empty_bytes,
        "three_adapters_bytes": full_bytes,
        "after_deleting_all_bytes": deleted_bytes,
        "after_restart_bytes": restarted_bytes,
        "above_empty_after_restart_bytes": restarted_bytes.saturating_sub(empty_bytes),
        "goal": "<= 10 MB above an empty library",
        "compaction_log": compaction_log,
    }))
}

/// One server with keys, one without, small Route calls alternated between them.
async fn auth_overhead(
    input: &ReliabilityInput<'_>,
    tasks: &[Task],
    keys: &str,
    work: &Path,
) -> Result<serde_json::Value> {
    eprintln!("auth: Route latency with and without keys ...");
    let keyed = Serve::start(
        &input.exe,
        &work.join("keyed"),
        input.models_dir,
        &["--no-inference", "--admin-keys", keys],
    )?;
    let open = Serve::start(
        &input.exe,
        &work.join("open"),
        input.models_dir,
        &["--no-inference"],
    )?;
    let mut keyed_lib = ExpertLibraryClient::new(keyed.channel().await?);
    let mut open_lib = ExpertLibraryClient::new(open.channel().await?);
    for t in tasks {
        let r = register(
            t.name(),
            peft(input.experts_dir, "prompt", t.name())?,
            t,
            50,
        );
        keyed_lib.register_expert(r.clone()).await?;
        open_lib.register_expert(r).await?;
    }
    let mut keyed_router = RouterClient::new(keyed.channel().await?);
    let mut open_router = RouterClient::new(open.channel().await?);
    let small: Vec<proto::Query> = sample(&tasks[2].test, 4, 3)
        .into_iter()
        .map(|r| proto::Query {
            input: r.input,
            choices: r.choices,
            target: None,
        })
        .collect();
    let (mut with_keys, mut without) = (Vec::new(), Vec::new());
    let calls = 300;
    for i in 0..calls + 20 {
        let req = || proto::RouteRequest {
            min_library_seq: Default::default(),
            queries: small.clone(),
            options: None,
        };
        let t = Instant::now();
        keyed_router.route(req()).await?;
        let k = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        open_router.route(req()).await?;
        let o = t.elapsed().as_secs_f64() * 1e3;
        // The first calls warm both.
        if i >= 20 {
            with_keys.push(k);
            without.push(o);
        }
    }
    // A call without the key is refused by the keyed server (the check is on).
    let unkeyed = RouterClient::new(Channel::from_shared(keyed.addr.clone())?.connect().await?)
        .route(proto::RouteRequest {
            min_library_seq: Default::default(),
            queries: small.clone(),
            options: None,
        })
        .await
        .err()
        .map(|e| format!("{:?}", e.code()))
        .unwrap_or_else(|| "served".into());
    drop((keyed, open));
    with_keys.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    let p = |v: &[f64], q| crate::percentile(v, q);
    let auth = serde_json::json!({
        "calls": calls,
        "p50_ms_with_keys": p(&with_keys, 0.5),
        "p50_ms_without": p(&without, 0.5),
        "p90_ms_with_keys": p(&with_keys, 0.9),
        "p90_ms_without": p(&without, 0.9),
        "mean_ms_with_keys": with_keys.iter().sum::<f64>() / with_keys.len() as f64,
        "mean_ms_without": without.iter().sum::<f64>() / without.len() as f64,
        "without_a_key": unkeyed,
    });
    eprintln!("auth: {auth}");
    Ok(auth)
}

/// `kills` rounds of: start, check, concurrent writes for a random while, `kill -9`.
async fn crash_loop(
    input: &ReliabilityInput<'_>,
    task: &Task,
    work: &Path,
) -> Result<serde_json::Value> {
    let data = work.join("crash");
    let manifest = data.join("roe-index/manifest.json");
    let flags = ["--no-inference", "--hnsw-threshold", "1"];
    let small = peft(input.experts_dir, "prompt", task.name())?;
    let lora = peft(input.experts_dir, "lora", task.name())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(input.seed);
    // What the server acknowledged: present (registered and not deleted) and deleted.
    let present: Arc<Mutex<std::collections::BTreeSet<String>>> = Default::default();
    let deleted: Arc<Mutex<std::collections::BTreeSet<String>>> = Default::default();
    // Deletes sent but not acknowledged (the crash came first): each may or may not have
    // landed, so its expert missing after the restart is no lost write.
    let unsure: Arc<Mutex<std::collections::BTreeSet<String>>> = Default::default();
    let (mut lost, mut resurrected, mut failed_restarts) = (0usize, 0usize, 0usize);
    let (mut persisted, mut rebuilds) = (0usize, 0usize);
    let mut acked_writes = 0usize;
    let started = Instant::now();
    for round in 0..input.kills {
        let stale = std::fs::read_to_string(&manifest).unwrap_or_default();
        let server = match Serve::start(&input.exe, &data, input.models_dir, &flags) {
            Ok(s) => s,
            Err(e) => {
                failed_restarts += 1;
                eprintln!("crash loop: restart {round} failed: {e:#}");
                continue;
            }
        };
        let channel = server.channel().await?;
        let mut lib = ExpertLibraryClient::new(channel.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        let listed: std::collections::BTreeSet<String> = {
            let mut all = std::collections::BTreeSet::new();
            let mut token = String::new();
            loop {
                let page = lib
                    .list_experts(proto::ListExpertsRequest {
                        min_library_seq: Default::default(),
                        page_size: 1000,
                        page_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                all.extend(page.experts.into_iter().map(|e| e.id));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            all
        };
        {
            let mut p = present.lock();
            for id in std::mem::take(&mut *unsure.lock()) {
                if !listed.contains(&id) {
                    p.remove(&id);
                }
            }
        }
        let missing: Vec<String> = present.lock().difference(&listed).cloned().collect();
        if !missing.is_empty() {
            eprintln!("crash loop: restart {round}: acknowledged but missing: {missing:?}");
        }
        lost += missing.len();
        resurrected += deleted.lock().intersection(&listed).count();
        // An unacknowledged write may have landed: it is now as good as acknowledged.
        {
            let mut p = present.lock();
            let d = deleted.lock();
            for id in &listed {
                if !d.contains(id) {
                    p.insert(id.clone());
                }
            }
        }
        // A restart that rebuilt a graph (vectors in the library, no dump matching them:
        // writes since the last dump) dumps it without a clean shutdown.
        let opened = server.opened().await;
        if round > 0 && opened.is_some_and(|(vectors, reloaded)| vectors > 0 && !reloaded) {
            rebuilds += 1;
            let until = Instant::now() + Duration::from_secs(30);
            let mut dumped = false;
            while Instant::now() < until {
                let now = std::fs::read_to_string(&manifest).unwrap_or_default();
                if !now.is_empty() && now != stale {
                    dumped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if dumped {
                persisted += 1;
            } else {
                eprintln!(
                    "crash loop: restart {round}: no new index dump within 30 s; the server said:\n{}",
                    server.log_tail(30)
                );
            }
        }
        // Writers: unary registrations, streamed LoRA uploads, deletes.
        let run_for = Duration::from_millis(rng.random_range(300..1500));
        let stop_at = Instant::now() + run_for;
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..3 {
            let mut lib = lib.clone();
            let (present, deleted, acked) = (present.clone(), deleted.clone(), acked.clone());
            let unsure = unsure.clone();
            let (small, lora, task) = (small.clone(), lora.clone(), task.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(input.seed ^ (round * 3 + w) as u64);
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < stop_at {
                    n += 1;
                    let id = format!("r{round}-w{w}-{n}");
                    let ok = match w {
                        0 => lib
                            .register_expert(register(&id, small.clone(), &task, 4))
                            .await
                            .is_ok(),
                        1 => lib
                            .register_expert_stream(tokio_stream::iter(chunks(register(
                                &id,
                                lora.clone(),
                                &task,
                                4,
                            ))))
                            .await
                            .is_ok(),
                        _ => {
                            let victim = {
                                let p = present.lock();
                                let v: Vec<&String> = p.iter().collect();
                                // A few experts always stay: a restart has a graph to rebuild.
                                (v.len() > 3).then(|| v[rng.random_range(0..v.len())].clone())
                            };
                            let Some(victim) = victim else {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            unsure.lock().insert(victim.clone());
                            if lib
                                .delete_expert(proto::DeleteExpertRequest {
                                    expected_version: Default::default(),
                                    id: victim.clone(),
                                })
                                .await
                                .is_ok()
                            {
                                unsure.lock().remove(&victim);
                                present.lock().remove(&victim);
                                deleted.lock().insert(victim);
                                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            continue;
                        }
                    };
                    if ok {
                        present.lock().insert(id);
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(run_for).await;
        // Mid-write, as the writers go on.
        server.crash();
        for w in writers {
            let _ = w.await;
        }
        acked_writes += acked.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "crash loop: round {}/{}: {} acknowledged writes so far, lost {lost}, back from the dead {resurrected}",
            round + 1,
            input.kills,
            acked_writes
        );
    }
    // The final check after the last crash.
    let server = Serve::start(&input.exe, &data, input.models_dir, &flags)?;
    let mut lib = ExpertLibraryClient::new(server.channel().await?);
    let listed: std::collections::BTreeSet<String> = lib
        .list_experts(proto::ListExpertsRequest {
            min_library_seq: Default::default(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .experts
        .into_iter()
        .map(|e| e.id)
        .collect();
    {
        let mut p = present.lock();
        for id in std::mem::take(&mut *unsure.lock()) {
            if !listed.contains(&id) {
                p.remove(&id);
            }
        }
    }
    lost += present.lock().difference(&listed).count();
    resurrected += deleted.lock().intersection(&listed).count();
    server.stop()?;
    Ok(serde_json::json!({
        "kills": input.kills,
        "seconds": started.elapsed().as_secs_f64(),
        "acknowledged_writes": acked_writes,
        "acknowledged_writes_lost": lost,
        "acknowledged_deletes_undone": resurrected,
        "restarts_failed": failed_restarts,
        "rebuilds_after_a_crash": rebuilds,
        "rebuilds_persisted": persisted,
        "experts_at_the_end": listed.len(),
    }))
}

fn markdown(j: &serde_json::Value) -> String {
    let deadlines: Vec<DeadlineRow> =
        serde_json::from_value(j["deadlines"].clone()).unwrap_or_default();
    let u = &j["upload"];
    let d = &j["disk"];
    let a = &j["auth"];
    let c = &j["crash_loop"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mib = |v: &serde_json::Value| f(v) / (1u64 << 20) as f64;
    let measured: Vec<&str> = j["measured_in_this_run"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let runs = if measured.is_empty() || measured.len() == PARTS.len() {
        "One run".to_string()
    } else {
        format!(
            "Measured in the last run: {}; the rest is from the run before (`--only`)",
            measured.join(", ")
        )
    };
    let mut md = format!(
        "# Reliability: resource attacks, deadlines, auth overhead, crash loop\n\n\
         `roe bench reliability` against real `roe serve` processes (the release binary), \
         measured as a client and from /proc. {runs}; 2 cores.\n\n",
    );
    md.push_str(&format!(
        "## Upload memory\n\nThe largest adapter allowed (--max-adapter-bytes) streamed in \
         1 MiB chunks: {:.1} MiB in {:.1} s. Idle RSS {:.0} MiB, peak {:.0} MiB: the peak is \
         **{:.2}x the upload** above idle (goal ≤ 1.5x).\n\n",
        mib(&u["bytes"]),
        f(&u["seconds"]),
        mib(&u["idle_rss_bytes"]),
        mib(&u["peak_rss_bytes"]),
        f(&u["peak_above_idle_over_size"])
    ));
    md.push_str(&format!(
        "## Disk after deleting everything\n\n| state | MiB |\n|---|---|\n| empty library | {:.1} |\n\
         | three {:.0} MiB adapters | {:.1} |\n| all deleted | {:.1} |\n| after a restart | {:.1} |\n\n\
         After the restart the library holds **{:.1} MiB above an empty one** (goal ≤ 10 MB).\n\n",
        mib(&d["empty_library_bytes"]),
        mib(&u["bytes"]),
        mib(&d["three_adapters_bytes"]),
        mib(&d["after_deleting_all_bytes"]),
        mib(&d["after_restart_bytes"]),
        mib(&d["above_empty_after_restart_bytes"]),
    ));
    md.push_str(
        "## Deadlines\n\nIn-limit calls chosen to be expensive, first allowed to finish (the \
         most one such call costs), then sent with a 1 s deadline: the server's CPU seconds \
         after the client saw the deadline pass (goal ≤ 0.5 s).\n\n\
         | call | request | CPU s in full | wall s in full | with deadline | CPU s after the deadline |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in &deadlines {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | **{:.2}** |\n",
            r.call, r.what, r.full_cpu_s, r.full_wall_s, r.status, r.cpu_after_deadline_s
        ));
    }
    md.push_str(&format!(
        "\n## Auth overhead\n\n{} small Route calls (4 queries) to a server checking keys and \
         to one without, alternated: p50 {:.2} ms with keys, {:.2} ms without (ratio {:.3}); \
         p90 {:.2} / {:.2} ms. A call without a key to the keyed server: {}.\n\n",
        a["calls"],
        f(&a["p50_ms_with_keys"]),
        f(&a["p50_ms_without"]),
        f(&a["p50_ms_with_keys"]) / f(&a["p50_ms_without"]),
        f(&a["p90_ms_with_keys"]),
        f(&a["p90_ms_without"]),
        a["without_a_key"].as_str().unwrap_or("?"),
    ));
    md.push_str(&format!(
        "## Crash loop\n\n{} `kill -9` at random moments (0.3-1.5 s into concurrent unary \
         registrations, streamed LoRA uploads and deletes), {:.0} s: {} acknowledged writes, \
         **{} lost**, {} acknowledged deletes undone, **{} restarts failed**; the index \
         was dumped without a clean shutdown after {} of the {} restarts that rebuilt a \
         graph.\n",
        c["kills"],
        f(&c["seconds"]),
        c["acknowledged_writes"],
        c["acknowledged_writes_lost"],
        c["acknowledged_deletes_undone"],
        c["restarts_failed"],
        c["rebuilds_persisted"],
        c["rebuilds_after_a_crash"],
    ));
    md
}
