//! Hyper-parameters read from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{BackboneError, Result};

/// Llama hyper-parameters of the backbone (from the `llama.*` GGUF metadata keys).
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: u32,
    pub pad_token_id: Option<u32>,
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| BackboneError::Gguf(format!("missing metadata key {key}")))
}

fn md_usize(ct: &Content, key: &str) -> Result<usize> {
    let v = md(ct, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => {
            return Err(BackboneError::Gguf(format!(
                "metadata key {key}: expected an unsigned integer, found {other:?}"
            )))
        }
    };
    Ok(n as usize)
}

fn md_f64(ct: &Content, key: &str) -> Result<f64> {
    match md(ct, key)? {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        other => Err(BackboneError::Gguf(format!(
            "metadata key {key}: expected a float, found {other:?}"
        ))),
    }
}

impl BackboneConfig {
    /// The hyper-parameters of a GGUF file, from its header only (no weights are read): what
    /// a process that registers experts without running the model needs to check them.
    pub fn read(gguf_path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = gguf_path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| BackboneError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let ct = Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| BackboneError::Gguf(format!("{}: {e}", path.display())))?;
        Self::from_gguf(&ct)
    }

    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let architecture = md(ct, "general.architecture")?
            .to_string()
            .map_err(|e| BackboneError::Gguf(e.to_string()))?
            .clone();
        if architecture != "llama" {
            return Err(BackboneError::Gguf(format!(
                "unsupported architecture {architecture:?} (expected llama)"
            )));
        }
        let hidden_size = md_usize(ct, "llama.embedding_length")?;
        let num_layers = md_usize(ct, "llama.block_count")?;
        let num_heads = md_usize(ct, "llama.attention.head_count")?;
        let num_kv_heads = md_usize(ct, "llama.attention.head_count_kv").unwrap_or(num_heads);
        let intermediate_size = md_usize(ct, "llama.feed_forward_length")?;
        let rope_theta = md_f64(ct, "llama.rope.freq_base").unwrap_or(10000.0) as f32;
        let rms_norm_eps = md_f64(ct, "llama.attention.layer_norm_rms_epsilon")?;
        let context_length = md_usize(ct, "llama.context_length").unwrap_or(2048);
        if num_heads == 0 || num_kv_heads == 0 || hidden_size % num_heads != 0 {
            return Err(BackboneError::Gguf(format!(
                "inconsistent head counts: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads}"
            )));
        }
        if num_heads % num_kv_heads != 0 {
            return Err(BackboneError::Gguf(format!(
                "head_count {num_heads} is not a multiple of head_count_kv {num_kv_heads}"
            )));
        }
        let head_dim = hidden_size / num_heads;
        if let Ok(rope_dim) = md_usize(ct, "llama.rope.dimension_count") {
            if rope_dim != head_dim {
                return Err(BackboneError::Gguf(format!(
                    "partial rotary embeddings are not supported (rope dim {rope_dim}, head dim {head_dim})"
                )));
            }
        }
        let vocab_size = match md_usize(ct, "llama.vocab_size") {
            Ok(v) => v,
            Err(_) => md(ct, "tokenizer.ggml.tokens")?
                .to_vec()
                .map_err(|e| BackboneError::Gguf(e.to_string()))?
                .len(),
        };
        let eos_token_id = md_usize(ct, "tokenizer.ggml.eos_token_id")? as u32;
        let bos_token_id = md_usize(ct, "tokenizer.ggml.bos_token_id")
            .ok()
            .map(|x| x as u32);
        let pad_token_id = md_usize(ct, "tokenizer.ggml.padding_token_id")
            .ok()
            .map(|x| x as u32);
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps,
            context_length,
            bos_token_id,
            eos_token_id,
            pad_token_id,
        })
    }

    /// Output width of k_proj / v_proj.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The shape adapters must have to run on this model (what roe-peft validates against).
    pub fn model_shape(&self) -> roe_peft::ModelShape {
        roe_peft::ModelShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
        }
    }
}
