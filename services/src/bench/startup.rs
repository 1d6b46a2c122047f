//! Start-up at scale: a library of `n` stored vectors (synthetic experts of 1,000 instances,
//! written through the real store) is opened, which reads every vector from sled and rebuilds
//! the index (HNSW past its threshold).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use roe_expert_library::embedding::{normalize, Encoder};
use roe_expert_library::expert::{BackboneSpec, ExpertMeta, Instance};
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_expert_library::store::{ExpertStore, StoredInstance};
use serde::Serialize;

use super::routing_accuracy::routing_only_adapter;

/// Stands in for the sentence encoder: the stored vectors are synthetic, and opening a library
/// only checks the encoder's id and dimension.
struct SyntheticEncoder;

impl Encoder for SyntheticEncoder {
    fn id(&self) -> &str {
        "synthetic-384"
    }
    fn dim(&self) -> usize {
        384
    }
    fn embed(&self, texts: &[String]) -> roe_expert_library::Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; 384];
                t.bytes()
                    .enumerate()
                    .for_each(|(i, b)| v[(i * 31 + b as usize) % 384] += 1.0);
                normalize(&mut v);
                v
            })
            .collect())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub vectors: usize,
    pub experts: usize,
    pub write_s: f64,
    pub open_s: f64,
    pub hnsw: bool,
    pub rss_after_open_bytes: Option<u64>,
    pub store_bytes: u64,
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let m = e.metadata().ok();
                    match m {
                        Some(m) if m.is_dir() => dir_size(&e.path()),
                        Some(m) => m.len(),
                        None => 0,
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn run(n: usize, dir: &Path, index: IndexConfig) -> Result<StartupReport> {
    let per_expert = 1000;
    let experts = n.div_ceil(per_expert);
    let spec = BackboneSpec::smollm2_135m();
    let adapter = routing_only_adapter();
    let summary = adapter.validate(&spec)?;
    let t = Instant::now();
    {
        let store = ExpertStore::open(dir)?;
        store.check_encoder(SyntheticEncoder.id())?;
        for e in 0..experts {
            let count = per_expert.min(n - e * per_expert);
            let vectors = super::hnsw::synthetic(count, 384, 20, e as u64 + 10);
            let id = format!("synthetic-{e:05}");
            let rows: Vec<StoredInstance> = vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    Ok(StoredInstance {
                        point_id: store.next_point_id()?,
                        expert_id: id.clone(),
                        instance: Instance {
                            input: format!("synthetic instance {i} of {id}"),
                            target: None,
                            choices: vec![],
                        },
                        embedding: v,
                        choice_embedding: None,
                    })
                })
                .collect::<roe_expert_library::Result<_>>()?;
            let meta = ExpertMeta {
                id: id.clone(),
                name: id.clone(),
                description: String::new(),
                kind: summary.kind(),
                backbone: spec.name.clone(),
                version: 1,
                created_at_unix_ms: 0,
                num_instances: rows.len(),
                weights_sha256: adapter.sha256_hex(),
                weights_bytes: adapter.safetensors.len(),
                adapter: summary.clone(),
            };
            store.put_expert(&meta, &adapter, &rows)?;
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (library, report) = ExpertLibrary::open(
        dir,
        Arc::new(SyntheticEncoder),
        LibraryConfig {
            index,
            ..Default::default()
        },
    )?;
    let open_s = t.elapsed().as_secs_f64();
    let hnsw = library.with_state(|s| s.uses_hnsw());
    Ok(StartupReport {
        vectors: report.vectors,
        experts: report.experts,
        write_s,
        open_s,
        hnsw,
        rss_after_open_bytes: super::rss_bytes(),
        store_bytes: dir_size(dir),
    })
}
