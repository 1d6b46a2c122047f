//! The HTTP API of a real `roe serve`: the official `openai` Python client drives it
//! unchanged (cli/tests/openai_client.py, with the venv of scripts/openai-venv.sh; over HTTPS
//! cli/tests/openai_https.py), and a scrape of `/metrics` after a known workload shows the
//! counters at the values it implies.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use roe_services::proto::{self, expert_library_client::ExpertLibraryClient};
use roe_task_suite::Task;
use serde_json::{json, Value};

use common::{http_call, http_call_with, repo, start_serve_http, KillOnDrop};

/// Instances sampled per expert.
const S: usize = 24;

fn task(name: &str) -> Task {
    Task::load(repo().join("assets/tasks").join(name)).unwrap()
}

async fn register(grpc: &str, experts: &[(&str, &str)], s: usize) -> Vec<Task> {
    let mut c = ExpertLibraryClient::connect(grpc.to_string())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (name, kind) in experts {
        let t = task(name);
        c.register_expert(common::register_request(name, kind, &t, s, false))
            .await
            .unwrap();
        tasks.push(t);
    }
    tasks
}

/// The Python of the `openai` client's venv: $ROE_OPENAI_PYTHON, else
/// .venv-openai/bin/python (scripts/openai-venv.sh makes it; scripts/test.sh runs that).
fn openai_python() -> PathBuf {
    let p = std::env::var_os("ROE_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-openai/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/openai-venv.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Runs one of the client scripts; it must succeed, and its last line of output is its JSON
/// summary.
fn run_python(command: &mut std::process::Command) -> Value {
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_works_against_roe_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, grpc, http) = start_serve_http(&tmp.path().join("library"), &[]);
    let _server = KillOnDrop(child);
    let tasks = register(
        &grpc,
        &[
            ("sms_spam", "lora"),
            ("snips_intent", "lora"),
            ("question_type", "prompt"),
            ("language_id", "prompt"),
        ],
        100,
    )
    .await;
    // Test rows: inputs the experts' instances (train rows) do not hold.
    let cases = json!({
        "base_url": http,
        "backbone": "smollm2-135m",
        "readme": repo().join("README.md"),
        "tasks": tasks.iter().map(|t| json!({
            "expert": t.name(),
            "inputs": t.test.iter().take(8).map(|i| i.input.clone()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let cases_file = tmp.path().join("cases.json");
    std::fs::write(&cases_file, cases.to_string()).unwrap();
    let summary = run_python(
        std::process::Command::new(openai_python())
            .arg(repo().join("cli/tests/openai_client.py"))
            .env("ROE_OPENAI_CASES", &cases_file),
    );
    eprintln!("openai client: {summary}");
    assert_eq!(summary["models"], 6);
    assert!(summary["readme_curl"].as_u64().unwrap() >= 4, "{summary}");
}

/// The official `openai` client over HTTPS (`roe serve --tls-cert/--tls-key` with `roe tls
/// self-signed`'s pair; cli/tests/openai_https.py), given the CA: models listed with the key,
/// a wrong key refused (401), and without the CA the certificate refused.
#[test]
fn the_openai_python_client_works_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::self_signed(&tmp.path().join("tls"));
    let admin = "admin-key-for-https-tests-1";
    let (child, _, http) = start_serve_http(
        &tmp.path().join("library"),
        &[
            "--no-inference",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--admin-keys",
            admin,
        ],
    );
    let _server = KillOnDrop(child);
    let summary = run_python(
        std::process::Command::new(openai_python())
            .arg(repo().join("cli/tests/openai_https.py"))
            .env("ROE_HTTPS_ROOT", http.replace("http://", "https://"))
            .env("ROE_HTTPS_CA", &ca)
            .env("ROE_HTTPS_KEY", admin)
            // The CA reaches the client as the script gives it, not through the environment.
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR"),
    );
    assert_eq!(summary["models"], json!(["auto", "base"]), "{summary}");
    assert_eq!(summary["wrong_key"], 401, "{summary}");
    assert_eq!(summary["without_ca"], "refused", "{summary}");
}

/// `name{labels} value` lines of a Prometheus scrape.
fn scrape(http: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let (status, text) = http_call(http, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}

/// The value of the series `name` whose labels include `labels` (0 when absent).
fn value(
    metrics: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    metrics
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_workload() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, grpc, http) = start_serve_http(&tmp.path().join("library"), &[]);
    let _server = KillOnDrop(child);
    let tasks = register(
        &grpc,
        &[("sms_spam", "lora"), ("snips_intent", "prompt")],
        S,
    )
    .await;

    for _ in 0..3 {
        assert_eq!(http_call(&http, "GET", "/v1/models", None).0, 200);
    }
    // Two routes over HTTP, one over gRPC: the second HTTP route repeats the first (a route
    // cache hit); the gRPC one asks the same query with other options (a route cache miss, an
    // embedding cache hit).
    let route = json!({"queries": [{"input": tasks[0].test[0].input}]}).to_string();
    for _ in 0..2 {
        let (status, body) = http_call(&http, "POST", "/v1/roe/route", Some(&route));
        assert_eq!(status, 200, "{body}");
        let r: Value = serde_json::from_str(&body).unwrap();
        assert!(r["ranked"].as_array().is_some_and(|a| !a.is_empty()), "{r}");
    }
    let mut router = proto::router_client::RouterClient::connect(grpc.clone())
        .await
        .unwrap();
    router
        .route(proto::RouteRequest {
            min_library_seq: Default::default(),
            queries: vec![proto::Query {
                input: tasks[0].test[0].input.clone(),
                ..Default::default()
            }],
            options: Some(proto::RouteOptions {
                exact: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // An unknown model, then one completion streamed by an expert.
    let bad = json!({"model": "nope", "prompt": "x"}).to_string();
    assert_eq!(
        http_call(&http, "POST", "/v1/completions", Some(&bad)).0,
        404
    );
    let req = json!({"model": "sms_spam", "prompt": tasks[0].test[0].input, "max_tokens": 5,
                     "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (status, events) = http_call(&http, "POST", "/v1/completions", Some(&req.to_string()));
    assert_eq!(status, 200, "{events}");
    let usage: Value = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| !c["usage"].is_null())
        .map(|c| c["usage"].clone())
        .expect("a usage chunk");
    let generated = usage["completion_tokens"].as_f64().unwrap();
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");

    let m = scrape(&http);
    let http_requests = |endpoint: &str, status: &str| {
        value(
            &m,
            "roe_requests_total",
            &[
                ("transport", "http"),
                ("endpoint", endpoint),
                ("status", status),
            ],
        )
    };
    assert_eq!(http_requests("GET /v1/models", "200"), 3.0);
    assert_eq!(http_requests("POST /v1/roe/route", "200"), 2.0);
    assert_eq!(http_requests("POST /v1/completions", "404"), 1.0);
    assert_eq!(http_requests("POST /v1/completions", "200"), 1.0);
    let grpc_requests = |endpoint: &str, status: &str| {
        value(
            &m,
            "roe_requests_total",
            &[
                ("transport", "grpc"),
                ("endpoint", endpoint),
                ("status", status),
            ],
        )
    };
    assert_eq!(grpc_requests("/roe.v1.Router/Route", "OK"), 1.0);
    assert_eq!(
        grpc_requests("/roe.v1.ExpertLibrary/RegisterExpert", "OK"),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "roe_request_duration_seconds_count",
            &[("endpoint", "GET /v1/models")]
        ),
        3.0
    );
    assert_eq!(value(&m, "roe_routes_total", &[("outcome", "routed")]), 3.0);
    assert_eq!(value(&m, "roe_library_experts", &[]), 2.0);
    // The process itself: a server with the backbone and the encoder loaded holds more than
    // 100 MB, its listeners and library files open.
    let rss = value(&m, "process_resident_memory_bytes", &[]);
    assert!(rss > 100e6, "{rss}");
    assert!(value(&m, "process_resident_memory_max_bytes", &[]) >= rss);
    assert!(value(&m, "process_open_fds", &[]) >= 5.0);
    assert_eq!(value(&m, "roe_library_vectors", &[]), (2 * S) as f64);
    assert_eq!(value(&m, "roe_generated_tokens_total", &[]), generated);
    assert_eq!(value(&m, "roe_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(value(&m, "roe_expert_loads_total", &[]), 1.0);
    assert_eq!(value(&m, "roe_expert_cache_misses_total", &[]), 1.0);
    assert_eq!(value(&m, "roe_generate_queue_depth", &[]), 0.0);
    assert!(value(&m, "roe_expert_cache_bytes", &[]) > 0.0);
    assert_eq!(value(&m, "roe_route_cache_hits_total", &[]), 1.0);
    assert_eq!(value(&m, "roe_route_cache_misses_total", &[]), 2.0);
    // Every instance embedded at registration, and one routed query: the route cache answered
    // the second HTTP route, the embedding cache held the gRPC route's query.
    assert_eq!(value(&m, "roe_embedding_cache_hits_total", &[]), 1.0);
    assert!(value(&m, "roe_encoder_texts_total", &[]) >= (2 * S + 1) as f64);
    assert_eq!(
        value(&m, "roe_encoder_texts_total", &[]),
        value(&m, "roe_embedding_cache_misses_total", &[])
    );

    // The same expert again is a cache hit, not a load.
    let again = json!({"model": "sms_spam", "prompt": "hello", "max_tokens": 1}).to_string();
    assert_eq!(
        http_call(&http, "POST", "/v1/completions", Some(&again)).0,
        200
    );
    let m = scrape(&http);
    assert_eq!(value(&m, "roe_expert_loads_total", &[]), 1.0);
    assert_eq!(value(&m, "roe_expert_cache_hits_total", &[]), 1.0);
    // The scrapes count too: /metrics is an endpoint like the others.
    assert_eq!(
        value(&m, "roe_requests_total", &[("endpoint", "GET /metrics")]),
        1.0
    );
}

/// Ids like the README's (`org/task`) are reachable over HTTP as they are: the `/` needs no
/// `%2F` (though that works too).
#[tokio::test(flavor = "multi_thread")]
async fn ids_with_a_slash_are_reachable_without_escaping() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, grpc, http) = start_serve_http(&tmp.path().join("library"), &[]);
    let _server = KillOnDrop(child);
    let mut c = ExpertLibraryClient::connect(grpc).await.unwrap();
    c.register_expert(common::register_request(
        "org/task",
        "lora",
        &task("sms_spam"),
        8,
        false,
    ))
    .await
    .unwrap();
    for path in ["/v1/models/org/task", "/v1/models/org%2Ftask"] {
        let (status, body) = http_call(&http, "GET", path, None);
        assert_eq!(status, 200, "{path}: {body}");
        let model: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(model["id"], "org/task", "{path}: {model}");
    }
    for path in [
        "/v1/roe/experts/org/task",
        "/v1/roe/experts/org/task?include_instances=true",
    ] {
        let (status, body) = http_call(&http, "GET", path, None);
        assert_eq!(status, 200, "{path}: {body}");
        let got: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(got["expert"]["id"], "org/task", "{path}: {got}");
    }
    // A longer path is another id, missing: the handler's 404 for the model.
    let (status, body) = http_call(&http, "GET", "/v1/models/org/task/more", None);
    assert_eq!(status, 404, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
}

const ADMIN: &str = "http-test-admin-key-0000000001";
const READ: &str = "http-test-read-key-00000000001";

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_the_bound_on_requests_in_flight_hold_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = [
        "--admin-keys",
        ADMIN,
        "--read-keys",
        READ,
        "--max-concurrent-requests",
        "1",
    ];
    let (child, _grpc, http) = start_serve_http(&tmp.path().join("library"), &flags);
    let _server = KillOnDrop(child);
    let bearer = |key: &str| format!("Bearer {key}");

    // No key, a wrong key: 401 with OpenAI's error body; a read key reads.
    let (status, body) = http_call(&http, "GET", "/v1/models", None);
    assert_eq!(status, 401, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "authentication_error", "{e}");
    let wrong = bearer("not-a-key-of-this-server-0001");
    let (status, _) = http_call_with(
        &http,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", &wrong)],
    );
    assert_eq!(status, 401);
    let read = bearer(READ);
    let (status, body) = http_call_with(
        &http,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", &read)],
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_call_with(&http, "GET", "/v1/models", None, &[("api-key", READ)]);
    assert_eq!(status, 200);
    // Health, metrics and the API description are public.
    for path in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(http_call(&http, "GET", path, None).0, 200, "{path}");
    }

    // One request in flight at most: while a long stream holds the place, the next is 429.
    let stream = json!({"model": "base", "prompt": "Once upon a time", "max_tokens": 200,
                        "temperature": 0, "stream": true})
    .to_string();
    let (root, key) = (http.clone(), read.clone());
    let long = std::thread::spawn(move || loop {
        // Refused itself when it arrives during one of the probes below: again.
        let answered = http_call_with(
            &root,
            "POST",
            "/v1/completions",
            Some(&stream),
            &[("Authorization", &key)],
        );
        if answered.0 != 429 {
            return answered;
        }
    });
    let mut refused = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (status, body) = http_call_with(
            &http,
            "GET",
            "/v1/models",
            None,
            &[("Authorization", &read)],
        );
        if status == 429 {
            refused = Some(body);
            break;
        }
    }
    let refused = refused.expect("a request past the bound is refused while the stream runs");
    let e: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(e["error"]["code"], "too_many_requests", "{e}");
    let (status, events) = long.join().unwrap();
    assert_eq!(status, 200);
    assert!(events.trim_end().ends_with("data: [DONE]"));
    // The place is given back when the stream ends; health was never refused.
    let (status, _) = http_call_with(
        &http,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", &read)],
    );
    assert_eq!(status, 200);
}
