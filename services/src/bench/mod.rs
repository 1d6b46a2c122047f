//! Benchmarks behind `roe bench ...`: each prints a table and writes JSON and Markdown under
//! `bench/results/`.

pub mod cli;
pub mod encoder;
pub mod hnsw;
pub mod latency;
pub mod routing_accuracy;
pub mod startup;

use std::path::Path;

/// Writes `<dir>/<name>.json` and `<dir>/<name>.md`.
pub fn write_results(
    dir: &Path,
    name: &str,
    json: &serde_json::Value,
    markdown: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    std::fs::write(dir.join(format!("{name}.md")), markdown)?;
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
