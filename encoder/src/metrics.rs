//! What the encoder counts for monitoring, through the `metrics` facade (recorded only when
//! the process installs a recorder, as `roe serve` does).

use metrics::{counter, describe_counter, describe_histogram, histogram};

pub const ENCODER_TEXTS: &str = "roe_encoder_texts_total";
pub const ENCODER_BATCH_SIZE: &str = "roe_encoder_batch_size";

/// Registers the descriptions of the encoder's metrics with the recorder.
pub fn describe() {
    describe_counter!(
        crate::cache::EMBEDDING_CACHE_HITS,
        "Texts whose vector came from the embedding cache"
    );
    describe_counter!(
        crate::cache::EMBEDDING_CACHE_MISSES,
        "Texts the embedding cache did not hold (embedded, once per batch)"
    );
    metrics::describe_gauge!(
        crate::cache::EMBEDDING_CACHE_BYTES,
        metrics::Unit::Bytes,
        "Bytes the embedding cache holds"
    );
    describe_counter!(ENCODER_TEXTS, "Texts embedded (instances and queries)");
    describe_histogram!(
        ENCODER_BATCH_SIZE,
        "Texts per encoder pass (concurrent requests merged)"
    );
}

pub(crate) fn batch(texts: usize) {
    counter!(ENCODER_TEXTS).increment(texts as u64);
    histogram!(ENCODER_BATCH_SIZE).record(texts as f64);
}
