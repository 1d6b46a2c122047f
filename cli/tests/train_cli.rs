//! `roe expert train`, `roe train ls|watch|cancel` and `roe expert show|export` against a real
//! `roe serve`: the commands people use to make an expert inside roe.
mod common;

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::Path;
use std::process::{Command, Output};

use roe_task_suite::{sample, Task};

use common::{repo, start_serve, KillOnDrop};

fn roe<S: AsRef<OsStr>>(url: &str, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roe"))
        .arg("--server")
        .arg(url)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("roe runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `args` succeed; returns stdout.
fn ok<S: AsRef<OsStr> + Debug>(url: &str, args: &[S]) -> String {
    let out = roe(url, args);
    assert!(
        out.status.success(),
        "roe {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `args` fail; returns stderr.
fn fails<S: AsRef<OsStr> + Debug>(url: &str, args: &[S]) -> String {
    let out = roe(url, args);
    assert!(!out.status.success(), "roe {args:?} succeeded");
    text(&out.stderr)
}

fn write_rows(path: &Path, task: &Task, n: usize) {
    let lines: Vec<String> = sample(&task.train, n, 5)
        .iter()
        .map(|i| serde_json::json!({"input": i.input, "target": i.target}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn the_cli_trains_an_expert_follows_lists_cancels_and_exports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, url) = start_serve(&tmp.path().join("data"));
    let _server = KillOnDrop(child);
    let t = Task::load(repo().join("assets/tasks/sms_spam")).unwrap();
    let rows = tmp.path().join("rows.jsonl");
    write_rows(&rows, &t, 24);
    let rows = rows.to_str().unwrap();
    // A small job: `id`, `kind`, `steps`, then any extra flags.
    let train = |id: &str, kind: &str, steps: &str, extra: &[&str]| -> Vec<String> {
        let v: Vec<String> = [
            "expert",
            "train",
            "--rows",
            rows,
            "--labels",
            "ham,spam",
            "--id",
            id,
            "--kind",
            kind,
            "--steps",
            steps,
            "--batch",
            "4",
            "--warmup",
            "1",
            "--held-out",
            "0.25",
            "--instances",
            "5",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        v
    };
    // --detach prints the job id alone; watch follows it to the end.
    let job = ok(&url, &train("cli_spam", "lora", "2", &["--detach"]))
        .trim()
        .to_string();
    assert!(!job.is_empty() && !job.contains(' '), "job id {job:?}");
    let watched = ok(&url, &["train", "watch", &job]);
    assert!(watched.contains(&job), "{watched}");
    assert!(watched.contains("succeeded"), "{watched}");
    assert!(watched.contains("expert cli_spam (v1)"), "{watched}");
    // All 24 rows arrived (streamed one a message): 18 trained, 6 held out.
    assert!(watched.contains("on 6 rows"), "{watched}");

    let listed = ok(&url, &["train", "ls"]);
    assert!(
        listed.contains(&job) && listed.contains("succeeded"),
        "{listed}"
    );
    let shown = ok(&url, &["expert", "show", "cli_spam"]);
    assert!(
        shown.contains(&format!("trained:     job {job}, 2 steps on 18 rows")),
        "{shown}"
    );
    assert!(shown.contains("\"learning_rate\":0.002"), "{shown}");

    // The export is the stored PEFT folder, byte for byte.
    let out = tmp.path().join("export");
    ok(
        &url,
        &[
            "expert",
            "export",
            "cli_spam",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let config = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"LORA\""), "{config}");
    let weights = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(weights.len() > 1000);

    // The same id again is refused before training; a bad recipe names its field.
    let err = fails(&url, &train("cli_spam", "lora", "2", &[]));
    assert!(err.contains("expert_id"), "{err}");
    let err = fails(&url, &train("other", "lora", "2", &["--lr=-1"]));
    assert!(err.contains("recipe.learning_rate"), "{err}");

    // Following without --detach waits for the end (exit 0 on success) ...
    let waited = ok(&url, &train("cli_spam_2", "prompt", "2", &[]));
    assert!(waited.contains("expert cli_spam_2 (v1)"), "{waited}");
    // ... and a long job is cancelled.
    let long = ok(&url, &train("cli_long", "lora", "500", &["--detach"]))
        .trim()
        .to_string();
    let cancelled = ok(&url, &["train", "cancel", &long]);
    assert!(cancelled.contains(&long), "{cancelled}");
    let err = fails(&url, &["train", "watch", &long]);
    assert!(err.contains("cancelled"), "{err}");
    let err = fails(&url, &["train", "watch", "no-such-job"]);
    assert!(
        err.to_lowercase().contains("not found") || err.contains("NotFound"),
        "{err}"
    );
}
