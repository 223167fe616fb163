//! Simulated label review: before the day's cut-off, a person verifies a budget of the day's
//! candidates (the answers simulated with the true labels), and the cut-off then trusts them,
//! as the loop trusts the review page's answers. It measures what reviewing buys: the budget
//! spent on the samples a first cleansing pass flags (most suspicious first) against the same
//! budget spent on random samples.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Which samples the simulated reviewer verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum VerifyPick {
    /// The flagged samples of a first cleansing pass, highest noise score first (then the
    /// unflagged ones by score, if the budget is larger than the flagged set).
    #[default]
    Flagged,
    /// Samples drawn uniformly at random from the day's candidates.
    Random,
}

impl VerifyPick {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            VerifyPick::Flagged => "flagged",
            VerifyPick::Random => "random",
        }
    }
}

/// Stream of [`Rng::derive`] for the random pick (apart from the user labels' stream).
const PICK_STREAM: u64 = 0x7e41;

/// How many of `candidates` samples a budget (a share in [0, 1]) verifies: rounded to the
/// nearest sample, at least one for a positive budget.
pub fn budget_count(candidates: usize, budget: f64) -> usize {
    if budget <= 0.0 || candidates == 0 {
        return 0;
    }
    ((budget * candidates as f64).round() as usize).clamp(1, candidates)
}

/// The indices (ascending) of the `count` samples among the first `candidates` rows that the
/// reviewer verifies. `Flagged` needs the first pass's `flagged` mask and `scores` (higher:
/// more likely wrong); ties keep the lower index first. `Random` draws with `seed`.
pub fn pick(
    how: VerifyPick,
    candidates: usize,
    count: usize,
    flagged: &[bool],
    scores: &[f32],
    seed: u64,
) -> Vec<usize> {
    let count = count.min(candidates);
    let mut order: Vec<usize> = (0..candidates).collect();
    match how {
        VerifyPick::Flagged => {
            let flag = |i: usize| flagged.get(i).copied().unwrap_or(false);
            let score = |i: usize| scores.get(i).copied().unwrap_or(f32::NEG_INFINITY);
            order.sort_by(|&a, &b| {
                flag(b)
                    .cmp(&flag(a))
                    .then(score(b).total_cmp(&score(a)))
                    .then(a.cmp(&b))
            });
        }
        VerifyPick::Random => Rng::derive(seed, PICK_STREAM).shuffle(&mut order),
    }
    order.truncate(count);
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_rounds_and_keeps_one_for_a_positive_share() {
        assert_eq!(budget_count(1000, 0.0), 0);
        assert_eq!(budget_count(1000, 0.01), 10);
        assert_eq!(budget_count(1000, 0.0504), 50);
        assert_eq!(budget_count(10, 0.001), 1);
        assert_eq!(budget_count(10, 1.0), 10);
        assert_eq!(budget_count(0, 0.5), 0);
    }

    #[test]
    fn flagged_pick_takes_flagged_by_score_then_the_rest_by_score() {
        // Flagged: 1 (0.9), 3 (0.2), 4 (0.95); unflagged: 0 (0.99), 2 (0.5), 5 (0.1).
        let flagged = [false, true, false, true, true, false];
        let scores = [0.99, 0.9, 0.5, 0.2, 0.95, 0.1];
        let pick_n = |n| pick(VerifyPick::Flagged, 6, n, &flagged, &scores, 0);
        assert_eq!(pick_n(1), vec![4]);
        assert_eq!(pick_n(2), vec![1, 4]);
        assert_eq!(pick_n(3), vec![1, 3, 4]);
        // Beyond the flagged set: the unflagged by score (0 at 0.99 before 2 at 0.5).
        assert_eq!(pick_n(4), vec![0, 1, 3, 4]);
        assert_eq!(pick_n(5), vec![0, 1, 2, 3, 4]);
        assert_eq!(pick_n(9), vec![0, 1, 2, 3, 4, 5]);
        // Only the first `candidates` rows (the day's) are eligible.
        assert_eq!(
            pick(VerifyPick::Flagged, 3, 2, &flagged, &scores, 0),
            vec![0, 1]
        );
    }

    #[test]
    fn random_pick_is_seeded_distinct_and_spread() {
        let a = pick(VerifyPick::Random, 1000, 100, &[], &[], 7);
        assert_eq!(a, pick(VerifyPick::Random, 1000, 100, &[], &[], 7));
        assert_ne!(a, pick(VerifyPick::Random, 1000, 100, &[], &[], 8));
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "ascending and distinct");
        // Uniform: about half below 500 (binomial sd 5).
        let low = a.iter().filter(|&&i| i < 500).count();
        assert!((30..=70).contains(&low), "{low}");
    }
}
