//! Token-by-token generation (greedy or sampled) with stop strings, as an iterator.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{BackboneError, Result};
use crate::experts::{Adapters, Lora};
use crate::model::{Backbone, KvCache, LoraBatch};
use crate::score::length_groups;

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

/// The decoding state of one sequence: sampling, stop handling and released text.
struct Row {
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

/// One generation request of a batch.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    pub prompt_ids: Vec<u32>,
    pub adapters: Adapters<'a>,
    pub params: GenerateParams,
}

/// Several sequences decoded together: each step runs one forward for every row still
/// generating (each with its own soft prompt, LoRA, sampling parameters and stops), so
/// concurrent requests for different experts share the weights' passes. Rows that finish, or
/// that [`BatchGenerator::stop_row`] ends, take no further part; new requests can join a
/// running batch between steps ([`BatchGenerator::admit`], continuous batching) once the
/// finished rows are dropped ([`BatchGenerator::retain_unfinished`]). At most
/// [`MAX_GENERATE_BATCH`] rows.
pub struct BatchGenerator<'a> {
    bb: &'a Backbone,
    cache: KvCache,
    /// The rows' LoRAs as one batch, rebuilt from `row_loras` when rows come or go.
    loras: LoraBatch,
    /// Each row's LoRA (clones share the weights).
    row_loras: Vec<Option<Lora>>,
    rows: Vec<Row>,
}

/// Most rows of one [`BatchGenerator`]: the rows a decode step runs over plain slices.
pub const MAX_GENERATE_BATCH: usize = crate::model::MAX_STEP_ROWS;

/// Iterator over generated tokens of one sequence. The prompt is run when the generator is
/// created.
pub struct Generator<'a>(BatchGenerator<'a>);

impl Backbone {
    /// Start generating after `prompt_ids` (with the row's soft prompt and/or LoRA).
    pub fn generator<'a>(
        &'a self,
        prompt_ids: &[u32],
        adapters: Adapters<'_>,
        params: GenerateParams,
    ) -> Result<Generator<'a>> {
        self.batch_generator(&[GenerateRequest {
            prompt_ids: prompt_ids.to_vec(),
            adapters,
            params,
        }])
        .map(Generator)
    }

    /// Start generating for several requests at once: their prompts run in batches of similar
    /// length, then every [`BatchGenerator::step`] decodes one token of each row still
    /// generating. More requests can join later ([`BatchGenerator::admit`]).
    pub fn batch_generator<'a>(
        &'a self,
        reqs: &[GenerateRequest<'_>],
    ) -> Result<BatchGenerator<'a>> {
        if reqs.is_empty() {
            return Err(BackboneError::InvalidInput(format!(
                "a generation batch holds 1 to {MAX_GENERATE_BATCH} requests, not 0"
            )));
        }
        let mut g = BatchGenerator::new(self);
        g.admit(reqs)?;
        Ok(g)
    }

    /// Runs the requests' prompts in groups of similar length (padding every row to the
    /// longest prompt can cost several times the real tokens) and joins their caches in the
    /// requests' order, with room for `extra` more positions. Returns the joined cache, each
    /// request's next-token logits and its prompt length.
    fn prefill_requests(
        &self,
        reqs: &[GenerateRequest<'_>],
        extra: usize,
    ) -> Result<(KvCache, Vec<Vec<f32>>, Vec<usize>)> {
        let prompt_len = |r: &GenerateRequest<'_>| {
            r.prompt_ids.len() + r.adapters.prompt.map_or(0, |p| p.num_virtual_tokens())
        };
        let lens: Vec<usize> = reqs.iter().map(prompt_len).collect();
        let groups = length_groups(&lens, &vec![1; reqs.len()]);
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); reqs.len()];
        let mut parts = Vec::new();
        for members in &groups {
            let rows: Vec<_> = members
                .iter()
                .map(|&i| (reqs[i].adapters.prompt, reqs[i].prompt_ids.as_slice()))
                .collect();
            let (embeds, group_lens) = self.embed_rows(&rows)?;
            let loras = LoraBatch::new(
                &members
                    .iter()
                    .map(|&i| reqs[i].adapters.lora)
                    .collect::<Vec<_>>(),
            )?;
            let mut cache = KvCache::with_capacity(extra);
            let last = self
                .prefill_while(&embeds, &group_lens, &mut cache, &loras, &|| true)?
                .ok_or_else(|| BackboneError::InvalidInput("a prefill was withdrawn".into()))?;
            let group_logits = self.logits(&last)?.to_vec2::<f32>()?;
            for (&i, l) in members.iter().zip(group_logits) {
                logits[i] = l;
            }
            parts.push(cache);
        }
        let order = groups.concat();
        let cache = if parts.len() == 1 && order.iter().enumerate().all(|(k, &i)| k == i) {
            parts.pop().unwrap_or_default()
        } else {
            // Joined in group order; then each request's row back at its own index.
            let joined = KvCache::concat(&parts, extra)?;
            let mut at = vec![0usize; reqs.len()];
            for (k, &i) in order.iter().enumerate() {
                at[i] = k;
            }
            joined.select_rows(&at, extra)?
        };
        Ok((cache, logits, lens))
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
            prompt_tokens: g.prompt_tokens(),
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
}

/// What every generation request must satisfy before its prompt runs.
fn validate_request(r: &GenerateRequest<'_>, context: usize) -> Result<()> {
    let params = &r.params;
    if r.prompt_ids.is_empty() && r.adapters.prompt.is_none() {
        return Err(BackboneError::InvalidInput("empty prompt".into()));
    }
    // Every generated token but the last is read back: prompt + max_new_tokens - 1 positions.
    let prompt = r.prompt_ids.len() + r.adapters.prompt.map_or(0, |p| p.num_virtual_tokens());
    if prompt + params.max_new_tokens.saturating_sub(1) > context {
        return Err(BackboneError::InvalidInput(format!(
            "a prompt of {prompt} tokens and up to {} new ones exceed the context length {context}",
            params.max_new_tokens
        )));
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
    Ok(())
}

fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (logits[id] - max) - sum.ln() as f32
}

impl Row {
    /// Tokens this row may still generate.
    fn tokens_left(&self) -> usize {
        self.params.max_new_tokens.saturating_sub(self.ids.len())
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
        let mut u = self.rng.random::<f32>() * total;
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

    /// The next token from the current logits, with its released text; `finish` is set when
    /// the row ends here (otherwise the caller runs the token through the model).
    fn next_token(&mut self, bb: &Backbone) -> Result<GeneratedToken> {
        let id = self.sample();
        let logprob = log_softmax_at(&self.logits, id as usize);
        let is_end = (self.params.stop_at_eos && bb.end_token_ids().contains(&id))
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
        self.text = bb.decode(&self.ids)?;
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
        Ok(GeneratedToken {
            id,
            text,
            logprob,
            finish: None,
        })
    }
}

impl<'a> BatchGenerator<'a> {
    /// A batch with no rows yet (it is done until [`admit`](Self::admit) adds some).
    pub fn new(bb: &'a Backbone) -> Self {
        Self {
            bb,
            cache: KvCache::new(),
            loras: LoraBatch::none(),
            row_loras: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Adds requests as new rows at the end of the batch: their prompts run now (in length
    /// groups), and from the next [`step`](Self::step) they decode with the running rows, each
    /// row still with its own expert, sampling and stops. The running rows keep their caches;
    /// what they generate does not change. Fails, changing nothing, when a request is invalid
    /// or the batch would exceed [`MAX_GENERATE_BATCH`] rows (finished rows count until
    /// [`retain_unfinished`](Self::retain_unfinished) drops them).
    pub fn admit(&mut self, reqs: &[GenerateRequest<'_>]) -> Result<()> {
        if reqs.is_empty() {
            return Ok(());
        }
        if self.rows.len() + reqs.len() > MAX_GENERATE_BATCH {
            return Err(BackboneError::InvalidInput(format!(
                "a generation batch holds 1 to {MAX_GENERATE_BATCH} requests, not {}",
                self.rows.len() + reqs.len()
            )));
        }
        let bb = self.bb;
        for r in reqs {
            validate_request(r, bb.context_length())?;
        }
        // Room for the longest remaining generation, running rows and new ones alike.
        let extra = self
            .rows
            .iter()
            .filter(|r| r.finished.is_none())
            .map(Row::tokens_left)
            .chain(reqs.iter().map(|r| r.params.max_new_tokens))
            .max()
            .unwrap_or(0)
            + 1;
        let (cache, logits, lens) = bb.prefill_requests(reqs, extra)?;
        self.cache = if self.rows.is_empty() {
            cache
        } else {
            // Rows of different lengths: the shorter ones' slots past their end stay masked.
            // (A clone shares the tensors; on an error the running cache stays as it was.)
            KvCache::concat(&[self.cache.clone(), cache], extra)?
        };
        self.rows.extend(
            reqs.iter()
                .zip(logits)
                .zip(lens)
                .map(|((r, logits), prompt_tokens)| Row {
                    rng: StdRng::seed_from_u64(r.params.seed),
                    params: r.params.clone(),
                    ids: Vec::new(),
                    logits,
                    text: String::new(),
                    emitted: 0,
                    finished: None,
                    prompt_tokens,
                    scratch: Vec::new(),
                }),
        );
        self.row_loras
            .extend(reqs.iter().map(|r| r.adapters.lora.cloned()));
        self.rebuild_loras()
    }

    /// Drops the rows that have finished (their cache, adapters and state) and returns the
    /// old index of each row kept, in order: row `k` is now what row `kept[k]` was.
    pub fn retain_unfinished(&mut self) -> Result<Vec<usize>> {
        let kept: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.rows[i].finished.is_none())
            .collect();
        if kept.len() == self.rows.len() {
            return Ok(kept);
        }
        if kept.is_empty() {
            self.cache = KvCache::new();
        } else {
            let extra = kept
                .iter()
                .map(|&i| self.rows[i].tokens_left())
                .max()
                .unwrap_or(0)
                + 1;
            self.cache = self.cache.select_rows(&kept, extra)?;
        }
        let rows = std::mem::take(&mut self.rows);
        let loras = std::mem::take(&mut self.row_loras);
        for (row, lora) in rows.into_iter().zip(loras) {
            if row.finished.is_none() {
                self.rows.push(row);
                self.row_loras.push(lora);
            }
        }
        self.rebuild_loras()?;
        Ok(kept)
    }

    fn rebuild_loras(&mut self) -> Result<()> {
        self.loras = LoraBatch::new(
            &self
                .row_loras
                .iter()
                .map(Option::as_ref)
                .collect::<Vec<_>>(),
        )?;
        Ok(())
    }

    /// Rows of the batch (finished ones included).
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// True when every row has finished.
    pub fn is_done(&self) -> bool {
        self.rows.iter().all(|r| r.finished.is_some())
    }
    pub fn text(&self, row: usize) -> &str {
        &self.rows[row].text
    }
    pub fn ids(&self, row: usize) -> &[u32] {
        &self.rows[row].ids
    }
    pub fn finish_reason(&self, row: usize) -> Option<FinishReason> {
        self.rows[row].finished
    }
    pub fn prompt_tokens(&self, row: usize) -> usize {
        self.rows[row].prompt_tokens
    }

    /// Ends a row early (its client went away): it takes no part in later steps.
    pub fn stop_row(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            r.finished.get_or_insert(FinishReason::Stop);
        }
    }

    /// One token for every row still generating (None for the others), then one forward for
    /// the rows that go on. A row with `max_new_tokens` 0 finishes without a token.
    pub fn step(&mut self) -> Result<Vec<Option<GeneratedToken>>> {
        let bb = self.bb;
        let mut out = Vec::with_capacity(self.rows.len());
        let mut fed = Vec::with_capacity(self.rows.len());
        for row in &mut self.rows {
            if row.finished.is_none() && row.params.max_new_tokens == 0 {
                row.finished = Some(FinishReason::Length);
            }
            if row.finished.is_some() {
                out.push(None);
                fed.push(None);
                continue;
            }
            let token = row.next_token(bb).inspect_err(|_| {
                row.finished = Some(FinishReason::Length);
            })?;
            fed.push(token.finish.is_none().then_some(token.id));
            out.push(Some(token));
        }
        if fed.iter().any(Option::is_some) {
            // Rows that do not go on get no position this step (length 0).
            let h = bb.config().hidden_size;
            let zeros = Tensor::zeros((1, h), candle_core::DType::F32, bb.device())?;
            let embeds = fed
                .iter()
                .map(|id| match id {
                    Some(id) => bb.embed_ids(&[*id]),
                    None => Ok(zeros.clone()),
                })
                .collect::<Result<Vec<_>>>()?;
            let embeds = Tensor::stack(&embeds, 0)?;
            let lens: Vec<usize> = fed.iter().map(|id| usize::from(id.is_some())).collect();
            let hidden = bb.forward(&embeds, &lens, &mut self.cache, &self.loras)?;
            let at: Vec<(usize, usize)> = fed
                .iter()
                .enumerate()
                .filter(|(_, id)| id.is_some())
                .map(|(i, _)| (i, 0))
                .collect();
            let logits = bb
                .logits(&bb.gather_positions(&hidden, &at)?)?
                .to_vec2::<f32>()?;
            for (&(i, _), l) in at.iter().zip(logits) {
                self.rows[i].logits = l;
            }
        }
        Ok(out)
    }
}

impl Generator<'_> {
    pub fn text(&self) -> &str {
        self.0.text(0)
    }
    pub fn ids(&self) -> &[u32] {
        self.0.ids(0)
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.0.finish_reason(0)
    }
    pub fn prompt_tokens(&self) -> usize {
        self.0.prompt_tokens(0)
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<GeneratedToken>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.0.step() {
            Ok(mut tokens) => tokens.pop().flatten().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }
}
