//! `roe serve` with API keys, driven by the `roe` CLI as people use it: clients pass
//! `--api-key` / `ROE_API_KEY`; an open server refuses to listen beyond loopback, and so does
//! a plaintext HTTP API with keys; TLS covers gRPC and the HTTP API with one certificate.
mod common;

use std::process::{Command, Output, Stdio};

use common::{
    https_call_with, loopback_root, models_dir, plaintext_answer, repo, start_serve_http_on,
    KillOnDrop,
};

const ADMIN: &str = "admin-key-for-cli-tests-1";
const READ: &str = "read-key-for-cli-tests-22";

fn roe(url: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roe"));
    c.arg("--server")
        .arg(url)
        .args(args)
        .env("RUST_LOG", "warn");
    c.env_remove("ROE_API_KEY");
    if let Some(k) = key {
        c.env("ROE_API_KEY", k);
    }
    c.output().expect("roe runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn an_open_server_will_not_listen_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args([
            "serve",
            "--addr",
            "0.0.0.0:0",
            "--no-inference",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .arg("--models-dir")
        .arg(models_dir())
        .env_remove("ROE_ADMIN_KEYS")
        .env_remove("ROE_READ_KEYS")
        .env_remove("ROE_ALLOW_UNAUTHENTICATED")
        .env("ROE_HTTP_ADDR", "")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("refusing to serve 0.0.0.0:0 without API keys"),
        "{msg}"
    );
    assert!(msg.contains("--allow-unauthenticated"), "{msg}");
    // A key too short to be safe is refused at start, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--no-inference",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .args(["--admin-keys", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("admin-keys: key 1 is 5 bytes"),
        "{}",
        text(&out)
    );
}

#[test]
fn cli_clients_pass_their_key_and_read_keys_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--no-inference",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .arg("--models-dir")
        .arg(models_dir())
        .env("ROE_ADMIN_KEYS", ADMIN)
        .env("ROE_READ_KEYS", format!("ci:{READ}"))
        .env("RUST_LOG", "info")
        .env("ROE_HTTP_ADDR", "")
        .args(["--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s).unwrap();
        s
    });
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = KillOnDrop(child);
    let url = format!(
        "http://{}",
        line.trim().strip_prefix("roe listening on ").unwrap()
    );
    let peft = repo().join("assets/experts/smollm2-135m/prompt/sms_spam");
    let task = repo().join("assets/tasks/sms_spam");
    let add = |key| {
        roe(
            &url,
            key,
            &[
                "expert",
                "add",
                "--id",
                "spam",
                "--peft",
                peft.to_str().unwrap(),
                "--instances",
                task.to_str().unwrap(),
            ],
        )
    };
    let out = add(None);
    assert!(!out.status.success());
    assert!(text(&out).contains("no API key"), "{}", text(&out));
    let out = add(Some(READ));
    assert!(!out.status.success());
    assert!(text(&out).contains("may only read"), "{}", text(&out));
    let out = add(Some(ADMIN));
    assert!(out.status.success(), "{}", text(&out));
    let out = roe(&url, Some(READ), &["expert", "ls"]);
    assert!(
        out.status.success() && text(&out).contains("spam"),
        "{}",
        text(&out)
    );
    let out = roe(&url, Some(READ), &["expert", "rm", "spam"]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = roe(&url, None, &["--api-key", READ, "expert", "ls"]);
    assert!(
        out.status.success() && text(&out).contains("spam"),
        "{}",
        text(&out)
    );
    // A write the key may make, refused for what it asks.
    let out = roe(&url, Some(ADMIN), &["expert", "rm", "no-such-expert"]);
    assert!(!out.status.success(), "{}", text(&out));

    // The server's log (not a terminal: JSON asked for) has an audit line per write and per
    // refusal, naming the key, never showing it.
    drop(_server);
    let logs = logs.join().unwrap();
    assert!(
        !logs.contains(READ) && !logs.contains(ADMIN),
        "a key was logged"
    );
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let audit = |message: &str| {
        lines
            .iter()
            .filter(|l| l["target"] == "audit" && l["fields"]["message"] == message)
            .collect::<Vec<_>>()
    };
    assert_eq!(audit("refused: no API key").len(), 1, "{logs}");
    let denied = audit("refused: read key on a write");
    assert_eq!(denied.len(), 2, "{logs}");
    assert!(
        denied.iter().all(|l| l["fields"]["key"] == "ci"),
        "{denied:?}"
    );
    let writes = audit("write");
    assert_eq!(writes.len(), 1, "{logs}");
    assert_eq!(writes[0]["fields"]["key"], "admin-keys#1");
    assert_eq!(writes[0]["fields"]["status"], "OK");
    assert_eq!(
        writes[0]["fields"]["method"],
        "/roe.v1.ExpertLibrary/RegisterExpert"
    );
    let refused = audit("refused");
    assert_eq!(refused.len(), 1, "{logs}");
    assert_eq!(refused[0]["fields"]["key"], "admin-keys#1");
    assert_eq!(refused[0]["fields"]["status"], "NOT_FOUND");
    assert_eq!(
        refused[0]["fields"]["method"],
        "/roe.v1.ExpertLibrary/DeleteExpert"
    );
}

/// `roe serve --tls-cert/--tls-key` with a certificate made here; the CLI reaches it over
/// https trusting that certificate (`--tls-ca`), and not otherwise.
#[test]
fn tls_server_and_cli_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let (child, addr) = common::start_serve_with(
        &tmp.path().join("data"),
        &[
            "--no-inference",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let _server = KillOnDrop(child);
    let https = format!("https://{}", addr.trim_start_matches("http://"));
    let ca = cert.to_str().unwrap();
    let out = roe(
        &https,
        None,
        &["--tls-ca", ca, "--tls-domain", "localhost", "expert", "ls"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // The system's roots alone do not know this certificate.
    let out = roe(&https, None, &["--tls-domain", "localhost", "expert", "ls"]);
    assert!(!out.status.success(), "{}", text(&out));
    // Plaintext to a TLS port gets no answer.
    let out = roe(&addr, None, &["expert", "ls"]);
    assert!(!out.status.success(), "{}", text(&out));
    // A CA given for a plaintext URL is a mistake, said so.
    let out = roe(&addr, None, &["--tls-ca", ca, "expert", "ls"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("need an https:// URL"),
        "{}",
        text(&out)
    );
    // A missing key file is named at start.
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--addr", "127.0.0.1:0", "--no-inference"])
        .arg("--data-dir")
        .arg(tmp.path().join("other"))
        .args(["--tls-cert", ca, "--tls-key"])
        .arg(tmp.path().join("missing.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--tls-key"), "{}", text(&out));
}

/// `roe tls self-signed` writes a private CA and a server certificate it signed (CA:FALSE, for
/// the names asked, for server authentication), the key readable by its owner only; it
/// never overwrites.
#[test]
fn tls_self_signed_writes_a_ca_and_a_server_certificate_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let (ca, cert, key) = common::self_signed(&dir);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    assert!(read(&ca).contains("BEGIN CERTIFICATE"));
    assert!(read(&cert).contains("BEGIN CERTIFICATE"));
    assert!(read(&key).contains("PRIVATE KEY"));
    // The CA's key is not kept.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["ca.pem", "cert.pem", "key.pem"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key.pem is readable by others: {mode:o}");
    }
    // OpenSSL agrees, strict checks included (Python 3.13 verifies with them).
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ca_s, cert_s) = (ca.to_str().unwrap(), cert.to_str().unwrap());
    let (ok, out) = openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        ca_s,
        cert_s,
    ]);
    assert!(ok, "{out}");
    let (_, leaf) = openssl(&["x509", "-noout", "-text", "-in", cert_s]);
    for expected in [
        "CA:FALSE",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "TLS Web Server Authentication",
    ] {
        assert!(leaf.contains(expected), "{expected} not in {leaf}");
    }
    let (_, root) = openssl(&["x509", "-noout", "-text", "-in", ca_s]);
    assert!(root.contains("CA:TRUE"), "{root}");

    // A second run leaves the files as they are.
    let before = read(&cert);
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["tls", "self-signed", "--san", "localhost", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("not overwriting"), "{}", text(&out));
    assert_eq!(read(&cert), before);
    // A name is required, and named.
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["tls", "self-signed", "--out-dir"])
        .arg(tmp.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--san"), "{}", text(&out));
}

/// The HTTP API over TLS with the gRPC server's certificate and key (`roe tls self-signed`'s
/// pair): listening beyond loopback with API keys is then allowed, keys still apply, a
/// plaintext request to the port gets no HTTP answer (and the listener goes on), and gRPC
/// answers the CLI over https with the same CA.
#[test]
fn the_http_api_is_served_over_https_with_the_grpc_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::self_signed(&tmp.path().join("tls"));
    let (child, grpc, http) = start_serve_http_on(
        &tmp.path().join("data"),
        "0.0.0.0:0",
        &[
            "--no-inference",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--admin-keys",
            ADMIN,
        ],
    );
    let _server = KillOnDrop(child);
    let https = loopback_root(&http, "https");
    let (status, body) = https_call_with(&https, &ca, "GET", "/health", None, &[]);
    assert_eq!(status, 200, "{body}");
    let bearer = format!("Bearer {ADMIN}");
    let (status, body) = https_call_with(
        &https,
        &ca,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", &bearer)],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"auto\""), "{body}");
    let (status, body) = https_call_with(&https, &ca, "GET", "/v1/models", None, &[]);
    assert_eq!(status, 401, "{body}");

    // Plaintext to the HTTPS port: no HTTP answer; the listener is still there after it.
    let answer = plaintext_answer(https.trim_start_matches("https://"));
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (status, _) = https_call_with(&https, &ca, "GET", "/health", None, &[]);
    assert_eq!(status, 200);

    // gRPC with the same certificate: the CLI trusts the CA (the URL's IP address is in the
    // certificate, so no --tls-domain).
    let grpc = grpc.replace("http://", "https://");
    let out = roe(
        &grpc,
        Some(ADMIN),
        &["--tls-ca", ca.to_str().unwrap(), "expert", "ls"],
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// API keys over plaintext HTTP beyond loopback would cross the network in clear: refused at
/// start, naming the ways out, unless --http-allow-plaintext.
#[test]
fn plaintext_http_beyond_loopback_with_keys_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--addr", "127.0.0.1:0", "--http-addr", "0.0.0.0:0"])
        .args(["--no-inference", "--admin-keys", ADMIN, "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--models-dir")
        .arg(models_dir())
        .env_remove("ROE_HTTP_ALLOW_PLAINTEXT")
        .env_remove("ROE_TLS_CERT")
        .env_remove("ROE_TLS_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("refusing to serve the HTTP API on 0.0.0.0:0 in plaintext with API keys"),
        "{msg}"
    );
    for way_out in ["--tls-cert", "127.0.0.1", "--http-allow-plaintext"] {
        assert!(msg.contains(way_out), "{way_out} not in {msg}");
    }

    // Asked for (a proxy terminates TLS in front): it serves.
    let (child, _, http) = start_serve_http_on(
        &tmp.path().join("data"),
        "0.0.0.0:0",
        &[
            "--no-inference",
            "--admin-keys",
            ADMIN,
            "--http-allow-plaintext",
        ],
    );
    let _server = KillOnDrop(child);
    let (status, body) = common::http_call(&loopback_root(&http, "http"), "GET", "/health", None);
    assert_eq!(status, 200, "{body}");
}
