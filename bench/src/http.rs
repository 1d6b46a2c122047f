//! HTTP completions against gRPC Generate for the same requests, in the same run, on one
//! real `roe serve` (the `roe` binary beside `roe-bench`): bench/results/http.{md,json}.
//!
//! One LoRA expert; the same prompts (test rows), greedy, the same number of tokens. The
//! calls alternate — gRPC Generate (its stream read to the end), HTTP `/v1/completions`
//! whole, HTTP `/v1/completions` streamed (SSE read to `[DONE]`) — one at a time, so each
//! transport meets the same machine; each keeps one connection (HTTP/2 for gRPC, HTTP/1.1
//! keep-alive for HTTP, through hyper's client). The texts must agree: the same work.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, inference_client::InferenceClient,
};
use roe_task_suite::{sample, Task};
use serde_json::{json, Value};

use crate::percentile;

pub struct HttpBenchInput<'a> {
    pub exe: PathBuf,
    pub models_dir: &'a Path,
    pub tasks_dir: &'a Path,
    pub experts_dir: &'a Path,
    pub task: String,
    pub rounds: usize,
    pub max_tokens: u32,
    pub out: &'a Path,
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `roe serve` with both servers on ports the kernel picks: (child, gRPC URL, HTTP root).
fn start(exe: &Path, data: &Path, models: &Path) -> Result<(Child, String, String)> {
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let child = Child(child);
    let mut read = |prefix: &str| -> Result<String> {
        let mut line = String::new();
        out.read_line(&mut line)?;
        match line.trim().strip_prefix(prefix) {
            Some(addr) => Ok(format!("http://{addr}")),
            None => bail!("roe serve printed {line:?}, expected {prefix:?}"),
        }
    };
    let grpc = read("roe listening on ")?;
    let http = read("roe HTTP listening on ")?;
    Ok((child, grpc, http))
}

#[derive(Default)]
struct Series {
    millis: Vec<f64>,
}

impl Series {
    fn summary(&self) -> Value {
        let mut v = self.millis.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        json!({
            "n": v.len(),
            "p50_ms": percentile(&v, 0.5),
            "p90_ms": percentile(&v, 0.9),
            "mean_ms": v.iter().sum::<f64>() / v.len().max(1) as f64,
        })
    }
    fn p50(&self) -> f64 {
        let mut v = self.millis.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    }
}

pub async fn run(input: HttpBenchInput<'_>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_child, grpc_url, http_root) =
        start(&input.exe, &tmp.path().join("library"), input.models_dir)?;
    let task = Task::load(input.tasks_dir.join(&input.task))?;
    let dir = input.experts_dir.join("lora").join(&input.task);
    let mut library = ExpertLibraryClient::connect(grpc_url.clone()).await?;
    library
        .register_expert(proto::RegisterExpertRequest {
            id: input.task.clone(),
            name: input.task.clone(),
            adapter: Some(proto::PeftAdapter {
                adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json"))?,
                adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))?,
            }),
            instances: sample(&task.train, 16, 0)
                .into_iter()
                .map(|i| proto::Instance {
                    input: i.input,
                    target: i.target,
                    choices: i.choices,
                })
                .collect(),
            ..Default::default()
        })
        .await?;
    let prompts: Vec<String> = task.test.iter().take(20).map(|i| i.input.clone()).collect();
    let inference = InferenceClient::connect(grpc_url.clone()).await?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("{http_root}/v1/completions").parse()?;

    let grpc = |prompt: String| {
        let mut inference = inference.clone();
        let expert = input.task.clone();
        async move {
            let mut stream = inference
                .generate(proto::GenerateRequest {
                    expert_id: expert,
                    input: prompt,
                    max_new_tokens: input.max_tokens,
                    temperature: 0.0,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let (mut text, mut tokens) = (String::new(), 0);
            while let Some(t) = stream.message().await? {
                text.push_str(&t.text);
                tokens += 1;
            }
            Ok::<_, anyhow::Error>((text, tokens))
        }
    };
    let http = |prompt: String, stream: bool| {
        let client = client.clone();
        let url = url.clone();
        let body = json!({
            "model": input.task, "prompt": prompt, "max_tokens": input.max_tokens,
            "temperature": 0, "stream": stream,
        })
        .to_string();
        async move {
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let res = client.request(req).await?;
            let status = res.status();
            let bytes = res.into_body().collect().await?.to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if !status.is_success() {
                bail!("HTTP {status}: {text}");
            }
            if !stream {
                let v: Value = serde_json::from_str(&text)?;
                let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                return Ok((
                    v["choices"][0]["text"].as_str().unwrap_or("").to_string(),
                    tokens,
                ));
            }
            let (mut out, mut tokens) = (String::new(), 0);
            for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    break;
                }
                let v: Value = serde_json::from_str(data)?;
                out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                tokens += 1;
            }
            Ok((out, tokens))
        }
    };

    // Warm-up: the expert's load and the first allocations are not the transports'.
    for p in prompts.iter().take(2) {
        grpc(p.clone()).await?;
        http(p.clone(), false).await?;
        http(p.clone(), true).await?;
    }
    let (mut g, mut h, mut s) = (Series::default(), Series::default(), Series::default());
    let mut tokens = 0u64;
    for round in 0..input.rounds {
        let prompt = prompts[round % prompts.len()].clone();
        // The order rotates, so that none is always first after the previous round.
        let mut texts = Vec::with_capacity(3);
        for k in 0..3 {
            let which = (round + k) % 3;
            let t = Instant::now();
            let (text, n) = match which {
                0 => grpc(prompt.clone()).await?,
                1 => http(prompt.clone(), false).await?,
                _ => http(prompt.clone(), true).await?,
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            [&mut g, &mut h, &mut s][which].millis.push(ms);
            if which == 0 {
                tokens += n;
            }
            texts.push((which, text));
        }
        texts.sort_by_key(|(w, _)| *w);
        if !(texts[0].1 == texts[1].1 && texts[1].1 == texts[2].1) {
            bail!("the transports answered differently for {prompt:?}: {texts:?}");
        }
    }
    let ratio = |x: &Series| x.p50() / g.p50();
    let results = json!({
        "task": input.task,
        "rounds": input.rounds,
        "max_tokens": input.max_tokens,
        "mean_tokens": tokens as f64 / input.rounds.max(1) as f64,
        "grpc_generate": g.summary(),
        "http_completions": h.summary(),
        "http_completions_stream": s.summary(),
        "p50_ratio_http": ratio(&h),
        "p50_ratio_http_stream": ratio(&s),
        "goal_p50_ratio": 1.05,
    });
    let row = |name: &str, x: &Series| {
        let v = x.summary();
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.3} |\n",
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p90_ms"].as_f64().unwrap_or(0.0),
            v["mean_ms"].as_f64().unwrap_or(0.0),
            x.p50() / g.p50()
        )
    };
    let md = format!(
        "# HTTP completions against gRPC Generate\n\n\
         `roe bench http`: one `roe serve`, the LoRA expert `{task}`, the first 20 test rows as \
         prompts, greedy, at most {max} tokens (mean {mean:.1} generated), {rounds} rounds of \
         the three calls one at a time in rotating order; every round's three texts are \
         equal. Each transport keeps one connection (gRPC: HTTP/2; HTTP: HTTP/1.1 keep-alive \
         through hyper's client).\n\n\
         | call | p50 ms | p90 ms | mean ms | p50 / gRPC |\n|---|---|---|---|---|\n{}{}{}\n\
         Goal: HTTP completions at most 5% above gRPC Generate at p50.\n",
        row("gRPC Generate (stream read to the end)", &g),
        row("HTTP /v1/completions", &h),
        row("HTTP /v1/completions, stream: true", &s),
        task = input.task,
        max = input.max_tokens,
        mean = tokens as f64 / input.rounds.max(1) as f64,
        rounds = input.rounds,
    );
    crate::write_results(input.out, "http", &results, &md)?;
    println!("{md}");
    Ok(())
}
