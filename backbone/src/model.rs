//! The Llama backbone over candle's quantized GGUF kernels, with a batched KV cache, per-row
//! soft prompts and per-row unmerged LoRA.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{
    ggml_file::qtensor_from_ggml, gguf_file, GgmlDType, QMatMul, QTensor,
};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::BackboneConfig;
use crate::error::{BackboneError, Result};
use crate::experts::{Lora, LoraTarget, ModelShape, SoftPrompt};
use crate::tokenizer::TextTokenizer;

mod decode;
pub(crate) use decode::MAX_STEP_ROWS;
mod grad;
mod grad_ops;
mod lora;

pub use grad::{AnswerLoss, AnswerRow, TrainAdapter, TrainLora};
pub use lora::LoraBatch;

/// Additive mask value for masked attention slots (finite so that a fully masked padded row
/// never produces NaN).
const MASK_VALUE: f32 = -1e30;

/// How the backbone runs its linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackboneOptions {
    /// Dequantize every weight to f32 once, at load, and use f32 GEMM (≈4x the memory of the
    /// GGUF blocks). When false (the default) the weights stay in their GGUF blocks and run
    /// with `kernel`.
    pub dequantize: bool,
    /// Kernel for the quantized weights (when `dequantize` is false).
    pub kernel: QuantKernel,
}

/// Matmul kernel over quantized (GGUF block) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantKernel {
    /// Expand the weight blocks to f32 into a scratch matrix at every call and run f32 GEMM:
    /// results identical to `dequantize: true`, memory of the quantized model.
    #[default]
    DequantizeOnTheFly,
    /// candle's ggml kernels (activations rounded to 8 bits per block of 32). candle has no
    /// SIMD kernel for Q4_1, which makes this mode slow on x86. Decode steps (one position)
    /// use [`crate::kernels`] in every mode.
    Ggml,
}

/// Positions one prompt forward pass holds over all its rows unless set otherwise
/// ([`Backbone::with_max_batch_prefill_tokens`]; `roe serve --max-batch-prefill-tokens`): a
/// longer prompt runs in chunks of this many positions, so the attention scores of a pass,
/// [rows, heads, chunk, context], stay bounded (one 8,192-token prompt in one pass would hold
/// 2.4 GB of them). Short prompts share passes up to the same budget.
pub const DEFAULT_MAX_BATCH_PREFILL_TOKENS: usize = 2048;

/// Attention scores of one pass (rows x heads x chunk x context) past which they are made
/// one KV head at a time: 64 Mi f32 elements, 256 MB.
const ATTENTION_GROUP_ELEMENTS: usize = 64 << 20;

/// Fewest positions per row of one prefill chunk: below it a pass costs more in fixed
/// per-pass work (every weight expanded, the workers synchronised per op) than it saves.
pub const MIN_PREFILL_CHUNK: usize = 16;

/// Up to this many activation rows, Q4_1 and Q8_0 weights run through the block kernels
/// ([`crate::kernels`]) instead of being expanded to f32.
const SMALL_BATCH_ROWS: usize = 4;

/// A linear layer `x W^T`.
#[derive(Debug, Clone)]
enum Linear {
    /// candle's QMatMul (f32 tensor or ggml quantized kernel).
    Mm(QMatMul),
    /// Quantized weight expanded to f32 at every call.
    OnTheFly(std::sync::Arc<QTensor>),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Mm(m) => m.forward(x),
            Linear::OnTheFly(q) => {
                if matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) {
                    let rows = x.elem_count() / x.dim(D::Minus1)?;
                    let y = if rows <= SMALL_BATCH_ROWS {
                        decode::linear_rows(self, &x.flatten_all()?.to_vec1::<f32>()?, rows)
                    } else {
                        decode::linear_rows_expanded(q, &x.contiguous()?, rows)
                    }
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let mut dims = x.dims().to_vec();
                    if let Some(last) = dims.last_mut() {
                        *last = q.shape().dims2()?.0;
                    }
                    return Tensor::from_vec(y, dims, &Device::Cpu);
                }
                let w = q.dequantize(&Device::Cpu)?;
                match *x.dims() {
                    [b, t, k] => x.reshape((b * t, k))?.matmul(&w.t()?)?.reshape((b, t, ())),
                    _ => x.matmul(&w.t()?),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    /// Fused [q; k; v] projection: [q_dim + 2 kv_dim, hidden].
    qkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Fused [gate; up] projection: [2 ffn, hidden].
    gate_up: Linear,
    down: Linear,
}

/// The frozen backbone. Immutable after loading: share it across threads behind an `Arc`;
/// all per-request state lives in a [`KvCache`].
#[derive(Debug)]
pub struct Backbone {
    config: BackboneConfig,
    options: BackboneOptions,
    device: Device,
    /// [vocab, hidden] f32.
    tok_embeddings: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: QMatMul,
    /// The tied output matrix in its GGUF blocks when they are Q8_0: for a few rows (decode)
    /// reading 1 byte per weight beats the f32 copy's 4, with the same values.
    lm_head_blocks: Option<std::sync::Arc<QTensor>>,
    /// [max_pos, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
    tokenizer: TextTokenizer,
    /// From the GGUF metadata (None when the file has none).
    chat_template: Option<crate::chat::ChatTemplate>,
    /// Positions of one prompt forward pass, over all its rows.
    max_batch_prefill_tokens: usize,
}

/// The chat template of the GGUF metadata, compiled, with the special tokens it may name.
fn chat_template(
    ct: &gguf_file::Content,
    config: &BackboneConfig,
    tokenizer: &TextTokenizer,
) -> Result<Option<crate::chat::ChatTemplate>> {
    let Some(source) = ct.metadata.get(crate::chat::CHAT_TEMPLATE_KEY) else {
        return Ok(None);
    };
    let source = source.to_string().map_err(gguf_err)?;
    let token = |id: Option<u32>| {
        id.and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    crate::chat::ChatTemplate::new(
        source,
        &token(config.bos_token_id),
        &token(Some(config.eos_token_id)),
    )
    .map(Some)
}

fn gguf_err(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Gguf(e.to_string())
}

/// Concatenates 2-D quantized tensors along their rows (same dtype, same columns).
fn concat_rows(parts: &[QTensor], device: &Device) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let (_, cols) = parts[0].shape().dims2()?;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if c != cols || p.dtype() != dtype {
            return Err(BackboneError::Gguf(
                "cannot fuse tensors of different layouts".into(),
            ));
        }
        rows += r;
        bytes.extend_from_slice(&p.data()?);
    }
    Ok(qtensor_from_ggml(dtype, &bytes, vec![rows, cols], device)?)
}

fn fused_linear(parts: Vec<QTensor>, opts: BackboneOptions, device: &Device) -> Result<Linear> {
    let same = parts.iter().all(|p| p.dtype() == parts[0].dtype());
    if opts.dequantize || !same {
        let ts = parts
            .iter()
            .map(|p| p.dequantize(device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(Linear::Mm(QMatMul::Tensor(Tensor::cat(&ts, 0)?)));
    }
    let fused = if parts.len() == 1 {
        parts
            .into_iter()
            .next()
            .ok_or_else(|| gguf_err("empty fusion"))?
    } else {
        concat_rows(&parts, device)?
    };
    linear(fused, opts, device)
}

fn linear(t: QTensor, opts: BackboneOptions, device: &Device) -> Result<Linear> {
    if opts.dequantize || matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return Ok(Linear::Mm(QMatMul::Tensor(t.dequantize(device)?)));
    }
    Ok(match opts.kernel {
        QuantKernel::Ggml => Linear::Mm(QMatMul::from_qtensor(t)?),
        QuantKernel::DequantizeOnTheFly => Linear::OnTheFly(std::sync::Arc::new(t)),
    })
}

fn plain_matmul(t: QTensor, dequantize: bool, device: &Device) -> Result<QMatMul> {
    if dequantize || matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        Ok(QMatMul::Tensor(t.dequantize(device)?))
    } else {
        Ok(QMatMul::from_qtensor(t)?)
    }
}

/// Rotary tables [max_pos, head_dim / 2] (interleaved convention, as GGUF stores q/k
/// permuted).
fn rotary_tables(config: &BackboneConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let max_pos = config.context_length.max(1);
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            1f32 / config
                .rope_theta
                .powf((2 * i) as f32 / config.head_dim as f32)
        })
        .collect();
    for pos in 0..max_pos {
        for f in &inv {
            let a = pos as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_pos, half), device)?,
        Tensor::from_vec(sin, (max_pos, half), device)?,
    ))
}

impl Backbone {
    /// Load the backbone from a GGUF file, with its tokenizer from the GGUF metadata or from a
    /// `tokenizer.json`. Quantized kernels (see [`BackboneOptions`]).
    pub fn load(gguf_path: impl AsRef<Path>, tokenizer_json: Option<&Path>) -> Result<Self> {
        Self::load_with(gguf_path, tokenizer_json, BackboneOptions::default())
    }

    pub fn load_with(
        gguf_path: impl AsRef<Path>,
        tokenizer_json: Option<&Path>,
        options: BackboneOptions,
    ) -> Result<Self> {
        let start = Instant::now();
        let path = gguf_path.as_ref();
        let file = File::open(path).map_err(|source| BackboneError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let ct = gguf_file::Content::read(&mut reader)
            .map_err(|e| BackboneError::Gguf(format!("{}: {e}", path.display())))?;
        let config = BackboneConfig::from_gguf(&ct)?;
        let tokenizer = match tokenizer_json {
            Some(p) => TextTokenizer::from_file(p)?,
            None => TextTokenizer::from_gguf(&ct)?,
        };
        let chat_template = chat_template(&ct, &config, &tokenizer)?;
        let device = Device::Cpu;
        let mut get = |name: &str| -> Result<QTensor> {
            ct.tensor(&mut reader, name, &device)
                .map_err(|e| BackboneError::Gguf(format!("tensor {name}: {e}")))
        };
        let dq = options.dequantize;

        let tok_q = get("token_embd.weight")?;
        let (vocab, hidden) = tok_q.shape().dims2()?;
        if hidden != config.hidden_size {
            return Err(gguf_err(format!(
                "token_embd.weight is [{vocab}, {hidden}], expected hidden {}",
                config.hidden_size
            )));
        }
        let tok_embeddings = tok_q.dequantize(&device)?;
        let mut lm_head_blocks = None;
        let final_norm = get("output_norm.weight")?.dequantize(&device)?;
        let lm_head = match get("output.weight") {
            Ok(t) => plain_matmul(t, dq, &device)?,
            Err(_) => {
                // Tied embeddings.
                if dq {
                    QMatMul::Tensor(tok_embeddings.clone())
                } else {
                    if tok_q.dtype() == GgmlDType::Q8_0 {
                        lm_head_blocks = Some(std::sync::Arc::new(tok_q));
                    }
                    QMatMul::Tensor(tok_embeddings.clone())
                }
            }
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            let q = get(&format!("{p}.attn_q.weight"))?;
            let k = get(&format!("{p}.attn_k.weight"))?;
            let v = get(&format!("{p}.attn_v.weight"))?;
            let expect = [
                (&q, config.num_heads * config.head_dim),
                (&k, config.kv_dim()),
                (&v, config.kv_dim()),
            ];
            for (t, rows) in expect {
                if t.shape().dims2()? != (rows, hidden) {
                    return Err(gguf_err(format!(
                        "layer {i}: attention weight of shape {:?}, expected [{rows}, {hidden}]",
                        t.shape()
                    )));
                }
            }
            let gate = get(&format!("{p}.ffn_gate.weight"))?;
            let up = get(&format!("{p}.ffn_up.weight"))?;
            layers.push(Layer {
                attn_norm: get(&format!("{p}.attn_norm.weight"))?.dequantize(&device)?,
                qkv: fused_linear(vec![q, k, v], options, &device)?,
                wo: linear(get(&format!("{p}.attn_output.weight"))?, options, &device)?,
                ffn_norm: get(&format!("{p}.ffn_norm.weight"))?.dequantize(&device)?,
                gate_up: fused_linear(vec![gate, up], options, &device)?,
                down: linear(get(&format!("{p}.ffn_down.weight"))?, options, &device)?,
            });
        }

        let (cos, sin) = rotary_tables(&config, &device)?;
        tracing::info!(
            path = %path.display(),
            layers = config.num_layers,
            hidden = config.hidden_size,
            vocab = vocab,
            dequantize = dq,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "backbone loaded"
        );
        Ok(Self {
            config,
            options,
            device,
            tok_embeddings,
            layers,
            final_norm,
            lm_head,
            lm_head_blocks,
            cos,
            sin,
            tokenizer,
            chat_template,
            max_batch_prefill_tokens: DEFAULT_MAX_BATCH_PREFILL_TOKENS,
        })
    }

    /// A backbone of the given hyper-parameters with random f32 weights (seeded), for tests
    /// that need a model small enough to differentiate numerically or to train in seconds.
    /// `config.vocab_size` must cover the tokenizer's ids.
    pub fn random(config: BackboneConfig, tokenizer: TextTokenizer, seed: u64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = Device::Cpu;
        let mut matrix = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
            let bound = scale / (cols as f32).sqrt();
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            Ok(Tensor::from_vec(v, (rows, cols), &device)?)
        };
        let h = config.hidden_size;
        let f = config.intermediate_size;
        let qd = config.num_heads * config.head_dim;
        let kvd = config.kv_dim();
        let tok_embeddings = matrix(config.vocab_size, h, (h as f32).sqrt())?;
        let mut layers = Vec::with_capacity(config.num_layers);
        let lin = |t: Tensor| Linear::Mm(QMatMul::Tensor(t));
        for _ in 0..config.num_layers {
            layers.push(Layer {
                attn_norm: (matrix(1, h, 0.2)?.squeeze(0)? + 1.0)?,
                qkv: lin(matrix(qd + 2 * kvd, h, 1.5)?),
                wo: lin(matrix(h, qd, 1.0)?),
                ffn_norm: (matrix(1, h, 0.2)?.squeeze(0)? + 1.0)?,
                gate_up: lin(matrix(2 * f, h, 1.5)?),
                down: lin(matrix(h, f, 1.0)?),
            });
        }
        let final_norm = (matrix(1, h, 0.2)?.squeeze(0)? + 1.0)?;
        let (cos, sin) = rotary_tables(&config, &device)?;
        Ok(Self {
            lm_head: QMatMul::Tensor(tok_embeddings.clone()),
            config,
            options: BackboneOptions {
                dequantize: true,
                kernel: QuantKernel::default(),
            },
            device,
            tok_embeddings,
            layers,
            final_norm,
            lm_head_blocks: None,
            cos,
            sin,
            tokenizer,
            chat_template: None,
            max_batch_prefill_tokens: DEFAULT_MAX_BATCH_PREFILL_TOKENS,
        })
    }

    /// The backbone with prompts run in passes of at most `tokens` positions over all rows
    /// (at least [`MIN_PREFILL_CHUNK`] per row): bounds the memory of a long prompt's prefill.
    pub fn with_max_batch_prefill_tokens(mut self, tokens: usize) -> Self {
        self.max_batch_prefill_tokens = tokens.max(MIN_PREFILL_CHUNK);
        self
    }

    /// Positions one prompt forward pass holds over all its rows.
    pub fn max_batch_prefill_tokens(&self) -> usize {
        self.max_batch_prefill_tokens
    }

    /// Positions the backbone reads: its context length from the GGUF metadata
    /// (`llama.context_length`, 8,192 for SmolLM2), soft-prompt tokens and generated tokens
    /// included.
    pub fn context_length(&self) -> usize {
        self.config.context_length.max(1)
    }

    /// The chat template of the GGUF file, if it has one.
    pub fn chat_template(&self) -> Option<&crate::chat::ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// `messages` rendered with the backbone's chat template, the assistant's turn opened:
    /// the text of a [`Backbone::raw_prompt`]. INVALID_ARGUMENT without a template.
    pub fn render_chat(&self, messages: &[crate::chat::ChatMessage]) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.render(messages),
            None => Err(BackboneError::InvalidInput(format!(
                "messages: this backbone has no chat template ({} in its GGUF metadata)",
                crate::chat::CHAT_TEMPLATE_KEY
            ))),
        }
    }

    /// Prompt ids of `text` as it is, special tokens included (a plain continuation or a
    /// rendered chat), all of them: what does not fit the context is the caller's to refuse or
    /// cut ([`keep_last`]).
    pub fn raw_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    pub fn config(&self) -> &BackboneConfig {
        &self.config
    }
    pub fn options(&self) -> BackboneOptions {
        self.options
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }
    /// The shape an expert must have to run on this backbone, from the loaded GGUF.
    pub fn model_shape(&self) -> ModelShape {
        self.config.model_shape()
    }
    pub fn eos_token_id(&self) -> u32 {
        self.config.eos_token_id
    }
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    /// Check that an expert fits this backbone (shapes).
    pub fn check_lora(&self, lora: &Lora) -> Result<()> {
        if lora.num_layers() != self.config.num_layers {
            return Err(crate::error::ExpertError::Invalid(format!(
                "LoRA built for {} layers, backbone has {}",
                lora.num_layers(),
                self.config.num_layers
            ))
            .into());
        }
        for l in 0..self.config.num_layers {
            for t in LoraTarget::ALL {
                if let Some(p) = lora.pair(l, t) {
                    let (fin, fout) = t.dims(&self.model_shape());
                    if p.fin != fin
                        || p.fout != fout
                        || p.a.len() != p.rank * fin
                        || p.b_t.len() != p.rank * fout
                    {
                        return Err(crate::error::ExpertError::Invalid(format!(
                            "LoRA layer {l} {} does not match the backbone",
                            t.name()
                        ))
                        .into());
                    }
                }
            }
        }
        Ok(())
    }

    pub fn check_soft_prompt(&self, p: &SoftPrompt) -> Result<()> {
        if p.embeddings().dims() != [p.num_virtual_tokens(), self.config.hidden_size] {
            return Err(crate::error::ExpertError::Invalid(format!(
                "soft prompt of shape {:?} does not match hidden size {}",
                p.embeddings().dims(),
                self.config.hidden_size
            ))
            .into());
        }
        Ok(())
    }

    /// Token embeddings [n, hidden] of `ids`.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(BackboneError::InvalidInput(format!(
                "token id {bad} out of vocabulary"
            )));
        }
        let t = Tensor::new(ids, &self.device)?;
        Ok(self.tok_embeddings.index_select(&t, 0)?)
    }

    /// Embeddings of a batch of rows, each `[soft prompt?] + ids`, right-padded with zeros to
    /// the longest row. Returns ([b, t, hidden], valid length of each row).
    pub fn embed_rows(
        &self,
        rows: &[(Option<&SoftPrompt>, &[u32])],
    ) -> Result<(Tensor, Vec<usize>)> {
        if rows.is_empty() {
            return Err(BackboneError::InvalidInput("empty batch".into()));
        }
        let h = self.config.hidden_size;
        let lens: Vec<usize> = rows
            .iter()
            .map(|(p, ids)| p.map(|p| p.num_virtual_tokens()).unwrap_or(0) + ids.len())
            .collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        if t == 0 {
            return Err(BackboneError::InvalidInput("every row is empty".into()));
        }
        let mut parts = Vec::with_capacity(rows.len());
        for ((p, ids), &len) in rows.iter().zip(&lens) {
            let mut row: Vec<Tensor> = Vec::with_capacity(3);
            if let Some(p) = p {
                self.check_soft_prompt(p)?;
                row.push(p.embeddings().clone());
            }
            if !ids.is_empty() {
                row.push(self.embed_ids(ids)?);
            }
            if len < t {
                row.push(Tensor::zeros((t - len, h), DType::F32, &self.device)?);
            }
            parts.push(if row.len() == 1 {
                row.pop()
                    .ok_or_else(|| BackboneError::InvalidInput("empty row".into()))?
            } else {
                Tensor::cat(&row, 0)?
            });
        }
        Ok((Tensor::stack(&parts, 0)?, lens))
    }

    /// Run the transformer over a chunk of new positions.
    ///
    /// `embeds` is [b, t, hidden]; row i holds `lens[i]` real positions followed by padding.
    /// The chunk is appended to `cache` (which must hold b rows, or be empty). `loras` must
    /// have been built for the same b rows (or be [`LoraBatch::none`]). Returns the final
    /// normalised hidden states [b, t, hidden]; feed selected rows to [`Backbone::logits`].
    pub fn forward(
        &self,
        embeds: &Tensor,
        lens: &[usize],
        cache: &mut KvCache,
        loras: &LoraBatch,
    ) -> Result<Tensor> {
        self.forward_while(embeds, lens, cache, loras, &|| true)?
            .ok_or_else(|| BackboneError::InvalidInput("a forward pass was withdrawn".into()))
    }

    /// [`Self::forward`] that asks `wanted()` before each layer and stops with `None` once
    /// it says no. One long prompt is a single pass of seconds; a layer is a thirtieth of
    /// it, so a withdrawn request stops within a fraction of a second. After `None` the
    /// cache holds a half-written chunk and must be dropped.
    pub fn forward_while(
        &self,
        embeds: &Tensor,
        lens: &[usize],
        cache: &mut KvCache,
        loras: &LoraBatch,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        let (b, t, h) = embeds.dims3()?;
        if h != self.config.hidden_size {
            return Err(BackboneError::InvalidInput(format!(
                "embeddings of width {h}, expected {}",
                self.config.hidden_size
            )));
        }
        if lens.len() != b {
            return Err(BackboneError::InvalidInput(format!(
                "{} lengths for a batch of {b}",
                lens.len()
            )));
        }
        if let Some(&l) = lens.iter().find(|&&l| l > t) {
            return Err(BackboneError::InvalidInput(format!(
                "row length {l} > chunk length {t}"
            )));
        }
        if t == 0 {
            return Err(BackboneError::InvalidInput("empty chunk".into()));
        }
        cache.prepare(b, &self.config)?;
        if !loras.is_none() && loras.batch() != b {
            return Err(BackboneError::InvalidInput(format!(
                "LoRA batch built for {} rows, forward has {b}",
                loras.batch()
            )));
        }
        let max_pos = self.cos.dim(0)?;
        for (i, &l) in lens.iter().enumerate() {
            if cache.next_pos[i] + l > max_pos {
                return Err(BackboneError::InvalidInput(format!(
                    "sequence of {} positions exceeds the context length {max_pos}",
                    cache.next_pos[i] + l
                )));
            }
        }
        if t == 1 && b <= decode::MAX_STEP_ROWS && self.device.is_cpu() {
            return self.forward_step(embeds, lens, cache, loras).map(Some);
        }
        // Rotary tables for each (row, position).
        let mut pos = Vec::with_capacity(b * t);
        for (i, &l) in lens.iter().enumerate() {
            let base = cache.next_pos[i];
            for j in 0..t {
                let p = if j < l {
                    base + j
                } else {
                    base + l.saturating_sub(1)
                };
                pos.push(p.min(max_pos - 1) as u32);
            }
        }
        let pos = Tensor::from_vec(pos, b * t, &self.device)?;
        let half = self.config.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;

        let old_len = cache.len;
        let kv_len = old_len + t;
        let mask = cache.build_mask(lens, t)?;
        cache.reserve(t)?;

        let eps = self.config.rms_norm_eps as f32;
        let mut x = embeds.contiguous()?;
        for (li, layer) in self.layers.iter().enumerate() {
            if !wanted() {
                return Ok(None);
            }
            let residual = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let attn = self.attention(
                li,
                layer,
                &xn,
                &cos,
                &sin,
                mask.as_ref(),
                cache,
                loras,
                old_len,
                kv_len,
            )?;
            x = (attn + residual)?;
            let residual = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let y = self.mlp(li, layer, &xn, loras)?;
            x = (y + residual)?;
        }
        cache.commit(lens, t);
        Ok(Some(candle_nn::ops::rms_norm(&x, &self.final_norm, eps)?))
    }

    /// Runs prompt rows (`embeds` [b, t, hidden], row i `lens[i]` ≥ 1 real positions) into
    /// `cache` in passes of at most [`Self::max_batch_prefill_tokens`] positions over all rows,
    /// and returns the final hidden state at each row's last real position, [b, hidden]. The
    /// cache is sized for the whole prompt (plus its reserved room) before the first pass, so
    /// no pass copies it. `wanted()` is asked before every layer of every pass; `None` once it
    /// says no (the cache must then be dropped).
    pub fn prefill_while(
        &self,
        embeds: &Tensor,
        lens: &[usize],
        cache: &mut KvCache,
        loras: &LoraBatch,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        let (b, t, _) = embeds.dims3()?;
        if lens.len() != b || lens.iter().any(|&l| l == 0 || l > t) {
            return Err(BackboneError::InvalidInput(format!(
                "prompt rows of lengths {lens:?} for a batch [{b}, {t}]"
            )));
        }
        let per_row = (self.max_batch_prefill_tokens / b).max(MIN_PREFILL_CHUNK);
        // Passes of equal size: no short last pass paying a whole pass's fixed cost.
        let passes = t.div_ceil(per_row);
        let size = t.div_ceil(passes);
        if passes > 1 {
            cache.prepare(b, &self.config)?;
            cache.reserve(t)?;
        }
        let mut last: Vec<Option<Tensor>> = vec![None; b];
        let mut start = 0;
        while start < t {
            let n = size.min(t - start);
            let part_lens: Vec<usize> = lens
                .iter()
                .map(|&l| l.saturating_sub(start).min(n))
                .collect();
            let part = if passes == 1 {
                embeds.clone()
            } else {
                embeds.narrow(1, start, n)?
            };
            let Some(hidden) = self.forward_while(&part, &part_lens, cache, loras, wanted)? else {
                return Ok(None);
            };
            for (i, &l) in lens.iter().enumerate() {
                if (start..start + n).contains(&(l - 1)) {
                    last[i] = Some(hidden.get(i)?.get(l - 1 - start)?);
                }
            }
            start += n;
        }
        let last = last
            .into_iter()
            .map(|h| {
                h.ok_or_else(|| BackboneError::InvalidInput("a row without a last position".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::stack(&last, 0)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        loras: &LoraBatch,
        old_len: usize,
        kv_len: usize,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let hd = cfg.head_dim;
        let nh = cfg.num_heads;
        let nkv = cfg.num_kv_heads;
        let qd = nh * hd;
        let kvd = nkv * hd;
        let qkv = layer.qkv.forward(x)?;
        let mut q = qkv.narrow(2, 0, qd)?;
        let mut k = qkv.narrow(2, qd, kvd)?;
        let mut v = qkv.narrow(2, qd + kvd, kvd)?;
        if let Some(d) = loras.delta(li, LoraTarget::QProj, x)? {
            q = (q + d)?;
        }
        if let Some(d) = loras.delta(li, LoraTarget::KProj, x)? {
            k = (k + d)?;
        }
        if let Some(d) = loras.delta(li, LoraTarget::VProj, x)? {
            v = (v + d)?;
        }
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        let q = (q * (1.0 / (hd as f64).sqrt()))?;

        let (k_all, v_all) = cache.write(li, &k, &v, old_len, kv_len)?;
        let g = nh / nkv;
        // Group the query heads that share a KV head: [b, nkv, g * t, hd].
        let q = q.reshape((b, nkv, g * t, hd))?;
        let scores = |q: &Tensor, k: &Tensor, v: &Tensor, heads: usize| -> Result<Tensor> {
            let att = q.matmul(&k.t()?)?; // [b, heads, g*t, kv_len]
            let att = match mask {
                Some(m) => att
                    .reshape((b, heads, g, t, kv_len))?
                    .broadcast_add(m)?
                    .reshape((b, heads, g * t, kv_len))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            Ok(att.matmul(v)?) // [b, heads, g*t, hd]
        };
        // A long prompt's scores are [b, nkv, g*t, kv_len] f32 three times over (product,
        // masked, softmax): past ATTENTION_GROUP_ELEMENTS they are made one KV head at a
        // time, so a pass holds a third of them (SmolLM2 has 3 KV heads).
        let y = if b * nh * t * kv_len > ATTENTION_GROUP_ELEMENTS && nkv > 1 {
            let parts = (0..nkv)
                .map(|h| {
                    scores(
                        &q.narrow(1, h, 1)?.contiguous()?,
                        &k_all.narrow(1, h, 1)?,
                        &v_all.narrow(1, h, 1)?,
                        1,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 1)?
        } else {
            scores(&q, &k_all, &v_all, nkv)?
        };
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, qd))?;
        let mut out = layer.wo.forward(&y)?;
        if let Some(d) = loras.delta(li, LoraTarget::OProj, &y)? {
            out = (out + d)?;
        }
        Ok(out)
    }

    fn mlp(&self, li: usize, layer: &Layer, x: &Tensor, loras: &LoraBatch) -> Result<Tensor> {
        let f = self.config.intermediate_size;
        let gu = layer.gate_up.forward(x)?;
        let mut gate = gu.narrow(2, 0, f)?;
        let mut up = gu.narrow(2, f, f)?;
        if let Some(d) = loras.delta(li, LoraTarget::GateProj, x)? {
            gate = (gate + d)?;
        }
        if let Some(d) = loras.delta(li, LoraTarget::UpProj, x)? {
            up = (up + d)?;
        }
        let hmid = (gate.silu()? * up)?;
        let mut out = layer.down.forward(&hmid)?;
        if let Some(d) = loras.delta(li, LoraTarget::DownProj, &hmid)? {
            out = (out + d)?;
        }
        Ok(out)
    }

    /// Logits [n, vocab] of normalised hidden states [n, hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (n, h) = hidden.dims2()?;
        if let Some(q) = &self.lm_head_blocks {
            if n <= decode::MAX_STEP_ROWS {
                let x = hidden.flatten_all()?.to_vec1::<f32>()?;
                let y = decode::linear_rows(&Linear::OnTheFly(q.clone()), &x, n)?;
                let vocab = y.len() / n.max(1);
                debug_assert_eq!(x.len(), n * h);
                return Ok(Tensor::from_vec(y, (n, vocab), &self.device)?);
            }
        }
        Ok(self.lm_head.forward(&hidden.contiguous()?)?)
    }

    /// Hidden states at the given (row, position) pairs of a [b, t, hidden] tensor: [n, hidden].
    pub fn gather_positions(&self, hidden: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let mut idx = Vec::with_capacity(at.len());
        for &(r, p) in at {
            if r >= b || p >= t {
                return Err(BackboneError::InvalidInput(format!(
                    "position ({r}, {p}) outside [{b}, {t}]"
                )));
            }
            idx.push((r * t + p) as u32);
        }
        let idx = Tensor::from_vec(idx, at.len(), &self.device)?;
        Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
    }

    /// Log-probabilities [n, vocab] of the next token after hidden states [n, hidden].
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.logits(hidden)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Log-probabilities [n, vocab] of the next token after each of the given (row, position)
    /// pairs of a forward's hidden states.
    pub fn log_probs_at(&self, hidden: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
        let hs = self.gather_positions(hidden, at)?;
        let logits = self.logits(&hs)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }
}

/// `ids` with only their last `keep` left (all of them when `keep` is None or not below their
/// number); returns how many were cut.
pub fn keep_last(ids: &mut Vec<u32>, keep: Option<usize>) -> usize {
    match keep {
        Some(k) if ids.len() > k => {
            let cut = ids.len() - k;
            ids.drain(..cut);
            cut
        }
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// KV cache
// ---------------------------------------------------------------------------------------------

/// Per-request (or per-batch) attention state: keys/values of every layer for b rows, which
/// slots hold real tokens, and each row's next rotary position.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer [b, n_kv, cap, head_dim].
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    cap: usize,
    len: usize,
    batch: usize,
    /// valid[row][slot].
    valid: Vec<Vec<bool>>,
    next_pos: Vec<usize>,
    extra_capacity: usize,
    dims: Option<(usize, usize, usize)>, // (layers, n_kv, head_dim)
}

impl KvCache {
    /// An empty cache; its batch size is fixed by the first forward.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache that reserves room for `capacity` positions at the first forward.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            extra_capacity: capacity,
            ..Self::default()
        }
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }
    /// Number of slots used (including padding slots).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Next rotary position of each row (= the number of real tokens seen).
    pub fn positions(&self) -> &[usize] {
        &self.next_pos
    }

    fn prepare(&mut self, b: usize, cfg: &BackboneConfig) -> Result<()> {
        if self.batch == 0 && self.len == 0 {
            self.batch = b;
            self.valid = vec![Vec::new(); b];
            self.next_pos = vec![0; b];
            self.dims = Some((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim));
        } else if self.batch != b {
            return Err(BackboneError::InvalidInput(format!(
                "cache holds {} rows, forward has {b}",
                self.batch
            )));
        }
        Ok(())
    }

    /// Make room for `t` more slots.
    fn reserve(&mut self, t: usize) -> Result<()> {
        let need = self.len + t;
        if need <= self.cap && !self.k.is_empty() {
            return Ok(());
        }
        let (layers, nkv, hd) = self
            .dims
            .ok_or_else(|| BackboneError::InvalidInput("cache not prepared".into()))?;
        let new_cap = if self.cap == 0 {
            need + self.extra_capacity
        } else {
            need.max(self.cap * 2)
        };
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for li in 0..layers {
            let nk = Tensor::zeros((self.batch, nkv, new_cap, hd), DType::F32, &Device::Cpu)?;
            let nv = Tensor::zeros((self.batch, nkv, new_cap, hd), DType::F32, &Device::Cpu)?;
            if self.len > 0 {
                nk.slice_set(&self.k[li].narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&self.v[li].narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            k.push(nk);
            v.push(nv);
        }
        self.k = k;
        self.v = v;
        self.cap = new_cap;
        Ok(())
    }

    /// Store the new keys/values of layer `li` at [old_len, kv_len) and return views of all.
    fn write(
        &mut self,
        li: usize,
        k: &Tensor,
        v: &Tensor,
        old_len: usize,
        kv_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.k[li].slice_set(k, 2, old_len)?;
        self.v[li].slice_set(v, 2, old_len)?;
        Ok((
            self.k[li].narrow(2, 0, kv_len)?,
            self.v[li].narrow(2, 0, kv_len)?,
        ))
    }

    /// Additive mask [b, 1, 1, t, old_len + t] for a chunk of t positions, or None when nothing
    /// needs masking.
    fn build_mask(&self, lens: &[usize], t: usize) -> Result<Option<Tensor>> {
        let b = self.batch;
        let old = self.len;
        let kv = old + t;
        let mut m = vec![0f32; b * t * kv];
        let mut any = false;
        for i in 0..b {
            for j in 0..t {
                let row = &mut m[(i * t + j) * kv..(i * t + j + 1) * kv];
                for (s, slot) in row.iter_mut().enumerate() {
                    let allowed = if s < old {
                        self.valid[i][s]
                    } else {
                        let sj = s - old;
                        sj <= j && sj < lens[i].max(1)
                    };
                    if !allowed {
                        *slot = MASK_VALUE;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, 1, t, kv), &Device::Cpu)?))
    }

    fn commit(&mut self, lens: &[usize], t: usize) {
        for (i, &l) in lens.iter().enumerate() {
            self.valid[i].extend((0..t).map(|j| j < l));
            self.next_pos[i] += l;
        }
        self.len += t;
    }

    /// One cache holding the rows of `parts` one after another (e.g. prompts of different
    /// lengths run as separate batches, then decoded together), with room for `extra` more
    /// positions. A shorter part's rows get masked slots up to the longest part's length;
    /// their rotary positions are their own.
    pub fn concat(parts: &[KvCache], extra: usize) -> Result<KvCache> {
        let Some(dims) = parts.iter().find_map(|p| p.dims) else {
            return Err(BackboneError::InvalidInput(
                "no part of the concatenation has run".into(),
            ));
        };
        if parts.iter().any(|p| p.dims != Some(dims) || p.k.is_empty()) {
            return Err(BackboneError::InvalidInput(
                "caches to concatenate must all have run on the same model".into(),
            ));
        }
        let (layers, nkv, hd) = dims;
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let b: usize = parts.iter().map(|p| p.batch).sum();
        let cap = len + extra.max(1);
        let mut out = KvCache {
            k: Vec::with_capacity(layers),
            v: Vec::with_capacity(layers),
            cap,
            len,
            batch: b,
            valid: Vec::with_capacity(b),
            next_pos: Vec::with_capacity(b),
            extra_capacity: extra,
            dims: Some(dims),
        };
        for p in parts {
            for (valid, &pos) in p.valid.iter().zip(&p.next_pos) {
                let mut v = valid.clone();
                v.resize(len, false);
                out.valid.push(v);
                out.next_pos.push(pos);
            }
        }
        for li in 0..layers {
            let nk = Tensor::zeros((b, nkv, cap, hd), DType::F32, &Device::Cpu)?;
            let nv = Tensor::zeros((b, nkv, cap, hd), DType::F32, &Device::Cpu)?;
            let mut row = 0;
            for p in parts {
                let place = |dst: &Tensor, src: &Tensor| -> Result<()> {
                    let part = src.narrow(2, 0, p.len)?.contiguous()?;
                    // Rows [row, row + p.batch), slots [0, p.len).
                    let padded = if p.len < cap {
                        Tensor::cat(
                            &[
                                part,
                                Tensor::zeros(
                                    (p.batch, nkv, cap - p.len, hd),
                                    DType::F32,
                                    &Device::Cpu,
                                )?,
                            ],
                            2,
                        )?
                    } else {
                        part
                    };
                    dst.slice_set(&padded, 0, row)?;
                    Ok(())
                };
                place(&nk, &p.k[li])?;
                place(&nv, &p.v[li])?;
                row += p.batch;
            }
            out.k.push(nk);
            out.v.push(nv);
        }
        Ok(out)
    }

    /// A new cache holding the given rows of this one (rows may repeat), with room for
    /// `extra` more positions. Used to share a prompt's cache across several continuations.
    pub fn select_rows(&self, rows: &[usize], extra: usize) -> Result<KvCache> {
        if rows.is_empty() {
            return Err(BackboneError::InvalidInput("no rows selected".into()));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(BackboneError::InvalidInput(format!(
                "row {r} outside the cache"
            )));
        }
        let b = rows.len();
        let mut out = KvCache {
            k: Vec::new(),
            v: Vec::new(),
            cap: 0,
            len: self.len,
            batch: b,
            valid: rows.iter().map(|&r| self.valid[r].clone()).collect(),
            next_pos: rows.iter().map(|&r| self.next_pos[r]).collect(),
            extra_capacity: self.extra_capacity,
            dims: self.dims,
        };
        if self.len == 0 || self.k.is_empty() {
            return Ok(out);
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )?;
        let cap = self.len + extra.max(1);
        let (layers, nkv, hd) = self
            .dims
            .ok_or_else(|| BackboneError::InvalidInput("cache not prepared".into()))?;
        for li in 0..layers {
            let nk = Tensor::zeros((b, nkv, cap, hd), DType::F32, &Device::Cpu)?;
            let nv = Tensor::zeros((b, nkv, cap, hd), DType::F32, &Device::Cpu)?;
            nk.slice_set(
                &self.k[li]
                    .narrow(2, 0, self.len)?
                    .contiguous()?
                    .index_select(&idx, 0)?,
                2,
                0,
            )?;
            nv.slice_set(
                &self.v[li]
                    .narrow(2, 0, self.len)?
                    .contiguous()?
                    .index_select(&idx, 0)?,
                2,
                0,
            )?;
            out.k.push(nk);
            out.v.push(nv);
        }
        out.cap = cap;
        Ok(out)
    }
}
