//! `roe serve` with API keys, driven by the `roe` CLI as people use it: clients pass
//! `--api-key` / `ROE_API_KEY`; an open server refuses to listen beyond loopback.
mod common;

use std::process::{Command, Output, Stdio};

use common::{models_dir, repo, KillOnDrop};

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
