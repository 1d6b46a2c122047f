//! Long prompts against a real `roe serve`: read whole up to the backbone's context (no
//! silent cut), refused past it naming the field (OpenAI's `context_length_exceeded` over
//! HTTP, INVALID_ARGUMENT over gRPC), cut from the front only when the request asks to
//! `truncate`, and the cut reported, on every path.
mod common;

use std::process::{Command, Output};

use serde_json::{json, Value};

use common::{http_call, start_serve_http, KillOnDrop};

/// A text of about `n` tokens (" river" is one SmolLM2 token).
fn words(n: usize) -> String {
    " river".repeat(n)
}

fn post(http: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http_call(http, "POST", path, Some(&body.to_string()));
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

fn roe(grpc: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roe"))
        .arg("--server")
        .arg(grpc)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ROE_API_KEY")
        .output()
        .expect("roe runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (status, code, param, message) of an OpenAI error body.
fn error_of(status: u16, v: &Value) -> (u16, String, String, String) {
    let e = &v["error"];
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    (status, s("code"), s("param"), s("message"))
}

#[test]
fn prompts_past_the_context_are_refused_or_cut_on_request_and_never_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, grpc, http) = start_serve_http(&tmp.path().join("library"), &[]);
    let _server = KillOnDrop(child);

    // Past the old 384-token cut: read whole, and said so.
    let (status, v) = post(
        &http,
        "/v1/roe/score",
        json!({"input": words(1000), "choices": ["yes", "no"]}),
    );
    assert_eq!(status, 200, "{v}");
    let read = v["promptTokens"].as_u64().unwrap();
    assert!(read > 1000, "{v}");
    assert!(v.get("truncatedTokens").is_none(), "nothing cut: {v}");

    // Past the context (8,192): refused, naming the field under OpenAI's name.
    let long = words(9000);
    let (status, v) = post(
        &http,
        "/v1/completions",
        json!({"model": "base", "prompt": long, "max_tokens": 4}),
    );
    let (status, code, param, message) = error_of(status, &v);
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "context_length_exceeded", "prompt"),
        "{v}"
    );
    assert!(
        message.contains("the backbone reads 8192 tokens"),
        "{message}"
    );
    assert!(
        message.contains("4 for the new tokens asked for"),
        "{message}"
    );
    let (status, v) = post(
        &http,
        "/v1/chat/completions",
        json!({"model": "base", "messages": [{"role": "user", "content": long}]}),
    );
    let (status, code, param, _) = error_of(status, &v);
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "context_length_exceeded", "messages"),
        "{v}"
    );
    let (status, v) = post(
        &http,
        "/v1/roe/score",
        json!({"input": long, "choices": ["yes", "no"]}),
    );
    let (status, code, param, _) = error_of(status, &v);
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "context_length_exceeded", "input"),
        "{v}"
    );
    // Over gRPC: INVALID_ARGUMENT naming `input`.
    let out = roe(
        &grpc,
        &[
            "score", "--input", &long, "--choice", "yes", "--choice", "no",
        ],
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("invalid argument") && said.contains("input: 9003 tokens"),
        "{said}"
    );
    assert!(said.contains("set truncate to keep its last"), "{said}");

    // (Asked to truncate, the prompt's last 8,190 tokens would run: a minute on two cores,
    // measured by `roe bench context`; the next test cuts to a smaller budget.)
    // Not asked: no truncation field in the usage.
    let (status, v) = post(
        &http,
        "/v1/completions",
        json!({"model": "base", "prompt": "The sea is", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"].get("truncated_prompt_tokens").is_none(), "{v}");
}

#[test]
fn the_per_request_input_budget_binds_below_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, grpc, http) = start_serve_http(
        &tmp.path().join("library"),
        &[
            "--max-input-length",
            "200",
            "--max-batch-prefill-tokens",
            "64",
        ],
    );
    let _server = KillOnDrop(child);
    let prompt = words(300);
    let (status, v) = post(
        &http,
        "/v1/completions",
        json!({"model": "base", "prompt": prompt, "max_tokens": 2}),
    );
    let (status, code, param, message) = error_of(status, &v);
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "context_length_exceeded", "prompt"),
        "{v}"
    );
    assert!(message.contains("max_input_length is 200"), "{message}");

    // Cut to the budget, in passes of 64 positions, streamed with usage.
    let (status, body) = http_call(
        &http,
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": "base", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                    "truncate": true, "stream": true, "stream_options": {"include_usage": true}})
            .to_string(),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let usage: Value = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .unwrap_or_else(|| panic!("no usage chunk: {body}"));
    assert_eq!(usage["prompt_tokens"], 200, "{usage}");
    assert!(
        usage["truncated_prompt_tokens"].as_u64().unwrap() >= 100,
        "{usage}"
    );

    // gRPC Generate and Score report the cut too (the CLI prints it).
    let out = roe(
        &grpc,
        &[
            "generate",
            "--input",
            &prompt,
            "--max-new-tokens",
            "2",
            "--truncate",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("[input cut from the front: "),
        "{}",
        text(&out)
    );
    let out = roe(
        &grpc,
        &[
            "score",
            "--input",
            &prompt,
            "--choice",
            "yes",
            "--choice",
            "no",
            "--truncate",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The canonical rendering adds "\nAnswer:"; the longest choice leaves the budget alone
    // (200 is below the context less the choice).
    assert_eq!(v["prompt_tokens"], 200, "{v}");
    assert!(v["truncated_tokens"].as_u64().unwrap() >= 100, "{v}");
}
