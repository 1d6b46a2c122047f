//! The one-position step (decode) against one full forward, on the real backbone and experts:
//! a padded batch whose rows carry a LoRA, a soft prompt or nothing.
mod common;

use candle_core::Tensor;
use roe_backbone::{Backbone, KvCache, Lora, LoraBatch, SoftPrompt};

/// Next-token log-probs after (row, position) of a forward's hidden states.
fn log_probs(bb: &Backbone, hidden: &Tensor, row: usize, pos: usize) -> Vec<f32> {
    bb.log_probs_at(hidden, &[(row, pos)])
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn batched_decode_steps_equal_full_forwards_of_each_row() {
    common::require_model();
    let bb = common::quantized();
    let d = common::experts_dir();
    let lora = Lora::from_peft_dir(d.join("lora").join("sms_spam")).expect("lora");
    let sp = SoftPrompt::from_peft_dir(d.join("prompt").join("snips_intent")).expect("prompt");
    let prompts = [
        bb.encode("The capital of France is Paris. The capital of Germany is")
            .unwrap(),
        bb.encode("Free entry! Win a prize now").unwrap(),
        bb.encode("play some jazz").unwrap(),
    ];
    let soft = [None, None, Some(&sp)];
    let lora_rows = [None, Some(&lora), None];
    let cont = bb.encode(" and then the next words come along").unwrap();
    let steps = 6;

    // Batched: one padded prefill, then `steps` one-position steps for all rows at once.
    let rows: Vec<(Option<&SoftPrompt>, &[u32])> = soft
        .iter()
        .zip(&prompts)
        .map(|(s, p)| (*s, p.as_slice()))
        .collect();
    let (e, lens) = bb.embed_rows(&rows).unwrap();
    let loras = LoraBatch::new(&lora_rows).unwrap();
    let mut cache = KvCache::with_capacity(steps);
    bb.forward(&e, &lens, &mut cache, &loras).unwrap();
    let mut stepped: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    for &tok in cont.iter().take(steps) {
        let e = bb
            .embed_ids(&[tok, tok, tok])
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let h = bb.forward(&e, &[1, 1, 1], &mut cache, &loras).unwrap();
        for (row, out) in stepped.iter_mut().enumerate() {
            out.push(log_probs(&bb, &h, row, 0));
        }
    }

    // Each row alone, in one forward over prompt + continuation (the general path).
    let mut worst = 0f32;
    for row in 0..3 {
        let mut ids = prompts[row].clone();
        ids.extend(&cont[..steps]);
        let (e, l) = bb.embed_rows(&[(soft[row], ids.as_slice())]).unwrap();
        let loras = LoraBatch::new(&[lora_rows[row]]).unwrap();
        let h = bb.forward(&e, &l, &mut KvCache::new(), &loras).unwrap();
        let offset = soft[row].map(|s| s.num_virtual_tokens()).unwrap_or(0) + prompts[row].len();
        for (j, got) in stepped[row].iter().enumerate() {
            worst = worst.max(max_abs_diff(got, &log_probs(&bb, &h, 0, offset + j)));
        }
    }
    eprintln!("decode steps vs full forward: max |log-prob diff| = {worst:e}");
    assert!(worst < 2e-3, "decode steps differ by {worst}");
}

#[test]
fn a_row_without_a_new_token_leaves_the_others_unchanged() {
    common::require_model();
    let bb = common::quantized();
    let a = bb.encode("One two three four").unwrap();
    let b = bb.encode("Alpha beta gamma delta epsilon").unwrap();
    let next = bb.encode(" five").unwrap()[0];
    let (e, lens) = bb
        .embed_rows(&[(None, a.as_slice()), (None, b.as_slice())])
        .unwrap();
    let mut cache = KvCache::with_capacity(2);
    bb.forward(&e, &lens, &mut cache, &LoraBatch::none())
        .unwrap();
    // Row 1 has no token this step (length 0): its position must not advance.
    let e = bb.embed_ids(&[next, 0]).unwrap().unsqueeze(1).unwrap();
    let h = bb
        .forward(&e, &[1, 0], &mut cache, &LoraBatch::none())
        .unwrap();
    assert_eq!(cache.positions(), &[a.len() + 1, b.len()]);
    let got = log_probs(&bb, &h, 0, 0);
    let mut ids = a.clone();
    ids.push(next);
    let (e, l) = bb.embed_rows(&[(None, ids.as_slice())]).unwrap();
    let h = bb
        .forward(&e, &l, &mut KvCache::new(), &LoraBatch::none())
        .unwrap();
    let diff = max_abs_diff(&got, &log_probs(&bb, &h, 0, a.len()));
    assert!(diff < 2e-3, "row 0 changed by {diff}");
}
