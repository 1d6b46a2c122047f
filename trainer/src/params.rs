//! The trained parameters (a soft prompt, or LoRA A/B matrices in PEFT's layout), how they
//! start, and what they become: candle variables for a step, a PEFT adapter when done.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use roe_backbone::{AnswerRow, Backbone, LoraBlock, TrainAdapter, TrainLora};
use roe_expert_library::{ExpertKind, PeftAdapter};
use roe_peft::{AdapterOrigin, LoraAdapter, LoraConfig, SoftPromptAdapter};

use crate::data::{RenderedRow, TaskSpec};
use crate::error::{Result, TrainError};
use crate::recipe::{PromptInit, Recipe};

/// Class-label / vocab-sample init draw from the lowest ids (the most frequent BPE merges).
const FREQUENT_TOKENS: usize = 5000;

/// One trained tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Everything a job trains, in a fixed order (the optimizer's and the checkpoint's).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub kind: ExpertKind,
    pub tensors: Vec<ParamTensor>,
    /// LoRA only: (layer, target) of each A/B pair, tensors 2i and 2i + 1.
    pub lora_blocks: Vec<(usize, roe_backbone::LoraTarget)>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
}

/// `ids` repeated (or cut) to `n`: how a text fills a prompt of n virtual tokens (PEFT's TEXT
/// init).
pub fn repeat_to(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

/// The text class-label init starts from: the task's description, then its label words.
pub fn class_label_text(task: &TaskSpec) -> String {
    format!("{} {}", task.description.trim(), task.labels.join(" "))
        .trim()
        .to_string()
}

impl Params {
    /// The starting point of `recipe` on `bb` for `task` (seeded).
    pub fn init(bb: &Backbone, recipe: &Recipe, task: &TaskSpec) -> Result<Self> {
        let shape = bb.model_shape();
        let mut rng = rand::rngs::StdRng::seed_from_u64(recipe.seed);
        match recipe.kind {
            ExpertKind::Prompt => {
                let n = recipe.num_virtual_tokens;
                let from_text = |text: &str, field: &str| -> Result<Vec<f32>> {
                    let ids = bb.encode(text)?;
                    if ids.is_empty() {
                        return Err(TrainError::invalid(field, "has no tokens to start from"));
                    }
                    let t = bb.token_embeddings(&repeat_to(&ids, n))?;
                    Ok(t.flatten_all()?.to_vec1::<f32>()?)
                };
                let values = match &recipe.prompt_init {
                    PromptInit::ClassLabels => {
                        let text = class_label_text(task);
                        if text.is_empty() {
                            return Err(TrainError::invalid(
                                "task_description",
                                "class-label init needs a description or labels",
                            ));
                        }
                        from_text(&text, "task_description")?
                    }
                    PromptInit::Text(t) => from_text(t, "recipe.prompt_init_text")?,
                    PromptInit::VocabSample => {
                        let top = FREQUENT_TOKENS.min(bb.vocab_size()) as u32;
                        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..top)).collect();
                        bb.token_embeddings(&ids)?.flatten_all()?.to_vec1::<f32>()?
                    }
                    PromptInit::Random => {
                        let rms = bb.embedding_rms()?;
                        let normal = Normal::new(0.0f32, rms.max(1e-6))
                            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
                        (0..n * shape.hidden_size)
                            .map(|_| normal.sample(&mut rng))
                            .collect()
                    }
                };
                Ok(Self {
                    kind: ExpertKind::Prompt,
                    tensors: vec![ParamTensor {
                        name: roe_peft::PROMPT_EMBEDDINGS.into(),
                        shape: vec![n, shape.hidden_size],
                        values,
                    }],
                    lora_blocks: Vec::new(),
                    lora_rank: 0,
                    lora_alpha: 0.0,
                })
            }
            ExpertKind::Lora => {
                let r = recipe.lora_rank;
                let mut targets = recipe.lora_targets.clone();
                targets.sort();
                targets.dedup();
                let mut tensors = Vec::new();
                let mut blocks = Vec::new();
                for layer in 0..shape.num_layers {
                    for &target in &targets {
                        let (fin, fout) = target.dims(&shape);
                        // PEFT: A kaiming-uniform (a = sqrt 5, bound 1/sqrt(in)), B zero.
                        let bound = 1.0 / (fin as f32).sqrt();
                        tensors.push(ParamTensor {
                            name: format!("layers.{layer}.{}.lora_A", target.name()),
                            shape: vec![r, fin],
                            values: (0..r * fin)
                                .map(|_| rng.random_range(-bound..bound))
                                .collect(),
                        });
                        tensors.push(ParamTensor {
                            name: format!("layers.{layer}.{}.lora_B", target.name()),
                            shape: vec![fout, r],
                            values: vec![0.0; fout * r],
                        });
                        blocks.push((layer, target));
                    }
                }
                Ok(Self {
                    kind: ExpertKind::Lora,
                    tensors,
                    lora_blocks: blocks,
                    lora_rank: r,
                    lora_alpha: recipe.lora_alpha,
                })
            }
        }
    }

    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    fn lora_scale(&self) -> f64 {
        roe_peft::lora_scale(self.lora_alpha, self.lora_rank, false)
    }

    /// The summed answer NLL of `rows` and its gradient for every tensor, scaled by
    /// `1 / denominator` (the step's token count, so micro-batches add up to the mean).
    pub fn loss_and_grads(
        &self,
        bb: &Backbone,
        rows: &[&RenderedRow],
        denominator: f64,
    ) -> Result<(f64, usize, usize, Vec<Vec<f32>>)> {
        let vars = self
            .tensors
            .iter()
            .map(|t| {
                Var::from_tensor(&Tensor::from_slice(
                    &t.values,
                    t.shape.as_slice(),
                    &Device::Cpu,
                )?)
            })
            .collect::<candle_core::Result<Vec<Var>>>()?;
        let answer_rows: Vec<AnswerRow<'_>> = rows
            .iter()
            .map(|r| AnswerRow {
                prompt_ids: &r.prompt_ids,
                answer_ids: &r.answer_ids,
            })
            .collect();
        let lora;
        let adapter = match self.kind {
            ExpertKind::Prompt => TrainAdapter::Prompt(vars[0].as_tensor()),
            ExpertKind::Lora => {
                let shape = bb.model_shape();
                let mut l = TrainLora {
                    scale: self.lora_scale(),
                    layers: (0..shape.num_layers).map(|_| Default::default()).collect(),
                };
                for (i, &(layer, target)) in self.lora_blocks.iter().enumerate() {
                    l.layers[layer][target.index()] = Some((
                        vars[2 * i].as_tensor().clone(),
                        vars[2 * i + 1].as_tensor().clone(),
                    ));
                }
                lora = l;
                TrainAdapter::Lora(&lora)
            }
        };
        let loss = bb.answer_loss(&answer_rows, adapter)?;
        let sum = loss.sum_nll.to_scalar::<f32>()? as f64;
        let grads = (loss.sum_nll / denominator)?.backward()?;
        let g = vars
            .iter()
            .zip(&self.tensors)
            .map(|(v, t)| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.flatten_all()?.to_vec1::<f32>()?),
                None => Ok(vec![0.0; t.values.len()]),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((sum, loss.tokens, loss.positions, g))
    }

    /// The parameters as a PEFT adapter (what the library stores and `export` writes).
    pub fn to_peft(&self, bb: &Backbone, base_model: &str) -> Result<PeftAdapter> {
        let shape = bb.model_shape();
        let origin = AdapterOrigin {
            base_model_name_or_path: Some(base_model.to_string()),
            task_type: Some("CAUSAL_LM".into()),
        };
        let files = match self.kind {
            ExpertKind::Prompt => {
                let t = &self.tensors[0];
                SoftPromptAdapter::new(t.values.clone(), t.shape[0], &shape)?
                    .with_origin(origin)
                    .to_peft()?
            }
            ExpertKind::Lora => {
                let mut targets: Vec<_> = self.lora_blocks.iter().map(|b| b.1).collect();
                targets.sort();
                targets.dedup();
                let mut config = LoraConfig::new(self.lora_rank, self.lora_alpha, targets);
                config.origin = origin;
                let blocks = self
                    .lora_blocks
                    .iter()
                    .enumerate()
                    .map(|(i, &(layer, target))| LoraBlock {
                        layer,
                        target,
                        a: self.tensors[2 * i].values.clone(),
                        b: self.tensors[2 * i + 1].values.clone(),
                    })
                    .collect();
                LoraAdapter::new(config, blocks, &shape)?.to_peft()?
            }
        };
        Ok(PeftAdapter {
            config_json: files.config_json,
            safetensors: files.safetensors,
        })
    }
}
