//! Experts over the frozen backbone: PEFT prompt tuning (soft prompts) and PEFT LoRA.
//!
//! Both are read from PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`),
//! from a directory or from in-memory bytes, and validated against the backbone's shapes.
//! Every problem is reported as an [`ExpertError`], never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::ExpertError;

/// Upper bound on the number of soft-prompt vectors accepted.
pub const MAX_VIRTUAL_TOKENS: usize = 512;
/// Upper bound on a LoRA rank accepted.
pub const MAX_LORA_RANK: usize = 256;

/// The backbone shapes an expert must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl ExpertSpec {
    /// SmolLM2-135M: 576 wide, 30 layers, 9 heads, 3 KV heads, MLP 1536.
    pub const fn smollm2_135m() -> Self {
        Self {
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        }
    }
}

impl Default for ExpertSpec {
    fn default() -> Self {
        Self::smollm2_135m()
    }
}

/// A linear projection a LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }

    fn parent(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }

    /// (in_features, out_features) of the projection.
    pub fn dims(self, spec: &ExpertSpec) -> (usize, usize) {
        let h = spec.hidden_size;
        let kv = spec.num_kv_heads * spec.head_dim;
        let q = spec.num_heads * spec.head_dim;
        let f = spec.intermediate_size;
        match self {
            LoraTarget::QProj => (h, q),
            LoraTarget::KProj | LoraTarget::VProj => (h, kv),
            LoraTarget::OProj => (q, h),
            LoraTarget::GateProj | LoraTarget::UpProj => (h, f),
            LoraTarget::DownProj => (f, h),
        }
    }
}

fn read_dir_files(dir: &Path) -> Result<(String, Vec<u8>), ExpertError> {
    let cfg_path = dir.join("adapter_config.json");
    let st_path = dir.join("adapter_model.safetensors");
    let cfg = std::fs::read_to_string(&cfg_path).map_err(|source| ExpertError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let st = std::fs::read(&st_path).map_err(|source| ExpertError::Io {
        path: st_path.clone(),
        source,
    })?;
    Ok((cfg, st))
}

fn parse_config(config_json: &str) -> Result<serde_json::Map<String, Value>, ExpertError> {
    let v: Value = serde_json::from_str(config_json)
        .map_err(|e| ExpertError::Config(format!("not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ExpertError::Config("expected a JSON object".into())),
    }
}

fn check_peft_type(
    cfg: &serde_json::Map<String, Value>,
    expected: &'static str,
) -> Result<(), ExpertError> {
    match cfg.get("peft_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case(expected) => Ok(()),
        Some(t) => Err(ExpertError::PeftType {
            found: t.to_string(),
            expected,
        }),
        None => Err(ExpertError::Config("missing peft_type".into())),
    }
}

fn cfg_usize(
    cfg: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<usize>, ExpertError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            ExpertError::Config(format!("{key}: expected a non-negative integer, found {v}"))
        }),
    }
}

fn cfg_f64(cfg: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f64>, ExpertError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ExpertError::Config(format!("{key}: expected a number, found {v}"))),
    }
}

fn cfg_bool(cfg: &serde_json::Map<String, Value>, key: &str) -> bool {
    cfg.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn deserialize(bytes: &[u8]) -> Result<SafeTensors<'_>, ExpertError> {
    SafeTensors::deserialize(bytes).map_err(|e| ExpertError::Safetensors(e.to_string()))
}

/// Reads a tensor as f32 values (F32, F16 or BF16 on disk), checking shape and finiteness.
fn read_f32(st: &SafeTensors<'_>, name: &str, expected: &[usize]) -> Result<Vec<f32>, ExpertError> {
    let view = st
        .tensor(name)
        .map_err(|_| ExpertError::MissingTensor(name.to_string()))?;
    if view.shape() != expected {
        return Err(ExpertError::Shape {
            name: name.to_string(),
            found: view.shape().to_vec(),
            expected: expected.to_vec(),
        });
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
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
            return Err(ExpertError::Dtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    let n: usize = expected.iter().product();
    if values.len() != n {
        return Err(ExpertError::Safetensors(format!(
            "tensor {name}: {} values for shape {expected:?}",
            values.len()
        )));
    }
    if values.iter().any(|x| !x.is_finite()) {
        return Err(ExpertError::NonFinite {
            name: name.to_string(),
        });
    }
    Ok(values)
}

fn candle_err(e: candle_core::Error) -> ExpertError {
    ExpertError::Invalid(format!("tensor construction failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Soft prompts
// ---------------------------------------------------------------------------------------------

/// A PEFT prompt-tuning expert: `n` virtual token embeddings placed before the prompt.
#[derive(Debug, Clone)]
pub struct SoftPrompt {
    /// [n, hidden] f32.
    embeddings: Tensor,
    num_virtual_tokens: usize,
}

impl SoftPrompt {
    /// Load from a PEFT directory with `adapter_config.json` and `adapter_model.safetensors`.
    pub fn from_peft_dir(dir: impl AsRef<Path>) -> Result<Self, ExpertError> {
        Self::from_peft_dir_with(dir, &ExpertSpec::default())
    }

    pub fn from_peft_dir_with(
        dir: impl AsRef<Path>,
        spec: &ExpertSpec,
    ) -> Result<Self, ExpertError> {
        let (cfg, st) = read_dir_files(dir.as_ref())?;
        Self::from_peft_bytes_with(&cfg, &st, spec)
    }

    /// Load from the text of `adapter_config.json` and the bytes of `adapter_model.safetensors`.
    pub fn from_peft_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self, ExpertError> {
        Self::from_peft_bytes_with(config_json, safetensors, &ExpertSpec::default())
    }

    pub fn from_peft_bytes_with(
        config_json: &str,
        safetensors: &[u8],
        spec: &ExpertSpec,
    ) -> Result<Self, ExpertError> {
        let cfg = parse_config(config_json)?;
        check_peft_type(&cfg, "PROMPT_TUNING")?;
        if let Some(d) = cfg_usize(&cfg, "token_dim")? {
            if d != spec.hidden_size {
                return Err(ExpertError::Config(format!(
                    "token_dim {d} does not match the backbone's hidden size {}",
                    spec.hidden_size
                )));
            }
        }
        if let Some(s) = cfg_usize(&cfg, "num_transformer_submodules")? {
            if s != 1 {
                return Err(ExpertError::Config(format!(
                    "num_transformer_submodules {s} (only decoder-only, 1, is supported)"
                )));
            }
        }
        if let Some(l) = cfg_usize(&cfg, "num_layers")? {
            if l != spec.num_layers {
                return Err(ExpertError::Config(format!(
                    "num_layers {l} does not match the backbone's {}",
                    spec.num_layers
                )));
            }
        }
        let n_cfg = cfg_usize(&cfg, "num_virtual_tokens")?;
        let st = deserialize(safetensors)?;
        let name = "prompt_embeddings";
        for other in st.names() {
            if other != name {
                return Err(ExpertError::UnexpectedTensor(other.to_string()));
            }
        }
        let view = st
            .tensor(name)
            .map_err(|_| ExpertError::MissingTensor(name.to_string()))?;
        let shape = view.shape().to_vec();
        let n = match (shape.as_slice(), n_cfg) {
            ([n, _], Some(c)) if *n != c => {
                return Err(ExpertError::Shape {
                    name: name.into(),
                    found: shape.clone(),
                    expected: vec![c, spec.hidden_size],
                })
            }
            ([n, _], _) => *n,
            _ => {
                return Err(ExpertError::Shape {
                    name: name.into(),
                    found: shape.clone(),
                    expected: vec![n_cfg.unwrap_or(20), spec.hidden_size],
                })
            }
        };
        let values = read_f32(&st, name, &[n, spec.hidden_size])?;
        Self::from_vec(values, n, spec)
    }

    /// Build from row-major f32 values of shape [n, hidden].
    pub fn from_vec(values: Vec<f32>, n: usize, spec: &ExpertSpec) -> Result<Self, ExpertError> {
        if n == 0 || n > MAX_VIRTUAL_TOKENS {
            return Err(ExpertError::Invalid(format!(
                "num_virtual_tokens {n} outside 1..={MAX_VIRTUAL_TOKENS}"
            )));
        }
        if values.len() != n * spec.hidden_size {
            return Err(ExpertError::Shape {
                name: "prompt_embeddings".into(),
                found: vec![values.len()],
                expected: vec![n, spec.hidden_size],
            });
        }
        if values.iter().any(|x| !x.is_finite()) {
            return Err(ExpertError::NonFinite {
                name: "prompt_embeddings".into(),
            });
        }
        let embeddings =
            Tensor::from_vec(values, (n, spec.hidden_size), &Device::Cpu).map_err(candle_err)?;
        Ok(Self {
            embeddings,
            num_virtual_tokens: n,
        })
    }

    /// Build from a [n, hidden] tensor (any float dtype).
    pub fn from_tensor(t: &Tensor, spec: &ExpertSpec) -> Result<Self, ExpertError> {
        let dims = t.dims().to_vec();
        if dims.len() != 2 || dims[1] != spec.hidden_size {
            return Err(ExpertError::Shape {
                name: "prompt_embeddings".into(),
                found: dims,
                expected: vec![20, spec.hidden_size],
            });
        }
        let values = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err)?;
        Self::from_vec(values, dims[0], spec)
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// The [n, hidden] f32 embeddings.
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------------

/// One adapted projection: `delta(x) = b_t^T (a x)` with the scale folded into `b_t`.
/// Plain shared slices: a batch clones them per row for free, and the per-row kernel
/// ([`crate::model`]'s LoRA module) reads them directly.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// [r, in] f32, row-major (PEFT's lora_A as stored): each rank's input vector contiguous.
    pub(crate) a: Arc<[f32]>,
    /// [r, out] f32 (scale · B transposed, rows permuted to GGUF layout for q/k), row-major.
    pub(crate) b_t: Arc<[f32]>,
    pub(crate) rank: usize,
    pub(crate) fin: usize,
    pub(crate) fout: usize,
}

/// A PEFT LoRA expert, applied unmerged: `W x + (alpha/r) · B (A x)`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// layers[l][target.index()].
    layers: Vec<[Option<LoraPair>; 7]>,
    rank: usize,
    alpha: f64,
    scale: f64,
    targets: Vec<LoraTarget>,
}

/// Row permutation of llama.cpp's HF -> GGUF conversion for q/k projections:
/// `reshape(n_head, 2, head_dim/2, in).swap(1, 2)`. Returns, for every GGUF row, its HF row.
fn hf_to_gguf_rows(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut src = vec![0usize; n_head * head_dim];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                src[h * head_dim + 2 * i + j] = h * head_dim + j * half + i;
            }
        }
    }
    src
}

/// Raw LoRA weights of one projection, in Hugging Face layout.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub layer: usize,
    pub target: LoraTarget,
    /// A, [r, in] row-major.
    pub a: Vec<f32>,
    /// B, [out, r] row-major.
    pub b: Vec<f32>,
}

fn parse_lora_key(name: &str) -> Option<(usize, LoraTarget, char)> {
    // base_model.model.model.layers.N.self_attn.q_proj.lora_A[.default].weight
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let rest = rest.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (parent, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let target = LoraTarget::from_name(module)?;
    if parent != target.parent() {
        return None;
    }
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    match rest {
        "lora_A" => Some((layer, target, 'A')),
        "lora_B" => Some((layer, target, 'B')),
        _ => None,
    }
}

impl Lora {
    pub fn from_peft_dir(dir: impl AsRef<Path>) -> Result<Self, ExpertError> {
        Self::from_peft_dir_with(dir, &ExpertSpec::default())
    }

    pub fn from_peft_dir_with(
        dir: impl AsRef<Path>,
        spec: &ExpertSpec,
    ) -> Result<Self, ExpertError> {
        let (cfg, st) = read_dir_files(dir.as_ref())?;
        Self::from_peft_bytes_with(&cfg, &st, spec)
    }

    pub fn from_peft_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self, ExpertError> {
        Self::from_peft_bytes_with(config_json, safetensors, &ExpertSpec::default())
    }

    pub fn from_peft_bytes_with(
        config_json: &str,
        safetensors: &[u8],
        spec: &ExpertSpec,
    ) -> Result<Self, ExpertError> {
        let cfg = parse_config(config_json)?;
        check_peft_type(&cfg, "LORA")?;
        let rank = cfg_usize(&cfg, "r")?.ok_or_else(|| ExpertError::Config("missing r".into()))?;
        let alpha = cfg_f64(&cfg, "lora_alpha")?.unwrap_or(8.0);
        if cfg_bool(&cfg, "use_dora") {
            return Err(ExpertError::Config(
                "DoRA (use_dora) is not supported".into(),
            ));
        }
        if cfg_bool(&cfg, "fan_in_fan_out") {
            return Err(ExpertError::Config(
                "fan_in_fan_out is not supported".into(),
            ));
        }
        if cfg_bool(&cfg, "lora_bias") {
            return Err(ExpertError::Config("lora_bias is not supported".into()));
        }
        match cfg.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(b) => return Err(ExpertError::Config(format!("bias {b:?} is not supported"))),
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(Value::Object(m)) = cfg.get(key) {
                if !m.is_empty() {
                    return Err(ExpertError::Config(format!("{key} is not supported")));
                }
            }
        }
        if let Some(v) = cfg.get("modules_to_save") {
            if !v.is_null() && v.as_array().map(|a| !a.is_empty()).unwrap_or(true) {
                return Err(ExpertError::Config(
                    "modules_to_save is not supported".into(),
                ));
            }
        }
        let use_rslora = cfg_bool(&cfg, "use_rslora");
        let targets: Vec<LoraTarget> = match cfg.get("target_modules") {
            Some(Value::Array(a)) => {
                let mut out = BTreeSet::new();
                for v in a {
                    let name = v.as_str().ok_or_else(|| {
                        ExpertError::Config("target_modules: expected strings".into())
                    })?;
                    let t = LoraTarget::from_name(name).ok_or_else(|| {
                        ExpertError::Config(format!("unsupported target module {name:?}"))
                    })?;
                    out.insert(t);
                }
                out.into_iter().collect()
            }
            Some(Value::String(s)) => vec![LoraTarget::from_name(s)
                .ok_or_else(|| ExpertError::Config(format!("unsupported target_modules {s:?}")))?],
            _ => return Err(ExpertError::Config("missing target_modules".into())),
        };
        if targets.is_empty() {
            return Err(ExpertError::Config("target_modules is empty".into()));
        }
        let layers: Vec<usize> = match cfg.get("layers_to_transform") {
            None | Some(Value::Null) => (0..spec.num_layers).collect(),
            Some(Value::Number(n)) => vec![n.as_u64().unwrap_or(u64::MAX) as usize],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ExpertError::Config("layers_to_transform: expected integers".into())
                })?,
            Some(v) => return Err(ExpertError::Config(format!("layers_to_transform: {v}"))),
        };
        if let Some(&l) = layers.iter().find(|&&l| l >= spec.num_layers) {
            return Err(ExpertError::Config(format!(
                "layer {l} outside the backbone's {} layers",
                spec.num_layers
            )));
        }

        let st = deserialize(safetensors)?;
        let mut seen: BTreeMap<(usize, LoraTarget), (bool, bool)> = BTreeMap::new();
        for name in st.names() {
            let (layer, target, which) = parse_lora_key(name)
                .ok_or_else(|| ExpertError::UnexpectedTensor(name.to_string()))?;
            if layer >= spec.num_layers || !layers.contains(&layer) || !targets.contains(&target) {
                return Err(ExpertError::UnexpectedTensor(name.to_string()));
            }
            let e = seen.entry((layer, target)).or_default();
            if which == 'A' {
                e.0 = true
            } else {
                e.1 = true
            }
        }
        let prefix = "base_model.model.model.layers";
        let mut weights = Vec::with_capacity(layers.len() * targets.len());
        for &layer in &layers {
            for &target in &targets {
                let (fin, fout) = target.dims(spec);
                let parent = target.parent();
                let m = target.name();
                let key = |w: &str| {
                    let plain = format!("{prefix}.{layer}.{parent}.{m}.lora_{w}.weight");
                    if st.tensor(&plain).is_ok() {
                        plain
                    } else {
                        let alt = format!("{prefix}.{layer}.{parent}.{m}.lora_{w}.default.weight");
                        if st.tensor(&alt).is_ok() {
                            alt
                        } else {
                            plain
                        }
                    }
                };
                let a = read_f32(&st, &key("A"), &[rank, fin])?;
                let b = read_f32(&st, &key("B"), &[fout, rank])?;
                weights.push(LoraWeights {
                    layer,
                    target,
                    a,
                    b,
                });
            }
        }
        let scale = if use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        Self::from_weights(rank, alpha, scale, weights, spec)
    }

    /// Build from raw Hugging Face layout weights. `scale` multiplies `B(A x)` (PEFT:
    /// alpha / r). Projections not listed are not adapted.
    pub fn from_weights(
        rank: usize,
        alpha: f64,
        scale: f64,
        weights: Vec<LoraWeights>,
        spec: &ExpertSpec,
    ) -> Result<Self, ExpertError> {
        if rank == 0 || rank > MAX_LORA_RANK {
            return Err(ExpertError::Config(format!(
                "r {rank} outside 1..={MAX_LORA_RANK}"
            )));
        }
        if !scale.is_finite() || !alpha.is_finite() {
            return Err(ExpertError::Config("lora_alpha is not finite".into()));
        }
        if weights.is_empty() {
            return Err(ExpertError::Invalid(
                "a LoRA needs at least one adapted projection".into(),
            ));
        }
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..spec.num_layers).map(|_| Default::default()).collect();
        let mut targets = BTreeSet::new();
        for w in weights {
            let (fin, fout) = w.target.dims(spec);
            let label = format!("layers.{}.{}", w.layer, w.target.name());
            if w.layer >= spec.num_layers {
                return Err(ExpertError::Invalid(format!("{label}: layer out of range")));
            }
            if w.a.len() != rank * fin {
                return Err(ExpertError::Shape {
                    name: format!("{label}.lora_A"),
                    found: vec![w.a.len()],
                    expected: vec![rank, fin],
                });
            }
            if w.b.len() != fout * rank {
                return Err(ExpertError::Shape {
                    name: format!("{label}.lora_B"),
                    found: vec![w.b.len()],
                    expected: vec![fout, rank],
                });
            }
            if w.a.iter().chain(w.b.iter()).any(|x| !x.is_finite()) {
                return Err(ExpertError::NonFinite { name: label });
            }
            // a [r, in]: PEFT's layout.
            let a: Arc<[f32]> = w.a.as_slice().into();
            // b_t [r, out], rows of B permuted to GGUF layout for q/k, scaled.
            let perm = match w.target {
                LoraTarget::QProj => Some(hf_to_gguf_rows(spec.num_heads, spec.head_dim)),
                LoraTarget::KProj => Some(hf_to_gguf_rows(spec.num_kv_heads, spec.head_dim)),
                _ => None,
            };
            let mut b_t = vec![0f32; rank * fout];
            for o in 0..fout {
                let src = perm.as_ref().map(|p| p[o]).unwrap_or(o);
                for r in 0..rank {
                    b_t[r * fout + o] = (w.b[src * rank + r] as f64 * scale) as f32;
                }
            }
            let b_t: Arc<[f32]> = b_t.into();
            let slot = &mut layers[w.layer][w.target.index()];
            if slot.is_some() {
                return Err(ExpertError::Invalid(format!("{label}: given twice")));
            }
            *slot = Some(LoraPair {
                a,
                b_t,
                rank,
                fin,
                fout,
            });
            targets.insert(w.target);
        }
        Ok(Self {
            layers,
            rank,
            alpha,
            scale,
            targets: targets.into_iter().collect(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn targets(&self) -> &[LoraTarget] {
        &self.targets
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn pair(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers
            .get(layer)
            .and_then(|l| l[target.index()].as_ref())
    }
}

/// The experts applied to one row: an optional soft prompt and an optional LoRA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Adapters<'a> {
    pub prompt: Option<&'a SoftPrompt>,
    pub lora: Option<&'a Lora>,
}

impl<'a> Adapters<'a> {
    pub const fn none() -> Self {
        Self {
            prompt: None,
            lora: None,
        }
    }
    pub const fn prompt(p: &'a SoftPrompt) -> Self {
        Self {
            prompt: Some(p),
            lora: None,
        }
    }
    pub const fn lora(l: &'a Lora) -> Self {
        Self {
            prompt: None,
            lora: Some(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp() {
        // n_head 1, head_dim 4: HF rows [0,1,2,3] -> GGUF rows [0,2,1,3]
        assert_eq!(hf_to_gguf_rows(1, 4), vec![0, 2, 1, 3]);
        assert_eq!(hf_to_gguf_rows(2, 4), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn parses_keys() {
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some((12, LoraTarget::QProj, 'A'))
        );
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight"),
            Some((3, LoraTarget::DownProj, 'B'))
        );
        assert_eq!(parse_lora_key("base_model.model.lm_head.weight"), None);
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.3.mlp.q_proj.lora_B.weight"),
            None
        );
    }
}
