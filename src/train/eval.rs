//! Evaluation: accuracy, per-class accuracy, confusion matrix, and how well a set of flagged
//! samples matches the truly mislabelled ones (precision, recall, F1, ROC AUC of a score).

use serde::Serialize;

/// Accuracy and confusion of predictions against true labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub per_class: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
    pub count: usize,
}

/// Evaluates `predicted` against `truth` over `classes` classes.
pub fn evaluate(predicted: &[u32], truth: &[u32], classes: usize) -> Evaluation {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&p, &t) in predicted.iter().zip(truth) {
        confusion[t as usize][p as usize] += 1;
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class = (0..classes)
        .map(|c| {
            let total: usize = confusion[c].iter().sum();
            if total == 0 {
                f64::NAN
            } else {
                confusion[c][c] as f64 / total as f64
            }
        })
        .collect();
    Evaluation {
        accuracy: if truth.is_empty() {
            f64::NAN
        } else {
            correct as f64 / truth.len() as f64
        },
        per_class,
        confusion,
        count: truth.len(),
    }
}

/// Flagged samples as a detector of the truly noisy ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Detection {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Precision / recall / F1 of `flagged` against `noisy` (both masks of the same length).
pub fn detection(flagged: &[bool], noisy: &[bool]) -> Detection {
    let tp = flagged
        .iter()
        .zip(noisy)
        .filter(|(f, n)| **f && **n)
        .count() as f64;
    let flagged_n = flagged.iter().filter(|f| **f).count() as f64;
    let noisy_n = noisy.iter().filter(|n| **n).count() as f64;
    let precision = if flagged_n > 0.0 { tp / flagged_n } else { 0.0 };
    let recall = if noisy_n > 0.0 { tp / noisy_n } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Detection {
        precision,
        recall,
        f1,
    }
}

/// ROC AUC of `score` (higher = more likely noisy) for the positives in `noisy`: the chance that
/// a random noisy sample scores above a random clean one (ties count half).
pub fn roc_auc(score: &[f32], noisy: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    // Average ranks over ties (1-based).
    let mut ranks = vec![0f64; score.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            ranks[o] = rank;
        }
        i = j + 1;
    }
    let pos = noisy.iter().filter(|n| **n).count() as f64;
    let neg = noisy.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(noisy)
        .filter(|(_, n)| **n)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases() {
        let e = evaluate(&[0, 1, 1, 2], &[0, 1, 2, 2], 3);
        assert_eq!(e.accuracy, 0.75);
        assert_eq!(e.per_class, vec![1.0, 1.0, 0.5]);
        assert_eq!(e.confusion[2], vec![0, 1, 1]);
        let d = detection(&[true, true, false, false], &[true, false, true, false]);
        assert_eq!((d.precision, d.recall, d.f1), (0.5, 0.5, 0.5));
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.1, 0.2], &[true, true, false, false]),
            1.0
        );
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), 0.5);
        assert!(
            (roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-12
        );
    }
}
