//! The split deployment: a real `roe serve --role router` process (library + router, sled)
//! and a real `roe serve --role inference` process (backbone, experts over gRPC from the
//! router) give the same answers as the single-process `roe serve`, and an unknown expert is
//! NOT_FOUND through the remote path too.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use roe_services::proto::{
    self, answerer_client::AnswererClient, expert_library_client::ExpertLibraryClient,
    inference_client::InferenceClient, router_client::RouterClient,
};
use roe_task_suite::{sample, Task};
use tonic::transport::Channel;
use tonic::Code;

use common::{models_dir, repo};

fn backbone_path() -> PathBuf {
    std::env::var_os("ROE_BACKBONE")
        .map(PathBuf::from)
        .unwrap_or_else(|| roe_cli::models::backbone_path(&models_dir()))
}

/// A `roe serve` child process, killed when dropped (also when an assertion fails).
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `roe serve <args>` in `cwd` on a free loopback port; call [`ready`] before using it.
fn spawn(args: &[&str], cwd: &Path) -> (Server, ChildStdout) {
    std::fs::create_dir_all(cwd).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .args(args)
        .arg("--models-dir")
        .arg(models_dir())
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env_remove("ROE_DATA_DIR")
        .env_remove("ROE_ROLE")
        .env_remove("ROE_LIBRARY_URL")
        .env("ROE_HTTP_ADDR", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("roe binary starts");
    let stdout = child.stdout.take().unwrap();
    (
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        },
        stdout,
    )
}

/// Waits for the "listening" line (printed once the models are loaded and the port bound).
fn ready(stdout: ChildStdout) {
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "unexpected first line {line:?}");
}

fn register(id: &str, kind: &str, task: &Task, new_version: bool) -> proto::RegisterExpertRequest {
    common::register_request(id, kind, task, 8, new_version)
}

async fn library(url: &str) -> ExpertLibraryClient<Channel> {
    ExpertLibraryClient::connect(url.to_string())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20)
}

async fn scores(
    c: &mut InferenceClient<Channel>,
    expert: &str,
    rows: &[String],
) -> Vec<proto::ScoreResponse> {
    let mut out = Vec::new();
    for input in rows {
        out.push(
            c.score(proto::ScoreRequest {
                min_library_seq: Default::default(),
                expert_id: expert.into(),
                input: input.clone(),
                choices: vec!["ham".into(), "spam".into()],
                truncate: false,
            })
            .await
            .unwrap_or_else(|s| panic!("score with {expert:?}: {s}"))
            .into_inner(),
        );
    }
    out
}

/// Largest log-prob difference; panics when the choices or the winners differ.
fn max_diff(a: &[proto::ScoreResponse], b: &[proto::ScoreResponse]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.best, x.best_by_mean), (y.best, y.best_by_mean));
        for (p, q) in x.choices.iter().zip(&y.choices) {
            assert_eq!((&p.choice, p.num_tokens), (&q.choice, q.num_tokens));
            worst = worst
                .max((p.sum_logprob - q.sum_logprob).abs())
                .max((p.mean_logprob - q.mean_logprob).abs());
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_inference_processes_answer_like_one_process() {
    assert!(
        backbone_path().exists(),
        "backbone GGUF not found at {} (run scripts/fetch-models.sh)",
        backbone_path().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    // The three processes load their models at the same time. Each runs in its own folder;
    // the inference process gets no --data-dir.
    let (router, router_out) = spawn(
        &["--role", "router", "--data-dir", "library"],
        &dir("router"),
    );
    let (inference, inference_out) = spawn(
        &["--role", "inference", "--library-url", &router.url],
        &dir("inference"),
    );
    let (single, single_out) = spawn(&["--data-dir", "library"], &dir("single"));
    for out in [router_out, inference_out, single_out] {
        ready(out);
    }
    assert!(dir("router").join("library").is_dir());
    assert_eq!(
        std::fs::read_dir(dir("inference")).unwrap().count(),
        0,
        "the inference process must not create a library"
    );

    let sms = Task::load(repo().join("assets/tasks/sms_spam")).unwrap();
    for url in [&router.url, &single.url] {
        let mut lib = library(url).await;
        lib.register_expert(register("sms_lora", "lora", &sms, false))
            .await
            .unwrap();
        lib.register_expert(register("sms_prompt", "prompt", &sms, false))
            .await
            .unwrap();
    }

    let rows: Vec<String> = sms.test.iter().take(4).map(|r| r.input.clone()).collect();
    let mut split_inf = InferenceClient::connect(inference.url.clone())
        .await
        .unwrap();
    let mut single_inf = InferenceClient::connect(single.url.clone()).await.unwrap();
    let mut by_expert = Vec::new();
    for expert in ["", "sms_lora", "sms_prompt"] {
        let split = scores(&mut split_inf, expert, &rows).await;
        let one = scores(&mut single_inf, expert, &rows).await;
        let d = max_diff(&split, &one);
        eprintln!("{expert:?}: split vs single process, max |log-prob difference| {d:e}");
        assert!(d < 1e-4, "{expert:?}: split and single differ by {d}");
        // A second call is served from the inference process's cache: same numbers.
        assert_eq!(
            max_diff(&scores(&mut split_inf, expert, &rows).await, &split),
            0.0
        );
        by_expert.push(split);
    }
    let changed = by_expert[0]
        .iter()
        .zip(&by_expert[1])
        .flat_map(|(bare, lora)| bare.choices.iter().zip(&lora.choices))
        .any(|(b, l)| (b.sum_logprob - l.sum_logprob).abs() > 0.1);
    assert!(
        changed,
        "the LoRA did not change the scores: was it applied?"
    );

    // Unknown experts: the same status through the remote path as in one process.
    let missing = |c: &mut InferenceClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.score(proto::ScoreRequest {
                min_library_seq: Default::default(),
                expert_id: "nope".into(),
                input: "hello".into(),
                choices: vec!["a".into()],
                truncate: false,
            })
            .await
            .unwrap_err()
        }
    };
    let (split_err, single_err) = (
        missing(&mut split_inf).await,
        missing(&mut single_inf).await,
    );
    assert_eq!(split_err.code(), Code::NotFound, "{split_err}");
    assert_eq!(
        (split_err.code(), split_err.message()),
        (single_err.code(), single_err.message())
    );

    // The Answerer of the inference process routes through the router process.
    let answer_queries: Vec<proto::Query> = sample(&sms.test, 6, 2)
        .into_iter()
        .map(|i| proto::Query {
            input: i.input,
            choices: i.choices,
            target: None,
        })
        .collect();
    let answer = |url: String| {
        let queries = answer_queries.clone();
        async move {
            AnswererClient::connect(url)
                .await
                .unwrap()
                .answer(proto::AnswerRequest {
                    queries,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let (a_split, a_single) = (
        answer(inference.url.clone()).await,
        answer(single.url.clone()).await,
    );
    assert_eq!(a_split.expert_id, a_single.expert_id);
    assert!(
        a_split.expert_id.starts_with("sms_"),
        "{}",
        a_split.expert_id
    );
    assert_eq!(a_split.answers, a_single.answers);

    // Each process serves only its part.
    let e = library(&inference.url)
        .await
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e}");
    let e = InferenceClient::connect(router.url.clone())
        .await
        .unwrap()
        .score(proto::ScoreRequest {
            min_library_seq: Default::default(),
            expert_id: String::new(),
            input: "hello".into(),
            choices: vec!["a".into()],
            truncate: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e}");
    let routed = RouterClient::connect(router.url.clone())
        .await
        .unwrap()
        .route(proto::RouteRequest {
            min_library_seq: Default::default(),
            queries: vec![proto::Query {
                input: rows[0].clone(),
                choices: vec![],
                target: None,
            }],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(routed.expert_id.starts_with("sms_"), "{}", routed.expert_id);

    // A new version registered in the router process is used by the inference process at
    // once (its cache is keyed by version and digest): sms_lora now holds the prompt.
    let mut lib = library(&router.url).await;
    lib.register_expert(register("sms_lora", "prompt", &sms, true))
        .await
        .unwrap();
    let now = scores(&mut split_inf, "sms_lora", &rows).await;
    assert!(max_diff(&now, &by_expert[2]) < 1e-4);
    // And a deleted one is gone.
    lib.delete_expert(proto::DeleteExpertRequest {
        expected_version: Default::default(),
        id: "sms_lora".into(),
    })
    .await
    .unwrap();
    let e = missing(&mut split_inf).await;
    assert_eq!(e.code(), Code::NotFound);
    let e = split_inf
        .score(proto::ScoreRequest {
            min_library_seq: Default::default(),
            expert_id: "sms_lora".into(),
            input: "hello".into(),
            choices: vec!["a".into()],
            truncate: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    drop((inference, router, single));
}

#[test]
fn inference_role_needs_a_library_url() {
    let out = Command::new(env!("CARGO_BIN_EXE_roe"))
        .args(["serve", "--role", "inference", "--addr", "127.0.0.1:0"])
        .env_remove("ROE_LIBRARY_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--library-url"), "{err}");
}
