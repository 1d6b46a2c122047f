//! `roe expert train`, `roe expert export` and `roe train ls|watch|cancel`: clients of
//! `roe.v1.Training` and `roe.v1.ExpertLibrary`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use roe_services::auth::KeyedChannel;
use roe_services::proto::{self, training_client::TrainingClient};
use roe_services::server::MAX_MESSAGE_BYTES;
use roe_task_suite::{read_instances, Task};

use crate::cli::Global;

#[derive(Args)]
pub struct TrainArgs {
    /// A task folder (task.json + train.jsonl): rows, description and labels.
    #[arg(long, conflicts_with = "rows", required_unless_present = "rows")]
    task: Option<PathBuf>,
    /// JSON lines of {"input", "target", "choices"?} (with --labels for classification).
    #[arg(long)]
    rows: Option<PathBuf>,
    /// prompt or lora.
    #[arg(long, value_parser = ["prompt", "lora"])]
    kind: String,
    /// Expert id (default: the task's name).
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// Class labels, comma separated (with --rows; a task folder has its own).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch: Option<u32>,
    #[arg(long)]
    warmup: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Share of the rows held out to measure the expert (0..0.5).
    #[arg(long)]
    held_out: Option<f64>,
    /// Instances sampled into the library (S).
    #[arg(long)]
    instances: Option<u32>,
    #[arg(long)]
    virtual_tokens: Option<u32>,
    /// class_labels, random, vocab_sample or text.
    #[arg(long, default_value = "")]
    init: String,
    #[arg(long, default_value = "")]
    init_text: String,
    #[arg(long)]
    lora_rank: Option<u32>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA projections, comma separated (default q_proj,v_proj).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Padded positions per micro-batch (bounds memory).
    #[arg(long)]
    micro_batch_tokens: Option<u32>,
    /// Train the next version of an existing expert.
    #[arg(long)]
    new_version: bool,
    /// Train a prompt ensemble of this many members (seeds seed, seed+1, ...), registered
    /// as <id>.1 ... <id>.N.
    #[arg(long, default_value_t = 1)]
    ensemble: u32,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    detach: bool,
}

#[derive(Subcommand)]
pub enum TrainCommand {
    /// List training jobs, newest first.
    Ls,
    /// Follow a job until it ends.
    Watch { job: String },
    /// Cancel a job (a running one stops within a step).
    Cancel { job: String },
}

async fn client(g: &Global) -> Result<TrainingClient<KeyedChannel>> {
    let c = TrainingClient::new(crate::cli::channel(g).await?);
    Ok(c.max_encoding_message_size(MAX_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_MESSAGE_BYTES))
}

fn state_name(s: i32) -> &'static str {
    match proto::TrainingState::try_from(s) {
        Ok(proto::TrainingState::Queued) => "queued",
        Ok(proto::TrainingState::Running) => "running",
        Ok(proto::TrainingState::Succeeded) => "succeeded",
        Ok(proto::TrainingState::Failed) => "failed",
        Ok(proto::TrainingState::Cancelled) => "cancelled",
        _ => "?",
    }
}

pub async fn cmd_expert_train(g: &Global, a: TrainArgs) -> Result<()> {
    let (rows, task) = match (&a.task, &a.rows) {
        (Some(dir), _) => {
            let t = Task::load(dir)?;
            (t.train.clone(), Some(t))
        }
        (None, Some(file)) => (read_instances(file, &a.labels)?, None),
        (None, None) => bail!("give --task DIR or --rows FILE"),
    };
    let id = match (&a.id, &task) {
        (Some(id), _) => id.clone(),
        (None, Some(t)) => t.name().to_string(),
        (None, None) => bail!("--id is needed with --rows"),
    };
    let (task_description, labels) = match &task {
        Some(t) => (t.info.description.clone(), t.info.labels.clone()),
        None => (a.description.clone(), a.labels.clone()),
    };
    let kind = if a.kind == "lora" {
        proto::ExpertKind::Lora
    } else {
        proto::ExpertKind::Prompt
    };
    let req = proto::StartTrainingRequest {
        expert_id: id.clone(),
        name: id.clone(),
        description: if a.description.is_empty() {
            task_description.clone()
        } else {
            a.description.clone()
        },
        kind: kind as i32,
        rows: crate::cli::to_proto_instances(rows),
        task_description,
        labels,
        recipe: Some(proto::TrainingRecipe {
            steps: a.steps,
            batch_size: a.batch,
            learning_rate: a.lr,
            warmup_steps: a.warmup,
            seed: a.seed,
            held_out_fraction: a.held_out,
            instances: a.instances,
            num_virtual_tokens: a.virtual_tokens,
            prompt_init: a.init.clone(),
            prompt_init_text: a.init_text.clone(),
            lora_rank: a.lora_rank,
            lora_alpha: a.lora_alpha,
            lora_targets: a.lora_targets.clone(),
            micro_batch_tokens: a.micro_batch_tokens,
            ..Default::default()
        }),
        new_version: a.new_version,
        ensemble_size: a.ensemble,
    };
    let mut c = client(g).await?;
    let job = c
        .start_training_stream(tokio_stream::iter(
            roe_services::convert::start_training_chunks(req),
        ))
        .await?
        .into_inner()
        .job
        .context("the server returned no job")?;
    if a.detach {
        println!("{}", job.id);
        return Ok(());
    }
    eprintln!("job {} ({} training rows)", job.id, job.train_rows);
    watch(&mut c, &job.id).await
}

async fn watch(c: &mut TrainingClient<KeyedChannel>, job_id: &str) -> Result<()> {
    let mut stream = c
        .watch_training(proto::WatchTrainingRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last = None;
    while let Some(job) = stream.message().await? {
        bar.set_length(job.total_steps as u64);
        bar.set_position(job.step as u64);
        bar.set_message(match proto::TrainingState::try_from(job.state) {
            Ok(proto::TrainingState::Queued) => format!("queued, position {}", job.queue_position),
            Ok(proto::TrainingState::Running) if job.phase == "training" => format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s  ETA {:.0} s",
                job.loss, job.learning_rate, job.tokens_per_s, job.eta_s
            ),
            _ => job.phase.clone(),
        });
        last = Some(job);
    }
    bar.finish_and_clear();
    let job = last.context("the job stream ended without a status")?;
    print_job(&job);
    match proto::TrainingState::try_from(job.state) {
        Ok(proto::TrainingState::Succeeded) => Ok(()),
        _ => bail!("job {} {}: {}", job.id, state_name(job.state), job.error),
    }
}

fn print_job(j: &proto::TrainingJob) {
    let score = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    println!(
        "{}  expert {} (v{})  {}  step {}/{}  loss {:.4}  held-out {} {} (bare {}) on {} rows{}",
        j.id,
        j.expert_id,
        j.expert_version,
        state_name(j.state),
        j.step,
        j.total_steps,
        j.loss,
        j.metric,
        score(j.held_out_score),
        score(j.held_out_baseline),
        j.held_out_rows,
        if j.error.is_empty() {
            String::new()
        } else {
            format!("  error: {}", j.error)
        }
    );
    if j.expert_ids.len() > 1 {
        let scores: Vec<String> = j.member_scores.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "  ensemble: {} (members' held-out {}; the score above is their majority vote)",
            j.expert_ids.join(", "),
            scores.join(", ")
        );
    }
}

pub async fn cmd_train(g: &Global, c: TrainCommand) -> Result<()> {
    let mut client = client(g).await?;
    match c {
        TrainCommand::Ls => {
            let jobs = client
                .list_training_jobs(proto::ListTrainingJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            if jobs.is_empty() {
                println!("no training jobs");
            }
            for j in &jobs {
                print_job(j);
            }
            Ok(())
        }
        TrainCommand::Watch { job } => watch(&mut client, &job).await,
        TrainCommand::Cancel { job } => {
            let j = client
                .cancel_training(proto::CancelTrainingRequest { job_id: job })
                .await?
                .into_inner()
                .job
                .context("the server returned no job")?;
            print_job(&j);
            Ok(())
        }
    }
}

/// Writes an expert's PEFT folder (adapter_config.json + adapter_model.safetensors).
pub async fn cmd_export(g: &Global, id: String, out: PathBuf) -> Result<()> {
    let mut c = crate::cli::library_client(g).await?;
    let resp = c
        .get_expert(proto::GetExpertRequest {
            min_library_seq: Default::default(),
            id: id.clone(),
            include_instances: false,
            include_adapter: true,
        })
        .await?
        .into_inner();
    let adapter = resp.adapter.context("the server returned no adapter")?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("adapter_config.json"), adapter.adapter_config_json)?;
    std::fs::write(
        out.join("adapter_model.safetensors"),
        adapter.adapter_model_safetensors,
    )?;
    println!("{id} written to {}", out.display());
    Ok(())
}
