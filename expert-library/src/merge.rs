//! Merging experts: one new expert made from N experts of one kind, the compositional use of an
//! expert library (the ELM paper merges the experts retrieved for a task). This module works on
//! PEFT adapters only; [`crate::ExpertLibrary::merge`] reads the sources from the library,
//! calls [`merge_adapters`] and registers the result.
//!
//! **Weights.** Uniform (1/N each) unless given. Given weights must be finite and > 0 and are
//! normalised to sum 1, so `[2, 1, 1]` means `[0.5, 0.25, 0.25]`.
//!
//! **LoRA.** Source i has, per layer and target module, `A_i` (r_i x in), `B_i` (out x r_i)
//! and scale `s_i = alpha_i / r_i` (`alpha_i / sqrt(r_i)` with rsLoRA). The merge is the exact
//! weighted sum of the deltas, `sum_i w_i s_i B_i A_i`, written as one LoRA of rank
//! `R = sum_i r_i`: `A = vstack(A_i)`, `B = hstack(w_i s_i B_i)`, `lora_alpha = R` (scale 1,
//! no rsLoRA). Averaging the A and B matrices separately would not give the average delta
//! (`mean(B) mean(A) != mean(B A)`); stacking does, at the price of a larger rank. A module or
//! layer a source does not adapt gets zero blocks there, so one rank fits every module. The
//! sources are read and the result written by roe-peft (f32 under PEFT's key names), so the
//! merge scales each source exactly as inference does.
//!
//! **Prompt.** [`PromptMergeMode::Average`]: the weighted average of the prompt embeddings
//! (every source needs the same number of virtual tokens). [`PromptMergeMode::Concat`]: the
//! prompts one after another in source order (virtual tokens add up; no weights).

use std::collections::BTreeSet;

use roe_peft::{
    Adapter, LoraAdapter, LoraBlock, LoraConfig, LoraTarget, SoftPromptAdapter, MAX_LORA_RANK,
    MAX_VIRTUAL_TOKENS,
};

use crate::error::{LibraryError, Result};
use crate::expert::{
    peft_error, AdapterSummary, BackboneSpec, ExpertKind, PeftAdapter, MAX_ADAPTER_BYTES,
};

/// Most experts one merge may combine.
pub const MAX_MERGE_SOURCES: usize = 64;
/// Largest rank a merged LoRA may reach (the sum of the sources' ranks): the most the backbone
/// runtime loads, so a merge never registers an expert that inference would refuse.
pub const MAX_MERGED_LORA_RANK: usize = MAX_LORA_RANK;
/// Most virtual tokens a concatenated prompt may reach (what the runtime loads).
pub const MAX_MERGED_VIRTUAL_TOKENS: usize = MAX_VIRTUAL_TOKENS;

/// How prompt experts are combined. LoRA experts are always merged by their weighted deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptMergeMode {
    /// Weighted average of the prompt embeddings (same number of virtual tokens required).
    #[default]
    Average,
    /// The sources' prompts one after another; virtual tokens add up.
    Concat,
}

/// A merge as the library runs it: read `sources`, merge, register as `id`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeRequest {
    pub id: String,
    /// Empty: the id.
    pub name: String,
    /// Empty: `merged from a, b (weights 0.5, 0.5)`.
    pub description: String,
    /// Expert ids, at least one, no duplicates, all of one kind and one backbone.
    pub sources: Vec<String>,
    /// One weight per source (normalised to sum 1); `None`: uniform.
    pub weights: Option<Vec<f64>>,
    pub prompt_mode: PromptMergeMode,
    /// Replace an existing expert `id` with its next version instead of ALREADY_EXISTS.
    pub new_version: bool,
}

/// The result of [`merge_adapters`].
#[derive(Debug, Clone)]
pub struct MergedAdapter {
    pub adapter: PeftAdapter,
    /// What validating the merged adapter against the backbone found.
    pub summary: AdapterSummary,
    /// The normalised weights applied, in source order (empty for a concatenation).
    pub weights: Vec<f64>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> LibraryError {
    LibraryError::invalid(field, message)
}

/// Uniform weights when `weights` is `None`; otherwise checks them (one per source, finite,
/// > 0) and normalises them to sum 1.
pub fn normalise_weights(n: usize, weights: Option<&[f64]>) -> Result<Vec<f64>> {
    if n == 0 {
        return Err(invalid("sources", "at least one source is needed"));
    }
    let Some(w) = weights else {
        return Ok(vec![1.0 / n as f64; n]);
    };
    if w.len() != n {
        return Err(invalid(
            "sources",
            format!(
                "{} weights for {n} sources; give one weight per source or none",
                w.len()
            ),
        ));
    }
    for (i, x) in w.iter().enumerate() {
        if !(x.is_finite() && *x > 0.0) {
            return Err(invalid(
                format!("sources[{i}].weight"),
                format!("must be finite and greater than 0, got {x}"),
            ));
        }
    }
    let sum: f64 = w.iter().sum();
    if !sum.is_finite() {
        return Err(invalid(
            "sources",
            "the weights are too large to add up; scale them down",
        ));
    }
    Ok(w.iter().map(|x| x / sum).collect())
}

/// Places a source's validation error under `sources[i]`, so the caller sees which one.
fn in_source(i: usize, e: LibraryError) -> LibraryError {
    match e {
        LibraryError::InvalidArgument { field, message } => LibraryError::InvalidArgument {
            field: format!("sources[{i}].{field}"),
            message,
        },
        LibraryError::FailedPrecondition(m) => {
            LibraryError::FailedPrecondition(format!("sources[{i}]: {m}"))
        }
        LibraryError::ResourceExhausted(m) => {
            LibraryError::ResourceExhausted(format!("sources[{i}]: {m}"))
        }
        other => other,
    }
}

/// Merges `sources` (PEFT adapters of one kind, all fitting `spec`) into one adapter.
/// `weights`: one per source, normalised to sum 1; `None`: uniform. The result passes
/// [`PeftAdapter::validate`] against `spec`.
pub fn merge_adapters(
    sources: &[PeftAdapter],
    weights: Option<&[f64]>,
    prompt_mode: PromptMergeMode,
    spec: &BackboneSpec,
) -> Result<MergedAdapter> {
    if sources.is_empty() {
        return Err(invalid("sources", "at least one source is needed"));
    }
    if sources.len() > MAX_MERGE_SOURCES {
        return Err(invalid(
            "sources",
            format!("{} sources, at most {MAX_MERGE_SOURCES}", sources.len()),
        ));
    }
    let parsed = sources
        .iter()
        .enumerate()
        .map(|(i, s)| s.parse(spec).map_err(|e| in_source(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let kind = kind_of(&parsed[0]);
    if let Some(i) = parsed.iter().position(|a| kind_of(a) != kind) {
        return Err(invalid(
            "sources",
            format!(
                "all sources must be of one kind: sources[0] is {}, sources[{i}] is {}",
                kind.as_str(),
                kind_of(&parsed[i]).as_str()
            ),
        ));
    }
    let loras: Vec<&LoraAdapter> = parsed
        .iter()
        .filter_map(|a| match a {
            Adapter::Lora(l) => Some(l),
            Adapter::SoftPrompt(_) => None,
        })
        .collect();
    let prompts: Vec<&SoftPromptAdapter> = parsed
        .iter()
        .filter_map(|a| match a {
            Adapter::SoftPrompt(p) => Some(p),
            Adapter::Lora(_) => None,
        })
        .collect();
    let (adapter, weights) =
        match (kind, prompt_mode) {
            (ExpertKind::Lora, PromptMergeMode::Concat) => return Err(invalid(
                "prompt_mode",
                "concatenation applies to prompt experts; LoRA experts are merged by their deltas",
            )),
            (ExpertKind::Lora, PromptMergeMode::Average) => {
                let w = normalise_weights(sources.len(), weights)?;
                (merge_loras(&loras, &w, spec)?, w)
            }
            (ExpertKind::Prompt, PromptMergeMode::Average) => {
                let w = normalise_weights(sources.len(), weights)?;
                (merge_prompts(&prompts, Some(&w), spec)?, w)
            }
            (ExpertKind::Prompt, PromptMergeMode::Concat) => {
                if weights.is_some() {
                    return Err(invalid(
                        "sources[0].weight",
                        "weights do not apply to a concatenation of prompts",
                    ));
                }
                (merge_prompts(&prompts, None, spec)?, Vec::new())
            }
        };
    // The merge is built to fit; validating it anyway means a bug here can never reach the
    // store as an expert inference would refuse.
    let summary = adapter.validate(spec)?;
    Ok(MergedAdapter {
        adapter,
        summary,
        weights,
    })
}

fn kind_of(adapter: &Adapter) -> ExpertKind {
    match adapter {
        Adapter::SoftPrompt(_) => ExpertKind::Prompt,
        Adapter::Lora(_) => ExpertKind::Lora,
    }
}

fn merge_loras(
    sources: &[&LoraAdapter],
    weights: &[f64],
    spec: &BackboneSpec,
) -> Result<PeftAdapter> {
    let shape = &spec.shape;
    let rank: usize = sources.iter().map(|s| s.rank()).sum();
    if rank > MAX_MERGED_LORA_RANK {
        return Err(invalid(
            "sources",
            format!(
                "the merged LoRA's rank is the sum of the sources' ranks, {rank}; the backbone \
                 runs at most {MAX_MERGED_LORA_RANK}"
            ),
        ));
    }
    let targets: BTreeSet<LoraTarget> = sources
        .iter()
        .flat_map(|s| s.targets().iter().copied())
        .collect();
    // Checked before allocating: a merge of many large LoRAs could otherwise take gigabytes.
    let bytes: usize = targets
        .iter()
        .map(|t| {
            let (fin, fout) = shape.dims(*t);
            rank * (fin + fout) * 4
        })
        .sum::<usize>()
        * shape.num_layers;
    if bytes > MAX_ADAPTER_BYTES {
        return Err(LibraryError::ResourceExhausted(format!(
            "sources: the merged LoRA would take {bytes} bytes, the limit is {MAX_ADAPTER_BYTES}"
        )));
    }
    let mut blocks = Vec::with_capacity(shape.num_layers * targets.len());
    for layer in 0..shape.num_layers {
        for &target in &targets {
            let (fin, fout) = shape.dims(target);
            let mut a = vec![0f32; rank * fin];
            let mut b = vec![0f32; fout * rank];
            let mut offset = 0;
            for (src, w) in sources.iter().zip(weights) {
                let r = src.rank();
                if let Some(block) = src.block(layer, target) {
                    a[offset * fin..(offset + r) * fin].copy_from_slice(&block.a);
                    // Scale and weight are folded into B (in f64, rounded once) so that the
                    // merged LoRA runs at scale 1.
                    let k = w * src.scale();
                    for o in 0..fout {
                        let row = &block.b[o * r..(o + 1) * r];
                        let out = &mut b[o * rank + offset..o * rank + offset + r];
                        for (dst, x) in out.iter_mut().zip(row) {
                            *dst = (k * *x as f64) as f32;
                        }
                    }
                }
                offset += r;
            }
            blocks.push(LoraBlock {
                layer,
                target,
                a,
                b,
            });
        }
    }
    // Scale 1: alpha = r, the sources' scales and weights are already in B.
    let config = LoraConfig {
        origin: sources[0].origin().clone(),
        ..LoraConfig::new(rank, rank as f64, targets.into_iter().collect())
    };
    let merged = LoraAdapter::new(config, blocks, shape).map_err(|e| peft_error(e, spec))?;
    Ok(merged.to_peft().map_err(|e| peft_error(e, spec))?.into())
}

/// Averages (`weights` given) or concatenates (`None`) prompt experts.
fn merge_prompts(
    sources: &[&SoftPromptAdapter],
    weights: Option<&[f64]>,
    spec: &BackboneSpec,
) -> Result<PeftAdapter> {
    let merged: Vec<f32> = match weights {
        Some(w) => {
            let n0 = sources[0].num_virtual_tokens();
            if let Some(i) = sources.iter().position(|p| p.num_virtual_tokens() != n0) {
                return Err(invalid(
                    "sources",
                    format!(
                        "averaged prompts need the same number of virtual tokens: sources[0] \
                         has {n0}, sources[{i}] has {}; concatenate them instead",
                        sources[i].num_virtual_tokens()
                    ),
                ));
            }
            (0..sources[0].embeddings().len())
                .map(|k| {
                    sources
                        .iter()
                        .zip(w)
                        .map(|(p, w)| w * p.embeddings()[k] as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        }
        None => {
            let total: usize = sources.iter().map(|p| p.num_virtual_tokens()).sum();
            if total > MAX_MERGED_VIRTUAL_TOKENS {
                return Err(invalid(
                    "sources",
                    format!(
                        "the concatenated prompt would have {total} virtual tokens, at most \
                         {MAX_MERGED_VIRTUAL_TOKENS}"
                    ),
                ));
            }
            sources
                .iter()
                .flat_map(|p| p.embeddings())
                .copied()
                .collect()
        }
    };
    let n = merged.len() / spec.shape.hidden_size.max(1);
    let prompt = SoftPromptAdapter::new(merged, n, &spec.shape)
        .map_err(|e| peft_error(e, spec))?
        .with_origin(sources[0].origin().clone());
    Ok(prompt.to_peft().map_err(|e| peft_error(e, spec))?.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use roe_peft::{decode_f32, LoraKey, LoraMatrix, ModelShape};
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    use serde_json::{json, Value};
    use std::path::PathBuf;

    fn assets() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/experts/smollm2-135m")
    }

    fn real(kind: &str, task: &str) -> PeftAdapter {
        PeftAdapter::from_dir(assets().join(kind).join(task)).expect("bundled expert")
    }

    /// 8 wide, 2 layers, 2 heads (head_dim 4), 1 KV head, MLP 12: small enough to check
    /// every module quickly.
    fn tiny() -> BackboneSpec {
        BackboneSpec::new("tiny", tiny_runtime())
    }

    fn tiny_runtime() -> ModelShape {
        ModelShape {
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 32,
        }
    }

    /// The PEFT key of a LoRA matrix (`ab` is "A" or "B").
    fn lora_key(layer: usize, module: &str, ab: &str) -> String {
        let target = LoraTarget::from_name(module).expect("a projection");
        let matrix = if ab == "A" {
            LoraMatrix::A
        } else {
            LoraMatrix::B
        };
        LoraKey::new(layer, target, matrix).format()
    }

    /// (in, out) of a projection on the backbone.
    fn projection_dims(spec: &BackboneSpec, module: &str) -> (usize, usize) {
        spec.shape
            .dims(LoraTarget::from_name(module).expect("a projection"))
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn field_of(e: &LibraryError) -> &str {
        match e {
            LibraryError::InvalidArgument { field, .. } => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
        match dtype {
            Dtype::F32 => f32_bytes(values),
            Dtype::F16 => values
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    }

    /// A synthetic PEFT LoRA on every layer of `spec` for `modules`, random values.
    fn synthetic_lora(
        spec: &BackboneSpec,
        r: usize,
        alpha: Option<f64>,
        rslora: bool,
        modules: &[&str],
        dtype: Dtype,
        seed: u64,
    ) -> PeftAdapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut owned = Vec::new();
        for layer in 0..spec.shape.num_layers {
            for m in modules {
                let (fin, fout) = projection_dims(spec, m);
                for (ab, shape) in [("A", vec![r, fin]), ("B", vec![fout, r])] {
                    let v: Vec<f32> = (0..shape[0] * shape[1])
                        .map(|_| rng.random_range(-1.0f32..1.0))
                        .collect();
                    owned.push((lora_key(layer, m, ab), shape, encode(&v, dtype)));
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let mut cfg = json!({
            "peft_type": "LORA",
            "base_model_name_or_path": "tiny-base",
            "r": r,
            "target_modules": modules,
            "use_rslora": rslora,
        });
        if let Some(a) = alpha {
            cfg["lora_alpha"] = json!(a);
        }
        PeftAdapter {
            config_json: cfg.to_string(),
            safetensors: safetensors::serialize(views, None).unwrap(),
        }
    }

    fn synthetic_prompt(spec: &BackboneSpec, n: usize, seed: u64) -> (PeftAdapter, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * spec.shape.hidden_size)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let bytes = f32_bytes(&v);
        let views = vec![(
            "prompt_embeddings".to_string(),
            TensorView::new(Dtype::F32, vec![n, spec.shape.hidden_size], &bytes).unwrap(),
        )];
        let cfg = json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n,
                         "token_dim": spec.shape.hidden_size, "base_model_name_or_path": "tiny-base"});
        (
            PeftAdapter {
                config_json: cfg.to_string(),
                safetensors: safetensors::serialize(views, None).unwrap(),
            },
            v,
        )
    }

    /// Reads a tensor as f64 whatever its dtype: an independent reader for the checks.
    fn values(st: &SafeTensors<'_>, name: &str) -> Option<Vec<f64>> {
        let t = st.tensor(name).ok()?;
        Some(
            decode_f32(name, &t)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect(),
        )
    }

    /// scale * B A of one module of one layer (None when the adapter does not adapt it),
    /// with the scale PEFT applies: alpha/r, alpha/sqrt(r) with rsLoRA, alpha 8 when unset.
    fn delta(a: &PeftAdapter, layer: usize, module: &str, spec: &BackboneSpec) -> Option<Vec<f64>> {
        let cfg: Value = serde_json::from_str(&a.config_json).unwrap();
        let r = cfg["r"].as_u64().unwrap() as usize;
        let alpha = cfg["lora_alpha"].as_f64().unwrap_or(8.0);
        let scale = if cfg["use_rslora"].as_bool().unwrap_or(false) {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let st = SafeTensors::deserialize(&a.safetensors).unwrap();
        let am = values(&st, &lora_key(layer, module, "A"))?;
        let bm = values(&st, &lora_key(layer, module, "B")).unwrap();
        let (fin, fout) = projection_dims(spec, module);
        let mut out = vec![0f64; fout * fin];
        for o in 0..fout {
            for k in 0..r {
                let b = bm[o * r + k] * scale;
                for i in 0..fin {
                    out[o * fin + i] += b * am[k * fin + i];
                }
            }
        }
        Some(out)
    }

    /// Checks merged B·A == sum_i w_i s_i B_i A_i on every layer and module; returns the
    /// largest difference seen.
    fn check_lora_math(
        sources: &[PeftAdapter],
        weights: &[f64],
        merged: &PeftAdapter,
        spec: &BackboneSpec,
    ) -> f64 {
        let cfg: Value = serde_json::from_str(&merged.config_json).unwrap();
        let modules: Vec<String> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut worst = 0f64;
        let mut checked = 0;
        for layer in 0..spec.shape.num_layers {
            for m in &modules {
                let (fin, fout) = projection_dims(spec, m);
                let mut want = vec![0f64; fin * fout];
                for (s, w) in sources.iter().zip(weights) {
                    if let Some(d) = delta(s, layer, m, spec) {
                        want.iter_mut().zip(d).for_each(|(x, y)| *x += w * y);
                    }
                }
                let got = delta(merged, layer, m, spec).expect("merged adapts every module");
                for (x, y) in want.iter().zip(&got) {
                    let diff = (x - y).abs();
                    assert!(diff < 1e-5, "layer {layer} {m}: {x} vs {y}");
                    worst = worst.max(diff);
                }
                checked += 1;
            }
        }
        assert_eq!(checked, spec.shape.num_layers * modules.len());
        worst
    }

    #[test]
    fn weights_default_uniform_and_normalise() {
        assert_eq!(normalise_weights(4, None).unwrap(), vec![0.25; 4]);
        assert_eq!(
            normalise_weights(3, Some(&[2.0, 1.0, 1.0])).unwrap(),
            vec![0.5, 0.25, 0.25]
        );
        let w = normalise_weights(3, Some(&[0.5, 0.3, 0.2])).unwrap();
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn weight_errors_name_the_field() {
        assert_eq!(
            field_of(&normalise_weights(0, None).unwrap_err()),
            "sources"
        );
        assert_eq!(
            field_of(&normalise_weights(2, Some(&[1.0])).unwrap_err()),
            "sources"
        );
        for (bad, at) in [
            (vec![1.0, 0.0], "sources[1].weight"),
            (vec![-1.0, 1.0], "sources[0].weight"),
            (vec![1.0, f64::NAN], "sources[1].weight"),
            (vec![f64::INFINITY, 1.0], "sources[0].weight"),
        ] {
            assert_eq!(field_of(&normalise_weights(2, Some(&bad)).unwrap_err()), at);
        }
        // Each weight finite, the sum not.
        assert_eq!(
            field_of(&normalise_weights(2, Some(&[1e308, 1e308])).unwrap_err()),
            "sources"
        );
    }

    #[test]
    fn real_loras_merge_to_the_exact_weighted_delta() {
        let spec = BackboneSpec::smollm2_135m();
        let sources: Vec<PeftAdapter> = ["email_spam", "sms_spam", "snips_intent"]
            .iter()
            .map(|t| real("lora", t))
            .collect();
        for weights in [None, Some(vec![0.5, 0.3, 0.2])] {
            let m = merge_adapters(
                &sources,
                weights.as_deref(),
                PromptMergeMode::Average,
                &spec,
            )
            .unwrap();
            let AdapterSummary::Lora {
                r,
                alpha,
                scale,
                target_modules,
                num_layers,
                layers_to_transform,
            } = &m.summary
            else {
                panic!("merged kind {:?}", m.summary)
            };
            assert_eq!((*r, *alpha, *scale, *num_layers), (12, 12.0, 1.0, 30));
            assert_eq!(layers_to_transform, &None);
            assert_eq!(target_modules, &["q_proj", "v_proj"]);
            let worst = check_lora_math(&sources, &m.weights, &m.adapter, &spec);
            eprintln!("real LoRAs, weights {weights:?}: max |diff| {worst:e}");
            // The library accepts it and the backbone runtime loads it, at scale 1.
            m.adapter.validate(&spec).unwrap();
            let cfg: Value = serde_json::from_str(&m.adapter.config_json).unwrap();
            assert_eq!(
                cfg["base_model_name_or_path"],
                "HuggingFaceTB/SmolLM2-135M-Instruct"
            );
            assert_eq!(cfg["use_rslora"], false);
            let lora =
                roe_backbone::Lora::from_peft_bytes(&m.adapter.config_json, &m.adapter.safetensors)
                    .unwrap();
            assert_eq!(lora.rank(), 12);
            assert_eq!(lora.scale(), 1.0);
        }
        // Uniform weights were 1/3 each; the explicit ones normalised as given (sum 1).
        let m = merge_adapters(&sources, None, PromptMergeMode::Average, &spec).unwrap();
        assert!(m.weights.iter().all(|w| (w - 1.0 / 3.0).abs() < 1e-15));
    }

    #[test]
    fn synthetic_loras_of_different_ranks_alphas_modules_and_dtypes() {
        let spec = tiny();
        let sources = vec![
            synthetic_lora(
                &spec,
                2,
                Some(4.0),
                false,
                &["q_proj", "v_proj"],
                Dtype::F32,
                1,
            ),
            synthetic_lora(
                &spec,
                3,
                Some(16.0),
                true,
                &["q_proj", "k_proj", "down_proj"],
                Dtype::F16,
                2,
            ),
            // No lora_alpha: PEFT's default 8 applies, as in the backbone runtime.
            synthetic_lora(&spec, 5, None, false, &["o_proj"], Dtype::BF16, 3),
        ];
        let m = merge_adapters(
            &sources,
            Some(&[1.0, 2.0, 5.0]),
            PromptMergeMode::Average,
            &spec,
        )
        .unwrap();
        assert_eq!(m.weights, vec![0.125, 0.25, 0.625]);
        let AdapterSummary::Lora {
            r,
            alpha,
            target_modules,
            ..
        } = &m.summary
        else {
            panic!("merged kind {:?}", m.summary)
        };
        assert_eq!((*r, *alpha), (10, 10.0));
        assert_eq!(
            target_modules,
            &["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
        );
        let worst = check_lora_math(&sources, &m.weights, &m.adapter, &spec);
        assert!(worst < 1e-5);
        // Zero blocks where a source does not adapt a module: source 0's columns of o_proj's
        // B are zero, and so are source 2's rows of q_proj's A.
        let st = SafeTensors::deserialize(&m.adapter.safetensors).unwrap();
        let b_o = values(&st, &lora_key(1, "o_proj", "B")).unwrap();
        assert!(b_o.chunks(10).all(|row| row[..5].iter().all(|x| *x == 0.0)));
        assert!(b_o.chunks(10).any(|row| row[5..].iter().any(|x| *x != 0.0)));
        let a_q = values(&st, &lora_key(0, "q_proj", "A")).unwrap();
        assert!(a_q[5 * 8..].iter().all(|x| *x == 0.0));
        // Every stored tensor is f32 and the runtime loads it.
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == Dtype::F32));
        let lora = roe_backbone::Lora::from_peft_bytes_with(
            &m.adapter.config_json,
            &m.adapter.safetensors,
            &tiny_runtime(),
        )
        .unwrap();
        assert_eq!((lora.rank(), lora.scale()), (10, 1.0));

        // One source alone keeps its own delta.
        let one = merge_adapters(&sources[1..2], None, PromptMergeMode::Average, &spec).unwrap();
        check_lora_math(&sources[1..2], &[1.0], &one.adapter, &spec);
    }

    #[test]
    fn prompts_average_with_weights_and_concatenate() {
        let spec = tiny();
        let (p1, v1) = synthetic_prompt(&spec, 3, 10);
        let (p2, v2) = synthetic_prompt(&spec, 3, 11);
        let (p3, v3) = synthetic_prompt(&spec, 2, 12);
        let read = |a: &PeftAdapter| {
            let st = SafeTensors::deserialize(&a.safetensors).unwrap();
            let t = st.tensor("prompt_embeddings").unwrap();
            (t.shape().to_vec(), decode_f32("", &t).unwrap())
        };

        let m = merge_adapters(
            &[p1.clone(), p2.clone()],
            Some(&[3.0, 1.0]),
            PromptMergeMode::Average,
            &spec,
        )
        .unwrap();
        let (shape, got) = read(&m.adapter);
        assert_eq!(shape, vec![3, 8]);
        for k in 0..got.len() {
            let want = 0.75 * v1[k] as f64 + 0.25 * v2[k] as f64;
            assert!(
                (got[k] as f64 - want).abs() < 1e-6,
                "{k}: {} vs {want}",
                got[k]
            );
        }
        assert_eq!(
            m.summary,
            AdapterSummary::Prompt {
                num_virtual_tokens: 3,
                token_dim: 8
            }
        );
        // Uniform by default.
        let u = merge_adapters(
            &[p1.clone(), p2.clone()],
            None,
            PromptMergeMode::Average,
            &spec,
        )
        .unwrap();
        let (_, got) = read(&u.adapter);
        assert!(got
            .iter()
            .enumerate()
            .all(|(k, x)| (*x as f64 - 0.5 * (v1[k] as f64 + v2[k] as f64)).abs() < 1e-6));

        // Concatenation: the rows one after another, virtual tokens add up.
        let c = merge_adapters(
            &[p1.clone(), p3.clone()],
            None,
            PromptMergeMode::Concat,
            &spec,
        )
        .unwrap();
        let (shape, got) = read(&c.adapter);
        assert_eq!(shape, vec![5, 8]);
        assert_eq!(got, [v1.clone(), v3.clone()].concat());
        assert!(c.weights.is_empty());
        let cfg: Value = serde_json::from_str(&c.adapter.config_json).unwrap();
        assert_eq!(cfg["num_virtual_tokens"], 5);
        let sp = roe_backbone::SoftPrompt::from_peft_bytes_with(
            &c.adapter.config_json,
            &c.adapter.safetensors,
            &tiny_runtime(),
        )
        .unwrap();
        assert_eq!(sp.num_virtual_tokens(), 5);

        // Averaging prompts of different lengths is refused, naming `sources`.
        let e = merge_adapters(&[p1, p3], None, PromptMergeMode::Average, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources");
        assert!(e.to_string().contains("virtual tokens"), "{e}");
    }

    #[test]
    fn real_prompts_average_and_load() {
        let spec = BackboneSpec::smollm2_135m();
        let m = merge_adapters(
            &[real("prompt", "sms_spam"), real("prompt", "email_spam")],
            None,
            PromptMergeMode::Average,
            &spec,
        )
        .unwrap();
        let sp = roe_backbone::SoftPrompt::from_peft_bytes(
            &m.adapter.config_json,
            &m.adapter.safetensors,
        )
        .unwrap();
        assert_eq!(sp.num_virtual_tokens(), 20);
    }

    #[test]
    fn merge_errors() {
        let spec = tiny();
        let l = |r, seed| synthetic_lora(&spec, r, Some(8.0), false, &["q_proj"], Dtype::F32, seed);
        let (p, _) = synthetic_prompt(&spec, 2, 5);
        let avg = PromptMergeMode::Average;

        let e = merge_adapters(&[], None, avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources");
        let many = vec![l(1, 1); MAX_MERGE_SOURCES + 1];
        assert_eq!(
            field_of(&merge_adapters(&many, None, avg, &spec).unwrap_err()),
            "sources"
        );

        // Mixed kinds.
        let e = merge_adapters(&[l(2, 1), p.clone()], None, avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources");
        assert!(e.to_string().contains("one kind"), "{e}");

        // Bad weights reach the caller with the source's index.
        let e = merge_adapters(&[l(2, 1), l(2, 2)], Some(&[1.0, -2.0]), avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources[1].weight");
        let e = merge_adapters(&[l(2, 1), l(2, 2)], Some(&[1.0]), avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources");

        // Concatenation is for prompts, and takes no weights.
        let e = merge_adapters(&[l(2, 1)], None, PromptMergeMode::Concat, &spec).unwrap_err();
        assert_eq!(field_of(&e), "prompt_mode");
        let e = merge_adapters(
            &[p.clone(), p.clone()],
            Some(&[1.0, 1.0]),
            PromptMergeMode::Concat,
            &spec,
        )
        .unwrap_err();
        assert_eq!(field_of(&e), "sources[0].weight");

        // The merged rank must stay runnable.
        let e = merge_adapters(&[l(100, 1), l(100, 2), l(100, 3)], None, avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources");
        assert!(e.to_string().contains("300"), "{e}");
        let (long, _) = synthetic_prompt(&spec, 200, 6);
        let e = merge_adapters(
            &[long.clone(), long.clone(), long],
            None,
            PromptMergeMode::Concat,
            &spec,
        )
        .unwrap_err();
        assert_eq!(field_of(&e), "sources");

        // A broken or unsupported source is named by its index.
        let mut broken = l(2, 2);
        broken.safetensors = b"not safetensors".to_vec();
        let e = merge_adapters(&[l(2, 1), broken], None, avg, &spec).unwrap_err();
        assert!(field_of(&e).starts_with("sources[1]."), "{e}");
        let mut dora = l(2, 1);
        dora.config_json = dora
            .config_json
            .replace("\"peft_type\"", "\"use_dora\":true,\"peft_type\"");
        let e = merge_adapters(&[dora], None, avg, &spec).unwrap_err();
        assert_eq!(field_of(&e), "sources[0].adapter_config.use_dora");
        // A source for another backbone does not fit.
        let e = merge_adapters(&[real("lora", "sms_spam")], None, avg, &spec).unwrap_err();
        assert!(
            matches!(&e, LibraryError::FailedPrecondition(m) if m.starts_with("sources[0]")),
            "{e:?}"
        );
    }
}
