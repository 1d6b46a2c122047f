//! A job's rows: checked, split into training and held-out rows, and rendered into ids
//! exactly as Score and Generate render them (train and serve agree).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use roe_backbone::Backbone;
use roe_expert_library::Instance;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Most rows one job may carry.
pub const MAX_ROWS: usize = 100_000;
/// Longest input or target text, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// What a job knows of its task besides the rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// One line saying what the task is (class-label init uses it).
    pub description: String,
    /// Class labels (classification); rows without choices are scored against them.
    pub labels: Vec<String>,
}

/// How an expert is measured on held-out rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMetric {
    /// Rank classification among the row's choices (or the task's labels).
    Accuracy,
    /// Greedy generation (24 tokens) scored by token F1 against the target.
    TokenF1,
}

impl EvalMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accuracy => "accuracy",
            Self::TokenF1 => "token_f1",
        }
    }
}

/// Most choices of a row (or labels of a task), as the library allows an instance.
pub const MAX_CHOICES: usize = 64;
/// Most bytes of one choice or label, as the library allows.
pub const MAX_CHOICE_BYTES: usize = 4 * 1024;

fn check_choices(choices: &[String], field: &str) -> Result<()> {
    if choices.len() > MAX_CHOICES {
        return Err(TrainError::invalid(
            field,
            format!("{} choices, at most {MAX_CHOICES}", choices.len()),
        ));
    }
    if let Some((j, c)) = choices
        .iter()
        .enumerate()
        .find(|(_, c)| c.len() > MAX_CHOICE_BYTES)
    {
        return Err(TrainError::too_large(
            format!("{field}[{j}]"),
            format!("{} bytes, at most {MAX_CHOICE_BYTES}", c.len()),
        ));
    }
    Ok(())
}

fn check_labels(labels: &[String]) -> Result<()> {
    check_choices(labels, "labels")
}

/// Checks the rows and returns them with their choices filled from the labels.
pub fn check_rows(rows: &[Instance], task: &TaskSpec) -> Result<Vec<Instance>> {
    if rows.is_empty() {
        return Err(TrainError::invalid("rows", "no training rows"));
    }
    if rows.len() > MAX_ROWS {
        return Err(TrainError::too_large(
            "rows",
            format!("{} rows, at most {MAX_ROWS}", rows.len()),
        ));
    }
    check_labels(&task.labels)?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        if r.input.trim().is_empty() {
            return Err(TrainError::invalid(format!("rows[{i}].input"), "is empty"));
        }
        let target = r.target.as_deref().unwrap_or("");
        if target.trim().is_empty() {
            return Err(TrainError::invalid(
                format!("rows[{i}].target"),
                "is empty: training needs the answer",
            ));
        }
        for (field, text) in [("input", r.input.as_str()), ("target", target)] {
            if text.len() > MAX_TEXT_BYTES {
                return Err(TrainError::too_large(
                    format!("rows[{i}].{field}"),
                    format!("{} bytes, at most {MAX_TEXT_BYTES}", text.len()),
                ));
            }
        }
        check_choices(&r.choices, &format!("rows[{i}].choices"))?;
        let mut r = r.clone();
        if r.choices.is_empty() {
            r.choices = task.labels.clone();
        }
        if !r.choices.is_empty() && !r.choices.iter().any(|c| c == target) {
            return Err(TrainError::invalid(
                format!("rows[{i}].target"),
                format!("{target:?} is not one of the row's choices or the task's labels"),
            ));
        }
        out.push(r);
    }
    Ok(out)
}

/// Accuracy when every row has choices, token F1 otherwise.
pub fn metric_of(rows: &[Instance]) -> EvalMetric {
    if rows.iter().all(|r| !r.choices.is_empty()) {
        EvalMetric::Accuracy
    } else {
        EvalMetric::TokenF1
    }
}

/// (training rows, held-out rows): a seeded shuffle, `fraction` of it held out (at least
/// one training row is kept).
pub fn split(rows: &[Instance], fraction: f64, seed: u64) -> (Vec<Instance>, Vec<Instance>) {
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_5eed));
    let held = ((rows.len() as f64 * fraction).floor() as usize).min(rows.len() - 1);
    let (h, t) = idx.split_at(held);
    (
        t.iter().map(|&i| rows[i].clone()).collect(),
        h.iter().map(|&i| rows[i].clone()).collect(),
    )
}

/// A row as training sees it: prompt ids and answer ids (the end id last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedRow {
    pub prompt_ids: Vec<u32>,
    pub answer_ids: Vec<u32>,
}

pub fn render(bb: &Backbone, rows: &[Instance]) -> Result<Vec<RenderedRow>> {
    let opts = bb.score_render_options();
    rows.iter()
        .map(|r| {
            Ok(RenderedRow {
                prompt_ids: bb.render_prompt(&r.input, &opts)?,
                answer_ids: bb.render_choice(r.target.as_deref().unwrap_or(""), &opts)?,
            })
        })
        .collect()
}

/// Row indices of every step's batch: seeded epochs of shuffled rows, cut into batches
/// (an epoch's last, short batch is topped up from the next epoch).
pub fn batch_plan(rows: usize, batch: usize, steps: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order = Vec::with_capacity(steps * batch);
    let mut epoch = 0u64;
    while order.len() < steps * batch {
        let mut idx: Vec<usize> = (0..rows).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            seed.wrapping_mul(1_000_003).wrapping_add(epoch),
        ));
        order.extend(idx);
        epoch += 1;
    }
    order.truncate(steps * batch);
    order.chunks(batch).map(<[usize]>::to_vec).collect()
}

/// `n` rows drawn without replacement (seeded), all of them if fewer: the expert's S
/// instances.
pub fn sample_instances(rows: &[Instance], n: usize, seed: u64) -> Vec<Instance> {
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x1a57));
    idx.truncate(n);
    idx.into_iter().map(|i| rows[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(input: &str, target: Option<&str>) -> Instance {
        Instance {
            input: input.into(),
            target: target.map(str::to_string),
            choices: Vec::new(),
        }
    }

    #[test]
    fn bad_rows_name_the_row_and_field() {
        let task = TaskSpec {
            description: "spam".into(),
            labels: vec!["ham".into(), "spam".into()],
        };
        let err = |rows: &[Instance]| match check_rows(rows, &task) {
            Err(TrainError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(err(&[]), "rows");
        assert_eq!(
            err(&[row("a", Some("ham")), row(" ", Some("ham"))]),
            "rows[1].input"
        );
        assert_eq!(err(&[row("a", None)]), "rows[0].target");
        assert_eq!(err(&[row("a", Some("eggs"))]), "rows[0].target");
        let ok = check_rows(&[row("a", Some("spam"))], &task).unwrap();
        assert_eq!(ok[0].choices, task.labels);
        assert_eq!(metric_of(&ok), EvalMetric::Accuracy);
        let free = check_rows(&[row("a", Some("anything"))], &TaskSpec::default()).unwrap();
        assert_eq!(metric_of(&free), EvalMetric::TokenF1);
    }

    #[test]
    fn split_and_plan_are_seeded_and_cover_the_rows() {
        let rows: Vec<Instance> = (0..50).map(|i| row(&format!("r{i}"), Some("x"))).collect();
        let (t, h) = split(&rows, 0.1, 3);
        assert_eq!((t.len(), h.len()), (45, 5));
        assert_eq!(split(&rows, 0.1, 3), (t.clone(), h.clone()));
        assert!(h.iter().all(|r| !t.contains(r)));
        let plan = batch_plan(45, 16, 10, 1);
        assert_eq!(plan.len(), 10);
        assert!(plan.iter().all(|b| b.len() == 16));
        // The first epoch (45 rows) covers every row once.
        let mut first: Vec<usize> = plan.concat()[..45].to_vec();
        first.sort_unstable();
        assert_eq!(first, (0..45).collect::<Vec<_>>());
        assert_eq!(batch_plan(45, 16, 10, 1), plan);
        assert_ne!(batch_plan(45, 16, 10, 2), plan);
    }
}
