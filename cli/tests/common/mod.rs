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
        expected_version: Default::default(),
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
    start_serve_http_on(data, "127.0.0.1:0", flags)
}

/// [`start_serve_http`] with the HTTP API on `http_addr` (`0.0.0.0:0`: beyond loopback); the
/// HTTP root names the address it printed (`http://0.0.0.0:PORT`: see [`loopback_root`]).
pub fn start_serve_http_on(
    data: &Path,
    http_addr: &str,
    flags: &[&str],
) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--addr", "127.0.0.1:0", "--http-addr", http_addr])
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

/// `scheme://127.0.0.1:PORT` for a root that names the port of a server listening beyond
/// loopback (`http://0.0.0.0:PORT`).
pub fn loopback_root(root: &str, scheme: &str) -> String {
    let port = root.rsplit(':').next().unwrap();
    format!("{scheme}://127.0.0.1:{port}")
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
    let addr = root.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    exchange(&mut s, addr, method, path, body, headers)
}

/// `roe tls self-signed` for `localhost` and `127.0.0.1` into `dir`: the CA (what clients
/// trust), the server's certificate and its key.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args([
            "tls",
            "self-signed",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
        ])
        .arg("--out-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// A rustls client trusting the CA certificates (PEM) in `ca`, and nothing else.
pub fn tls_client(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// [`http_call_with`] over HTTPS (`https://127.0.0.1:PORT`), trusting the CA in `ca`; the
/// server's certificate must name `localhost`.
pub fn https_call_with(
    root: &str,
    ca: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let addr = root.trim_start_matches("https://");
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let name = "localhost".try_into().unwrap();
    let conn = rustls::ClientConnection::new(tls_client(ca), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    exchange(&mut s, addr, method, path, body, headers)
}

/// What a server answers a plaintext HTTP request with, within 10 s (a TLS port answers no
/// HTTP: an alert, or nothing, then it closes).
pub fn plaintext_answer(addr: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    // The server may close (or reset) before the request is all written: a broken pipe or a
    // reset on the write is an answer too, as is a reset or the timeout on the read.
    if write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_ok()
    {
        let _ = s.read_to_end(&mut raw);
    }
    raw
}

/// Writes one request on `s` and reads the response to its end.
fn exchange(
    s: &mut (impl std::io::Read + std::io::Write),
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
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
    match std::io::Read::read_to_end(s, &mut raw) {
        Ok(_) => {}
        // A TLS peer that closed without close_notify: what came is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => panic!("reading the response from {addr}: {e}"),
    }
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
