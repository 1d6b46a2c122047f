//! The encoder must reproduce sentence-transformers' all-MiniLM-L6-v2 vectors for the same
//! model files (shared reference: 115 inputs, cosine >= 0.9999 on every row for the f32
//! path), and its bf16 path must stay within cosine 0.999 of the f32 one.

use std::path::PathBuf;

use roe_encoder::{BertEncoder, Encoder, Precision, DEFAULT_ENCODER_DIR};
use roe_expert_library::embedding::dot;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models_dir() -> PathBuf {
    std::env::var_os("ROE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

fn load(precision: Precision) -> BertEncoder {
    BertEncoder::load_with(models_dir().join(DEFAULT_ENCODER_DIR), 256, precision)
        .expect("encoder loads (run scripts/fetch-models.sh first)")
}

/// The first `per_task` test inputs of every task under assets/tasks (the benchmark's kind
/// of text: short and long, several languages).
fn task_texts(per_task: usize) -> Vec<String> {
    let mut dirs: Vec<_> = std::fs::read_dir(repo().join("assets/tasks"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("test.jsonl").is_file())
        .collect();
    dirs.sort();
    let mut texts = Vec::new();
    for d in dirs {
        let rows = std::fs::read_to_string(d.join("test.jsonl")).unwrap();
        for line in rows.lines().take(per_task) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(v["input"].as_str().unwrap().to_string());
        }
    }
    texts
}

#[test]
fn bf16_path_agrees_with_f32() {
    if !roe_encoder::bf16::supported() {
        // The f32 path is what runs on this CPU; bf16 is refused when asked for.
        assert!(BertEncoder::load_with(
            models_dir().join(DEFAULT_ENCODER_DIR),
            256,
            Precision::Bf16
        )
        .is_err());
        assert_eq!(load(Precision::Auto).precision(), "f32");
        return;
    }
    let bf16 = load(Precision::Bf16);
    assert_eq!(bf16.precision(), "bf16");
    assert_eq!(load(Precision::Auto).precision(), "bf16");
    let f32 = load(Precision::F32);
    let texts = task_texts(24);
    assert!(texts.len() >= 500, "{} texts", texts.len());
    let (a, b) = (bf16.embed(&texts).unwrap(), f32.embed(&texts).unwrap());
    let mut worst = (1.0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((dot(x, x) - 1.0).abs() < 1e-4, "row {i} is not unit length");
        let cos = dot(x, y);
        if cos < worst.0 {
            worst = (cos, i);
        }
    }
    println!(
        "bf16 vs f32: worst cosine {:.6} at row {}",
        worst.0, worst.1
    );
    assert!(worst.0 >= 0.999, "{:?}: cosine {}", texts[worst.1], worst.0);
}

#[test]
fn minilm_matches_sentence_transformers() {
    let encoder = load(Precision::F32);
    assert_eq!(encoder.precision(), "f32");
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
