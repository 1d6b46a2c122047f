//! What the tests that start real `roe` processes share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use roe_services::proto;
use roe_task_suite::{sample, Task};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("ROE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

/// Registration of the suite's `kind` expert of `task` with `instances` sampled train rows.
pub fn register_request(
    id: &str,
    kind: &str,
    task: &Task,
    instances: usize,
    new_version: bool,
) -> proto::RegisterExpertRequest {
    let dir = repo()
        .join("assets/experts/smollm2-135m")
        .join(kind)
        .join(task.name());
    proto::RegisterExpertRequest {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        backbone: String::new(),
        adapter: Some(proto::PeftAdapter {
            adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))
                .unwrap(),
        }),
        instances: sample(&task.train, instances, 0)
            .into_iter()
            .map(|i| proto::Instance {
                input: i.input,
                target: i.target,
                choices: i.choices,
            })
            .collect(),
        new_version,
        safetensors_bytes: None,
        safetensors_sha256: String::new(),
    }
}

/// Starts `roe serve` on a port the kernel picks (`127.0.0.1:0`, so no other process can take
/// it between choosing and binding) and waits for its "listening" line, which names the port.
pub fn start_serve(data: &Path) -> (Child, String) {
    start_serve_with(data, &[])
}

/// [`start_serve`] with more `roe serve` flags.
pub fn start_serve_with(data: &Path, flags: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(flags)
        .arg("--models-dir")
        .arg(models_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("roe binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("roe listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, format!("http://{addr}"))
}

/// The server goes with the test, failed or not (its stderr would hold the harness's pipe).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
