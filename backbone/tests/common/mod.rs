#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use roe_backbone::{Backbone, BackboneOptions, QuantKernel};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn gguf_path() -> PathBuf {
    std::env::var("ROE_BACKBONE_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            root().join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

pub fn experts_dir() -> PathBuf {
    std::env::var("ROE_EXPERTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("assets/experts/smollm2-135m"))
}

pub fn tasks_dir() -> PathBuf {
    std::env::var("ROE_TASKS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("assets/tasks"))
}

/// Panics with the fix when the backbone model has not been fetched: a test whose model is
/// missing fails (CI fetches the models first), it never passes by skipping.
pub fn require_model() {
    let p = gguf_path();
    assert!(
        p.exists(),
        "backbone GGUF not found at {} (run scripts/fetch-models.sh)",
        p.display()
    );
}

pub fn quantized() -> Arc<Backbone> {
    static B: OnceLock<Arc<Backbone>> = OnceLock::new();
    B.get_or_init(|| Arc::new(Backbone::load(gguf_path(), None).expect("load backbone")))
        .clone()
}

pub fn dequantized() -> Arc<Backbone> {
    static B: OnceLock<Arc<Backbone>> = OnceLock::new();
    B.get_or_init(|| {
        Arc::new(
            Backbone::load_with(
                gguf_path(),
                None,
                BackboneOptions {
                    dequantize: true,
                    ..Default::default()
                },
            )
            .expect("load backbone"),
        )
    })
    .clone()
}

pub fn reference() -> serde_json::Value {
    let p = experts_dir().join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference.json")).expect("json")
}

#[derive(Debug, Clone)]
pub struct Row {
    pub input: String,
    pub target: String,
    pub choices: Vec<String>,
}

pub fn load_rows(task: &str, n: usize) -> Vec<Row> {
    let dir = tasks_dir().join(task);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("task.json")).unwrap()).unwrap();
    let labels: Vec<String> = meta["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    std::fs::read_to_string(dir.join("test.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let choices = v["choices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_else(|| labels.clone());
            Row {
                input: v["input"].as_str().unwrap().to_string(),
                target: v["target"].as_str().unwrap().to_string(),
                choices,
            }
        })
        .collect()
}

pub fn ggml_kernels() -> Arc<Backbone> {
    static B: OnceLock<Arc<Backbone>> = OnceLock::new();
    B.get_or_init(|| {
        Arc::new(
            Backbone::load_with(
                gguf_path(),
                None,
                BackboneOptions {
                    dequantize: false,
                    kernel: QuantKernel::Ggml,
                },
            )
            .expect("load backbone"),
        )
    })
    .clone()
}
