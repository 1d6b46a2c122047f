//! The library facade on real sled files, with a tiny bag-of-words encoder standing in for
//! the sentence encoder so that edge cases are exact and fast (the real encoder is covered by
//! encoder_reference.rs and the end-to-end tests).

mod common;

use std::sync::Arc;

use common::BagOfWords;
use roe_expert_library::embedding::Encoder;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig, NewExpert};
use roe_expert_library::retrieval::{Query, RouteOptions, Strategy};
use roe_expert_library::{ExpertKind, Instance, LibraryError, PeftAdapter, TextFormat};

fn prompt_adapter() -> PeftAdapter {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/experts/smollm2-135m/prompt/sms_spam");
    PeftAdapter::from_dir(dir).unwrap()
}

fn lora_adapter() -> PeftAdapter {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/experts/smollm2-135m/lora/sms_spam");
    PeftAdapter::from_dir(dir).unwrap()
}

fn expert(id: &str, words: &[&str], adapter: PeftAdapter) -> NewExpert {
    NewExpert {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        backbone: None,
        adapter,
        instances: words
            .iter()
            .map(|w| Instance {
                input: format!("{w} {w} story"),
                target: Some(w.to_string()),
                choices: vec![],
            })
            .collect(),
    }
}

fn q(text: &str) -> Query {
    Query {
        input: text.into(),
        choices: vec![],
        target: None,
    }
}

fn open(dir: &std::path::Path) -> ExpertLibrary {
    ExpertLibrary::open(
        dir,
        Arc::new(BagOfWords("bow".into())),
        LibraryConfig::default(),
    )
    .unwrap()
    .0
}

#[test]
fn versions_replace_instances_and_deletes_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let lib = open(tmp.path());
        lib.register(expert("cats", &["cat", "kitten"], prompt_adapter()), false)
            .unwrap();
        lib.register(expert("dogs", &["dog", "puppy"], lora_adapter()), false)
            .unwrap();
        assert!(matches!(
            lib.register(expert("cats", &["lion"], prompt_adapter()), false),
            Err(LibraryError::AlreadyExists { version: 1, .. })
        ));
        // v2 of "cats" is about birds: the old cat instances must leave the index.
        let v2 = lib
            .register(expert("cats", &["bird", "parrot"], prompt_adapter()), true)
            .unwrap();
        assert_eq!((v2.version, v2.num_instances), (2, 2));
        let r = lib
            .route(
                &[q("kitten kitten story")],
                &RouteOptions::elm(TextFormat::Instance),
            )
            .unwrap();
        assert!(r.evidence[0]
            .iter()
            .all(|h| !(h.expert_id == "cats" && h.similarity > 0.99)));
        lib.register(
            expert("fish", &["trout", "salmon"], prompt_adapter()),
            false,
        )
        .unwrap();
        lib.delete("fish").unwrap();
        assert!(matches!(
            lib.delete("fish"),
            Err(LibraryError::NotFound { .. })
        ));
    }
    let lib = open(tmp.path());
    let ids: Vec<(String, u64, ExpertKind)> = lib
        .list(None, 10)
        .unwrap()
        .0
        .into_iter()
        .map(|m| (m.id, m.version, m.kind))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("cats".into(), 2, ExpertKind::Prompt),
            ("dogs".into(), 1, ExpertKind::Lora)
        ]
    );
    assert_eq!(lib.instances("cats").unwrap().len(), 2);
    let r = lib
        .route(&[q("parrot parrot story")], &RouteOptions::default())
        .unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "cats");
    assert_eq!(lib.adapter("dogs").unwrap(), lora_adapter());
}

#[test]
fn a_library_refuses_another_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    let other = ExpertLibrary::open(
        tmp.path(),
        Arc::new(BagOfWords("other".into())),
        LibraryConfig::default(),
    );
    assert!(matches!(other, Err(LibraryError::FailedPrecondition(_))));
}

#[test]
fn routing_filters_votes_ties_and_abstains() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = open(tmp.path());
    lib.register(expert("a", &["apple", "pear"], prompt_adapter()), false)
        .unwrap();
    lib.register(expert("b", &["apple", "plum"], lora_adapter()), false)
        .unwrap();
    lib.register(expert("c", &["rocket", "engine"], prompt_adapter()), false)
        .unwrap();

    // "apple apple story" matches an instance of a and of b equally: the tie goes to the id.
    let elm = RouteOptions::elm(TextFormat::Instance);
    let tie = lib.route(&[q("apple apple story")], &elm).unwrap();
    assert_eq!(tie.evidence[0][0].expert_id, "a");

    let qs = [
        q("rocket rocket story"),
        q("engine engine story"),
        q("pear pear story"),
    ];
    let r = lib.route(&qs, &elm).unwrap();
    assert_eq!(r.ranked[0].expert_id, "c", "{r:?}");
    assert_eq!(r.ranked[0].votes, 2);
    assert!((r.ranked[0].share - 2.0 / 3.0).abs() < 1e-6);
    assert_eq!(r.ranked[1].expert_id, "a");

    let lora_only = RouteOptions {
        kind: Some(ExpertKind::Lora),
        ..elm.clone()
    };
    let r = lib.route(&qs, &lora_only).unwrap();
    assert!(r.ranked.iter().all(|e| e.expert_id == "b"));

    let without_c = RouteOptions {
        exclude: vec!["c".into()],
        ..RouteOptions::default()
    };
    let r = lib.route(&qs, &without_c).unwrap();
    assert!(r.ranked.iter().all(|e| e.expert_id != "c"));

    let strict = RouteOptions {
        abstain_threshold: 0.9,
        ..elm.clone()
    };
    let r = lib.route(&qs, &strict).unwrap();
    assert!(r.abstain && r.winner().is_none());

    for strategy in [Strategy::Elm, Strategy::Hybrid] {
        let o = RouteOptions {
            strategy,
            ..RouteOptions::default()
        };
        assert_eq!(
            lib.route(&qs, &o).unwrap(),
            lib.route(&qs, &o).unwrap(),
            "{strategy:?} is deterministic"
        );
    }
    assert!(matches!(
        lib.route(&[], &elm),
        Err(LibraryError::InvalidArgument { .. })
    ));
    assert!(matches!(
        lib.route(&[q("")], &elm),
        Err(LibraryError::InvalidArgument { .. })
    ));
    let zero_k = RouteOptions {
        top_k: 0,
        ..RouteOptions::default()
    };
    assert!(matches!(
        lib.route(&qs, &zero_k),
        Err(LibraryError::InvalidArgument { .. })
    ));
}

#[test]
fn hybrid_uses_query_targets_when_given() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = open(tmp.path());
    // Same inputs, different answers: only labeled queries can tell the experts apart.
    let mk = |id: &str, answer: &str| NewExpert {
        instances: (0..6)
            .map(|i| Instance {
                input: format!("context word number {i}"),
                target: Some(format!("{answer} {i}")),
                choices: vec![],
            })
            .collect(),
        ..expert(id, &[], prompt_adapter())
    };
    lib.register(mk("ask", "why question"), false).unwrap();
    lib.register(mk("tell", "sentence answer"), false).unwrap();
    let labeled: Vec<Query> = (10..14)
        .map(|i| Query {
            input: format!("context word number {i}"),
            choices: vec![],
            target: Some(format!("sentence answer {i}")),
        })
        .collect();
    let r = lib.route(&labeled, &RouteOptions::default()).unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "tell");
    let r = lib
        .route(
            &labeled,
            &RouteOptions {
                exclude: vec!["tell".into()],
                ..RouteOptions::default()
            },
        )
        .unwrap();
    assert_eq!(r.winner().unwrap().expert_id, "ask");
}

#[test]
fn batching_encoder_keeps_each_callers_vectors() {
    use roe_encoder::BatchingEncoder;
    let inner: Arc<dyn Encoder> = Arc::new(BagOfWords("bow".into()));
    let batching = Arc::new(BatchingEncoder::new(inner.clone(), 64));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let b = batching.clone();
            std::thread::spawn(move || {
                let texts: Vec<String> = (0..5)
                    .map(|i| format!("thread {t} text {i} word{t}x{i}"))
                    .collect();
                (texts.clone(), b.embed(&texts).unwrap())
            })
        })
        .collect();
    for h in handles {
        let (texts, got) = h.join().unwrap();
        assert_eq!(got, inner.embed(&texts).unwrap());
    }
    assert!(batching.embed(&[]).unwrap().is_empty());
}

#[test]
fn a_withdrawn_route_stops_between_encoder_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = open(tmp.path());
    lib.register(expert("a", &["cat", "dog"], prompt_adapter()), false)
        .unwrap();
    let queries: Vec<Query> = (0..100).map(|i| q(&format!("cat {i}"))).collect();
    let asked = std::sync::atomic::AtomicUsize::new(0);
    // Wanted for the first batch only.
    let wanted = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 1;
    let e = lib
        .route_while(&queries, &RouteOptions::default(), &wanted)
        .unwrap_err();
    assert!(matches!(e, LibraryError::Cancelled), "{e:?}");
    // Asked once per batch until it said no: the other batches were never embedded.
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    let routed = lib
        .route_while(&queries, &RouteOptions::default(), &|| true)
        .unwrap();
    assert_eq!(routed.winner().unwrap().expert_id, "a");
}

#[test]
fn the_byte_quota_counts_what_survives_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = {
        let lib = open(tmp.path());
        lib.register(expert("a", &["cat", "dog"], prompt_adapter()), false)
            .unwrap();
        lib.register(expert("b", &["fish"], lora_adapter()), false)
            .unwrap();
        lib.delete("b").unwrap();
        lib.stored_bytes()
    };
    // The adapter and two instances with their vectors.
    assert!(bytes > prompt_adapter().safetensors.len() as u64 + 2 * 512 * 4);
    let lib = open(tmp.path());
    assert_eq!(lib.stored_bytes(), bytes);
}

/// Counts the texts it embeds, so a test can tell a route served from the cache.
struct CountingEncoder {
    inner: BagOfWords,
    texts: std::sync::atomic::AtomicUsize,
}

impl Encoder for CountingEncoder {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn embed(&self, texts: &[String]) -> roe_expert_library::Result<Vec<Vec<f32>>> {
        self.texts
            .fetch_add(texts.len(), std::sync::atomic::Ordering::SeqCst);
        self.inner.embed(texts)
    }
}

#[test]
fn the_route_cache_answers_repeats_and_forgets_at_every_write() {
    use roe_expert_library::library::DEFAULT_ROUTE_CACHE_BYTES;
    use roe_expert_library::RouteCacheStats;
    use std::sync::atomic::Ordering::SeqCst;

    let tmp = tempfile::tempdir().unwrap();
    let encoder = Arc::new(CountingEncoder {
        inner: BagOfWords::new(),
        texts: Default::default(),
    });
    let config = LibraryConfig {
        route_cache_bytes: DEFAULT_ROUTE_CACHE_BYTES,
        ..LibraryConfig::default()
    };
    let lib = ExpertLibrary::open(tmp.path(), encoder.clone(), config)
        .unwrap()
        .0;
    lib.register(expert("a", &["apple", "pear"], prompt_adapter()), false)
        .unwrap();
    lib.register(expert("c", &["rocket", "engine"], prompt_adapter()), false)
        .unwrap();
    let qs = [
        q("rocket rocket story launch"),
        q("engine engine story launch"),
    ];
    let elm = RouteOptions::elm(TextFormat::Instance);
    let stats = |hits, misses| Some(RouteCacheStats { hits, misses });

    let first = lib.route(&qs, &elm).unwrap();
    assert_eq!(first.winner().unwrap().expert_id, "c");
    let embedded = encoder.texts.load(SeqCst);
    let again = lib.route(&qs, &elm).unwrap();
    assert_eq!(again, first);
    assert_eq!(encoder.texts.load(SeqCst), embedded, "a hit embeds nothing");
    assert_eq!(lib.route_cache_stats(), stats(1, 1));

    // Other options, or the same queries in another order, are other routes.
    let without_c = RouteOptions {
        exclude: vec!["c".into()],
        ..elm.clone()
    };
    let other = lib.route(&qs, &without_c).unwrap();
    assert_eq!(other.winner().unwrap().expert_id, "a");
    let reversed = [qs[1].clone(), qs[0].clone()];
    lib.route(&reversed, &elm).unwrap();
    assert_eq!(lib.route_cache_stats(), stats(1, 3));

    // A new expert that fits better must win at once, not after the cache ages out.
    let better = NewExpert {
        instances: qs
            .iter()
            .map(|q| Instance {
                input: q.input.clone(),
                target: None,
                choices: vec![],
            })
            .collect(),
        ..expert("b", &[], prompt_adapter())
    };
    lib.register(better, false).unwrap();
    let after_register = lib.route(&qs, &elm).unwrap();
    assert_eq!(after_register.winner().unwrap().expert_id, "b");
    assert_eq!(lib.route_cache_stats(), stats(1, 4));

    lib.delete("b").unwrap();
    let after_delete = lib.route(&qs, &elm).unwrap();
    assert_eq!(after_delete, first);
    assert_eq!(lib.route_cache_stats(), stats(1, 5));
    assert_eq!(lib.route(&qs, &elm).unwrap(), first);
    assert_eq!(lib.route_cache_stats(), stats(2, 5));

    // Refused input is refused before the cache is asked.
    assert!(lib.route(&[], &elm).is_err());
    assert_eq!(lib.route_cache_stats(), stats(2, 5));
    drop(lib);

    let lib = open(tmp.path());
    lib.route(&qs, &elm).unwrap();
    assert_eq!(lib.route_cache_stats(), None, "0 bytes: no cache");
}
