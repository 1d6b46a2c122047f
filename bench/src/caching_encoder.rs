//! An encoder with an on-disk vector cache, for benchmarks that embed the same rows often.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use roe_expert_library::embedding::Encoder;
use roe_expert_library::{LibraryError, Result};

/// Wraps an encoder with a persistent text -> vector cache (benchmarks embed the same task
/// rows for every seed and strategy; the cache makes reruns cheap). Keyed by the encoder id,
/// the arithmetic it ran in (`variant`: bf16 and f32 vectors differ slightly, and a bench
/// comparing them must not read one for the other) and a SHA-256 of the text, so a
/// different model never reads another's vectors.
pub struct CachingEncoder<E: Encoder> {
    inner: E,
    path: PathBuf,
    cache: parking_lot::Mutex<std::collections::HashMap<[u8; 32], Vec<f32>>>,
}

impl<E: Encoder> CachingEncoder<E> {
    pub fn new(inner: E, variant: &str, cache_dir: impl AsRef<Path>) -> Result<Self> {
        use sha2::Digest;
        let dir = cache_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LibraryError::io(dir, e))?;
        let tag = sha2::Sha256::digest(format!("{}/{variant}", inner.id()).as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
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

/// The encoder of `models_dir` (or `encoder`) with its vector cache under `cache_dir`.
pub fn load_cached_encoder(
    models_dir: &Path,
    encoder: Option<&Path>,
    cache_dir: &Path,
) -> anyhow::Result<Arc<dyn Encoder>> {
    let inner = roe_cli::models::load_encoder(models_dir, encoder)?;
    let variant = inner.precision();
    Ok(Arc::new(CachingEncoder::new(inner, variant, cache_dir)?))
}
