//! roe.v1.Training end to end on a real server: a task the library has never seen is trained,
//! registered, routed to for its own queries, answers better than the bare backbone, and
//! exports to a PEFT folder that re-imports unchanged; bad requests are INVALID_ARGUMENT
//! naming the field; a running job cancels within a step.

use std::time::{Duration, Instant};

use roe_services::proto::{self, training_client::TrainingClient};
use roe_tests::{instances, queries, register_request, task, TestServer};
use tonic::transport::Channel;
use tonic::Code;

fn rows(name: &str, n: usize) -> Vec<proto::Instance> {
    instances(&task(name), n, 3)
}

fn start_request(
    id: &str,
    task_name: &str,
    steps: u32,
    rows_n: usize,
) -> proto::StartTrainingRequest {
    let t = task(task_name);
    proto::StartTrainingRequest {
        expert_id: id.into(),
        name: id.into(),
        description: t.info.description.clone(),
        kind: proto::ExpertKind::Prompt as i32,
        rows: rows(task_name, rows_n),
        task_description: t.info.description.clone(),
        labels: t.info.labels.clone(),
        recipe: Some(proto::TrainingRecipe {
            steps: Some(steps),
            batch_size: Some(8),
            warmup_steps: Some(2),
            held_out_fraction: Some(0.2),
            max_eval_rows: Some(24),
            instances: Some(50),
            ..Default::default()
        }),
        new_version: false,
        ensemble_size: 0,
    }
}

/// `req` as StartTrainingStream's messages.
fn chunks(req: proto::StartTrainingRequest) -> Vec<proto::StartTrainingChunk> {
    roe_services::convert::start_training_chunks(req).collect()
}

/// Follows a job to its end; returns every status seen.
async fn follow(c: &mut TrainingClient<Channel>, job_id: &str) -> Vec<proto::TrainingJob> {
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(j) = stream.message().await.unwrap() {
        seen.push(j);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_expert_is_registered_routed_to_and_beats_the_bare_backbone() {
    let server = TestServer::start_with_inference().await;
    let mut lib = server.library().await;
    // A library of other tasks' reference experts: the new task is in none of them.
    for t in ["movie_sentiment", "language_id", "question_type"] {
        lib.register_expert(register_request(t, "prompt", t, 50))
            .await
            .unwrap();
    }
    let mut training = server.training().await;
    let job = training
        .start_training(start_request("sms_spam_trained", "sms_spam", 10, 120))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.expert_id, "sms_spam_trained");
    let seen = follow(&mut training, &job.id).await;
    let last = seen.last().unwrap().clone();
    assert_eq!(
        last.state,
        proto::TrainingState::Succeeded as i32,
        "job ended {last:?}"
    );
    assert_eq!(last.step, 10);
    assert!(seen
        .iter()
        .any(|j| j.phase == "training" && j.step > 0 && j.loss > 0.0));
    assert_eq!(last.metric, "accuracy");
    let (score, bare) = (
        last.held_out_score.unwrap(),
        last.held_out_baseline.unwrap(),
    );
    assert!(score > bare, "held out: trained {score} vs bare {bare}");
    assert_eq!(last.expert_version, 1);

    // Registered with its training record and S instances.
    let got = lib
        .get_expert(proto::GetExpertRequest {
            id: "sms_spam_trained".into(),
            include_instances: true,
            include_adapter: true,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let meta = got.expert.unwrap();
    assert_eq!(meta.num_instances, 50);
    assert_eq!(meta.num_virtual_tokens, 20);
    let record = meta.training.clone().expect("training record");
    assert_eq!(record.job_id, job.id);
    assert_eq!(record.steps, 10);
    assert!(
        record.recipe_json.contains("\"learning_rate\":0.03"),
        "{}",
        record.recipe_json
    );

    // Routable at once: the task's own test queries pick it.
    let routed = server
        .router()
        .await
        .route(proto::RouteRequest {
            queries: queries(&task("sms_spam"), 16, 2),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "sms_spam_trained", "{:?}", routed.ranked);

    // Answers its test rows better than the bare backbone.
    let mut inf = server.inference().await;
    let t = task("sms_spam");
    let (mut with, mut without) = (0, 0);
    for row in t.test.iter().take(24) {
        for (expert, hits) in [("sms_spam_trained", &mut with), ("", &mut without)] {
            let r = inf
                .score(proto::ScoreRequest {
                    expert_id: expert.into(),
                    input: row.input.clone(),
                    choices: row.choices.clone(),
                    truncate: false,
                    min_library_seq: 0,
                })
                .await
                .unwrap()
                .into_inner();
            if row.target.as_deref() == Some(row.choices[r.best as usize].as_str()) {
                *hits += 1;
            }
        }
    }
    assert!(with > without, "trained {with}/24 vs bare {without}/24");

    // Exported and re-imported unchanged.
    let adapter = got.adapter.unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(
        out.path().join("adapter_config.json"),
        &adapter.adapter_config_json,
    )
    .unwrap();
    std::fs::write(
        out.path().join("adapter_model.safetensors"),
        &adapter.adapter_model_safetensors,
    )
    .unwrap();
    let reread = roe_expert_library::PeftAdapter::from_dir(out.path()).unwrap();
    let again = lib
        .register_expert(proto::RegisterExpertRequest {
            id: "sms_spam_reimported".into(),
            name: String::new(),
            description: String::new(),
            backbone: String::new(),
            adapter: Some(proto::PeftAdapter {
                adapter_config_json: reread.config_json,
                adapter_model_safetensors: reread.safetensors,
            }),
            instances: got.instances,
            new_version: false,
            // The exported file is the stored one: the checksum the library reports holds.
            safetensors_bytes: Some(meta.weights_bytes),
            safetensors_sha256: meta.safetensors_sha256.clone(),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(again.weights_sha256, meta.weights_sha256);

    // The same id again without new_version is refused before any training.
    let err = training
        .start_training(start_request("sms_spam_trained", "sms_spam", 10, 40))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expert_id"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_requests_name_the_field_and_leave_nothing_behind() {
    let server = TestServer::start_with_inference().await;
    let mut c = server.training().await;
    let base = start_request("x", "sms_spam", 5, 20);
    type Change = Box<dyn Fn(&mut proto::StartTrainingRequest)>;
    let cases: Vec<(&str, Change)> = vec![
        ("kind", Box::new(|r| r.kind = 0)),
        ("kind", Box::new(|r| r.kind = 9)),
        (
            "recipe.steps",
            Box::new(|r| r.recipe.as_mut().unwrap().steps = Some(0)),
        ),
        (
            "recipe.learning_rate",
            Box::new(|r| r.recipe.as_mut().unwrap().learning_rate = Some(f64::NAN)),
        ),
        (
            "recipe.batch_size",
            Box::new(|r| r.recipe.as_mut().unwrap().batch_size = Some(100_000)),
        ),
        (
            "recipe.held_out_fraction",
            Box::new(|r| r.recipe.as_mut().unwrap().held_out_fraction = Some(0.9)),
        ),
        (
            "recipe.prompt_init",
            Box::new(|r| r.recipe.as_mut().unwrap().prompt_init = "zeros".repeat(100)),
        ),
        (
            "recipe.num_virtual_tokens",
            Box::new(|r| r.recipe.as_mut().unwrap().num_virtual_tokens = Some(0)),
        ),
        (
            "recipe.lora_targets",
            Box::new(|r| {
                r.kind = proto::ExpertKind::Lora as i32;
                r.recipe.as_mut().unwrap().lora_targets = vec!["lm_head".into()];
            }),
        ),
        ("rows", Box::new(|r| r.rows.clear())),
        ("rows[1].target", Box::new(|r| r.rows[1].target = None)),
        ("rows[0].input", Box::new(|r| r.rows[0].input = "  ".into())),
        (
            "rows[2].target",
            Box::new(|r| r.rows[2].target = Some("maybe".into())),
        ),
        (
            "expert_id",
            Box::new(|r| r.expert_id = "no spaces allowed".into()),
        ),
    ];
    for (field, change) in cases {
        let mut req = base.clone();
        change(&mut req);
        let err = c.start_training(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: message {:?}",
            err.message()
        );
        assert!(err.message().len() < 1200, "{field}: message not truncated");
    }
    // Streamed rows are checked as unary ones, counted from the first streamed row; a stream
    // must open with its header, have one, and stop at the row limit.
    use proto::start_training_chunk::Part;
    let mut bad_row = base.clone();
    bad_row.rows[7].target = None;
    let row = |input: &str| proto::StartTrainingChunk {
        part: Some(Part::Row(proto::Instance {
            input: input.into(),
            target: Some("spam".into()),
            ..Default::default()
        })),
    };
    let header = chunks(base.clone()).swap_remove(0);
    let too_many = std::iter::once(header.clone())
        .chain((0..=roe_trainer::data::MAX_ROWS).map(|_| row("x")))
        .collect::<Vec<_>>();
    let streams: Vec<(Code, &str, Vec<proto::StartTrainingChunk>)> = vec![
        (Code::InvalidArgument, "rows[7].target", chunks(bad_row)),
        (Code::InvalidArgument, "stream", vec![]),
        (
            Code::InvalidArgument,
            "stream",
            vec![row("x"), header.clone()],
        ),
        (
            Code::InvalidArgument,
            "stream",
            vec![header.clone(), header.clone()],
        ),
        (
            Code::InvalidArgument,
            "stream",
            vec![header.clone(), proto::StartTrainingChunk { part: None }],
        ),
        (Code::ResourceExhausted, "rows", too_many),
    ];
    for (code, field, messages) in streams {
        let err = c
            .start_training_stream(tokio_stream::iter(messages))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: message {:?}",
            err.message()
        );
    }
    let jobs = c
        .list_training_jobs(proto::ListTrainingJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:?}");
    for err in [
        c.get_training_job(proto::GetTrainingJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err(),
        c.cancel_training(proto::CancelTrainingRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err(),
        c.watch_training(proto::WatchTrainingRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancels_within_a_step_and_a_queued_one_at_once() {
    let server = TestServer::start_with_inference().await;
    let mut c = server.training().await;
    let long = c
        .start_training(start_request("long", "sms_spam", 500, 40))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    // Its rows streamed in, one message each: all 40 arrive.
    let queued = c
        .start_training_stream(tokio_stream::iter(chunks(start_request(
            "queued", "sms_spam", 5, 40,
        ))))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(queued.train_rows + queued.held_out_rows, 40, "{queued:?}");
    // One worker: the second job waits, first in line.
    let q = c
        .get_training_job(proto::GetTrainingJobRequest {
            job_id: queued.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(q.state, proto::TrainingState::Queued as i32);
    assert_eq!(q.queue_position, 1);
    let cancelled = c
        .cancel_training(proto::CancelTrainingRequest {
            job_id: queued.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, proto::TrainingState::Cancelled as i32);

    // Wait for the long job to make a step, then cancel it and time the stop.
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest {
            job_id: long.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut step_seconds = 0.0;
    let started = Instant::now();
    while let Some(j) = stream.message().await.unwrap() {
        if j.step >= 1 {
            step_seconds = started.elapsed().as_secs_f64() / j.step as f64;
            break;
        }
    }
    let asked = Instant::now();
    c.cancel_training(proto::CancelTrainingRequest {
        job_id: long.id.clone(),
    })
    .await
    .unwrap();
    let mut last = None;
    while let Some(j) = stream.message().await.unwrap() {
        last = Some(j);
    }
    let last = last.unwrap();
    let took = asked.elapsed();
    assert_eq!(
        last.state,
        proto::TrainingState::Cancelled as i32,
        "{last:?}"
    );
    assert!(last.step < 500);
    assert!(
        took < Duration::from_secs_f64(2.0 * step_seconds + 5.0),
        "cancel took {took:?}, a step {step_seconds:.1} s"
    );
    // Neither expert was registered; cancelling a finished job is refused.
    let err = server
        .library()
        .await
        .get_expert(proto::GetExpertRequest {
            id: "long".into(),
            include_instances: false,
            include_adapter: false,
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .cancel_training(proto::CancelTrainingRequest { job_id: long.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_trains_a_prompt_ensemble_that_score_ensemble_uses() {
    let server = TestServer::start_with_inference().await;
    let mut c = server.training().await;
    let mut req = start_request("spam_ens", "sms_spam", 3, 60);
    req.ensemble_size = 3;
    let job = c
        .start_training(req)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.expert_ids, ["spam_ens.1", "spam_ens.2", "spam_ens.3"]);
    assert_eq!(job.total_steps, 9);
    let last = follow(&mut c, &job.id).await.pop().unwrap();
    assert_eq!(
        last.state,
        proto::TrainingState::Succeeded as i32,
        "{last:?}"
    );
    assert_eq!(last.step, 9);
    assert_eq!(last.member_scores.len(), 3);
    let mut lib = server.library().await;
    let mut prompts = Vec::new();
    for id in &job.expert_ids {
        let e = lib
            .get_expert(proto::GetExpertRequest {
                id: id.clone(),
                include_instances: false,
                include_adapter: true,
                min_library_seq: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let t = e.expert.unwrap().training.unwrap();
        assert_eq!(t.ensemble_members, job.expert_ids);
        prompts.push(e.adapter.unwrap().adapter_model_safetensors);
    }
    // Different seeds, different batches: different prompts.
    assert_ne!(prompts[0], prompts[1]);
    let row = &task("sms_spam").test[0];
    let r = server
        .inference()
        .await
        .score_ensemble(proto::ScoreEnsembleRequest {
            expert_ids: job.expert_ids.clone(),
            input: row.input.clone(),
            choices: row.choices.clone(),
            truncate: false,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.members.len(), 3);
    assert_eq!(r.votes.iter().sum::<u32>(), 3);
    // Too many members is refused by field.
    let mut req = start_request("spam_big", "sms_spam", 3, 60);
    req.ensemble_size = 9;
    let err = c.start_training(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("ensemble_size"),
        "{}",
        err.message()
    );
}
