//! Training recipes: every hyper-parameter of a job, with defaults that reproduce the
//! reference experts (`assets/experts/README.md`), and their validation.

use roe_backbone::experts::{MAX_LORA_RANK, MAX_VIRTUAL_TOKENS};
use roe_backbone::LoraTarget;
use roe_expert_library::ExpertKind;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How a soft prompt's vectors start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "text")]
pub enum PromptInit {
    /// Lester et al.'s class-label init: the embeddings of the tokens of the task's
    /// description followed by its label words, repeated to fill the prompt (PEFT's TEXT
    /// init of that text).
    ClassLabels,
    /// Gaussian vectors at the scale of the vocabulary's embeddings.
    Random,
    /// Embeddings of tokens drawn from the 5,000 most frequent (lowest BPE ids).
    VocabSample,
    /// Embeddings of the tokens of this text, repeated to fill the prompt.
    Text(String),
}

impl PromptInit {
    pub fn parse(name: &str, text: &str) -> Option<Self> {
        Some(match name {
            "" | "class_labels" => Self::ClassLabels,
            "random" => Self::Random,
            "vocab_sample" => Self::VocabSample,
            "text" => Self::Text(text.to_string()),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::ClassLabels => "class_labels",
            Self::Random => "random",
            Self::VocabSample => "vocab_sample",
            Self::Text(_) => "text",
        }
    }
}

/// Everything that decides what a job trains. Serialised into the job's state and the
/// expert's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub kind: ExpertKind,
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// AdamW's peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up from 0 over this many steps, then linear decay to 0 at `steps`.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Gradients are rescaled to at most this global norm (0: no clipping).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Share of the rows kept out of training to measure the expert (0 keeps none).
    pub held_out_fraction: f64,
    /// At most this many held-out rows are evaluated.
    pub max_eval_rows: usize,
    /// S: training rows sampled into the library as the expert's instances.
    pub instances: usize,
    /// Prompt: number of virtual tokens, and how they start.
    pub num_virtual_tokens: usize,
    pub prompt_init: PromptInit,
    /// LoRA: rank, alpha (scale alpha / r) and the adapted projections.
    pub lora_rank: usize,
    pub lora_alpha: f64,
    #[serde(with = "target_names")]
    pub lora_targets: Vec<LoraTarget>,
    /// Rows of a step run in micro-batches of at most this many padded positions, their
    /// gradients summed: bounds the activations kept for the backward pass.
    pub micro_batch_tokens: usize,
    /// A checkpoint is written every this many steps (and when the job is stopped).
    pub checkpoint_every: usize,
}

/// Most steps a job may ask for.
pub const MAX_STEPS: usize = 100_000;
/// Largest batch.
pub const MAX_BATCH: usize = 512;

impl Recipe {
    /// The reference experts' recipe for `kind`: prompt — 20 virtual tokens, class-label
    /// init, AdamW 3e-2, 300 steps; LoRA — r 4, alpha 8, q_proj and v_proj, AdamW 2e-3, 200
    /// steps; both batch 16, 20 warm-up steps then linear decay.
    pub fn defaults(kind: ExpertKind) -> Self {
        let (steps, lr) = match kind {
            ExpertKind::Prompt => (300, 3e-2),
            ExpertKind::Lora => (200, 2e-3),
        };
        Self {
            kind,
            steps,
            batch_size: 16,
            learning_rate: lr,
            warmup_steps: 20,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 0,
            held_out_fraction: 0.1,
            max_eval_rows: 200,
            instances: 100,
            num_virtual_tokens: 20,
            prompt_init: PromptInit::ClassLabels,
            lora_rank: 4,
            lora_alpha: 8.0,
            lora_targets: vec![LoraTarget::QProj, LoraTarget::VProj],
            micro_batch_tokens: 512,
            checkpoint_every: 25,
        }
    }

    /// Checks every value; the error names the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(TrainError::invalid(field, msg));
        let unit = |field: &str, v: f64, lo: f64, hi: f64| -> Result<()> {
            if !v.is_finite() || v < lo || v > hi {
                return Err(TrainError::invalid(
                    field,
                    format!("{v} is outside [{lo}, {hi}]"),
                ));
            }
            Ok(())
        };
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(
                "recipe.steps",
                format!("{} is outside 1..={MAX_STEPS}", self.steps),
            );
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return bad(
                "recipe.batch_size",
                format!("{} is outside 1..={MAX_BATCH}", self.batch_size),
            );
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 || self.learning_rate > 1.0
        {
            return bad(
                "recipe.learning_rate",
                format!("{} is outside (0, 1]", self.learning_rate),
            );
        }
        if self.warmup_steps > self.steps {
            return bad(
                "recipe.warmup_steps",
                format!("{} exceeds steps ({})", self.warmup_steps, self.steps),
            );
        }
        unit("recipe.weight_decay", self.weight_decay, 0.0, 1.0)?;
        unit("recipe.adam_beta1", self.adam_beta1, 0.0, 0.999_999)?;
        unit("recipe.adam_beta2", self.adam_beta2, 0.0, 0.999_999_9)?;
        unit("recipe.adam_epsilon", self.adam_epsilon, 1e-12, 1.0)?;
        unit("recipe.max_grad_norm", self.max_grad_norm, 0.0, 1e6)?;
        unit("recipe.held_out_fraction", self.held_out_fraction, 0.0, 0.5)?;
        if self.instances == 0 || self.instances > 10_000 {
            return bad(
                "recipe.instances",
                format!("{} is outside 1..=10000", self.instances),
            );
        }
        if self.micro_batch_tokens < 16 || self.micro_batch_tokens > 65_536 {
            return bad(
                "recipe.micro_batch_tokens",
                format!("{} is outside 16..=65536", self.micro_batch_tokens),
            );
        }
        if self.checkpoint_every == 0 {
            return bad("recipe.checkpoint_every", "must be at least 1".into());
        }
        match self.kind {
            ExpertKind::Prompt => {
                if self.num_virtual_tokens == 0 || self.num_virtual_tokens > MAX_VIRTUAL_TOKENS {
                    return bad(
                        "recipe.num_virtual_tokens",
                        format!(
                            "{} is outside 1..={MAX_VIRTUAL_TOKENS}",
                            self.num_virtual_tokens
                        ),
                    );
                }
                if let PromptInit::Text(t) = &self.prompt_init {
                    if t.trim().is_empty() {
                        return bad("recipe.prompt_init_text", "is empty".into());
                    }
                }
            }
            ExpertKind::Lora => {
                if self.lora_rank == 0 || self.lora_rank > MAX_LORA_RANK {
                    return bad(
                        "recipe.lora_rank",
                        format!("{} is outside 1..={MAX_LORA_RANK}", self.lora_rank),
                    );
                }
                if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
                    return bad(
                        "recipe.lora_alpha",
                        format!("{} must be positive", self.lora_alpha),
                    );
                }
                if self.lora_targets.is_empty() {
                    return bad("recipe.lora_targets", "names no projection".into());
                }
            }
        }
        Ok(())
    }

    /// Learning rate at step `step` (0-based): linear warm-up from 0, then linear decay to 0
    /// (transformers' `get_linear_schedule_with_warmup`, which the reference experts were
    /// trained with: step 0 runs at 0 and only feeds AdamW's moments).
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let s = step as f64;
        if step < self.warmup_steps {
            return self.learning_rate * s / self.warmup_steps as f64;
        }
        let decay = (self.steps - self.warmup_steps).max(1) as f64;
        self.learning_rate * ((self.steps as f64 - s) / decay).clamp(0.0, 1.0)
    }
}

/// A LoRA target from PEFT's module name (`q_proj`, ...).
pub fn parse_target(name: &str) -> Option<LoraTarget> {
    LoraTarget::ALL.into_iter().find(|t| t.name() == name)
}

/// LoRA targets serialised by their PEFT module names.
mod target_names {
    use roe_backbone::LoraTarget;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(targets: &[LoraTarget], s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
        names.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LoraTarget>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names
            .iter()
            .map(|n| {
                super::parse_target(n)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown LoRA target {n:?}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_field() {
        for kind in [ExpertKind::Prompt, ExpertKind::Lora] {
            Recipe::defaults(kind).validate().unwrap();
        }
        type Change = Box<dyn Fn(&mut Recipe)>;
        let cases: Vec<(&str, Change)> = vec![
            ("recipe.steps", Box::new(|r| r.steps = 0)),
            ("recipe.batch_size", Box::new(|r| r.batch_size = 0)),
            (
                "recipe.learning_rate",
                Box::new(|r| r.learning_rate = f64::NAN),
            ),
            ("recipe.learning_rate", Box::new(|r| r.learning_rate = -1.0)),
            ("recipe.warmup_steps", Box::new(|r| r.warmup_steps = 301)),
            (
                "recipe.held_out_fraction",
                Box::new(|r| r.held_out_fraction = 0.9),
            ),
            (
                "recipe.num_virtual_tokens",
                Box::new(|r| r.num_virtual_tokens = 0),
            ),
            ("recipe.instances", Box::new(|r| r.instances = 0)),
            (
                "recipe.prompt_init_text",
                Box::new(|r| r.prompt_init = PromptInit::Text(" ".into())),
            ),
        ];
        for (field, change) in cases {
            let mut r = Recipe::defaults(ExpertKind::Prompt);
            change(&mut r);
            match r.validate() {
                Err(TrainError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut r = Recipe::defaults(ExpertKind::Lora);
        r.lora_rank = 0;
        assert!(
            matches!(r.validate(), Err(TrainError::Invalid { field, .. }) if field == "recipe.lora_rank")
        );
        r.lora_rank = 4;
        r.lora_targets.clear();
        assert!(
            matches!(r.validate(), Err(TrainError::Invalid { field, .. }) if field == "recipe.lora_targets")
        );
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let r = Recipe::defaults(ExpertKind::Prompt);
        assert_eq!(r.learning_rate_at(0), 0.0);
        assert!((r.learning_rate_at(10) - 3e-2 / 2.0).abs() < 1e-12);
        assert!((r.learning_rate_at(20) - 3e-2).abs() < 1e-12);
        assert!(r.learning_rate_at(160) < r.learning_rate_at(100));
        assert!(r.learning_rate_at(299) > 0.0);
        assert!(r.learning_rate_at(299) < 3e-2 / 100.0);
    }
}
