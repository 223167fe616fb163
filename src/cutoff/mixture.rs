//! The `mixture` cut: how many labels are wrong, estimated from the shape of the distribution
//! of `logit p(given label)` (the MC-mean probability). A two-component Gaussian mixture is
//! fitted by EM; samples more likely under the low component than the high one, and below
//! the high component's mean, count as noisy (the DivideMix criterion, on the logit, where a
//! confident classifier's clean samples form a roughly symmetric mode). When one Gaussian
//! explains the values as well (by BIC) nothing counts as noisy. Unlike the confident joint it
//! does not count every sample the classifier gets wrong: hard but correctly labelled samples
//! stay in the clean component's tail.

/// Probabilities are clamped to [MIN_PROB, 1 − MIN_PROB] before the logit (±13.8).
const MIN_PROB: f64 = 1e-6;
/// Variance floor of a component, as a share of the values' variance, so that one cannot
/// collapse onto a cluster of equal values (e.g. probabilities clamped at `MIN_PROB`).
const MIN_VAR_SHARE: f64 = 0.01;
const MAX_ITERATIONS: usize = 200;
const TOLERANCE: f64 = 1e-9;

/// A fitted two-component mixture: (weight, mean, variance) of the high (clean) and low
/// (noisy) components.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoGaussians {
    pub clean: (f64, f64, f64),
    pub noisy: (f64, f64, f64),
}

impl TwoGaussians {
    /// Fits the mixture to `x` by EM, started from the lower and upper quartiles (the extremes when
    /// those are equal); `None`
    /// with fewer than 2 values, no spread, or when one Gaussian fits as well by BIC.
    pub fn fit(x: &[f64]) -> Option<Self> {
        let n = x.len();
        if n < 2 {
            return None;
        }
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        if var <= 1e-12 {
            return None;
        }
        let min_var = MIN_VAR_SHARE * var;
        let mut sorted = x.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mut comps = [(0.5, sorted[n / 4], var), (0.5, sorted[(3 * n) / 4], var)];
        if comps[0].1 == comps[1].1 {
            (comps[0].1, comps[1].1) = (sorted[0], sorted[n - 1]);
        }
        let mut resp = vec![0f64; n];
        let mut last = f64::NEG_INFINITY;
        for _ in 0..MAX_ITERATIONS {
            // E step: the responsibility of the high-loss component; the log-likelihood.
            let mut log_lik = 0.0;
            for (r, &v) in resp.iter_mut().zip(x) {
                let a = comps[0].0 * density(v, comps[0].1, comps[0].2);
                let b = comps[1].0 * density(v, comps[1].1, comps[1].2);
                let total = a + b;
                *r = if total > 0.0 { b / total } else { 0.5 };
                log_lik += total.max(f64::MIN_POSITIVE).ln();
            }
            // M step.
            for (k, comp) in comps.iter_mut().enumerate() {
                let w: Vec<f64> = resp
                    .iter()
                    .map(|&r| if k == 1 { r } else { 1.0 - r })
                    .collect();
                let total: f64 = w.iter().sum();
                if total <= 0.0 {
                    return None;
                }
                let m = w.iter().zip(x).map(|(w, v)| w * v).sum::<f64>() / total;
                let s = w
                    .iter()
                    .zip(x)
                    .map(|(w, v)| w * (v - m).powi(2))
                    .sum::<f64>()
                    / total;
                *comp = (total / n as f64, m, s.max(min_var));
            }
            if (log_lik - last).abs() <= TOLERANCE * log_lik.abs().max(1.0) {
                break;
            }
            last = log_lik;
        }
        // BIC of one Gaussian (2 parameters) against the mixture (5).
        let one: f64 = x
            .iter()
            .map(|&v| density(v, mean, var).max(f64::MIN_POSITIVE).ln())
            .sum();
        let two: f64 = x
            .iter()
            .map(|&v| {
                let d = comps[0].0 * density(v, comps[0].1, comps[0].2)
                    + comps[1].0 * density(v, comps[1].1, comps[1].2);
                d.max(f64::MIN_POSITIVE).ln()
            })
            .sum();
        let ln_n = (n as f64).ln();
        if -2.0 * two + 5.0 * ln_n >= -2.0 * one + 2.0 * ln_n {
            return None;
        }
        if comps[0].1 < comps[1].1 {
            comps.swap(0, 1);
        }
        Some(Self {
            clean: comps[0],
            noisy: comps[1],
        })
    }

    /// Whether `v` is counted as noisy: more likely under the low component and below the
    /// high component's mean.
    pub fn is_noisy(&self, v: f64) -> bool {
        let (wc, mc, vc) = self.clean;
        let (wn, mn, vn) = self.noisy;
        v < mc && wn * density(v, mn, vn) > wc * density(v, mc, vc)
    }
}

fn density(v: f64, mean: f64, var: f64) -> f64 {
    (-(v - mean).powi(2) / (2.0 * var)).exp() / (2.0 * std::f64::consts::PI * var).sqrt()
}

/// The noisy labels of each given class the mixture estimates from `probs` (row-major
/// [n, classes], the MC-mean probabilities) over the `eligible` samples: one mixture over all
/// of them, its noisy samples counted by given class.
pub fn mixture_noise_counts(
    probs: &[f32],
    labels: &[u32],
    classes: usize,
    eligible: &[bool],
) -> Vec<f64> {
    let logit = |i: usize| -> f64 {
        let p = f64::from(probs[i * classes + labels[i] as usize]).clamp(MIN_PROB, 1.0 - MIN_PROB);
        (p / (1.0 - p)).ln()
    };
    let rows: Vec<usize> = (0..labels.len()).filter(|&i| eligible[i]).collect();
    let x: Vec<f64> = rows.iter().map(|&i| logit(i)).collect();
    let mut counts = vec![0f64; classes];
    if let Some(fit) = TwoGaussians::fit(&x) {
        for (&i, &v) in rows.iter().zip(&x) {
            if fit.is_noisy(v) {
                counts[labels[i] as usize] += 1.0;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn normal(rng: &mut Rng, mean: f64, sd: f64) -> f64 {
        // Box–Muller.
        let (u, v) = (rng.unit_f64().max(1e-12), rng.unit_f64());
        mean + sd * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    #[test]
    fn recovers_two_separated_components() {
        let mut rng = Rng::new(3);
        let mut x: Vec<f64> = (0..800).map(|_| normal(&mut rng, 3.0, 1.0)).collect();
        x.extend((0..200).map(|_| normal(&mut rng, -4.0, 1.0)));
        let fit = TwoGaussians::fit(&x).unwrap();
        assert!((fit.clean.0 - 0.8).abs() < 0.01, "{fit:?}");
        assert!((fit.clean.1 - 3.0).abs() < 0.1 && (fit.noisy.1 + 4.0).abs() < 0.2);
        let noisy = x.iter().filter(|&&v| fit.is_noisy(v)).count();
        assert!(
            (199..=201).contains(&noisy),
            "{noisy}: the groups barely overlap"
        );
    }

    #[test]
    fn by_hand_and_degenerate_inputs() {
        // Two tight groups: one component on each, and the lower group is noisy.
        let x = [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, -3.0, -3.0];
        let fit = TwoGaussians::fit(&x).unwrap();
        // Variance of x: mean 2.25, (6·1.75² + 2·5.25²) / 8 = 9.1875; the floor is 1% of it.
        let floor = MIN_VAR_SHARE * 9.1875;
        let close = |a: (f64, f64, f64), b: (f64, f64, f64)| {
            (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12 && (a.2 - b.2).abs() < 1e-12
        };
        assert!(close(fit.clean, (0.75, 4.0, floor)), "{fit:?}");
        assert!(close(fit.noisy, (0.25, -3.0, floor)), "{fit:?}");
        assert!(fit.is_noisy(-3.0) && !fit.is_noisy(4.0) && !fit.is_noisy(1.0));
        assert_eq!(TwoGaussians::fit(&[1.0]), None);
        assert_eq!(TwoGaussians::fit(&[2.0; 10]), None);
    }

    /// No noise, no cut: one Gaussian mode is kept whole (BIC prefers one component), where a
    /// confident joint would still count its lower tail.
    #[test]
    fn a_single_mode_is_all_clean() {
        let mut rng = Rng::new(5);
        let x: Vec<f64> = (0..2000).map(|_| normal(&mut rng, 2.5, 1.5)).collect();
        assert_eq!(TwoGaussians::fit(&x), None);
        let probs: Vec<f32> = x
            .iter()
            .flat_map(|&z| {
                let p = (1.0 / (1.0 + (-z).exp())) as f32;
                [p, 1.0 - p]
            })
            .collect();
        let labels = vec![0u32; x.len()];
        let counts = mixture_noise_counts(&probs, &labels, 2, &vec![true; x.len()]);
        assert_eq!(counts, vec![0.0, 0.0]);
    }

    #[test]
    fn counts_by_given_class_over_eligible_rows() {
        // Class 0 sure of its label; two class-1 rows that the model thinks are class 0; the
        // last class-1 row is trusted (not eligible).
        let mut probs = Vec::new();
        for i in 0..12 {
            let p = 0.97 + 0.002 * i as f32;
            probs.extend([p, 1.0 - p]);
        }
        for _ in 0..3 {
            probs.extend([0.99f32, 0.01]);
        }
        let labels: Vec<u32> = (0..15).map(|i| u32::from(i >= 12)).collect();
        let mut eligible = vec![true; labels.len()];
        eligible[14] = false;
        let counts = mixture_noise_counts(&probs, &labels, 2, &eligible);
        assert_eq!(counts, vec![0.0, 2.0]);
    }
}
