//! Rank classification: score each choice's continuation by its summed log-probability.
//!
//! The prompt of each request runs once; its KV cache is then shared by all of its choices,
//! which run as one padded batch.

use candle_core::Tensor;

use crate::error::{BackboneError, Result};
use crate::experts::{Adapters, Lora, SoftPrompt};
use crate::model::{Backbone, KvCache, LoraBatch};

/// The canonical rendering of a request into token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Appended to the input before tokenisation.
    pub answer_suffix: String,
    /// Keep at most this many prompt ids (the last ones). The canonical rendering that the
    /// experts were trained with keeps 384 (training still does); serving reads whole prompts
    /// up to the backbone's context ([`Backbone::serving_render_options`]) and cuts only when
    /// a request asks for it.
    pub max_prompt_tokens: usize,
    /// Keep at most this many ids of `" " + choice` (the first ones): 64 in the canonical
    /// rendering (training); serving reads choices whole.
    pub max_choice_tokens: usize,
    /// Append EOS to every continuation.
    pub append_eos: bool,
    /// The id appended when `append_eos` (None: the backbone's EOS, id 2 for SmolLM2).
    pub eos_id: Option<u32>,
    /// Also score every choice with each of these ids in place of the appended end id
    /// ([`ScoreOutput::alt_end_sums`]), in the same pass: compares end-of-answer conventions
    /// (the reference experts end answers with id 1, the canonical rendering says id 2) at no
    /// extra cost. Ignored without `append_eos`.
    pub alt_end_ids: Vec<u32>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            answer_suffix: "\nAnswer:".to_string(),
            max_prompt_tokens: 384,
            max_choice_tokens: 64,
            append_eos: true,
            eos_id: None,
            alt_end_ids: Vec::new(),
        }
    }
}

/// One rank-classification request.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRequest<'a> {
    pub input: &'a str,
    pub choices: &'a [String],
    pub adapters: Adapters<'a>,
}

/// One request already rendered into ids.
#[derive(Debug, Clone)]
pub struct ScoreIdsRequest<'a> {
    pub prompt_ids: Vec<u32>,
    /// Continuation ids of every choice (EOS included when wanted).
    pub continuations: Vec<Vec<u32>>,
    pub prompt: Option<&'a SoftPrompt>,
    pub lora: Option<&'a Lora>,
    /// Ids that replace each continuation's last id in [`ScoreOutput::alt_end_sums`].
    pub alt_end_ids: Vec<u32>,
    /// Ids the rendering cut from the front of the prompt (reported in the output).
    pub truncated_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceScore {
    /// Sum of the continuation's log-probabilities.
    pub sum_logprob: f32,
    /// `sum_logprob / num_tokens`.
    pub mean_logprob: f32,
    pub num_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    pub choices: Vec<ChoiceScore>,
    /// Index of the choice with the highest summed log-probability (first on ties).
    pub best: usize,
    /// Index of the choice with the highest mean log-probability.
    pub best_by_mean: usize,
    /// Per choice, `sum_logprob` with the last continuation id replaced by each of the
    /// request's `alt_end_ids` (empty when none were asked for).
    pub alt_end_sums: Vec<Vec<f32>>,
    /// Prompt ids read (soft-prompt tokens not counted).
    pub prompt_tokens: usize,
    /// Prompt ids cut from the front before reading.
    pub truncated_tokens: usize,
}

fn argmax(xs: impl Iterator<Item = f32>) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, v) in xs.enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// Padded-token budget of one prompt batch (the backbone's default prefill budget: a longer
/// prompt goes alone, in chunks).
const PROMPT_TOKEN_BUDGET: usize = crate::model::DEFAULT_MAX_BATCH_PREFILL_TOKENS;
/// Continuation rows per batch.
const CHOICE_ROW_BUDGET: usize = 96;
/// What one more group costs beyond its padded tokens, in tokens: each group runs two
/// forwards, and each forward expands every weight to f32 and synchronises the workers per
/// op whatever its size.
const GROUP_OVERHEAD_TOKENS: usize = 64;
/// Fed continuation tokens per forward pass of a group (at least one row each): bounds the
/// [tokens, vocab] log-probs one pass holds.
const CONTINUATION_TOKEN_BUDGET: usize = 1024;
/// Prompt cache slots the continuation rows of one pass copy (each row a copy of its
/// prompt's keys and values, 46 KB a slot for SmolLM2): 96 rows of a 384-token prompt fit,
/// an 8,192-token prompt's choices go four at a time (1.5 GB).
const CONTINUATION_SLOT_BUDGET: usize = 32768;

/// Splits requests into batches by prompt length (`lens`; `rows`: continuation rows of each)
/// and returns each batch's request indices, shortest prompts first. Sorted by length, the
/// requests are cut into consecutive groups with the least work: padded prompt tokens plus
/// [`GROUP_OVERHEAD_TOKENS`] per group, within [`PROMPT_TOKEN_BUDGET`] and
/// [`CHOICE_ROW_BUDGET`] (a request alone always makes a group). Padding every row to the
/// longest of a batch made short prompts next to a long one cost several times their
/// length; one group per request pays the fixed cost of a forward each time.
pub(crate) fn length_groups(lens: &[usize], rows: &[usize]) -> Vec<Vec<usize>> {
    let n = lens.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| lens[i]);
    // best[j]: least cost of the first j sorted requests; from[j]: where its last group
    // starts.
    let mut best = vec![usize::MAX; n + 1];
    let mut from = vec![0usize; n + 1];
    best[0] = 0;
    for j in 1..=n {
        let mut choice_rows = 0;
        for i in (0..j).rev() {
            choice_rows += rows[order[i]];
            let size = j - i;
            let padded = lens[order[j - 1]] * size;
            if size > 1 && (padded > PROMPT_TOKEN_BUDGET || choice_rows > CHOICE_ROW_BUDGET) {
                break;
            }
            let cost = best[i].saturating_add(padded + GROUP_OVERHEAD_TOKENS);
            if cost < best[j] {
                best[j] = cost;
                from[j] = i;
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        groups.push(order[from[j]..j].to_vec());
        j = from[j];
    }
    groups.reverse();
    groups
}

impl Backbone {
    /// The id that scored and trained answers end with: `<|im_start|>` when the tokenizer
    /// has it, else EOS.
    ///
    /// The canonical rendering of `assets/experts/README.md` says EOS (id 2 for SmolLM2), but
    /// the reference experts were trained to end answers with `<|im_start|>` (id 1) and
    /// `reference.json` was measured that way: with id 1, `roe bench score` reproduces the
    /// reference accuracies (see bench/results/score.md), with id 2 several move by a few
    /// points.
    pub fn answer_end_id(&self) -> u32 {
        self.tokenizer()
            .token_to_id("<|im_start|>")
            .unwrap_or_else(|| self.eos_token_id())
    }

    /// How Score renders requests, and training renders its rows: the canonical rendering
    /// with [`Backbone::answer_end_id`].
    pub fn score_render_options(&self) -> RenderOptions {
        RenderOptions {
            eos_id: Some(self.answer_end_id()),
            ..RenderOptions::default()
        }
    }

    /// How serving renders Score requests: [`Self::score_render_options`] without the cuts
    /// (a prompt is read whole, or cut as its request asks; a choice is read whole).
    pub fn serving_render_options(&self) -> RenderOptions {
        RenderOptions {
            max_prompt_tokens: usize::MAX,
            max_choice_tokens: usize::MAX,
            ..self.score_render_options()
        }
    }

    /// Prompt ids of the canonical rendering: tokens of `input + suffix`, last N kept.
    pub fn render_prompt(&self, input: &str, opts: &RenderOptions) -> Result<Vec<u32>> {
        Ok(self.render_prompt_counted(input, opts)?.0)
    }

    /// [`Self::render_prompt`], and how many ids it cut from the front.
    pub fn render_prompt_counted(
        &self,
        input: &str,
        opts: &RenderOptions,
    ) -> Result<(Vec<u32>, usize)> {
        let mut ids = self.encode(&format!("{input}{}", opts.answer_suffix))?;
        let cut = crate::model::keep_last(&mut ids, Some(opts.max_prompt_tokens));
        Ok((ids, cut))
    }

    /// Continuation ids of the canonical rendering: tokens of `" " + choice`, first N kept,
    /// then EOS.
    pub fn render_choice(&self, choice: &str, opts: &RenderOptions) -> Result<Vec<u32>> {
        let mut ids = self.encode(&format!(" {choice}"))?;
        ids.truncate(opts.max_choice_tokens);
        if opts.append_eos {
            ids.push(opts.eos_id.unwrap_or(self.eos_token_id()));
        }
        Ok(ids)
    }

    /// Score one request with the canonical rendering.
    pub fn score(&self, req: &ScoreRequest<'_>) -> Result<ScoreOutput> {
        let mut out = self.score_batch(std::slice::from_ref(req))?;
        out.pop()
            .ok_or_else(|| BackboneError::InvalidInput("no result".into()))
    }

    /// Score many requests (each with its own experts) in shared batches.
    pub fn score_batch(&self, reqs: &[ScoreRequest<'_>]) -> Result<Vec<ScoreOutput>> {
        self.score_batch_with(reqs, &RenderOptions::default())
    }

    pub fn score_batch_with(
        &self,
        reqs: &[ScoreRequest<'_>],
        opts: &RenderOptions,
    ) -> Result<Vec<ScoreOutput>> {
        let rendered = self.render_score_requests(reqs, opts)?;
        self.score_ids(&rendered)
    }

    /// [`Self::score_batch_with`] for requests that may be withdrawn while the batch runs:
    /// `wanted(i)` is asked before each forward pass that would hold request `i`, and a
    /// request no longer wanted is left out of it (its result is `None`). A pass already
    /// running is never interrupted, so a withdrawal costs at most one pass.
    pub fn score_batch_while(
        &self,
        reqs: &[ScoreRequest<'_>],
        opts: &RenderOptions,
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<ScoreOutput>>> {
        let mut rendered = Vec::with_capacity(reqs.len());
        let mut at = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            // Rendering a long request is work too: a withdrawn one is not rendered.
            if wanted(i) {
                rendered.push(self.render_score_requests(std::slice::from_ref(r), opts)?);
                at.push(i);
            }
        }
        let rendered: Vec<ScoreIdsRequest<'_>> = rendered.into_iter().flatten().collect();
        let outs = self.score_ids_while(&rendered, &|k| wanted(at[k]))?;
        let mut results: Vec<Option<ScoreOutput>> = vec![None; reqs.len()];
        for (i, o) in at.into_iter().zip(outs) {
            results[i] = o;
        }
        Ok(results)
    }

    fn render_score_requests<'r>(
        &self,
        reqs: &[ScoreRequest<'r>],
        opts: &RenderOptions,
    ) -> Result<Vec<ScoreIdsRequest<'r>>> {
        let mut rendered = Vec::with_capacity(reqs.len());
        for r in reqs {
            if r.choices.is_empty() {
                return Err(BackboneError::InvalidInput(
                    "a request has no choices".into(),
                ));
            }
            let continuations = r
                .choices
                .iter()
                .map(|c| self.render_choice(c, opts))
                .collect::<Result<Vec<_>>>()?;
            let (prompt_ids, truncated_tokens) = self.render_prompt_counted(r.input, opts)?;
            rendered.push(ScoreIdsRequest {
                prompt_ids,
                truncated_tokens,
                continuations,
                prompt: r.adapters.prompt,
                lora: r.adapters.lora,
                alt_end_ids: if opts.append_eos {
                    opts.alt_end_ids.clone()
                } else {
                    Vec::new()
                },
            });
        }
        Ok(rendered)
    }

    /// Score pre-tokenised requests. Requests are grouped by prompt length into batches.
    pub fn score_ids(&self, reqs: &[ScoreIdsRequest<'_>]) -> Result<Vec<ScoreOutput>> {
        self.score_ids_while(reqs, &|_| true)?
            .into_iter()
            .map(|o| o.ok_or_else(|| BackboneError::InvalidInput("missing result".into())))
            .collect()
    }

    /// [`Self::score_ids`], asking `wanted(i)` before each length group's forward pass; the
    /// requests no longer wanted are left out (`None`).
    pub fn score_ids_while(
        &self,
        reqs: &[ScoreIdsRequest<'_>],
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<ScoreOutput>>> {
        let prompt_len = |r: &ScoreIdsRequest<'_>| {
            r.prompt_ids.len() + r.prompt.map(|p| p.num_virtual_tokens()).unwrap_or(0)
        };
        let mut results: Vec<Option<ScoreOutput>> = vec![None; reqs.len()];
        let lens: Vec<usize> = reqs.iter().map(prompt_len).collect();
        let rows: Vec<usize> = reqs.iter().map(|r| r.continuations.len()).collect();
        for group in length_groups(&lens, &rows) {
            let group: Vec<usize> = group.into_iter().filter(|&i| wanted(i)).collect();
            if group.is_empty() {
                continue;
            }
            let members: Vec<&ScoreIdsRequest<'_>> = group.iter().map(|&i| &reqs[i]).collect();
            let Some(outs) = self.score_group(&members, &|m| wanted(group[m]))? else {
                continue;
            };
            for (&i, o) in group.iter().zip(outs) {
                results[i] = Some(o);
            }
        }
        Ok(results)
    }

    /// Scores one length group; `wanted(m)` says whether member `m` is still wanted, and
    /// once none is (asked between passes) the group stops with `None`.
    fn score_group(
        &self,
        reqs: &[&ScoreIdsRequest<'_>],
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Option<Vec<ScoreOutput>>> {
        for r in reqs {
            if r.continuations.is_empty() {
                return Err(BackboneError::InvalidInput(
                    "a request has no choices".into(),
                ));
            }
            if r.continuations.iter().any(|c| c.is_empty()) {
                return Err(BackboneError::InvalidInput("an empty continuation".into()));
            }
            let v = self.vocab_size() as u32;
            if r.continuations
                .iter()
                .flatten()
                .chain(r.prompt_ids.iter())
                .chain(r.alt_end_ids.iter())
                .any(|&id| id >= v)
            {
                return Err(BackboneError::InvalidInput(
                    "a token id outside the vocabulary".into(),
                ));
            }
            if r.prompt_ids.is_empty() && r.prompt.is_none() {
                return Err(BackboneError::InvalidInput("an empty prompt".into()));
            }
        }
        // 1. Prompts, one row each.
        let rows: Vec<(Option<&SoftPrompt>, &[u32])> = reqs
            .iter()
            .map(|r| (r.prompt, r.prompt_ids.as_slice()))
            .collect();
        let (embeds, lens) = self.embed_rows(&rows)?;
        let loras = LoraBatch::new(&reqs.iter().map(|r| r.lora).collect::<Vec<_>>())?;
        let max_cont = reqs
            .iter()
            .flat_map(|r| r.continuations.iter().map(|c| c.len()))
            .max()
            .unwrap_or(1);
        let mut cache = KvCache::new();
        let any_wanted = || (0..reqs.len()).any(wanted);
        let Some(last) = self.prefill_while(&embeds, &lens, &mut cache, &loras, &any_wanted)?
        else {
            return Ok(None);
        };
        let first_lp = self.log_probs(&last)?; // [R, V]

        // First continuation token of every choice from the prompt's last position.
        let mut first_rows = Vec::new();
        let mut first_targets = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            for c in &r.continuations {
                first_rows.push(i as u32);
                first_targets.push(c[0]);
            }
        }
        let first = gather_lp(&first_lp, &first_rows, &first_targets)?;
        // Log-probs of the alternative end ids where they would be predicted: at the
        // prompt's last position for one-id continuations, else at the continuation's last
        // fed position (filled below). Indexed like `first`.
        let mut alt_at_end: Vec<Vec<f32>> = Vec::new();
        // Log-prob of the id actually appended (to swap it for each alternative).
        let mut end_actual: Vec<f32> = first.clone();
        if reqs.iter().any(|r| !r.alt_end_ids.is_empty()) {
            let mut k = 0;
            for (i, r) in reqs.iter().enumerate() {
                for c in &r.continuations {
                    let mut v = Vec::new();
                    if c.len() == 1 && !r.alt_end_ids.is_empty() {
                        let rows = vec![i as u32; r.alt_end_ids.len()];
                        v = gather_lp(&first_lp, &rows, &r.alt_end_ids)?;
                    }
                    alt_at_end.push(v);
                    k += 1;
                }
            }
            debug_assert_eq!(k, first.len());
        }

        // 2. Continuations sharing their prompt's cache.
        let mut sel = Vec::new();
        let mut fed: Vec<&[u32]> = Vec::new();
        let mut row_loras = Vec::new();
        let mut owner = Vec::new(); // (request, choice) of each continuation row
        for (i, r) in reqs.iter().enumerate() {
            for (ci, c) in r.continuations.iter().enumerate() {
                if c.len() >= 2 {
                    sel.push(i);
                    fed.push(&c[..c.len() - 1]);
                    row_loras.push(r.lora);
                    owner.push((i, ci));
                }
            }
        }
        let mut rest: Vec<Vec<f32>> = reqs
            .iter()
            .map(|r| vec![0f32; r.continuations.len()])
            .collect();
        if !sel.is_empty() {
            // Flat index (as in `first`) of every (request, choice).
            let mut flat = Vec::with_capacity(reqs.len());
            let mut k = 0;
            for r in reqs.iter() {
                flat.push(k);
                k += r.continuations.len();
            }
            // The continuation rows go in passes of about CONTINUATION_TOKEN_BUDGET fed tokens,
            // each asking between layers whether anyone still wants the group.
            let mut start = 0;
            while start < sel.len() {
                let mut end = start;
                let mut tokens = 0;
                while end < sel.len()
                    && (end == start
                        || (tokens + fed[end].len() <= CONTINUATION_TOKEN_BUDGET
                            && (end + 1 - start) * cache.len() <= CONTINUATION_SLOT_BUDGET))
                {
                    tokens += fed[end].len();
                    end += 1;
                }
                let part = start..end;
                start = end;
                let mut ccache = cache.select_rows(&sel[part.clone()], max_cont)?;
                let rows: Vec<(Option<&SoftPrompt>, &[u32])> =
                    fed[part.clone()].iter().map(|f| (None, *f)).collect();
                let (embeds, clens) = self.embed_rows(&rows)?;
                let closs = LoraBatch::new(&row_loras[part.clone()])?;
                let Some(hidden) =
                    self.forward_while(&embeds, &clens, &mut ccache, &closs, &any_wanted)?
                else {
                    return Ok(None);
                };
                drop(ccache);
                let mut at = Vec::new();
                let mut targets = Vec::new();
                let mut at_owner = Vec::new();
                for (row, &(i, ci)) in owner[part.clone()].iter().enumerate() {
                    let c = &reqs[i].continuations[ci];
                    for j in 0..c.len() - 1 {
                        at.push((row, j));
                        targets.push(c[j + 1]);
                        at_owner.push((i, ci));
                    }
                }
                let lp = self.log_probs_at(&hidden, &at)?; // [N, V]
                let idx: Vec<u32> = (0..at.len() as u32).collect();
                let vals = gather_lp(&lp, &idx, &targets)?;
                for (v, &(i, ci)) in vals.iter().zip(&at_owner) {
                    rest[i][ci] += v;
                }
                if !alt_at_end.is_empty() {
                    let mut pos = 0;
                    for &(i, ci) in &owner[part] {
                        let c = &reqs[i].continuations[ci];
                        let last = pos + c.len() - 2;
                        pos += c.len() - 1;
                        let alts = &reqs[i].alt_end_ids;
                        if !alts.is_empty() {
                            let rows = vec![last as u32; alts.len()];
                            alt_at_end[flat[i] + ci] = gather_lp(&lp, &rows, alts)?;
                            end_actual[flat[i] + ci] = vals[last];
                        }
                    }
                }
            }
        }
        drop(cache);
        let mut outs = Vec::with_capacity(reqs.len());
        let mut k = 0;
        for (i, r) in reqs.iter().enumerate() {
            let mut choices = Vec::with_capacity(r.continuations.len());
            let mut alt_end_sums = Vec::new();
            for (ci, c) in r.continuations.iter().enumerate() {
                let sum = first[k] + rest[i][ci];
                if !r.alt_end_ids.is_empty() {
                    let without_end = sum - end_actual[k];
                    alt_end_sums.push(alt_at_end[k].iter().map(|a| without_end + a).collect());
                }
                k += 1;
                choices.push(ChoiceScore {
                    sum_logprob: sum,
                    mean_logprob: sum / c.len() as f32,
                    num_tokens: c.len(),
                });
            }
            let best = argmax(choices.iter().map(|c| c.sum_logprob));
            let best_by_mean = argmax(choices.iter().map(|c| c.mean_logprob));
            outs.push(ScoreOutput {
                choices,
                best,
                best_by_mean,
                alt_end_sums,
                prompt_tokens: r.prompt_ids.len(),
                truncated_tokens: r.truncated_tokens,
            });
        }
        Ok(Some(outs))
    }
}

/// lp[rows[k], targets[k]] for every k.
fn gather_lp(lp: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
    let dev = lp.device();
    let r = Tensor::new(rows, dev)?;
    let picked = lp.index_select(&r, 0)?; // [K, V]
    let t = Tensor::new(targets, dev)?.unsqueeze(1)?;
    Ok(picked.gather(&t, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::{length_groups, CHOICE_ROW_BUDGET, PROMPT_TOKEN_BUDGET};

    fn padded(lens: &[usize], groups: &[Vec<usize>]) -> usize {
        groups
            .iter()
            .map(|g| g.iter().map(|&i| lens[i]).max().unwrap_or(0) * g.len())
            .sum()
    }

    #[test]
    fn groups_cover_every_request_once_in_order() {
        let lens = [
            16, 22, 22, 24, 24, 26, 27, 31, 32, 42, 70, 77, 78, 113, 113, 385,
        ];
        let groups = length_groups(&lens, &[2; 16]);
        assert!(groups.iter().all(|g| !g.is_empty()));
        assert_eq!(groups.concat(), (0..lens.len()).collect::<Vec<_>>());
        // The 16 prompts of the serving benchmark: one batch padded to 113 tokens (as the
        // old greedy grouping did) is 2.4x their real length; the groups stay close to it.
        let real: usize = lens.iter().sum();
        assert!(padded(&lens, &groups) * 10 <= real * 12, "{groups:?}");
        assert!(
            groups.len() < lens.len(),
            "short prompts still share batches: {groups:?}"
        );
        // The long prompt goes alone.
        assert_eq!(groups.last(), Some(&vec![15]));
        // Unsorted requests come back as indices, shortest prompts first, in the same groups.
        let shuffled: Vec<usize> = (0..16).map(|k| lens[(k * 7) % 16]).collect();
        let again = length_groups(&shuffled, &[2; 16]);
        let as_lens = |gs: &[Vec<usize>], l: &[usize]| -> Vec<Vec<usize>> {
            gs.iter()
                .map(|g| g.iter().map(|&i| l[i]).collect())
                .collect()
        };
        assert_eq!(as_lens(&again, &shuffled), as_lens(&groups, &lens));
    }

    #[test]
    fn equal_lengths_fill_batches_up_to_the_budgets() {
        let groups = length_groups(&[100; 50], &[1; 50]);
        let per = PROMPT_TOKEN_BUDGET / 100;
        assert_eq!(groups.len(), 50usize.div_ceil(per));
        assert!(groups.iter().all(|g| g.len() <= per));
        // Continuation rows bound a batch too.
        let groups = length_groups(&[10; 8], &[CHOICE_ROW_BUDGET / 2; 8]);
        assert!(groups.iter().all(|g| g.len() == 2), "{groups:?}");
        // A request over both budgets still runs, alone.
        let groups = length_groups(&[5, PROMPT_TOKEN_BUDGET * 2], &[1, CHOICE_ROW_BUDGET * 2]);
        assert_eq!(groups.len(), 2);
        assert!(length_groups(&[], &[]).is_empty());
    }
}
