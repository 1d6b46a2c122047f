//! roe-trainer: experts trained inside roe, on the frozen backbone that serves them.
//!
//! - [`Recipe`]: every hyper-parameter, defaults that reproduce the reference experts
//!   (prompt tuning with class-label init, LoRA r 4 on q/v), validated field by field.
//! - [`data`]: rows checked, split (held-out), rendered exactly as Score renders them.
//! - [`Params`] / [`train::run`]: the soft prompt or LoRA matrices, seeded batches in
//!   micro-batches, gradients from [`roe_backbone::Backbone::answer_loss`] (the backbone is
//!   never differentiated), clipping, AdamW with warm-up and linear decay.
//! - [`checkpoint`]: atomic checkpoints of parameters and optimizer state.
//! - [`TrainingJobs`]: a bounded, durable queue of jobs on worker threads, with watch,
//!   cancel, resume after a restart, and registration of the result through an
//!   [`ExpertSink`] (the library).

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod jobs;
pub mod params;
pub mod recipe;
pub mod train;

pub use data::{EvalMetric, TaskSpec};
pub use error::{Result, TrainError};
pub use jobs::{ExpertSink, JobSpec, JobState, JobStatus, JobsConfig, TrainingJobs};
pub use params::Params;
pub use recipe::{PromptInit, Recipe};
pub use train::{StepReport, TrainState};
