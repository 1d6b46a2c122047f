//! API keys on a real server: without a key nothing but health is served, a wrong key reads
//! nothing, a read key reads but cannot write (and leaves the library as it was), admin keys
//! (several, for rotation, in either header) do both.

use std::sync::Arc;

use roe_services::auth::{ApiKeys, AuthLayer};
use roe_services::proto;
use roe_tests::{announced, queries, register_request, task, TestServer};
use tonic::{Code, Request};

const ADMIN: &str = "admin-key-for-tests-0001";
const ROTATED: &str = "admin-key-rotated-in-0002";
const READ: &str = "read-key-for-tests-0003";

/// `message` with `header: value` metadata.
fn with<T>(message: T, header: &'static str, value: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(header, value.parse().unwrap());
    r
}

fn bearer<T>(message: T, key: &str) -> Request<T> {
    with(message, "authorization", &format!("Bearer {key}"))
}

fn list() -> proto::ListExpertsRequest {
    proto::ListExpertsRequest {
        page_size: 0,
        page_token: String::new(),
        min_library_seq: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_decide_who_reads_and_who_writes() {
    let keys = ApiKeys::parse(&format!("{ADMIN},ops:{ROTATED}"), READ).unwrap();
    let server = TestServer::start_with_auth(AuthLayer::new(Arc::new(keys), false)).await;
    let mut lib = server.library().await;

    // No key: refused, whatever the call; health stays public.
    let err = lib
        .register_expert(register_request("spam", "prompt", "sms_spam", 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().starts_with("authorization"), "{err:?}");
    let err = lib.list_experts(list()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "roe.v1.Router".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    // Reflection was made private: it needs a key too.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };
    let ask = || {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let err = reflection.server_reflection_info(ask()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(reflection
        .server_reflection_info(bearer(ask(), READ))
        .await
        .is_ok());

    // Admin keys write: the first as a bearer token, the rotated one in `api-key`.
    lib.register_expert(bearer(
        register_request("spam", "prompt", "sms_spam", 10),
        ADMIN,
    ))
    .await
    .unwrap();
    lib.register_expert(with(
        register_request("lang", "lora", "language_id", 10),
        "api-key",
        ROTATED,
    ))
    .await
    .unwrap();

    // A wrong key, or the right one under another scheme, reads nothing.
    for r in [
        bearer(list(), "not-a-key-of-this-server"),
        with(list(), "authorization", &format!("Basic {READ}")),
        bearer(list(), &READ[..READ.len() - 1]),
    ] {
        let err = lib.list_experts(r).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }

    // The read key reads: list, get, route, score.
    let listed = lib
        .list_experts(bearer(list(), READ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.experts.len(), 2);
    let get = |id: &str| proto::GetExpertRequest {
        id: id.into(),
        include_instances: true,
        include_adapter: false,
        min_library_seq: 0,
    };
    let before = lib
        .get_expert(bearer(get("spam"), READ))
        .await
        .unwrap()
        .into_inner();
    let routed = server
        .router()
        .await
        .route(bearer(
            proto::RouteRequest {
                queries: queries(&task("sms_spam"), 8, 1),
                options: None,
                min_library_seq: 0,
            },
            READ,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "spam");
    let row = &task("sms_spam").test[0];
    server
        .inference()
        .await
        .score(with(
            proto::ScoreRequest {
                expert_id: "spam".into(),
                input: row.input.clone(),
                choices: row.choices.clone(),
                truncate: false,
                min_library_seq: 0,
            },
            "api-key",
            READ,
        ))
        .await
        .unwrap();

    // ... but writes nothing: every write is PERMISSION_DENIED and the library is unchanged.
    let denied = |r: Result<tonic::Response<_>, tonic::Status>, what: &str| {
        let err = r.err().unwrap_or_else(|| panic!("{what} was allowed"));
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains("may only read"), "{what}: {err:?}");
    };
    denied(
        lib.register_expert(bearer(register_request("x", "prompt", "sms_spam", 5), READ))
            .await
            .map(|_| tonic::Response::new(())),
        "register",
    );
    denied(
        lib.delete_expert(bearer(
            proto::DeleteExpertRequest {
                id: "spam".into(),
                expected_version: None,
            },
            READ,
        ))
        .await
        .map(|_| tonic::Response::new(())),
        "delete",
    );
    denied(
        lib.add_instances(bearer(
            proto::AddInstancesRequest {
                id: "spam".into(),
                instances: before.instances.clone(),
                expected_version: None,
            },
            READ,
        ))
        .await
        .map(|_| tonic::Response::new(())),
        "add instances",
    );
    let mut training = server.training().await;
    denied(
        training
            .start_training(bearer(proto::StartTrainingRequest::default(), READ))
            .await
            .map(|_| tonic::Response::new(())),
        "start training",
    );
    // Reading the training queue is a read.
    let jobs = training
        .list_training_jobs(bearer(proto::ListTrainingJobsRequest {}, READ))
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty());
    let after = lib
        .get_expert(bearer(get("spam"), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.instances, before.instances);
    assert_eq!(
        lib.list_experts(bearer(list(), ADMIN))
            .await
            .unwrap()
            .into_inner()
            .experts
            .len(),
        2
    );
    // An admin key passes the check; the request itself is then judged as usual.
    let err = training
        .start_training(bearer(proto::StartTrainingRequest::default(), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// Past --max-concurrent-requests a call is refused at once (a call in flight holds its place
/// until it ends); health is still answered; the place is free again when the call ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_concurrency_bound_calls_are_refused_at_once() {
    use proto::register_expert_chunk::Part;
    use roe_services::load_shed::ConcurrencyLimitLayer;
    let server =
        TestServer::start_with_layers(false, AuthLayer::default(), ConcurrencyLimitLayer::new(1))
            .await;
    let mut lib = server.library().await;
    lib.list_experts(list()).await.unwrap();

    // An upload left open is a request in flight. With one place, a List polling beside it
    // may hold the place at the moment the upload arrives; that upload is refused itself and
    // another is opened.
    let open_upload = || {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut header = announced(register_request("held", "prompt", "sms_spam", 0));
        header
            .adapter
            .as_mut()
            .unwrap()
            .adapter_model_safetensors
            .clear();
        tx.try_send(proto::RegisterExpertChunk {
            part: Some(Part::Header(header)),
        })
        .unwrap();
        let url = server.url.clone();
        let upload = tokio::spawn(async move {
            let mut uploader = proto::expert_library_client::ExpertLibraryClient::connect(url)
                .await
                .unwrap();
            uploader
                .register_expert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, upload)
    };
    let (mut tx, mut upload) = open_upload();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "never refused while an upload was in flight"
        );
        if upload.is_finished() {
            let lost = upload.await.unwrap().unwrap_err();
            assert_eq!(lost.code(), Code::ResourceExhausted, "{lost:?}");
            (tx, upload) = open_upload();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if let Err(e) = lib.list_experts(list()).await {
            break e;
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max-concurrent-requests"),
        "{refused:?}"
    );
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1);

    // The upload ends (without weights: refused on its own merits); its place is free.
    drop(tx);
    let ended = upload.await.unwrap().unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    // The server lets the place go when it drops the finished body, a moment after the client
    // has read its end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = lib.list_experts(list()).await {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
