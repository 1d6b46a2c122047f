//! [`Backend`] for the GGUF backbone on candle ([`roe_backbone::Backbone`]).

use roe_backbone::{
    Adapters, Backbone, BatchGenerator, FinishReason, GenerateRequest, GeneratedToken, Lora,
    RenderOptions, ScoreOutput, SoftPrompt,
};
use roe_expert_library::{ExpertKind, PeftAdapter};

use crate::backend::{Backend, GenerationBatch, GenerationInput, PromptFormat, ScoreInput};
use crate::error::{Result, ServingError};

/// An expert loaded for the backbone.
pub enum LoadedExpert {
    Prompt(SoftPrompt),
    Lora(Lora),
}

impl LoadedExpert {
    pub fn adapters(&self) -> Adapters<'_> {
        match self {
            LoadedExpert::Prompt(p) => Adapters::prompt(p),
            LoadedExpert::Lora(l) => Adapters::lora(l),
        }
    }
}

fn adapters(expert: Option<&LoadedExpert>) -> Adapters<'_> {
    expert.map(LoadedExpert::adapters).unwrap_or_default()
}

/// The id that scored answers end with (see [`Backbone::answer_end_id`]).
pub fn answer_end_id(backbone: &Backbone) -> u32 {
    backbone.answer_end_id()
}

impl Backend for Backbone {
    type Expert = LoadedExpert;
    type Generation<'a> = BackboneGeneration<'a>;

    fn load_expert(&self, kind: ExpertKind, adapter: &PeftAdapter) -> Result<LoadedExpert> {
        let spec = self.model_shape();
        let unusable = |e: &dyn std::fmt::Display| ServingError::precondition(e.to_string());
        Ok(match kind {
            ExpertKind::Prompt => {
                let p = SoftPrompt::from_peft_bytes_with(
                    &adapter.config_json,
                    &adapter.safetensors,
                    &spec,
                )
                .map_err(|e| unusable(&e))?;
                self.check_soft_prompt(&p).map_err(|e| unusable(&e))?;
                LoadedExpert::Prompt(p)
            }
            ExpertKind::Lora => {
                let l =
                    Lora::from_peft_bytes_with(&adapter.config_json, &adapter.safetensors, &spec)
                        .map_err(|e| unusable(&e))?;
                self.check_lora(&l).map_err(|e| unusable(&e))?;
                LoadedExpert::Lora(l)
            }
        })
    }

    fn score_batch(
        &self,
        inputs: &[ScoreInput<'_, LoadedExpert>],
    ) -> Result<Vec<Option<ScoreOutput>>> {
        let reqs: Vec<roe_backbone::ScoreRequest<'_>> = inputs
            .iter()
            .map(|i| roe_backbone::ScoreRequest {
                input: i.input,
                choices: i.choices,
                adapters: adapters(i.expert),
            })
            .collect();
        Ok(
            self.score_batch_while(&reqs, &self.score_render_options(), &|i| {
                !(inputs[i].withdrawn)()
            })?,
        )
    }

    fn generation(&self) -> BackboneGeneration<'_> {
        BackboneGeneration {
            backbone: self,
            generator: BatchGenerator::new(self),
        }
    }

    fn chat_prompt(&self, messages: &[roe_backbone::ChatMessage]) -> Result<String> {
        Ok(self.render_chat(messages)?)
    }

    fn prompt_tokens(&self, input: &str, format: PromptFormat) -> Result<usize> {
        Ok(match format {
            PromptFormat::Canonical => self.render_prompt(input, &RenderOptions::default())?,
            PromptFormat::Raw => self.raw_prompt(input)?,
        }
        .len())
    }
}

/// A [`BatchGenerator`] that renders its requests' prompts as it admits them.
pub struct BackboneGeneration<'a> {
    backbone: &'a Backbone,
    generator: BatchGenerator<'a>,
}

impl GenerationBatch<LoadedExpert> for BackboneGeneration<'_> {
    fn admit(&mut self, inputs: &[GenerationInput<'_, LoadedExpert>]) -> Result<()> {
        let mut reqs = Vec::with_capacity(inputs.len());
        for i in inputs {
            let prompt_ids = match i.format {
                PromptFormat::Canonical => self
                    .backbone
                    .render_prompt(i.input, &RenderOptions::default())?,
                PromptFormat::Raw => self.backbone.raw_prompt(i.input)?,
            };
            reqs.push(GenerateRequest {
                prompt_ids,
                adapters: adapters(i.expert),
                params: i.params.clone(),
            });
        }
        Ok(self.generator.admit(&reqs)?)
    }
    fn retain_unfinished(&mut self) -> Result<Vec<usize>> {
        Ok(self.generator.retain_unfinished()?)
    }
    fn len(&self) -> usize {
        self.generator.len()
    }
    fn is_done(&self) -> bool {
        self.generator.is_done()
    }
    fn finish_reason(&self, row: usize) -> Option<FinishReason> {
        self.generator.finish_reason(row)
    }
    fn stop_row(&mut self, row: usize) {
        self.generator.stop_row(row)
    }
    fn step(&mut self) -> Result<Vec<Option<GeneratedToken>>> {
        Ok(self.generator.step()?)
    }
}
