//! MergeExperts end to end: a real server on 127.0.0.1 over a real sled library, the bundled
//! PEFT experts, and (when the GGUF file is present) the real backbone scoring merged experts.

use std::collections::BTreeSet;

use roe_expert_library::expert::BackboneSpec;
use roe_services::proto::{self, expert_library_client::ExpertLibraryClient};
use roe_tests::{backbone_path, register_request, task, TestServer};
use tonic::transport::Channel;
use tonic::Code;

fn source(id: &str, weight: Option<f64>) -> proto::MergeSource {
    proto::MergeSource {
        expert_id: id.to_string(),
        weight,
    }
}

fn merge_req(id: &str, sources: Vec<proto::MergeSource>) -> proto::MergeExpertsRequest {
    proto::MergeExpertsRequest {
        id: id.to_string(),
        sources,
        ..Default::default()
    }
}

async fn get(
    c: &mut ExpertLibraryClient<Channel>,
    id: &str,
    adapter: bool,
) -> proto::GetExpertResponse {
    c.get_expert(proto::GetExpertRequest {
        id: id.to_string(),
        include_instances: true,
        include_adapter: adapter,
        min_library_seq: 0,
    })
    .await
    .unwrap_or_else(|s| panic!("get {id}: {s}"))
    .into_inner()
}

fn inputs(r: &proto::GetExpertResponse) -> BTreeSet<String> {
    r.instances.iter().map(|i| i.input.clone()).collect()
}

async fn expect_code(
    c: &mut ExpertLibraryClient<Channel>,
    req: proto::MergeExpertsRequest,
    code: Code,
    field: &str,
) {
    match c.merge_experts(req.clone()).await {
        Ok(r) => panic!("{req:?} succeeded: {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "{req:?}: {s}");
            assert!(
                s.message().contains(field),
                "{req:?}: message {:?} does not name {field:?}",
                s.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_experts_are_registered_with_rank_sum_and_instance_union() {
    // Our own temp dir: the library is reopened after a restart at the end.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("library");
    let server = TestServer::start_in(dir.clone()).await;
    let mut c = server.library().await;
    let loras = [
        ("email_lora", "email_spam"),
        ("sms_lora", "sms_spam"),
        ("snips_lora", "snips_intent"),
    ];
    for (id, t) in loras {
        c.register_expert(register_request(id, "lora", t, 6))
            .await
            .unwrap();
    }

    let merged = c
        .merge_experts(merge_req(
            "spam_mix",
            vec![
                source("email_lora", Some(5.0)),
                source("sms_lora", Some(3.0)),
                source("snips_lora", Some(2.0)),
            ],
        ))
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(merged.kind, proto::ExpertKind::Lora as i32);
    assert_eq!((merged.lora_r, merged.lora_alpha), (12, 12.0));
    assert_eq!(merged.target_modules, vec!["q_proj", "v_proj"]);
    assert_eq!(merged.version, 1);
    assert_eq!(
        merged.description,
        "merged from email_lora, sms_lora, snips_lora (weights 0.5, 0.3, 0.2)"
    );

    // Get shows the same, with the union of the sources' instances and weights that the
    // library's own validation and the backbone runtime accept.
    let got = get(&mut c, "spam_mix", true).await;
    let e = got.expert.clone().unwrap();
    assert_eq!(
        (e.kind, e.lora_r, e.num_instances),
        (proto::ExpertKind::Lora as i32, 12, 18)
    );
    let mut union = BTreeSet::new();
    for (id, _) in loras {
        union.extend(inputs(&get(&mut c, id, false).await));
    }
    assert_eq!(inputs(&got), union);
    let a = got.adapter.unwrap();
    let peft = roe_expert_library::PeftAdapter {
        config_json: a.adapter_config_json.clone(),
        safetensors: a.adapter_model_safetensors.clone(),
    };
    peft.validate(&BackboneSpec::smollm2_135m()).unwrap();
    assert_eq!(peft.sha256_hex(), e.weights_sha256);
    let lora =
        roe_backbone::Lora::from_peft_bytes(&a.adapter_config_json, &a.adapter_model_safetensors)
            .unwrap();
    assert_eq!((lora.rank(), lora.scale()), (12, 1.0));

    // The id is taken now; a new version replaces it (uniform weights this time).
    expect_code(
        &mut c,
        merge_req(
            "spam_mix",
            vec![source("email_lora", None), source("sms_lora", None)],
        ),
        Code::AlreadyExists,
        "spam_mix",
    )
    .await;
    let v2 = c
        .merge_experts(proto::MergeExpertsRequest {
            new_version: true,
            ..merge_req(
                "spam_mix",
                vec![source("email_lora", None), source("sms_lora", None)],
            )
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!((v2.version, v2.lora_r, v2.num_instances), (2, 8, 12));
    assert!(
        v2.description.ends_with("(weights 0.5, 0.5)"),
        "{}",
        v2.description
    );

    // Identical instances are kept once: a copy with the same sample adds none.
    c.register_expert(register_request("sms_lora_copy", "lora", "sms_spam", 6))
        .await
        .unwrap();
    let twice = c
        .merge_experts(merge_req(
            "sms_twice",
            vec![source("sms_lora", None), source("sms_lora_copy", None)],
        ))
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!((twice.lora_r, twice.num_instances), (8, 6));

    // Prompt experts: averaged (same length) or concatenated (lengths add up).
    for (id, t) in [("sms_prompt", "sms_spam"), ("email_prompt", "email_spam")] {
        c.register_expert(register_request(id, "prompt", t, 4))
            .await
            .unwrap();
    }
    let prompts = || vec![source("sms_prompt", None), source("email_prompt", None)];
    let avg = c
        .merge_experts(merge_req("prompt_avg", prompts()))
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(
        (avg.kind, avg.num_virtual_tokens, avg.num_instances),
        (proto::ExpertKind::Prompt as i32, 20, 8)
    );
    let cat = c
        .merge_experts(proto::MergeExpertsRequest {
            prompt_mode: proto::PromptMergeMode::Concat as i32,
            ..merge_req("prompt_cat", prompts())
        })
        .await
        .unwrap()
        .into_inner()
        .expert
        .unwrap();
    assert_eq!(cat.num_virtual_tokens, 40);
    assert_eq!(
        cat.description,
        "merged from sms_prompt, email_prompt (prompts concatenated)"
    );

    // Merged experts are in the index like any other, and a new version's instances replace
    // the old ones: spam_mix v1 held snips_intent's instances, v2 does not.
    let mut r = server.router().await;
    let routed = r
        .route(proto::RouteRequest {
            queries: roe_tests::queries(&task("snips_intent"), 8, 3),
            options: None,
            min_library_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.expert_id, "snips_lora");
    assert!(
        routed
            .ranked
            .iter()
            .all(|e| e.expert_id != "spam_mix" || e.votes == 0),
        "spam_mix v2 still holds snips_intent instances: {:?}",
        routed.ranked
    );

    // Everything above survives a restart (durable like any registration).
    server.stop().await;
    let server = TestServer::start_in(dir).await;
    let mut c = server.library().await;
    let again = get(&mut c, "spam_mix", false).await.expert.unwrap();
    assert_eq!((again.version, again.lora_r), (2, 8));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_merges_get_clear_statuses_and_write_nothing() {
    let server = TestServer::start().await;
    let mut c = server.library().await;
    c.register_expert(register_request("sms_lora", "lora", "sms_spam", 4))
        .await
        .unwrap();
    c.register_expert(register_request("email_lora", "lora", "email_spam", 4))
        .await
        .unwrap();
    c.register_expert(register_request("sms_prompt", "prompt", "sms_spam", 4))
        .await
        .unwrap();
    let two = || vec![source("sms_lora", None), source("email_lora", None)];

    expect_code(
        &mut c,
        merge_req("m", vec![source("sms_lora", None), source("nope", None)]),
        Code::NotFound,
        "nope",
    )
    .await;
    expect_code(
        &mut c,
        merge_req(
            "m",
            vec![source("sms_lora", None), source("sms_prompt", None)],
        ),
        Code::InvalidArgument,
        "sources",
    )
    .await;
    expect_code(
        &mut c,
        merge_req(
            "m",
            vec![source("sms_lora", None), source("sms_lora", None)],
        ),
        Code::InvalidArgument,
        "sources",
    )
    .await;
    expect_code(
        &mut c,
        merge_req("m", vec![]),
        Code::InvalidArgument,
        "sources",
    )
    .await;
    expect_code(
        &mut c,
        merge_req("m", vec![source("", None)]),
        Code::InvalidArgument,
        "sources[0].expert_id",
    )
    .await;
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        expect_code(
            &mut c,
            merge_req(
                "m",
                vec![
                    source("sms_lora", Some(1.0)),
                    source("email_lora", Some(bad)),
                ],
            ),
            Code::InvalidArgument,
            "sources[1].weight",
        )
        .await;
    }
    // A weight on some sources only.
    expect_code(
        &mut c,
        merge_req(
            "m",
            vec![source("sms_lora", Some(1.0)), source("email_lora", None)],
        ),
        Code::InvalidArgument,
        "sources[1].weight",
    )
    .await;
    expect_code(
        &mut c,
        proto::MergeExpertsRequest {
            prompt_mode: proto::PromptMergeMode::Concat as i32,
            ..merge_req("m", two())
        },
        Code::InvalidArgument,
        "prompt_mode",
    )
    .await;
    expect_code(
        &mut c,
        proto::MergeExpertsRequest {
            prompt_mode: 7,
            ..merge_req("m", two())
        },
        Code::InvalidArgument,
        "prompt_mode",
    )
    .await;
    expect_code(&mut c, merge_req("a b", two()), Code::InvalidArgument, "id").await;
    expect_code(
        &mut c,
        merge_req("sms_lora", two()),
        Code::AlreadyExists,
        "sms_lora",
    )
    .await;

    // None of that wrote anything, and the sources are untouched.
    let list = c
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.total, 3);
    let sms = get(&mut c, "sms_lora", false).await.expert.unwrap();
    assert_eq!((sms.version, sms.lora_r, sms.num_instances), (1, 4, 4));
    server.stop().await;
}

/// Scores of `expert` on a few sms_spam rows (sum log-prob per choice).
async fn scores(
    c: &mut roe_services::proto::inference_client::InferenceClient<Channel>,
    expert: &str,
    rows: &[String],
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for input in rows {
        let r = c
            .score(proto::ScoreRequest {
                expert_id: expert.to_string(),
                input: input.clone(),
                choices: vec!["ham".into(), "spam".into()],
                truncate: false,
                min_library_seq: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("score with {expert:?}: {s}"))
            .into_inner();
        out.push(r.choices.iter().map(|c| c.sum_logprob).collect());
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_an_expert_with_itself_scores_like_the_expert() {
    assert!(
        backbone_path().exists(),
        "backbone GGUF not found at {} (run scripts/fetch-models.sh)",
        backbone_path().display()
    );
    let server = TestServer::start_with_inference().await;
    let mut c = server.library().await;
    for (id, kind) in [
        ("sms_lora", "lora"),
        ("sms_lora_copy", "lora"),
        ("sms_prompt", "prompt"),
        ("sms_prompt_copy", "prompt"),
    ] {
        c.register_expert(register_request(id, kind, "sms_spam", 4))
            .await
            .unwrap();
    }
    // Uniform and skewed weights: with one delta twice, any weights sum to the delta itself.
    c.merge_experts(merge_req(
        "lora_twice",
        vec![source("sms_lora", None), source("sms_lora_copy", None)],
    ))
    .await
    .unwrap();
    c.merge_experts(merge_req(
        "lora_twice_skewed",
        vec![
            source("sms_lora", Some(3.0)),
            source("sms_lora_copy", Some(1.0)),
        ],
    ))
    .await
    .unwrap();
    c.merge_experts(merge_req(
        "prompt_twice",
        vec![source("sms_prompt", None), source("sms_prompt_copy", None)],
    ))
    .await
    .unwrap();

    let rows: Vec<String> = task("sms_spam")
        .test
        .iter()
        .take(4)
        .map(|r| r.input.clone())
        .collect();
    let mut inf = server.inference().await;
    let bare = scores(&mut inf, "", &rows).await;
    let lora = scores(&mut inf, "sms_lora", &rows).await;
    let prompt = scores(&mut inf, "sms_prompt", &rows).await;
    // The experts change the scores, so equality below means the merge is applied right.
    assert!(
        max_diff(&bare, &lora) > 0.1,
        "the LoRA barely changes scores"
    );
    assert!(
        max_diff(&bare, &prompt) > 0.1,
        "the prompt barely changes scores"
    );
    for (merged, alone) in [
        ("lora_twice", &lora),
        ("lora_twice_skewed", &lora),
        ("prompt_twice", &prompt),
    ] {
        let got = scores(&mut inf, merged, &rows).await;
        let d = max_diff(&got, alone);
        eprintln!("{merged}: max |log-prob difference| vs the expert alone {d:e}");
        assert!(d < 1e-3, "{merged} differs from the expert alone by {d}");
    }
    server.stop().await;
}
