//! What an expert is: metadata, its task instances, and its PEFT adapter (soft prompt or LoRA),
//! validated against the backbone it claims to fit.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LibraryError, Result};

/// The two kinds of parameter-efficient expert roe serves on a frozen backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// Prompt tuning: learned vectors prepended to the input embeddings.
    Prompt,
    /// LoRA: low-rank deltas on some projections, applied unmerged.
    Lora,
}

impl ExpertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Lora => "lora",
        }
    }
}

impl std::str::FromStr for ExpertKind {
    type Err = LibraryError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "prompt" | "prompt_tuning" => Ok(Self::Prompt),
            "lora" => Ok(Self::Lora),
            other => Err(LibraryError::invalid(
                "kind",
                format!("unknown expert kind {other:?} (expected prompt or lora)"),
            )),
        }
    }
}

/// The shapes an adapter must have to fit a backbone. Only what validation needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneSpec {
    /// Short name experts refer to, e.g. `smollm2-135m`.
    pub name: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
}

impl BackboneSpec {
    /// SmolLM2-135M-Instruct, roe's default backbone.
    pub fn smollm2_135m() -> Self {
        Self {
            name: "smollm2-135m".to_string(),
            hidden_size: 576,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            intermediate_size: 1536,
        }
    }

    fn kv_dim(&self) -> usize {
        self.hidden_size / self.num_heads * self.num_kv_heads
    }

    /// (in, out) features of a Llama projection that LoRA may target.
    pub(crate) fn projection_dims(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        match module {
            "q_proj" | "o_proj" => Some((h, h)),
            "k_proj" | "v_proj" => Some((h, self.kv_dim())),
            "gate_proj" | "up_proj" => Some((h, self.intermediate_size)),
            "down_proj" => Some((self.intermediate_size, h)),
            _ => None,
        }
    }
}

/// One sampled training instance of an expert's task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Answer choices (multiple choice) or the task's labels (classification); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

/// How an instance or a query is turned into the text the encoder embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    /// The input alone.
    Instance,
    /// `Answer Choices: a, b, c, Instance: <input>` (the ELM paper's `choice_instance`);
    /// rows without choices fall back to the input alone.
    #[default]
    ChoiceInstance,
}

impl TextFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::ChoiceInstance => "choice_instance",
        }
    }

    pub fn render(self, input: &str, choices: &[String]) -> String {
        match self {
            Self::ChoiceInstance if !choices.is_empty() => {
                format!("Answer Choices: {}, Instance: {input}", choices.join(", "))
            }
            _ => input.to_string(),
        }
    }
}

impl std::str::FromStr for TextFormat {
    type Err = LibraryError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "instance" => Ok(Self::Instance),
            "choice_instance" => Ok(Self::ChoiceInstance),
            other => Err(LibraryError::invalid(
                "text_format",
                format!("unknown text format {other:?} (expected instance or choice_instance)"),
            )),
        }
    }
}

/// What validation learned about an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AdapterSummary {
    Prompt {
        num_virtual_tokens: usize,
        token_dim: usize,
    },
    Lora {
        r: usize,
        alpha: f64,
        target_modules: Vec<String>,
        num_layers: usize,
    },
}

impl AdapterSummary {
    pub fn kind(&self) -> ExpertKind {
        match self {
            Self::Prompt { .. } => ExpertKind::Prompt,
            Self::Lora { .. } => ExpertKind::Lora,
        }
    }
}

/// An adapter in Hugging Face PEFT's on-disk format, kept as the original bytes so that the
/// backbone runtime reads exactly what PEFT wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeftAdapter {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

/// Largest adapter we accept, in bytes: far above a LoRA of a small model, far below memory.
pub const MAX_ADAPTER_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    base_model_name_or_path: Option<String>,
    // prompt tuning
    num_virtual_tokens: Option<usize>,
    token_dim: Option<usize>,
    // LoRA
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<serde_json::Value>,
}

impl PeftAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from a PEFT directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(LibraryError::invalid(
                "peft_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let cfg = dir.join("adapter_config.json");
        let weights = dir.join("adapter_model.safetensors");
        for p in [&cfg, &weights] {
            if !p.is_file() {
                return Err(LibraryError::invalid(
                    "peft_dir",
                    format!("{} is missing", p.display()),
                ));
            }
        }
        Ok(Self {
            config_json: std::fs::read_to_string(&cfg).map_err(|e| LibraryError::io(&cfg, e))?,
            safetensors: std::fs::read(&weights).map_err(|e| LibraryError::io(&weights, e))?,
        })
    }

    pub fn sha256_hex(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.config_json.as_bytes());
        h.update(&self.safetensors);
        hex(&h.finalize())
    }

    /// Checks that the adapter is a well-formed PEFT prompt or LoRA that fits `spec`:
    /// peft_type, tensor names and shapes, dtype (f32/f16/bf16) and finite values.
    pub fn validate(&self, spec: &BackboneSpec) -> Result<AdapterSummary> {
        if self.safetensors.len() > MAX_ADAPTER_BYTES {
            return Err(LibraryError::ResourceExhausted(format!(
                "adapter weights are {} bytes, the limit is {MAX_ADAPTER_BYTES}",
                self.safetensors.len()
            )));
        }
        let cfg: PeftConfig = serde_json::from_str(&self.config_json).map_err(|e| {
            LibraryError::invalid("adapter_config", format!("not valid PEFT JSON: {e}"))
        })?;
        let tensors = SafeTensors::deserialize(&self.safetensors).map_err(|e| {
            LibraryError::invalid("weights", format!("not a valid safetensors file: {e}"))
        })?;
        for (name, view) in tensors.tensors() {
            check_finite(&name, &view)?;
        }
        let _ = &cfg.base_model_name_or_path;
        match cfg.peft_type.as_deref() {
            Some("PROMPT_TUNING") => validate_prompt(&cfg, &tensors, spec),
            Some("LORA") => validate_lora(&cfg, &tensors, spec),
            Some(other) => Err(LibraryError::invalid(
                "adapter_config.peft_type",
                format!("{other:?} is not supported (PROMPT_TUNING or LORA)"),
            )),
            None => Err(LibraryError::invalid(
                "adapter_config.peft_type",
                "missing".to_string(),
            )),
        }
    }
}

fn validate_prompt(
    cfg: &PeftConfig,
    tensors: &SafeTensors,
    spec: &BackboneSpec,
) -> Result<AdapterSummary> {
    let t = tensors.tensor("prompt_embeddings").map_err(|_| {
        LibraryError::invalid("weights", "prompt tuning adapter lacks `prompt_embeddings`")
    })?;
    let shape = t.shape();
    if shape.len() != 2 || shape[1] != spec.hidden_size || shape[0] == 0 {
        return Err(LibraryError::FailedPrecondition(format!(
            "prompt_embeddings has shape {shape:?}; backbone {} needs [virtual_tokens, {}]",
            spec.name, spec.hidden_size
        )));
    }
    if let Some(n) = cfg.num_virtual_tokens {
        if n != shape[0] {
            return Err(LibraryError::invalid(
                "adapter_config.num_virtual_tokens",
                format!("says {n} but prompt_embeddings has {} rows", shape[0]),
            ));
        }
    }
    if let Some(d) = cfg.token_dim {
        if d != spec.hidden_size {
            return Err(LibraryError::FailedPrecondition(format!(
                "token_dim {d} does not match backbone {} hidden size {}",
                spec.name, spec.hidden_size
            )));
        }
    }
    Ok(AdapterSummary::Prompt {
        num_virtual_tokens: shape[0],
        token_dim: shape[1],
    })
}

fn validate_lora(
    cfg: &PeftConfig,
    tensors: &SafeTensors,
    spec: &BackboneSpec,
) -> Result<AdapterSummary> {
    let r = cfg
        .r
        .filter(|r| *r > 0)
        .ok_or_else(|| LibraryError::invalid("adapter_config.r", "missing or zero"))?;
    let alpha = cfg.lora_alpha.unwrap_or(r as f64);
    if !alpha.is_finite() {
        return Err(LibraryError::invalid(
            "adapter_config.lora_alpha",
            "not finite",
        ));
    }
    let targets: Vec<String> = match &cfg.target_modules {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                LibraryError::invalid("adapter_config.target_modules", "must be strings")
            })?,
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => {
            return Err(LibraryError::invalid(
                "adapter_config.target_modules",
                "missing",
            ))
        }
    };
    let mut targets_sorted = targets.clone();
    targets_sorted.sort();
    targets_sorted.dedup();
    for m in &targets_sorted {
        if spec.projection_dims(m).is_none() {
            return Err(LibraryError::FailedPrecondition(format!(
                "target module {m:?} is not a projection of backbone {}",
                spec.name
            )));
        }
    }
    // Every tensor must be a lora_A/lora_B of a targeted module of a real layer, and every
    // (layer, module) pair must be complete.
    let mut seen = std::collections::BTreeSet::new();
    for (name, view) in tensors.tensors() {
        let (layer, module, ab) = parse_lora_key(&name).ok_or_else(|| {
            LibraryError::invalid("weights", format!("unexpected tensor {name:?} in a LoRA"))
        })?;
        if layer >= spec.num_layers {
            return Err(LibraryError::FailedPrecondition(format!(
                "{name}: layer {layer} but backbone {} has {} layers",
                spec.name, spec.num_layers
            )));
        }
        if !targets_sorted.iter().any(|t| t == module) {
            return Err(LibraryError::invalid(
                "weights",
                format!("{name}: module {module} is not in target_modules"),
            ));
        }
        let (fin, fout) = spec
            .projection_dims(module)
            .ok_or_else(|| LibraryError::invalid("weights", format!("{name}: unknown module")))?;
        let want = if ab == 'A' { [r, fin] } else { [fout, r] };
        if view.shape() != want {
            return Err(LibraryError::FailedPrecondition(format!(
                "{name} has shape {:?}; backbone {} with r={r} needs {want:?}",
                view.shape(),
                spec.name
            )));
        }
        seen.insert((layer, module.to_string(), ab));
    }
    let expected = spec.num_layers * targets_sorted.len() * 2;
    if seen.len() != expected {
        return Err(LibraryError::FailedPrecondition(format!(
            "LoRA has {} of the {expected} lora_A/lora_B tensors that {} layers x {:?} need",
            seen.len(),
            spec.num_layers,
            targets_sorted
        )));
    }
    Ok(AdapterSummary::Lora {
        r,
        alpha,
        target_modules: targets_sorted,
        num_layers: spec.num_layers,
    })
}

/// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` -> (N, "q_proj", 'A').
pub fn parse_lora_key(name: &str) -> Option<(usize, &str, char)> {
    let rest = name.split_once("layers.")?.1;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let parts: Vec<&str> = rest.split('.').collect();
    // [self_attn|mlp, module, lora_A|lora_B, weight]
    if parts.len() != 4 || parts[3] != "weight" {
        return None;
    }
    let ab = match parts[2] {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((layer, parts[1], ab))
}

fn check_finite(name: &str, view: &safetensors::tensor::TensorView) -> Result<()> {
    let data = view.data();
    let bad = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        Dtype::F16 => data
            .chunks_exact(2)
            .any(|c| !half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
        Dtype::BF16 => data
            .chunks_exact(2)
            .any(|c| !half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
        other => {
            return Err(LibraryError::invalid(
                "weights",
                format!("{name}: dtype {other:?} is not supported (f32, f16, bf16)"),
            ))
        }
    };
    if bad {
        return Err(LibraryError::invalid(
            "weights",
            format!("{name} holds NaN or infinite values"),
        ));
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A registered expert's metadata (everything but its weights and instances).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertMeta {
    pub id: String,
    pub name: String,
    pub description: String,
    pub kind: ExpertKind,
    /// Name of the backbone the expert fits (a [`BackboneSpec::name`]).
    pub backbone: String,
    /// Starts at 1; registering the same id as a new version increments it.
    pub version: u64,
    pub created_at_unix_ms: u64,
    pub num_instances: usize,
    pub weights_sha256: String,
    pub weights_bytes: usize,
    pub adapter: AdapterSummary,
}

/// Ids are path- and URL-safe so they can appear in CLI arguments, logs and file names.
pub fn validate_expert_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 {
        return Err(LibraryError::invalid("id", "must be 1 to 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
    {
        return Err(LibraryError::invalid(
            "id",
            format!("{id:?} may only hold ASCII letters, digits and _ - . : /"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_keys_parse() {
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some((12, "q_proj", 'A'))
        );
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"),
            Some((3, "down_proj", 'B'))
        );
        assert_eq!(parse_lora_key("prompt_embeddings"), None);
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight"),
            None
        );
    }

    #[test]
    fn choice_instance_renders_like_the_paper() {
        let f = TextFormat::ChoiceInstance;
        assert_eq!(
            f.render("Is it?", &["No.".into(), "Yes.".into()]),
            "Answer Choices: No., Yes., Instance: Is it?"
        );
        assert_eq!(f.render("Write", &[]), "Write");
        assert_eq!(TextFormat::Instance.render("x", &["a".into()]), "x");
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_expert_id("sms_spam/prompt").is_ok());
        assert!(validate_expert_id("").is_err());
        assert!(validate_expert_id("a b").is_err());
        assert!(validate_expert_id(&"x".repeat(200)).is_err());
    }
}
