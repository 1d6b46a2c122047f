//! Where models live. Every path can be overridden (flag or environment), and any local
//! directory works: nothing is fetched at run time.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use roe_encoder::{BatchingEncoder, BertEncoder, Precision, ENCODER_MAX_TOKENS};

pub use roe_encoder::encoder_dir;

/// The encoder's linear-layer precision: `ROE_ENCODER_PRECISION` (auto, f32 or bf16;
/// default auto: bf16 where the CPU has AVX-512 BF16).
pub fn encoder_precision() -> Result<Precision> {
    match std::env::var("ROE_ENCODER_PRECISION") {
        Ok(v) => v
            .parse()
            .map_err(|e: String| anyhow::anyhow!("ROE_ENCODER_PRECISION: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(Precision::Auto),
        Err(e) => Err(anyhow::anyhow!("ROE_ENCODER_PRECISION: {e}")),
    }
}

pub fn load_encoder(models_dir: &Path, encoder: Option<&Path>) -> Result<BertEncoder> {
    let dir = encoder_dir(models_dir, encoder);
    BertEncoder::load_with(&dir, ENCODER_MAX_TOKENS, encoder_precision()?).with_context(|| {
        format!(
            "loading the encoder from {} (run scripts/fetch-models.sh, or pass --models-dir / ROE_MODELS_DIR)",
            dir.display()
        )
    })
}

/// The encoder as the server uses it: one worker that batches concurrent requests together.
pub fn load_serving_encoder(models_dir: &Path, encoder: Option<&Path>) -> Result<BatchingEncoder> {
    let dir = encoder_dir(models_dir, encoder);
    roe_encoder::serving_encoder(&dir, encoder_precision()?).with_context(|| {
        format!(
            "loading the encoder from {} (run scripts/fetch-models.sh, or pass --models-dir / ROE_MODELS_DIR)",
            dir.display()
        )
    })
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
