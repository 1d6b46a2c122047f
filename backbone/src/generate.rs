//! Token-by-token generation (greedy or sampled) with stop strings, as an iterator.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{BackboneError, Result};
use crate::experts::Adapters;
use crate::model::{Backbone, KvCache, LoraBatch};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    /// 0 (or below): greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass (1.0: off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    pub seed: u64,
    /// Generation stops as soon as the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop at the end tokens of [`Backbone::end_token_ids`] (EOS and the chat/document
    /// boundary tokens).
    pub stop_at_eos: bool,
    /// More token ids that end generation (not included in the text).
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            stop_at_eos: true,
            stop_token_ids: Vec::new(),
        }
    }
}

impl GenerateParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced EOS.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generation step.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// The sampled id (EOS on an EOS stop).
    pub id: u32,
    /// Newly released text (may be empty while a possible stop string or an incomplete
    /// UTF-8 sequence is held back).
    pub text: String,
    /// Log-probability of `id` under the model (temperature 1).
    pub logprob: f32,
    /// Set on the last step.
    pub finish: Option<FinishReason>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// Generated ids (EOS excluded).
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

/// Iterator over generated tokens. The prompt is run when the generator is created.
pub struct Generator<'a> {
    bb: &'a Backbone,
    cache: KvCache,
    loras: LoraBatch,
    params: GenerateParams,
    rng: StdRng,
    ids: Vec<u32>,
    /// Logits of the next position.
    logits: Vec<f32>,
    text: String,
    emitted: usize,
    finished: Option<FinishReason>,
    prompt_tokens: usize,
    scratch: Vec<(f32, u32)>,
}

impl Backbone {
    /// Start generating after `prompt_ids` (with the row's soft prompt and/or LoRA).
    pub fn generator<'a>(
        &'a self,
        prompt_ids: &[u32],
        adapters: Adapters<'_>,
        params: GenerateParams,
    ) -> Result<Generator<'a>> {
        if prompt_ids.is_empty() && adapters.prompt.is_none() {
            return Err(BackboneError::InvalidInput("empty prompt".into()));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0 && params.temperature.is_finite()) {
            return Err(BackboneError::InvalidInput(format!(
                "invalid sampling parameters: temperature {}, top_p {}",
                params.temperature, params.top_p
            )));
        }
        if params.stop.iter().any(|s| s.is_empty()) {
            return Err(BackboneError::InvalidInput("empty stop string".into()));
        }
        let (embeds, lens) = self.embed_rows(&[(adapters.prompt, prompt_ids)])?;
        let loras = LoraBatch::new(&[adapters.lora])?;
        let mut cache = KvCache::with_capacity(params.max_new_tokens + 1);
        let hidden = self.forward(&embeds, &lens, &mut cache, &loras)?;
        let logits = self.last_logits(&hidden, lens[0] - 1)?;
        Ok(Generator {
            bb: self,
            cache,
            loras,
            rng: StdRng::seed_from_u64(params.seed),
            params,
            ids: Vec::new(),
            logits,
            text: String::new(),
            emitted: 0,
            finished: None,
            prompt_tokens: lens[0],
            scratch: Vec::new(),
        })
    }

    /// Generate to completion, calling `on_token` for every step; returning false from it
    /// stops early (finish reason Stop).
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        adapters: Adapters<'_>,
        params: GenerateParams,
        mut on_token: impl FnMut(&GeneratedToken) -> bool,
    ) -> Result<Generation> {
        let mut g = self.generator(prompt_ids, adapters, params)?;
        let mut reason = FinishReason::Length;
        for step in g.by_ref() {
            let step = step?;
            if let Some(f) = step.finish {
                reason = f;
            }
            if !on_token(&step) && step.finish.is_none() {
                reason = FinishReason::Stop;
                break;
            }
        }
        Ok(Generation {
            text: g.text().to_string(),
            ids: g.ids().to_vec(),
            finish_reason: g.finish_reason().unwrap_or(reason),
            prompt_tokens: g.prompt_tokens,
        })
    }

    /// Ids that end a generation when `stop_at_eos`: EOS (`<|im_end|>`, 2), plus
    /// `<|endoftext|>` and `<|im_start|>` when the vocabulary has them (the reference experts
    /// end their answers with `<|im_start|>`).
    pub fn end_token_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos_token_id()];
        for t in ["<|endoftext|>", "<|im_start|>"] {
            if let Some(id) = self.tokenizer().token_to_id(t) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn last_logits(&self, hidden: &Tensor, pos: usize) -> Result<Vec<f32>> {
        let h = self.gather_positions(hidden, &[(0, pos)])?;
        Ok(self.logits(&h)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (logits[id] - max) - sum.ln() as f32
}

impl<'a> Generator<'a> {
    pub fn text(&self) -> &str {
        &self.text
    }
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    fn sample(&mut self) -> u32 {
        let logits = &self.logits;
        let greedy = self.params.temperature <= 0.0;
        if greedy {
            let mut best = 0usize;
            let mut bv = f32::NEG_INFINITY;
            for (i, &v) in logits.iter().enumerate() {
                if v > bv {
                    bv = v;
                    best = i;
                }
            }
            return best as u32;
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (((v - max) / t).exp(), i as u32)),
        );
        let cands = &mut self.scratch;
        let k = if self.params.top_k > 0 {
            self.params.top_k.min(cands.len())
        } else {
            cands.len()
        };
        if k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            cands.truncate(k);
        }
        if self.params.top_p < 1.0 {
            cands.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            let total: f32 = cands.iter().map(|c| c.0).sum();
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += c.0 / total;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let total: f32 = cands.iter().map(|c| c.0).sum();
        let mut u = self.rng.gen::<f32>() * total;
        for c in cands.iter() {
            u -= c.0;
            if u <= 0.0 {
                return c.1;
            }
        }
        cands.last().map(|c| c.1).unwrap_or(0)
    }

    /// Text that can be released: all but an incomplete UTF-8 tail or a possible stop-string
    /// prefix.
    fn safe_end(&self) -> usize {
        let text = &self.text;
        let mut end = text.len();
        while text[..end].ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let mut hold = 0;
        for s in &self.params.stop {
            for (i, _) in s.char_indices().skip(1) {
                if text[..end].ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let mut e = end - hold.min(end);
        while !text.is_char_boundary(e) {
            e -= 1;
        }
        e.max(self.emitted.min(text.len()))
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.min(self.text.len());
        let out = if upto > self.emitted {
            self.text.get(self.emitted..upto).unwrap_or("").to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(upto);
        out
    }

    fn step(&mut self) -> Result<GeneratedToken> {
        let id = self.sample();
        let logprob = log_softmax_at(&self.logits, id as usize);
        let is_end = (self.params.stop_at_eos && self.bb.end_token_ids().contains(&id))
            || self.params.stop_token_ids.contains(&id);
        if is_end {
            self.finished = Some(FinishReason::Eos);
            let text = self.release(self.text.len());
            return Ok(GeneratedToken {
                id,
                text,
                logprob,
                finish: self.finished,
            });
        }
        self.ids.push(id);
        self.text = self.bb.decode(&self.ids)?;
        // Stop strings.
        if !self.params.stop.is_empty() {
            let from = self
                .emitted
                .saturating_sub(self.params.stop.iter().map(|s| s.len()).max().unwrap_or(0));
            let mut cut: Option<usize> = None;
            for s in &self.params.stop {
                let mut f = from;
                while !self.text.is_char_boundary(f) {
                    f -= 1;
                }
                if let Some(p) = self.text[f..].find(s.as_str()) {
                    let p = f + p;
                    cut = Some(cut.map_or(p, |c: usize| c.min(p)));
                }
            }
            if let Some(c) = cut {
                self.text.truncate(c.max(self.emitted.min(c)));
                self.finished = Some(FinishReason::Stop);
                let text = self.release(self.text.len());
                return Ok(GeneratedToken {
                    id,
                    text,
                    logprob,
                    finish: self.finished,
                });
            }
        }
        if self.ids.len() >= self.params.max_new_tokens {
            self.finished = Some(FinishReason::Length);
            let text = self.release(self.text.len());
            return Ok(GeneratedToken {
                id,
                text,
                logprob,
                finish: self.finished,
            });
        }
        let upto = self.safe_end();
        let text = self.release(upto);
        // Run the new token.
        let embeds = self.bb.embed_ids(&[id])?.unsqueeze(0)?;
        let hidden = self
            .bb
            .forward(&embeds, &[1], &mut self.cache, &self.loras)?;
        self.logits = self.bb.last_logits(&hidden, 0)?;
        Ok(GeneratedToken {
            id,
            text,
            logprob,
            finish: None,
        })
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<GeneratedToken>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished.is_some() {
            return None;
        }
        if self.params.max_new_tokens == 0 {
            self.finished = Some(FinishReason::Length);
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.finished = Some(FinishReason::Length);
        }
        Some(r)
    }
}
