//! The encoder must reproduce sentence-transformers' all-MiniLM-L6-v2 vectors for the same
//! model files (shared reference: 115 inputs, cosine >= 0.9999 on every row).

use std::path::PathBuf;

use roe_encoder::{BertEncoder, Encoder, DEFAULT_ENCODER_DIR};
use roe_expert_library::embedding::dot;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models_dir() -> PathBuf {
    std::env::var_os("ROE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let encoder = BertEncoder::load(models_dir().join(DEFAULT_ENCODER_DIR), 256)
        .expect("encoder loads (run scripts/fetch-models.sh first)");
    assert_eq!(encoder.dim(), 384);
    let text = std::fs::read_to_string(repo().join("assets/reference/minilm_embeddings.json"))
        .expect("reference file");
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let inputs: Vec<String> = serde_json::from_value(reference["inputs"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["embeddings"].clone()).unwrap();
    assert_eq!(inputs.len(), 115);
    let got = encoder.embed(&inputs).unwrap();
    let mut worst = (1.0f32, 0usize);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let norm_e = dot(e, e).sqrt();
        let cos = dot(g, e) / norm_e;
        assert!((dot(g, g) - 1.0).abs() < 1e-4, "row {i} is not unit length");
        if cos < worst.0 {
            worst = (cos, i);
        }
    }
    println!("worst cosine {:.6} at row {}", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "row {} has cosine {}", worst.1, worst.0);
    // Batching and ordering must not change a vector.
    let alone = encoder.embed(&inputs[3..4]).unwrap();
    assert!(dot(&alone[0], &got[3]) > 0.99999);
}
