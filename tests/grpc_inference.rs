//! The Inference service end to end: a real server on 127.0.0.1 with the real backbone and the
//! real sms_spam prompt and LoRA experts.

use roe_services::proto::{self, inference_client::InferenceClient};
use roe_tests::{register_request, task, TestServer};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tonic::transport::Channel;

use roe_expert_library::expert::BackboneSpec;
use roe_expert_library::library::LibraryConfig;
use tonic::Code;

const PROMPT: &str = "sms_spam_prompt";
const LORA: &str = "sms_spam_lora";

fn choices() -> Vec<String> {
    vec!["ham".to_string(), "spam".to_string()]
}

/// A balanced handful of sms_spam test rows: (input, index of the right choice).
fn rows(per_label: usize) -> Vec<(String, u32)> {
    let t = task("sms_spam");
    let mut out = Vec::new();
    for (label, idx) in [("ham", 0u32), ("spam", 1u32)] {
        out.extend(
            t.test
                .iter()
                .filter(|r| r.target.as_deref() == Some(label))
                .take(per_label)
                .map(|r| (r.input.clone(), idx)),
        );
    }
    out
}

async fn start() -> TestServer {
    let server = TestServer::start_with_inference().await;
    let mut lib = server.library().await;
    lib.register_expert(register_request(PROMPT, "prompt", "sms_spam", 8))
        .await
        .expect("register prompt");
    lib.register_expert(register_request(LORA, "lora", "sms_spam", 8))
        .await
        .expect("register lora");
    server
}

async fn score(
    c: &mut InferenceClient<Channel>,
    expert: &str,
    input: &str,
) -> Result<proto::ScoreResponse, tonic::Status> {
    c.score(proto::ScoreRequest {
        expert_id: expert.to_string(),
        input: input.to_string(),
        choices: choices(),
        truncate: false,
        min_library_seq: 0,
    })
    .await
    .map(|r| r.into_inner())
}

fn close(a: &proto::ScoreResponse, b: &proto::ScoreResponse) -> bool {
    a.best == b.best
        && a.choices.len() == b.choices.len()
        && a.choices.iter().zip(&b.choices).all(|(x, y)| {
            x.choice == y.choice
                && x.num_tokens == y.num_tokens
                && (x.sum_logprob - y.sum_logprob).abs() < 1e-3
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_beat_bare_and_batching_matches_sequential() {
    let server = start().await;
    let mut c = server.inference().await;
    let rows = rows(5);
    let experts = ["", PROMPT, LORA];

    // One at a time.
    let mut sequential = Vec::new();
    let mut right = [0usize; 3];
    for (input, want) in &rows {
        for (k, e) in experts.iter().enumerate() {
            let r = score(&mut c, e, input).await.expect("score");
            assert_eq!(r.expert_id, *e);
            assert_eq!(r.choices.len(), 2);
            assert_eq!(r.choices[0].choice, "ham");
            assert!(r
                .choices
                .iter()
                .all(|s| s.sum_logprob.is_finite() && s.sum_logprob < 0.0 && s.num_tokens > 0));
            right[k] += (r.best == *want) as usize;
            sequential.push(r);
        }
    }
    println!(
        "right of {}: bare {}, prompt {}, lora {}",
        rows.len(),
        right[0],
        right[1],
        right[2]
    );
    for k in 1..3 {
        assert!(
            right[k] >= right[0] + 2 && right[k] * 10 >= rows.len() * 7,
            "expert {} right on {} of {} rows, bare on {}",
            experts[k],
            right[k],
            rows.len(),
            right[0]
        );
    }

    // All at once: requests for different experts (and bare) share batches.
    let mut tasks = Vec::new();
    for (input, _) in &rows {
        for e in experts {
            let mut c = c.clone();
            let input = input.clone();
            tasks.push(tokio::spawn(async move {
                score(&mut c, e, &input).await.expect("concurrent score")
            }));
        }
    }
    let stats = server.inference.as_ref().unwrap().stats();
    let batches_before = stats.score_batches.load(Relaxed);
    // The sequential pass loaded each of the two experts once; from then on they are cached.
    let loads_before = stats.expert_loads.load(Relaxed);
    assert_eq!(loads_before, 2, "each expert is loaded once");
    assert!(stats.expert_load_micros.load(Relaxed) > 0);
    for (t, seq) in tasks.into_iter().zip(&sequential) {
        let conc = t.await.unwrap();
        assert!(
            close(&conc, seq),
            "concurrent {conc:?} != sequential {seq:?}"
        );
    }
    assert_eq!(
        stats.expert_loads.load(Relaxed),
        loads_before,
        "cached experts were loaded again"
    );
    let batches = stats.score_batches.load(Relaxed) - batches_before;
    println!(
        "{} concurrent requests ran in {batches} batches (largest {})",
        rows.len() * experts.len(),
        stats.max_score_batch.load(Relaxed)
    );
    assert!(
        stats.max_score_batch.load(Relaxed) > 1,
        "concurrent requests were never batched"
    );
    server.stop().await;
}

async fn generate(
    c: &mut InferenceClient<Channel>,
    req: proto::GenerateRequest,
) -> Result<Vec<proto::GenerateResponse>, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_and_stops() {
    let server = start().await;
    let mut c = server.inference().await;
    let input = "List the numbers from 1 to 100.".to_string();

    // Length limit, greedy: exactly max_new_tokens messages, the last says "length".
    let msgs = generate(
        &mut c,
        proto::GenerateRequest {
            input: input.clone(),
            max_new_tokens: 6,
            ..Default::default()
        },
    )
    .await
    .expect("generate");
    assert!(!msgs.is_empty() && msgs.len() <= 6, "{msgs:?}");
    let last = msgs.last().unwrap();
    assert!(
        ["length", "eos", "stop"].contains(&last.finish_reason.as_str()),
        "{last:?}"
    );
    assert_eq!(msgs.len(), 6, "{msgs:?}");
    assert_eq!(last.finish_reason, "length");
    assert!(msgs[..msgs.len() - 1]
        .iter()
        .all(|m| m.finish_reason.is_empty()));
    assert!(msgs
        .iter()
        .all(|m| m.logprob <= 0.0 && m.logprob.is_finite()));
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();

    // Greedy is deterministic; a longer run starts with the same text.
    let longer = generate(
        &mut c,
        proto::GenerateRequest {
            input: input.clone(),
            max_new_tokens: 12,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let longer_text: String = longer.iter().map(|m| m.text.as_str()).collect();
    assert!(longer.len() <= 12);
    if last.finish_reason == "length" {
        assert!(
            longer_text.starts_with(&text),
            "{longer_text:?} vs {text:?}"
        );
    }

    // A stop string taken from the greedy text cuts the text before it.
    {
        let word = longer_text
            .split_whitespace()
            .nth(1)
            .filter(|w| w.len() >= 2)
            .expect("a word to stop at");
        let stopped = generate(
            &mut c,
            proto::GenerateRequest {
                input: input.clone(),
                max_new_tokens: 12,
                stop: vec![word.to_string()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let stopped_text: String = stopped.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(stopped.last().unwrap().finish_reason, "stop", "{stopped:?}");
        assert!(
            !stopped_text.contains(word),
            "{stopped_text:?} contains {word:?}"
        );
        assert!(longer_text.starts_with(&stopped_text));
        assert!(stopped.len() < longer.len());
    }

    // Seeded sampling with an expert is reproducible.
    let sampled = |seed| proto::GenerateRequest {
        expert_id: LORA.to_string(),
        input: "Free entry! Text WIN to 80085 to claim your prize".to_string(),
        max_new_tokens: 5,
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(seed),
        ..Default::default()
    };
    let a = generate(&mut c, sampled(7)).await.unwrap();
    let b = generate(&mut c, sampled(7)).await.unwrap();
    assert_eq!(a, b);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    let server = start().await;
    let mut c = server.inference().await;
    let ok = || proto::ScoreRequest {
        expert_id: PROMPT.to_string(),
        input: "hello".to_string(),
        choices: choices(),
        truncate: false,
        min_library_seq: 0,
    };
    let cases: Vec<(proto::ScoreRequest, Code, &str)> = vec![
        (
            proto::ScoreRequest {
                expert_id: "no_such_expert".into(),
                ..ok()
            },
            Code::NotFound,
            "no_such_expert",
        ),
        (
            proto::ScoreRequest {
                input: String::new(),
                ..ok()
            },
            Code::InvalidArgument,
            "input",
        ),
        (
            proto::ScoreRequest {
                choices: vec![],
                ..ok()
            },
            Code::InvalidArgument,
            "choices",
        ),
        (
            proto::ScoreRequest {
                choices: (0..65).map(|i| i.to_string()).collect(),
                ..ok()
            },
            Code::InvalidArgument,
            "choices",
        ),
        (
            proto::ScoreRequest {
                input: "x".repeat(70_000),
                ..ok()
            },
            Code::ResourceExhausted,
            "input",
        ),
    ];
    for (req, code, needle) in cases {
        let err = c.score(req).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }

    let gen_ok = || proto::GenerateRequest {
        expert_id: LORA.to_string(),
        input: "hello".to_string(),
        max_new_tokens: 2,
        ..Default::default()
    };
    let cases: Vec<(proto::GenerateRequest, Code, &str)> = vec![
        (
            proto::GenerateRequest {
                expert_id: "missing".into(),
                ..gen_ok()
            },
            Code::NotFound,
            "missing",
        ),
        (
            proto::GenerateRequest {
                input: " ".into(),
                ..gen_ok()
            },
            Code::InvalidArgument,
            "input",
        ),
        (
            proto::GenerateRequest {
                temperature: -0.5,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            proto::GenerateRequest {
                temperature: 5.5,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            proto::GenerateRequest {
                temperature: f32::NAN,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            proto::GenerateRequest {
                top_p: 1.5,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            proto::GenerateRequest {
                top_p: -0.1,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            proto::GenerateRequest {
                max_new_tokens: 513,
                ..gen_ok()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            proto::GenerateRequest {
                stop: vec![String::new()],
                ..gen_ok()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            proto::GenerateRequest {
                input: "y".repeat(70_000),
                ..gen_ok()
            },
            Code::ResourceExhausted,
            "input",
        ),
    ];
    for (req, code, needle) in cases {
        let err = generate(&mut c, req).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }

    // The server still works afterwards.
    let r = c.score(ok()).await.expect("still serving").into_inner();
    assert_eq!(r.choices.len(), 2);

    // Health reports the Inference service.
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "roe.v1.Inference".into(),
        })
        .await
        .expect("health of roe.v1.Inference")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

/// Concurrent Generate requests for different experts share decode steps (one batch) and
/// each streams what it streams alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_share_batches_and_match_one_at_a_time() {
    let server = start().await;
    let mut c = server.inference().await;
    let reqs: Vec<proto::GenerateRequest> = [
        (
            PROMPT,
            "Free entry! Text WIN to 80085 to claim your prize",
            6,
            0.0,
        ),
        (LORA, "are we still on for lunch?", 8, 0.0),
        (
            "",
            "The capital of France is Paris. The capital of Germany is",
            10,
            0.0,
        ),
        (LORA, "URGENT! Your mobile number has won a prize", 7, 0.9),
    ]
    .into_iter()
    .map(|(expert, input, n, temperature)| proto::GenerateRequest {
        expert_id: expert.to_string(),
        input: input.to_string(),
        max_new_tokens: n,
        temperature,
        seed: Some(3),
        ..Default::default()
    })
    .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(generate(&mut c, r.clone()).await.expect("generate alone"));
    }
    let stats = server.inference.as_ref().unwrap().stats();
    let batches_before = stats.generate_batches.load(Relaxed);
    let mut tasks = Vec::new();
    for r in reqs.clone() {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { generate(&mut c, r).await }));
    }
    for (t, a) in tasks.into_iter().zip(&alone) {
        let together = t.await.unwrap().expect("concurrent generate");
        let ids = |m: &[proto::GenerateResponse]| m.iter().map(|m| m.token_id).collect::<Vec<_>>();
        assert_eq!(ids(&together), ids(a));
        let text =
            |m: &[proto::GenerateResponse]| m.iter().map(|m| m.text.clone()).collect::<String>();
        assert_eq!(text(&together), text(a));
        assert_eq!(
            together.last().map(|m| m.finish_reason.clone()),
            a.last().map(|m| m.finish_reason.clone())
        );
    }
    let batches = stats.generate_batches.load(Relaxed) - batches_before;
    println!(
        "{} concurrent generations ran in {batches} batches (largest {})",
        reqs.len(),
        stats.max_generate_batch.load(Relaxed)
    );
    assert!(
        stats.max_generate_batch.load(Relaxed) > 1,
        "concurrent generations never shared a batch"
    );
    assert_eq!(stats.active_generations.load(Relaxed), 0);
    server.stop().await;
}

/// Continuous batching: a Generate request arriving while a long generation runs joins its
/// batch (no batch of its own), streams what it streams alone, and its stream ends with its
/// last token, while the long one goes on unchanged. With joining off it runs beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_arriving_mid_batch_joins_it_and_ends_with_its_last_token() {
    let server = start().await;
    let mut c = server.inference().await;
    let long = proto::GenerateRequest {
        input: "List the numbers from 1 to 100.".into(),
        max_new_tokens: 80,
        ..Default::default()
    };
    let short = proto::GenerateRequest {
        expert_id: LORA.into(),
        input: "are we still on for lunch?".into(),
        max_new_tokens: 8,
        temperature: 0.7,
        seed: Some(5),
        ..Default::default()
    };
    let long_alone = generate(&mut c, long.clone()).await.unwrap();
    let short_alone = generate(&mut c, short.clone()).await.unwrap();
    assert_eq!(
        long_alone.len(),
        80,
        "the long request must run to its limit"
    );
    let stats = server.inference.as_ref().unwrap().stats();
    let service = server.inference.as_ref().unwrap();
    for join in [true, false] {
        service.set_join_running_generations(join);
        let (batches, joined) = (
            stats.generate_batches.load(Relaxed),
            stats.generate_joined.load(Relaxed),
        );
        let mut stream = c.generate(long.clone()).await.unwrap().into_inner();
        let mut long_msgs = Vec::new();
        for _ in 0..2 {
            long_msgs.push(stream.message().await.unwrap().expect("a token"));
        }
        let short_msgs = generate(&mut c, short.clone()).await.unwrap();
        // The short stream has ended; the long generation is still going.
        assert_eq!(
            stats.active_generations.load(Relaxed),
            1,
            "join {join}: the short stream must end with its own last token"
        );
        while let Some(m) = stream.message().await.unwrap() {
            long_msgs.push(m);
        }
        let ids = |m: &[proto::GenerateResponse]| m.iter().map(|m| m.token_id).collect::<Vec<_>>();
        assert_eq!(ids(&short_msgs), ids(&short_alone), "join {join}");
        assert_eq!(ids(&long_msgs), ids(&long_alone), "join {join}");
        let (batches, joined) = (
            stats.generate_batches.load(Relaxed) - batches,
            stats.generate_joined.load(Relaxed) - joined,
        );
        if join {
            assert_eq!(
                (batches, joined),
                (1, 1),
                "the short request joins the running batch"
            );
        } else {
            assert_eq!(
                (batches, joined),
                (2, 0),
                "with joining off it runs beside it"
            );
        }
    }
    assert_eq!(stats.active_generations.load(Relaxed), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_stops_when_the_client_goes_away() {
    let server = start().await;
    let mut c = server.inference().await;
    // Greedy: this input gets a long answer (no EOS within the first 40 tokens).
    let mut stream = c
        .generate(proto::GenerateRequest {
            input: "List the numbers from 1 to 100.".into(),
            max_new_tokens: 512,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        let m = stream.message().await.unwrap().expect("a token");
        assert!(m.finish_reason.is_empty(), "{m:?}");
    }
    let stats = server.inference.as_ref().unwrap().stats();
    let before = stats.generated_tokens.load(Relaxed);
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.active_generations.load(Relaxed) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let produced = stats.generated_tokens.load(Relaxed) - before;
    println!("{produced} more tokens after the client left");
    assert!(
        produced < 200,
        "{produced} tokens produced for a dropped stream"
    );
    server.stop().await;
}

fn tiny_prompt() -> Vec<u8> {
    let data: Vec<u8> = std::iter::repeat_n(0.1f32.to_le_bytes(), 4 * 8)
        .flatten()
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 8], &data).unwrap();
    safetensors::serialize([("prompt_embeddings", view)], None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_of_another_backbone_fail_precondition() {
    let tiny = BackboneSpec::new(
        "tiny",
        roe_expert_library::expert::ModelShape {
            hidden_size: 8,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            intermediate_size: 16,
            vocab_size: 32,
        },
    );
    let config = LibraryConfig {
        backbones: vec![BackboneSpec::smollm2_135m(), tiny],
        ..Default::default()
    };
    let server = TestServer::start_with_inference_config(config).await;
    let mut lib = server.library().await;
    let mut req = register_request("tiny_expert", "prompt", "sms_spam", 4);
    req.backbone = "tiny".into();
    req.adapter = Some(proto::PeftAdapter {
        adapter_config_json:
            r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":4,"token_dim":8}"#.into(),
        adapter_model_safetensors: tiny_prompt(),
    });
    lib.register_expert(req)
        .await
        .expect("register tiny expert");
    let mut c = server.inference().await;
    let err = score(&mut c, "tiny_expert", "hello").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("tiny"), "{err:?}");
    let err = generate(
        &mut c,
        proto::GenerateRequest {
            expert_id: "tiny_expert".into(),
            input: "hello".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    server.stop().await;
}

/// Score ends every answer with `<|im_start|>` (id 1), the token the reference experts were
/// trained to end answers with, not the canonical rendering's EOS (id 2): the service's log-
/// probs equal the backbone's with id 1 and differ from those with id 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_ends_answers_with_the_experts_end_token() {
    let server = start().await;
    let mut c = server.inference().await;
    let bb = roe_tests::backbone();
    assert_eq!(roe_serving::answer_end_id(&bb), 1);
    let input = "URGENT! You have won a 1 week FREE membership";
    let served = score(&mut c, "", input).await.expect("score");
    let choices = choices();
    let direct = |end: u32| {
        bb.score_batch_with(
            &[roe_backbone::ScoreRequest {
                input,
                choices: &choices,
                adapters: Default::default(),
            }],
            &roe_backbone::RenderOptions {
                eos_id: Some(end),
                ..Default::default()
            },
        )
        .expect("direct score")
        .remove(0)
    };
    let (with_1, with_2) = (direct(1), direct(2));
    for (i, s) in served.choices.iter().enumerate() {
        assert!((s.sum_logprob - with_1.choices[i].sum_logprob).abs() < 1e-3);
        assert!((s.sum_logprob - with_2.choices[i].sum_logprob).abs() > 1e-2);
    }
}
