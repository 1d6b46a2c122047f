//! Reading whole adapters and the writer's round trip, on a tiny model shape.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::*;

/// 8 wide, 3 layers, 2 heads of 4, 1 KV head, MLP 12.
const TINY: ModelShape = ModelShape {
    hidden_size: 8,
    intermediate_size: 12,
    num_layers: 3,
    num_heads: 2,
    num_kv_heads: 1,
    head_dim: 4,
    vocab_size: 32,
};

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// Values exact in f16 and bf16, so every dtype decodes to the same f32.
fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i + seed) % 9) as f32 * 0.25 - 1.0)
        .collect()
}

fn file(tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| encode(v, dtype)).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn lora_tensors(
    r: usize,
    layers: &[usize],
    targets: &[LoraTarget],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for &layer in layers {
        for &t in targets {
            let (fin, fout) = TINY.dims(t);
            for (m, shape) in [
                (LoraMatrix::A, vec![r, fin]),
                (LoraMatrix::B, vec![fout, r]),
            ] {
                let n = shape[0] * shape[1];
                out.push((
                    LoraKey::new(layer, t, m).format(),
                    shape,
                    ramp(n, layer + t.index()),
                ));
            }
        }
    }
    out
}

const QV: [LoraTarget; 2] = [LoraTarget::QProj, LoraTarget::VProj];

fn lora_config(extra: serde_json::Value) -> String {
    let mut c = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

#[test]
fn reads_a_lora_in_every_dtype() {
    let tensors = lora_tensors(2, &[0, 1, 2], &QV);
    let want = LoraAdapter::from_peft(&lora_config(json!({})), &file(&tensors, Dtype::F32), &TINY)
        .unwrap();
    assert_eq!((want.rank(), want.alpha(), want.scale()), (2, 4.0, 2.0));
    assert_eq!(want.targets(), QV);
    assert_eq!(want.layers(), [0, 1, 2]);
    assert_eq!(want.blocks().len(), 6);
    let b = want.block(1, LoraTarget::VProj).unwrap();
    assert_eq!(b.a, ramp(2 * 8, 1 + 2));
    assert_eq!(b.b.len(), 4 * 2);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let got =
            LoraAdapter::from_peft(&lora_config(json!({})), &file(&tensors, dtype), &TINY).unwrap();
        assert_eq!(got.blocks(), want.blocks(), "{dtype:?}");
    }
}

#[test]
fn lora_default_keys_subsets_and_defaults() {
    // `.default.` spellings read like the plain ones.
    let plain = lora_tensors(2, &[0, 1, 2], &QV);
    let default: Vec<_> = plain
        .iter()
        .map(|(n, s, v)| {
            (
                n.replace(".weight", ".default.weight"),
                s.clone(),
                v.clone(),
            )
        })
        .collect();
    let a =
        LoraAdapter::from_peft(&lora_config(json!({})), &file(&plain, Dtype::F32), &TINY).unwrap();
    let b = LoraAdapter::from_peft(&lora_config(json!({})), &file(&default, Dtype::F32), &TINY)
        .unwrap();
    assert_eq!(a.blocks(), b.blocks());
    // Both spellings of one matrix is one too many.
    let mut both = plain.clone();
    both.push(default[0].clone());
    let e = LoraAdapter::from_peft(&lora_config(json!({})), &file(&both, Dtype::F32), &TINY)
        .unwrap_err();
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{e:?}");

    // layers_to_transform: only those layers, exactly.
    let subset = lora_tensors(2, &[2], &QV);
    let cfg = lora_config(json!({"layers_to_transform": [2]}));
    let l = LoraAdapter::from_peft(&cfg, &file(&subset, Dtype::F32), &TINY).unwrap();
    assert_eq!(l.layers(), [2]);
    let AdapterSummary::Lora {
        num_layers,
        layers_to_transform,
        ..
    } = l.summary()
    else {
        panic!()
    };
    assert_eq!((num_layers, layers_to_transform), (1, Some(vec![2])));
    let e = LoraAdapter::from_peft(&cfg, &file(&plain, Dtype::F32), &TINY).unwrap_err();
    assert!(e.to_string().contains("layers_to_transform"), "{e}");
    let e = LoraAdapter::from_peft(
        &lora_config(json!({"layers_to_transform": [3]})),
        &file(&subset, Dtype::F32),
        &TINY,
    )
    .unwrap_err();
    assert_eq!(e.kind(), PeftErrorKind::DoesNotFit);
    assert_eq!(e.field(), "adapter_config.layers_to_transform");

    // No lora_alpha: PEFT's 8.
    let mut cfg: serde_json::Value = serde_json::from_str(&lora_config(json!({}))).unwrap();
    cfg.as_object_mut().unwrap().remove("lora_alpha");
    let l = LoraAdapter::from_peft(&cfg.to_string(), &file(&plain, Dtype::F32), &TINY).unwrap();
    assert_eq!((l.alpha(), l.scale()), (8.0, 4.0));
}

#[test]
fn lora_tensor_set_is_exact() {
    let good = lora_tensors(2, &[0, 1, 2], &QV);
    let cfg = lora_config(json!({}));
    let read = |t: &[(String, Vec<usize>, Vec<f32>)]| {
        LoraAdapter::from_peft(&cfg, &file(t, Dtype::F32), &TINY).unwrap_err()
    };
    let missing: Vec<_> = good.iter().skip(1).cloned().collect();
    let e = read(&missing);
    assert_eq!(
        e,
        PeftError::MissingTensor(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into()
        )
    );
    assert_eq!(e.kind(), PeftErrorKind::DoesNotFit);

    let mut extra = good.clone();
    extra.push(("base_model.model.lm_head.weight".into(), vec![1], vec![0.0]));
    assert!(matches!(read(&extra), PeftError::UnexpectedTensor { .. }));

    let mut other_module = good.clone();
    other_module.extend(lora_tensors(2, &[0], &[LoraTarget::KProj]));
    let e = read(&other_module);
    assert!(
        e.to_string().contains("k_proj is not in target_modules"),
        "{e}"
    );

    let mut wrong_shape = good.clone();
    wrong_shape[0] = (wrong_shape[0].0.clone(), vec![3, 8], vec![0.0; 24]);
    let e = read(&wrong_shape);
    assert!(matches!(e, PeftError::Shape { .. }), "{e:?}");
    assert_eq!(e.kind(), PeftErrorKind::DoesNotFit);

    let mut nan = good.clone();
    nan[3].2[1] = f32::NAN;
    let e = read(&nan);
    assert!(matches!(e, PeftError::NonFinite { .. }), "{e:?}");
    assert_eq!(e.kind(), PeftErrorKind::Invalid);

    let mut deep = good.clone();
    deep.extend(lora_tensors(2, &[3], &QV));
    let e = read(&deep);
    assert!(
        matches!(e, PeftError::LayerOutOfRange { layer: 3, .. }),
        "{e:?}"
    );

    let e = LoraAdapter::from_peft(&cfg, b"not safetensors", &TINY).unwrap_err();
    assert_eq!(e.field(), "weights");
}

fn prompt_file(n: usize, d: usize, dtype: Dtype) -> Vec<u8> {
    file(
        &[(PROMPT_EMBEDDINGS.into(), vec![n, d], ramp(n * d, 0))],
        dtype,
    )
}

#[test]
fn reads_soft_prompts() {
    let cfg = r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 8}"#;
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let p = SoftPromptAdapter::from_peft(cfg, &prompt_file(3, 8, dtype), &TINY).unwrap();
        assert_eq!((p.num_virtual_tokens(), p.token_dim()), (3, 8));
        assert_eq!(p.embeddings(), ramp(24, 0));
    }
    // The counts may be left to the tensor.
    let p = SoftPromptAdapter::from_peft(
        r#"{"peft_type": "PROMPT_TUNING"}"#,
        &prompt_file(5, 8, Dtype::F32),
        &TINY,
    )
    .unwrap();
    assert_eq!(p.num_virtual_tokens(), 5);

    let bad = |cfg: &str, st: Vec<u8>| SoftPromptAdapter::from_peft(cfg, &st, &TINY).unwrap_err();
    let e = bad(cfg, prompt_file(2, 8, Dtype::F32));
    assert_eq!(e.field(), "adapter_config.num_virtual_tokens");
    let e = bad(cfg, prompt_file(3, 6, Dtype::F32));
    assert!(matches!(e, PeftError::Shape { .. }), "{e:?}");
    let e = bad(
        r#"{"peft_type": "PROMPT_TUNING", "token_dim": 6}"#,
        prompt_file(3, 8, Dtype::F32),
    );
    assert!(matches!(e, PeftError::ModelMismatch { .. }), "{e:?}");
    let e = bad(
        r#"{"peft_type": "PROMPT_TUNING", "num_layers": 30}"#,
        prompt_file(3, 8, Dtype::F32),
    );
    assert_eq!(e.field(), "adapter_config.num_layers");
    let mut two = vec![(PROMPT_EMBEDDINGS.to_string(), vec![3, 8], ramp(24, 0))];
    two.push(("prompt_embeddings_2".into(), vec![1], vec![0.0]));
    let e = bad(cfg, file(&two, Dtype::F32));
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{e:?}");
    let e = bad(
        cfg,
        file(&[("other".into(), vec![1], vec![0.0])], Dtype::F32),
    );
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{e:?}");
    let e = bad(r#"{"peft_type": "PROMPT_TUNING"}"#, file(&[], Dtype::F32));
    assert_eq!(e, PeftError::MissingTensor(PROMPT_EMBEDDINGS.into()));
    let e = bad(
        r#"{"peft_type": "PROMPT_TUNING"}"#,
        prompt_file(513, 8, Dtype::F32),
    );
    assert_eq!(e.kind(), PeftErrorKind::TooLarge);
    // A LoRA is not a prompt, and the other way round.
    let e = bad(&lora_config(json!({})), prompt_file(3, 8, Dtype::F32));
    assert!(
        matches!(
            e,
            PeftError::PeftType {
                expected: "PROMPT_TUNING",
                ..
            }
        ),
        "{e:?}"
    );
    let e = LoraAdapter::from_peft(cfg, &prompt_file(3, 8, Dtype::F32), &TINY).unwrap_err();
    assert!(
        matches!(
            e,
            PeftError::PeftType {
                expected: "LORA",
                ..
            }
        ),
        "{e:?}"
    );
    // As a LoRA's weights, prompt embeddings are an unexpected tensor named in the message.
    let e = Adapter::from_peft(
        &lora_config(json!({})),
        &prompt_file(3, 8, Dtype::F32),
        &TINY,
    )
    .unwrap_err();
    assert!(e.to_string().contains(PROMPT_EMBEDDINGS), "{e}");
}

#[test]
fn written_prompts_read_back_the_same() {
    let origin = AdapterOrigin {
        base_model_name_or_path: Some("tiny-base".into()),
        task_type: None,
    };
    let p = SoftPromptAdapter::new(ramp(4 * 8, 3), 4, &TINY)
        .unwrap()
        .with_origin(origin.clone());
    let files = p.to_peft().unwrap();
    let back = SoftPromptAdapter::from_peft(&files.config_json, &files.safetensors, &TINY).unwrap();
    assert_eq!(back.embeddings(), p.embeddings());
    assert_eq!(
        back.origin().base_model_name_or_path,
        origin.base_model_name_or_path
    );
    assert_eq!(back.origin().task_type.as_deref(), Some("CAUSAL_LM"));
    let cfg: serde_json::Value = serde_json::from_str(&files.config_json).unwrap();
    assert_eq!(cfg["num_layers"], 3);
    assert_eq!(cfg["token_dim"], 8);
    assert!(SoftPromptAdapter::new(vec![f32::NAN; 8], 1, &TINY).is_err());
    assert!(SoftPromptAdapter::new(vec![0.0; 7], 1, &TINY).is_err());
}

#[test]
fn written_loras_read_back_the_same() {
    let blocks: Vec<LoraBlock> = [1usize, 2]
        .iter()
        .flat_map(|&layer| {
            [LoraTarget::OProj, LoraTarget::DownProj].map(|target| {
                let (fin, fout) = TINY.dims(target);
                LoraBlock {
                    layer,
                    target,
                    a: ramp(3 * fin, layer),
                    b: ramp(fout * 3, target.index()),
                }
            })
        })
        .collect();
    let config = LoraConfig {
        r: 3,
        lora_alpha: 1.5,
        use_rslora: true,
        target_modules: vec![LoraTarget::DownProj, LoraTarget::OProj],
        layers_to_transform: Some(vec![2, 1]),
        origin: AdapterOrigin::default(),
    };
    let l = LoraAdapter::new(config, blocks, &TINY).unwrap();
    let files = l.to_peft().unwrap();
    let back = LoraAdapter::from_peft(&files.config_json, &files.safetensors, &TINY).unwrap();
    assert_eq!(back.blocks(), l.blocks());
    assert_eq!(
        (back.rank(), back.alpha(), back.scale()),
        (3, 1.5, 1.5 / 3f64.sqrt())
    );
    assert_eq!(back.layers(), [1, 2]);
    assert_eq!(back.summary(), l.summary());
    let cfg: serde_json::Value = serde_json::from_str(&files.config_json).unwrap();
    assert_eq!(cfg["target_modules"], json!(["down_proj", "o_proj"]));

    // An integral alpha is written as PEFT writes it.
    let one = LoraAdapter::from_peft(
        &lora_config(json!({})),
        &file(&lora_tensors(2, &[0, 1, 2], &QV), Dtype::BF16),
        &TINY,
    )
    .unwrap();
    let files = Adapter::Lora(one.clone()).to_peft().unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&files.config_json).unwrap();
    assert_eq!(cfg["lora_alpha"], json!(4));
    assert_eq!(cfg["layers_to_transform"], serde_json::Value::Null);
    let Adapter::Lora(back) =
        Adapter::from_peft(&files.config_json, &files.safetensors, &TINY).unwrap()
    else {
        panic!("not a LoRA")
    };
    assert_eq!(back.blocks(), one.blocks());
    assert_eq!(back.summary(), one.summary());
    // The writer names the task PEFT would assume.
    assert_eq!(back.origin().task_type.as_deref(), Some("CAUSAL_LM"));
}

#[test]
fn built_loras_are_checked() {
    let (fin, fout) = TINY.dims(LoraTarget::QProj);
    let block = |layer| LoraBlock {
        layer,
        target: LoraTarget::QProj,
        a: vec![0.0; 2 * fin],
        b: vec![0.0; fout * 2],
    };
    let config = || LoraConfig::new(2, 8.0, vec![LoraTarget::QProj]);
    LoraAdapter::new(config(), vec![block(0), block(1), block(2)], &TINY).unwrap();
    let e = LoraAdapter::new(config(), vec![block(0), block(1)], &TINY).unwrap_err();
    assert!(matches!(e, PeftError::MissingTensor(_)), "{e:?}");
    let e = LoraAdapter::new(
        config(),
        vec![block(0), block(1), block(2), block(2)],
        &TINY,
    )
    .unwrap_err();
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{e:?}");
    let mut short = block(2);
    short.b.pop();
    let e = LoraAdapter::new(config(), vec![block(0), block(1), short], &TINY).unwrap_err();
    assert!(matches!(e, PeftError::Shape { .. }), "{e:?}");
    let e = LoraAdapter::new(LoraConfig { r: 300, ..config() }, vec![], &TINY).unwrap_err();
    assert_eq!(e.kind(), PeftErrorKind::TooLarge);
}

/// `check_peft` (what registration runs, without keeping the decoded values) accepts and
/// refuses exactly what `from_peft` does, with the same summary and the same error.
#[test]
fn checking_without_decoding_agrees_with_reading() {
    let good = lora_tensors(2, &[0, 1, 2], &QV);
    let cfg = lora_config(json!({}));
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        cases.push((cfg.clone(), file(&good, dtype)));
    }
    cases.push((cfg.clone(), file(&good[1..], Dtype::F32)));
    let mut nan = good.clone();
    nan[3].2[1] = f32::NAN;
    cases.push((cfg.clone(), file(&nan, Dtype::F32)));
    let mut wrong_shape = good.clone();
    wrong_shape[0] = (wrong_shape[0].0.clone(), vec![3, 8], vec![0.0; 24]);
    cases.push((cfg.clone(), file(&wrong_shape, Dtype::F32)));
    let mut deep = good.clone();
    deep.extend(lora_tensors(2, &[3], &QV));
    cases.push((cfg.clone(), file(&deep, Dtype::F32)));
    cases.push((cfg.clone(), b"not safetensors".to_vec()));
    let subset = lora_tensors(2, &[2], &QV);
    let only_2 = lora_config(json!({"layers_to_transform": [2, 2]}));
    cases.push((only_2.clone(), file(&subset, Dtype::F32)));
    cases.push((only_2, file(&good, Dtype::F32)));
    cases.push((
        lora_config(json!({"target_modules": ["v_proj", "q_proj", "q_proj"]})),
        file(&good, Dtype::F32),
    ));
    cases.push((
        lora_config(json!({"target_modules": []})),
        file(&good, Dtype::F32),
    ));
    cases.push((lora_config(json!({"r": 0})), file(&good, Dtype::F32)));
    cases.push((lora_config(json!({"r": 3})), file(&good, Dtype::F32)));
    let prompt = json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}).to_string();
    cases.push((prompt.clone(), prompt_file(4, 8, Dtype::F32)));
    cases.push((prompt.clone(), prompt_file(4, 8, Dtype::BF16)));
    cases.push((prompt.clone(), prompt_file(5, 8, Dtype::F32)));
    cases.push((prompt, prompt_file(4, 7, Dtype::F32)));
    cases.push(("{}".into(), file(&good, Dtype::F32)));

    let mut accepted = 0;
    for (i, (config, bytes)) in cases.iter().enumerate() {
        let read = Adapter::from_peft(config, bytes, &TINY).map(|a| a.summary());
        let checked = Adapter::check_peft(config, bytes, &TINY);
        assert_eq!(checked, read, "case {i}: {config}");
        accepted += usize::from(read.is_ok());
    }
    // Both outcomes are exercised.
    assert!((5..cases.len()).contains(&accepted), "{accepted} accepted");
}
