//! What the tests that start real `roe` processes share.
#![allow(dead_code)]

use std::path::PathBuf;

use roe_services::proto;
use roe_task_suite::{sample, Task};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("ROE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

/// Registration of the suite's `kind` expert of `task` with `instances` sampled train rows.
pub fn register_request(
    id: &str,
    kind: &str,
    task: &Task,
    instances: usize,
    new_version: bool,
) -> proto::RegisterExpertRequest {
    let dir = repo()
        .join("assets/experts/smollm2-135m")
        .join(kind)
        .join(task.name());
    proto::RegisterExpertRequest {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        backbone: String::new(),
        adapter: Some(proto::PeftAdapter {
            adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors"))
                .unwrap(),
        }),
        instances: sample(&task.train, instances, 0)
            .into_iter()
            .map(|i| proto::Instance {
                input: i.input,
                target: i.target,
                choices: i.choices,
            })
            .collect(),
        new_version,
    }
}
