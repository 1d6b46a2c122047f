//! Background compaction on real sled and a real HNSW graph: a library of a few thousand synthetic
//! vectors with a low HNSW threshold. Route must keep answering while a compaction is built
//! (without a deleted expert's instances), writes made meanwhile must survive the swap, the
//! result must equal a freshly built index, and dropping the library mid-compaction must be
//! clean. `hold_compactions` stops a round just before its swap, after its snapshot and
//! build, so that writes are made during the compaction deterministically.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use roe_expert_library::embedding::normalize;
use roe_expert_library::index::Hit;
use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::persist::{IndexLoad, RebuildReason};
use roe_expert_library::retrieval::{Query, RouteOptions, RouteResult};
use roe_expert_library::TextFormat;

mod common;
use common::{config, expert, instance, vector_of, RandomEncoder, DIM};

fn open(dir: &Path) -> (ExpertLibrary, IndexLoad) {
    let (lib, report) = ExpertLibrary::open(dir, Arc::new(RandomEncoder), config(false)).unwrap();
    (lib, report.index)
}

/// Eight experts of 400 instances: 3200 instance vectors, 1600 choice_instance vectors.
fn populate(lib: &ExpertLibrary) {
    for e in 0..8 {
        lib.register(expert(&format!("expert{e}"), 400), false)
            .unwrap();
    }
}

/// Queries that are stored instances of every expert (deleted ones included).
fn route_queries() -> Vec<Query> {
    (0..10)
        .map(|i| Query {
            input: format!("expert{} instance {}", i % 8, 13 * i),
            choices: vec![],
            target: None,
        })
        .collect()
}

fn route(lib: &ExpertLibrary, options: &RouteOptions) -> RouteResult {
    let qs = route_queries();
    let vectors: Vec<Vec<f32>> = qs.iter().map(|q| vector_of(&q.input)).collect();
    lib.route_embedded(&qs, &vectors, options).unwrap()
}

/// No ranked expert and no evidence hit belongs to a deleted expert.
fn assert_without(result: &RouteResult, deleted: &[&str]) {
    for s in &result.ranked {
        assert!(!deleted.contains(&s.expert_id.as_str()), "{s:?} ranked");
    }
    for h in result.evidence.iter().flatten() {
        assert!(!deleted.contains(&h.expert_id.as_str()), "{h:?} retrieved");
    }
}

/// What an exact search sees: per format the sorted live points and the hits of some queries,
/// and exact routes.
#[derive(Debug, PartialEq)]
struct ExactView {
    live: Vec<Vec<u64>>,
    hits: Vec<Vec<Hit>>,
    routes: Vec<RouteResult>,
}

fn exact_view(lib: &ExpertLibrary) -> ExactView {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let queries: Vec<Vec<f32>> = (0..30)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
            normalize(&mut v);
            v
        })
        .collect();
    let (live, hits) = lib.with_state(|s| {
        let mut live = Vec::new();
        let mut hits = Vec::new();
        for f in [TextFormat::Instance, TextFormat::ChoiceInstance] {
            let index = s.vector_index(f);
            let mut points: Vec<u64> = index.live_points().collect();
            points.sort_unstable();
            live.push(points);
            for q in &queries {
                hits.push(index.search_exact(q, 10, &|_| true));
            }
        }
        (live, hits)
    });
    let routes = [
        RouteOptions {
            exact: true,
            ..RouteOptions::elm(TextFormat::Instance)
        },
        RouteOptions {
            exact: true,
            ..RouteOptions::default()
        },
    ]
    .iter()
    .map(|o| route(lib, o))
    .collect();
    ExactView { live, hits, routes }
}

/// The services share one library across threads: the worker must not change that.
#[test]
fn the_library_stays_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ExpertLibrary>();
}

#[test]
fn routing_keeps_answering_during_a_background_compaction_and_writes_survive_the_swap() {
    let tmp = tempfile::tempdir().unwrap();
    let (lib, _) = open(tmp.path());
    populate(&lib);
    assert!(lib.with_state(|s| s.uses_hnsw()));
    let hold = lib.hold_compactions();
    // A quarter of the rows tombstoned: a compaction is due.
    lib.delete("expert0").unwrap();
    assert!(!lib.compaction_running());
    lib.delete("expert1").unwrap();
    assert!(lib.compaction_running());
    let deleted = ["expert0", "expert1"];
    let stop = AtomicBool::new(false);
    let routes = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // Routing, on its own thread, throughout the compaction.
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                for options in [
                    RouteOptions::elm(TextFormat::Instance),
                    RouteOptions::default(),
                ] {
                    assert_without(&route(&lib, &options), &deleted);
                }
                routes.fetch_add(1, Ordering::SeqCst);
            }
        });
        // The round has snapshotted and built the new indexes; it waits to swap them in.
        assert!(hold.wait_until_reached(Duration::from_secs(120)));
        assert!(lib.compaction_running());
        let during = routes.load(Ordering::SeqCst);
        // Writes during the compaction: a new expert, a delete, a new version, more
        // instances (enough rows that the replayed tombstones stay below the ratio).
        lib.register(expert("newcomer", 700), false).unwrap();
        lib.delete("expert3").unwrap();
        lib.register(expert("expert4", 200), true).unwrap();
        lib.add_instances(
            "expert5",
            (400..450).map(|i| instance("expert5", i)).collect(),
        )
        .unwrap();
        // They are visible at once, before the swap.
        let q = vector_of("newcomer instance 7");
        let hit = lib.with_state(|s| {
            s.vector_index(TextFormat::Instance)
                .search(&q, 1, &|_| true)
        });
        assert!((hit[0].score - 1.0).abs() < 1e-5, "{hit:?}");
        let before_swap = exact_view(&lib);
        // Routing kept answering while the round waited.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while routes.load(Ordering::SeqCst) < during + 5 {
            assert!(std::time::Instant::now() < deadline, "routing stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(hold);
        lib.wait_for_compaction();
        assert!(!lib.compaction_running());
        stop.store(true, Ordering::SeqCst);
        assert_eq!(lib.background_compactions(), 1);
        // The swap changed nothing an exact search sees.
        assert_eq!(exact_view(&lib), before_swap);
    });
    assert!(routes.load(Ordering::SeqCst) > 5);
    let deleted = ["expert0", "expert1", "expert3"];
    for options in [
        RouteOptions::elm(TextFormat::Instance),
        RouteOptions::elm(TextFormat::ChoiceInstance),
        RouteOptions::default(),
    ] {
        assert_without(&route(&lib, &options), &deleted);
    }
    // The graphs were rebuilt: only the replayed removals (expert3 and expert4's first
    // version) are tombstones, and the new graph answers for the writes made meanwhile.
    lib.with_state(|s| {
        let index = s.vector_index(TextFormat::Instance);
        assert!(index.uses_hnsw());
        assert_eq!(index.tombstones(), 800);
        assert_eq!(index.len(), 4 * 400 + 700 + 200 + 50);
        let choices = s.vector_index(TextFormat::ChoiceInstance);
        assert_eq!(choices.tombstones(), 400);
        assert_eq!(choices.len(), 4 * 200 + 350 + 100 + 25);
        assert!(!s.needs_compaction());
        for text in [
            "newcomer instance 12",
            "expert5 instance 420",
            "expert4 instance 150",
        ] {
            let hit = index.search(&vector_of(text), 1, &|_| true);
            assert!((hit[0].score - 1.0).abs() < 1e-5, "{text}: {hit:?}");
        }
    });
    let after = exact_view(&lib);
    // The round dumped its indexes before the writes made during it (it dumps before its
    // swap), so that dump is stale now and the index is rebuilt from the store on reopen:
    // a fresh build searches exactly the same.
    drop(lib);
    let (lib, load) = open(tmp.path());
    assert!(
        matches!(load, IndexLoad::Rebuilt(RebuildReason::Stale(_))),
        "{load:?}"
    );
    assert_eq!(exact_view(&lib), after);
}

#[test]
fn a_compaction_without_writes_meanwhile_is_persisted_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let (lib, _) = open(tmp.path());
    populate(&lib);
    let hold = lib.hold_compactions();
    lib.delete("expert6").unwrap();
    lib.delete("expert7").unwrap();
    assert!(hold.wait_until_reached(Duration::from_secs(120)));
    // Dumped before the swap, while private to the worker.
    assert!(tmp.path().join("roe-index/manifest.json").exists());
    // A graceful persist meanwhile has nothing to add: the dump is the current state.
    assert_eq!(lib.persist_index().unwrap(), None);
    drop(hold);
    lib.wait_for_compaction();
    let before = exact_view(&lib);
    let hits = lib.with_state(|s| {
        s.vector_index(TextFormat::Instance)
            .search(&vector_of("expert1 instance 5"), 10, &|_| true)
    });
    drop(lib);
    let (lib, load) = open(tmp.path());
    assert_eq!(load, IndexLoad::Reloaded);
    assert_eq!(exact_view(&lib), before);
    let again = lib.with_state(|s| {
        s.vector_index(TextFormat::Instance)
            .search(&vector_of("expert1 instance 5"), 10, &|_| true)
    });
    assert_eq!(again, hits, "the reloaded graph is the compacted one");
}

#[test]
fn dropping_the_library_during_a_compaction_cancels_it_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(tmp.path());
        populate(&lib);
        let hold = lib.hold_compactions();
        lib.delete("expert0").unwrap();
        lib.delete("expert1").unwrap();
        assert!(hold.wait_until_reached(Duration::from_secs(120)));
        lib.register(expert("late", 100), false).unwrap();
        // Dropped with the round waiting to swap (the hold outlives the library).
        drop(lib);
        drop(hold);
    }
    {
        // And dropped right after asking for a round, whatever it was doing.
        let (lib, _) = open(tmp.path());
        assert_eq!(lib.len(), 7);
        lib.delete("expert2").unwrap();
        lib.delete("expert3").unwrap();
        drop(lib);
    }
    let (lib, _) = open(tmp.path());
    assert_eq!(lib.len(), 5);
    assert!(lib.get("late").is_ok() && lib.get("expert3").is_err());
    let q = vector_of("late instance 42");
    let hit = lib.with_state(|s| {
        s.vector_index(TextFormat::Instance)
            .search(&q, 1, &|_| true)
    });
    assert!((hit[0].score - 1.0).abs() < 1e-5, "{hit:?}");
    assert_eq!(lib.with_state(|s| s.num_vectors()), 4 * 400 + 100);
}
