//! Compaction of the sled store at open: deleted and replaced experts' bytes are given back,
//! what survives is intact, new point ids never collide with old ones, and every state a
//! crash (or a full disk) can leave in the middle of a compaction recovers to one complete
//! store.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use common::BagOfWords;
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, NewExpert, OpenReport};
use roe_expert_library::library_store::{LibraryStore, SnapshotItem};
use roe_expert_library::retrieval::{Query, RouteOptions};
use roe_expert_library::store::{store_disk_bytes, CompactFaults, SledStore};
use roe_expert_library::{Instance, PeftAdapter};

fn asset(kind: &str) -> PeftAdapter {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/experts/smollm2-135m")
        .join(kind)
        .join("sms_spam");
    PeftAdapter::from_dir(dir).unwrap()
}

fn lora() -> PeftAdapter {
    asset("lora")
}

fn prompt() -> PeftAdapter {
    asset("prompt")
}

/// An expert whose instances are about `word` (routing finds it by that word).
fn expert(id: &str, word: &str, n: usize, adapter: PeftAdapter) -> NewExpert {
    NewExpert {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        backbone: None,
        adapter,
        instances: (0..n)
            .map(|i| Instance {
                input: format!("{word} {word} story number{i}"),
                target: Some(word.to_string()),
                choices: vec![],
            })
            .collect(),
    }
}

/// [`expert`] with the LoRA and, in each instance, about 316 KB of answer choices and target:
/// three instances hold about what the LoRA's weights held when adapters were sled values.
/// Adapters are files now, removed with their expert, so the sled garbage these tests
/// compact comes from records this large (blob-sized values, as the adapters were). The
/// choices repeat the expert's word, so that routing by it still finds the expert.
fn heavy(id: &str, word: &str, n: usize) -> NewExpert {
    let mut e = expert(id, word, n, lora());
    let words = |bytes: usize| format!("{word} ").repeat(bytes / (word.len() + 1));
    for inst in &mut e.instances {
        inst.target = Some(words(60_000));
        inst.choices = (0..64).map(|c| format!("{c} {}", words(3_990))).collect();
    }
    e
}

fn q(text: &str) -> Query {
    Query {
        input: text.into(),
        choices: vec![],
        target: None,
    }
}

fn config(min_waste: u64) -> LibraryConfig {
    LibraryConfig {
        compact_store_min_waste_bytes: min_waste,
        ..LibraryConfig::default()
    }
}

fn open_with(dir: &Path, config: LibraryConfig) -> (ExpertLibrary, OpenReport) {
    ExpertLibrary::open(dir, Arc::new(BagOfWords::new()), config).unwrap()
}

fn open(dir: &Path) -> (ExpertLibrary, OpenReport) {
    open_with(dir, LibraryConfig::default())
}

/// Bytes of every file under `p` (the whole library directory, index dump included).
fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Names in the library directory that a compaction uses and must not leave behind.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("roe-store.") && n != "roe-store.lock" && n != "roe-store.copy-ratio"
        })
        .collect()
}

/// Every point id in the store, checked unique.
fn point_ids(dir: &Path) -> Vec<u64> {
    let store = SledStore::open(dir).unwrap();
    let mut ids: Vec<u64> = Vec::new();
    store
        .snapshot(&mut |item| {
            if let SnapshotItem::Instance(si) = item {
                ids.push(si.point_id);
            }
            Ok(())
        })
        .unwrap();
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "point ids collide: {ids:?}");
    ids
}

/// The survivor of `wasteful_library`: its instances, adapter and routing.
fn check_survivor(lib: &ExpertLibrary) {
    let meta = lib.get("keep").unwrap();
    assert_eq!((meta.version, meta.num_instances), (3, 5));
    assert_eq!(lib.instances("keep").unwrap().len(), 5);
    assert_eq!(lib.adapter("keep").unwrap(), lora());
    let r = lib
        .route(&[q("keepword keepword story")], &RouteOptions::default())
        .unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "keep");
}

/// A library where `ids` LoRA experts were each written in 3 versions, then every one but
/// "keep" (written after a reopen, so its point ids are past sled's first id range) was
/// deleted: nearly all of its files are garbage.
fn wasteful_library(dir: &Path, ids: usize) {
    {
        let (lib, _) = open(dir);
        lib.register(expert("early", "earlyword", 3, prompt()), false)
            .unwrap();
    }
    let (lib, _) = open(dir);
    for version in 0..3 {
        lib.register(heavy("keep", "keepword", 5), version > 0)
            .unwrap();
        for i in 0..ids {
            lib.register(
                heavy(&format!("big{i:02}"), &format!("bigword{i}"), 3),
                version > 0,
            )
            .unwrap();
        }
    }
    lib.delete("early").unwrap();
    for i in 0..ids {
        lib.delete(&format!("big{i:02}")).unwrap();
    }
}

/// A fresh library holding what `wasteful_library` keeps: the baseline of a compaction.
fn fresh_survivor_library(dir: &Path) {
    let (lib, _) = open(dir);
    for version in 0..3 {
        lib.register(heavy("keep", "keepword", 5), version > 0)
            .unwrap();
    }
}

#[test]
fn deleted_experts_bytes_are_freed_at_reopen_and_new_ids_stay_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, fresh, empty) = (
        tmp.path().join("lib"),
        tmp.path().join("fresh"),
        tmp.path().join("empty"),
    );
    drop(open(&empty));
    fresh_survivor_library(&fresh);
    wasteful_library(&dir, 30);
    let before = dir_size(&dir);
    let survivor_ids = point_ids(&dir);
    assert_eq!(survivor_ids.len(), 5);

    let (lib, report) = open(&dir);
    let compacted = report.store_compaction.clone().expect("compacted at open");
    let after = dir_size(&dir);
    let (empty_bytes, fresh_bytes) = (dir_size(&empty), dir_size(&fresh));
    eprintln!(
        "library dir: {:.1} MiB before (store {:.1} MiB, live {:.2} MiB), {:.1} MiB after \
         compaction (store {:.1} MiB, {:.2} s); a fresh library with the survivor {:.1} MiB, \
         an empty library {:.2} MiB",
        mib(before),
        mib(compacted.disk_bytes_before),
        mib(compacted.live_bytes),
        mib(after),
        mib(compacted.disk_bytes_after),
        compacted.seconds,
        mib(fresh_bytes),
        mib(empty_bytes),
    );
    assert!(before > 30 << 20, "{before}");
    assert!(
        after <= fresh_bytes + (3 << 20),
        "{after} bytes after compaction, {fresh_bytes} in a fresh library"
    );
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    check_survivor(&lib);
    assert_eq!(lib.len(), 1);

    // New writes after the compaction get point ids of their own.
    lib.register(expert("new1", "freshword", 4, prompt()), false)
        .unwrap();
    lib.register(heavy("new2", "otherword", 6), false).unwrap();
    for (query, id, n) in [
        ("freshword freshword story", "new1", 4),
        ("otherword otherword story", "new2", 6),
        ("keepword keepword story", "keep", 5),
    ] {
        let r = lib.route(&[q(query)], &RouteOptions::default()).unwrap();
        assert_eq!(r.winner().unwrap().expert_id, id, "{query}");
        assert_eq!(lib.instances(id).unwrap().len(), n);
    }
    drop(lib);
    let ids = point_ids(&dir);
    assert_eq!(ids.len(), 15);
    let old_max = *survivor_ids.iter().max().unwrap();
    assert!(
        ids.iter()
            .filter(|id| !survivor_ids.contains(id))
            .all(|&id| id > old_max),
        "{ids:?} after {survivor_ids:?}"
    );

    // Reopened: nothing to compact, everything routes as before, writes go on.
    let (lib, report) = open(&dir);
    assert!(report.store_compaction.is_none());
    check_survivor(&lib);
    assert_eq!(lib.instances("new2").unwrap().len(), 6);
    lib.register(expert("new3", "thirdword", 2, prompt()), false)
        .unwrap();
    let r = lib
        .route(&[q("thirdword thirdword story")], &RouteOptions::default())
        .unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "new3");
    drop(lib);
    assert_eq!(point_ids(&dir).len(), 17);
}

#[test]
fn a_library_emptied_of_everything_shrinks_to_an_empty_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, empty) = (tmp.path().join("lib"), tmp.path().join("empty"));
    drop(open(&empty));
    {
        let (lib, _) = open(&dir);
        for version in 0..2 {
            for i in 0..20 {
                lib.register(
                    heavy(&format!("big{i:02}"), &format!("word{i}"), 2),
                    version > 0,
                )
                .unwrap();
            }
        }
        for i in 0..20 {
            lib.delete(&format!("big{i:02}")).unwrap();
        }
    }
    let before = dir_size(&dir);
    let (lib, report) = open(&dir);
    let compacted = report.store_compaction.expect("compacted at open");
    let after = dir_size(&dir);
    let empty_bytes = dir_size(&empty);
    eprintln!(
        "everything deleted: {:.1} MiB before (store {:.1} MiB), {:.2} MiB after one \
         compaction (store {:.2} MiB, {:.2} s), an empty library {:.2} MiB (store {:.2} MiB)",
        mib(before),
        mib(compacted.disk_bytes_before),
        mib(after),
        mib(compacted.disk_bytes_after),
        compacted.seconds,
        mib(empty_bytes),
        mib(store_disk_bytes(&empty).unwrap()),
    );
    assert!(lib.is_empty());
    assert!(
        after <= empty_bytes + (10 << 20),
        "{after} vs {empty_bytes}"
    );
    assert!(after <= empty_bytes + (2 << 20), "{after} vs {empty_bytes}");
    lib.register(expert("a", "aword", 2, prompt()), false)
        .unwrap();
    drop(lib);
    let (lib, _) = open(&dir);
    assert_eq!(lib.instances("a").unwrap().len(), 2);
}

#[test]
fn a_library_with_little_waste_is_not_compacted() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(tmp.path());
        // Half the experts deleted: still far more than half of the files is garbage (sled
        // writes about three times the bytes it keeps), however it happens to have laid out
        // and retired its blobs. Half of them kept: the live bytes stay well above what sled's
        // retiring of blobs varies by (up to about 16 MiB), so that the little waste below
        // stays under half of the files.
        for i in 0..60 {
            lib.register(heavy(&format!("e{i}"), &format!("w{i}"), 3), false)
                .unwrap();
        }
        for i in 30..60 {
            lib.delete(&format!("e{i}")).unwrap();
        }
    }
    let disk0 = store_disk_bytes(tmp.path()).unwrap();
    let (lib, report) = open(tmp.path());
    let compacted = report
        .store_compaction
        .unwrap_or_else(|| panic!("half deleted: compacted; disk {disk0}"));
    eprintln!(
        "30 experts of 60 deleted: store {:.1} MiB, live {:.1} MiB, {:.1} MiB compacted",
        mib(compacted.disk_bytes_before),
        mib(compacted.live_bytes),
        mib(compacted.disk_bytes_after)
    );
    // How close the copy comes to the live bytes depends on when sled retires its blob
    // files (a background matter); at the least it gives back most of the garbage.
    assert!(
        compacted.disk_bytes_after < compacted.disk_bytes_before / 2,
        "{compacted:?}"
    );
    // Some garbage since, far from half of the files (a light new version: rewriting
    // heavy records makes sled rewrite whole leaves of blobs, garbage of varying size).
    lib.register(expert("e0", "w0", 3, lora()), true).unwrap();
    lib.delete("e1").unwrap();
    drop(lib);
    let disk = store_disk_bytes(tmp.path()).unwrap();
    let (lib, report) = open(tmp.path());
    eprintln!("little waste: store {:.1} MiB, not compacted", mib(disk));
    assert!(disk > 16 << 20, "{disk}");
    assert!(report.store_compaction.is_none(), "{report:?}");
    assert_eq!(lib.len(), 29);
    drop(lib);
    // Nor is a store below the minimum waste, however much of it is garbage.
    let small = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(small.path());
        for i in 0..4 {
            lib.register(heavy(&format!("e{i}"), "w", 2), false)
                .unwrap();
            lib.delete(&format!("e{i}")).unwrap();
        }
    }
    let (_, report) = open(small.path());
    assert!(report.store_compaction.is_none(), "{report:?}");
}

/// Point ids survive the copy: a persisted HNSW graph still matches the store and reloads.
#[test]
fn the_index_dump_still_matches_after_a_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let config = || LibraryConfig {
        index: IndexConfig {
            hnsw_threshold: 100,
            ..IndexConfig::default()
        },
        ..config(1 << 20)
    };
    {
        let (lib, _) = open_with(tmp.path(), config());
        lib.register(expert("keep", "keepword", 150, lora()), false)
            .unwrap();
        for i in 0..12 {
            lib.register(heavy(&format!("gone{i}"), "goneword", 2), false)
                .unwrap();
            lib.delete(&format!("gone{i}")).unwrap();
        }
        lib.wait_for_compaction();
        lib.persist_index().unwrap();
    }
    let (lib, report) = open_with(tmp.path(), config());
    assert!(report.store_compaction.is_some());
    assert!(report.index.is_reloaded(), "{:?}", report.index);
    assert!(lib.with_state(|s| s.uses_hnsw()));
    let r = lib
        .route(&[q("keepword keepword story")], &RouteOptions::default())
        .unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "keep");
}

/// Many small records: a fresh sled copy takes two to three times their bytes, which the
/// decision learns from the first compaction instead of copying again at every open.
#[test]
fn a_store_of_many_instances_is_not_copied_again_and_again() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (lib, _) = open(tmp.path());
        for i in 0..20 {
            lib.register(
                expert(&format!("e{i:02}"), &format!("w{i}"), 500, prompt()),
                false,
            )
            .unwrap();
        }
        for i in 0..14 {
            lib.delete(&format!("e{i:02}")).unwrap();
        }
    }
    let mut compactions = vec![];
    for _ in 0..3 {
        let disk = store_disk_bytes(tmp.path()).unwrap();
        let (lib, report) = open_with(tmp.path(), config(1 << 20));
        eprintln!(
            "many instances: store {:.1} MiB, {:?}",
            mib(disk),
            report.store_compaction
        );
        assert_eq!(lib.len(), 6);
        assert_eq!(lib.instances("e19").unwrap().len(), 500);
        compactions.push(report.store_compaction.is_some());
    }
    assert_eq!(compactions, [true, false, false]);
    // What a fresh copy takes is recorded, so that the next opens do not copy to find out.
    assert!(tmp.path().join("roe-store.copy-ratio").exists());
}

#[test]
fn compaction_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    wasteful_library(tmp.path(), 8);
    let before = store_disk_bytes(tmp.path()).unwrap();
    let (lib, report) = open_with(tmp.path(), config(0));
    assert!(report.store_compaction.is_none());
    check_survivor(&lib);
    drop(lib);
    assert!(store_disk_bytes(tmp.path()).unwrap() >= before);
    // A small minimum compacts the same library.
    let (lib, report) = open_with(tmp.path(), config(1 << 20));
    assert!(report.store_compaction.is_some());
    check_survivor(&lib);
}

#[test]
fn a_failed_copy_leaves_the_store_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    wasteful_library(tmp.path(), 8);
    let before = store_disk_bytes(tmp.path()).unwrap();
    let faults = CompactFaults {
        fail_copy_after_bytes: Some(500_000),
        ..CompactFaults::default()
    };
    // Opening does not fail: the partial copy is removed, the old store stays.
    assert!(SledStore::compact_with_faults(tmp.path(), 1 << 20, faults)
        .unwrap()
        .is_none());
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
    // Opening the store to copy it changes sled's files a little, no more.
    assert!(store_disk_bytes(tmp.path()).unwrap() <= before + (1 << 20));
    let (lib, _) = open_with(tmp.path(), config(0));
    check_survivor(&lib);
    drop(lib);
    // The next compaction that can copy succeeds.
    let (lib, report) = open_with(tmp.path(), config(1 << 20));
    assert!(report.store_compaction.is_some());
    check_survivor(&lib);
}

/// Stops a compaction dead before each of its steps in turn, as a crash there would, and
/// opens the library from what was left: one complete store every time.
#[test]
fn a_compaction_crashed_at_any_step_recovers_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    wasteful_library(&template, 8);
    let survivor_ids = point_ids(&template);
    let mut step = 0;
    loop {
        let dir = tmp.path().join(format!("crash{step}"));
        copy_dir(&template, &dir);
        let faults = CompactFaults {
            crash_before_step: Some(step),
            ..CompactFaults::default()
        };
        let crashed = match SledStore::compact_with_faults(&dir, 1 << 20, faults) {
            Err(e) => {
                assert!(e.to_string().contains("simulated crash"), "{e}");
                eprintln!("crash before step {step}: {e}; left {:?}", leftovers(&dir));
                true
            }
            Ok(report) => {
                assert!(report.is_some());
                false
            }
        };
        // Recovery alone (compaction off), then a library with compaction on.
        let (lib, _) = open_with(&dir, config(0));
        assert!(
            leftovers(&dir).is_empty(),
            "step {step}: {:?}",
            leftovers(&dir)
        );
        check_survivor(&lib);
        assert_eq!(lib.len(), 1, "step {step}");
        lib.register(expert("after", "afterword", 3, prompt()), false)
            .unwrap();
        drop(lib);
        let ids = point_ids(&dir);
        assert_eq!(ids.len(), 8, "step {step}");
        assert!(survivor_ids.iter().all(|id| ids.contains(id)));
        let (lib, _) = open_with(&dir, config(1 << 20));
        check_survivor(&lib);
        assert_eq!(lib.instances("after").unwrap().len(), 3);
        drop(lib);
        std::fs::remove_dir_all(&dir).unwrap();
        if !crashed {
            break;
        }
        step += 1;
        assert!(step < 100, "the compaction never finished");
    }
    eprintln!("{step} crash points recovered");
    assert!(step >= 10, "{step}");
}

/// Moves sled's entries of the library in `dir` into `dir/to` (made by hand, as a
/// compaction would leave them).
fn move_store(dir: &Path, to: &str) {
    let target = dir.join(to);
    std::fs::create_dir_all(&target).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "conf" | "db" | "blobs") || name.starts_with("snap.") {
            std::fs::rename(dir.join(&name), target.join(&name)).unwrap();
        }
    }
}

/// A stray partial copy: a sled store with only some of the data.
fn stray_copy(dir: &Path) {
    let db = sled::open(dir.join("roe-store.compacting")).unwrap();
    db.insert(b"encoder", b"bow").unwrap();
    db.open_tree("experts")
        .unwrap()
        .insert(b"half", b"written")
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn leftovers_made_by_hand_recover_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    wasteful_library(&template, 2);
    type Leftover = fn(&Path);
    let cases: [(&str, Leftover); 5] = [
        ("a stray compacting copy", |d| stray_copy(d)),
        ("a lone old store, the main one missing", |d| {
            move_store(d, "roe-store.old")
        }),
        ("both", |d| {
            stray_copy(d);
            move_store(d, "roe-store.old");
        }),
        ("a lone old store beside the main one", |d| {
            copy_dir(&d.join("blobs"), &d.join("roe-store.old/blobs"));
            std::fs::write(d.join("roe-store.old/db"), b"stale").unwrap();
        }),
        ("a complete copy, the old store moved out", |d| {
            let copy = d.with_extension("copy");
            copy_dir(d, &copy);
            move_store(&copy, "store");
            std::fs::rename(copy.join("store"), d.join("roe-store.compacted")).unwrap();
            move_store(d, "roe-store.old");
        }),
    ];
    for (i, (what, make)) in cases.iter().enumerate() {
        for min_waste in [0, 1 << 20] {
            let dir = tmp.path().join(format!("case{i}-{min_waste}"));
            copy_dir(&template, &dir);
            make(&dir);
            let (lib, _) = open_with(&dir, config(min_waste));
            assert!(leftovers(&dir).is_empty(), "{what}: {:?}", leftovers(&dir));
            check_survivor(&lib);
            assert_eq!(lib.len(), 1, "{what}");
            lib.register(expert("after", "afterword", 3, prompt()), false)
                .unwrap();
            drop(lib);
            assert_eq!(point_ids(&dir).len(), 8, "{what}");
        }
    }
}
