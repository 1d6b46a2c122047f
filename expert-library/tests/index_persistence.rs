//! The persisted index (`roe-index/` next to sled's files) on real sled and a real HNSW graph: a
//! library of a few thousand synthetic vectors with a low HNSW threshold, so both text
//! formats' indexes are graphs. Reopening after `persist_index` must reload, not rebuild, and
//! search exactly as before; stale, corrupt, incompatible or missing dumps must be rebuilt.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use roe_expert_library::embedding::normalize;
use roe_expert_library::engine::IndexEngine;
use roe_expert_library::index::{Hit, IndexConfig};
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, OpenReport};
use roe_expert_library::persist::{IndexLoad, RebuildReason};
use roe_expert_library::retrieval::{Query, RouteOptions, RouteResult, Strategy};
use roe_expert_library::{Instance, TextFormat};

mod common;
use common::{config, expert, vector_of, RandomEncoder, DIM};

fn open_with(dir: &Path, config: LibraryConfig) -> (ExpertLibrary, OpenReport) {
    ExpertLibrary::open(dir, Arc::new(RandomEncoder), config).unwrap()
}

fn config_on(persist_on_drop: bool, engine: IndexEngine) -> LibraryConfig {
    let mut c = config(persist_on_drop);
    c.index.engine = engine;
    c
}

fn open(dir: &Path, persist_on_drop: bool, engine: IndexEngine) -> (ExpertLibrary, OpenReport) {
    open_with(dir, config_on(persist_on_drop, engine))
}

/// Six experts of 500 instances: 3000 instance vectors, 1500 choice_instance vectors.
fn populate(lib: &ExpertLibrary) {
    for e in 0..6 {
        lib.register(expert(&format!("expert{e}"), 500), false)
            .unwrap();
    }
}

fn queries() -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    (0..40)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
            normalize(&mut v);
            v
        })
        .collect()
}

/// Everything a search or a route returns, for both formats.
#[derive(Debug, PartialEq)]
struct Answers {
    hits: Vec<Vec<Hit>>,
    routes: Vec<RouteResult>,
}

fn answers(lib: &ExpertLibrary) -> Answers {
    let qs = queries();
    let hits = lib.with_state(|s| {
        let mut out = Vec::new();
        for f in [TextFormat::Instance, TextFormat::ChoiceInstance] {
            assert!(s.vector_index(f).uses_hnsw(), "{f:?} index has no graph");
            for q in &qs {
                out.push(s.vector_index(f).search(q, 10, &|_| true));
                out.push(s.vector_index(f).search(q, 5, &|p| p % 2 == 1));
            }
        }
        out
    });
    let texts: Vec<Query> = (0..8)
        .map(|i| Query {
            input: format!("expert{} instance {}", i % 6, 7 * i),
            choices: vec![],
            target: None,
        })
        .collect();
    let vectors: Vec<Vec<f32>> = texts.iter().map(|q| vector_of(&q.input)).collect();
    let routes = [
        RouteOptions::elm(TextFormat::Instance),
        RouteOptions::elm(TextFormat::ChoiceInstance),
        RouteOptions {
            strategy: Strategy::Hybrid,
            ..Default::default()
        },
    ]
    .iter()
    .map(|o| lib.route_embedded(&texts, &vectors, o).unwrap())
    .collect();
    Answers { hits, routes }
}

fn index_dir(dir: &Path) -> PathBuf {
    dir.join("roe-index")
}

/// The dump's file ending in `suffix`.
fn dump_file(dir: &Path, suffix: &str) -> PathBuf {
    std::fs::read_dir(index_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("instance.") && name.ends_with(suffix)
        })
        .unwrap_or_else(|| panic!("no instance *{suffix} in the dump"))
}

fn truncate(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// A stored vector must find itself: the rebuilt or reloaded index is usable.
fn assert_finds_itself(lib: &ExpertLibrary) {
    let q = vector_of("expert1 instance 42");
    let hit = lib.with_state(|s| {
        s.vector_index(TextFormat::Instance)
            .search(&q, 1, &|_| true)
    });
    assert!((hit[0].score - 1.0).abs() < 1e-5, "{hit:?}");
}

#[test]
fn reopening_after_persist_reloads_the_graphs_and_searches_identically() {
    for engine in IndexEngine::ALL {
        reopening_after_persist_reloads_the_graphs_and_searches_identically_on(engine);
    }
}

fn reopening_after_persist_reloads_the_graphs_and_searches_identically_on(engine: IndexEngine) {
    let tmp = tempfile::tempdir().unwrap();
    let before = {
        let (lib, report) = open(tmp.path(), false, engine);
        assert_eq!(report.index, IndexLoad::Rebuilt(RebuildReason::Missing));
        populate(&lib);
        // Tombstones (1/6 of the rows, below the compaction ratio) go into the dump.
        lib.delete("expert3").unwrap();
        let report = lib.persist_index().unwrap().expect("the index had changed");
        assert_eq!(report.graphs, 2);
        assert!(report.bytes > 0);
        // Unchanged since: nothing to write.
        assert_eq!(lib.persist_index().unwrap(), None);
        answers(&lib)
    };
    let (lib, report) = open(tmp.path(), true, engine);
    assert_eq!(report.index, IndexLoad::Reloaded);
    assert_eq!((report.experts, report.vectors), (5, 2500));
    assert_eq!(answers(&lib), before);
    assert!(lib
        .with_state(|s| s.vector_index(TextFormat::Instance).search(
            &vector_of("expert3 instance 10"),
            10,
            &|_| true
        ))
        .iter()
        .all(|h| h.score < 0.999));
    // The reloaded graph keeps taking writes; dropping persists them (persist_on_drop).
    lib.register(expert("late", 300), false).unwrap();
    lib.delete("expert0").unwrap();
    // That left a third of the rows tombstoned: a background compaction swaps a new graph in.
    assert!(lib.compaction_running());
    lib.wait_for_compaction();
    assert_eq!(lib.background_compactions(), 1);
    let late = vector_of("late instance 17");
    let found = |lib: &ExpertLibrary| {
        lib.with_state(|s| {
            s.vector_index(TextFormat::Instance)
                .search(&late, 1, &|_| true)
        })
    };
    let hit = found(&lib);
    assert!((hit[0].score - 1.0).abs() < 1e-5);
    let after = answers(&lib);
    drop(lib);
    let (lib, report) = open(tmp.path(), false, engine);
    assert_eq!(report.index, IndexLoad::Reloaded);
    assert_eq!(report.vectors, 2300);
    assert_eq!(found(&lib), hit);
    assert_eq!(answers(&lib), after);
}

#[test]
fn a_dump_made_stale_by_an_insert_or_a_delete_is_rebuilt() {
    for engine in IndexEngine::ALL {
        a_dump_made_stale_by_an_insert_or_a_delete_is_rebuilt_on(engine);
    }
}

fn a_dump_made_stale_by_an_insert_or_a_delete_is_rebuilt_on(engine: IndexEngine) {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(tmp.path(), false, engine);
        populate(&lib);
        lib.persist_index().unwrap().unwrap();
        // Written after the dump, and the process ends without persisting (a crash).
        lib.add_instances(
            "expert2",
            vec![Instance {
                input: "one more".into(),
                target: None,
                choices: vec![],
            }],
        )
        .unwrap();
    }
    let (lib, report) = open(tmp.path(), false, engine);
    assert!(
        matches!(report.index, IndexLoad::Rebuilt(RebuildReason::Stale(_))),
        "{:?}",
        report.index
    );
    assert_eq!(report.vectors, 3001);
    assert_finds_itself(&lib);
    lib.persist_index().unwrap().unwrap();
    lib.delete("expert5").unwrap();
    drop(lib);
    let (lib, report) = open(tmp.path(), false, engine);
    assert!(
        matches!(report.index, IndexLoad::Rebuilt(RebuildReason::Stale(_))),
        "{:?}",
        report.index
    );
    assert_eq!(report.vectors, 2501);
    // A new version replaces the instances with as many new ones: same count, other points.
    lib.persist_index().unwrap().unwrap();
    lib.register(expert("expert4", 500), true).unwrap();
    drop(lib);
    let (_, report) = open(tmp.path(), false, engine);
    assert!(
        matches!(&report.index, IndexLoad::Rebuilt(RebuildReason::Stale(m)) if m.contains("different")),
        "{:?}",
        report.index
    );
}

#[test]
fn corrupt_or_incompatible_dumps_are_rebuilt_without_failing() {
    for engine in IndexEngine::ALL {
        corrupt_or_incompatible_dumps_are_rebuilt_without_failing_on(engine);
    }
}

fn corrupt_or_incompatible_dumps_are_rebuilt_without_failing_on(engine: IndexEngine) {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(tmp.path(), false, engine);
        populate(&lib);
        lib.persist_index().unwrap().unwrap();
    }
    type Damage = Box<dyn Fn(&Path)>;
    // Every file of the engine's graph, and the row table.
    let graph_files: Vec<&'static str> = match engine {
        IndexEngine::Graph => vec![".hnsw"],
        IndexEngine::HnswRs => vec![".hnsw.graph", ".hnsw.data", ".strays"],
    };
    let mut cases: Vec<(&str, Damage)> = Vec::new();
    for suffix in graph_files {
        cases.push((
            "truncated graph",
            Box::new(move |d| truncate(&dump_file(d, suffix))),
        ));
        cases.push((
            "flipped byte in graph",
            Box::new(move |d| flip_byte(&dump_file(d, suffix))),
        ));
        cases.push((
            "missing graph",
            Box::new(move |d| std::fs::remove_file(dump_file(d, suffix)).unwrap()),
        ));
    }
    let more: Vec<(&str, Damage)> = vec![
        (
            "truncated rows",
            Box::new(|d| truncate(&dump_file(d, ".rows"))),
        ),
        (
            "garbage manifest",
            Box::new(|d| {
                std::fs::write(index_dir(d).join("manifest.json"), b"\x00\xffnot json").unwrap()
            }),
        ),
        (
            "truncated manifest",
            Box::new(|d| truncate(&index_dir(d).join("manifest.json"))),
        ),
        (
            "manifest from another format version",
            Box::new(|d| {
                let p = index_dir(d).join("manifest.json");
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                m["format_version"] = 999.into();
                std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
            }),
        ),
    ];
    cases.extend(more);
    for (what, damage) in cases {
        damage(tmp.path());
        let (lib, report) = open(tmp.path(), false, engine);
        match (&report.index, what) {
            (
                IndexLoad::Rebuilt(RebuildReason::Incompatible(_)),
                "manifest from another format version",
            ) => {}
            (IndexLoad::Rebuilt(RebuildReason::Corrupt(_)), w)
                if w != "manifest from another format version" => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(report.vectors, 3000, "{what}");
        assert_finds_itself(&lib);
        // The rebuilt index is persisted afresh for the next case.
        lib.persist_index().unwrap().unwrap();
    }
    // Other graph settings than the dump was built with.
    let other = LibraryConfig {
        index: IndexConfig {
            max_connections: 8,
            ..config_on(false, engine).index
        },
        ..config_on(false, engine)
    };
    let (lib, report) = open_with(tmp.path(), other);
    assert!(
        matches!(
            report.index,
            IndexLoad::Rebuilt(RebuildReason::Incompatible(_))
        ),
        "{:?}",
        report.index
    );
    assert_finds_itself(&lib);
    drop(lib);
    // A dump of the other engine is rebuilt, not misread.
    let other_engine = match engine {
        IndexEngine::Graph => IndexEngine::HnswRs,
        IndexEngine::HnswRs => IndexEngine::Graph,
    };
    let (lib, report) = open(tmp.path(), false, other_engine);
    assert!(
        matches!(
            report.index,
            IndexLoad::Rebuilt(RebuildReason::Incompatible(_))
        ),
        "{:?}",
        report.index
    );
    assert_finds_itself(&lib);
    drop(lib);
    // The dump of the last case is intact and still matches the first settings.
    let (_, report) = open(tmp.path(), false, engine);
    assert_eq!(report.index, IndexLoad::Reloaded);
}

#[test]
fn an_index_never_persisted_is_rebuilt_and_compaction_persists() {
    for engine in IndexEngine::ALL {
        an_index_never_persisted_is_rebuilt_and_compaction_persists_on(engine);
    }
}

fn an_index_never_persisted_is_rebuilt_and_compaction_persists_on(engine: IndexEngine) {
    let tmp = tempfile::tempdir().unwrap();
    {
        // A crash: the process ends without persisting.
        let (lib, _) = open(tmp.path(), false, engine);
        populate(&lib);
    }
    assert!(!index_dir(tmp.path()).exists());
    let (lib, report) = open(tmp.path(), false, engine);
    assert_eq!(report.index, IndexLoad::Rebuilt(RebuildReason::Missing));
    assert_eq!(report.vectors, 3000);
    assert_finds_itself(&lib);
    // Deleting a third compacts (a new graph) in the background and persists it there,
    // without a shutdown.
    lib.delete("expert0").unwrap();
    assert!(!lib.compaction_running());
    assert!(!index_dir(tmp.path()).exists());
    lib.delete("expert2").unwrap();
    lib.wait_for_compaction();
    assert_eq!(lib.background_compactions(), 1);
    assert!(index_dir(tmp.path()).join("manifest.json").exists());
    // The dump is the current state: nothing left to persist.
    assert_eq!(lib.persist_index().unwrap(), None);
    lib.with_state(|s| {
        assert_eq!(s.vector_index(TextFormat::Instance).tombstones(), 0);
        assert_eq!(s.vector_index(TextFormat::ChoiceInstance).tombstones(), 0);
    });
    let before = answers(&lib);
    drop(lib);
    let (lib, report) = open(tmp.path(), false, engine);
    assert_eq!(report.index, IndexLoad::Reloaded);
    assert_eq!(answers(&lib), before);
    drop(lib);
    // A library too small for a graph keeps nothing on disk.
    let small = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(small.path(), true, engine);
        lib.register(expert("tiny", 20), false).unwrap();
        let report = lib.persist_index().unwrap().unwrap();
        assert_eq!((report.graphs, report.bytes), (0, 0));
    }
    assert!(!index_dir(small.path()).exists());
    let (_, report) = open(small.path(), true, engine);
    assert_eq!(report.index, IndexLoad::Rebuilt(RebuildReason::Missing));
}
