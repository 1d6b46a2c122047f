//! Replicas of `roe serve` sharing one library in PostgreSQL: real processes on 127.0.0.1, a
//! real database (made for the test and dropped after it). A write acknowledged by one
//! replica is read on another with `min_library_seq`, the follower applies writes without
//! being asked, a replica killed with SIGKILL restarts from the database, and a database URL
//! that cannot work fails the start with a clear message.
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roe_library_pg::testing::TestDatabase;
use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, router_client::RouterClient,
};
use roe_task_suite::{sample, Task};
use tonic::Code;

use common::{register_request, repo, start_serve_with, KillOnDrop};

fn task(name: &str) -> Task {
    Task::load(repo().join("assets/tasks").join(name)).unwrap()
}

/// A router replica (no backbone) on the shared database, its index dump in `dir`.
fn replica(db: &TestDatabase, dir: &std::path::Path) -> (KillOnDrop, String) {
    let (child, url) = start_serve_with(
        dir,
        &[
            "--no-inference",
            "--database-url",
            &db.url,
            "--follow-interval-ms",
            "500",
        ],
    );
    (KillOnDrop(child), url)
}

fn route_request(task: &Task, min_library_seq: u64) -> proto::RouteRequest {
    proto::RouteRequest {
        queries: sample(&task.test, 6, 4)
            .into_iter()
            .map(|i| proto::Query {
                input: i.input,
                choices: i.choices,
                target: None,
            })
            .collect(),
        options: None,
        min_library_seq,
    }
}

async fn ids(c: &mut ExpertLibraryClient<tonic::transport::Channel>, min: u64) -> Vec<String> {
    c.list_experts(proto::ListExpertsRequest {
        min_library_seq: min,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .experts
    .into_iter()
    .map(|e| e.id)
    .collect()
}

/// The database's client blocks: it is made and dropped outside the test's runtime.
#[test]
fn replicas_share_one_library_through_postgresql() {
    let db = TestDatabase::create();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(replicas_share(&db));
}

async fn replicas_share(db: &TestDatabase) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, url_a) = replica(db, &tmp.path().join("a"));
    let (b, url_b) = replica(db, &tmp.path().join("b"));
    let mut lib_a = ExpertLibraryClient::connect(url_a.clone()).await.unwrap();
    let mut lib_b = ExpertLibraryClient::connect(url_b.clone()).await.unwrap();
    let mut router_b = RouterClient::connect(url_b.clone()).await.unwrap();
    let (spam, lang) = (task("sms_spam"), task("language_id"));

    // A write on A is routable on B once B has applied its seq.
    let first = lib_a
        .register_expert(register_request("sms_spam", "prompt", &spam, 10, false))
        .await
        .unwrap()
        .into_inner();
    assert!(first.library_seq >= 1);
    let second = lib_a
        .register_expert(register_request("language_id", "prompt", &lang, 10, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.library_seq,
        first.library_seq + 1,
        "seqs are gapless"
    );
    let routed = router_b
        .route(route_request(&lang, second.library_seq))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "language_id");

    // The same id registered on B: ALREADY_EXISTS, as on A.
    let dup = lib_b
        .register_expert(register_request("sms_spam", "prompt", &spam, 10, false))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

    // Compare-and-set across replicas: B replaces version 1; A's stale expectation loses.
    let mut v2 = register_request("sms_spam", "lora", &spam, 10, true);
    v2.expected_version = Some(1);
    let replaced = lib_b.register_expert(v2).await.unwrap().into_inner();
    assert_eq!(replaced.expert.as_ref().unwrap().version, 2);
    let mut stale = register_request("sms_spam", "prompt", &spam, 10, true);
    stale.expected_version = Some(1);
    let lost = lib_a.register_expert(stale).await.unwrap_err();
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
    let got = lib_a
        .get_expert(proto::GetExpertRequest {
            id: "sms_spam".into(),
            min_library_seq: replaced.library_seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.expert.unwrap().version, 2);

    // The follower applies writes without a read asking for them.
    let deleted = lib_b
        .delete_expert(proto::DeleteExpertRequest {
            id: "language_id".into(),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    while ids(&mut lib_a, 0)
        .await
        .contains(&"language_id".to_string())
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica A never applied seq {} on its own",
            deleted.library_seq
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A seq no replica has committed: UNAVAILABLE naming it, in bounded time.
    let t = Instant::now();
    let far = lib_a
        .get_expert(proto::GetExpertRequest {
            id: "sms_spam".into(),
            min_library_seq: deleted.library_seq + 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(far.code(), Code::Unavailable, "{far:?}");
    assert!(far
        .message()
        .contains(&(deleted.library_seq + 1000).to_string()));
    assert!(t.elapsed() < Duration::from_secs(10));

    // B killed with SIGKILL; A writes meanwhile; B restarts from the database.
    drop(b);
    let third = lib_a
        .register_expert(register_request("language_id", "lora", &lang, 10, false))
        .await
        .unwrap()
        .into_inner();
    let (_b, url_b) = replica(db, &tmp.path().join("b"));
    let mut lib_b = ExpertLibraryClient::connect(url_b).await.unwrap();
    assert_eq!(
        ids(&mut lib_b, third.library_seq).await,
        vec!["language_id".to_string(), "sms_spam".to_string()]
    );
    drop(a);
}

#[test]
fn a_database_that_cannot_work_fails_the_start_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    for (url, expect) in [
        ("postgres://roe:s3cret-pw@127.0.0.1:1/roe", "unavailable"),
        (
            "postgres://roe:s3cret-pw@127.0.0.1:5432/roe?sslmode=bogus",
            "database_url",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_roe"))
            .args([
                "serve",
                "--no-inference",
                "--addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(tmp.path().join("lib"))
            .arg("--models-dir")
            .arg(common::models_dir())
            .args(["--database-url", url])
            .env("ROE_HTTP_ADDR", "")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{url}: started");
        assert!(stderr.contains(expect), "{url}: {stderr}");
        assert!(
            !stderr.contains("s3cret-pw"),
            "{url}: the password shows: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{url}: {stderr}");
    }
}

/// A TCP proxy in front of the database that the test can cut: the network between a replica
/// and PostgreSQL failing (established connections reset, new ones refused once accepted),
/// which a running server cannot show for one database alone.
struct Cuttable {
    addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Cuttable {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (open2, links2) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().unwrap().push(link.abort_handle());
            }
        });
        Self { addr, open, links }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_replica_answers_from_memory_while_its_database_is_unreachable() {
    let db = TestDatabase::create();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(database_outage(&db));
}

async fn database_outage(db: &TestDatabase) {
    let tmp = tempfile::tempdir().unwrap();
    let proxy = Cuttable::start(db.server_addr()).await;
    let through = db.url_through(proxy.addr);
    let (child, url_a) = start_serve_with(
        &tmp.path().join("a"),
        &[
            "--no-inference",
            "--database-url",
            &through,
            "--follow-interval-ms",
            "300",
        ],
    );
    let _a = KillOnDrop(child);
    let (_b, url_b) = replica(db, &tmp.path().join("b"));
    let mut lib_a = ExpertLibraryClient::connect(url_a.clone()).await.unwrap();
    let mut lib_b = ExpertLibraryClient::connect(url_b).await.unwrap();
    let mut router_a = RouterClient::connect(url_a).await.unwrap();
    let (spam, lang) = (task("sms_spam"), task("language_id"));
    lib_a
        .register_expert(register_request("sms_spam", "prompt", &spam, 10, false))
        .await
        .unwrap();

    proxy.cut();
    // Reads answer from memory.
    let routed = router_a.route(route_request(&spam, 0)).await.unwrap();
    assert_eq!(routed.into_inner().expert_id, "sms_spam");
    assert_eq!(ids(&mut lib_a, 0).await, vec!["sms_spam".to_string()]);
    // Writes fail at once, naming the store, and leave nothing behind.
    let t = Instant::now();
    let refused = lib_a
        .register_expert(register_request("language_id", "prompt", &lang, 10, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database"),
        "{}",
        refused.message()
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // Another replica writes meanwhile.
    let written = lib_b
        .register_expert(register_request("language_id", "lora", &lang, 10, false))
        .await
        .unwrap()
        .into_inner();

    proxy.restore();
    // A catches up by itself, and writes again.
    let started = Instant::now();
    while ids(&mut lib_a, 0).await.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "replica A never caught up to seq {}",
            written.library_seq
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = lib_a
        .get_expert(proto::GetExpertRequest {
            id: "language_id".into(),
            min_library_seq: written.library_seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.expert.unwrap().kind, proto::ExpertKind::Lora as i32);
    lib_a
        .delete_expert(proto::DeleteExpertRequest {
            id: "sms_spam".into(),
            expected_version: Some(1),
        })
        .await
        .unwrap();
}
