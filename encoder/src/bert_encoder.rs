//! [`BertEncoder`]: tokenizer and BERT model of one folder, texts in, unit vectors out.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use roe_expert_library::embedding::Encoder;
use roe_expert_library::{LibraryError, Result};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{BertConfig, BertEncoderModel, LinearPrecision};
use crate::candle_error;

/// Which arithmetic the encoder's linear layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// bf16 where the CPU has AVX-512 BF16, else f32.
    #[default]
    Auto,
    F32,
    /// bf16 operands with f32 sums; refused on a CPU without AVX-512 BF16.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "encoder precision {other:?}: expected auto, f32 or bf16"
            )),
        }
    }
}

impl Precision {
    /// What the linear layers run in when loaded with this choice on this CPU: `"bf16"` or
    /// `"f32"` (an error where bf16 is asked for and missing).
    pub fn in_effect(self) -> Result<&'static str> {
        Ok(self.resolve()?.name())
    }

    /// The precision in effect on this CPU.
    fn resolve(self) -> Result<LinearPrecision> {
        let bf16 = crate::bf16::supported();
        match self {
            Precision::Auto if bf16 => Ok(LinearPrecision::Bf16),
            Precision::Auto | Precision::F32 => Ok(LinearPrecision::F32),
            Precision::Bf16 if bf16 => Ok(LinearPrecision::Bf16),
            Precision::Bf16 => Err(LibraryError::Encoder(
                "encoder precision bf16: this CPU lacks AVX-512 BF16 (use auto or f32)".into(),
            )),
        }
    }
}

/// Token budget of one encoder batch (rows x padded length).
const TOKENS_PER_BATCH: usize = 2048;

pub struct BertEncoder {
    id: String,
    model: BertEncoderModel,
    tokenizer: Tokenizer,
    dim: usize,
    batch_size: usize,
    device: Device,
    precision: LinearPrecision,
}

impl BertEncoder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a local directory
    /// (a sentence-transformers or Hugging Face model folder), with the precision
    /// [`Precision::Auto`] picks on this CPU.
    pub fn load(dir: impl AsRef<Path>, max_tokens: usize) -> Result<Self> {
        Self::load_with(dir, max_tokens, Precision::Auto)
    }

    /// [`BertEncoder::load`] with the linear layers' precision chosen. The encoder's id does
    /// not name the precision: the two paths' vectors agree to a cosine of 0.9999 or more
    /// (tested), so a library embedded on one CPU opens on another.
    pub fn load_with(
        dir: impl AsRef<Path>,
        max_tokens: usize,
        precision: Precision,
    ) -> Result<Self> {
        let precision = precision.resolve()?;
        let dir = dir.as_ref();
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(LibraryError::Encoder(format!(
                    "{} is missing (run scripts/fetch-models.sh or pass --models-dir)",
                    p.display()
                )))
            }
        };
        let cfg_path = file("config.json")?;
        let cfg_text =
            std::fs::read_to_string(&cfg_path).map_err(|e| LibraryError::io(&cfg_path, e))?;
        let config: BertConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| LibraryError::Encoder(format!("{}: {e}", cfg_path.display())))?;
        let dim = serde_json::from_str::<serde_json::Value>(&cfg_text)
            .ok()
            .and_then(|v| v.get("hidden_size").and_then(|h| h.as_u64()))
            .ok_or_else(|| LibraryError::Encoder("config.json lacks hidden_size".into()))?
            as usize;
        let device = Device::Cpu;
        let weights = file("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only; roe never writes model files.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device) }
            .map_err(candle_error)?;
        let model = BertEncoderModel::load(vb, &config, precision).map_err(candle_error)?;
        let mut tokenizer = Tokenizer::from_file(file("tokenizer.json")?)
            .map_err(|e| LibraryError::Encoder(format!("tokenizer.json: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| LibraryError::Encoder(format!("truncation: {e}")))?;
        // Padding is done per batch in `embed`, after grouping texts of similar length.
        tokenizer.with_padding(None);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "encoder".into());
        Ok(Self {
            id: format!("{name}/mean/l2/{max_tokens}"),
            model,
            tokenizer,
            dim,
            batch_size: 32,
            device,
            precision,
        })
    }

    /// What the linear layers run in: `"bf16"` (AVX-512 BF16) or `"f32"`.
    pub fn precision(&self) -> &'static str {
        self.precision.name()
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Embeds token sequences padded to the longest of them.
    fn embed_batch(&self, enc: &[&tokenizers::Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = enc.len();
        let len = enc
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = Vec::with_capacity(n * len);
        let mut types = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in enc {
            let pad = len - e.get_ids().len();
            ids.extend(
                e.get_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            types.extend(
                e.get_type_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(
                e.get_attention_mask()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, &mask)?; // (n, len, dim)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, dim)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

impl Encoder for BertEncoder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| LibraryError::Encoder(format!("tokenize: {e}")))?;
        // Group texts of similar token length (so little compute goes to padding) and cap the
        // tokens of a batch as well as its rows: attention memory grows with rows x length^2,
        // and long batches spend their time allocating it. The caller's order is restored.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(enc[i].get_ids().len()));
        let mut out = vec![Vec::new(); texts.len()];
        let mut start = 0;
        while start < order.len() {
            let longest = enc[order[start]].get_ids().len().max(1);
            let rows = (TOKENS_PER_BATCH / longest).clamp(1, self.batch_size);
            let chunk = &order[start..(start + rows).min(order.len())];
            let batch: Vec<&tokenizers::Encoding> = chunk.iter().map(|&i| &enc[i]).collect();
            for (&i, v) in chunk
                .iter()
                .zip(self.embed_batch(&batch).map_err(candle_error)?)
            {
                out[i] = v;
            }
            start += chunk.len();
        }
        Ok(out)
    }
}
