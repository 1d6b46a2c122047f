//! Fixtures shared by the library's tests: deterministic encoders (random vectors, bag of
//! words), a real adapter from `assets/`, and experts of synthetic instances.
#![allow(dead_code)]

use std::path::Path;

use rand::{Rng, SeedableRng};
use roe_expert_library::embedding::{normalize, Encoder};
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{LibraryConfig, NewExpert};
use roe_expert_library::{Instance, PeftAdapter};

pub const DIM: usize = 32;

/// A random unit vector per text, seeded by the text: synthetic, deterministic vectors.
pub struct RandomEncoder;

pub fn vector_of(text: &str) -> Vec<f32> {
    let seed = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
    normalize(&mut v);
    v
}

impl Encoder for RandomEncoder {
    fn id(&self) -> &str {
        "random-32"
    }
    fn dim(&self) -> usize {
        DIM
    }
    fn embed(&self, texts: &[String]) -> roe_expert_library::Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| vector_of(t)).collect())
    }
}

/// A library whose indexes become HNSW graphs at 500 vectors.
pub fn config(persist_on_drop: bool) -> LibraryConfig {
    LibraryConfig {
        index: IndexConfig {
            hnsw_threshold: 500,
            max_connections: 16,
            ef_construction: 64,
            ef_search: 64,
            compact_ratio: 0.25,
            engine: Default::default(),
        },
        persist_index_on_drop: persist_on_drop,
        ..Default::default()
    }
}

/// The bundled sms_spam prompt expert.
pub fn adapter() -> PeftAdapter {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/experts/smollm2-135m/prompt/sms_spam");
    PeftAdapter::from_dir(dir).unwrap()
}

/// Instance `i` of expert `id`; every other one has answer choices (so the choice_instance
/// index is a graph of its own).
pub fn instance(id: &str, i: usize) -> Instance {
    Instance {
        input: format!("{id} instance {i}"),
        target: Some(format!("label{}", i % 3)),
        choices: if i.is_multiple_of(2) {
            vec!["label0".into(), "label1".into(), "label2".into()]
        } else {
            vec![]
        },
    }
}

/// Expert `id` with `n` synthetic instances.
pub fn expert(id: &str, n: usize) -> NewExpert {
    NewExpert {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        backbone: None,
        adapter: adapter(),
        instances: (0..n).map(|i| instance(id, i)).collect(),
    }
}

/// Hashes words into 512 buckets: texts sharing words get similar unit vectors. The string is
/// the encoder's id (a library refuses another encoder's store).
pub struct BagOfWords(pub String);

impl BagOfWords {
    pub fn new() -> Self {
        Self("bow".into())
    }
}

impl Encoder for BagOfWords {
    fn id(&self) -> &str {
        &self.0
    }
    fn dim(&self) -> usize {
        512
    }
    fn embed(&self, texts: &[String]) -> roe_expert_library::Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; 512];
                for w in t.split_whitespace() {
                    let h = w
                        .bytes()
                        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                    v[(h % 512) as usize] += 1.0;
                }
                normalize(&mut v);
                v
            })
            .collect())
    }
}
