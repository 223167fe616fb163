//! User-feedback label noise: users give the right label only part of the time.

use super::error::{DataError, Result};
use crate::rng::Rng;

/// Labels as users gave them, with the true labels kept beside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoisyLabels {
    /// The labels to train on.
    pub given: Vec<usize>,
    /// The true labels, to measure how well noise is found.
    pub truth: Vec<usize>,
}

impl NoisyLabels {
    /// Mask of the samples whose given label differs from the truth.
    pub fn flipped(&self) -> Vec<bool> {
        self.given
            .iter()
            .zip(&self.truth)
            .map(|(g, t)| g != t)
            .collect()
    }
}

/// Draws user-feedback labels once: each target is kept with probability `accuracy`, otherwise
/// replaced by a uniformly random *different* class. The same seed gives the same labels.
pub fn user_feedback_labels(
    targets: &[usize],
    num_classes: usize,
    accuracy: f64,
    seed: u64,
) -> Result<NoisyLabels> {
    if !(0.0..=1.0).contains(&accuracy) {
        return Err(DataError::invalid(
            "--user-accuracy",
            accuracy,
            "a probability in [0, 1]",
        ));
    }
    if num_classes < 2 && accuracy < 1.0 {
        return Err(DataError::invalid(
            "number of classes",
            num_classes,
            "at least 2 to flip labels to another class",
        ));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= num_classes) {
        return Err(DataError::invalid(
            "target",
            bad,
            format!("a class index below {num_classes}"),
        ));
    }
    let mut rng = Rng::new(seed);
    let given = targets
        .iter()
        .map(|&t| {
            if rng.bernoulli(accuracy) {
                t
            } else {
                // Uniform over the other num_classes − 1 classes.
                let r = rng.below(num_classes as u64 - 1) as usize;
                if r >= t {
                    r + 1
                } else {
                    r
                }
            }
        })
        .collect();
    Ok(NoisyLabels {
        given,
        truth: targets.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_fraction_flip_spread_and_determinism() {
        let n = 100_000;
        let classes = 10;
        let targets: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let a = 0.7;
        let labels = user_feedback_labels(&targets, classes, a, 9).unwrap();
        assert_eq!(labels.truth, targets);
        let kept = labels.flipped().iter().filter(|f| !**f).count() as f64;
        let sd = (n as f64 * a * (1.0 - a)).sqrt();
        assert!((kept - n as f64 * a).abs() < 4.0 * sd, "kept {kept}");

        // Flips spread uniformly over the other classes: chi-square over the offset
        // (given − true) mod C, which takes the values 1..C−1; 9 degrees of freedom less one.
        let mut offsets = vec![0f64; classes];
        for (&g, &t) in labels.given.iter().zip(&targets) {
            assert!(g < classes);
            if g != t {
                offsets[(g + classes - t) % classes] += 1.0;
            }
        }
        assert_eq!(offsets[0], 0.0);
        let flips: f64 = offsets.iter().sum();
        let expected = flips / (classes - 1) as f64;
        let chi2: f64 = offsets[1..]
            .iter()
            .map(|o| (o - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 26.1, "chi2 {chi2} (8 dof, 0.999 quantile 26.1)");

        assert_eq!(
            user_feedback_labels(&targets, classes, a, 9).unwrap(),
            labels
        );
        assert_ne!(
            user_feedback_labels(&targets, classes, a, 10)
                .unwrap()
                .given,
            labels.given
        );
    }

    #[test]
    fn extremes_and_errors() {
        let targets = vec![0, 1, 2, 1];
        assert_eq!(
            user_feedback_labels(&targets, 3, 1.0, 0).unwrap().given,
            targets
        );
        let all_wrong = user_feedback_labels(&targets, 3, 0.0, 0).unwrap();
        assert!(all_wrong.flipped().iter().all(|&f| f));
        assert!(user_feedback_labels(&targets, 3, 1.5, 0)
            .unwrap_err()
            .to_string()
            .contains("[0, 1]"));
        assert!(user_feedback_labels(&targets, 2, 0.5, 0)
            .unwrap_err()
            .to_string()
            .contains("below 2"));
        assert!(user_feedback_labels(&[0], 1, 0.5, 0).is_err());
    }
}
