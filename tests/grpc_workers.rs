//! Split deployments and worker health: every call to another roe process has a deadline
//! (a stopped router is UNAVAILABLE, a router that does not answer is DEADLINE_EXCEEDED, and
//! neither hangs a request), and gRPC health follows the workers behind each service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roe_expert_library::embedding::Encoder;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_expert_library::{LibraryError, Query};
use roe_services::proto::{self, router_server::Router, router_server::RouterServer};
use roe_services::remote::{RemoteExpertSource, RemoteRouter, RemoteTimeouts};
use roe_services::server::{serve, serve_inference, ServeOptions};
use roe_serving::{
    BackboneInference, ErrorKind, ExpertSource, RouteOverrides, RouteService, ServingConfig,
};
use roe_tests::{backbone, TestServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

fn timeouts(request_ms: u64) -> RemoteTimeouts {
    RemoteTimeouts {
        connect: Duration::from_millis(500),
        request: Duration::from_millis(request_ms),
    }
}

fn query() -> Query {
    Query {
        input: "Is this spam? Win a free phone now".into(),
        choices: vec![],
        target: None,
    }
}

/// A router that takes its time: what a real router cannot be made to do on demand.
struct SlowRouter;

#[tonic::async_trait]
impl Router for SlowRouter {
    async fn route(
        &self,
        _request: tonic::Request<proto::RouteRequest>,
    ) -> Result<tonic::Response<proto::RouteResponse>, tonic::Status> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(tonic::Response::new(proto::RouteResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_does_not_answer_is_deadline_exceeded() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        Server::builder()
            .add_service(RouterServer::new(SlowRouter))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let router =
        RemoteRouter::new(&url, timeouts(300), Default::default(), &Default::default()).unwrap();
    let started = Instant::now();
    let e = router
        .route(vec![query()], RouteOverrides::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_router_process_is_unavailable_to_inference() {
    let router = TestServer::start().await;
    let url = router.url.clone();
    let experts = Arc::new(
        RemoteExpertSource::new(
            &url,
            timeouts(2_000),
            Default::default(),
            &Default::default(),
        )
        .unwrap(),
    );
    let routes = Arc::new(
        RemoteRouter::new(
            &url,
            timeouts(2_000),
            Default::default(),
            &Default::default(),
        )
        .unwrap(),
    );
    // Reachable: the remote library's own status comes back.
    let e = experts.meta("no-such-expert").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let e = routes
        .route(vec![query()], RouteOverrides::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{e}");
    assert!(e.message.contains("no experts yet"), "{e}");
    router.stop().await;

    // The inference process over the stopped router, served for real.
    let inference = Arc::new(BackboneInference::start(
        backbone(),
        experts.clone(),
        "smollm2-135m",
        ServingConfig::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_inference(
        listener,
        inference,
        ServeOptions {
            route_client: Some(routes.clone()),
            ..ServeOptions::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(served_url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::inference_client::InferenceClient::new(channel.clone());
    let started = Instant::now();
    let e = client
        .score(proto::ScoreRequest {
            expert_id: "sms_spam_prompt".into(),
            input: "Win a free phone".into(),
            choices: vec!["spam".into(), "ham".into()],
            truncate: false,
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the expert library"), "{e:?}");
    let e = proto::answerer_client::AnswererClient::new(channel.clone())
        .answer(proto::AnswerRequest {
            inputs: vec![proto::AnswerInput {
                input: "Win a free phone".into(),
                choices: vec!["spam".into(), "ham".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the router"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The bare backbone needs no other process.
    let bare = client
        .score(proto::ScoreRequest {
            expert_id: String::new(),
            input: "Win a free phone".into(),
            choices: vec!["spam".into(), "ham".into()],
            truncate: false,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bare.choices.len(), 2);
    let _ = stop.send(());
    let _ = server.await;
}

/// An encoder whose worker can be made to die: health must follow it.
struct DyingEncoder {
    alive: Arc<AtomicBool>,
}

impl Encoder for DyingEncoder {
    fn id(&self) -> &str {
        "dying"
    }
    fn dim(&self) -> usize {
        4
    }
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, LibraryError> {
        if !self.alive.load(Ordering::Relaxed) {
            return Err(LibraryError::Encoder(
                "the encoder worker has stopped".into(),
            ));
        }
        Ok(texts.iter().map(|_| vec![0.5; 4]).collect())
    }
    fn is_healthy(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

async fn health_of(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_encoder_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let alive = Arc::new(AtomicBool::new(true));
    let encoder: Arc<dyn Encoder> = Arc::new(DyingEncoder {
        alive: alive.clone(),
    });
    let (library, _) = ExpertLibrary::open(
        tmp.path().join("library"),
        encoder,
        LibraryConfig::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(library),
        ServeOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    for service in ["", "roe.v1.ExpertLibrary", "roe.v1.Router"] {
        assert_eq!(health_of(&mut health, service).await, serving, "{service}");
    }
    alive.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while health_of(&mut health, "roe.v1.Router").await != not_serving {
        assert!(
            Instant::now() < deadline,
            "health never followed the encoder"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for service in ["", "roe.v1.ExpertLibrary"] {
        assert_eq!(
            health_of(&mut health, service).await,
            not_serving,
            "{service}"
        );
    }
    alive.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while health_of(&mut health, "").await != serving {
        assert!(Instant::now() < deadline, "health never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let _ = server.await;
}
