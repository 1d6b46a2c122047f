//! Long prompts: read whole (not cut to the canonical 384 ids) in passes of the prefill
//! budget, with the results of one pass.
mod common;

use roe_backbone::{
    Adapters, Backbone, GenerateParams, GenerateRequest, KvCache, LoraBatch, ScoreRequest,
};

/// The backbone with prompts run in passes of `tokens` positions over all rows.
fn chunked(tokens: usize) -> Backbone {
    Backbone::load(common::gguf_path(), None)
        .expect("load backbone")
        .with_max_batch_prefill_tokens(tokens)
}

/// A passage whose first sentence holds the answer and whose question comes last.
fn passage(sentences: usize) -> String {
    let mut s = String::from("The secret word is violet. ");
    for i in 0..sentences {
        s.push_str(&format!(
            "Shelf {i} of the old library holds {} books about rivers and {} about hills. ",
            i * 7 % 31,
            i * 11 % 17
        ));
    }
    s.push_str("Question: what is the secret word?");
    s
}

#[test]
fn a_prompt_past_the_canonical_cut_is_read_whole_and_chunks_change_nothing() {
    common::require_model();
    let whole = common::quantized();
    let in_chunks = chunked(128);
    assert_eq!(whole.context_length(), 8192, "SmolLM2's GGUF says 8,192");
    let input = passage(60);
    let choices = vec!["violet".to_string(), "orange".to_string()];
    let req = ScoreRequest {
        input: &input,
        choices: &choices,
        adapters: Adapters::none(),
    };
    let opts = whole.serving_render_options();
    let one_pass = whole.score_batch_with(&[req], &opts).unwrap().remove(0);
    let passes = in_chunks.score_batch_with(&[req], &opts).unwrap().remove(0);
    assert!(one_pass.prompt_tokens > 1000, "{}", one_pass.prompt_tokens);
    assert_eq!(one_pass.truncated_tokens, 0);
    assert_eq!(passes.prompt_tokens, one_pass.prompt_tokens);
    for (a, b) in one_pass.choices.iter().zip(&passes.choices) {
        assert!(
            (a.sum_logprob - b.sum_logprob).abs() < 2e-3,
            "one pass {a:?}, {} passes {b:?}",
            one_pass.prompt_tokens.div_ceil(128)
        );
    }
    // The canonical rendering keeps the last 384 ids: it reports the cut, and its scores are
    // not those of the whole passage.
    let cut = whole
        .score_batch_with(&[req], &whole.score_render_options())
        .unwrap()
        .remove(0);
    assert_eq!(cut.prompt_tokens, 384);
    assert_eq!(cut.truncated_tokens, one_pass.prompt_tokens - 384);
    assert!(
        (cut.choices[0].sum_logprob - one_pass.choices[0].sum_logprob).abs() > 1e-2,
        "cut {:?}, whole {:?}",
        cut.choices,
        one_pass.choices
    );
}

#[test]
fn prefill_in_passes_gives_every_row_its_last_hidden_state() {
    common::require_model();
    let whole = common::quantized();
    // 64 positions a pass over 2 rows: 32 per row, so the short row has no position in the
    // later passes.
    let in_chunks = chunked(64);
    let long = whole.encode(&passage(10)).unwrap();
    let short = whole.encode("Rivers run to the sea.").unwrap();
    let rows = [(None, long.as_slice()), (None, short.as_slice())];
    let (embeds, lens) = whole.embed_rows(&rows).unwrap();
    assert!(lens[0] > 4 * 32 && lens[1] < 32, "{lens:?}");
    let mut cache = KvCache::new();
    let passes = in_chunks
        .prefill_while(&embeds, &lens, &mut cache, &LoraBatch::none(), &|| true)
        .unwrap()
        .unwrap();
    assert_eq!(cache.positions(), lens.as_slice());
    for (i, ids) in [&long, &short].into_iter().enumerate() {
        let (e, l) = whole.embed_rows(&[(None, ids.as_slice())]).unwrap();
        let h = whole
            .forward(&e, &l, &mut KvCache::new(), &LoraBatch::none())
            .unwrap();
        let alone: Vec<f32> = h.get(0).unwrap().get(l[0] - 1).unwrap().to_vec1().unwrap();
        let got: Vec<f32> = passes.get(i).unwrap().to_vec1().unwrap();
        let worst = alone
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-3, "row {i}: largest difference {worst}");
    }
}

#[test]
fn generation_after_a_prompt_in_passes_is_the_same() {
    common::require_model();
    let whole = common::quantized();
    let in_chunks = chunked(96);
    let prompt = whole.encode(&passage(25)).unwrap();
    let a = whole
        .generate(&prompt, Adapters::none(), GenerateParams::greedy(6), |_| {
            true
        })
        .unwrap();
    let b = in_chunks
        .generate(&prompt, Adapters::none(), GenerateParams::greedy(6), |_| {
            true
        })
        .unwrap();
    assert_eq!(a.prompt_tokens, prompt.len());
    assert_eq!(a.ids, b.ids, "{:?} vs {:?}", a.text, b.text);
}

#[test]
fn a_generation_past_the_context_is_refused_before_it_runs() {
    common::require_model();
    let bb = common::quantized();
    let context = bb.context_length();
    let prompt = vec![bb.encode(" river").unwrap()[0]; context - 4];
    let request = |max_new_tokens| GenerateRequest {
        prompt_ids: prompt.clone(),
        adapters: Adapters::none(),
        params: GenerateParams::greedy(max_new_tokens),
    };
    let e = bb.batch_generator(&[request(8)]).err().expect("refused");
    assert!(e.to_string().contains("context length 8192"), "{e}");
    // (Five new tokens would fit: four read back. The serving tests and `roe bench context`
    // run prompts at the context's length.)
}

#[test]
fn serving_reads_a_long_choice_whole_where_training_keeps_64_ids() {
    common::require_model();
    let bb = common::quantized();
    let choices = vec![format!("river{}", " river".repeat(99)), "sea".to_string()];
    let req = ScoreRequest {
        input: "Name a long thing.",
        choices: &choices,
        adapters: Adapters::none(),
    };
    let served = bb
        .score_batch_with(&[req], &bb.serving_render_options())
        .unwrap()
        .remove(0);
    assert_eq!(
        served.choices[0].num_tokens,
        100 + 1,
        "every id and the end id"
    );
    let canonical = bb
        .score_batch_with(&[req], &bb.score_render_options())
        .unwrap()
        .remove(0);
    assert_eq!(canonical.choices[0].num_tokens, 64 + 1);
}

#[test]
fn long_attention_made_one_kv_head_at_a_time_gives_the_same_scores() {
    common::require_model();
    // About 3,000 positions in one pass: 9 heads x 3,000 x 3,000 scores, past the 64 Mi elements
    // after which a pass makes them one KV head at a time; in passes of 512 they stay below.
    let one_pass = chunked(4096);
    let small_passes = chunked(512);
    let input = passage(160);
    let choices = vec!["violet".to_string(), "orange".to_string()];
    let req = ScoreRequest {
        input: &input,
        choices: &choices,
        adapters: Adapters::none(),
    };
    let opts = one_pass.serving_render_options();
    let a = one_pass.score_batch_with(&[req], &opts).unwrap().remove(0);
    assert!(
        9 * a.prompt_tokens * a.prompt_tokens > 64 << 20,
        "{} tokens",
        a.prompt_tokens
    );
    let b = small_passes
        .score_batch_with(&[req], &opts)
        .unwrap()
        .remove(0);
    for (x, y) in a.choices.iter().zip(&b.choices) {
        assert!(
            (x.sum_logprob - y.sum_logprob).abs() < 2e-3,
            "{x:?} vs {y:?}"
        );
    }
}
