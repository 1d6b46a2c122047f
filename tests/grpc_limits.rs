//! Quotas and limits over gRPC against a real server: each refusal is RESOURCE_EXHAUSTED
//! naming the field and the limit, and leaves the library as it was.

use proto::expert_library_client::ExpertLibraryClient;
use roe_expert_library::library::{LibraryConfig, Limits};
use roe_services::proto;
use roe_tests::{announced, queries, register_request, task, ServerExtras, TestServer};
use tonic::transport::Channel;
use tonic::Code;

fn config(limits: Limits) -> LibraryConfig {
    LibraryConfig {
        limits,
        ..LibraryConfig::default()
    }
}

async fn ids(lib: &mut ExpertLibraryClient<Channel>) -> Vec<String> {
    lib.list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experts
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn assert_exhausted(e: &tonic::Status, field: &str, limit: &str) {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().starts_with(field), "{field}: {e:?}");
    assert!(e.message().contains(limit), "{limit}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_count_and_library_bytes_are_quotas() {
    // Room for two experts.
    let server = TestServer::start_with(
        config(Limits {
            max_experts: 2,
            ..Limits::default()
        }),
        false,
        ServerExtras::default(),
    )
    .await;
    let mut lib = server.library().await;
    for id in ["a", "b"] {
        lib.register_expert(register_request(id, "prompt", "sms_spam", 8))
            .await
            .unwrap();
    }
    let e = lib
        .register_expert(register_request("c", "prompt", "sms_spam", 8))
        .await
        .unwrap_err();
    assert_exhausted(&e, "experts:", "max_experts is 2");
    assert_eq!(ids(&mut lib).await, ["a", "b"]);
    // A new version replaces, so it takes no new place.
    let mut again = register_request("a", "prompt", "sms_spam", 8);
    again.new_version = true;
    lib.register_expert(again).await.unwrap();
    lib.delete_expert(proto::DeleteExpertRequest { id: "b".into() })
        .await
        .unwrap();
    lib.register_expert(register_request("c", "prompt", "sms_spam", 8))
        .await
        .unwrap();
    drop(server);

    // Room for one expert's bytes and a little more.
    let one = {
        let server = TestServer::start().await;
        let mut lib = server.library().await;
        lib.register_expert(register_request("a", "prompt", "sms_spam", 8))
            .await
            .unwrap();
        server.stored_bytes()
    };
    assert!(one > 40_000, "{one}");
    let server = TestServer::start_with(
        config(Limits {
            max_library_bytes: one + one / 4,
            ..Limits::default()
        }),
        false,
        ServerExtras::default(),
    )
    .await;
    let mut lib = server.library().await;
    lib.register_expert(register_request("a", "prompt", "sms_spam", 8))
        .await
        .unwrap();
    let e = lib
        .register_expert(register_request("b", "prompt", "sms_spam", 8))
        .await
        .unwrap_err();
    assert_exhausted(&e, "library:", "max_library_bytes");
    // Instances count too: enough of them pass the quota.
    let t = task("sms_spam");
    let e = lib
        .add_instances(proto::AddInstancesRequest {
            id: "a".into(),
            instances: roe_tests::instances(&t, 400, 7),
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "library:", "max_library_bytes");
    let a = lib
        .get_expert(proto::GetExpertRequest {
            id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(a.num_instances, 8);
    assert_eq!(ids(&mut lib).await, ["a"]);
    // Deleting gives the room back.
    lib.delete_expert(proto::DeleteExpertRequest { id: "a".into() })
        .await
        .unwrap();
    lib.register_expert(register_request("b", "prompt", "sms_spam", 8))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_past_their_limit_are_refused_before_they_are_held() {
    use proto::register_expert_chunk::Part;
    let server = TestServer::start_with(
        config(Limits {
            max_adapter_bytes: 10_000,
            ..Limits::default()
        }),
        false,
        ServerExtras::default(),
    )
    .await;
    let mut lib = server.library().await;
    let e = lib
        .register_expert(register_request("a", "prompt", "sms_spam", 8))
        .await
        .unwrap_err();
    assert_exhausted(
        &e,
        "adapter.adapter_model_safetensors:",
        "max_adapter_bytes is 10000",
    );

    // Streamed with its length announced: refused on the header, before any weights.
    let mut header = announced(register_request("a", "prompt", "sms_spam", 8));
    let weights = std::mem::take(&mut header.adapter.as_mut().unwrap().adapter_model_safetensors);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::RegisterExpertChunk {
        part: Some(Part::Header(header.clone())),
    })
    .await
    .unwrap();
    // The stream stays open: the refusal cannot have waited for its end.
    let e = lib
        .register_expert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_exhausted(&e, "safetensors_bytes:", "max_adapter_bytes is 10000");
    drop(tx);

    // Announced under the limit but sent past it: refused at the chunk that passes the limit.
    header.safetensors_bytes = Some(1000);
    let mut chunks = vec![proto::RegisterExpertChunk {
        part: Some(Part::Header(header)),
    }];
    for c in weights.chunks(4096) {
        chunks.push(proto::RegisterExpertChunk {
            part: Some(Part::SafetensorsChunk(c.to_vec())),
        });
    }
    let e = lib
        .register_expert_stream(tokio_stream::iter(chunks))
        .await
        .unwrap_err();
    assert_exhausted(
        &e,
        "adapter.adapter_model_safetensors:",
        "max_adapter_bytes is 10000",
    );
    assert!(ids(&mut lib).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_and_route_text_are_bounded_everywhere() {
    let server = TestServer::start().await;
    let mut lib = server.library().await;
    let long = "c".repeat(Limits::default().max_choice_bytes + 1);
    let mut bad = register_request("a", "prompt", "sms_spam", 4);
    bad.instances[2].choices = vec!["ham".into(), long.clone()];
    let e = lib.register_expert(bad).await.unwrap_err();
    assert_exhausted(&e, "instances[2].choices[1]", "at most 4096");
    lib.register_expert(register_request("a", "prompt", "sms_spam", 4))
        .await
        .unwrap();
    let e = lib
        .add_instances(proto::AddInstancesRequest {
            id: "a".into(),
            instances: vec![proto::Instance {
                input: "is this spam?".into(),
                choices: vec![long.clone()],
                target: None,
            }],
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "instances[0].choices[0]", "at most 4096");

    let mut router = server.router().await;
    let mut qs = queries(&task("sms_spam"), 3, 1);
    qs[1].choices = vec![long];
    let e = router
        .route(proto::RouteRequest {
            queries: qs,
            options: None,
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "queries[1].choices[0]", "at most 4096");
    // Each query within its limit, all of them past the request's.
    let big = proto::Query {
        input: "x ".repeat(30_000),
        choices: vec![],
        target: None,
    };
    let e = router
        .route(proto::RouteRequest {
            queries: vec![big; 20],
            options: None,
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "queries:", "at most 1048576");
    // Nothing of it was stored.
    let a = lib
        .get_expert(proto::GetExpertRequest {
            id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(a.num_instances, 4);
}

/// Past --max-concurrent-uploads a registration is refused at once; the place is free again
/// when the upload in progress ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_at_once_are_bounded() {
    use proto::register_expert_chunk::Part;
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            max_uploads: 1,
            ..Default::default()
        },
    )
    .await;
    let mut lib = server.library().await;
    // Refused on its own merits while no upload is in progress (an empty id).
    let probe = || {
        let mut r = register_request("", "prompt", "sms_spam", 2);
        r.id.clear();
        r
    };
    let open_upload = || {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(proto::RegisterExpertChunk {
            part: Some(Part::Header(announced(register_request(
                "held", "prompt", "sms_spam", 2,
            )))),
        })
        .unwrap();
        let url = server.url.clone();
        let upload = tokio::spawn(async move {
            ExpertLibraryClient::connect(url)
                .await
                .unwrap()
                .register_expert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, upload)
    };
    let (mut tx, mut upload) = open_upload();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        assert!(std::time::Instant::now() < deadline, "never refused");
        // The probe may hold the place as the upload arrives: that upload is refused and
        // another opened.
        if upload.is_finished() {
            let lost = upload.await.unwrap().unwrap_err();
            assert_eq!(lost.code(), Code::ResourceExhausted, "{lost:?}");
            (tx, upload) = open_upload();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let e = lib.register_expert(probe()).await.unwrap_err();
        if e.code() == Code::ResourceExhausted {
            break e;
        }
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    };
    assert!(refused.message().starts_with("uploads:"), "{refused:?}");
    assert!(
        refused.message().contains("--max-concurrent-uploads"),
        "{refused:?}"
    );
    // The upload ends and is stored; the next registration has its place.
    drop(tx);
    upload.await.unwrap().unwrap();
    let e = lib.register_expert(probe()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    lib.register_expert(register_request("next", "prompt", "sms_spam", 2))
        .await
        .unwrap();
    assert_eq!(ids(&mut lib).await, ["held", "next"]);
}

/// A message over the server's 64 MiB limit is RESOURCE_EXHAUSTED (as gRPC specifies), not
/// tonic's OUT_OF_RANGE, and names the way around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted() {
    let server = TestServer::start().await;
    let mut lib = ExpertLibraryClient::connect(server.url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(128 << 20);
    let mut r = register_request("big", "prompt", "sms_spam", 2);
    r.adapter.as_mut().unwrap().adapter_model_safetensors = vec![0u8; 70 << 20];
    let e = lib.register_expert(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().starts_with("message: found"), "{e:?}");
    assert!(e.message().contains("RegisterExpertStream"), "{e:?}");
    assert!(ids(&mut lib.clone()).await.is_empty());
}

/// Per-request work on the backbone is bounded: choices, ensembles, Answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_per_request_is_bounded() {
    let server = TestServer::start_with_inference().await;
    let mut inference = server.inference().await;
    let long = "c".repeat(roe_serving::RequestLimits::default().max_choice_bytes + 1);
    let e = inference
        .score(proto::ScoreRequest {
            expert_id: String::new(),
            input: "is it?".into(),
            choices: vec!["yes".into(), long],
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "choices[1]", "at most 4096");
    // 16 members reading 20 KiB each: 320 KiB, past 256 KiB. Refused before any member is
    // looked up (none exists).
    let e = inference
        .score_ensemble(proto::ScoreEnsembleRequest {
            expert_ids: (0..16).map(|i| format!("m{i}")).collect(),
            input: "x ".repeat(10_000),
            choices: vec!["yes".into(), "no".into()],
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "expert_ids:", "max_work_bytes");
    let mut answerer = server.answerer().await;
    let e = answerer
        .answer(proto::AnswerRequest {
            inputs: (0..64)
                .map(|i| proto::AnswerInput {
                    input: format!("{i} {}", "y ".repeat(2500)),
                    choices: vec!["yes".into(), "no".into()],
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_exhausted(&e, "inputs:", "max_work_bytes");
}
