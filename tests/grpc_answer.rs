//! Route-and-answer (`roe.v1.Answerer`) and prompt ensembles (`Inference/ScoreEnsemble`) end
//! to end: real servers on 127.0.0.1, the real backbone and encoder, real prompt experts of
//! the bundled tasks registered with instances from their train splits.

use std::sync::atomic::Ordering::Relaxed;

use roe_services::proto::{self, inference_client::InferenceClient};
use roe_tests::{queries, register_request, task, TestServer};
use tonic::transport::Channel;
use tonic::Code;

/// Prompt experts registered as `<task>` (S=30): three classification tasks and one
/// generation task, which the router tells apart with 8 queries.
const TASKS: [&str; 4] = ["sms_spam", "movie_sentiment", "strategyqa", "reddit_qa"];

async fn library_of_four() -> TestServer {
    library_of_four_on(TestServer::start_with_inference().await).await
}

async fn library_of_four_on(server: TestServer) -> TestServer {
    let mut lib = server.library().await;
    for t in TASKS {
        lib.register_expert(register_request(t, "prompt", t, 30))
            .await
            .unwrap_or_else(|e| panic!("register {t}: {e:?}"));
    }
    server
}

/// `n` test rows of a classification task as answer inputs (with the task's labels).
fn inputs_of(task_name: &str, n: usize, seed: u64) -> Vec<proto::AnswerInput> {
    queries(&task(task_name), n, seed)
        .into_iter()
        .map(|q| proto::AnswerInput {
            input: q.input,
            choices: q.choices,
        })
        .collect()
}

async fn score(
    c: &mut InferenceClient<Channel>,
    expert: &str,
    input: &str,
    choices: &[String],
) -> proto::ScoreResponse {
    c.score(proto::ScoreRequest {
        expert_id: expert.to_string(),
        input: input.to_string(),
        choices: choices.to_vec(),
        truncate: false,
        min_library_seq: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("score with {expert:?}: {e:?}"))
    .into_inner()
}

/// Same choices and picks, log-probs within batching noise (padding changes ~1e-4).
fn close(a: &proto::ScoreResponse, b: &proto::ScoreResponse) -> bool {
    a.best == b.best
        && a.expert_id == b.expert_id
        && a.choices.len() == b.choices.len()
        && a.choices.iter().zip(&b.choices).all(|(x, y)| {
            x.choice == y.choice
                && x.num_tokens == y.num_tokens
                && (x.sum_logprob - y.sum_logprob).abs() < 1e-3
        })
}

fn scored(a: &proto::Answer) -> &proto::ScoreResponse {
    match &a.kind {
        Some(proto::answer::Kind::Score(s)) => s,
        other => panic!("expected a score answer, got {other:?}"),
    }
}

/// Every answer equals a direct Score call with `expert` on the same input.
async fn assert_answers_match_direct_scores(
    server: &TestServer,
    expert: &str,
    inputs: &[proto::AnswerInput],
    answers: &[proto::Answer],
) {
    let mut c = server.inference().await;
    assert_eq!(answers.len(), inputs.len());
    for (inp, ans) in inputs.iter().zip(answers) {
        let direct = score(&mut c, expert, &inp.input, &inp.choices).await;
        let got = scored(ans);
        assert!(close(got, &direct), "answer {got:?} != Score {direct:?}");
    }
}

async fn answer(
    server: &TestServer,
    req: proto::AnswerRequest,
) -> Result<proto::AnswerResponse, tonic::Status> {
    server
        .answerer()
        .await
        .answer(req)
        .await
        .map(|r| r.into_inner())
}

/// Queries of two unrelated tasks, routed by the paper's top-1 vote: no expert gets 90% of
/// the votes, so routing abstains.
fn abstaining(inputs: Vec<proto::AnswerInput>) -> proto::AnswerRequest {
    let mut q = queries(&task("sms_spam"), 4, 3);
    q.extend(queries(&task("strategyqa"), 4, 3));
    proto::AnswerRequest {
        queries: q,
        inputs,
        route: Some(proto::RouteOptions {
            strategy: proto::Strategy::Elm as i32,
            abstain_threshold: Some(0.9),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_the_routed_expert_in_one_batch() {
    let server = library_of_four().await;
    let stats = server.inference.as_ref().unwrap().stats();

    // Queries of the task plus other inputs of it to answer.
    let inputs = inputs_of("sms_spam", 4, 11);
    let batches = stats.score_batches.load(Relaxed);
    let requests = stats.scored_requests.load(Relaxed);
    let r = answer(
        &server,
        proto::AnswerRequest {
            queries: queries(&task("sms_spam"), 8, 1),
            inputs: inputs.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("answer");
    // The four inputs ran as one scheduler batch.
    assert_eq!(stats.score_batches.load(Relaxed) - batches, 1);
    assert_eq!(stats.scored_requests.load(Relaxed) - requests, 4);
    let routing = r.routing.as_ref().expect("routing evidence");
    assert_eq!(routing.expert_id, "sms_spam", "{:?}", routing.ranked);
    assert!(!routing.abstain);
    assert_eq!(routing.evidence.len(), 8);
    assert_eq!(routing.ranked.len(), TASKS.len());
    assert_eq!(r.expert_id, "sms_spam");
    assert!(!r.fell_back && r.fallback_reason.is_empty(), "{r:?}");
    assert_answers_match_direct_scores(&server, "sms_spam", &inputs, &r.answers).await;

    // Only queries: their own inputs (and choices) are answered.
    let q = queries(&task("strategyqa"), 4, 2);
    let r = answer(
        &server,
        proto::AnswerRequest {
            queries: q.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("answer the queries");
    assert_eq!(r.expert_id, "strategyqa");
    assert_eq!(r.routing.as_ref().unwrap().evidence.len(), 4);
    let as_inputs: Vec<proto::AnswerInput> = q
        .into_iter()
        .map(|q| proto::AnswerInput {
            input: q.input,
            choices: q.choices,
        })
        .collect();
    assert_answers_match_direct_scores(&server, "strategyqa", &as_inputs, &r.answers).await;

    // Only inputs: they are the queries too.
    let inputs = inputs_of("movie_sentiment", 8, 5);
    let r = answer(
        &server,
        proto::AnswerRequest {
            inputs: inputs.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("answer the inputs");
    assert_eq!(r.expert_id, "movie_sentiment", "{:?}", r.routing);
    assert_eq!(r.routing.as_ref().unwrap().evidence.len(), 8);
    assert_eq!(r.answers.len(), 8);
    assert_answers_match_direct_scores(&server, "movie_sentiment", &inputs[..3], &r.answers[..3])
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abstaining_falls_back_to_the_bare_backbone() {
    let server = library_of_four().await;
    let inputs = inputs_of("sms_spam", 3, 4);
    let r = answer(&server, abstaining(inputs.clone()))
        .await
        .expect("answer");
    let routing = r.routing.as_ref().unwrap();
    assert!(routing.abstain, "{routing:?}");
    assert!(routing.expert_id.is_empty());
    assert!(r.fell_back);
    assert_eq!(r.expert_id, "", "the bare backbone answers");
    let top = &routing.ranked[0];
    assert!(top.share < 0.9);
    assert_eq!(
        r.fallback_reason,
        format!(
            "abstain: winner share {:.2} < 0.90 ({})",
            top.share, top.expert_id
        )
    );
    assert_answers_match_direct_scores(&server, "", &inputs, &r.answers).await;

    // The same queries without the threshold (the server's default: never abstain) route.
    let mut req = abstaining(inputs);
    req.route = None;
    let r = answer(&server, req).await.expect("answer");
    assert!(!r.fell_back && !r.expert_id.is_empty(), "{r:?}");
    assert!(TASKS.contains(&r.expert_id.as_str()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abstaining_falls_back_to_the_configured_expert() {
    let server = library_of_four_on(TestServer::start_with_fallback("movie_sentiment").await).await;
    let inputs = inputs_of("movie_sentiment", 3, 6);
    let r = answer(&server, abstaining(inputs.clone()))
        .await
        .expect("answer");
    assert!(r.fell_back, "{r:?}");
    assert!(r.fallback_reason.starts_with("abstain: winner share"));
    assert_eq!(r.expert_id, "movie_sentiment");
    assert_answers_match_direct_scores(&server, "movie_sentiment", &inputs, &r.answers).await;

    // The fallback deleted after start-up: abstaining calls fail clearly, routed ones work.
    server
        .library()
        .await
        .delete_expert(proto::DeleteExpertRequest {
            id: "movie_sentiment".into(),
            expected_version: None,
        })
        .await
        .expect("delete");
    let err = answer(&server, abstaining(inputs.clone()))
        .await
        .expect_err("no fallback left");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("fallback expert \"movie_sentiment\""),
        "{err:?}"
    );
    let r = answer(
        &server,
        proto::AnswerRequest {
            queries: queries(&task("sms_spam"), 8, 1),
            inputs: inputs_of("sms_spam", 1, 2),
            ..Default::default()
        },
    )
    .await
    .expect("routed answers still work");
    assert_eq!(r.expert_id, "sms_spam");
    server.stop().await;
}

async fn generate_text(
    c: &mut InferenceClient<Channel>,
    req: proto::GenerateRequest,
) -> (String, String) {
    let mut stream = c.generate(req).await.expect("generate").into_inner();
    let (mut text, mut finish) = (String::new(), String::new());
    while let Some(m) = stream.message().await.expect("a token") {
        text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            finish = m.finish_reason;
        }
    }
    (text, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_mode_returns_the_generated_text() {
    let server = library_of_four().await;
    // reddit_qa rows have no choices: the mode defaults to GENERATE.
    let t = task("reddit_qa");
    let q = queries(&t, 8, 1);
    let inputs: Vec<proto::AnswerInput> = roe_task_suite::sample(&t.test, 2, 9)
        .into_iter()
        .map(|i| proto::AnswerInput {
            input: i.input,
            choices: vec![],
        })
        .collect();
    let r = answer(
        &server,
        proto::AnswerRequest {
            queries: q,
            inputs: inputs.clone(),
            max_new_tokens: 6,
            ..Default::default()
        },
    )
    .await
    .expect("answer");
    assert_eq!(r.expert_id, "reddit_qa", "{:?}", r.routing);
    assert_eq!(r.answers.len(), 2);
    let mut c = server.inference().await;
    for (inp, ans) in inputs.iter().zip(&r.answers) {
        let Some(proto::answer::Kind::Generated(g)) = &ans.kind else {
            panic!("expected generated text, got {ans:?}");
        };
        assert!(
            ["eos", "length", "stop"].contains(&g.finish_reason.as_str()),
            "{g:?}"
        );
        // Greedy: the same text as a Generate stream with the routed expert.
        let (text, finish) = generate_text(
            &mut c,
            proto::GenerateRequest {
                expert_id: "reddit_qa".into(),
                input: inp.input.clone(),
                max_new_tokens: 6,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(g.text, text);
        assert_eq!(g.finish_reason, finish);
        assert!(!g.text.is_empty() || finish == "eos", "{g:?}");
    }

    // GENERATE asked for explicitly on inputs that have choices.
    let r = answer(
        &server,
        proto::AnswerRequest {
            queries: queries(&task("sms_spam"), 8, 1),
            inputs: inputs_of("sms_spam", 1, 3),
            mode: proto::AnswerMode::Generate as i32,
            max_new_tokens: 3,
            ..Default::default()
        },
    )
    .await
    .expect("answer");
    assert_eq!(r.expert_id, "sms_spam");
    assert!(matches!(
        r.answers[0].kind,
        Some(proto::answer::Kind::Generated(_))
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answer_requests_get_clear_statuses() {
    let server = TestServer::start_with_inference().await;
    let ok = || proto::AnswerRequest {
        queries: queries(&task("sms_spam"), 2, 1),
        inputs: inputs_of("sms_spam", 2, 2),
        ..Default::default()
    };
    // An empty library cannot route.
    let err = answer(&server, ok()).await.expect_err("empty library");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    server
        .library()
        .await
        .register_expert(register_request("sms_spam", "prompt", "sms_spam", 10))
        .await
        .expect("register");
    let with_input = |input: &str, choices: &[&str]| proto::AnswerInput {
        input: input.to_string(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
    };
    let cases: Vec<(proto::AnswerRequest, Code, &str)> = vec![
        (
            proto::AnswerRequest::default(),
            Code::InvalidArgument,
            "inputs:",
        ),
        (
            proto::AnswerRequest {
                inputs: vec![with_input("fine", &["a"]), with_input("  ", &["a"])],
                ..ok()
            },
            Code::InvalidArgument,
            "inputs[1].input",
        ),
        (
            proto::AnswerRequest {
                inputs: vec![with_input("x".repeat(70_000).as_str(), &["a"])],
                ..ok()
            },
            Code::ResourceExhausted,
            "inputs[0].input",
        ),
        (
            proto::AnswerRequest {
                inputs: (0..65).map(|_| with_input("hi", &["a", "b"])).collect(),
                ..ok()
            },
            Code::ResourceExhausted,
            "inputs:",
        ),
        (
            proto::AnswerRequest {
                inputs: (0..17).map(|_| with_input("hi", &[])).collect(),
                ..ok()
            },
            Code::ResourceExhausted,
            "inputs:",
        ),
        (
            // No inputs: the 65 queries are what would be answered.
            proto::AnswerRequest {
                queries: queries(&task("sms_spam"), 65, 1),
                inputs: vec![],
                ..ok()
            },
            Code::ResourceExhausted,
            "inputs:",
        ),
        (
            proto::AnswerRequest {
                inputs: vec![with_input("hi", &["a"]), with_input("there", &[])],
                mode: proto::AnswerMode::Score as i32,
                ..ok()
            },
            Code::InvalidArgument,
            "inputs[1].choices",
        ),
        (
            proto::AnswerRequest {
                inputs: vec![with_input("hi", &(0..65).map(|_| "c").collect::<Vec<_>>())],
                ..ok()
            },
            Code::InvalidArgument,
            "inputs[0].choices",
        ),
        (
            proto::AnswerRequest { mode: 9, ..ok() },
            Code::InvalidArgument,
            "mode",
        ),
        (
            proto::AnswerRequest {
                mode: proto::AnswerMode::Generate as i32,
                temperature: 9.0,
                ..ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            proto::AnswerRequest {
                mode: proto::AnswerMode::Generate as i32,
                max_new_tokens: 10_000,
                ..ok()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        // The router's own checks of the queries and options.
        (
            proto::AnswerRequest {
                queries: vec![proto::Query {
                    input: " ".into(),
                    choices: vec![],
                    target: None,
                }],
                ..ok()
            },
            Code::InvalidArgument,
            "queries[0].input",
        ),
        (
            proto::AnswerRequest {
                queries: (0..1025)
                    .map(|i| proto::Query {
                        input: format!("query {i}"),
                        choices: vec![],
                        target: None,
                    })
                    .collect(),
                ..ok()
            },
            Code::ResourceExhausted,
            "queries",
        ),
        (
            proto::AnswerRequest {
                route: Some(proto::RouteOptions {
                    abstain_threshold: Some(1.5),
                    ..Default::default()
                }),
                ..ok()
            },
            Code::InvalidArgument,
            "route.abstain_threshold",
        ),
    ];
    let stats = server.inference.as_ref().unwrap().stats();
    let scored = stats.scored_requests.load(Relaxed);
    for (req, code, needle) in cases {
        let err = answer(&server, req).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
    // Rejected calls did no backbone work.
    assert_eq!(stats.scored_requests.load(Relaxed), scored);
    assert_eq!(stats.generated_tokens.load(Relaxed), 0);

    // Still serving, and health reports the Answerer.
    let r = answer(&server, ok()).await.expect("still serving");
    assert_eq!(r.answers.len(), 2);
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let h = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "roe.v1.Answerer".into(),
        })
        .await
        .expect("health of roe.v1.Answerer")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_ensemble_is_the_vote_of_its_members_in_one_batch() {
    let server = TestServer::start_with_inference().await;
    let mut lib = server.library().await;
    lib.register_expert(register_request("sms_prompt", "prompt", "sms_spam", 8))
        .await
        .expect("register prompt");
    lib.register_expert(register_request("sms_lora", "lora", "sms_spam", 8))
        .await
        .expect("register lora");
    lib.register_expert(register_request("movie", "prompt", "movie_sentiment", 8))
        .await
        .expect("register movie");

    let mut c = server.inference().await;
    let stats = server.inference.as_ref().unwrap().stats();
    let choices = vec!["ham".to_string(), "spam".to_string()];
    let ensembles: [&[&str]; 2] = [&["sms_prompt", "sms_lora"], &["sms_prompt", "", "movie"]];
    for members in ensembles {
        for inp in inputs_of("sms_spam", 3, 8) {
            let batches = stats.score_batches.load(Relaxed);
            let r = c
                .score_ensemble(proto::ScoreEnsembleRequest {
                    expert_ids: members.iter().map(|m| m.to_string()).collect(),
                    input: inp.input.clone(),
                    choices: choices.clone(),
                    truncate: false,
                    min_library_seq: 0,
                })
                .await
                .expect("score ensemble")
                .into_inner();
            assert_eq!(
                stats.score_batches.load(Relaxed) - batches,
                1,
                "the members shared one batch"
            );
            assert_eq!(r.members.len(), members.len());
            // Each member equals its own Score call; the vote is theirs.
            let mut votes = vec![0u32; choices.len()];
            let mut sums = vec![0f32; choices.len()];
            for (m, got) in members.iter().zip(&r.members) {
                let direct = score(&mut c, m, &inp.input, &choices).await;
                assert!(close(got, &direct), "{m}: {got:?} != {direct:?}");
                votes[direct.best as usize] += 1;
                for (s, ch) in sums.iter_mut().zip(&direct.choices) {
                    *s += ch.sum_logprob;
                }
            }
            assert_eq!(r.votes, votes);
            assert!(r
                .summed_logprob
                .iter()
                .zip(&sums)
                .all(|(a, b)| (a - b).abs() < 2e-3));
            let top = *votes.iter().max().unwrap();
            let tied: Vec<usize> = (0..votes.len()).filter(|&i| votes[i] == top).collect();
            let want = if tied.len() == 1 {
                tied[0]
            } else {
                // Ties: the higher summed log-likelihood.
                *tied
                    .iter()
                    .max_by(|&&a, &&b| sums[a].total_cmp(&sums[b]).then(b.cmp(&a)))
                    .unwrap()
            };
            assert_eq!(r.best as usize, want, "{r:?}");
        }
    }
    assert!(stats.max_score_batch.load(Relaxed) >= 3);

    let ok = || proto::ScoreEnsembleRequest {
        expert_ids: vec!["sms_prompt".into(), "sms_lora".into()],
        input: "WINNER! claim your prize".into(),
        choices: choices.clone(),
        truncate: false,
        min_library_seq: 0,
    };
    let cases: Vec<(proto::ScoreEnsembleRequest, Code, &str)> = vec![
        (
            proto::ScoreEnsembleRequest {
                expert_ids: vec!["sms_prompt".into()],
                ..ok()
            },
            Code::InvalidArgument,
            "expert_ids",
        ),
        (
            proto::ScoreEnsembleRequest {
                expert_ids: (0..17).map(|i| format!("e{i}")).collect(),
                ..ok()
            },
            Code::InvalidArgument,
            "expert_ids",
        ),
        (
            proto::ScoreEnsembleRequest {
                expert_ids: vec!["sms_prompt".into(), "".into(), "sms_prompt".into()],
                ..ok()
            },
            Code::InvalidArgument,
            "expert_ids[2]",
        ),
        (
            proto::ScoreEnsembleRequest {
                expert_ids: vec!["sms_prompt".into(), "nope".into()],
                ..ok()
            },
            Code::NotFound,
            "expert_ids[1]",
        ),
        (
            proto::ScoreEnsembleRequest {
                input: " ".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "input",
        ),
        (
            proto::ScoreEnsembleRequest {
                choices: vec![],
                ..ok()
            },
            Code::InvalidArgument,
            "choices",
        ),
        (
            proto::ScoreEnsembleRequest {
                input: "z".repeat(70_000),
                ..ok()
            },
            Code::ResourceExhausted,
            "input",
        ),
    ];
    for (req, code, needle) in cases {
        let err = c.score_ensemble(req).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
    server.stop().await;
}
