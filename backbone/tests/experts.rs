//! Experts on the real backbone: loading, mixed batches, accuracy, bad files.
mod common;

use std::collections::HashMap;

use roe_backbone::{
    Adapters, Backbone, ExpertError, Lora, LoraBlock, LoraTarget, ModelShape, PeftError,
    RenderOptions, ScoreRequest, SoftPrompt,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn load_experts(task: &str) -> (SoftPrompt, Lora) {
    let d = common::experts_dir();
    let sp = SoftPrompt::from_peft_dir(d.join("prompt").join(task)).expect("soft prompt");
    let lora = Lora::from_peft_dir(d.join("lora").join(task)).expect("lora");
    (sp, lora)
}

fn accuracy(bb: &Backbone, rows: &[common::Row], ad: Adapters<'_>) -> f64 {
    let mut correct = 0;
    for chunk in rows.chunks(4) {
        let reqs: Vec<ScoreRequest> = chunk
            .iter()
            .map(|r| ScoreRequest {
                input: &r.input,
                choices: &r.choices,
                adapters: ad,
            })
            .collect();
        for (r, o) in chunk.iter().zip(bb.score_batch(&reqs).unwrap()) {
            if r.choices[o.best] == r.target {
                correct += 1;
            }
        }
    }
    correct as f64 / rows.len() as f64
}

#[test]
fn real_experts_load_and_validate() {
    let d = common::experts_dir();
    let (sp, lora) = load_experts("sms_spam");
    assert_eq!(sp.num_virtual_tokens(), 20);
    assert_eq!(sp.embeddings().dims(), &[20, 576]);
    assert_eq!(lora.rank(), 4);
    assert_eq!(lora.scale(), 2.0);
    assert_eq!(lora.targets(), &[LoraTarget::QProj, LoraTarget::VProj]);
    // Bytes constructor gives the same expert.
    let cfg = std::fs::read_to_string(d.join("lora/sms_spam/adapter_config.json")).unwrap();
    let st = std::fs::read(d.join("lora/sms_spam/adapter_model.safetensors")).unwrap();
    let l2 = Lora::from_peft_bytes(&cfg, &st).unwrap();
    assert_eq!(l2.targets(), lora.targets());
    // A prompt expert is not a LoRA and vice versa.
    let pcfg = std::fs::read_to_string(d.join("prompt/sms_spam/adapter_config.json")).unwrap();
    let pst = std::fs::read(d.join("prompt/sms_spam/adapter_model.safetensors")).unwrap();
    assert!(matches!(
        Lora::from_peft_bytes(&pcfg, &pst),
        Err(ExpertError::Peft(PeftError::PeftType { .. }))
    ));
    assert!(matches!(
        SoftPrompt::from_peft_bytes(&cfg, &st),
        Err(ExpertError::Peft(PeftError::PeftType { .. }))
    ));
}

fn st_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

const PROMPT_CFG: &str = r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20, "token_dim": 576, "num_layers": 30, "num_transformer_submodules": 1, "task_type": "CAUSAL_LM"}"#;
const LORA_CFG: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": false, "use_rslora": false, "fan_in_fan_out": false}"#;

fn lora_tensors(b_value: f32, skip: Option<usize>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for l in 0..30 {
        if Some(l) == skip {
            continue;
        }
        for (m, o) in [("q_proj", 576usize), ("v_proj", 192)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            out.push((
                format!("{p}.lora_A.weight"),
                vec![4, 576],
                (0..4 * 576)
                    .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
                    .collect(),
            ));
            out.push((
                format!("{p}.lora_B.weight"),
                vec![o, 4],
                vec![b_value; o * 4],
            ));
        }
    }
    out
}

fn lora_bytes(t: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let r: Vec<(&str, Vec<usize>, Vec<f32>)> = t
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    st_bytes(&r)
}

#[test]
fn bad_expert_files_are_errors() {
    // Soft prompts.
    let good = st_bytes(&[("prompt_embeddings", vec![20, 576], vec![0.1; 20 * 576])]);
    assert!(SoftPrompt::from_peft_bytes(PROMPT_CFG, &good).is_ok());
    let wrong_dim = st_bytes(&[("prompt_embeddings", vec![20, 512], vec![0.1; 20 * 512])]);
    assert!(matches!(
        SoftPrompt::from_peft_bytes(PROMPT_CFG, &wrong_dim),
        Err(ExpertError::Peft(PeftError::Shape { .. }))
    ));
    let wrong_n = st_bytes(&[("prompt_embeddings", vec![10, 576], vec![0.1; 10 * 576])]);
    assert!(matches!(
        SoftPrompt::from_peft_bytes(PROMPT_CFG, &wrong_n),
        Err(ExpertError::Peft(PeftError::ConfigField { .. }))
    ));
    let mut nan = vec![0.1; 20 * 576];
    nan[77] = f32::NAN;
    let nan = st_bytes(&[("prompt_embeddings", vec![20, 576], nan)]);
    assert!(matches!(
        SoftPrompt::from_peft_bytes(PROMPT_CFG, &nan),
        Err(ExpertError::Peft(PeftError::NonFinite { .. }))
    ));
    let missing = st_bytes(&[("something_else", vec![20, 576], vec![0.1; 20 * 576])]);
    assert!(SoftPrompt::from_peft_bytes(PROMPT_CFG, &missing).is_err());
    assert!(matches!(
        SoftPrompt::from_peft_bytes(&PROMPT_CFG.replace("PROMPT_TUNING", "P_TUNING"), &good),
        Err(ExpertError::Peft(PeftError::PeftType { .. }))
    ));
    assert!(matches!(
        SoftPrompt::from_peft_bytes("{not json", &good),
        Err(ExpertError::Peft(PeftError::ConfigJson(_)))
    ));
    assert!(matches!(
        SoftPrompt::from_peft_bytes(PROMPT_CFG, b"garbage"),
        Err(ExpertError::Peft(PeftError::Safetensors(_)))
    ));
    assert!(SoftPrompt::from_peft_bytes(PROMPT_CFG, &[]).is_err());
    assert!(matches!(
        SoftPrompt::from_peft_dir("/nonexistent/expert"),
        Err(ExpertError::Io { .. })
    ));

    // LoRAs.
    let good = lora_tensors(0.01, None);
    assert!(Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&good)).is_ok());
    assert!(matches!(
        Lora::from_peft_bytes(&LORA_CFG.replace("\"LORA\"", "\"IA3\""), &lora_bytes(&good)),
        Err(ExpertError::Peft(PeftError::PeftType { .. }))
    ));
    let missing_layer = lora_tensors(0.01, Some(7));
    assert!(matches!(
        Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&missing_layer)),
        Err(ExpertError::Peft(PeftError::MissingTensor(_)))
    ));
    let mut wrong = good.clone();
    wrong[1] = (wrong[1].0.clone(), vec![512, 4], vec![0.0; 512 * 4]);
    assert!(matches!(
        Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&wrong)),
        Err(ExpertError::Peft(PeftError::Shape { .. }))
    ));
    let mut nan = good.clone();
    nan[2].2[5] = f32::INFINITY;
    assert!(matches!(
        Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&nan)),
        Err(ExpertError::Peft(PeftError::NonFinite { .. }))
    ));
    let mut extra = good.clone();
    extra.push((
        "base_model.model.lm_head.weight".into(),
        vec![2, 2],
        vec![0.0; 4],
    ));
    assert!(matches!(
        Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&extra)),
        Err(ExpertError::Peft(PeftError::UnexpectedTensor { .. }))
    ));
    assert!(Lora::from_peft_bytes(
        &LORA_CFG.replace("\"r\": 4", "\"r\": 8"),
        &lora_bytes(&good)
    )
    .is_err());
    assert!(
        Lora::from_peft_bytes(&LORA_CFG.replace("v_proj", "lm_head"), &lora_bytes(&good)).is_err()
    );
    assert!(Lora::from_peft_bytes(
        &LORA_CFG.replace("\"use_dora\": false", "\"use_dora\": true"),
        &lora_bytes(&good)
    )
    .is_err());
    // f16 tensors are accepted.
    let a16: Vec<u8> = (0..4 * 576)
        .flat_map(|_| half::f16::from_f32(0.01).to_le_bytes())
        .collect();
    let _ = a16;
    // A LoRA for another backbone shape.
    let small = ModelShape {
        num_layers: 2,
        ..ModelShape::smollm2_135m()
    };
    assert!(matches!(
        Lora::from_peft_bytes_with(LORA_CFG, &lora_bytes(&good), &small),
        Err(ExpertError::Peft(PeftError::LayerOutOfRange { .. }))
    ));
}

#[test]
fn zero_b_lora_equals_bare() {
    common::require_model();
    let bb = common::quantized();
    let spec = bb.model_shape();
    // Read from the GGUF, it is the SmolLM2-135M shape adapters are validated against.
    assert_eq!(spec, ModelShape::smollm2_135m());
    let weights: Vec<LoraBlock> = (0..30)
        .flat_map(|l| {
            [LoraTarget::QProj, LoraTarget::VProj].map(|t| {
                let (fin, fout) = t.dims(&spec);
                LoraBlock {
                    layer: l,
                    target: t,
                    a: (0..4 * fin).map(|i| (i % 13) as f32 * 0.1).collect(),
                    b: vec![0.0; fout * 4],
                }
            })
        })
        .collect();
    let zero = Lora::from_weights(4, 8.0, 2.0, weights, &spec).unwrap();
    let zero_bytes =
        Lora::from_peft_bytes(LORA_CFG, &lora_bytes(&lora_tensors(0.0, None))).unwrap();
    let choices: Vec<String> = vec!["ham".into(), "spam".into()];
    let input = "WINNER!! You have won a free prize, call 0800 now";
    let bare = bb
        .score(&ScoreRequest {
            input,
            choices: &choices,
            adapters: Adapters::none(),
        })
        .unwrap();
    for l in [&zero, &zero_bytes] {
        let with = bb
            .score(&ScoreRequest {
                input,
                choices: &choices,
                adapters: Adapters::lora(l),
            })
            .unwrap();
        for (a, b) in bare.choices.iter().zip(&with.choices) {
            assert!(
                (a.sum_logprob - b.sum_logprob).abs() < 1e-4,
                "{a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn mixed_batch_equals_rows_alone() {
    common::require_model();
    let bb = common::quantized();
    let (sp_spam, lora_spam) = load_experts("sms_spam");
    let (sp_intent, lora_intent) = load_experts("snips_intent");
    let spam = common::load_rows("sms_spam", 3);
    let intent = common::load_rows("snips_intent", 2);
    let social = common::load_rows("social_iqa", 1);
    let reqs = vec![
        ScoreRequest {
            input: &spam[0].input,
            choices: &spam[0].choices,
            adapters: Adapters::prompt(&sp_spam),
        },
        ScoreRequest {
            input: &intent[0].input,
            choices: &intent[0].choices,
            adapters: Adapters::lora(&lora_intent),
        },
        ScoreRequest {
            input: &social[0].input,
            choices: &social[0].choices,
            adapters: Adapters::none(),
        },
        ScoreRequest {
            input: &spam[1].input,
            choices: &spam[1].choices,
            adapters: Adapters::lora(&lora_spam),
        },
        ScoreRequest {
            input: &intent[1].input,
            choices: &intent[1].choices,
            adapters: Adapters::prompt(&sp_intent),
        },
        ScoreRequest {
            input: &spam[2].input,
            choices: &spam[2].choices,
            adapters: Adapters {
                prompt: Some(&sp_spam),
                lora: Some(&lora_spam),
            },
        },
    ];
    let batched = bb.score_batch(&reqs).unwrap();
    let mut worst = 0f32;
    for (r, b) in reqs.iter().zip(&batched) {
        let alone = bb.score(r).unwrap();
        assert_eq!(alone.best, b.best);
        for (x, y) in alone.choices.iter().zip(&b.choices) {
            worst = worst.max((x.sum_logprob - y.sum_logprob).abs());
            assert_eq!(x.num_tokens, y.num_tokens);
        }
    }
    eprintln!("mixed batch: max |diff| = {worst:e}");
    assert!(
        worst < 1e-3,
        "mixed batch differs from rows alone by {worst}"
    );
}

#[test]
fn experts_beat_bare_backbone() {
    common::require_model();
    let bb = common::quantized();
    let reference = common::reference();
    let mut report = HashMap::new();
    for task in ["sms_spam", "snips_intent"] {
        let rows = common::load_rows(task, 40);
        let (sp, lora) = load_experts(task);
        let bare = accuracy(&bb, &rows, Adapters::none());
        let prompt = accuracy(&bb, &rows, Adapters::prompt(&sp));
        let lo = accuracy(&bb, &rows, Adapters::lora(&lora));
        let r = &reference["tasks"][task];
        eprintln!(
            "{task}: bare {bare:.3} (ref {}), prompt {prompt:.3} (ref {}), lora {lo:.3} (ref {})",
            r["zero_shot"], r["prompt"], r["lora"]
        );
        assert!(
            prompt > bare + 0.3 && lo > bare + 0.3,
            "{task}: experts not far above bare"
        );
        assert!(
            (prompt - r["prompt"].as_f64().unwrap()).abs() < 0.15,
            "{task}: prompt {prompt}"
        );
        assert!(
            (lo - r["lora"].as_f64().unwrap()).abs() < 0.15,
            "{task}: lora {lo}"
        );
        report.insert(task, (bare, prompt, lo));
    }
}

/// Scoring with alternative end ids in one pass equals scoring with each end id separately,
/// for one-id and longer continuations, with and without an expert.
#[test]
fn alternative_end_ids_equal_separate_passes() {
    common::require_model();
    let bb = common::quantized();
    let (sp, lora) = load_experts("sms_spam");
    let choices: Vec<String> = vec!["ham".into(), "spam".into(), "a longer answer here".into()];
    for ad in [
        Adapters::none(),
        Adapters::prompt(&sp),
        Adapters::lora(&lora),
    ] {
        let req = ScoreRequest {
            input: "Free entry in 2 a wkly comp to win FA Cup final tkts",
            choices: &choices,
            adapters: ad,
        };
        let both = bb
            .score_batch_with(
                &[req],
                &RenderOptions {
                    eos_id: Some(2),
                    alt_end_ids: vec![1, 2],
                    ..RenderOptions::default()
                },
            )
            .unwrap()
            .remove(0);
        for (alt, eos) in [(0, 1u32), (1, 2u32)] {
            let alone = bb
                .score_batch_with(
                    &[req],
                    &RenderOptions {
                        eos_id: Some(eos),
                        ..RenderOptions::default()
                    },
                )
                .unwrap()
                .remove(0);
            assert!(alone.alt_end_sums.is_empty());
            for (ci, c) in alone.choices.iter().enumerate() {
                let got = both.alt_end_sums[ci][alt];
                assert!(
                    (got - c.sum_logprob).abs() < 1e-3,
                    "choice {ci} end {eos}: {got} vs {}",
                    c.sum_logprob
                );
            }
        }
        // The id 1 and id 2 conventions really differ, so the comparison means something.
        assert!((both.alt_end_sums[0][0] - both.alt_end_sums[0][1]).abs() > 1e-2);
    }
}
