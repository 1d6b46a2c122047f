//! The sentence encoder behind routing: a vanilla pretrained BERT-style model
//! (all-MiniLM-L6-v2 by default) run with candle, mean-pooled over the attention mask and
//! L2-normalised — the same recipe as sentence-transformers, so vectors match it for the same
//! model files ([`BertEncoder`]) — and the worker that serialises and batches the server's
//! encoder work ([`BatchingEncoder`]). Both implement the domain's
//! [`Encoder`](roe_expert_library::embedding::Encoder).

mod attention;
mod batching;
mod bert;
mod bert_encoder;
pub mod bf16;
pub mod cache;
pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use batching::BatchingEncoder;
pub use bert_encoder::{BertEncoder, Precision};
pub use roe_expert_library::embedding::Encoder;
use roe_expert_library::LibraryError;

/// Where the default encoder lives inside a models directory.
pub const DEFAULT_ENCODER_DIR: &str = "all-MiniLM-L6-v2";
/// Maximum tokens the encoder reads per text (sentence-transformers' default for MiniLM).
pub const ENCODER_MAX_TOKENS: usize = 256;
/// Texts one encoder pass may merge from concurrent requests.
pub const MAX_BATCH_TEXTS: usize = 256;

/// The encoder folder: `explicit` if given, else `<models_dir>/all-MiniLM-L6-v2`.
pub fn encoder_dir(models_dir: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| models_dir.join(DEFAULT_ENCODER_DIR))
}

pub use cache::CachingEncoder;

/// The encoder as the server runs it: one worker batching concurrent requests over the BERT
/// model in `dir`, its linear layers in `precision` (which path was taken is logged).
pub fn serving_encoder(dir: &Path, precision: Precision) -> Result<BatchingEncoder, LibraryError> {
    let bert = BertEncoder::load_with(dir, ENCODER_MAX_TOKENS, precision)?;
    tracing::info!(
        precision = bert.precision(),
        avx512_bf16 = bf16::supported(),
        "encoder: linear layers in {}",
        bert.precision()
    );
    let bert: Arc<dyn Encoder> = Arc::new(bert);
    Ok(BatchingEncoder::new(bert, MAX_BATCH_TEXTS))
}

fn candle_error(e: candle_core::Error) -> LibraryError {
    LibraryError::Encoder(e.to_string())
}
