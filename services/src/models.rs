//! Where models and bundled data live. Every path can be overridden (flag or environment), and
//! any local directory works: nothing is fetched at run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use roe_expert_library::embedding::{
    BatchingEncoder, BertEncoder, CachingEncoder, Encoder, DEFAULT_ENCODER_DIR,
};

/// Maximum tokens the encoder reads per text (sentence-transformers' default for MiniLM).
pub const ENCODER_MAX_TOKENS: usize = 256;

/// The encoder directory: `encoder` if given (a model folder), else `<models_dir>/all-MiniLM-L6-v2`.
pub fn encoder_dir(models_dir: &Path, encoder: Option<&Path>) -> PathBuf {
    encoder
        .map(Path::to_path_buf)
        .unwrap_or_else(|| models_dir.join(DEFAULT_ENCODER_DIR))
}

pub fn load_encoder(models_dir: &Path, encoder: Option<&Path>) -> Result<BertEncoder> {
    let dir = encoder_dir(models_dir, encoder);
    BertEncoder::load(&dir, ENCODER_MAX_TOKENS).with_context(|| {
        format!(
            "loading the encoder from {} (run scripts/fetch-models.sh, or pass --models-dir / ROE_MODELS_DIR)",
            dir.display()
        )
    })
}

/// The encoder with an on-disk vector cache, for benchmarks that embed the same rows often.
pub fn load_cached_encoder(
    models_dir: &Path,
    encoder: Option<&Path>,
    cache_dir: &Path,
) -> Result<Arc<dyn Encoder>> {
    Ok(Arc::new(CachingEncoder::new(
        load_encoder(models_dir, encoder)?,
        cache_dir,
    )?))
}

/// Texts one encoder pass may merge from concurrent requests.
pub const MAX_BATCH_TEXTS: usize = 256;

/// The encoder as the server uses it: one worker that batches concurrent requests together.
pub fn load_serving_encoder(models_dir: &Path, encoder: Option<&Path>) -> Result<BatchingEncoder> {
    let inner: Arc<dyn Encoder> = Arc::new(load_encoder(models_dir, encoder)?);
    Ok(BatchingEncoder::new(inner, MAX_BATCH_TEXTS))
}

/// The default backbone GGUF file under the models folder.
pub const DEFAULT_BACKBONE_FILE: &str = "SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `<models_dir>/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn backbone_path(models_dir: &Path) -> PathBuf {
    models_dir.join(DEFAULT_BACKBONE_FILE)
}

/// Loads the backbone from `explicit` (a GGUF file) or the default under `models_dir`.
pub fn load_backbone(models_dir: &Path, explicit: Option<&Path>) -> Result<roe_backbone::Backbone> {
    let gguf = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| backbone_path(models_dir));
    roe_backbone::Backbone::load(&gguf, None).with_context(|| {
        format!(
            "loading the backbone from {} (run scripts/fetch-models.sh, or pass --models-dir / --backbone)",
            gguf.display()
        )
    })
}
