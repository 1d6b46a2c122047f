//! Read-your-writes across replicas, end to end: a real gRPC server and the HTTP API on
//! 127.0.0.1 over one sled library and the real encoder (no backbone). Writes return the
//! `library_seq` they committed at and check `expected_version`; reads given a
//! `min_library_seq` (gRPC field, HTTP `roe-min-library-seq` header or body field) are served
//! once it is applied, or are UNAVAILABLE / 503 naming both seqs after the server's wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use roe_encoder::{BatchingEncoder, BertEncoder, DEFAULT_ENCODER_DIR};
use roe_expert_library::embedding::Encoder;
use roe_expert_library::{ExpertLibrary, LibraryConfig, RouteOptions};
use roe_http::HttpState;
use roe_services::proto::{
    self, expert_library_client::ExpertLibraryClient, register_expert_chunk::Part,
    router_client::RouterClient,
};
use roe_services::server::{serve, ServeOptions};
use roe_serving::LocalRouter;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

/// The wait the servers here give a read for its seq (the default is 2 s).
const WAIT: Duration = Duration::from_millis(500);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn encoder() -> Arc<dyn Encoder> {
    static ENCODER: OnceLock<Arc<dyn Encoder>> = OnceLock::new();
    ENCODER
        .get_or_init(|| {
            let models = std::env::var_os("ROE_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo().join("models"));
            let bert: Arc<dyn Encoder> = Arc::new(
                BertEncoder::load(models.join(DEFAULT_ENCODER_DIR), 256)
                    .expect("encoder (run scripts/fetch-models.sh)"),
            );
            Arc::new(BatchingEncoder::new(bert, 256))
        })
        .clone()
}

fn adapter(task: &str) -> proto::PeftAdapter {
    let dir = repo().join("assets/experts/smollm2-135m/prompt").join(task);
    proto::PeftAdapter {
        adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    }
}

fn instance(input: &str, target: &str, choices: &[&str]) -> proto::Instance {
    proto::Instance {
        input: input.into(),
        target: Some(target.into()),
        choices: choices.iter().map(|c| c.to_string()).collect(),
    }
}

fn spam_instances() -> Vec<proto::Instance> {
    let c = &["ham", "spam"];
    vec![
        instance(
            "WINNER!! Claim your free prize now, text WIN to 80086",
            "spam",
            c,
        ),
        instance("Are we still meeting for lunch at noon?", "ham", c),
        instance(
            "URGENT: your account has been selected for a cash reward",
            "spam",
            c,
        ),
    ]
}

fn movie_instances() -> Vec<proto::Instance> {
    let c = &["negative", "positive"];
    vec![
        instance("A moving, beautifully acted film.", "positive", c),
        instance("Two hours I will never get back.", "negative", c),
        instance("The plot drags but the score is wonderful.", "positive", c),
    ]
}

fn register(id: &str, task: &str, instances: Vec<proto::Instance>) -> proto::RegisterExpertRequest {
    proto::RegisterExpertRequest {
        id: id.into(),
        name: id.into(),
        description: format!("{task} test expert"),
        adapter: Some(adapter(task)),
        instances,
        ..Default::default()
    }
}

/// A replica: gRPC and HTTP over one library, stopped when dropped.
struct Replica {
    grpc: String,
    http: SocketAddr,
    library: Arc<ExpertLibrary>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(min_seq_wait: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("library");
        let (library, _) = tokio::task::spawn_blocking(move || {
            ExpertLibrary::open(&path, encoder(), LibraryConfig::default())
        })
        .await
        .unwrap()
        .expect("library opens");
        let library = Arc::new(library);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
        tokio::spawn(serve(
            grpc,
            library.clone(),
            ServeOptions {
                min_seq_wait,
                ..ServeOptions::default()
            },
            until(stopped.clone()),
        ));

        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let router = Arc::new(LocalRouter::new(library.clone(), RouteOptions::default()));
        let mut state = HttpState::new(library.clone(), router, None, None);
        state.min_seq_wait = min_seq_wait;
        state.metrics = roe_http::metrics::install();
        tokio::spawn(roe_http::serve(http, state, None, until(stopped)));
        Self {
            grpc: grpc_url,
            http: http_addr,
            library,
            stop: Some(stop),
            _dir: dir,
        }
    }

    async fn library_client(&self) -> ExpertLibraryClient<Channel> {
        ExpertLibraryClient::connect(self.grpc.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn router_client(&self) -> RouterClient<Channel> {
        RouterClient::connect(self.grpc.clone()).await.unwrap()
    }

    /// One HTTP/1.1 request: status, headers and body (JSON when it parses, else a string).
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, axum::http::HeaderMap, Value) {
        let tcp = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.http.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(Body::new(body), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (parts.status.as_u16(), parts.headers, value)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

fn get(id: &str, min_library_seq: u64) -> proto::GetExpertRequest {
    proto::GetExpertRequest {
        id: id.into(),
        min_library_seq,
        ..Default::default()
    }
}

fn route(min_library_seq: u64) -> proto::RouteRequest {
    proto::RouteRequest {
        queries: vec![proto::Query {
            input: "Congratulations, you won a free cruise! Reply YES".into(),
            choices: vec!["ham".into(), "spam".into()],
            target: None,
        }],
        options: None,
        min_library_seq,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_return_rising_library_seqs_and_check_expected_versions() {
    let r = Replica::start(WAIT).await;
    let mut c = r.library_client().await;

    let a = c
        .register_expert(register("spam", "sms_spam", spam_instances()))
        .await
        .unwrap()
        .into_inner();
    assert!(a.library_seq > 0, "{a:?}");
    assert_eq!(a.expert.as_ref().unwrap().version, 1);
    let b = c
        .register_expert(register("movies", "movie_sentiment", movie_instances()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        b.library_seq > a.library_seq,
        "{} then {}",
        a.library_seq,
        b.library_seq
    );
    assert_eq!(r.library.library_seq(), b.library_seq);

    // Instances added at the version the client expects: same version, a later seq.
    let added = c
        .add_instances(proto::AddInstancesRequest {
            id: "spam".into(),
            instances: vec![instance(
                "Free entry in a weekly competition!",
                "spam",
                &["ham", "spam"],
            )],
            expected_version: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(added.library_seq > b.library_seq);
    let e = added.expert.unwrap();
    assert_eq!((e.version, e.num_instances), (1, 4));
    let stale = c
        .add_instances(proto::AddInstancesRequest {
            id: "spam".into(),
            instances: spam_instances(),
            expected_version: Some(3),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");

    // A delete expecting a version the expert is not at: ABORTED, and nothing is deleted.
    let seq = r.library.library_seq();
    let stale = c
        .delete_expert(proto::DeleteExpertRequest {
            id: "spam".into(),
            expected_version: Some(7),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert!(
        stale.message().contains('7') && stale.message().contains('1'),
        "{stale:?}"
    );
    let still = c.get_expert(get("spam", 0)).await.unwrap().into_inner();
    assert_eq!(still.expert.unwrap().version, 1);
    assert_eq!(
        r.library.library_seq(),
        seq,
        "a refused write commits nothing"
    );

    // A new version at the expected version: version + 1 (expected_version implies
    // new_version), a later seq; the same expectation again is stale.
    let mut next = register("spam", "sms_spam", spam_instances());
    next.expected_version = Some(1);
    let v2 = c.register_expert(next.clone()).await.unwrap().into_inner();
    assert_eq!(v2.expert.unwrap().version, 2);
    assert!(v2.library_seq > seq);
    let stale = c.register_expert(next).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");

    // The streamed registration carries it in its header.
    let mut header = register("spam", "sms_spam", Vec::new());
    let weights = header.adapter.as_mut().unwrap();
    let chunk = std::mem::take(&mut weights.adapter_model_safetensors);
    let announced = roe_expert_library::PeftAdapter {
        config_json: String::new(),
        safetensors: chunk.clone(),
    };
    header.safetensors_bytes = Some(chunk.len() as u64);
    header.safetensors_sha256 = announced.safetensors_sha256_hex();
    let stream = |expected: u64| {
        let mut header = header.clone();
        header.expected_version = Some(expected);
        let mut parts = vec![Part::Header(header), Part::SafetensorsChunk(chunk.clone())];
        parts.extend(spam_instances().into_iter().map(Part::Instance));
        tokio_stream::iter(
            parts
                .into_iter()
                .map(|p| proto::RegisterExpertChunk { part: Some(p) })
                .collect::<Vec<_>>(),
        )
    };
    let stale = c.register_expert_stream(stream(1)).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let v3 = c
        .register_expert_stream(stream(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v3.expert.unwrap().version, 3);
    assert!(v3.library_seq > v2.library_seq);

    // Merge: a new expert, then its next version only at the version expected.
    let merge = |expected_version: Option<u64>| proto::MergeExpertsRequest {
        id: "merged".into(),
        sources: ["spam", "movies"]
            .into_iter()
            .map(|id| proto::MergeSource {
                expert_id: id.into(),
                weight: None,
            })
            .collect(),
        expected_version,
        ..Default::default()
    };
    let m1 = c.merge_experts(merge(None)).await.unwrap().into_inner();
    assert_eq!(m1.expert.unwrap().version, 1);
    assert!(m1.library_seq > v3.library_seq);
    let stale = c.merge_experts(merge(Some(4))).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let m2 = c.merge_experts(merge(Some(1))).await.unwrap().into_inner();
    assert_eq!(m2.expert.unwrap().version, 2);
    assert!(m2.library_seq > m1.library_seq);

    // A delete at the current version goes through, at a later seq.
    let gone = c
        .delete_expert(proto::DeleteExpertRequest {
            id: "spam".into(),
            expected_version: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.library_seq > m2.library_seq);
    assert_eq!(gone.expert.unwrap().version, 3);
    let e = c.get_expert(get("spam", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reads_wait_for_min_library_seq() {
    let r = Replica::start(WAIT).await;
    let mut lib = r.library_client().await;
    let mut router = r.router_client().await;
    let seq = lib
        .register_expert(register("spam", "sms_spam", spam_instances()))
        .await
        .unwrap()
        .into_inner()
        .library_seq;

    // An applied seq is served at once.
    let started = Instant::now();
    let got = lib.get_expert(get("spam", seq)).await.unwrap().into_inner();
    assert_eq!(got.expert.unwrap().id, "spam");
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    let listed = lib
        .list_experts(proto::ListExpertsRequest {
            min_library_seq: seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total, 1);
    let routed = router.route(route(seq)).await.unwrap().into_inner();
    assert_eq!(routed.ranked[0].expert_id, "spam");

    // A seq this replica never applies: UNAVAILABLE after about the server's wait, naming
    // the seq it has and the one asked for.
    let far = seq + 1000;
    for call in ["GetExpert", "ListExperts", "Route"] {
        let started = Instant::now();
        let e = match call {
            "GetExpert" => lib.get_expert(get("spam", far)).await.map(|_| ()),
            "ListExperts" => lib
                .list_experts(proto::ListExpertsRequest {
                    min_library_seq: far,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            _ => router.route(route(far)).await.map(|_| ()),
        }
        .unwrap_err();
        let waited = started.elapsed();
        assert_eq!(e.code(), Code::Unavailable, "{call}: {e:?}");
        assert!(
            e.message().contains(&format!("up to seq {seq}"))
                && e.message().contains(&far.to_string()),
            "{call}: {e:?}"
        );
        assert!(
            waited >= WAIT && waited < WAIT + Duration::from_secs(3),
            "{call}: {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_until_the_write_it_names_is_applied() {
    let r = Replica::start(Duration::from_secs(30)).await;
    let mut lib = r.library_client().await;
    let seq = lib
        .register_expert(register("spam", "sms_spam", spam_instances()))
        .await
        .unwrap()
        .into_inner()
        .library_seq;
    // The next write's seq, asked for before the write happens.
    let waiting = {
        let mut lib = lib.clone();
        tokio::spawn(async move { lib.get_expert(get("movies", seq + 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    let written = lib
        .register_expert(register("movies", "movie_sentiment", movie_instances()))
        .await
        .unwrap()
        .into_inner();
    assert!(written.library_seq > seq);
    let got = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(got.expert.unwrap().id, "movies");

    // The call's deadline bounds the wait (30 s here): UNAVAILABLE naming the seqs just
    // before it passes, rather than DEADLINE_EXCEEDED.
    let far = written.library_seq + 1000;
    let mut short = tonic::Request::new(get("movies", far));
    short.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let e = lib.get_expert(short).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&far.to_string()), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reads_take_roe_min_library_seq() {
    let r = Replica::start(WAIT).await;
    let seq = r
        .library_client()
        .await
        .register_expert(register("spam", "sms_spam", spam_instances()))
        .await
        .unwrap()
        .into_inner()
        .library_seq;
    let header = roe_http::MIN_LIBRARY_SEQ_HEADER;
    assert_eq!(header, "roe-min-library-seq");
    let (seq_s, far) = (seq.to_string(), seq + 1000);
    let far_s = far.to_string();

    // Not a number: 400 naming the header, before any wait.
    for bad in ["abc", "-1", "1.5", ""] {
        let (status, _, body) = r
            .call("GET", "/v1/roe/experts", &[(header, bad)], None)
            .await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["error"]["param"], header, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(header),
            "{body}"
        );
    }

    // Applied: served at once, by every kind of read.
    let route_body = json!({"queries": [{"input": "You won a free cruise! Reply YES", "choices": ["ham", "spam"]}]});
    for (method, path, body) in [
        ("GET", "/v1/roe/experts", None),
        ("GET", "/v1/roe/experts/spam", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/spam", None),
        ("POST", "/v1/roe/route", Some(route_body.clone())),
    ] {
        let started = Instant::now();
        let routes = body.is_some();
        let (status, _, got) = r.call(method, path, &[(header, &seq_s)], body).await;
        assert_eq!(status, 200, "{method} {path}: {got}");
        // (Routing embeds the queries: not timed on a busy machine.)
        assert!(routes || started.elapsed() < WAIT, "{method} {path}");
    }

    // Never applied here: 503 after the wait, naming both seqs; the body field of roe's own
    // endpoints waits alike.
    let mut in_body = route_body.clone();
    in_body["minLibrarySeq"] = json!(far_s);
    for (path, headers, body) in [
        ("/v1/roe/experts/spam", vec![(header, far_s.as_str())], None),
        ("/v1/models", vec![(header, far_s.as_str())], None),
        (
            "/v1/roe/route",
            vec![(header, far_s.as_str())],
            Some(route_body.clone()),
        ),
        ("/v1/roe/route", vec![], Some(in_body)),
    ] {
        let method = if body.is_some() { "POST" } else { "GET" };
        let started = Instant::now();
        let (status, _, got) = r.call(method, path, &headers, body).await;
        let waited = started.elapsed();
        assert_eq!(status, 503, "{path}: {got}");
        let message = got["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("up to seq {seq}")) && message.contains(&far_s),
            "{path}: {got}"
        );
        assert!(
            waited >= WAIT && waited < WAIT + Duration::from_secs(3),
            "{path}: {waited:?}"
        );
    }

    // Health is public and never waits; it reports where the replica stands.
    let (status, _, health) = r.call("GET", "/health", &[(header, &far_s)], None).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    let l = &health["library"];
    assert_eq!(l["store"], "sled", "{health}");
    assert_eq!(l["shared"], false, "{health}");
    assert_eq!(l["applied_seq"], seq, "{health}");
    assert_eq!(l["head_seq"], seq, "{health}");
    assert_eq!(l["lag"], 0, "{health}");
    assert!(l["last_error"].is_null(), "{health}");
    assert!(health["backbone"].is_null(), "{health}");

    // And so do the metrics, at scrape time.
    let (status, _, metrics) = r.call("GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap_or_default().to_string();
    for (name, value) in [
        ("roe_library_applied_seq", seq_s.as_str()),
        ("roe_library_head_seq", seq_s.as_str()),
        ("roe_library_lag", "0"),
        ("roe_library_seconds_since_caught_up", "0"),
    ] {
        assert!(
            text.lines().any(|l| l == format!("{name} {value}")),
            "{name} {value} not in:\n{text}"
        );
    }

    // The API description names the header on the reads.
    let (_, _, doc) = r.call("GET", "/openapi.json", &[], None).await;
    let params = doc["paths"]["/v1/roe/route"]["post"]["parameters"].to_string();
    assert!(params.contains(header), "{params}");
    let props = &doc["components"]["schemas"]["roe.v1.RouteRequest"]["properties"];
    assert!(props.get("minLibrarySeq").is_some(), "{props}");
    let props = &doc["components"]["schemas"]["roe.v1.RegisterExpertResponse"]["properties"];
    assert!(props.get("librarySeq").is_some(), "{props}");
}

/// A process without a library of its own (`--role inference`) passes a request's seq on with
/// the reads it makes of the library process, which waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reads_pass_min_library_seq_on() {
    use roe_services::auth::ClientKey;
    use roe_services::consistency::Consistency;
    use roe_services::remote::{RemoteExpertSource, RemoteRouter, RemoteTimeouts};
    use roe_services::status::serving_status;
    use roe_serving::{ExpertSource, RouteOverrides, RouteService};

    let r = Replica::start(WAIT).await;
    let seq = r
        .library_client()
        .await
        .register_expert(register("spam", "sms_spam", spam_instances()))
        .await
        .unwrap()
        .into_inner()
        .library_seq;
    let channel = Channel::from_shared(r.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let timeouts = RemoteTimeouts::default();
    let experts =
        RemoteExpertSource::from_channel(channel.clone(), timeouts, ClientKey::new(None).unwrap());
    let router = RemoteRouter::from_channel(channel, timeouts, ClientKey::new(None).unwrap());
    let remote = Consistency::remote();
    let none = tonic::metadata::MetadataMap::new();
    let queries = || {
        vec![roe_expert_library::Query {
            input: "You won a free cruise! Reply YES".into(),
            choices: vec!["ham".into(), "spam".into()],
            target: None,
        }]
    };

    // Applied there: served.
    let meta = remote
        .read(seq, &none, async {
            experts.meta("spam").await.map_err(serving_status)
        })
        .await
        .unwrap();
    assert_eq!(meta.version, 1);
    let routed = remote
        .read(seq, &none, async {
            router
                .route(queries(), RouteOverrides::default())
                .await
                .map_err(serving_status)
        })
        .await
        .unwrap();
    assert_eq!(routed.ranked[0].expert_id, "spam");

    // Never applied there: the library process's UNAVAILABLE, naming both seqs.
    let far = seq + 1000;
    let e = remote
        .read(far, &none, async {
            experts.meta("spam").await.map_err(serving_status)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&far.to_string()), "{e:?}");
    let e = remote
        .read(far, &none, async {
            router
                .route(queries(), RouteOverrides::default())
                .await
                .map(|_| ())
                .map_err(serving_status)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&far.to_string()), "{e:?}");
    // Outside a request, nothing is forwarded.
    assert_eq!(experts.meta("spam").await.unwrap().version, 1);
}
