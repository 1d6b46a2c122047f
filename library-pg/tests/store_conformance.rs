//! One suite for both of the library's stores: every `check_*` below runs through
//! `&dyn LibraryStore` against sled (`SledStore`, a temporary directory) and PostgreSQL
//! (`PgStore`, a database of its own per test, made and dropped by
//! `roe_library_pg::testing::TestDatabase` on the server at `ROE_TEST_DATABASE_URL`, which
//! `scripts/test.sh` provides). `conformance_tests!` instantiates each check as a test in
//! `mod sled` and in `mod pg`, so a behaviour the library relies on cannot hold in one store
//! and not in the other. `mod pg_only` holds what only a shared store has: writers racing
//! each other, quotas checked inside the transaction, connection failures, migrations.
//!
//! Needs the crate's `testing` feature (the `TestDatabase` helper).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use roe_expert_library::expert::AdapterSummary;
use roe_expert_library::library_store::{
    Change, ChangeOp, Expect, LibraryStore, Quota, SnapshotItem, Written,
};
use roe_expert_library::store::{SledStore, StoredInstance};
use roe_expert_library::{
    ExpertKind, ExpertMeta, Instance, LibraryError, PeftAdapter, Result, TrainingRecord,
};
use roe_library_pg::testing::TestDatabase;
use roe_library_pg::{PgConfig, PgStore};

// ---- Fixtures -------------------------------------------------------------------------------

/// A store over resources of its own, which it can close and open again.
trait Fixture {
    fn store(&self) -> &dyn LibraryStore;
    /// Drops the store and opens it again over the same data.
    fn reopen(&mut self);
}

struct SledFixture {
    // Dropped before the directory it lives in.
    store: Option<SledStore>,
    dir: tempfile::TempDir,
}

impl SledFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        Self {
            store: Some(store),
            dir,
        }
    }
}

impl Fixture for SledFixture {
    fn store(&self) -> &dyn LibraryStore {
        self.store.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(SledStore::open(self.dir.path()).unwrap());
    }
}

struct PgFixture {
    // Dropped (its connections closed) before the database is.
    store: Option<PgStore>,
    db: TestDatabase,
}

impl PgFixture {
    fn new() -> Self {
        let db = TestDatabase::create();
        let store = connect(&db.url);
        Self {
            store: Some(store),
            db,
        }
    }
}

impl Fixture for PgFixture {
    fn store(&self) -> &dyn LibraryStore {
        self.store.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(connect(&self.db.url));
    }
}

fn pg_config(url: &str) -> PgConfig {
    PgConfig {
        url: url.to_string(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    }
}

#[track_caller]
fn connect(url: &str) -> PgStore {
    PgStore::connect(&pg_config(url))
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"))
}

// ---- What is stored -------------------------------------------------------------------------

/// An expert's metadata, agreeing with [`adapter_of`] it.
fn meta(id: &str, version: u64, num_instances: usize) -> ExpertMeta {
    seal(ExpertMeta {
        id: id.to_string(),
        name: format!("{id} v{version}"),
        description: "détecte le «spam»; 'quotes', \"double\", back\\slash\nnew line".into(),
        kind: ExpertKind::Lora,
        backbone: "smollm2-135m".into(),
        version,
        created_at_unix_ms: 1_700_000_000_000 + version,
        num_instances,
        weights_sha256: String::new(),
        safetensors_sha256: String::new(),
        weights_bytes: 300,
        adapter: AdapterSummary::Lora {
            r: 8,
            alpha: 16.0,
            scale: 2.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            num_layers: 30,
            layers_to_transform: None,
        },
        training: None,
    })
}

/// A prompt expert trained in roe: the other summary, and a training record.
fn trained_meta(id: &str, version: u64, num_instances: usize) -> ExpertMeta {
    seal(ExpertMeta {
        kind: ExpertKind::Prompt,
        adapter: AdapterSummary::Prompt {
            num_virtual_tokens: 20,
            token_dim: 576,
        },
        training: Some(TrainingRecord {
            job_id: "job-42".into(),
            recipe_json: r#"{"lr":0.3,"steps":100}"#.into(),
            steps: 100,
            final_loss: 0.123_456_789_012_345,
            metric: "accuracy".into(),
            held_out_score: Some(0.875),
            held_out_baseline: None,
            held_out_rows: 40,
            train_rows: 360,
            ensemble_members: vec!["a".into(), "b".into()],
        }),
        ..meta(id, version, num_instances)
    })
}

/// The adapter `m` stands for: its bytes follow from the expert's name (which names the
/// version, by default) and `weights_bytes`, in a pattern that shows chunks lost or out of
/// order. Two experts share an adapter only when those two agree.
fn adapter_of(m: &ExpertMeta) -> PeftAdapter {
    let seed: u64 = m.name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    PeftAdapter {
        config_json: format!(r#"{{"peft_type":"LORA","r":8,"seed":{seed},"note":"ünïcødé"}}"#),
        safetensors: (0..m.weights_bytes as u64)
            .map(|i| ((i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect(),
    }
}

/// `m` with the hashes of [`adapter_of`] it, as the library writes them.
fn seal(mut m: ExpertMeta) -> ExpertMeta {
    let a = adapter_of(&m);
    m.weights_sha256 = a.sha256_hex();
    m.safetensors_sha256 = a.safetensors_sha256_hex();
    m
}

/// `m` standing for an adapter of `bytes` bytes.
fn sized(mut m: ExpertMeta, bytes: usize) -> ExpertMeta {
    m.weights_bytes = bytes;
    seal(m)
}

/// `m` under another name (so another adapter).
fn named(mut m: ExpertMeta, name: &str) -> ExpertMeta {
    m.name = name.to_string();
    seal(m)
}

/// An instance row: every other one has choices (and a choice embedding), and the
/// embeddings hold values a lossy encoding would change (-0.0, extremes, thirds).
fn row(expert_id: &str, point_id: u64, with_choices: bool) -> StoredInstance {
    let p = point_id as f32;
    StoredInstance {
        point_id,
        expert_id: expert_id.to_string(),
        instance: Instance {
            input: format!(
                "input {point_id}: «quoted» \"text\" 'single'\nwith a new line, ünïcødé"
            ),
            target: with_choices.then(|| "yes".to_string()),
            choices: if with_choices {
                vec!["yes".into(), "no".into()]
            } else {
                Vec::new()
            },
        },
        embedding: vec![
            -0.0,
            0.1,
            -1.0 / 3.0,
            1e-30,
            3.0e38,
            f32::MIN_POSITIVE,
            f32::EPSILON,
            p + 0.5,
        ],
        choice_embedding: with_choices
            .then(|| vec![p, -p, 2.0 / 3.0, -0.0, 1e-20, 7.25, 0.5, -2.0]),
    }
}

/// Rows for `points`, in the order given.
fn rows(expert_id: &str, points: &[u64]) -> Vec<StoredInstance> {
    points
        .iter()
        .enumerate()
        .map(|(i, &p)| row(expert_id, p, i % 2 == 0))
        .collect()
}

/// Fresh point ids, ascending.
fn point_ids(store: &dyn LibraryStore, n: usize) -> Vec<u64> {
    let mut ids = store.next_point_ids(n).unwrap();
    ids.sort_unstable();
    ids
}

/// Writes `meta` with [`adapter_of`] it.
fn put(
    store: &dyn LibraryStore,
    meta: &ExpertMeta,
    rows: &[StoredInstance],
    expect: Expect,
) -> Result<Written> {
    let bytes = meta.weights_bytes as u64 + 100 * rows.len() as u64;
    store.put_expert(
        meta,
        &adapter_of(meta),
        rows,
        expect,
        &Quota::unlimited(bytes),
    )
}

fn append(
    store: &dyn LibraryStore,
    meta: &ExpertMeta,
    rows: &[StoredInstance],
    expect: Expect,
) -> Result<Written> {
    store.append_instances(meta, rows, expect, &Quota::unlimited(1_000_000))
}

#[track_caller]
fn err<T>(r: Result<T>) -> LibraryError {
    match r {
        Ok(_) => panic!("expected an error, the call succeeded"),
        Err(e) => e,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Equal rows, embeddings bit for bit (`==` on f32 takes -0.0 for 0.0).
#[track_caller]
fn assert_rows(actual: &[StoredInstance], expected: &[StoredInstance]) {
    let points = |rs: &[StoredInstance]| rs.iter().map(|r| r.point_id).collect::<Vec<_>>();
    assert_eq!(points(actual), points(expected), "point ids");
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(a, e);
        assert_eq!(
            bits(&a.embedding),
            bits(&e.embedding),
            "embedding of {}",
            e.point_id
        );
        assert_eq!(
            a.choice_embedding.as_deref().map(bits),
            e.choice_embedding.as_deref().map(bits),
            "choice embedding of {}",
            e.point_id
        );
    }
}

/// The stored adapter is [`adapter_of`] `m`.
#[track_caller]
fn assert_adapter(actual: Option<PeftAdapter>, m: &ExpertMeta) {
    let expected = &adapter_of(m);
    let actual = actual.expect("the adapter is stored");
    assert_eq!(actual.config_json, expected.config_json);
    assert_eq!(
        actual.safetensors.len(),
        expected.safetensors.len(),
        "adapter bytes"
    );
    assert!(
        actual.safetensors == expected.safetensors,
        "the adapter's {} bytes differ (first at {:?})",
        expected.safetensors.len(),
        actual
            .safetensors
            .iter()
            .zip(&expected.safetensors)
            .position(|(a, b)| a != b)
    );
}

fn sorted(mut rs: Vec<StoredInstance>) -> Vec<StoredInstance> {
    rs.sort_by_key(|r| r.point_id);
    rs
}

fn ids_of(metas: &[ExpertMeta]) -> Vec<&str> {
    metas.iter().map(|m| m.id.as_str()).collect()
}

/// The change with this seq.
#[track_caller]
fn change(store: &dyn LibraryStore, seq: u64) -> Change {
    let mut cs = store.changes_since(seq - 1, 1).unwrap();
    assert_eq!(cs.len(), 1, "change {seq}");
    cs.remove(0)
}

// ---- The checks, for either store -----------------------------------------------------------

fn check_put_get_round_trip(store: &dyn LibraryStore) {
    let p = point_ids(store, 5);
    let m = trained_meta("alpha", 1, 3);
    // Given out of order: read back by point id.
    let r = rows("alpha", &[p[2], p[0], p[1]]);
    let w = put(store, &m, &r, Expect::Absent).unwrap();
    assert!(w.removed_points.is_empty());
    // An id of which "alpha" is a prefix, with rows of its own.
    let m2 = meta("alpha-2", 1, 2);
    let r2 = rows("alpha-2", &[p[4], p[3]]);
    put(store, &m2, &r2, Expect::Any).unwrap();

    assert_eq!(store.get("alpha").unwrap(), Some(m.clone()));
    assert_eq!(store.get("alpha-2").unwrap(), Some(m2.clone()));
    assert_eq!(store.get("alph").unwrap(), None);
    assert_eq!(store.get("missing").unwrap(), None);
    assert_rows(&store.instances_of("alpha").unwrap(), &sorted(r));
    assert_rows(&store.instances_of("alpha-2").unwrap(), &sorted(r2));
    assert!(store.instances_of("alph").unwrap().is_empty());
    assert!(store.instances_of("missing").unwrap().is_empty());
    assert_adapter(store.adapter("alpha").unwrap(), &m);
    assert_adapter(store.adapter("alpha-2").unwrap(), &m2);
}

fn check_adapter_round_trip(store: &dyn LibraryStore) {
    // Empty, exactly 3 MiB, and 3 MiB and a bit (several chunks, a partial last one), one.
    let metas: Vec<ExpertMeta> = [0usize, 3 << 20, (3 << 20) + 7, 1]
        .iter()
        .enumerate()
        .map(|(i, &n)| sized(meta(&format!("e{i}"), 1, 0), n))
        .collect();
    for m in &metas {
        put(store, m, &[], Expect::Absent).unwrap();
    }
    for m in &metas {
        assert_adapter(store.adapter(&m.id).unwrap(), m);
    }
    assert!(store.adapter("missing").unwrap().is_none());
    // A smaller new version leaves nothing of the larger one behind.
    let small = sized(meta("e2", 2, 0), 100);
    put(store, &small, &[], Expect::Version(1)).unwrap();
    assert_adapter(store.adapter("e2").unwrap(), &small);
    // And a larger one replaces a smaller one whole.
    let large = sized(meta("e3", 2, 0), (2 << 20) + 3);
    put(store, &large, &[], Expect::Any).unwrap();
    assert_adapter(store.adapter("e3").unwrap(), &large);
    assert_adapter(store.adapter("e1").unwrap(), &metas[1]);
    assert_adapter(store.adapter("e0").unwrap(), &metas[0]);
}

fn check_list_paging(store: &dyn LibraryStore) {
    for id in ["b", "a-b", "c", "a", "ab"] {
        put(store, &meta(id, 1, 0), &[], Expect::Absent).unwrap();
    }
    // Byte order: '-' (0x2d) sorts before 'b'.
    let all = ["a", "a-b", "ab", "b", "c"];
    assert_eq!(ids_of(&store.list(None, 100).unwrap()), all);
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let page = store.list(after.as_deref(), 2).unwrap();
        assert!(page.len() <= 2);
        pages.push(ids_of(&page).join(","));
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().id.clone());
        seen.extend(page.into_iter().map(|m| m.id));
        assert!(pages.len() <= 4, "paging does not end: {pages:?}");
    }
    assert_eq!(pages, ["a,a-b", "ab,b", "c", ""]);
    assert_eq!(seen, all);
    // `after` is exclusive, and need not be stored.
    assert_eq!(
        ids_of(&store.list(Some("a"), 100).unwrap()),
        ["a-b", "ab", "b", "c"]
    );
    assert_eq!(ids_of(&store.list(Some("aa"), 2).unwrap()), ["ab", "b"]);
    assert_eq!(ids_of(&store.list(Some(""), 1).unwrap()), ["a"]);
    assert!(store.list(Some("c"), 10).unwrap().is_empty());
    assert!(store.list(Some("zzz"), 10).unwrap().is_empty());
    assert!(store.list(None, 0).unwrap().is_empty());
    // The metadata listed is the stored one.
    assert_eq!(store.list(Some("ab"), 1).unwrap(), vec![meta("b", 1, 0)]);
}

fn check_len(store: &dyn LibraryStore) {
    assert_eq!(store.len().unwrap(), 0);
    for id in ["x", "y", "z"] {
        put(store, &meta(id, 1, 0), &[], Expect::Absent).unwrap();
    }
    assert_eq!(store.len().unwrap(), 3);
    // A new version is not a new expert.
    put(store, &meta("y", 2, 0), &[], Expect::Any).unwrap();
    assert_eq!(store.len().unwrap(), 3);
    store.delete("x", Expect::Any).unwrap().unwrap();
    assert_eq!(store.len().unwrap(), 2);
    // A failed write leaves it.
    err(put(store, &meta("z", 2, 0), &[], Expect::Absent));
    assert_eq!(store.len().unwrap(), 2);
}

fn check_replace(store: &dyn LibraryStore) {
    let p = point_ids(store, 3);
    let v1 = sized(meta("x", 1, 2), 1000);
    put(store, &v1, &rows("x", &p[..2]), Expect::Absent).unwrap();
    let v2 = sized(meta("x", 2, 1), 500);
    let r2 = rows("x", &p[2..]);
    let head = store.head_seq().unwrap();
    let w = put(store, &v2, &r2, Expect::Any).unwrap();
    assert_eq!(w.removed_points, p[..2].to_vec());
    assert_eq!(w.seq, head + 1);
    assert_rows(&store.instances_of("x").unwrap(), &r2);
    assert_eq!(store.get("x").unwrap(), Some(v2.clone()));
    assert_adapter(store.adapter("x").unwrap(), &v2);
    // A version without instances removes them all.
    let w = put(store, &meta("x", 3, 0), &[], Expect::Present).unwrap();
    assert_eq!(w.removed_points, p[2..].to_vec());
    assert!(store.instances_of("x").unwrap().is_empty());
    // A version may keep the adapter of the one it replaces.
    let same = named(meta("x", 4, 0), "x v3");
    assert_eq!(same.weights_sha256, meta("x", 3, 0).weights_sha256);
    put(store, &same, &[], Expect::Version(3)).unwrap();
    assert_adapter(store.adapter("x").unwrap(), &same);
}

fn check_expect(store: &dyn LibraryStore) {
    let p = point_ids(store, 4);
    let v1 = meta("x", 1, 2);
    let r1 = rows("x", &p[..2]);
    put(store, &v1, &r1, Expect::Absent).unwrap();
    let head = store.head_seq().unwrap();

    let v2 = meta("x", 2, 1);
    let r2 = rows("x", &p[2..3]);
    let e = err(put(store, &v2, &r2, Expect::Absent));
    assert!(
        matches!(&e, LibraryError::AlreadyExists { id, version: 1 } if id == "x"),
        "{e:?}"
    );
    let e = err(put(store, &v2, &r2, Expect::Version(5)));
    assert!(
        matches!(&e, LibraryError::Aborted { id, expected: 5, actual: 1 } if id == "x"),
        "{e:?}"
    );
    let e = err(append(store, &v2, &r2, Expect::Version(2)));
    assert!(
        matches!(
            &e,
            LibraryError::Aborted {
                expected: 2,
                actual: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(store.delete("x", Expect::Version(9)));
    assert!(
        matches!(
            &e,
            LibraryError::Aborted {
                expected: 9,
                actual: 1,
                ..
            }
        ),
        "{e:?}"
    );
    for expect in [Expect::Version(1), Expect::Present] {
        let e = err(put(store, &meta("nobody", 1, 0), &[], expect));
        assert!(
            matches!(&e, LibraryError::NotFound { id, .. } if id == "nobody"),
            "{expect:?}: {e:?}"
        );
        let e = err(store.delete("nobody", expect));
        assert!(
            matches!(&e, LibraryError::NotFound { .. }),
            "{expect:?}: {e:?}"
        );
    }
    // None of it changed anything.
    assert_eq!(store.head_seq().unwrap(), head);
    assert_eq!(store.get("x").unwrap(), Some(v1.clone()));
    assert_rows(&store.instances_of("x").unwrap(), &r1);
    assert_adapter(store.adapter("x").unwrap(), &v1);
    assert_eq!(store.get("nobody").unwrap(), None);
    assert!(store.adapter("nobody").unwrap().is_none());
    assert_eq!(store.len().unwrap(), 1);
    assert_eq!(store.changes_since(0, 100).unwrap().len(), head as usize);

    // The right version passes.
    let w = put(store, &v2, &r2, Expect::Version(1)).unwrap();
    assert_eq!(w.seq, head + 1);
    assert_eq!(store.get("x").unwrap(), Some(v2));
    // So does Present, and Any on an id never stored.
    put(store, &meta("x", 3, 0), &[], Expect::Present).unwrap();
    put(store, &meta("new", 1, 0), &[], Expect::Any).unwrap();
    assert_eq!(store.get("x").unwrap().unwrap().version, 3);
    assert!(store.get("new").unwrap().is_some());
    assert_eq!(store.head_seq().unwrap(), head + 3);
}

fn check_append_instances(store: &dyn LibraryStore) {
    let p = point_ids(store, 4);
    let v1 = meta("x", 1, 1);
    let r1 = rows("x", &p[..1]);
    put(store, &v1, &r1, Expect::Absent).unwrap();
    let head = store.head_seq().unwrap();
    let grown = meta("x", 1, 3);
    let added = rows("x", &p[1..3]);
    let w = append(store, &grown, &added, Expect::Present).unwrap();
    assert!(w.removed_points.is_empty());
    assert_eq!(w.seq, head + 1);
    assert_eq!(store.get("x").unwrap(), Some(grown));
    assert_eq!(store.get("x").unwrap().unwrap().num_instances, 3);
    let mut all = r1;
    all.extend(added);
    assert_rows(&store.instances_of("x").unwrap(), &all);
    // The adapter is left as it was.
    assert_adapter(store.adapter("x").unwrap(), &v1);
    // At the stated version too.
    let more = rows("x", &p[3..]);
    append(store, &meta("x", 1, 4), &more, Expect::Version(1)).unwrap();
    assert_eq!(store.instances_of("x").unwrap().len(), 4);
    assert_eq!(store.get("x").unwrap().unwrap().num_instances, 4);

    // Nothing to add to.
    let head = store.head_seq().unwrap();
    let extra = store.next_point_ids(1).unwrap();
    for expect in [Expect::Present, Expect::Any] {
        let e = err(append(
            store,
            &meta("nobody", 1, 1),
            &rows("nobody", &extra),
            expect,
        ));
        assert!(
            matches!(&e, LibraryError::NotFound { id, .. } if id == "nobody"),
            "{expect:?}: {e:?}"
        );
    }
    assert_eq!(store.head_seq().unwrap(), head);
    assert!(store.get("nobody").unwrap().is_none());
    assert!(store.instances_of("nobody").unwrap().is_empty());
}

fn check_delete(store: &dyn LibraryStore) {
    let p = point_ids(store, 3);
    let x = sized(meta("x", 1, 2), 2000);
    let r = rows("x", &p[..2]);
    put(store, &x, &r, Expect::Absent).unwrap();
    let y = meta("y", 1, 1);
    let ry = rows("y", &p[2..]);
    put(store, &y, &ry, Expect::Absent).unwrap();
    // Another expert with x's very adapter.
    let twin = named(sized(meta("twin", 1, 0), 2000), &x.name);
    assert_eq!(twin.weights_sha256, x.weights_sha256);
    put(store, &twin, &[], Expect::Absent).unwrap();
    let head = store.head_seq().unwrap();

    let w = store
        .delete("x", Expect::Version(1))
        .unwrap()
        .expect("x was stored");
    assert_eq!(w.seq, head + 1);
    assert_eq!(w.removed_points, p[..2].to_vec());
    assert_eq!(store.get("x").unwrap(), None);
    assert!(store.adapter("x").unwrap().is_none());
    assert!(store.instances_of("x").unwrap().is_empty());
    assert_eq!(store.len().unwrap(), 2);
    // The others are untouched, the adapter x shared too.
    assert_rows(&store.instances_of("y").unwrap(), &ry);
    assert_adapter(store.adapter("y").unwrap(), &y);
    assert_adapter(store.adapter("twin").unwrap(), &twin);

    // Again: nothing to delete, nothing written.
    assert!(store.delete("x", Expect::Any).unwrap().is_none());
    assert!(store.delete("never", Expect::Any).unwrap().is_none());
    assert_eq!(store.head_seq().unwrap(), head + 1);

    // The id can be registered anew.
    let again = meta("x", 1, 0);
    put(store, &again, &[], Expect::Absent).unwrap();
    assert!(store.instances_of("x").unwrap().is_empty());
    assert_adapter(store.adapter("x").unwrap(), &again);
    // A delete without instances removes none.
    let w = store.delete("twin", Expect::Present).unwrap().unwrap();
    assert!(w.removed_points.is_empty());
    assert!(store.adapter("twin").unwrap().is_none());
}

fn check_seqs_and_change_log(store: &dyn LibraryStore) {
    assert_eq!(store.head_seq().unwrap(), 0);
    assert!(store.changes_since(0, 100).unwrap().is_empty());
    let p = point_ids(store, 6);
    let (a, b, c, d, e, f) = (p[0], p[1], p[2], p[3], p[4], p[5]);

    let x1 = meta("x", 1, 2);
    let rx1 = rows("x", &[a, b]);
    let w1 = put(store, &x1, &rx1, Expect::Absent).unwrap();
    assert_eq!(w1.seq, 1);
    assert_eq!(store.head_seq().unwrap(), 1);
    let c1 = change(store, 1);
    assert_rows(&store.instances_of_change(&c1).unwrap(), &rx1);

    let y1 = meta("y", 1, 1);
    let ry1 = rows("y", &[c]);
    let w2 = put(store, &y1, &ry1, Expect::Absent).unwrap();
    assert_eq!(w2.seq, 2);
    let c2 = change(store, 2);
    assert_rows(&store.instances_of_change(&c2).unwrap(), &ry1);

    // A failed write takes no seq.
    err(put(store, &x1, &[], Expect::Absent));
    assert_eq!(store.head_seq().unwrap(), 2);

    let y1_grown = meta("y", 1, 3);
    let ry_added = rows("y", &[d, e]);
    let w3 = append(store, &y1_grown, &ry_added, Expect::Present).unwrap();
    assert_eq!(w3.seq, 3);
    let c3 = change(store, 3);
    // Only what the append added.
    assert_rows(&store.instances_of_change(&c3).unwrap(), &ry_added);

    let x2 = meta("x", 2, 1);
    let rx2 = rows("x", &[f]);
    let w4 = put(store, &x2, &rx2, Expect::Version(1)).unwrap();
    assert_eq!(w4.seq, 4);
    assert_eq!(w4.removed_points, vec![a, b]);
    let c4 = change(store, 4);
    assert_rows(&store.instances_of_change(&c4).unwrap(), &rx2);
    // x's first version's rows are gone.
    assert!(store.instances_of_change(&c1).unwrap().is_empty());

    err(store.delete("y", Expect::Version(7)));
    assert_eq!(store.head_seq().unwrap(), 4);
    let w5 = store.delete("y", Expect::Present).unwrap().unwrap();
    assert_eq!(w5.seq, 5);
    assert_eq!(w5.removed_points, vec![c, d, e]);
    assert_eq!(store.head_seq().unwrap(), 5);
    let c5 = change(store, 5);
    assert!(store.instances_of_change(&c5).unwrap().is_empty());
    assert!(store.instances_of_change(&c2).unwrap().is_empty());
    assert!(store.instances_of_change(&c3).unwrap().is_empty());
    assert_rows(&store.instances_of_change(&c4).unwrap(), &rx2);

    let expected = vec![
        Change {
            seq: 1,
            op: ChangeOp::Put,
            expert_id: "x".into(),
            version: 1,
            meta: Some(x1),
            removed_points: vec![],
        },
        Change {
            seq: 2,
            op: ChangeOp::Put,
            expert_id: "y".into(),
            version: 1,
            meta: Some(y1),
            removed_points: vec![],
        },
        Change {
            seq: 3,
            op: ChangeOp::Append,
            expert_id: "y".into(),
            version: 1,
            meta: Some(y1_grown),
            removed_points: vec![],
        },
        Change {
            seq: 4,
            op: ChangeOp::Put,
            expert_id: "x".into(),
            version: 2,
            meta: Some(x2),
            removed_points: vec![a, b],
        },
        Change {
            seq: 5,
            op: ChangeOp::Delete,
            expert_id: "y".into(),
            version: 1,
            meta: None,
            removed_points: vec![c, d, e],
        },
    ];
    assert_eq!(store.changes_since(0, 100).unwrap(), expected);
    assert_eq!(vec![c1, c2, c3, c4, c5], expected);
    let seqs = |after: u64, limit: usize| -> Vec<u64> {
        store
            .changes_since(after, limit)
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect()
    };
    assert_eq!(seqs(0, 2), [1, 2]);
    assert_eq!(seqs(2, 2), [3, 4]);
    assert_eq!(seqs(4, 2), [5]);
    assert!(seqs(5, 2).is_empty());
    assert_eq!(seqs(1, 100), [2, 3, 4, 5]);
    assert_eq!(seqs(3, 1), [4]);
    assert!(seqs(0, 0).is_empty());
}

fn check_snapshot(store: &dyn LibraryStore) {
    let p = point_ids(store, 4);
    let mx = meta("x", 1, 2);
    let rx = rows("x", &[p[1], p[0]]);
    let my = trained_meta("y", 2, 1);
    let ry = rows("y", &[p[2]]);
    put(store, &mx, &rx, Expect::Absent).unwrap();
    put(store, &meta("y", 1, 0), &[], Expect::Absent).unwrap();
    put(store, &my, &ry, Expect::Version(1)).unwrap();
    put(store, &meta("z", 1, 1), &rows("z", &[p[3]]), Expect::Absent).unwrap();
    store.delete("z", Expect::Any).unwrap().unwrap();

    let mut metas = Vec::new();
    let mut instances = Vec::new();
    let seq = store
        .snapshot(&mut |item: SnapshotItem| {
            match item {
                SnapshotItem::Meta(m) => metas.push(*m),
                SnapshotItem::Instance(i) => instances.push(i),
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(seq, store.head_seq().unwrap());
    assert_eq!(seq, 5);
    metas.sort_by_key(|m| m.id.clone());
    assert_eq!(metas, vec![mx, my]);
    let mut expected = rx;
    expected.extend(ry);
    assert_rows(&sorted(instances), &sorted(expected));

    // The callback's error ends the snapshot and is returned.
    let mut calls = 0;
    let e = err(store.snapshot(&mut |_| {
        calls += 1;
        Err(LibraryError::Cancelled)
    }));
    assert!(matches!(e, LibraryError::Cancelled), "{e:?}");
    assert_eq!(calls, 1);
}

fn check_next_point_ids(store: &dyn LibraryStore) {
    let first = store.next_point_ids(3).unwrap();
    assert_eq!(first.len(), 3);
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3, "{first:?}");
    let second = store.next_point_ids(3).unwrap();
    assert_eq!(second.len(), 3);
    let mut all: HashSet<u64> = first.iter().copied().collect();
    for id in &second {
        assert!(
            all.insert(*id),
            "{id} given out twice: {first:?} then {second:?}"
        );
    }
    assert!(store.next_point_ids(0).unwrap().is_empty());
    let many = store.next_point_ids(1000).unwrap();
    assert_eq!(many.len(), 1000);
    for id in &many {
        assert!(all.insert(*id), "{id} given out twice");
    }
    // Ids a write used are not given out again.
    let used = store.next_point_ids(2).unwrap();
    put(store, &meta("x", 1, 2), &rows("x", &used), Expect::Absent).unwrap();
    for id in store.next_point_ids(10).unwrap() {
        assert!(
            !used.contains(&id) && all.insert(id),
            "{id} given out twice"
        );
    }
}

fn check_encoder(store: &dyn LibraryStore) {
    store.check_encoder("all-MiniLM-L6-v2").unwrap();
    store.check_encoder("all-MiniLM-L6-v2").unwrap();
    let e = err(store.check_encoder("other-encoder"));
    match &e {
        LibraryError::FailedPrecondition(m) => {
            assert!(
                m.contains("all-MiniLM-L6-v2"),
                "names the stored encoder: {m}"
            )
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    // The refusal recorded nothing.
    store.check_encoder("all-MiniLM-L6-v2").unwrap();
    assert!(matches!(
        store.check_encoder("other-encoder"),
        Err(LibraryError::FailedPrecondition(_))
    ));
}

fn check_reopen(f: &mut dyn Fixture) {
    let store = f.store();
    store.check_encoder("enc-1").unwrap();
    let p = point_ids(store, 3);
    let m = sized(trained_meta("x", 1, 3), (1 << 20) + 5);
    let r = rows("x", &p);
    put(store, &m, &r, Expect::Absent).unwrap();
    put(store, &meta("y", 1, 0), &[], Expect::Absent).unwrap();
    store.delete("y", Expect::Any).unwrap().unwrap();
    let head = store.head_seq().unwrap();
    let changes = store.changes_since(0, 100).unwrap();

    f.reopen();
    let store = f.store();
    assert_eq!(store.get("x").unwrap(), Some(m.clone()));
    assert_adapter(store.adapter("x").unwrap(), &m);
    assert_rows(&store.instances_of("x").unwrap(), &r);
    assert_eq!(store.get("y").unwrap(), None);
    assert_eq!(store.len().unwrap(), 1);
    assert_eq!(store.head_seq().unwrap(), head);
    assert_eq!(store.changes_since(0, 100).unwrap(), changes);
    store.check_encoder("enc-1").unwrap();
    assert!(matches!(
        store.check_encoder("enc-2"),
        Err(LibraryError::FailedPrecondition(_))
    ));
    for id in store.next_point_ids(5).unwrap() {
        assert!(!p.contains(&id), "{id} given out again after reopening");
    }
    // Writes go on from the head.
    let w = put(store, &meta("z", 1, 0), &[], Expect::Absent).unwrap();
    assert_eq!(w.seq, head + 1);
    let w = put(store, &meta("x", 2, 0), &[], Expect::Version(1)).unwrap();
    assert_eq!(w.removed_points, p);
}

// ---- Both stores ----------------------------------------------------------------------------

/// `conformance_tests!(module, fixture constructor)`: every check as a test in `module`, each
/// over a fresh fixture.
macro_rules! conformance_tests {
    ($store:ident, $fixture:expr) => {
        mod $store {
            use super::*;

            fn fixture() -> Box<dyn Fixture> {
                let make = $fixture;
                Box::new(make())
            }

            #[test]
            fn put_get_round_trip() {
                check_put_get_round_trip(fixture().store())
            }

            #[test]
            fn adapter_round_trip() {
                check_adapter_round_trip(fixture().store())
            }

            #[test]
            fn list_paging() {
                check_list_paging(fixture().store())
            }

            #[test]
            fn len() {
                check_len(fixture().store())
            }

            #[test]
            fn replace() {
                check_replace(fixture().store())
            }

            #[test]
            fn expect() {
                check_expect(fixture().store())
            }

            #[test]
            fn append_instances() {
                check_append_instances(fixture().store())
            }

            #[test]
            fn delete() {
                check_delete(fixture().store())
            }

            #[test]
            fn seqs_and_change_log() {
                check_seqs_and_change_log(fixture().store())
            }

            #[test]
            fn snapshot() {
                check_snapshot(fixture().store())
            }

            #[test]
            fn next_point_ids() {
                check_next_point_ids(fixture().store())
            }

            #[test]
            fn encoder() {
                check_encoder(fixture().store())
            }

            #[test]
            fn reopen() {
                check_reopen(fixture().as_mut())
            }
        }
    };
}

conformance_tests!(sled, SledFixture::new);
conformance_tests!(pg, PgFixture::new);

// ---- PostgreSQL only ------------------------------------------------------------------------

mod pg_only {
    use std::sync::Barrier;

    use super::*;

    /// Writes `meta` with [`adapter_of`] it under `quota`.
    fn put_quota(
        store: &PgStore,
        meta: &ExpertMeta,
        expect: Expect,
        quota: &Quota,
    ) -> Result<Written> {
        store.put_expert(meta, &adapter_of(meta), &[], expect, quota)
    }

    /// One writer's try, as it came back.
    struct Attempt {
        meta: ExpertMeta,
        rows: Vec<StoredInstance>,
        result: Result<Written>,
    }

    #[test]
    fn racing_registrations_of_one_id_one_wins() {
        let db = TestDatabase::create();
        let store = connect(&db.url);
        let barrier = Barrier::new(2);
        for round in 0..20u64 {
            let id = format!("race-{round}");
            let attempts: Vec<Attempt> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|t| {
                        let (store, barrier, id) = (&store, &barrier, &id);
                        s.spawn(move || {
                            let m = named(meta(id, 1, 1), &format!("writer {t}"));
                            let r = rows(id, &store.next_point_ids(1).unwrap());
                            barrier.wait();
                            let result = put(store, &m, &r, Expect::Absent);
                            Attempt {
                                meta: m,
                                rows: r,
                                result,
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won: Vec<&Attempt> = attempts.iter().filter(|a| a.result.is_ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: exactly one registration wins");
            for a in &attempts {
                if let Err(e) = &a.result {
                    assert!(
                        matches!(e, LibraryError::AlreadyExists { version: 1, .. }),
                        "round {round}: the loser gets ALREADY_EXISTS, not {e:?}"
                    );
                }
            }
            // What is stored is the winner's, whole.
            let w = won[0];
            assert_eq!(w.result.as_ref().unwrap().seq, round + 1);
            assert_eq!(store.get(&id).unwrap(), Some(w.meta.clone()));
            assert_adapter(store.adapter(&id).unwrap(), &w.meta);
            assert_rows(&store.instances_of(&id).unwrap(), &w.rows);
        }
        assert_eq!(store.len().unwrap(), 20);
        assert_eq!(store.head_seq().unwrap(), 20);
        assert_eq!(store.changes_since(0, 100).unwrap().len(), 20);
    }

    #[test]
    fn max_experts_holds_under_concurrent_registrations() {
        let db = TestDatabase::create();
        let store = connect(&db.url);
        let quota = Quota {
            max_experts: 3,
            max_library_bytes: u64::MAX,
            expert_bytes: 10,
        };
        let barrier = Barrier::new(4);
        let results: Vec<(String, Result<Written>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let (store, barrier, quota) = (&store, &barrier, &quota);
                    s.spawn(move || {
                        barrier.wait();
                        (0..2)
                            .map(|i| {
                                let id = format!("q{t}-{i}");
                                let r = put_quota(store, &meta(&id, 1, 0), Expect::Absent, quota);
                                (id, r)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut stored: Vec<&str> = Vec::new();
        for (id, r) in &results {
            match r {
                Ok(_) => stored.push(id),
                Err(LibraryError::ResourceExhausted(_)) => {}
                Err(e) => panic!("{id}: expected RESOURCE_EXHAUSTED, got {e:?}"),
            }
        }
        assert_eq!(
            stored.len(),
            3,
            "exactly max_experts registrations pass: {stored:?}"
        );
        stored.sort_unstable();
        assert_eq!(store.len().unwrap(), 3);
        assert_eq!(ids_of(&store.list(None, 100).unwrap()), stored);
        assert_eq!(store.head_seq().unwrap(), 3);

        // At the quota, a new version of a stored expert is no new expert; a new id is.
        let kept = stored[0].to_string();
        put_quota(&store, &meta(&kept, 2, 0), Expect::Any, &quota).unwrap();
        let e = err(put_quota(&store, &meta("late", 1, 0), Expect::Any, &quota));
        assert!(matches!(e, LibraryError::ResourceExhausted(_)), "{e:?}");
        store.delete(&kept, Expect::Any).unwrap().unwrap();
        put_quota(&store, &meta("late", 1, 0), Expect::Any, &quota).unwrap();
        assert_eq!(store.len().unwrap(), 3);
    }

    #[test]
    fn max_library_bytes_counts_each_expert_once() {
        let db = TestDatabase::create();
        let store = connect(&db.url);
        let write = |id: &str, version: u64, expert_bytes: u64| {
            let quota = Quota {
                max_experts: usize::MAX,
                max_library_bytes: 1000,
                expert_bytes,
            };
            put_quota(&store, &meta(id, version, 0), Expect::Any, &quota)
        };
        write("a", 1, 400).unwrap();
        // Up to the quota exactly.
        write("b", 1, 600).unwrap();
        let head = store.head_seq().unwrap();
        let e = err(write("c", 1, 1));
        assert!(matches!(e, LibraryError::ResourceExhausted(_)), "{e:?}");
        assert_eq!(store.head_seq().unwrap(), head);
        assert!(store.get("c").unwrap().is_none());
        // A new version replaces its expert's bytes: 300 + 600.
        write("a", 2, 300).unwrap();
        write("c", 1, 100).unwrap();
        // 300 + 700 + 100 is over.
        let e = err(write("b", 2, 700));
        assert!(matches!(e, LibraryError::ResourceExhausted(_)), "{e:?}");
        assert_eq!(store.get("b").unwrap().unwrap().version, 1);
        // A delete frees its bytes.
        store.delete("c", Expect::Any).unwrap().unwrap();
        write("b", 2, 700).unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }

    /// The URL with some of its parts replaced (a `postgres://user:password@host/db?params`
    /// URL, as `TestDatabase` gives).
    fn url_with(
        url: &str,
        user: Option<&str>,
        password: Option<&str>,
        host: Option<&str>,
        db: Option<&str>,
    ) -> String {
        let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (old_db, query) = match path.split_once('?') {
            Some((d, q)) => (d, Some(q)),
            None => (path, None),
        };
        let (userinfo, old_host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (old_user, old_password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, "")))
        {
            Some((u, p)) => (u, p),
            None => ("", ""),
        };
        let user = user.unwrap_or(old_user);
        let password = password.unwrap_or(old_password);
        let mut out = format!("{scheme}://");
        if !user.is_empty() {
            out.push_str(user);
            if !password.is_empty() {
                out.push(':');
                out.push_str(password);
            }
            out.push('@');
        }
        out.push_str(host.unwrap_or(old_host));
        out.push('/');
        out.push_str(db.unwrap_or(old_db));
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    #[test]
    fn url_with_replaces_parts() {
        let u = "postgres://me:pw@127.0.0.1:5432/db?sslmode=disable";
        assert_eq!(
            url_with(u, Some("you"), Some("x"), Some("h:1"), Some("other")),
            "postgres://you:x@h:1/other?sslmode=disable"
        );
        assert_eq!(url_with(u, None, None, None, None), u);
        assert_eq!(
            url_with(
                "postgres://postgres@127.0.0.1:5432/t",
                None,
                Some("pw"),
                None,
                None
            ),
            "postgres://postgres:pw@127.0.0.1:5432/t"
        );
    }

    #[test]
    fn connection_failures_are_errors_that_keep_the_password() {
        let db = TestDatabase::create();
        const PASSWORD: &str = "s3cret-Pa55word-roe";
        // Trust authentication (the dev machines', the private cluster's) takes any
        // password: an unknown role fails on every server, a wrong password only where
        // passwords are checked (there it must fail like the others).
        let unknown_role = url_with(
            &db.url,
            Some("roe_no_such_role"),
            Some(PASSWORD),
            None,
            None,
        );
        let unknown_db = url_with(
            &db.url,
            None,
            Some(PASSWORD),
            None,
            Some("roe_no_such_database_4b1d"),
        );
        let unreachable = url_with(&db.url, None, Some(PASSWORD), Some("127.0.0.1:1"), None);
        let wrong_password = url_with(&db.url, None, Some(PASSWORD), None, None);
        for (what, url, must_fail) in [
            ("an unknown role", &unknown_role, true),
            ("an unknown database", &unknown_db, true),
            ("an unreachable port", &unreachable, true),
            ("a wrong password", &wrong_password, false),
        ] {
            let started = Instant::now();
            let e = match PgStore::connect(&pg_config(url)) {
                Ok(_) if must_fail => panic!("{what}: connected"),
                Ok(_) => continue,
                Err(e) => e,
            };
            let shown = format!("{e} / {e:?}");
            assert!(
                !shown.contains(PASSWORD),
                "{what}: the error shows the password: {shown}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{what}: took {:?}",
                started.elapsed()
            );
            if what == "an unreachable port" {
                assert!(matches!(e, LibraryError::Unavailable(_)), "{what}: {e:?}");
            }
        }
    }

    fn sql(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }

    /// Refinery's history table (version, name, applied_on, checksum), wherever the store
    /// keeps it.
    fn history_table(client: &mut postgres::Client) -> String {
        let rows = client
            .query(
                "select table_schema::text, table_name::text from information_schema.columns \
                 where column_name in ('version', 'name', 'applied_on', 'checksum') \
                   and table_schema not in ('pg_catalog', 'information_schema') \
                 group by 1, 2 having count(*) = 4",
                &[],
            )
            .unwrap();
        assert_eq!(rows.len(), 1, "one migration history table");
        let (schema, table): (String, String) = (rows[0].get(0), rows[0].get(1));
        format!("\"{schema}\".\"{table}\"")
    }

    fn history(client: &mut postgres::Client, table: &str) -> Vec<String> {
        client
            .query(
                &format!("select h::text from {table} as h order by version"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The migrations applied (version, name, checksum), without when.
    fn migrations(client: &mut postgres::Client, table: &str) -> Vec<String> {
        client
            .query(
                &format!(
                    "select version::text || ' ' || coalesce(name, '') || ' ' || \
                     coalesce(checksum, '') from {table} order by version"
                ),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let db = TestDatabase::create();
        let first = connect(&db.url);
        put(&first, &meta("x", 1, 0), &[], Expect::Absent).unwrap();
        let mut client = sql(&db.url);
        let table = history_table(&mut client);
        let applied = history(&mut client, &table);
        assert!(!applied.is_empty(), "migrations were recorded");

        // Again, with the first store still open: nothing to apply, nothing lost.
        let second = connect(&db.url);
        assert_eq!(history(&mut client, &table), applied);
        assert_eq!(second.get("x").unwrap(), Some(meta("x", 1, 0)));
        assert_eq!(second.head_seq().unwrap(), 1);
        drop(second);
        drop(first);

        // A roe newer than this one migrated the database.
        client
            .batch_execute(&format!(
                "insert into {table} (version, name, applied_on, checksum) \
                 values (999, 'future', '2030-01-01T00:00:00Z', '0')"
            ))
            .unwrap();
        match PgStore::connect(&pg_config(&db.url)) {
            Ok(_) => panic!("a store opened a database of a newer schema"),
            Err(LibraryError::FailedPrecondition(m)) => {
                assert!(m.to_lowercase().contains("newer"), "{m}")
            }
            Err(e) => panic!("expected FAILED_PRECONDITION, got {e:?}"),
        }
        // It changed nothing.
        assert_eq!(history(&mut client, &table).len(), applied.len() + 1);
        client
            .batch_execute(&format!("delete from {table} where version = 999"))
            .unwrap();
        let again = connect(&db.url);
        assert_eq!(again.get("x").unwrap(), Some(meta("x", 1, 0)));
    }

    #[test]
    fn concurrent_first_connections_all_migrate() {
        let db = TestDatabase::create();
        let barrier = Barrier::new(4);
        let stores: Vec<PgStore> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (url, barrier) = (&db.url, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        PgStore::connect(&pg_config(url))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("a concurrent first connect failed: {e}"))
                })
                .collect()
        });
        // The schema a single connect makes, usable from every store.
        let mut client = sql(&db.url);
        let table = history_table(&mut client);
        let applied = history(&mut client, &table);
        let alone = TestDatabase::create();
        drop(connect(&alone.url));
        let mut alone_client = sql(&alone.url);
        let alone_table = history_table(&mut alone_client);
        assert_eq!(
            migrations(&mut client, &table),
            migrations(&mut alone_client, &alone_table)
        );
        put(&stores[0], &meta("x", 1, 0), &[], Expect::Absent).unwrap();
        for s in &stores {
            assert_eq!(s.get("x").unwrap(), Some(meta("x", 1, 0)));
            assert_eq!(s.head_seq().unwrap(), 1);
        }
        drop(stores);
        let again = connect(&db.url);
        assert_eq!(history(&mut client, &table), applied);
        assert_eq!(again.len().unwrap(), 1);
    }
}
