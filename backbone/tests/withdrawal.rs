//! A Score whose request is withdrawn stops inside the forward pass it is in, not after it.
mod common;

use std::cell::Cell;

use roe_backbone::{Adapters, RenderOptions, ScoreRequest};

#[test]
fn a_withdrawn_score_stops_between_layers() {
    common::require_model();
    let bb = common::quantized();
    let input = "Review: the plot was thin but the actors carried it. Sentiment?".repeat(4);
    let choices = vec!["positive".to_string(), "negative".to_string()];
    let reqs = [ScoreRequest {
        input: &input,
        choices: &choices,
        adapters: Adapters::none(),
    }];
    let opts = RenderOptions::default();

    let asked = Cell::new(0usize);
    let all = bb
        .score_batch_while(&reqs, &opts, &|_| {
            asked.set(asked.get() + 1);
            true
        })
        .expect("score");
    let full = all[0].as_ref().expect("wanted throughout, so scored");
    let plain = bb.score_batch_with(&reqs, &opts).expect("score");
    assert_eq!(full.best, plain[0].best);
    assert!((full.choices[0].sum_logprob - plain[0].choices[0].sum_logprob).abs() < 1e-4);
    // Two choices of one token make a prompt pass and no continuation pass: only checks
    // between layers can ask this often.
    let layers = bb.config().num_layers;
    assert!(
        asked.get() >= layers,
        "asked {} times over {layers} layers",
        asked.get()
    );

    // Withdrawn a few layers into the prompt pass: nothing is returned, and nothing is
    // asked once the answer was no.
    let stop_at = 6;
    let asked = Cell::new(0usize);
    let out = bb
        .score_batch_while(&reqs, &opts, &|_| {
            asked.set(asked.get() + 1);
            asked.get() < stop_at
        })
        .expect("score");
    assert!(out[0].is_none(), "a withdrawn request has no result");
    assert_eq!(
        asked.get(),
        stop_at,
        "no more questions after the first no (asked {})",
        asked.get()
    );
}
