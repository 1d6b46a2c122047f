//! Checkpoints: a run's parameters, AdamW moments, step and losses, written atomically
//! (temporary file, fsync, rename) so that a crash leaves the previous checkpoint or the new
//! one, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::params::{ParamTensor, Params};
use crate::train::{AdamState, TrainState};

const FILE: &str = "checkpoint.safetensors";

#[derive(Serialize, Deserialize)]
struct Meta {
    step: usize,
    losses: Vec<f64>,
    kind: roe_expert_library::ExpertKind,
    names: Vec<String>,
    lora_blocks: Vec<(usize, String)>,
    lora_rank: usize,
    lora_alpha: f64,
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `state` into `dir` (replacing the previous checkpoint).
pub fn save(dir: &Path, state: &TrainState) -> Result<()> {
    let p = &state.params;
    let meta = Meta {
        step: state.step,
        losses: state.losses.clone(),
        kind: p.kind,
        names: p.tensors.iter().map(|t| t.name.clone()).collect(),
        lora_blocks: p
            .lora_blocks
            .iter()
            .map(|(l, t)| (*l, t.name().to_string()))
            .collect(),
        lora_rank: p.lora_rank,
        lora_alpha: p.lora_alpha,
    };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, t) in p.tensors.iter().enumerate() {
        data.push((format!("param.{i}"), t.shape.clone(), bytes(&t.values)));
        data.push((format!("m.{i}"), t.shape.clone(), bytes(&state.adam.m[i])));
        data.push((format!("v.{i}"), t.shape.clone(), bytes(&state.adam.v[i])));
    }
    let views = data
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Checkpoint(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let info = HashMap::from([(
        "roe".to_string(),
        serde_json::to_string(&meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
    )]);
    let blob = safetensors::serialize(views, Some(info))
        .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomically(&dir.join(FILE), &blob)
}

/// Writes `bytes` to `path` durably: a temporary file beside it, fsynced, renamed over it,
/// and the directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
    f.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The checkpoint in `dir`, or None when there is none.
pub fn load(dir: &Path) -> Result<Option<TrainState>> {
    let path = dir.join(FILE);
    let blob = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(&path, e)),
    };
    let bad = |m: String| TrainError::Checkpoint(format!("{}: {m}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&blob).map_err(|e| bad(e.to_string()))?;
    let meta: Meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("roe"))
        .ok_or_else(|| bad("no roe metadata".into()))
        .and_then(|s| serde_json::from_str(s).map_err(|e| bad(e.to_string())))?;
    let st = SafeTensors::deserialize(&blob).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is not f32")));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let mut tensors = Vec::new();
    let mut adam = AdamState::default();
    for (i, name) in meta.names.iter().enumerate() {
        let (shape, values) = read(&format!("param.{i}"))?;
        tensors.push(ParamTensor {
            name: name.clone(),
            shape,
            values,
        });
        adam.m.push(read(&format!("m.{i}"))?.1);
        adam.v.push(read(&format!("v.{i}"))?.1);
    }
    let lora_blocks = meta
        .lora_blocks
        .iter()
        .map(|(l, t)| {
            crate::recipe::parse_target(t)
                .map(|t| (*l, t))
                .ok_or_else(|| bad(format!("unknown LoRA target {t:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(TrainState {
        params: Params {
            kind: meta.kind,
            tensors,
            lora_blocks,
            lora_rank: meta.lora_rank,
            lora_alpha: meta.lora_alpha,
        },
        adam,
        step: meta.step,
        losses: meta.losses,
    }))
}
