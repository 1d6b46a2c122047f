//! The ExpertLibrary gRPC service against a real server, real sled files and the real encoder.

use roe_services::proto::{self, register_expert_chunk::Part};
use roe_tests::*;
use sha2::Digest;
use tonic::Code;

fn bytes_of_prompt(rows: usize, cols: usize, value: f32) -> Vec<u8> {
    let data: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), rows * cols)
        .flatten()
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, cols], &data)
            .unwrap();
    safetensors::serialize([("prompt_embeddings", view)], None).unwrap()
}

const PROMPT_CONFIG: &str =
    r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":20,"token_dim":576}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_get_list_delete_and_versions() {
    let server = TestServer::start().await;
    let mut c = server.library().await;

    let r = c
        .register_expert(register_request("sms_spam", "prompt", "sms_spam", 12))
        .await
        .unwrap()
        .into_inner();
    let e = r.expert.unwrap();
    assert_eq!(
        (e.id.as_str(), e.version, e.num_instances),
        ("sms_spam", 1, 12)
    );
    assert_eq!(e.kind, proto::ExpertKind::Prompt as i32);
    assert_eq!(e.num_virtual_tokens, 20);
    assert_eq!(e.backbone, "smollm2-135m");

    let lora = c
        .register_expert(register_request("sms_spam/lora", "lora", "sms_spam", 5))
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(lora.kind, proto::ExpertKind::Lora as i32);
    assert_eq!((lora.lora_r, lora.lora_alpha), (4, 8.0));
    assert_eq!(lora.target_modules, vec!["q_proj", "v_proj"]);

    // Same id again: ALREADY_EXISTS, and the stored expert is untouched.
    let err = c
        .register_expert(register_request("sms_spam", "prompt", "sms_spam", 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let got = c
        .get_expert(proto::GetExpertRequest {
            id: "sms_spam".into(),
            include_instances: true,
            include_adapter: true,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.expert.as_ref().unwrap().num_instances, 12);
    assert_eq!(got.instances.len(), 12);
    assert_eq!(got.instances[0].choices, vec!["ham", "spam"]);
    assert_eq!(
        got.adapter.unwrap().adapter_model_safetensors,
        peft("prompt", "sms_spam").adapter_model_safetensors
    );

    // A new version replaces it.
    let mut req = register_request("sms_spam", "prompt", "sms_spam", 3);
    req.new_version = true;
    let v2 = c
        .register_expert(req)
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!((v2.version, v2.num_instances), (2, 3));

    // Add instances.
    let t = task("sms_spam");
    let added = c
        .add_instances(proto::AddInstancesRequest {
            id: "sms_spam".into(),
            instances: instances(&t, 4, 9),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(added.num_instances, 7);

    // Paging: three experts, pages of two.
    c.register_expert(register_request(
        "movie_sentiment",
        "prompt",
        "movie_sentiment",
        4,
    ))
    .await
    .unwrap();
    let p1 = c
        .list_experts(proto::ListExpertsRequest {
            page_size: 2,
            page_token: String::new(),
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.total, 3);
    assert_eq!(
        p1.experts.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        vec!["movie_sentiment", "sms_spam"]
    );
    assert!(!p1.next_page_token.is_empty());
    let p2 = c
        .list_experts(proto::ListExpertsRequest {
            page_size: 2,
            page_token: p1.next_page_token,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        p2.experts.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        vec!["sms_spam/lora"]
    );
    assert!(p2.next_page_token.is_empty());

    // Delete, then it is gone everywhere.
    c.delete_expert(proto::DeleteExpertRequest {
        id: "sms_spam/lora".into(),
        expected_version: None,
    })
    .await
    .unwrap();
    let err = c
        .get_expert(proto::GetExpertRequest {
            id: "sms_spam/lora".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .delete_expert(proto::DeleteExpertRequest {
            id: "sms_spam/lora".into(),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("sms_spam/lora"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_registration_assembles_chunks() {
    let server = TestServer::start().await;
    let mut c = server.library().await;
    let mut header = register_request("streamed", "lora", "sms_spam", 0);
    let adapter = header.adapter.take().unwrap();
    header.adapter = Some(proto::PeftAdapter {
        adapter_config_json: adapter.adapter_config_json,
        adapter_model_safetensors: vec![],
    });
    // The client announces the file's length and SHA-256 (hex, as sha256sum prints it).
    let file = adapter.adapter_model_safetensors.clone();
    let sha: String = sha2::Sha256::digest(&file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    header.safetensors_bytes = Some(file.len() as u64);
    header.safetensors_sha256 = sha.clone();
    let t = task("sms_spam");
    let stream_of = |header: proto::RegisterExpertRequest, chunks: Vec<Vec<u8>>| {
        let mut msgs = vec![proto::RegisterExpertChunk {
            part: Some(Part::Header(header)),
        }];
        for chunk in chunks {
            msgs.push(proto::RegisterExpertChunk {
                part: Some(Part::SafetensorsChunk(chunk)),
            });
        }
        for i in instances(&t, 6, 1) {
            msgs.push(proto::RegisterExpertChunk {
                part: Some(Part::Instance(i)),
            });
        }
        tokio_stream::iter(msgs)
    };
    let chunks: Vec<Vec<u8>> = file.chunks(10_000).map(<[u8]>::to_vec).collect();
    assert!(chunks.len() > 2);

    // Two chunks swapped, or one lost: refused, naming what did not match, nothing stored.
    let mut swapped = chunks.clone();
    swapped.swap(0, 1);
    let err = c
        .register_expert_stream(stream_of(header.clone(), swapped))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("safetensors_sha256"), "{err:?}");
    let lost = chunks[1..].to_vec();
    let err = c
        .register_expert_stream(stream_of(header.clone(), lost))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("safetensors_bytes"), "{err:?}");
    let err = c
        .get_expert(proto::GetExpertRequest {
            id: "streamed".into(),
            include_instances: false,
            include_adapter: false,
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let e = c
        .register_expert_stream(stream_of(header, chunks))
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!((e.num_instances, e.lora_r), (6, 4));
    assert_eq!(e.weights_bytes as usize, file.len());
    assert_eq!(e.safetensors_sha256, sha, "the file's own SHA-256");

    // A stream that does not start with a header is refused.
    let bad = vec![proto::RegisterExpertChunk {
        part: Some(Part::SafetensorsChunk(vec![1, 2, 3])),
    }];
    let err = c
        .register_expert_stream(tokio_stream::iter(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_experts_get_clear_statuses_and_change_nothing() {
    let server = TestServer::start().await;
    let mut c = server.library().await;
    c.register_expert(register_request("kept", "prompt", "sms_spam", 3))
        .await
        .unwrap();

    let base = || register_request("bad", "prompt", "sms_spam", 3);
    let with_adapter = |config: &str, weights: Vec<u8>| {
        let mut r = base();
        r.adapter = Some(proto::PeftAdapter {
            adapter_config_json: config.to_string(),
            adapter_model_safetensors: weights,
        });
        r
    };
    let with_id = |id: &str| {
        let mut r = base();
        r.id = id.into();
        r
    };
    let cases: Vec<(&str, proto::RegisterExpertRequest, Code, &str)> = vec![
        ("id ..", with_id(".."), Code::InvalidArgument, "id"),
        ("id /", with_id("/"), Code::InvalidArgument, "id"),
        (
            "id with ..",
            with_id("../../etc/passwd"),
            Code::InvalidArgument,
            "id",
        ),
        ("id a//b", with_id("a//b"), Code::InvalidArgument, "id"),
        (
            "long description",
            {
                let mut r = base();
                r.description = "d".repeat(70_000);
                r
            },
            Code::InvalidArgument,
            "invalid description",
        ),
        (
            "long name",
            {
                let mut r = base();
                r.name = "n".repeat(2_000);
                r
            },
            Code::InvalidArgument,
            "invalid name",
        ),
        (
            "no adapter",
            {
                let mut r = base();
                r.adapter = None;
                r
            },
            Code::InvalidArgument,
            "adapter",
        ),
        (
            "config not JSON",
            with_adapter("{not json", bytes_of_prompt(20, 576, 0.1)),
            Code::InvalidArgument,
            "adapter_config",
        ),
        (
            "unsupported peft_type",
            with_adapter(r#"{"peft_type":"IA3"}"#, bytes_of_prompt(20, 576, 0.1)),
            Code::InvalidArgument,
            "peft_type",
        ),
        (
            "weights not safetensors",
            with_adapter(PROMPT_CONFIG, b"garbage".to_vec()),
            Code::InvalidArgument,
            "weights",
        ),
        (
            "wrong token dim",
            with_adapter(
                r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":20}"#,
                bytes_of_prompt(20, 512, 0.1),
            ),
            Code::FailedPrecondition,
            "576",
        ),
        (
            "row count mismatch",
            with_adapter(PROMPT_CONFIG, bytes_of_prompt(10, 576, 0.1)),
            Code::InvalidArgument,
            "num_virtual_tokens",
        ),
        (
            "NaN weights",
            with_adapter(PROMPT_CONFIG, bytes_of_prompt(20, 576, f32::NAN)),
            Code::InvalidArgument,
            "NaN",
        ),
        (
            "LoRA config on prompt weights",
            with_adapter(
                &peft("lora", "sms_spam").adapter_config_json,
                bytes_of_prompt(20, 576, 0.1),
            ),
            Code::InvalidArgument,
            "prompt_embeddings",
        ),
        (
            "bad id",
            {
                let mut r = base();
                r.id = "has space".into();
                r
            },
            Code::InvalidArgument,
            "id",
        ),
        (
            "empty id",
            {
                let mut r = base();
                r.id = String::new();
                r
            },
            Code::InvalidArgument,
            "id",
        ),
        (
            "no instances",
            {
                let mut r = base();
                r.instances.clear();
                r
            },
            Code::InvalidArgument,
            "instances",
        ),
        (
            "empty instance",
            {
                let mut r = base();
                r.instances[1].input = "  ".into();
                r
            },
            Code::InvalidArgument,
            "instances[1].input",
        ),
        (
            "huge instance",
            {
                let mut r = base();
                r.instances[0].input = "x".repeat(100_000);
                r
            },
            Code::ResourceExhausted,
            "instances[0].input",
        ),
        (
            "unknown backbone",
            {
                let mut r = base();
                r.backbone = "llama-70b".into();
                r
            },
            Code::InvalidArgument,
            "backbone",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = c.register_expert(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            err.message()
        );
    }
    // A LoRA with a layer too few is refused as not fitting the backbone.
    let lora = peft("lora", "sms_spam");
    let st = safetensors::SafeTensors::deserialize(&lora.adapter_model_safetensors).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("layers.29."))
        .collect();
    let truncated = safetensors::serialize(kept, None).unwrap();
    let err = c
        .register_expert(with_adapter(&lora.adapter_config_json, truncated))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let list = c
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.experts
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        vec!["kept"]
    );
    let err = c
        .add_instances(proto::AddInstancesRequest {
            id: "missing".into(),
            instances: instances(&task("sms_spam"), 1, 0),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // An empty id names no expert: the field is the problem, not a missing expert.
    let err = c
        .get_expert(proto::GetExpertRequest {
            id: String::new(),
            include_instances: false,
            include_adapter: false,
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("id"), "{err:?}");
    let err = c
        .delete_expert(proto::DeleteExpertRequest {
            id: String::new(),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .list_experts(proto::ListExpertsRequest {
            page_size: 1001,
            page_token: String::new(),
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_size"), "{err:?}");
    // The documented maximum is accepted.
    c.list_experts(proto::ListExpertsRequest {
        page_size: 1000,
        page_token: String::new(),
        min_library_seq: 0,
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_experts_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    let server = TestServer::start_in(dir.clone()).await;
    let mut c = server.library().await;
    for (id, t) in [("sms_spam", "sms_spam"), ("language_id", "language_id")] {
        c.register_expert(register_request(id, "prompt", t, 10))
            .await
            .unwrap();
    }
    c.delete_expert(proto::DeleteExpertRequest {
        id: "language_id".into(),
        expected_version: None,
    })
    .await
    .unwrap();
    c.register_expert(register_request(
        "movie_sentiment",
        "lora",
        "movie_sentiment",
        10,
    ))
    .await
    .unwrap();
    drop(c);
    server.stop().await;

    let server = TestServer::start_in(dir).await;
    let mut c = server.library().await;
    let list = c
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.experts
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        vec!["movie_sentiment", "sms_spam"]
    );
    // Routable right after the restart, from vectors reloaded off disk.
    let mut r = server.router().await;
    let routed = r
        .route(proto::RouteRequest {
            queries: queries(&task("sms_spam"), 8, 3),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "sms_spam");
    assert!(routed.ranked.iter().all(|e| e.expert_id != "language_id"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = TestServer::start().await;
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "roe.v1.ExpertLibrary", "roe.v1.Router"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    // Reflection: the services a client like grpcurl discovers, and a method's descriptor.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |message: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "roe.v1.Router.Route".into(),
        )),
    ];
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let listed = replies.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "roe.v1.ExpertLibrary",
        "roe.v1.Router",
        "roe.v1.Inference",
        "roe.v1.Answerer",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let file = replies.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::FileDescriptorResponse(file)) = file else {
        panic!("expected the file holding roe.v1.Router.Route, got {file:?}");
    };
    assert!(!file.file_descriptor_proto.is_empty());
    server.stop().await;
}
