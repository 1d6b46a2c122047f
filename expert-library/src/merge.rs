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
//! weights are written as f32 under PEFT's key names.
//!
//! **Prompt.** [`PromptMergeMode::Average`]: the weighted average of the prompt embeddings
//! (every source needs the same number of virtual tokens). [`PromptMergeMode::Concat`]: the
//! prompts one after another in source order (virtual tokens add up; no weights).

use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::error::{LibraryError, Result};
use crate::expert::{
    parse_lora_key, AdapterSummary, BackboneSpec, ExpertKind, PeftAdapter, MAX_ADAPTER_BYTES,
};

/// Most experts one merge may combine.
pub const MAX_MERGE_SOURCES: usize = 64;
/// Largest rank a merged LoRA may reach (the sum of the sources' ranks): the most the backbone
/// runtime loads (`roe_backbone`'s `MAX_LORA_RANK`), so a merge never registers an expert that
/// inference would refuse.
pub const MAX_MERGED_LORA_RANK: usize = 256;
/// Most virtual tokens a concatenated prompt may reach (`roe_backbone`'s `MAX_VIRTUAL_TOKENS`).
pub const MAX_MERGED_VIRTUAL_TOKENS: usize = 512;
/// PEFT's `LoraConfig` default, which the backbone runtime also applies when a config leaves
/// `lora_alpha` out; the merge must scale sources exactly as inference does.
const PEFT_DEFAULT_LORA_ALPHA: f64 = 8.0;

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
    let summaries = sources
        .iter()
        .enumerate()
        .map(|(i, s)| s.validate(spec).map_err(|e| in_source(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let kind = summaries[0].kind();
    if let Some(i) = summaries.iter().position(|s| s.kind() != kind) {
        return Err(invalid(
            "sources",
            format!(
                "all sources must be of one kind: sources[0] is {}, sources[{i}] is {}",
                kind.as_str(),
                summaries[i].kind().as_str()
            ),
        ));
    }
    let (adapter, weights) =
        match (kind, prompt_mode) {
            (ExpertKind::Lora, PromptMergeMode::Concat) => return Err(invalid(
                "prompt_mode",
                "concatenation applies to prompt experts; LoRA experts are merged by their deltas",
            )),
            (ExpertKind::Lora, PromptMergeMode::Average) => {
                let w = normalise_weights(sources.len(), weights)?;
                (merge_loras(sources, &summaries, &w, spec)?, w)
            }
            (ExpertKind::Prompt, PromptMergeMode::Average) => {
                let w = normalise_weights(sources.len(), weights)?;
                (merge_prompts(sources, Some(&w), spec)?, w)
            }
            (ExpertKind::Prompt, PromptMergeMode::Concat) => {
                if weights.is_some() {
                    return Err(invalid(
                        "sources[0].weight",
                        "weights do not apply to a concatenation of prompts",
                    ));
                }
                (merge_prompts(sources, None, spec)?, Vec::new())
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

/// Reads a tensor as f32 (validation has already limited dtypes to f32/f16/bf16).
fn tensor_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(invalid(
                "weights",
                format!("{name}: dtype {other:?} is not supported (f32, f16, bf16)"),
            ))
        }
    })
}

fn config_object(i: usize, json: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid(
            format!("sources[{i}].adapter_config"),
            "not a JSON object",
        )),
    }
}

fn config_str(cfg: &Map<String, Value>, key: &str) -> Option<String> {
    cfg.get(key).and_then(Value::as_str).map(str::to_string)
}

/// One LoRA source, its blocks keyed by (layer, module): (A r x in, B out x r), row-major.
struct LoraSource {
    r: usize,
    scale: f64,
    blocks: BTreeMap<(usize, String), (Vec<f32>, Vec<f32>)>,
}

impl LoraSource {
    fn parse(i: usize, adapter: &PeftAdapter, r: usize) -> Result<Self> {
        let field = |k: &str| format!("sources[{i}].adapter_config.{k}");
        let cfg = config_object(i, &adapter.config_json)?;
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        // Variants whose delta is not `scale * B A` cannot be merged this way (and the
        // backbone runtime does not run them either).
        for k in ["use_dora", "fan_in_fan_out", "lora_bias"] {
            if flag(k) {
                return Err(invalid(field(k), "is not supported by merging"));
            }
        }
        if let Some(b) = cfg.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(invalid(field("bias"), format!("{b:?} is not supported")));
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if let Some(Value::Object(m)) = cfg.get(k) {
                if !m.is_empty() {
                    return Err(invalid(
                        field(k),
                        "per-module ranks or alphas are not supported",
                    ));
                }
            }
        }
        let alpha = match cfg.get("lora_alpha") {
            None | Some(Value::Null) => PEFT_DEFAULT_LORA_ALPHA,
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| invalid(field("lora_alpha"), "must be a finite number"))?,
        };
        let scale = if flag("use_rslora") {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let st = SafeTensors::deserialize(&adapter.safetensors).map_err(|e| {
            invalid(
                format!("sources[{i}].weights"),
                format!("not a valid safetensors file: {e}"),
            )
        })?;
        let mut a_of = BTreeMap::new();
        let mut b_of = BTreeMap::new();
        for (name, view) in st.tensors() {
            let (layer, module, ab) = parse_lora_key(&name).ok_or_else(|| {
                invalid(
                    format!("sources[{i}].weights"),
                    format!("unexpected tensor {name:?} in a LoRA"),
                )
            })?;
            let values = tensor_f32(&name, &view).map_err(|e| in_source(i, e))?;
            let map = if ab == 'A' { &mut a_of } else { &mut b_of };
            map.insert((layer, module.to_string()), values);
        }
        let mut blocks = BTreeMap::new();
        for (key, a) in a_of {
            let b = b_of.remove(&key).ok_or_else(|| {
                LibraryError::FailedPrecondition(format!(
                    "sources[{i}]: layer {} {} has lora_A but no lora_B",
                    key.0, key.1
                ))
            })?;
            blocks.insert(key, (a, b));
        }
        if let Some((layer, module)) = b_of.into_keys().next() {
            return Err(LibraryError::FailedPrecondition(format!(
                "sources[{i}]: layer {layer} {module} has lora_B but no lora_A"
            )));
        }
        Ok(Self { r, scale, blocks })
    }
}

/// Where PEFT puts a Llama projection: attention ones under `self_attn`, the rest under `mlp`.
fn module_parent(module: &str) -> &'static str {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    }
}

/// The PEFT key of a LoRA matrix (`ab` is "A" or "B").
pub fn lora_key(layer: usize, module: &str, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{module}.lora_{ab}.weight",
        module_parent(module)
    )
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes f32 tensors as safetensors with PEFT's `format: pt` metadata.
fn write_safetensors(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| LibraryError::Storage(format!("building tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| LibraryError::Storage(format!("writing merged weights: {e}")))
}

fn merge_loras(
    sources: &[PeftAdapter],
    summaries: &[AdapterSummary],
    weights: &[f64],
    spec: &BackboneSpec,
) -> Result<PeftAdapter> {
    let mut parsed = Vec::with_capacity(sources.len());
    let mut modules = BTreeSet::new();
    for (i, (src, summary)) in sources.iter().zip(summaries).enumerate() {
        let AdapterSummary::Lora {
            r, target_modules, ..
        } = summary
        else {
            return Err(invalid("sources", format!("sources[{i}] is not a LoRA")));
        };
        modules.extend(target_modules.iter().cloned());
        parsed.push(LoraSource::parse(i, src, *r)?);
    }
    let rank: usize = parsed.iter().map(|p| p.r).sum();
    if rank > MAX_MERGED_LORA_RANK {
        return Err(invalid(
            "sources",
            format!(
                "the merged LoRA's rank is the sum of the sources' ranks, {rank}; the backbone \
                 runs at most {MAX_MERGED_LORA_RANK}"
            ),
        ));
    }
    let mut dims = Vec::with_capacity(modules.len());
    for m in &modules {
        let (fin, fout) = spec.projection_dims(m).ok_or_else(|| {
            LibraryError::FailedPrecondition(format!(
                "target module {m:?} is not a projection of backbone {}",
                spec.name
            ))
        })?;
        dims.push((m.as_str(), fin, fout));
    }
    // Checked before allocating: a merge of many large LoRAs could otherwise take gigabytes.
    let bytes: usize = dims
        .iter()
        .map(|(_, fin, fout)| rank * (fin + fout) * 4)
        .sum::<usize>()
        * spec.num_layers;
    if bytes > MAX_ADAPTER_BYTES {
        return Err(LibraryError::ResourceExhausted(format!(
            "sources: the merged LoRA would take {bytes} bytes, the limit is {MAX_ADAPTER_BYTES}"
        )));
    }
    let mut tensors = Vec::with_capacity(spec.num_layers * dims.len() * 2);
    for layer in 0..spec.num_layers {
        for &(module, fin, fout) in &dims {
            let mut a = vec![0f32; rank * fin];
            let mut b = vec![0f32; fout * rank];
            let mut offset = 0;
            for (src, w) in parsed.iter().zip(weights) {
                let r = src.r;
                if let Some((sa, sb)) = src.blocks.get(&(layer, module.to_string())) {
                    if sa.len() != r * fin || sb.len() != fout * r {
                        return Err(LibraryError::FailedPrecondition(format!(
                            "layer {layer} {module}: a source's matrices do not match r={r}"
                        )));
                    }
                    a[offset * fin..(offset + r) * fin].copy_from_slice(sa);
                    // Scale and weight are folded into B (in f64, rounded once) so that the
                    // merged LoRA runs at scale 1.
                    let k = w * src.scale;
                    for o in 0..fout {
                        let row = &sb[o * r..(o + 1) * r];
                        let out = &mut b[o * rank + offset..o * rank + offset + r];
                        for (dst, x) in out.iter_mut().zip(row) {
                            *dst = (k * *x as f64) as f32;
                        }
                    }
                }
                offset += r;
            }
            tensors.push((lora_key(layer, module, "A"), vec![rank, fin], f32_bytes(&a)));
            tensors.push((
                lora_key(layer, module, "B"),
                vec![fout, rank],
                f32_bytes(&b),
            ));
        }
    }
    let first = config_object(0, &sources[0].config_json)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": config_str(&first, "task_type").unwrap_or_else(|| "CAUSAL_LM".into()),
        "base_model_name_or_path": config_str(&first, "base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": false,
        "target_modules": modules.iter().collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": null,
        "layers_to_transform": null,
    });
    Ok(PeftAdapter {
        config_json: serde_json::to_string_pretty(&config)
            .map_err(|e| LibraryError::Storage(format!("writing merged config: {e}")))?,
        safetensors: write_safetensors(&tensors)?,
    })
}

/// Averages (`weights` given) or concatenates (`None`) prompt experts.
fn merge_prompts(
    sources: &[PeftAdapter],
    weights: Option<&[f64]>,
    spec: &BackboneSpec,
) -> Result<PeftAdapter> {
    let d = spec.hidden_size;
    let mut prompts = Vec::with_capacity(sources.len());
    for (i, src) in sources.iter().enumerate() {
        let st = SafeTensors::deserialize(&src.safetensors).map_err(|e| {
            invalid(
                format!("sources[{i}].weights"),
                format!("not a valid safetensors file: {e}"),
            )
        })?;
        let view = st
            .tensor("prompt_embeddings")
            .map_err(|_| invalid(format!("sources[{i}].weights"), "lacks `prompt_embeddings`"))?;
        let values = tensor_f32("prompt_embeddings", &view).map_err(|e| in_source(i, e))?;
        if values.is_empty() || values.len() % d != 0 {
            return Err(LibraryError::FailedPrecondition(format!(
                "sources[{i}]: prompt_embeddings is not [virtual_tokens, {d}]"
            )));
        }
        prompts.push(values);
    }
    let merged: Vec<f32> = match weights {
        Some(w) => {
            let n0 = prompts[0].len() / d;
            if let Some(i) = prompts.iter().position(|p| p.len() != prompts[0].len()) {
                return Err(invalid(
                    "sources",
                    format!(
                        "averaged prompts need the same number of virtual tokens: sources[0] \
                         has {n0}, sources[{i}] has {}; concatenate them instead",
                        prompts[i].len() / d
                    ),
                ));
            }
            (0..prompts[0].len())
                .map(|k| {
                    prompts
                        .iter()
                        .zip(w)
                        .map(|(p, w)| w * p[k] as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        }
        None => {
            let total: usize = prompts.iter().map(|p| p.len() / d).sum();
            if total > MAX_MERGED_VIRTUAL_TOKENS {
                return Err(invalid(
                    "sources",
                    format!(
                        "the concatenated prompt would have {total} virtual tokens, at most \
                         {MAX_MERGED_VIRTUAL_TOKENS}"
                    ),
                ));
            }
            prompts.concat()
        }
    };
    let n = merged.len() / d;
    let first = config_object(0, &sources[0].config_json)?;
    let config = json!({
        "peft_type": "PROMPT_TUNING",
        "task_type": config_str(&first, "task_type").unwrap_or_else(|| "CAUSAL_LM".into()),
        "base_model_name_or_path": config_str(&first, "base_model_name_or_path"),
        "num_virtual_tokens": n,
        "token_dim": d,
        "num_transformer_submodules": 1,
        "num_attention_heads": spec.num_heads,
        "num_layers": spec.num_layers,
        "prompt_tuning_init": "RANDOM",
        "inference_mode": true,
    });
    Ok(PeftAdapter {
        config_json: serde_json::to_string_pretty(&config)
            .map_err(|e| LibraryError::Storage(format!("writing merged config: {e}")))?,
        safetensors: write_safetensors(&[(
            "prompt_embeddings".to_string(),
            vec![n, d],
            f32_bytes(&merged),
        )])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
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
        BackboneSpec {
            name: "tiny".into(),
            hidden_size: 8,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            intermediate_size: 12,
        }
    }

    fn tiny_runtime() -> roe_backbone::ModelShape {
        roe_backbone::ModelShape {
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 32,
        }
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
        for layer in 0..spec.num_layers {
            for m in modules {
                let (fin, fout) = spec.projection_dims(m).unwrap();
                for (ab, shape) in [("A", vec![r, fin]), ("B", vec![fout, r])] {
                    let v: Vec<f32> = (0..shape[0] * shape[1])
                        .map(|_| rng.gen_range(-1.0f32..1.0))
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
        let v: Vec<f32> = (0..n * spec.hidden_size)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let bytes = f32_bytes(&v);
        let views = vec![(
            "prompt_embeddings".to_string(),
            TensorView::new(Dtype::F32, vec![n, spec.hidden_size], &bytes).unwrap(),
        )];
        let cfg = json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n,
                         "token_dim": spec.hidden_size, "base_model_name_or_path": "tiny-base"});
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
            tensor_f32(name, &t)
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
        let (fin, fout) = spec.projection_dims(module).unwrap();
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
        for layer in 0..spec.num_layers {
            for m in &modules {
                let (fin, fout) = spec.projection_dims(m).unwrap();
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
        assert_eq!(checked, spec.num_layers * modules.len());
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
                target_modules,
                num_layers,
            } = &m.summary
            else {
                panic!("merged kind {:?}", m.summary)
            };
            assert_eq!((*r, *alpha, *num_layers), (12, 12.0, 30));
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
            (t.shape().to_vec(), tensor_f32("", &t).unwrap())
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
