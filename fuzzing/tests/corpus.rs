//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) through the same code the
//! fuzz targets run: what once passed still passes, on stable, in the test suite.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8]), at_least: usize) {
    let files = corpus(target);
    // An empty or lost corpus would pass without testing anything.
    assert!(
        files.len() >= at_least,
        "{target}: {} inputs, expected at least {at_least}",
        files.len()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: {} fails", f.display());
        }
    }
}

#[test]
fn peft_adapter_corpus() {
    replay("peft_adapter", roe_fuzzing::peft_adapter, 50);
}

#[test]
fn instances_jsonl_corpus() {
    replay("instances_jsonl", roe_fuzzing::instances_jsonl, 50);
}

#[test]
fn proto_messages_corpus() {
    replay("proto_messages", roe_fuzzing::proto_messages, 50);
}

/// The seeds (`fuzz/seeds/`, where every run starts besides the corpus) are real inputs: a
/// tiny prompt and LoRA that read, lines of real tasks. They are replayed too.
#[test]
fn the_seeds_are_valid_inputs_and_replay() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for seed in ["prompt", "lora", "lora-layers"] {
        let data = std::fs::read(seeds.join("peft_adapter").join(seed)).unwrap();
        let (config, st) = roe_fuzzing::split_peft(&data);
        roe_peft::Adapter::from_peft(&config, st, &roe_fuzzing::TINY)
            .unwrap_or_else(|e| panic!("{seed}: {e}"));
    }
    let lines = std::fs::read_to_string(seeds.join("instances_jsonl/task")).unwrap();
    let rows = roe_task_suite::parse_instances(&lines, "seed", &[]).unwrap();
    assert!(rows.len() >= 3);
    for (target, run) in [
        ("peft_adapter", roe_fuzzing::peft_adapter as fn(&[u8])),
        ("instances_jsonl", roe_fuzzing::instances_jsonl),
        ("proto_messages", roe_fuzzing::proto_messages),
    ] {
        for f in std::fs::read_dir(seeds.join(target)).unwrap() {
            run(&std::fs::read(f.unwrap().path()).unwrap());
        }
    }
}
