//! Answer-quality metrics shared by the benchmarks and the evaluation.

use std::collections::HashMap;

/// Lower-cased whitespace-separated words, punctuation kept: the recipe behind the reference
/// figures of `assets/experts/smollm2-135m/reference.json` (their reddit_qa F1 are
/// reproduced to the third decimal with it; SQuAD's normalisation, which also strips
/// punctuation and articles, gives 0.02-0.04 more on the same answers).
fn normalized_words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_lowercase).collect()
}

/// Token F1 of a generated answer against the target (1 when both are empty).
pub fn token_f1(prediction: &str, target: &str) -> f64 {
    let p = normalized_words(prediction);
    let t = normalized_words(target);
    if p.is_empty() || t.is_empty() {
        return if p.is_empty() && t.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &t {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / t.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::token_f1;

    #[test]
    fn f1_counts_shared_lowercased_words_once() {
        assert_eq!(token_f1("The cat  sat", "the CAT sat"), 1.0);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("dog", ""), 0.0);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        // 1 shared of 2 predicted and 4 target words: p=0.5, r=0.25.
        let f = token_f1("cat dog", "cat bird fish cow");
        assert!((f - 2.0 * 0.5 * 0.25 / 0.75).abs() < 1e-12);
        // Repeated words count at most as often as in the target.
        assert!((token_f1("cat cat", "cat") - 2.0 * 0.5 / 1.5).abs() < 1e-12);
        // Punctuation stays part of a word, and articles count (the reference's recipe).
        assert_eq!(token_f1("cat.", "cat"), 0.0);
        assert!((token_f1("a cat", "cat") - 2.0 * 0.5 / 1.5).abs() < 1e-12);
    }
}
