//! What an expert is: metadata, its task instances, and its PEFT adapter (soft prompt or LoRA),
//! validated against the backbone it claims to fit. The PEFT format itself is roe-peft's: the
//! same reader the backbone runtime loads experts with, so registration accepts exactly what
//! inference runs.

use std::path::Path;

/// The shape a backbone's adapters must have (roe-peft's).
pub use roe_peft::ModelShape;
use roe_peft::{Adapter, PeftError, PeftErrorKind, PeftType};
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

impl From<PeftType> for ExpertKind {
    fn from(t: PeftType) -> Self {
        match t {
            PeftType::PromptTuning => Self::Prompt,
            PeftType::Lora => Self::Lora,
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

/// A backbone experts may be registered for: the name experts refer to and the shape their
/// adapters must fit. The serving backbone's shape comes from the model it loaded
/// (`roe_backbone::Backbone::model_shape`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneSpec {
    /// Short name experts refer to, e.g. `smollm2-135m`.
    pub name: String,
    pub shape: ModelShape,
}

impl BackboneSpec {
    pub fn new(name: impl Into<String>, shape: ModelShape) -> Self {
        Self {
            name: name.into(),
            shape,
        }
    }

    /// SmolLM2-135M-Instruct, roe's default backbone.
    pub fn smollm2_135m() -> Self {
        Self::new("smollm2-135m", ModelShape::smollm2_135m())
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

/// What validation learned about an adapter (stored with the expert).
pub use roe_peft::AdapterSummary;

/// An adapter in Hugging Face PEFT's on-disk format, kept as the original bytes so that the
/// backbone runtime reads exactly what PEFT wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeftAdapter {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

/// Largest adapter weights accepted, in bytes (roe-peft's limit, the runtime's too).
pub use roe_peft::MAX_ADAPTER_BYTES;

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

    /// SHA-256 of the weights file alone, as `sha256sum adapter_model.safetensors` prints it.
    pub fn safetensors_sha256_hex(&self) -> String {
        hex(&Sha256::digest(&self.safetensors))
    }

    pub fn sha256_hex(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.config_json.as_bytes());
        h.update(&self.safetensors);
        hex(&h.finalize())
    }

    /// Checks that the adapter is a well-formed PEFT prompt or LoRA that fits `spec`, with
    /// roe-peft's rules (the runtime's): config fields, tensor names and shapes, dtype
    /// (f32/f16/bf16), finite values, limits. The summary's alpha and scale are the ones
    /// inference applies.
    pub fn validate(&self, spec: &BackboneSpec) -> Result<AdapterSummary> {
        Adapter::check_peft(&self.config_json, &self.safetensors, &spec.shape)
            .map_err(|e| peft_error(e, spec))
    }

    /// [`PeftAdapter::validate`], keeping the decoded adapter.
    pub fn parse(&self, spec: &BackboneSpec) -> Result<Adapter> {
        Adapter::from_peft(&self.config_json, &self.safetensors, &spec.shape)
            .map_err(|e| peft_error(e, spec))
    }
}

impl From<roe_peft::PeftFiles> for PeftAdapter {
    fn from(f: roe_peft::PeftFiles) -> Self {
        Self {
            config_json: f.config_json,
            safetensors: f.safetensors,
        }
    }
}

/// A PEFT problem as the library reports it: the client's malformed or unsupported adapter is
/// INVALID_ARGUMENT on the field, one made for another shape does not fit the backbone.
pub(crate) fn peft_error(e: PeftError, spec: &BackboneSpec) -> LibraryError {
    match e.kind() {
        PeftErrorKind::Invalid => LibraryError::invalid(e.field(), e.to_string()),
        PeftErrorKind::DoesNotFit => {
            LibraryError::FailedPrecondition(format!("backbone {}: {e}", spec.name))
        }
        PeftErrorKind::TooLarge => LibraryError::ResourceExhausted(format!("{}: {e}", e.field())),
    }
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
    /// SHA-256 of the weights file alone (empty for experts stored before it was kept).
    #[serde(default)]
    pub safetensors_sha256: String,
    pub weights_bytes: usize,
    pub adapter: AdapterSummary,
    /// How roe trained the expert (None: registered from a PEFT adapter made elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingRecord>,
}

/// What an expert trained inside roe keeps of its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub job_id: String,
    /// The recipe, as JSON (every hyper-parameter).
    pub recipe_json: String,
    pub steps: usize,
    /// Mean answer loss of the last step.
    pub final_loss: f64,
    /// `accuracy` or `token_f1`.
    pub metric: String,
    /// The metric on the held-out rows, with the expert and with the bare backbone (None
    /// when no row was held out).
    pub held_out_score: Option<f64>,
    pub held_out_baseline: Option<f64>,
    pub held_out_rows: usize,
    pub train_rows: usize,
    /// Every member of the prompt ensemble this expert was trained in (empty: trained
    /// alone). Score them together with ScoreEnsemble.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ensemble_members: Vec<String>,
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
    // Ids name things in paths and URLs: no empty, `.` or `..` segments.
    if id
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(LibraryError::invalid(
            "id",
            format!("{id:?} has an empty, `.` or `..` segment between slashes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        for ok in ["sms_spam", "sms_spam/prompt", "a.1", "team:x/y-2", "v1.2"] {
            assert!(validate_expert_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "/",
            "//",
            "a/",
            "/a",
            "a//b",
            "../../etc/passwd",
            "a/./b",
            "a/../b",
            "sp ace",
            "é",
        ] {
            let err = validate_expert_id(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid id"), "{bad:?}: {err}");
        }
        assert!(validate_expert_id(&"x".repeat(129)).is_err());
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
