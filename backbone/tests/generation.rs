//! Generation: greedy consistency with the KV cache, sampling, stop strings, streaming.
mod common;

use roe_backbone::{
    Adapters, FinishReason, GenerateParams, GenerateRequest, KvCache, LoraBatch, RenderOptions,
};

#[test]
fn greedy_generation_matches_full_forward() {
    common::require_model();
    let bb = common::quantized();
    let prompt = bb
        .encode("The capital of France is Paris. The capital of Germany is")
        .unwrap();
    let mut streamed = String::new();
    let g = bb
        .generate(&prompt, Adapters::none(), GenerateParams::greedy(10), |t| {
            streamed.push_str(&t.text);
            true
        })
        .unwrap();
    eprintln!("greedy: {:?} ({:?})", g.text, g.finish_reason);
    assert!(!g.ids.is_empty());
    assert_eq!(streamed, g.text, "streamed deltas must add up to the text");
    assert!(g.text.contains("Berlin"), "{:?}", g.text);
    // The cached decode must agree with one full forward over prompt + generated ids.
    let mut all = prompt.clone();
    all.extend(&g.ids);
    let (e, l) = bb.embed_rows(&[(None, all.as_slice())]).unwrap();
    let h = bb
        .forward(&e, &l, &mut KvCache::new(), &LoraBatch::none())
        .unwrap();
    let at: Vec<(usize, usize)> = (prompt.len() - 1..all.len() - 1).map(|p| (0, p)).collect();
    let lp = bb.log_probs_at(&h, &at).unwrap();
    let argmax: Vec<u32> = lp.argmax(1).unwrap().to_vec1().unwrap();
    assert_eq!(argmax, g.ids);
}

#[test]
fn sampling_is_seeded_and_stop_strings_cut() {
    common::require_model();
    let bb = common::quantized();
    let prompt = bb
        .render_prompt("Write a sentence about the sea.", &RenderOptions::default())
        .unwrap();
    let params = GenerateParams {
        max_new_tokens: 12,
        temperature: 0.8,
        top_p: 0.9,
        top_k: 50,
        seed: 7,
        ..Default::default()
    };
    let a = bb
        .generate(&prompt, Adapters::none(), params.clone(), |_| true)
        .unwrap();
    let b = bb
        .generate(&prompt, Adapters::none(), params.clone(), |_| true)
        .unwrap();
    assert_eq!(a.ids, b.ids, "same seed, same tokens");
    eprintln!("sampled: {:?}", a.text);

    let greedy = bb
        .generate(
            &prompt,
            Adapters::none(),
            GenerateParams::greedy(16),
            |_| true,
        )
        .unwrap();
    let text = greedy.text.clone();
    eprintln!("greedy: {text:?}");
    // Stop at a piece of the greedy text that starts after its first word.
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= 4 && text[i..].trim().len() >= 3);
    if let Some(cut) = cut {
        let stop: String = text[cut..].chars().take(3).collect();
        let first = text.find(&stop).unwrap();
        let mut streamed = String::new();
        let g = bb
            .generate(
                &prompt,
                Adapters::none(),
                GenerateParams {
                    stop: vec![stop.clone()],
                    ..GenerateParams::greedy(16)
                },
                |t| {
                    streamed.push_str(&t.text);
                    true
                },
            )
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Stop);
        assert_eq!(g.text, text[..first], "stop {stop:?}");
        assert_eq!(streamed, g.text);
    }
    // Iterator form, early stop by the caller.
    let mut it = bb
        .generator(&prompt, Adapters::none(), GenerateParams::greedy(5))
        .unwrap();
    let first = it.next().unwrap().unwrap();
    assert_eq!(first.id, greedy.ids[0]);
    let rest: Vec<_> = it.by_ref().collect::<Result<_, _>>().unwrap();
    assert!(rest.len() <= 4);
    assert!(it.next().is_none());
    // Invalid parameters are errors.
    assert!(bb
        .generator(
            &prompt,
            Adapters::none(),
            GenerateParams {
                top_p: 0.0,
                ..Default::default()
            }
        )
        .is_err());
    assert!(bb
        .generator(&[], Adapters::none(), GenerateParams::default())
        .is_err());
}

#[test]
fn generation_with_experts() {
    common::require_model();
    let bb = common::quantized();
    let d = common::experts_dir();
    let sp = roe_backbone::SoftPrompt::from_peft_dir(d.join("prompt/reddit_qa")).unwrap();
    let lora = roe_backbone::Lora::from_peft_dir(d.join("lora/reddit_qa")).unwrap();
    let rows = common::load_rows("reddit_qa", 1);
    let prompt = bb
        .render_prompt(&rows[0].input, &RenderOptions::default())
        .unwrap();
    for ad in [Adapters::prompt(&sp), Adapters::lora(&lora)] {
        let g = bb
            .generate(&prompt, ad, GenerateParams::greedy(24), |_| true)
            .unwrap();
        eprintln!("{:?} -> {:?}", rows[0].target, g.text);
        assert!(g.ids.len() <= 24);
    }
}

/// Several requests decoded as one batch — each with its own expert, length, sampling and
/// stops — produce what each produces alone, and a stopped row leaves the others unchanged.
#[test]
fn batched_generation_equals_each_request_alone() {
    common::require_model();
    let bb = common::quantized();
    let d = common::experts_dir();
    let sp = roe_backbone::SoftPrompt::from_peft_dir(d.join("prompt/reddit_qa")).unwrap();
    let lora = roe_backbone::Lora::from_peft_dir(d.join("lora/sms_spam")).unwrap();
    let rows = common::load_rows("reddit_qa", 2);
    let render = |s: &str| bb.render_prompt(s, &RenderOptions::default()).unwrap();
    let reqs = vec![
        GenerateRequest {
            prompt_ids: render(&rows[0].input),
            adapters: Adapters::prompt(&sp),
            params: GenerateParams::greedy(12),
        },
        GenerateRequest {
            prompt_ids: bb
                .encode("The capital of France is Paris. The capital of Germany is")
                .unwrap(),
            adapters: Adapters::none(),
            params: GenerateParams {
                max_new_tokens: 20,
                stop: vec![".".into()],
                ..GenerateParams::default()
            },
        },
        GenerateRequest {
            prompt_ids: render("Free entry! Text WIN to claim your prize"),
            adapters: Adapters::lora(&lora),
            params: GenerateParams {
                max_new_tokens: 8,
                temperature: 0.8,
                top_p: 0.9,
                seed: 7,
                ..GenerateParams::default()
            },
        },
        GenerateRequest {
            prompt_ids: render(&rows[1].input),
            adapters: Adapters::none(),
            params: GenerateParams::greedy(16),
        },
        // Far longer than the others: its prompt runs in a batch of its own, and the caches
        // are joined for the decode steps.
        GenerateRequest {
            prompt_ids: render(&"The quick brown fox jumps over the lazy dog. ".repeat(30)),
            adapters: Adapters::lora(&lora),
            params: GenerateParams::greedy(6),
        },
    ];
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| {
            bb.generate(&r.prompt_ids, r.adapters, r.params.clone(), |_| true)
                .unwrap()
        })
        .collect();
    let mut batch = bb.batch_generator(&reqs).unwrap();
    let mut streamed = vec![String::new(); reqs.len()];
    let mut steps = 0;
    while !batch.is_done() {
        let tokens = batch.step().unwrap();
        assert_eq!(tokens.len(), reqs.len());
        for (s, t) in streamed.iter_mut().zip(&tokens) {
            if let Some(t) = t {
                s.push_str(&t.text);
            }
        }
        steps += 1;
        assert!(steps <= 21, "the batch must end with its longest row");
    }
    for (i, a) in alone.iter().enumerate() {
        eprintln!("row {i}: {:?} ({:?})", a.text, a.finish_reason);
        assert_eq!(batch.ids(i), a.ids.as_slice(), "row {i}");
        assert_eq!(batch.text(i), a.text, "row {i}");
        assert_eq!(streamed[i], a.text, "row {i}: streamed deltas");
        assert_eq!(batch.finish_reason(i), Some(a.finish_reason), "row {i}");
        assert_eq!(batch.prompt_tokens(i), a.prompt_tokens, "row {i}");
    }
    assert_eq!(batch.finish_reason(1), Some(FinishReason::Stop));

    // Stopping one row (its client went away) leaves the others as they were.
    let mut batch = bb.batch_generator(&reqs).unwrap();
    batch.step().unwrap();
    batch.stop_row(3);
    while !batch.is_done() {
        let tokens = batch.step().unwrap();
        assert!(tokens[3].is_none(), "a stopped row gets no more tokens");
    }
    assert_eq!(batch.ids(3).len(), 1);
    for (i, a) in alone.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert_eq!(batch.ids(i), a.ids.as_slice(), "row {i} after a stop");
    }
    // Batch limits.
    assert!(bb.batch_generator(&[]).is_err());
    let many = vec![reqs[1].clone(); roe_backbone::MAX_GENERATE_BATCH + 1];
    assert!(bb.batch_generator(&many).is_err());
}

/// What a request ended with, read from the batch when its row finished.
#[derive(Debug, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    streamed: String,
    finish: FinishReason,
    prompt_tokens: usize,
}

/// One step of `batch`; `slots[row]` is the request a row serves. Records each request's
/// streamed text and, when its row finishes, what it ended with.
fn step(
    batch: &mut roe_backbone::BatchGenerator<'_>,
    slots: &[usize],
    streamed: &mut [String],
    outcomes: &mut [Option<Outcome>],
) {
    let tokens = batch.step().unwrap();
    assert_eq!(tokens.len(), slots.len());
    for (row, t) in tokens.into_iter().enumerate() {
        let Some(t) = t else { continue };
        let r = slots[row];
        streamed[r].push_str(&t.text);
        if let Some(finish) = t.finish {
            outcomes[r] = Some(Outcome {
                ids: batch.ids(row).to_vec(),
                text: batch.text(row).to_string(),
                streamed: streamed[r].clone(),
                finish,
                prompt_tokens: batch.prompt_tokens(row),
            });
        }
    }
}

/// Continuous batching: requests that join a running batch between steps (after its finished
/// rows were dropped) generate what they generate alone, and the rows already running go on
/// unchanged.
#[test]
fn requests_admitted_into_a_running_batch_generate_as_alone() {
    common::require_model();
    let bb = common::quantized();
    let d = common::experts_dir();
    let sp = roe_backbone::SoftPrompt::from_peft_dir(d.join("prompt/reddit_qa")).unwrap();
    let lora = roe_backbone::Lora::from_peft_dir(d.join("lora/sms_spam")).unwrap();
    let rows = common::load_rows("reddit_qa", 1);
    let render = |s: &str| bb.render_prompt(s, &RenderOptions::default()).unwrap();
    let reqs = [
        // Runs from the start to the end (no EOS within its first 40 tokens).
        GenerateRequest {
            prompt_ids: render("List the numbers from 1 to 100."),
            adapters: Adapters::none(),
            params: GenerateParams::greedy(14),
        },
        GenerateRequest {
            prompt_ids: bb.encode("One, two, three, four,").unwrap(),
            adapters: Adapters::none(),
            params: GenerateParams::greedy(4),
        },
        // Joins after 3 steps: sampled, with a LoRA.
        GenerateRequest {
            prompt_ids: render("Free entry! Text WIN to claim your prize"),
            adapters: Adapters::lora(&lora),
            params: GenerateParams {
                max_new_tokens: 8,
                temperature: 0.8,
                top_p: 0.9,
                seed: 7,
                ..GenerateParams::default()
            },
        },
        // Joins after 3 steps too; a prompt far longer than the running rows' caches.
        GenerateRequest {
            prompt_ids: render(&"The quick brown fox jumps over the lazy dog. ".repeat(12)),
            adapters: Adapters::lora(&lora),
            params: GenerateParams::greedy(5),
        },
        // Joins once the second row has finished and was dropped; stops at a stop string.
        GenerateRequest {
            prompt_ids: bb
                .encode("The capital of France is Paris. The capital of Germany is")
                .unwrap(),
            adapters: Adapters::none(),
            params: GenerateParams {
                max_new_tokens: 20,
                stop: vec![".".into()],
                ..GenerateParams::default()
            },
        },
        GenerateRequest {
            prompt_ids: render(&rows[0].input),
            adapters: Adapters::prompt(&sp),
            params: GenerateParams::greedy(6),
        },
    ];
    let alone: Vec<Outcome> = reqs
        .iter()
        .map(|r| {
            let mut streamed = String::new();
            let g = bb
                .generate(&r.prompt_ids, r.adapters, r.params.clone(), |t| {
                    streamed.push_str(&t.text);
                    true
                })
                .unwrap();
            Outcome {
                ids: g.ids,
                text: g.text,
                streamed,
                finish: g.finish_reason,
                prompt_tokens: g.prompt_tokens,
            }
        })
        .collect();

    // slots[row] = the request a batch row serves.
    let mut slots: Vec<usize> = vec![0, 1];
    let mut streamed = vec![String::new(); reqs.len()];
    let mut outcomes: Vec<Option<Outcome>> = (0..reqs.len()).map(|_| None).collect();
    let mut batch = bb.batch_generator(&reqs[..2]).unwrap();
    for _ in 0..3 {
        step(&mut batch, &slots, &mut streamed, &mut outcomes);
    }
    // Nothing finished yet: nothing to drop, rows keep their places.
    assert_eq!(batch.retain_unfinished().unwrap(), vec![0, 1]);
    batch.admit(&reqs[2..4]).unwrap();
    slots.extend([2, 3]);
    assert_eq!(batch.len(), 4);
    // Invalid or too many requests are refused and change nothing.
    let mut bad = reqs[4].clone();
    bad.params.stop = vec![String::new()];
    assert!(batch.admit(&[bad]).is_err());
    let many = vec![reqs[5].clone(); roe_backbone::MAX_GENERATE_BATCH - 3];
    assert!(batch.admit(&many).is_err());
    assert_eq!(batch.len(), 4);
    while outcomes[1].is_none() {
        step(&mut batch, &slots, &mut streamed, &mut outcomes);
    }
    let kept = batch.retain_unfinished().unwrap();
    assert!(!kept.contains(&1), "the finished row is dropped: {kept:?}");
    slots = kept.iter().map(|&k| slots[k]).collect();
    assert_eq!(batch.len(), slots.len());
    batch.admit(&reqs[4..]).unwrap();
    slots.extend([4, 5]);
    let mut steps = 0;
    while !batch.is_done() {
        step(&mut batch, &slots, &mut streamed, &mut outcomes);
        steps += 1;
        assert!(steps <= 21, "the batch must end with its longest row");
    }
    for (i, a) in alone.iter().enumerate() {
        eprintln!("request {i}: {:?} ({:?})", a.text, a.finish);
        assert_eq!(outcomes[i].as_ref(), Some(a), "request {i}");
    }
    assert_eq!(
        outcomes[4].as_ref().map(|o| o.finish),
        Some(FinishReason::Stop)
    );
    // Everything finished: dropping leaves an empty batch that takes new rows again.
    assert!(batch.retain_unfinished().unwrap().is_empty());
    assert!(batch.is_empty());
    batch.admit(&reqs[1..2]).unwrap();
    while !batch.is_done() {
        batch.step().unwrap();
    }
    assert_eq!(batch.ids(0), alone[1].ids.as_slice());
}
