//! The Router gRPC service: real encoder, real index, real tasks.

use roe_services::proto;
use roe_tests::*;
use tonic::Code;

const TASKS: [&str; 5] = [
    "sms_spam",
    "language_id",
    "movie_sentiment",
    "strategyqa",
    "reddit_qa",
];

async fn library_of_five() -> TestServer {
    let server = TestServer::start().await;
    let mut c = server.library().await;
    for t in TASKS {
        c.register_expert(register_request(t, "prompt", t, 30))
            .await
            .unwrap();
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_each_task_to_its_expert_with_evidence() {
    let server = library_of_five().await;
    let mut r = server.router().await;
    for strategy in [proto::Strategy::Elm, proto::Strategy::Hybrid] {
        for t in TASKS {
            let resp = r
                .route(proto::RouteRequest {
                    queries: queries(&task(t), 8, 1),
                    options: Some(proto::RouteOptions {
                        strategy: strategy as i32,
                        evidence_per_query: 2,
                        ..Default::default()
                    }),
                    min_library_seq: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(resp.expert_id, t, "{strategy:?}: {:?}", resp.ranked);
            assert!(!resp.abstain);
            assert_eq!(resp.evidence.len(), 8);
            assert!(resp
                .evidence
                .iter()
                .all(|e| !e.hits.is_empty() && e.hits.len() <= 2));
            let top = &resp.ranked[0];
            assert!(top.share > 0.0 && top.share <= 1.0);
            assert!(top.mean_similarity > 0.0);
            // Ranking is sorted and deterministic.
            assert!(resp.ranked.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }
    // The same request twice gives the same answer.
    let req = proto::RouteRequest {
        queries: queries(&task("strategyqa"), 5, 7),
        options: None,
        min_library_seq: 0,
    };
    let a = r.route(req.clone()).await.unwrap().into_inner();
    let b = r.route(req).await.unwrap().into_inner();
    assert_eq!(a, b);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_experts_route_at_once_and_deleted_ones_never_win() {
    let server = library_of_five().await;
    let mut c = server.library().await;
    let mut r = server.router().await;
    let q = queries(&task("tweet_sentiment"), 8, 2);
    let before = r
        .route(proto::RouteRequest {
            queries: q.clone(),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(before.expert_id, "tweet_sentiment");
    c.register_expert(register_request(
        "tweet_sentiment",
        "lora",
        "tweet_sentiment",
        30,
    ))
    .await
    .unwrap();
    let after = r
        .route(proto::RouteRequest {
            queries: q.clone(),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.expert_id, "tweet_sentiment");
    // Kind filter: only prompt experts compete, so the LoRA cannot win.
    let prompts_only = r
        .route(proto::RouteRequest {
            queries: q.clone(),
            options: Some(proto::RouteOptions {
                kind: proto::ExpertKind::Prompt as i32,
                ..Default::default()
            }),
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(prompts_only.expert_id, "tweet_sentiment");
    // Exclusion (leave-one-out) and deletion.
    let excluded = r
        .route(proto::RouteRequest {
            queries: q.clone(),
            options: Some(proto::RouteOptions {
                exclude: vec!["tweet_sentiment".into()],
                ..Default::default()
            }),
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(excluded
        .ranked
        .iter()
        .all(|e| e.expert_id != "tweet_sentiment"));
    c.delete_expert(proto::DeleteExpertRequest {
        id: "tweet_sentiment".into(),
        expected_version: None,
    })
    .await
    .unwrap();
    let gone = r
        .route(proto::RouteRequest {
            queries: q,
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.ranked.iter().all(|e| e.expert_id != "tweet_sentiment"));
    assert!(gone
        .evidence
        .iter()
        .flat_map(|e| &e.hits)
        .all(|h| h.expert_id != "tweet_sentiment"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abstains_below_the_threshold() {
    let server = library_of_five().await;
    let mut r = server.router().await;
    let resp = r
        .route(proto::RouteRequest {
            queries: queries(&task("sms_spam"), 8, 1),
            options: Some(proto::RouteOptions {
                abstain_threshold: Some(1.0),
                ..Default::default()
            }),
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.abstain);
    assert!(resp.expert_id.is_empty());
    assert!(!resp.ranked.is_empty(), "the ranking is still reported");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_route_requests_get_clear_statuses() {
    let server = TestServer::start().await;
    let mut r = server.router().await;
    // Empty library: nothing to route to.
    let err = r
        .route(proto::RouteRequest {
            queries: queries(&task("sms_spam"), 2, 0),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut c = server.library().await;
    c.register_expert(register_request("sms_spam", "prompt", "sms_spam", 5))
        .await
        .unwrap();
    let q = |input: &str| proto::Query {
        input: input.into(),
        choices: vec![],
        target: None,
    };
    let cases: Vec<(&str, proto::RouteRequest, Code, &str)> = vec![
        (
            "no queries",
            proto::RouteRequest {
                queries: vec![],
                options: None,
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "queries",
        ),
        (
            "blank query",
            proto::RouteRequest {
                queries: vec![q("ok"), q("   ")],
                options: None,
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "queries[1].input",
        ),
        (
            "oversized query",
            proto::RouteRequest {
                queries: vec![q(&"y".repeat(70_000))],
                options: None,
                min_library_seq: 0,
            },
            Code::ResourceExhausted,
            "queries[0].input",
        ),
        (
            "too many queries",
            proto::RouteRequest {
                queries: vec![q("a"); 2000],
                options: None,
                min_library_seq: 0,
            },
            Code::ResourceExhausted,
            "queries",
        ),
        (
            "bad strategy",
            proto::RouteRequest {
                queries: vec![q("a")],
                options: Some(proto::RouteOptions {
                    strategy: 42,
                    ..Default::default()
                }),
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "strategy",
        ),
        (
            "bad kind",
            proto::RouteRequest {
                queries: vec![q("a")],
                options: Some(proto::RouteOptions {
                    kind: 9,
                    ..Default::default()
                }),
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "kind",
        ),
        (
            "huge top_k",
            proto::RouteRequest {
                queries: vec![q("a")],
                options: Some(proto::RouteOptions {
                    top_k: 100_000,
                    ..Default::default()
                }),
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "top_k",
        ),
        (
            "threshold out of range",
            proto::RouteRequest {
                queries: vec![q("a")],
                options: Some(proto::RouteOptions {
                    abstain_threshold: Some(2.0),
                    ..Default::default()
                }),
                min_library_seq: 0,
            },
            Code::InvalidArgument,
            "abstain_threshold",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = r.route(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: {:?}",
            err.message()
        );
    }
    // The server is still healthy after all that.
    let ok = r
        .route(proto::RouteRequest {
            queries: vec![q("WINNER!! claim your prize now")],
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().expert_id, "sms_spam");
    server.stop().await;
}
