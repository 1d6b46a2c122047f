//! The job queue over the real backbone and a real sled library: a job stopped by a restart
//! resumes from its checkpoint and registers its expert (after several restarts it reports
//! the latest one's step); a job whose checkpoint is unusable is reported as failed with the
//! reason, never lost.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use roe_backbone::Backbone;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_expert_library::ExpertKind;
use roe_trainer::{JobSpec, JobState, JobStatus, JobsConfig, Recipe, TaskSpec, TrainingJobs};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn backbone() -> Arc<Backbone> {
    static B: OnceLock<Arc<Backbone>> = OnceLock::new();
    B.get_or_init(|| {
        let p = root().join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.exists(),
            "{} missing (run scripts/fetch-models.sh)",
            p.display()
        );
        Arc::new(Backbone::load(p, None).expect("backbone"))
    })
    .clone()
}

fn library(dir: &Path) -> Arc<ExpertLibrary> {
    let enc = roe_encoder::serving_encoder(
        &root().join("models/all-MiniLM-L6-v2"),
        roe_encoder::Precision::Auto,
    )
    .expect("encoder (run scripts/fetch-models.sh)");
    Arc::new(
        ExpertLibrary::open(dir, Arc::new(enc), LibraryConfig::default())
            .expect("library")
            .0,
    )
}

fn spec(id: &str, steps: usize) -> (JobSpec, Vec<roe_expert_library::Instance>) {
    let t = roe_task_suite::Task::load(root().join("assets/tasks/sms_spam")).unwrap();
    let mut recipe = Recipe::defaults(ExpertKind::Lora);
    recipe.steps = steps;
    recipe.warmup_steps = 1;
    recipe.batch_size = 4;
    recipe.checkpoint_every = 1;
    recipe.held_out_fraction = 0.1;
    recipe.instances = 20;
    (
        JobSpec {
            expert_id: id.into(),
            name: id.into(),
            description: "spam or ham".into(),
            task: TaskSpec {
                description: t.info.description.clone(),
                labels: t.info.labels.clone(),
            },
            recipe,
            new_version: false,
            ensemble_size: 1,
        },
        t.train[..40].to_vec(),
    )
}

fn open(dir: &Path, lib: &Arc<ExpertLibrary>) -> TrainingJobs {
    TrainingJobs::open(
        dir,
        backbone(),
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        lib.clone(),
        JobsConfig::default(),
    )
    .expect("jobs")
}

fn wait_until(jobs: &TrainingJobs, id: &str, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let mut rx = jobs.watch(id).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                let s = rx.borrow_and_update().clone();
                if done(&s) {
                    return s;
                }
                rx.changed().await.expect("job still watched");
            }
        })
        .await
        .expect("job did not get there in time")
    })
}

#[test]
fn a_job_stopped_by_a_restart_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(&tmp.path().join("library"));
    let jobs_dir = tmp.path().join("training");
    let (spec, rows) = spec("spam_lora", 6);
    let id = {
        let jobs = open(&jobs_dir, &lib);
        let first = jobs.submit(spec, rows).unwrap();
        let at = wait_until(&jobs, &first.id, |s| s.step >= 2);
        assert_eq!(at.state, JobState::Running);
        first.id
        // Dropped here: the worker stops within a step and leaves the job running on disk.
    };
    let jobs = open(&jobs_dir, &lib);
    let resumed = jobs.get(&id).unwrap();
    assert!(!resumed.state.is_finished(), "{resumed:?}");
    let end = wait_until(&jobs, &id, |s| s.state.is_finished());
    assert_eq!(end.state, JobState::Succeeded, "{end:?}");
    assert!(end.resumed_from_step >= 2, "{end:?}");
    assert_eq!(end.step, 6);
    let meta = lib.get("spam_lora").unwrap();
    let record = meta.training.expect("training record");
    assert_eq!(record.steps, 6);
    assert_eq!(record.job_id, id);
    assert_eq!(meta.num_instances, 20);
    // The list survives another restart, finished.
    drop(jobs);
    let jobs = open(&jobs_dir, &lib);
    assert_eq!(jobs.list()[0].state, JobState::Succeeded);
}

#[test]
fn a_job_restarted_twice_reports_the_latest_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(&tmp.path().join("library"));
    let jobs_dir = tmp.path().join("training");
    let (spec, rows) = spec("spam_twice", 14);
    let id = {
        let jobs = open(&jobs_dir, &lib);
        let first = jobs.submit(spec, rows).unwrap();
        wait_until(&jobs, &first.id, |s| s.step >= 2);
        first.id
    };
    // Second run: note where it went on from, then stop it again two steps later (the
    // checkpoint is written every step, before the step is published).
    let first_resume = {
        let jobs = open(&jobs_dir, &lib);
        let at = wait_until(&jobs, &id, |s| s.resumed_from_step > 0);
        let first_resume = at.resumed_from_step;
        let later = wait_until(&jobs, &id, |s| {
            s.step >= first_resume + 2 || s.state.is_finished()
        });
        assert!(
            !later.state.is_finished(),
            "finished before the second stop: {later:?}"
        );
        first_resume
    };
    let jobs = open(&jobs_dir, &lib);
    let end = wait_until(&jobs, &id, |s| s.state.is_finished());
    assert_eq!(end.state, JobState::Succeeded, "{end:?}");
    assert!(
        end.resumed_from_step >= first_resume + 2,
        "kept the first resume ({first_resume}) rather than the latest: {end:?}"
    );
}

#[test]
fn a_job_whose_checkpoint_is_damaged_fails_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(&tmp.path().join("library"));
    let jobs_dir = tmp.path().join("training");
    let (spec, rows) = spec("spam_damaged", 50);
    let id = {
        let jobs = open(&jobs_dir, &lib);
        let first = jobs.submit(spec, rows).unwrap();
        wait_until(&jobs, &first.id, |s| s.step >= 1);
        first.id
    };
    std::fs::write(
        jobs_dir.join(&id).join("checkpoint.safetensors"),
        b"not a checkpoint",
    )
    .unwrap();
    let jobs = open(&jobs_dir, &lib);
    let end = wait_until(&jobs, &id, |s| s.state.is_finished());
    assert_eq!(end.state, JobState::Failed);
    assert!(end.error.contains("checkpoint"), "{}", end.error);
    assert!(lib.get("spam_damaged").is_err());
}
