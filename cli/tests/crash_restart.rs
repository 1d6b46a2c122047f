//! Acknowledged writes survive a crash: a real `roe serve` process is killed with SIGKILL
//! right after registrations return, restarted on the same data directory, and must still
//! hold (and route to) every acknowledged expert.
mod common;

use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, router_client::RouterClient,
};
use roe_task_suite::{sample, Task};

use common::{repo, start_serve as start, start_serve_with};

fn request(id: &str, task: &Task, kind: &str) -> proto::RegisterExpertRequest {
    common::register_request(id, kind, task, 10, false)
}

#[tokio::test]
async fn sigkill_after_acknowledgement_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("library");
    let tasks: Vec<Task> = ["sms_spam", "language_id", "snips_intent"]
        .iter()
        .map(|t| Task::load(repo().join("assets/tasks").join(t)).unwrap())
        .collect();

    let (mut child, url) = start(&data);
    let mut c = ExpertLibraryClient::connect(url.clone()).await.unwrap();
    for t in &tasks {
        c.register_expert(request(t.name(), t, "prompt"))
            .await
            .unwrap();
    }
    let mut v2 = request("sms_spam", &tasks[0], "lora");
    v2.new_version = true;
    c.register_expert(v2).await.unwrap();
    c.delete_expert(proto::DeleteExpertRequest {
        expected_version: Default::default(),
        id: "language_id".into(),
    })
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL: no shutdown path runs
    child.wait().unwrap();

    let (mut child, url) = start(&data);
    let mut c = ExpertLibraryClient::connect(url.clone()).await.unwrap();
    let list = c
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<(&str, u64, i32)> = list
        .experts
        .iter()
        .map(|e| (e.id.as_str(), e.version, e.kind))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("sms_spam", 2, proto::ExpertKind::Lora as i32),
            ("snips_intent", 1, proto::ExpertKind::Prompt as i32)
        ]
    );
    let mut r = RouterClient::connect(url).await.unwrap();
    let queries = sample(&tasks[2].test, 6, 4)
        .into_iter()
        .map(|i| proto::Query {
            input: i.input,
            choices: i.choices,
            target: None,
        })
        .collect();
    let routed = r
        .route(proto::RouteRequest {
            min_library_seq: Default::default(),
            queries,
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "snips_intent");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A training job killed with its process (SIGKILL, mid-run) resumes from its last checkpoint
/// when the server starts again, and registers its expert.
#[tokio::test]
async fn sigkill_during_training_resumes_from_the_checkpoint() {
    use roe_services::proto::training_client::TrainingClient;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("library");
    let t = Task::load(repo().join("assets/tasks/sms_spam")).unwrap();
    let (mut child, url) = start(&data);
    let mut c = TrainingClient::connect(url.clone()).await.unwrap();
    let job = c
        .start_training(proto::StartTrainingRequest {
            expert_id: "spam_trained".into(),
            kind: proto::ExpertKind::Lora as i32,
            rows: sample(&t.train, 40, 1)
                .into_iter()
                .map(|i| proto::Instance {
                    input: i.input,
                    target: i.target,
                    choices: i.choices,
                })
                .collect(),
            task_description: t.info.description.clone(),
            labels: t.info.labels.clone(),
            recipe: Some(proto::TrainingRecipe {
                steps: Some(8),
                batch_size: Some(4),
                warmup_steps: Some(1),
                checkpoint_every: Some(1),
                held_out_fraction: Some(0.1),
                instances: Some(10),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(j) = stream.message().await.unwrap() {
        if j.step >= 3 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL mid-job: no shutdown path runs
    child.wait().unwrap();

    let (mut child, url) = start(&data);
    let mut c = TrainingClient::connect(url.clone()).await.unwrap();
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(j) = stream.message().await.unwrap() {
        last = Some(j);
    }
    let last = last.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        last.state,
        proto::TrainingState::Succeeded as i32,
        "{last:?}"
    );
    assert!(last.resumed_from_step >= 3, "{last:?}");
    assert_eq!(last.step, 8);
    assert_eq!(last.expert_version, 1);
}

/// After a crash the rebuilt index graphs are dumped at once, not only at a clean shutdown, so
/// a crash loop does not rebuild them at every start.
#[tokio::test]
async fn a_rebuilt_index_is_persisted_without_a_clean_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("library");
    let manifest = data.join("roe-index/manifest.json");
    let hnsw = ["--hnsw-threshold", "1", "--no-inference"];
    let (mut child, url) = start_serve_with(&data, &hnsw);
    let mut c = ExpertLibraryClient::connect(url).await.unwrap();
    for (id, task) in [("spam", "sms_spam"), ("lang", "language_id")] {
        let t = Task::load(repo().join("assets/tasks").join(task)).unwrap();
        c.register_expert(request(id, &t, "prompt")).await.unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The first start (an empty library) had nothing to dump; the crash left no dump of the
    // registered experts either.
    let stale = std::fs::read_to_string(&manifest).unwrap_or_default();

    let (mut child, _) = start_serve_with(&data, &hnsw);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut dumped = String::new();
    while std::time::Instant::now() < deadline {
        dumped = std::fs::read_to_string(&manifest).unwrap_or_default();
        if !dumped.is_empty() && dumped != stale {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !dumped.is_empty() && dumped != stale,
        "no new index dump after the restart: {dumped:?}"
    );
}

/// SIGTERM with a request that would never end by itself in flight (a client watching a long
/// training job): the server drains for --drain-timeout-ms, then exits cleanly.
#[tokio::test]
async fn sigterm_exits_within_the_drain_deadline() {
    use roe_services::proto::training_client::TrainingClient;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("library");
    let t = Task::load(repo().join("assets/tasks/sms_spam")).unwrap();
    let (mut child, url) = start_serve_with(&data, &["--drain-timeout-ms", "500"]);
    let mut c = TrainingClient::connect(url).await.unwrap();
    let job = c
        .start_training(proto::StartTrainingRequest {
            expert_id: "long".into(),
            kind: proto::ExpertKind::Lora as i32,
            rows: sample(&t.train, 40, 1)
                .into_iter()
                .map(roe_services::convert::instance_to_proto)
                .collect(),
            task_description: t.info.description.clone(),
            labels: t.info.labels.clone(),
            recipe: Some(proto::TrainingRecipe {
                steps: Some(5000),
                batch_size: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    while let Some(j) = stream.message().await.unwrap() {
        if j.step >= 1 {
            break;
        }
    }
    let asked = std::time::Instant::now();
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "shutdown took {took:?} with a 0.5 s drain deadline"
    );
}
