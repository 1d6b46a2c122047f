//! Task suites on disk (`task.json`, `train.jsonl`, `test.jsonl`), as under `assets/tasks`:
//! the CLI registers experts from a task folder with them, the benchmarks and tests read
//! their rows. Kept out of the domain crate, which never reads files of this shape.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

use roe_expert_library::{Instance, LibraryError, Query, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct TaskInfo {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub dir: PathBuf,
    pub info: TaskInfo,
    pub train: Vec<Instance>,
    pub test: Vec<Instance>,
}

impl Task {
    /// Loads a task folder; classification rows get the task's labels as their choices.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let info_path = dir.join("task.json");
        let text =
            std::fs::read_to_string(&info_path).map_err(|e| LibraryError::io(&info_path, e))?;
        let info: TaskInfo = serde_json::from_str(&text).map_err(|e| {
            LibraryError::invalid("task.json", format!("{}: {e}", info_path.display()))
        })?;
        let read = |name: &str| -> Result<Vec<Instance>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(Vec::new());
            }
            read_instances(&p, &info.labels)
        };
        Ok(Self {
            train: read("train.jsonl")?,
            test: read("test.jsonl")?,
            info,
            dir: dir.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }
}

/// Reads JSON lines `{"input", "target"?, "choices"?}`; rows without choices get `labels`.
pub fn read_instances(path: &Path, labels: &[String]) -> Result<Vec<Instance>> {
    let text = std::fs::read_to_string(path).map_err(|e| LibraryError::io(path, e))?;
    parse_instances(&text, &path.display().to_string(), labels)
}

/// [`read_instances`] of text already read; `source` names it in errors (`source:line: …`).
pub fn parse_instances(text: &str, source: &str, labels: &[String]) -> Result<Vec<Instance>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            let mut inst: Instance = serde_json::from_str(l).map_err(|e| {
                LibraryError::invalid("instances", format!("{source}:{}: {e}", n + 1))
            })?;
            if inst.choices.is_empty() {
                inst.choices = labels.to_vec();
            }
            Ok(inst)
        })
        .collect()
}

/// All task folders (those holding a task.json) under `root`, sorted by name.
pub fn load_suite(root: impl AsRef<Path>) -> Result<Vec<Task>> {
    let root = root.as_ref();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| LibraryError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("task.json").is_file())
        .collect();
    dirs.sort();
    dirs.iter().map(Task::load).collect()
}

/// `n` items drawn without replacement with a seeded RNG (all of them if fewer).
pub fn sample<T: Clone>(items: &[T], n: usize, seed: u64) -> Vec<T> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.shuffle(&mut rng);
    idx.truncate(n);
    idx.into_iter().map(|i| items[i].clone()).collect()
}

/// An instance as an unlabeled query (its target dropped).
pub fn as_query(inst: &Instance) -> Query {
    Query {
        input: inst.input.clone(),
        choices: inst.choices.clone(),
        target: None,
    }
}

/// An instance as a labeled query (its target kept).
pub fn as_labeled_query(inst: &Instance) -> Query {
    Query {
        target: inst.target.clone(),
        ..as_query(inst)
    }
}
