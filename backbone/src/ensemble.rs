//! Prompt ensembles (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning", §7): the same input is scored by several experts and their predictions are
//! combined by majority vote. Pure functions, so the gRPC service and offline evaluation
//! combine members the same way.

use crate::error::{BackboneError, Result};
use crate::score::ScoreOutput;

/// The combined prediction of an ensemble over one request's choices.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleVote {
    /// Per choice: how many members picked it (their `best`).
    pub votes: Vec<u32>,
    /// Per choice: the sum over members of its summed log-probability.
    pub summed_logprob: Vec<f32>,
    /// The winning choice: most votes; ties broken by the highest `summed_logprob`, then the
    /// lowest index.
    pub best: usize,
}

/// Majority vote of `members`, the scores of one input and one list of choices under
/// different experts.
///
/// Each member votes for its own `best` (the choice with the highest summed log-probability).
/// Votes alone tie often with small ensembles (two members that disagree), so ties fall back
/// to the log-likelihood summed over members — the ensemble's joint confidence — and only then
/// to the lowest index, which keeps the result deterministic. A NaN sum never wins a tie.
///
/// Errors (`InvalidInput`) when there are no members, when members disagree on the number of
/// choices, when there are no choices, or when a member's `best` is not one of its choices.
pub fn ensemble_vote(members: &[ScoreOutput]) -> Result<EnsembleVote> {
    let Some(first) = members.first() else {
        return Err(BackboneError::InvalidInput(
            "an ensemble needs at least one member".into(),
        ));
    };
    let n = first.choices.len();
    if n == 0 {
        return Err(BackboneError::InvalidInput(
            "an ensemble needs at least one choice".into(),
        ));
    }
    let mut votes = vec![0u32; n];
    let mut summed_logprob = vec![0f32; n];
    for (m, out) in members.iter().enumerate() {
        if out.choices.len() != n {
            return Err(BackboneError::InvalidInput(format!(
                "ensemble member {m} scored {} choices, member 0 scored {n}",
                out.choices.len()
            )));
        }
        if out.best >= n {
            return Err(BackboneError::InvalidInput(format!(
                "ensemble member {m} picked choice {} of {n}",
                out.best
            )));
        }
        votes[out.best] += 1;
        for (s, c) in summed_logprob.iter_mut().zip(&out.choices) {
            *s += c.sum_logprob;
        }
    }
    let mut best = 0;
    for i in 1..n {
        // Strict comparisons: an equal (or NaN) candidate keeps the lower index.
        let better = votes[i] > votes[best]
            || (votes[i] == votes[best] && summed_logprob[i] > summed_logprob[best]);
        if better {
            best = i;
        }
    }
    Ok(EnsembleVote {
        votes,
        summed_logprob,
        best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::ChoiceScore;

    /// A member with these summed log-probabilities; its `best` is their argmax (first on
    /// ties), as the backbone computes it.
    fn member(sums: &[f32]) -> ScoreOutput {
        let mut best = 0;
        for (i, &s) in sums.iter().enumerate() {
            if s > sums[best] {
                best = i;
            }
        }
        ScoreOutput {
            choices: sums
                .iter()
                .map(|&s| ChoiceScore {
                    sum_logprob: s,
                    mean_logprob: s / 2.0,
                    num_tokens: 2,
                })
                .collect(),
            best,
            best_by_mean: best,
            alt_end_sums: Vec::new(),
            prompt_tokens: 5,
            truncated_tokens: 0,
        }
    }

    #[test]
    fn majority_wins_even_against_a_higher_summed_logprob() {
        // Two members pick choice 1 narrowly; one picks choice 0 with great confidence, so
        // choice 0 has the higher summed log-likelihood but fewer votes.
        let v = ensemble_vote(&[
            member(&[-1.0, -0.9]),
            member(&[-1.0, -0.9]),
            member(&[-0.01, -20.0]),
        ])
        .unwrap();
        assert_eq!(v.votes, vec![1, 2]);
        assert!((v.summed_logprob[0] - -2.01).abs() < 1e-5);
        assert!((v.summed_logprob[1] - -21.8).abs() < 1e-4);
        assert_eq!(v.best, 1);
    }

    #[test]
    fn vote_ties_go_to_the_higher_summed_logprob() {
        // One vote each for choices 0 and 2; choice 2's members are more confident overall.
        let v = ensemble_vote(&[member(&[-1.0, -3.0, -2.0]), member(&[-5.0, -4.0, -0.5])]).unwrap();
        assert_eq!(v.votes, vec![1, 0, 1]);
        assert_eq!(v.summed_logprob, vec![-6.0, -7.0, -2.5]);
        assert_eq!(v.best, 2);
    }

    #[test]
    fn full_ties_go_to_the_lowest_index() {
        let v = ensemble_vote(&[member(&[-1.0, -2.0]), member(&[-2.0, -1.0])]).unwrap();
        assert_eq!(v.votes, vec![1, 1]);
        assert_eq!(v.summed_logprob, vec![-3.0, -3.0]);
        assert_eq!(v.best, 0);
        // A NaN sum does not win a vote tie.
        let v = ensemble_vote(&[member(&[-1.0, f32::NAN]), {
            let mut m = member(&[-2.0, -1.0]);
            m.best = 1;
            m
        }])
        .unwrap();
        assert_eq!(v.votes, vec![1, 1]);
        assert_eq!(v.best, 0);
    }

    #[test]
    fn one_member_is_its_own_prediction() {
        let m = member(&[-3.0, -0.2, -1.0]);
        let v = ensemble_vote(std::slice::from_ref(&m)).unwrap();
        assert_eq!(v.best, m.best);
        assert_eq!(v.votes, vec![0, 1, 0]);
    }

    #[test]
    fn malformed_ensembles_are_errors() {
        assert!(ensemble_vote(&[]).unwrap_err().is_invalid_input());
        assert!(ensemble_vote(&[member(&[])])
            .unwrap_err()
            .is_invalid_input());
        let e = ensemble_vote(&[member(&[-1.0, -2.0]), member(&[-1.0])]).unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("member 1"),
            "{e}"
        );
        let mut bad = member(&[-1.0, -2.0]);
        bad.best = 2;
        assert!(ensemble_vote(&[bad]).unwrap_err().is_invalid_input());
    }
}
