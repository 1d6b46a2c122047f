//! [`Backend`] for the GGUF backbone on candle ([`roe_backbone::Backbone`]).

use roe_backbone::{
    keep_last, Adapters, Backbone, BatchGenerator, FinishReason, GenerateRequest, GeneratedToken,
    Lora, ScoreIdsRequest, ScoreOutput, SoftPrompt,
};
use roe_expert_library::{ExpertKind, PeftAdapter};

use crate::backend::{Backend, GenerationBatch, GenerationInput, PromptFormat, ScoreInput};
use crate::context::PromptCount;
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
        let opts = self.serving_render_options();
        let mut rendered = Vec::with_capacity(inputs.len());
        let mut at = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            // Rendering a long input is work too: a withdrawn one is not rendered.
            if (input.withdrawn)() {
                continue;
            }
            let (mut prompt_ids, _) = self.render_prompt_counted(input.input, &opts)?;
            let truncated_tokens = keep_last(&mut prompt_ids, input.keep);
            let continuations = input
                .choices
                .iter()
                .map(|c| self.render_choice(c, &opts))
                .collect::<roe_backbone::Result<Vec<_>>>()?;
            let adapters = adapters(input.expert);
            rendered.push(ScoreIdsRequest {
                prompt_ids,
                continuations,
                prompt: adapters.prompt,
                lora: adapters.lora,
                alt_end_ids: Vec::new(),
                truncated_tokens,
            });
            at.push(i);
        }
        let outs = self.score_ids_while(&rendered, &|k| !(inputs[at[k]].withdrawn)())?;
        let mut results: Vec<Option<ScoreOutput>> = vec![None; inputs.len()];
        for (i, o) in at.into_iter().zip(outs) {
            results[i] = o;
        }
        Ok(results)
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

    fn count_tokens(
        &self,
        input: &str,
        format: PromptFormat,
        choices: &[String],
    ) -> Result<PromptCount> {
        let opts = self.serving_render_options();
        let prompt = self.prompt_ids(input, format)?.len();
        let mut longest_choice = 0;
        for c in choices {
            longest_choice = longest_choice.max(self.render_choice(c, &opts)?.len());
        }
        Ok(PromptCount {
            prompt,
            longest_choice,
        })
    }

    fn context_length(&self) -> usize {
        Backbone::context_length(self)
    }

    fn soft_prompt_tokens(&self, expert: &LoadedExpert) -> usize {
        match expert {
            LoadedExpert::Prompt(p) => p.num_virtual_tokens(),
            LoadedExpert::Lora(_) => 0,
        }
    }
}

/// The prompt ids of `input` in `format`, whole.
trait PromptIds {
    fn prompt_ids(&self, input: &str, format: PromptFormat) -> Result<Vec<u32>>;
}

impl PromptIds for Backbone {
    fn prompt_ids(&self, input: &str, format: PromptFormat) -> Result<Vec<u32>> {
        Ok(match format {
            PromptFormat::Canonical => {
                self.render_prompt_counted(input, &self.serving_render_options())?
                    .0
            }
            PromptFormat::Raw => self.raw_prompt(input)?,
        })
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
            let mut prompt_ids = self.backbone.prompt_ids(i.input, i.format)?;
            keep_last(&mut prompt_ids, i.keep);
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
