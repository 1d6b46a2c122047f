//! The training loop: seeded batches, micro-batches by padded length, gradient clipping,
//! AdamW with warm-up and linear decay; and the held-out evaluation of the result.

use std::time::Instant;

use roe_backbone::metrics::token_f1;
use roe_backbone::{Adapters, Backbone, GenerateParams, Lora, ScoreIdsRequest, SoftPrompt};
use roe_expert_library::{ExpertKind, Instance, PeftAdapter};
use serde::{Deserialize, Serialize};

use crate::data::{self, EvalMetric, RenderedRow};
use crate::error::{Result, TrainError};
use crate::params::Params;
use crate::recipe::Recipe;

/// Greedy tokens generated per held-out row when the metric is token F1 (the reference
/// figures' setting).
pub const EVAL_GENERATION_TOKENS: usize = 24;

/// AdamW's moments, one pair of vectors per parameter tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdamState {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// Everything needed to continue a run: what a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    pub params: Params,
    pub adam: AdamState,
    /// Steps done.
    pub step: usize,
    /// Mean answer loss of every step done.
    pub losses: Vec<f64>,
}

impl TrainState {
    pub fn new(params: Params) -> Self {
        let zeros = |p: &Params| {
            p.tensors
                .iter()
                .map(|t| vec![0f32; t.values.len()])
                .collect()
        };
        Self {
            adam: AdamState {
                m: zeros(&params),
                v: zeros(&params),
            },
            params,
            step: 0,
            losses: Vec::new(),
        }
    }
}

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: usize,
    pub total_steps: usize,
    /// Mean answer-token loss of the step's batch.
    pub loss: f64,
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real positions (virtual tokens included, padding not) per second, this run so far.
    pub tokens_per_s: f64,
    pub steps_per_s: f64,
    pub eta_s: f64,
}

/// Rows of one step cut into micro-batches of similar length, each within `budget` padded
/// positions (a longer row runs alone).
fn micro_batches(rows: Vec<&RenderedRow>, budget: usize, extra: usize) -> Vec<Vec<&RenderedRow>> {
    let len = |r: &RenderedRow| r.prompt_ids.len() + r.answer_ids.len() - 1 + extra;
    let mut rows = rows;
    rows.sort_by_key(|r| len(r));
    let mut out: Vec<Vec<&RenderedRow>> = Vec::new();
    for r in rows {
        match out.last_mut() {
            // Sorted ascending: r is the longest of the group if it joins.
            Some(g) if (g.len() + 1) * len(r) <= budget => g.push(r),
            _ => out.push(vec![r]),
        }
    }
    out
}

/// Runs `recipe` from `state` to its last step on `rows`. After every step `on_step` gets
/// the report and the state (to checkpoint it); `cancelled` is polled between micro-batches,
/// and a cancel returns [`TrainError::Cancelled`] with `state` at the last finished step.
pub fn run(
    bb: &Backbone,
    recipe: &Recipe,
    rows: &[RenderedRow],
    state: &mut TrainState,
    cancelled: &dyn Fn() -> bool,
    on_step: &mut dyn FnMut(&StepReport, &TrainState) -> Result<()>,
) -> Result<()> {
    if rows.is_empty() {
        return Err(TrainError::invalid(
            "rows",
            "no training rows after the held-out split",
        ));
    }
    let plan = data::batch_plan(rows.len(), recipe.batch_size, recipe.steps, recipe.seed);
    let extra = match recipe.kind {
        ExpertKind::Prompt => recipe.num_virtual_tokens,
        ExpertKind::Lora => 0,
    };
    let started = Instant::now();
    let first_step = state.step;
    let mut positions_done = 0usize;
    while state.step < recipe.steps {
        let batch: Vec<&RenderedRow> = plan[state.step].iter().map(|&i| &rows[i]).collect();
        let tokens: usize = batch.iter().map(|r| r.answer_ids.len()).sum();
        let mut grads: Vec<Vec<f32>> = state
            .params
            .tensors
            .iter()
            .map(|t| vec![0f32; t.values.len()])
            .collect();
        let mut sum_nll = 0.0;
        for mb in micro_batches(batch, recipe.micro_batch_tokens, extra) {
            if cancelled() {
                return Err(TrainError::Cancelled);
            }
            let (s, _, positions, g) = state.params.loss_and_grads(bb, &mb, tokens as f64)?;
            sum_nll += s;
            positions_done += positions;
            for (acc, gi) in grads.iter_mut().zip(g) {
                for (a, b) in acc.iter_mut().zip(gi) {
                    *a += b;
                }
            }
        }
        let loss = sum_nll / tokens.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::Checkpoint(format!(
                "the loss became {loss} at step {}: lower recipe.learning_rate",
                state.step + 1
            )));
        }
        let grad_norm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt();
        let clip = if recipe.max_grad_norm > 0.0 && grad_norm > recipe.max_grad_norm {
            recipe.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = recipe.learning_rate_at(state.step);
        adamw(recipe, state, &grads, clip as f32, lr);
        state.step += 1;
        state.losses.push(loss);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let steps_per_s = (state.step - first_step) as f64 / secs;
        let report = StepReport {
            step: state.step,
            total_steps: recipe.steps,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens_per_s: positions_done as f64 / secs,
            steps_per_s,
            eta_s: (recipe.steps - state.step) as f64 / steps_per_s.max(1e-9),
        };
        on_step(&report, state)?;
    }
    Ok(())
}

/// One AdamW step (PyTorch's: decoupled weight decay, bias-corrected moments).
fn adamw(recipe: &Recipe, state: &mut TrainState, grads: &[Vec<f32>], clip: f32, lr: f64) {
    let t = (state.step + 1) as i32;
    let (b1, b2) = (recipe.adam_beta1, recipe.adam_beta2);
    let bc1 = 1.0 - b1.powi(t);
    let bc2 = 1.0 - b2.powi(t);
    let step_size = (lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let eps = recipe.adam_epsilon as f32;
    let decay = (1.0 - lr * recipe.weight_decay) as f32;
    let (b1, b2) = (b1 as f32, b2 as f32);
    for (((p, g), m), v) in state
        .params
        .tensors
        .iter_mut()
        .zip(grads)
        .zip(&mut state.adam.m)
        .zip(&mut state.adam.v)
    {
        for (((p, &g), m), v) in p
            .values
            .iter_mut()
            .zip(g)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            let g = g * clip;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p *= decay;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
    }
}

/// An adapter ready to run on the backbone.
pub enum RunnableAdapter {
    Prompt(SoftPrompt),
    Lora(Lora),
}

impl RunnableAdapter {
    pub fn from_peft(bb: &Backbone, kind: ExpertKind, a: &PeftAdapter) -> Result<Self> {
        let shape = bb.model_shape();
        Ok(match kind {
            ExpertKind::Prompt => Self::Prompt(
                SoftPrompt::from_peft_bytes_with(&a.config_json, &a.safetensors, &shape)
                    .map_err(|e| TrainError::Checkpoint(e.to_string()))?,
            ),
            ExpertKind::Lora => Self::Lora(
                Lora::from_peft_bytes_with(&a.config_json, &a.safetensors, &shape)
                    .map_err(|e| TrainError::Checkpoint(e.to_string()))?,
            ),
        })
    }

    pub fn adapters(&self) -> Adapters<'_> {
        match self {
            Self::Prompt(p) => Adapters::prompt(p),
            Self::Lora(l) => Adapters::lora(l),
        }
    }
}

/// Each member's metric on `rows` and the ensemble's: accuracy of the members' majority vote
/// (Lester et al.'s prompt ensembles; ties to the highest summed log-probability), or for
/// token F1, where answers do not vote, the members' mean.
pub fn evaluate_ensemble(
    bb: &Backbone,
    members: &[RunnableAdapter],
    rows: &[Instance],
    metric: EvalMetric,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Vec<f64>, f64)> {
    let mut scores = Vec::with_capacity(members.len());
    for m in members {
        scores.push(evaluate(bb, Some(m), rows, metric, cancelled)?);
    }
    if members.len() < 2 || rows.is_empty() || metric == EvalMetric::TokenF1 {
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        return Ok((scores, mean));
    }
    let opts = bb.score_render_options();
    let mut correct = 0usize;
    for r in rows {
        if cancelled() {
            return Err(TrainError::Cancelled);
        }
        let prompt_ids = bb.render_prompt(&r.input, &opts)?;
        let continuations = r
            .choices
            .iter()
            .map(|c| bb.render_choice(c, &opts))
            .collect::<roe_backbone::Result<Vec<_>>>()?;
        let reqs: Vec<ScoreIdsRequest<'_>> = members
            .iter()
            .map(|m| {
                let a = m.adapters();
                ScoreIdsRequest {
                    prompt_ids: prompt_ids.clone(),
                    continuations: continuations.clone(),
                    prompt: a.prompt,
                    lora: a.lora,
                    alt_end_ids: Vec::new(),
                    truncated_tokens: 0,
                }
            })
            .collect();
        let vote = roe_backbone::ensemble_vote(&bb.score_ids(&reqs)?)?;
        if r.target.as_deref() == Some(r.choices[vote.best].as_str()) {
            correct += 1;
        }
    }
    Ok((scores, correct as f64 / rows.len() as f64))
}

/// The metric of `adapter` (None: the bare backbone) on `rows`: accuracy of rank
/// classification among each row's choices, or the mean token F1 of greedy answers.
pub fn evaluate(
    bb: &Backbone,
    adapter: Option<&RunnableAdapter>,
    rows: &[Instance],
    metric: EvalMetric,
    cancelled: &dyn Fn() -> bool,
) -> Result<f64> {
    if rows.is_empty() {
        return Ok(f64::NAN);
    }
    let adapters = adapter.map(RunnableAdapter::adapters).unwrap_or_default();
    let opts = bb.score_render_options();
    let mut total = 0.0;
    for chunk in rows.chunks(8) {
        if cancelled() {
            return Err(TrainError::Cancelled);
        }
        match metric {
            EvalMetric::Accuracy => {
                let reqs = chunk
                    .iter()
                    .map(|r| {
                        Ok(ScoreIdsRequest {
                            prompt_ids: bb.render_prompt(&r.input, &opts)?,
                            continuations: r
                                .choices
                                .iter()
                                .map(|c| bb.render_choice(c, &opts))
                                .collect::<roe_backbone::Result<Vec<_>>>()?,
                            prompt: adapters.prompt,
                            lora: adapters.lora,
                            alt_end_ids: Vec::new(),
                            truncated_tokens: 0,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (r, out) in chunk.iter().zip(bb.score_ids(&reqs)?) {
                    if r.target.as_deref() == Some(r.choices[out.best].as_str()) {
                        total += 1.0;
                    }
                }
            }
            EvalMetric::TokenF1 => {
                for r in chunk {
                    let ids = bb.render_prompt(&r.input, &opts)?;
                    let g = bb.generate(
                        &ids,
                        adapters,
                        GenerateParams::greedy(EVAL_GENERATION_TOKENS),
                        |_| !cancelled(),
                    )?;
                    total += token_f1(&g.text, r.target.as_deref().unwrap_or(""));
                }
            }
        }
    }
    Ok(total / rows.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: usize, a: usize) -> RenderedRow {
        RenderedRow {
            prompt_ids: vec![5; p],
            answer_ids: vec![1; a],
        }
    }

    #[test]
    fn micro_batches_respect_the_budget_and_keep_every_row() {
        let rows = [row(10, 2), row(100, 3), row(30, 2), row(31, 2), row(600, 2)];
        let groups = micro_batches(rows.iter().collect(), 128, 20);
        let total: usize = groups.iter().map(Vec::len).sum();
        assert_eq!(total, rows.len());
        for g in &groups {
            let longest = g
                .iter()
                .map(|r| r.prompt_ids.len() + r.answer_ids.len() - 1 + 20)
                .max()
                .unwrap();
            assert!(
                g.len() == 1 || g.len() * longest <= 128,
                "{} x {longest}",
                g.len()
            );
        }
        // The long row runs alone.
        assert!(groups
            .iter()
            .any(|g| g.len() == 1 && g[0].prompt_ids.len() == 600));
    }
}
