//! Benchmarks behind `roe bench ...`: each prints a table and writes JSON and Markdown under
//! `bench/results/`.

pub mod answer;
pub mod arrivals;
pub mod caching_encoder;
pub mod cli;
pub mod context;
pub mod encoder;
pub mod eval;
pub mod eval_chart;
pub mod generate;
pub mod hnsw;
pub mod host;
pub mod http;
pub mod latency;
pub mod reliability;
pub mod replicas;
pub mod routing_accuracy;
pub mod score;
pub mod serving;
pub mod soak;
pub mod startup;
pub mod train;
pub mod train_loop;

use std::path::Path;

/// Writes `<dir>/<name>.json` and `<dir>/<name>.md`, each recording the CPU it ran on
/// ([`host::Host`]): a `host` object in the JSON, a `CPU: ...` line under the Markdown's title.
pub fn write_results(
    dir: &Path,
    name: &str,
    json: &serde_json::Value,
    markdown: &str,
) -> anyhow::Result<()> {
    let host = host::Host::detect();
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&host.annotate_json(json))?,
    )?;
    std::fs::write(
        dir.join(format!("{name}.md")),
        host.annotate_markdown(markdown),
    )?;
    Ok(())
}

/// Resident memory of this process in bytes (Linux), for memory figures.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn machine() -> serde_json::Value {
    serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// Runs a Python peer script: `input` as JSON on stdin, one JSON document back on stdout
/// (its logs pass through on stderr).
pub fn run_peer(
    python: &Path,
    script: &Path,
    input: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    child
        .stdin
        .take()
        .context("peer stdin")?
        .write_all(serde_json::to_string(input)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("{} failed with {}", script.display(), out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The peers' Python: `explicit`, else `.venv/bin/python` when scripts/setup-peers.sh made it.
pub fn peer_python(explicit: Option<&Path>) -> Option<std::path::PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        let p = std::path::PathBuf::from(".venv/bin/python");
        p.exists().then_some(p)
    })
}

/// A real gRPC server on 127.0.0.1 (an ephemeral port) for the benchmarks' clients.
pub struct BenchServer {
    pub url: String,
    /// The inference service, when the server runs one (its counters time expert loads).
    pub inference: Option<std::sync::Arc<roe_serving::BackboneInference>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl BenchServer {
    pub async fn start(
        library: std::sync::Arc<roe_expert_library::library::ExpertLibrary>,
        options: roe_services::server::ServeOptions,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let inference = options.inference.clone();
        let task = tokio::spawn(roe_services::server::serve(
            listener,
            library,
            options,
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(Self {
            url,
            inference,
            stop,
            task,
        })
    }

    /// Serves `library` with the inference (and route-and-answer) services on `backbone`.
    pub async fn with_inference(
        library: std::sync::Arc<roe_expert_library::library::ExpertLibrary>,
        backbone: std::sync::Arc<roe_backbone::Backbone>,
    ) -> anyhow::Result<Self> {
        let inference = std::sync::Arc::new(roe_serving::BackboneInference::over_library(
            backbone,
            library.clone(),
            roe_serving::ServingConfig::default(),
        ));
        Self::start(
            library,
            roe_services::server::ServeOptions {
                inference: Some(inference),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
