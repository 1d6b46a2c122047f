//! Sentence encoder: a vanilla pretrained BERT-style model (all-MiniLM-L6-v2 by default) run
//! with candle, mean-pooled over the attention mask and L2-normalised — the same recipe as
//! sentence-transformers, so vectors match it for the same model files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bert::{BertConfig, BertEncoderModel};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{LibraryError, Result};

/// Anything that turns texts into unit-length vectors of one dimension.
pub trait Encoder: Send + Sync {
    /// Stable identifier of the model, recorded in the store.
    fn id(&self) -> &str;
    fn dim(&self) -> usize;
    /// Embeds texts; the result has one L2-normalised row per text, in order.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

/// Token budget of one encoder batch (rows x padded length).
const TOKENS_PER_BATCH: usize = 2048;

/// Where the default encoder lives inside a models directory.
pub const DEFAULT_ENCODER_DIR: &str = "all-MiniLM-L6-v2";

pub struct BertEncoder {
    id: String,
    model: BertEncoderModel,
    tokenizer: Tokenizer,
    dim: usize,
    batch_size: usize,
    device: Device,
}

impl BertEncoder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a local directory
    /// (a sentence-transformers or Hugging Face model folder).
    pub fn load(dir: impl AsRef<Path>, max_tokens: usize) -> Result<Self> {
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
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
        let model = BertEncoderModel::load(vb, &config)?;
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
        })
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Embeds token sequences padded to the longest of them.
    fn embed_batch(&self, enc: &[&tokenizers::Encoding]) -> Result<Vec<Vec<f32>>> {
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
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
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
            for (&i, v) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = v;
            }
            start += chunk.len();
        }
        Ok(out)
    }
}

/// L2-normalises a vector in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Inner product. Eight independent partial sums let the compiler vectorise the loop (a plain
/// `sum()` must add in order and stays scalar); this is the hot loop of search.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        let (x, y) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// Wraps an encoder with a persistent text -> vector cache (benchmarks embed the same task
/// rows for every seed and strategy; the cache makes reruns cheap). Keyed by the encoder id
/// and a SHA-256 of the text, so a different model never reads another's vectors.
pub struct CachingEncoder<E: Encoder> {
    inner: E,
    path: PathBuf,
    cache: parking_lot::Mutex<std::collections::HashMap<[u8; 32], Vec<f32>>>,
}

impl<E: Encoder> CachingEncoder<E> {
    pub fn new(inner: E, cache_dir: impl AsRef<Path>) -> Result<Self> {
        use sha2::Digest;
        let dir = cache_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LibraryError::io(dir, e))?;
        let tag = crate::expert::hex(&sha2::Sha256::digest(inner.id().as_bytes())[..8]);
        let path = dir.join(format!("embeddings-{tag}.bin"));
        let mut cache = std::collections::HashMap::new();
        if let Ok(bytes) = std::fs::read(&path) {
            let row = 32 + inner.dim() * 4;
            for chunk in bytes.chunks_exact(row) {
                let mut key = [0u8; 32];
                key.copy_from_slice(&chunk[..32]);
                let v = chunk[32..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                cache.insert(key, v);
            }
        }
        Ok(Self {
            inner,
            path,
            cache: parking_lot::Mutex::new(cache),
        })
    }

    pub fn len(&self) -> usize {
        self.cache.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(text: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(text.as_bytes()).into()
    }
}

impl<E: Encoder> Encoder for CachingEncoder<E> {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        use std::io::Write;
        let keys: Vec<[u8; 32]> = texts.iter().map(|t| Self::key(t)).collect();
        let mut missing: Vec<usize> = {
            let cache = self.cache.lock();
            (0..texts.len())
                .filter(|&i| !cache.contains_key(&keys[i]))
                .collect()
        };
        missing.dedup_by_key(|i| keys[*i]);
        if !missing.is_empty() {
            let batch: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let vecs = self.inner.embed(&batch)?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| LibraryError::io(&self.path, e))?;
            let mut buf = Vec::new();
            let mut cache = self.cache.lock();
            for (&i, v) in missing.iter().zip(vecs) {
                buf.extend_from_slice(&keys[i]);
                v.iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                cache.insert(keys[i], v);
            }
            file.write_all(&buf)
                .map_err(|e| LibraryError::io(&self.path, e))?;
        }
        let cache = self.cache.lock();
        keys.iter()
            .map(|k| {
                cache
                    .get(k)
                    .cloned()
                    .ok_or_else(|| LibraryError::Encoder("cache lost a vector".into()))
            })
            .collect()
    }
}

/// Serialises encoder work through one thread and merges concurrent requests into shared
/// batches. Concurrent Route calls would otherwise each start a full forward pass with its
/// own thread pool and oversubscribe the cores; here they queue, and whatever is waiting when
/// the worker frees up goes through together (up to `max_batch_texts`).
pub struct BatchingEncoder {
    id: String,
    dim: usize,
    queue: parking_lot::Mutex<std::sync::mpsc::Sender<EmbedJob>>,
}

type EmbedJob = (Vec<String>, std::sync::mpsc::Sender<Result<Vec<Vec<f32>>>>);

impl BatchingEncoder {
    pub fn new(inner: Arc<dyn Encoder>, max_batch_texts: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<EmbedJob>();
        let id = inner.id().to_string();
        let dim = inner.dim();
        std::thread::Builder::new()
            .name("roe-encoder".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    let mut texts: usize = jobs[0].0.len();
                    while texts < max_batch_texts {
                        match rx.try_recv() {
                            Ok(job) => {
                                texts += job.0.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    let all: Vec<String> =
                        jobs.iter().flat_map(|(t, _)| t.iter().cloned()).collect();
                    match inner.embed(&all) {
                        Ok(mut vectors) => {
                            for (t, reply) in jobs.into_iter().rev() {
                                let mine = vectors.split_off(vectors.len() - t.len());
                                let _ = reply.send(Ok(mine));
                            }
                        }
                        Err(e) => {
                            for (_, reply) in jobs {
                                let _ = reply.send(Err(LibraryError::Encoder(e.to_string())));
                            }
                        }
                    }
                }
            })
            .expect("spawning the encoder thread");
        Self {
            id,
            dim,
            queue: parking_lot::Mutex::new(tx),
        }
    }
}

impl Encoder for BatchingEncoder {
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
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue
            .lock()
            .send((texts.to_vec(), tx))
            .map_err(|_| LibraryError::Encoder("encoder thread stopped".into()))?;
        rx.recv()
            .map_err(|_| LibraryError::Encoder("encoder thread stopped".into()))?
    }
}
