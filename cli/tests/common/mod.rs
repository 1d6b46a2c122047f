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
        // No HTTP server unless a test asks for one (`--http-addr 127.0.0.1:0`): the default
        // port would be shared by the tests running at once.
        .env("ROE_HTTP_ADDR", "")
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

/// [`start_serve_with`] with the HTTP API on a port the kernel picks: the child, the gRPC URL
/// and the HTTP root (`http://127.0.0.1:PORT`).
pub fn start_serve_http(data: &Path, flags: &[&str]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .args(flags)
        .arg("--models-dir")
        .arg(models_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("roe binary starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut read = |prefix: &str| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .to_string()
    };
    let grpc = read("roe listening on ");
    let http = read("roe HTTP listening on ");
    (child, format!("http://{grpc}"), format!("http://{http}"))
}

/// One HTTP/1.1 request over a plain socket (the tests need no client library for it): the
/// status and the body (chunked bodies, as streams come, are joined).
pub fn http_call(root: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_call_with(root, method, path, body, &[])
}

/// [`http_call`] with more headers.
pub fn http_call_with(
    root: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = root.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut rest = &raw[split + 4..];
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if !head.contains("transfer-encoding: chunked") {
        return (status, String::from_utf8_lossy(rest).into_owned());
    }
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]).trim().to_string();
        let n = usize::from_str_radix(&size, 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
        rest = &rest[eol + 4 + n..];
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}
