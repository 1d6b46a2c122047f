//! `adapter_config.json`, typed. Only what roe runs is accepted: a config field that asks for a
//! PEFT feature the runtime does not implement is refused by name, while fields that only
//! matter for training (dropout, initialisation) or that newer PEFT versions add are ignored.
//! Checks against a model's shape are in [`crate::read`]; this module needs no model.

use serde_json::{Map, Value};

use crate::error::{PeftError, Result};
use crate::shape::LoraTarget;
use crate::{MAX_CONFIG_BYTES, MAX_LORA_RANK};

/// PEFT's `LoraConfig.lora_alpha` default, applied when a config leaves it out.
pub const DEFAULT_LORA_ALPHA: f64 = 8.0;

/// The adapter types roe serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeftType {
    PromptTuning,
    Lora,
}

impl PeftType {
    /// The spelling PEFT writes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PromptTuning => "PROMPT_TUNING",
            Self::Lora => "LORA",
        }
    }

    /// Exactly as PEFT writes it: its `PeftType` is an upper-case string enum, and a config
    /// is looked up by that exact value, so `"lora"` is not a PEFT config.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::PromptTuning, Self::Lora]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// The `peft_type` values accepted, for the error that refuses another.
const ACCEPTED_PEFT_TYPES: &str = "\"PROMPT_TUNING\" or \"LORA\", upper case as PEFT writes them";

/// Most bytes of a refused `peft_type` quoted back (the rest of the config may be 1 MiB).
const MAX_QUOTED_PEFT_TYPE_BYTES: usize = 64;

/// `text` cut to `max` bytes on a character boundary, marked when cut.
fn clipped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Where an adapter comes from; carried over by writers, never checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdapterOrigin {
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
}

/// A prompt-tuning config. The counts are optional because the tensor carries them; when
/// given they must agree with it and with the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: Option<usize>,
    pub token_dim: Option<usize>,
    /// The base model's layer count, as PEFT records it.
    pub num_layers: Option<usize>,
    pub origin: AdapterOrigin,
}

/// A LoRA config, with PEFT's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    /// `lora_alpha`, [`DEFAULT_LORA_ALPHA`] when left out.
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// Sorted in [`LoraTarget::ALL`] order, no duplicates, not empty.
    pub target_modules: Vec<LoraTarget>,
    /// Sorted, no duplicates, not empty; `None`: every layer.
    pub layers_to_transform: Option<Vec<usize>>,
    pub origin: AdapterOrigin,
}

impl LoraConfig {
    /// Every layer, no rsLoRA, no origin: what a trainer or a merge starts from. The lists
    /// are normalised and checked when the adapter is built ([`crate::LoraAdapter::new`]).
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<LoraTarget>) -> Self {
        Self {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules,
            layers_to_transform: None,
            origin: AdapterOrigin::default(),
        }
    }

    /// What multiplies `B (A x)`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.lora_alpha, self.r, self.use_rslora)
    }
}

/// PEFT's LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    PromptTuning(PromptTuningConfig),
    Lora(LoraConfig),
}

impl PeftConfig {
    pub fn from_json(config_json: &str) -> Result<Self> {
        if config_json.len() > MAX_CONFIG_BYTES {
            return Err(PeftError::TooLarge {
                what: "adapter_config.json".into(),
                found: config_json.len(),
                limit: MAX_CONFIG_BYTES,
            });
        }
        let value: Value = serde_json::from_str(config_json)
            .map_err(|e| PeftError::ConfigJson(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(PeftError::ConfigJson("expected a JSON object".into()));
        };
        let cfg = Fields(&map);
        let peft_type = match cfg.string("peft_type")? {
            None => return Err(PeftError::field_error("peft_type", "missing")),
            Some(t) => PeftType::parse(&t).ok_or_else(|| PeftError::PeftType {
                found: clipped(&t, MAX_QUOTED_PEFT_TYPE_BYTES),
                expected: ACCEPTED_PEFT_TYPES,
            })?,
        };
        match peft_type {
            PeftType::PromptTuning => prompt_tuning(&cfg).map(Self::PromptTuning),
            PeftType::Lora => lora(&cfg).map(Self::Lora),
        }
    }

    pub fn peft_type(&self) -> PeftType {
        match self {
            Self::PromptTuning(_) => PeftType::PromptTuning,
            Self::Lora(_) => PeftType::Lora,
        }
    }
}

/// Typed access to the config object; every error names the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// `None` for a missing or null field.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        PeftError::field_error(
                            key,
                            format!("expected a non-negative integer, found {v}"),
                        )
                    })
            })
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    PeftError::field_error(key, format!("expected a finite number, found {v}"))
                })
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| {
                PeftError::field_error(key, format!("expected true or false, found {v}"))
            }),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    PeftError::field_error(key, format!("expected a string, found {v}"))
                })
            })
            .transpose()
    }

    /// Refuses a field that switches on a feature the runtime lacks. Off is missing, null,
    /// false, or an empty string, list or object (PEFT writes `{}` for unused patterns).
    fn refuse_if_set(&self, key: &str, what: &str) -> Result<()> {
        let on = match self.get(key) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(m)) => !m.is_empty(),
            Some(_) => true,
        };
        if on {
            return Err(PeftError::unsupported(key, format!("{what} is set")));
        }
        Ok(())
    }

    fn origin(&self) -> Result<AdapterOrigin> {
        Ok(AdapterOrigin {
            base_model_name_or_path: self.string("base_model_name_or_path")?,
            task_type: self.string("task_type")?,
        })
    }
}

fn prompt_tuning(cfg: &Fields<'_>) -> Result<PromptTuningConfig> {
    // Encoder-decoder models get one prompt per transformer stack; roe's backbone has one.
    if let Some(n) = cfg.usize("num_transformer_submodules")? {
        if n != 1 {
            return Err(PeftError::unsupported(
                "num_transformer_submodules",
                format!("{n} prompt stacks (only decoder-only, 1)"),
            ));
        }
    }
    // Extra trained modules would come as extra tensors the runtime does not apply.
    cfg.refuse_if_set("modules_to_save", "training modules besides the prompt")?;
    let num_virtual_tokens = cfg.usize("num_virtual_tokens")?;
    if let Some(n) = num_virtual_tokens {
        check_virtual_tokens(n)?;
    }
    Ok(PromptTuningConfig {
        num_virtual_tokens,
        token_dim: cfg.usize("token_dim")?,
        num_layers: cfg.usize("num_layers")?,
        origin: cfg.origin()?,
    })
}

pub(crate) fn check_virtual_tokens(n: usize) -> Result<()> {
    if n == 0 {
        return Err(PeftError::field_error(
            "num_virtual_tokens",
            "must be at least 1",
        ));
    }
    if n > crate::MAX_VIRTUAL_TOKENS {
        return Err(PeftError::TooLarge {
            what: "num_virtual_tokens".into(),
            found: n,
            limit: crate::MAX_VIRTUAL_TOKENS,
        });
    }
    Ok(())
}

pub(crate) fn check_rank(r: usize) -> Result<()> {
    if r == 0 {
        return Err(PeftError::field_error("r", "must be at least 1"));
    }
    if r > MAX_LORA_RANK {
        return Err(PeftError::TooLarge {
            what: "r".into(),
            found: r,
            limit: MAX_LORA_RANK,
        });
    }
    Ok(())
}

/// LoRA variants whose forward pass is not `W x + scale · B (A x)` on plain Linear layers,
/// or that train more than the A/B matrices: (field, what it turns on).
const UNSUPPORTED_LORA_FEATURES: &[(&str, &str)] = &[
    ("use_dora", "DoRA (weight-decomposed LoRA)"),
    (
        "fan_in_fan_out",
        "fan_in_fan_out (Conv1D-style transposed weights)",
    ),
    ("lora_bias", "a trained LoRA bias"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("modules_to_save", "training modules besides the LoRA"),
    ("layer_replication", "layer replication"),
    ("use_qalora", "QALoRA"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("target_parameters", "LoRA on parameters instead of modules"),
    ("exclude_modules", "excluded modules"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing"),
    ("kasa_config", "KaSA"),
    ("monteclora_config", "MonteCLoRA"),
];

fn lora(cfg: &Fields<'_>) -> Result<LoraConfig> {
    for (field, what) in UNSUPPORTED_LORA_FEATURES {
        cfg.refuse_if_set(field, what)?;
    }
    match cfg.string("bias")?.as_deref() {
        None | Some("none") => {}
        Some(b) => {
            return Err(PeftError::unsupported(
                "bias",
                format!("{b:?} trains the base model's biases (only \"none\")"),
            ))
        }
    }
    layers_pattern(cfg)?;
    let r = cfg
        .usize("r")?
        .ok_or_else(|| PeftError::field_error("r", "missing"))?;
    check_rank(r)?;
    Ok(LoraConfig {
        r,
        lora_alpha: cfg.f64("lora_alpha")?.unwrap_or(DEFAULT_LORA_ALPHA),
        use_rslora: cfg.bool("use_rslora")?,
        target_modules: target_modules(cfg)?,
        layers_to_transform: layers_to_transform(cfg)?,
        origin: cfg.origin()?,
    })
}

/// PEFT finds the layer index of a module under `layers_pattern` (default: `layers`, what a
/// Llama has); any other pattern would select other modules.
fn layers_pattern(cfg: &Fields<'_>) -> Result<()> {
    let ok = match cfg.get("layers_pattern") {
        None => true,
        Some(Value::String(s)) => s == "layers",
        Some(Value::Array(a)) => a.iter().all(|v| v.as_str() == Some("layers")),
        Some(_) => false,
    };
    if !ok {
        return Err(PeftError::unsupported(
            "layers_pattern",
            "a pattern other than \"layers\"",
        ));
    }
    Ok(())
}

/// A `target_modules` entry: a projection name, optionally under its parent (`mlp.down_proj`;
/// PEFT matches entries as suffixes of module paths).
fn target(entry: &str) -> Result<LoraTarget> {
    let (parent, name) = match entry.rsplit_once('.') {
        Some((p, n)) => (Some(p), n),
        None => (None, entry),
    };
    LoraTarget::from_name(name)
        .filter(|t| parent.is_none_or(|p| p == t.parent()))
        .ok_or_else(|| {
            PeftError::unsupported(
                "target_modules",
                format!(
                    "{entry:?} is not a Llama projection (q_proj, k_proj, v_proj, o_proj under \
                     self_attn; gate_proj, up_proj, down_proj under mlp)"
                ),
            )
        })
}

fn target_modules(cfg: &Fields<'_>) -> Result<Vec<LoraTarget>> {
    let mut targets = match cfg.get("target_modules") {
        None => return Err(PeftError::field_error("target_modules", "missing")),
        // PEFT reads a string as a regular expression over module paths, except the
        // `all-linear` shorthand; roe takes that, or a single projection name.
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
        Some(Value::String(s)) => vec![target(s).map_err(|_| {
            PeftError::unsupported(
                "target_modules",
                format!("{s:?}: a regular expression (list the projection names instead)"),
            )
        })?],
        Some(Value::Array(entries)) => entries
            .iter()
            .map(|v| match v.as_str() {
                Some(s) => target(s),
                None => Err(PeftError::field_error(
                    "target_modules",
                    format!("expected strings, found {v}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => {
            return Err(PeftError::field_error(
                "target_modules",
                format!("expected a list of module names, found {v}"),
            ))
        }
    };
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Err(PeftError::field_error("target_modules", "is empty"));
    }
    Ok(targets)
}

fn layers_to_transform(cfg: &Fields<'_>) -> Result<Option<Vec<usize>>> {
    let field = "layers_to_transform";
    let index = |v: &Value| {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                PeftError::field_error(field, format!("expected layer indices, found {v}"))
            })
    };
    let mut layers = match cfg.get(field) {
        None => return Ok(None),
        Some(Value::Array(a)) => a.iter().map(index).collect::<Result<Vec<_>>>()?,
        Some(v) => vec![index(v)?],
    };
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() {
        // PEFT would adapt nothing and fail; an adapter that adapts nothing is an error here too.
        return Err(PeftError::field_error(field, "is empty"));
    }
    Ok(Some(layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora_cfg(extra: &str) -> Result<LoraConfig> {
        let json = format!(
            r#"{{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]{extra}}}"#
        );
        match PeftConfig::from_json(&json)? {
            PeftConfig::Lora(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    fn field_of(e: PeftError) -> String {
        e.field()
    }

    #[test]
    fn peft_type_is_matched_as_peft_writes_it() {
        assert_eq!(PeftType::parse("LORA"), Some(PeftType::Lora));
        assert_eq!(
            PeftType::parse("PROMPT_TUNING"),
            Some(PeftType::PromptTuning)
        );
        for other in [
            "lora",
            "Lora",
            "prompt_tuning",
            "Prompt_Tuning",
            " LORA",
            "IA3",
            "",
        ] {
            assert_eq!(PeftType::parse(other), None, "{other:?}");
        }
        // Refused by name, listing what is accepted.
        let e =
            PeftConfig::from_json(r#"{"peft_type": "lora", "r": 4, "target_modules": "q_proj"}"#)
                .unwrap_err();
        assert!(matches!(e, PeftError::PeftType { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("peft_type \"lora\"")
                && text.contains("\"LORA\"")
                && text.contains("\"PROMPT_TUNING\""),
            "{text}"
        );
        assert_eq!(field_of(e), "adapter_config.peft_type");
        // A long value is quoted cut.
        let long = format!(r#"{{"peft_type": "{}"}}"#, "x".repeat(10_000));
        let text = PeftConfig::from_json(&long).unwrap_err().to_string();
        assert!(text.len() < 300, "{} bytes", text.len());
        let e = PeftConfig::from_json(r#"{"peft_type": "P_TUNING"}"#).unwrap_err();
        assert!(matches!(e, PeftError::PeftType { .. }), "{e:?}");
        let e = PeftConfig::from_json(r#"{"r": 4}"#).unwrap_err();
        assert_eq!(field_of(e), "adapter_config.peft_type");
        let e = PeftConfig::from_json("[1]").unwrap_err();
        assert_eq!(field_of(e), "adapter_config");
    }

    #[test]
    fn lora_defaults() {
        let c = lora_cfg("").unwrap();
        assert_eq!(c.lora_alpha, DEFAULT_LORA_ALPHA);
        assert_eq!(c.scale(), 2.0);
        assert_eq!(c.target_modules, [LoraTarget::QProj, LoraTarget::VProj]);
        assert_eq!(c.layers_to_transform, None);
        let c = lora_cfg(r#", "lora_alpha": 16, "use_rslora": true"#).unwrap();
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn target_module_forms() {
        let json = |t: &str| format!(r#"{{"peft_type": "LORA", "r": 2, "target_modules": {t}}}"#);
        let targets = |t: &str| match PeftConfig::from_json(&json(t)) {
            Ok(PeftConfig::Lora(c)) => Ok(c.target_modules),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(
            targets(r#"["v_proj", "self_attn.q_proj", "q_proj"]"#).unwrap(),
            [LoraTarget::QProj, LoraTarget::VProj]
        );
        assert_eq!(
            targets(r#"["mlp.down_proj"]"#).unwrap(),
            [LoraTarget::DownProj]
        );
        assert_eq!(targets(r#""all-linear""#).unwrap(), LoraTarget::ALL);
        assert_eq!(targets(r#""o_proj""#).unwrap(), [LoraTarget::OProj]);
        for bad in [
            r#"["mlp.q_proj"]"#,
            r#"["lm_head"]"#,
            r#"".*proj""#,
            "[]",
            "[1]",
            "3",
        ] {
            let e = targets(bad).unwrap_err();
            assert_eq!(field_of(e), "adapter_config.target_modules", "{bad}");
        }
    }

    #[test]
    fn unsupported_features_are_named() {
        for (extra, field) in [
            (r#", "use_dora": true"#, "use_dora"),
            (r#", "fan_in_fan_out": true"#, "fan_in_fan_out"),
            (r#", "rank_pattern": {"q_proj": 8}"#, "rank_pattern"),
            (r#", "alpha_pattern": {"q_proj": 8}"#, "alpha_pattern"),
            (r#", "modules_to_save": ["lm_head"]"#, "modules_to_save"),
            (r#", "bias": "all""#, "bias"),
            (r#", "layers_pattern": "blocks""#, "layers_pattern"),
            (r#", "use_dora": "yes""#, "use_dora"),
        ] {
            let e = lora_cfg(extra).unwrap_err();
            assert!(matches!(e, PeftError::Unsupported { .. }), "{extra}: {e:?}");
            assert_eq!(field_of(e.clone()), format!("adapter_config.{field}"));
            assert!(e.to_string().contains(field), "{e}");
        }
        // What PEFT writes for features left off is accepted.
        lora_cfg(
            r#", "use_dora": false, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
                "modules_to_save": null, "layers_pattern": null, "exclude_modules": null,
                "lora_dropout": 0.05, "loftq_config": {}, "some_future_field": 1"#,
        )
        .unwrap();
    }

    #[test]
    fn typed_fields() {
        let e = lora_cfg(r#", "lora_alpha": "8""#).unwrap_err();
        assert_eq!(field_of(e), "adapter_config.lora_alpha");
        let e = lora_cfg(r#", "use_rslora": 1"#).unwrap_err();
        assert_eq!(field_of(e), "adapter_config.use_rslora");
        let e =
            PeftConfig::from_json(r#"{"peft_type": "LORA", "r": 0, "target_modules": "q_proj"}"#)
                .unwrap_err();
        assert_eq!(field_of(e), "adapter_config.r");
        let e =
            PeftConfig::from_json(r#"{"peft_type": "LORA", "r": 257, "target_modules": "q_proj"}"#)
                .unwrap_err();
        assert!(matches!(e, PeftError::TooLarge { .. }), "{e:?}");
        assert_eq!(field_of(e), "adapter_config.r");
        let c = lora_cfg(r#", "layers_to_transform": [3, 1, 3]"#).unwrap();
        assert_eq!(c.layers_to_transform, Some(vec![1, 3]));
        let c = lora_cfg(r#", "layers_to_transform": 2"#).unwrap();
        assert_eq!(c.layers_to_transform, Some(vec![2]));
        for bad in ["[]", "[-1]", r#""all""#] {
            let e = lora_cfg(&format!(r#", "layers_to_transform": {bad}"#)).unwrap_err();
            assert_eq!(field_of(e), "adapter_config.layers_to_transform", "{bad}");
        }
    }

    #[test]
    fn prompt_tuning_fields() {
        let PeftConfig::PromptTuning(c) = PeftConfig::from_json(
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20, "token_dim": 576,
                "num_layers": 30, "num_transformer_submodules": 1,
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.num_virtual_tokens, c.token_dim, c.num_layers),
            (Some(20), Some(576), Some(30))
        );
        assert_eq!(
            c.origin.base_model_name_or_path.as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        let e = PeftConfig::from_json(
            r#"{"peft_type": "PROMPT_TUNING", "num_transformer_submodules": 2}"#,
        )
        .unwrap_err();
        assert_eq!(field_of(e), "adapter_config.num_transformer_submodules");
        let e =
            PeftConfig::from_json(r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 513}"#)
                .unwrap_err();
        assert!(matches!(e, PeftError::TooLarge { .. }), "{e:?}");
    }

    #[test]
    fn huge_configs_are_refused_before_parsing() {
        let json = format!(
            r#"{{"peft_type": "LORA", "pad": "{}"}}"#,
            "x".repeat(MAX_CONFIG_BYTES)
        );
        let e = PeftConfig::from_json(&json).unwrap_err();
        assert_eq!(field_of(e), "adapter_config");
    }
}
