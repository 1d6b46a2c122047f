//! The training forward's gradients against finite differences on a tiny random model, and
//! its loss against the serving path (Score) for the same rows and adapters: train and serve
//! compute the same function.

mod common;

use candle_core::{Device, Tensor, Var};
use roe_backbone::{
    AnswerRow, Backbone, BackboneConfig, Lora, LoraBlock, LoraTarget, ScoreIdsRequest, SoftPrompt,
    TextTokenizer, TrainAdapter, TrainLora,
};

fn tiny_config() -> BackboneConfig {
    BackboneConfig {
        architecture: "llama".into(),
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        context_length: 64,
        bos_token_id: None,
        eos_token_id: 2,
        pad_token_id: None,
    }
}

fn tiny_tokenizer(vocab: usize) -> TextTokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    let words: ahash::AHashMap<String, u32> =
        (0..vocab).map(|i| (format!("w{i}"), i as u32)).collect();
    let model = WordLevel::builder()
        .vocab(words)
        .unk_token("w0".into())
        .build()
        .expect("word-level vocabulary");
    TextTokenizer::from_tokenizer(tokenizers::Tokenizer::new(model))
}

fn tiny_backbone(seed: u64) -> Backbone {
    let cfg = tiny_config();
    let tok = tiny_tokenizer(cfg.vocab_size);
    Backbone::random(cfg, tok, seed).expect("random backbone")
}

/// Rows of different lengths, so padding and the causal mask are exercised.
fn rows() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![5, 9, 13, 7, 21, 3], vec![11, 1]),
        (vec![8, 30], vec![17, 25, 1]),
        (vec![4, 6, 33, 12], vec![19, 1]),
    ]
}

fn answer_rows(rows: &[(Vec<u32>, Vec<u32>)]) -> Vec<AnswerRow<'_>> {
    rows.iter()
        .map(|(p, a)| AnswerRow {
            prompt_ids: p,
            answer_ids: a,
        })
        .collect()
}

fn random_tensor(rows: usize, cols: usize, scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
}

fn loss_of(bb: &Backbone, rows: &[(Vec<u32>, Vec<u32>)], adapter: TrainAdapter<'_>) -> f32 {
    bb.answer_loss(&answer_rows(rows), adapter)
        .expect("loss")
        .sum_nll
        .to_scalar::<f32>()
        .expect("scalar")
}

/// The value of `t` with `delta` added at flat index `i`.
fn nudged(t: &Tensor, i: usize, delta: f32) -> Tensor {
    let dims = t.dims().to_vec();
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[i] += delta;
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn assert_close(analytic: f32, numeric: f32, what: &str) {
    let tol = 3e-3 + 3e-2 * analytic.abs().max(numeric.abs());
    assert!(
        (analytic - numeric).abs() <= tol,
        "{what}: backprop {analytic} vs finite difference {numeric}"
    );
}

const EPS: f32 = 1e-2;

#[test]
fn soft_prompt_gradient_matches_finite_differences() {
    let bb = tiny_backbone(7);
    let rows = rows();
    let prompt = Var::from_tensor(&random_tensor(3, 32, 1.0, 11)).unwrap();
    let loss = bb
        .answer_loss(
            &answer_rows(&rows),
            TrainAdapter::Prompt(prompt.as_tensor()),
        )
        .unwrap();
    assert_eq!(loss.tokens, 7);
    let grads = loss.sum_nll.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("the prompt has a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(g.iter().any(|v| v.abs() > 1e-3), "gradient is all zero");
    for i in [0, 5, 31, 32, 47, 70, 95] {
        let plus = loss_of(
            &bb,
            &rows,
            TrainAdapter::Prompt(&nudged(prompt.as_tensor(), i, EPS)),
        );
        let minus = loss_of(
            &bb,
            &rows,
            TrainAdapter::Prompt(&nudged(prompt.as_tensor(), i, -EPS)),
        );
        assert_close(g[i], (plus - minus) / (2.0 * EPS), &format!("prompt[{i}]"));
    }
}

fn tiny_lora(seed: u64) -> (TrainLora, Vec<(usize, LoraTarget, Var, Var)>) {
    let cfg = tiny_config();
    let shape = cfg.model_shape();
    let rank = 2;
    let mut lora = TrainLora {
        scale: 2.0,
        layers: (0..cfg.num_layers).map(|_| Default::default()).collect(),
    };
    let mut vars = Vec::new();
    let mut s = seed;
    for layer in 0..cfg.num_layers {
        for target in LoraTarget::ALL {
            let (fin, fout) = target.dims(&shape);
            s += 2;
            let a = Var::from_tensor(&random_tensor(rank, fin, 0.3, s)).unwrap();
            let b = Var::from_tensor(&random_tensor(fout, rank, 0.3, s + 1)).unwrap();
            lora.layers[layer][target.index()] =
                Some((a.as_tensor().clone(), b.as_tensor().clone()));
            vars.push((layer, target, a, b));
        }
    }
    (lora, vars)
}

#[test]
fn lora_gradients_match_finite_differences() {
    let bb = tiny_backbone(3);
    let rows = rows();
    let (lora, vars) = tiny_lora(100);
    let loss = bb
        .answer_loss(&answer_rows(&rows), TrainAdapter::Lora(&lora))
        .unwrap();
    let grads = loss.sum_nll.backward().unwrap();
    for (layer, target, a, b) in &vars {
        for (which, var) in [("A", a), ("B", b)] {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("layer {layer} {target:?} {which} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in [0, g.len() / 2, g.len() - 1] {
                let with = |delta: f32| {
                    let mut l = lora.clone();
                    let slot = l.layers[*layer][target.index()].as_mut().unwrap();
                    let t = if which == "A" {
                        &mut slot.0
                    } else {
                        &mut slot.1
                    };
                    *t = nudged(var.as_tensor(), i, delta);
                    loss_of(&bb, &rows, TrainAdapter::Lora(&l))
                };
                let numeric = (with(EPS) - with(-EPS)) / (2.0 * EPS);
                assert_close(
                    g[i],
                    numeric,
                    &format!("layer {layer} {target:?} {which}[{i}]"),
                );
            }
        }
    }
}

#[test]
fn a_row_loses_the_same_alone_or_padded_in_a_batch() {
    let bb = tiny_backbone(5);
    let rows = rows();
    let prompt = random_tensor(3, 32, 1.0, 2);
    let together = loss_of(&bb, &rows, TrainAdapter::Prompt(&prompt));
    let alone: f32 = rows
        .iter()
        .map(|r| loss_of(&bb, std::slice::from_ref(r), TrainAdapter::Prompt(&prompt)))
        .sum();
    assert!(
        (together - alone).abs() < 1e-4 * together.abs().max(1.0),
        "batched {together} vs one by one {alone}"
    );
}

/// Score's summed log-probability of each row's answer, with the same adapter.
fn served_sums(
    bb: &Backbone,
    rows: &[(Vec<u32>, Vec<u32>)],
    prompt: Option<&SoftPrompt>,
    lora: Option<&Lora>,
) -> Vec<f32> {
    let reqs: Vec<ScoreIdsRequest<'_>> = rows
        .iter()
        .map(|(p, a)| ScoreIdsRequest {
            prompt_ids: p.clone(),
            continuations: vec![a.clone()],
            prompt,
            lora,
            alt_end_ids: Vec::new(),
            truncated_tokens: 0,
        })
        .collect();
    bb.score_ids(&reqs)
        .unwrap()
        .iter()
        .map(|o| o.choices[0].sum_logprob)
        .collect()
}

#[test]
fn training_loss_equals_the_served_score_on_the_tiny_model() {
    let bb = tiny_backbone(9);
    let shape = bb.model_shape();
    let rows = rows();
    let values = random_tensor(3, 32, 1.0, 4);
    let prompt = SoftPrompt::from_tensor(&values, &shape).unwrap();
    let served: f32 = served_sums(&bb, &rows, Some(&prompt), None).iter().sum();
    let trained = loss_of(&bb, &rows, TrainAdapter::Prompt(&values));
    assert!(
        (served + trained).abs() < 1e-3 * trained.abs().max(1.0),
        "prompt: Score says {served}, training loss {trained}"
    );

    let (train_lora, _) = tiny_lora(40);
    let blocks: Vec<LoraBlock> = train_lora
        .layers
        .iter()
        .enumerate()
        .flat_map(|(layer, slots)| {
            LoraTarget::ALL.into_iter().filter_map(move |target| {
                slots[target.index()].as_ref().map(|(a, b)| LoraBlock {
                    layer,
                    target,
                    a: a.flatten_all().unwrap().to_vec1().unwrap(),
                    b: b.flatten_all().unwrap().to_vec1().unwrap(),
                })
            })
        })
        .collect();
    let lora = Lora::from_weights(2, 4.0, train_lora.scale, blocks, &shape).unwrap();
    let served: f32 = served_sums(&bb, &rows, None, Some(&lora)).iter().sum();
    let trained = loss_of(&bb, &rows, TrainAdapter::Lora(&train_lora));
    assert!(
        (served + trained).abs() < 1e-3 * trained.abs().max(1.0),
        "LoRA: Score says {served}, training loss {trained}"
    );
}

/// The real backbone (Q4_1 blocks expanded by the same kernels serving uses): a reference
/// expert's training loss equals minus Score's log-probability of the same answer.
#[test]
fn training_loss_equals_the_served_score_on_smollm2() {
    common::require_model();
    let bb = common::quantized();
    let shape = bb.model_shape();
    let dir = common::experts_dir();
    let prompt = SoftPrompt::from_peft_dir_with(dir.join("prompt/sms_spam"), &shape).unwrap();
    let lora = Lora::from_peft_dir_with(dir.join("lora/sms_spam"), &shape).unwrap();
    let texts = [
        ("WINNER!! You have won a prize, call now\nAnswer:", " spam"),
        ("Ok lor, see you at home later\nAnswer:", " ham"),
    ];
    let rows: Vec<(Vec<u32>, Vec<u32>)> = texts
        .iter()
        .map(|(p, a)| {
            let mut answer = bb.encode(a).unwrap();
            answer.push(1);
            (bb.encode(p).unwrap(), answer)
        })
        .collect();
    let served: f32 = served_sums(&bb, &rows, Some(&prompt), None).iter().sum();
    let trained = loss_of(&bb, &rows, TrainAdapter::Prompt(prompt.embeddings()));
    assert!(
        (served + trained).abs() < 2e-3 * trained.abs().max(1.0),
        "prompt: Score says {served}, training loss {trained}"
    );
    // The LoRA as training holds it: HF layout, unscaled.
    let adapter = roe_peft::LoraAdapter::from_peft(
        &std::fs::read_to_string(dir.join("lora/sms_spam/adapter_config.json")).unwrap(),
        &std::fs::read(dir.join("lora/sms_spam/adapter_model.safetensors")).unwrap(),
        &shape,
    )
    .unwrap();
    let mut train_lora = TrainLora {
        scale: adapter.scale(),
        layers: (0..shape.num_layers).map(|_| Default::default()).collect(),
    };
    for blk in adapter.blocks() {
        let (fin, fout) = blk.target.dims(&shape);
        let a = Tensor::from_vec(blk.a.clone(), (adapter.rank(), fin), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(blk.b.clone(), (fout, adapter.rank()), &Device::Cpu).unwrap();
        train_lora.layers[blk.layer][blk.target.index()] = Some((a, b));
    }
    let served: f32 = served_sums(&bb, &rows, None, Some(&lora)).iter().sum();
    let trained = loss_of(&bb, &rows, TrainAdapter::Lora(&train_lora));
    assert!(
        (served + trained).abs() < 2e-3 * trained.abs().max(1.0),
        "LoRA: Score says {served}, training loss {trained}"
    );
}
