//! Quotas and limits over gRPC against a real server: each refusal is RESOURCE_EXHAUSTED
//! naming the field and the limit, and leaves the library as it was.

use std::time::{Duration, Instant};

use proto::expert_library_client::ExpertLibraryClient;
use roe_expert_library::library::{LibraryConfig, Limits};
use roe_services::library_service::{registration_bytes, streamed_registration_bytes};
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

/// A streamed registration that sends `header` and then nothing until `tx` sends more or is
/// dropped: it holds its place (and its share of the budget) for as long as the stream is open.
type HeldUpload = (
    tokio::sync::mpsc::Sender<proto::RegisterExpertChunk>,
    tokio::task::JoinHandle<Result<tonic::Response<proto::RegisterExpertResponse>, tonic::Status>>,
);

fn held_upload(url: &str, header: proto::RegisterExpertRequest) -> HeldUpload {
    use proto::register_expert_chunk::Part;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.try_send(proto::RegisterExpertChunk {
        part: Some(Part::Header(header)),
    })
    .unwrap();
    let url = url.to_string();
    let upload = tokio::spawn(async move {
        ExpertLibraryClient::connect(url)
            .await
            .unwrap()
            .register_expert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (tx, upload)
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
    lib.delete_expert(proto::DeleteExpertRequest {
        id: "b".into(),
        expected_version: None,
    })
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
            expected_version: None,
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
    lib.delete_expert(proto::DeleteExpertRequest {
        id: "a".into(),
        expected_version: None,
    })
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

    // Announced under the limit but sent past it: refused at the first chunk past what was
    // announced, before the limit.
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
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("safetensors_bytes: 1000 announced, 4096 received"),
        "{e:?}"
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
            expected_version: None,
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
            min_library_seq: 0,
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
            min_library_seq: 0,
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

/// Past --max-concurrent-uploads a streamed registration waits for a place, and is refused
/// when none comes free within --upload-queue-timeout-ms; unary registrations are not
/// counted (they are bounded by their bytes), and the place is free again when the upload in
/// progress ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_uploads_at_once_are_bounded() {
    use proto::register_expert_chunk::Part;
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            max_uploads: 1,
            upload_queue_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    )
    .await;
    let mut lib = server.library().await;
    // A whole stream refused on its own merits once it has a place (an empty id).
    let probe = || {
        let mut r = register_request("", "prompt", "sms_spam", 2);
        r.id.clear();
        tokio_stream::iter(vec![proto::RegisterExpertChunk {
            part: Some(Part::Header(r)),
        }])
    };
    let open_upload = || {
        let header = announced(register_request("held", "prompt", "sms_spam", 2));
        held_upload(&server.url, header)
    };
    let (mut tx, mut upload) = open_upload();
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        assert!(Instant::now() < deadline, "never refused");
        // The probe may hold the place as the upload arrives: the upload then waits for it
        // (and is refused only if the probe outlasts the timeout; another is opened).
        if upload.is_finished() {
            let lost = upload.await.unwrap().unwrap_err();
            assert_eq!(lost.code(), Code::ResourceExhausted, "{lost:?}");
            (tx, upload) = open_upload();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let e = lib.register_expert_stream(probe()).await.unwrap_err();
        if e.code() == Code::ResourceExhausted {
            assert!(started.elapsed() >= Duration::from_secs(1), "{e:?}");
            break e;
        }
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    };
    assert!(refused.message().starts_with("uploads:"), "{refused:?}");
    for flag in ["--max-concurrent-uploads", "--upload-queue-timeout-ms"] {
        assert!(refused.message().contains(flag), "{flag}: {refused:?}");
    }
    // A unary registration takes no place among the streams.
    lib.register_expert(register_request("unary", "prompt", "sms_spam", 2))
        .await
        .unwrap();
    // The upload ends and is stored; the next stream has its place.
    drop(tx);
    upload.await.unwrap().unwrap();
    let e = lib.register_expert_stream(probe()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(ids(&mut lib).await, ["held", "unary"]);
}

/// The byte budget of uploads in flight: 8 clients registering 5 small experts each, with
/// room for about two registrations at once, all succeed: they queue for the budget instead
/// of being refused for their number (issue 26: `--max-concurrent-uploads 4` refused 36 of
/// these 40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_small_registrations_queues_for_the_byte_budget() {
    let request = |client: usize, k: usize| {
        register_request(&format!("c{client}-{k}"), "prompt", "sms_spam", 5)
    };
    let largest = (0..8)
        .flat_map(move |c| (0..5).map(move |k| registration_bytes(&request(c, k))))
        .max()
        .unwrap();
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            upload_budget_bytes: largest * 5 / 2,
            // Long enough for the whole burst to pass through two places on a busy machine:
            // what is tested is that nothing is refused for waiting its turn.
            upload_queue_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        },
    )
    .await;
    let mut clients = Vec::new();
    for c in 0..8 {
        let mut lib = server.library().await;
        clients.push(tokio::spawn(async move {
            for k in 0..5 {
                lib.register_expert(request(c, k)).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for client in clients {
        client.await.unwrap().unwrap();
    }
    let mut lib = server.library().await;
    assert_eq!(ids(&mut lib).await.len(), 40);
}

/// A registration larger than the whole byte budget is refused at once, unary or streamed
/// (announced on its header, before any weights): no wait could make room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_over_the_whole_budget_is_refused_at_once() {
    use proto::register_expert_chunk::Part;
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            upload_budget_bytes: 10_000,
            upload_queue_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await;
    let mut lib = server.library().await;
    let whole = register_request("big", "prompt", "sms_spam", 2);
    let needs = registration_bytes(&whole);
    assert!(needs > 10_000, "{needs}");
    let started = Instant::now();
    let e = lib.register_expert(whole.clone()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30), "it waited");
    assert_exhausted(&e, "uploads:", "budget of uploads in flight, 10000 bytes");
    assert!(
        e.message().contains(&format!("needs {needs} bytes")),
        "{e:?}"
    );
    assert!(
        e.message().contains("--max-upload-bytes-in-flight"),
        "{e:?}"
    );

    // Streamed, its length announced: refused on the header while the stream stays open.
    let mut header = announced(whole);
    std::mem::take(&mut header.adapter.as_mut().unwrap().adapter_model_safetensors);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::RegisterExpertChunk {
        part: Some(Part::Header(header)),
    })
    .await
    .unwrap();
    let started = Instant::now();
    let e = lib
        .register_expert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30), "it waited");
    assert_exhausted(&e, "uploads:", "budget of uploads in flight, 10000 bytes");
    drop(tx);
    assert!(ids(&mut lib).await.is_empty());
}

/// While a streamed registration holds most of the byte budget, another that needs more than
/// what remains waits: it is refused after --upload-queue-timeout-ms, naming the budget, its
/// size, its own bytes and the wait, and it passes when the first ends within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_waits_for_the_budget_then_passes_or_is_refused() {
    use proto::register_expert_chunk::Part;
    // Long enough for the held registration to be stored (its instances embedded) on a busy
    // machine once it is let go, short enough to wait out.
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut held = announced(register_request("held", "prompt", "sms_spam", 2));
    let weights = std::mem::take(&mut held.adapter.as_mut().unwrap().adapter_model_safetensors);
    let held_bytes = streamed_registration_bytes(&held, Limits::default().max_adapter_bytes);
    let second = register_request("second", "prompt", "sms_spam", 2);
    let second_bytes = registration_bytes(&second);
    // Either fits alone, not both together.
    let budget = held_bytes + second_bytes / 2;
    assert!(second_bytes <= budget && held_bytes + second_bytes > budget + 1024);
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            upload_budget_bytes: budget,
            upload_queue_timeout: Some(TIMEOUT),
            ..Default::default()
        },
    )
    .await;
    let mut lib = server.library().await;
    // As large as the second, refused on its own merits once it has its share (an empty id).
    let probe = || {
        let mut r = second.clone();
        r.id.clear();
        r
    };
    let probe_bytes = registration_bytes(&probe());
    assert!(held_bytes + probe_bytes > budget + 1024);
    // The held registration announces its weights and sends none until told to: its share
    // stays taken for as long as its stream is open.
    let open_upload = || held_upload(&server.url, held.clone());
    let (mut tx, mut upload) = open_upload();
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        assert!(Instant::now() < deadline, "never refused");
        // The probe may take the budget as the upload arrives: the upload then waits for it.
        if upload.is_finished() {
            let lost = upload.await.unwrap().unwrap_err();
            assert_eq!(lost.code(), Code::ResourceExhausted, "{lost:?}");
            (tx, upload) = open_upload();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let e = lib.register_expert(probe()).await.unwrap_err();
        if e.code() == Code::ResourceExhausted {
            assert!(
                started.elapsed() >= TIMEOUT,
                "refused before the timeout: {e:?}"
            );
            break e;
        }
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    };
    assert_exhausted(
        &refused,
        "uploads: waited",
        &format!("budget of uploads in flight, {budget} bytes (--max-upload-bytes-in-flight)"),
    );
    assert!(
        refused
            .message()
            .contains(&format!("for {probe_bytes} bytes")),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--upload-queue-timeout-ms"),
        "{refused:?}"
    );

    // The second waits for the held one, which ends within the timeout: both are stored.
    let waiting = {
        let mut lib = server.library().await;
        let second = second.clone();
        tokio::spawn(async move { lib.register_expert(second).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the second did not wait");
    for chunk in weights.chunks(16 << 10) {
        tx.send(proto::RegisterExpertChunk {
            part: Some(Part::SafetensorsChunk(chunk.to_vec())),
        })
        .await
        .unwrap();
    }
    drop(tx);
    upload.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(ids(&mut lib).await, ["held", "second"]);
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
            truncate: false,
            min_library_seq: 0,
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
            truncate: false,
            min_library_seq: 0,
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
