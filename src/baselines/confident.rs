//! Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty
//! in Dataset Labels", JAIR 2021): a pure-Rust port of cleanlab's
//! `cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=...)` (cleanlab 2.9) for
//! single-label multi-class data, with every other argument at cleanlab's default
//! (`frac_noise=1.0`, `num_to_remove_per_class=None`, `min_examples_per_class=1`,
//! `multi_label=False`, `return_indices_ranked_by=None`).
//!
//! The steps, as in cleanlab:
//! 1. per-class thresholds `t_k` = mean self-confidence of the samples labelled `k`;
//! 2. the confident joint `C[given][true]`: a sample counts for the class(es) whose probability
//!    reaches `t_k − 1e-6` (the arg-max among them when several do); its diagonal is raised to
//!    at least 1, then it is calibrated to the label counts and rounded preserving row totals;
//! 3. the prune-count matrix (`C` transposed, at least one sample kept per class);
//! 4. the filter: `prune_by_noise_rate` flags, for every off-diagonal `(given k, true j)`, the
//!    `C[k][j]` samples labelled `k` with the largest margin `p_j − p_k`; `prune_by_class` flags
//!    the `n_k − C[k][k]` samples labelled `k` with the smallest `p_k`; `both` is their
//!    intersection; `confident_learning` flags the off-diagonal samples of the confident joint;
//!    `predicted_neq_given` flags `argmax p ≠ label`;
//! 5. samples whose given label is (within 1e-6) the arg-max are never flagged.
//!
//! Numerics follow numpy, so the masks are bit-for-bit cleanlab's (`tests/cleanlab_parity.rs`
//! checks a fixture; its ignored `stress_cases` test checks any number of generated cases):
//! - arithmetic happens in the probabilities' own precision ([`Prob`]: `f32` as cleanlab on a
//!   float32 array, or `f64`); the thresholds are widened to `f64` exactly when a class has no
//!   sample (cleanlab's fill value `2` is a Python int, which makes numpy build a float64 array);
//! - sums use numpy's pairwise summation in numpy's memory order (the confident joint is a
//!   transposed, column-major, matrix when cleanlab sums it); rounding is half-to-even;
//! - orders are numpy's `argsort`, which is not stable: [`numpy_argsort`] reproduces the order
//!   it gives exactly tied values on x86-64 with AVX-512 (where the fixture was made). Ties at
//!   a cut-off are common (equal counts in a row of the confident joint round alike): in about
//!   half of random 400 × 10 cases some flag depends on them. numpy on other CPUs (AVX2 only,
//!   or not x86) orders ties differently, so cleanlab's own masks there can differ from these
//!   by a few samples.

use std::fmt;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::numpy_compat::{mean, pairwise_sum};
pub use super::numpy_compat::{numpy_argsort, Prob};

/// cleanlab's `FLOATING_POINT_COMPARISON`.
const FLOATING_POINT_COMPARISON: f64 = 1e-6;
/// cleanlab's `CONFIDENT_THRESHOLDS_LOWER_BOUND`.
const CONFIDENT_THRESHOLDS_LOWER_BOUND: f64 = 2.0 * FLOATING_POINT_COMPARISON;
/// cleanlab's `TINY_VALUE`, the floor of denominators in the calibration.
const TINY_VALUE: f64 = 1e-100;
/// Threshold of a class with no sample (cleanlab's `BIG_VALUE`): no probability reaches it.
const BIG_VALUE: f64 = 2.0;
/// cleanlab's default `min_examples_per_class`.
pub const MIN_EXAMPLES_PER_CLASS: usize = 1;

/// Bad input to confident learning.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfidentError {
    #[error("no samples: confident learning needs at least one labelled sample")]
    Empty,
    #[error("the number of classes must be positive")]
    NoClasses,
    #[error("pred_probs has {len} values, not {n} samples x {classes} classes")]
    Shape {
        len: usize,
        n: usize,
        classes: usize,
    },
    #[error("label {label} of sample {index} is not below the number of classes {classes}")]
    LabelOutOfRange {
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("pred_probs[{index}][{class}] is not finite ({value})")]
    NotFinite {
        index: usize,
        class: usize,
        value: f64,
    },
    #[error("pred_probs[{index}][{class}] = {value} is not a probability (outside [0, 1] by more than 1e-6)")]
    NotProbability {
        index: usize,
        class: usize,
        value: f64,
    },
    #[error(
        "the confident joint must be square: row {row} has {len} entries for {classes} classes"
    )]
    JointNotSquare {
        row: usize,
        len: usize,
        classes: usize,
    },
    #[error(
        "labels must contain at least 2 classes (or be all 0, as cleanlab allows); all are {0}"
    )]
    OneClass(u32),
}

/// How [`find_label_issues`] decides which samples are label issues (cleanlab's `filter_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum FilterBy {
    /// For every off-diagonal (given k, true j) of the confident joint, the samples labelled k
    /// with the largest margin p_j − p_k (cleanlab's default).
    #[default]
    PruneByNoiseRate,
    /// For every class k, the samples labelled k with the smallest p_k.
    PruneByClass,
    /// Flagged by both `PruneByNoiseRate` and `PruneByClass`.
    Both,
    /// The samples counted in the off-diagonals of the confident joint.
    ConfidentLearning,
    /// The samples whose arg-max prediction is not their label.
    PredictedNeqGiven,
}

impl FilterBy {
    /// cleanlab's name (also the command-line name).
    pub fn name(self) -> &'static str {
        match self {
            FilterBy::PruneByNoiseRate => "prune_by_noise_rate",
            FilterBy::PruneByClass => "prune_by_class",
            FilterBy::Both => "both",
            FilterBy::ConfidentLearning => "confident_learning",
            FilterBy::PredictedNeqGiven => "predicted_neq_given",
        }
    }
}

impl fmt::Display for FilterBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Index of the first maximum (`np.argmax`).
fn argmax<T: Prob>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] {
            best = j;
        }
    }
    best
}

/// Every label must be a class index below `classes`.
fn check_labels(labels: &[u32], classes: usize) -> Result<(), ConfidentError> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(index) => Err(ConfidentError::LabelOutOfRange {
            index,
            label: labels[index],
            classes,
        }),
        None => Ok(()),
    }
}

/// Validated input: `n` rows of `classes` probabilities and their labels.
struct Input<'a, T> {
    probs: &'a [T],
    labels: &'a [u32],
    n: usize,
    classes: usize,
}

impl<'a, T: Prob> Input<'a, T> {
    /// The checks of cleanlab's `assert_valid_inputs`, plus non-finite values (which cleanlab
    /// lets through).
    fn new(probs: &'a [T], labels: &'a [u32], classes: usize) -> Result<Self, ConfidentError> {
        let n = labels.len();
        if n == 0 {
            return Err(ConfidentError::Empty);
        }
        if classes == 0 {
            return Err(ConfidentError::NoClasses);
        }
        if n.checked_mul(classes) != Some(probs.len()) {
            return Err(ConfidentError::Shape {
                len: probs.len(),
                n,
                classes,
            });
        }
        check_labels(labels, classes)?;
        let low = T::from_f64(-FLOATING_POINT_COMPARISON);
        let high = T::from_f64(1.0 + FLOATING_POINT_COMPARISON);
        for (at, &p) in probs.iter().enumerate() {
            let (index, class, value) = (at / classes, at % classes, p.to_f64());
            if !value.is_finite() {
                return Err(ConfidentError::NotFinite {
                    index,
                    class,
                    value,
                });
            }
            if p < low || p > high {
                return Err(ConfidentError::NotProbability {
                    index,
                    class,
                    value,
                });
            }
        }
        let first = labels[0];
        if first != 0 && labels.iter().all(|&l| l == first) {
            return Err(ConfidentError::OneClass(first));
        }
        Ok(Self {
            probs,
            labels,
            n,
            classes,
        })
    }

    fn row(&self, i: usize) -> &'a [T] {
        &self.probs[i * self.classes..(i + 1) * self.classes]
    }

    fn at(&self, i: usize, class: usize) -> T {
        self.probs[i * self.classes + class]
    }

    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    /// The samples of every given label, in index order.
    fn members(&self) -> Vec<Vec<usize>> {
        let mut members = vec![Vec::new(); self.classes];
        for i in 0..self.n {
            members[self.label(i)].push(i);
        }
        members
    }
}

/// Per-class thresholds in the dtype numpy ends up with: `T` when every class has a sample,
/// `f64` when one is missing (its threshold is the Python int 2, which widens the array).
enum Thresholds<T> {
    Native(Vec<T>),
    Wide(Vec<f64>),
}

impl<T: Prob> Thresholds<T> {
    /// cleanlab's `get_confident_thresholds`.
    fn new(x: &Input<T>) -> Self {
        let members = x.members();
        let means: Vec<Option<T>> = members
            .iter()
            .enumerate()
            .map(|(k, idx)| {
                if idx.is_empty() {
                    return None;
                }
                let column: Vec<T> = idx.iter().map(|&i| x.at(i, k)).collect();
                Some(mean(&column))
            })
            .collect();
        if means.iter().all(Option::is_some) {
            let floor = T::from_f64(CONFIDENT_THRESHOLDS_LOWER_BOUND);
            Thresholds::Native(
                means
                    .into_iter()
                    .flatten()
                    .map(|m| if m < floor { floor } else { m })
                    .collect(),
            )
        } else {
            Thresholds::Wide(
                means
                    .into_iter()
                    .map(|m| {
                        m.map_or(BIG_VALUE, T::to_f64)
                            .max(CONFIDENT_THRESHOLDS_LOWER_BOUND)
                    })
                    .collect(),
            )
        }
    }

    fn to_f64(&self) -> Vec<f64> {
        match self {
            Thresholds::Native(t) => t.iter().map(|&v| v.to_f64()).collect(),
            Thresholds::Wide(t) => t.clone(),
        }
    }

    /// Whether `p` reaches class `k`'s threshold, `p >= threshold - 1e-6` evaluated in the
    /// thresholds' dtype.
    fn reaches(&self, k: usize, p: T) -> bool {
        match self {
            Thresholds::Native(t) => p >= t[k] - T::from_f64(FLOATING_POINT_COMPARISON),
            Thresholds::Wide(t) => p.to_f64() >= t[k] - FLOATING_POINT_COMPARISON,
        }
    }
}

/// The per-class thresholds of confident learning: the mean self-confidence (probability of the
/// given label) of the samples with each label, floored at 2e-6; 2 for a class no sample has
/// (cleanlab's `count.get_confident_thresholds`).
pub fn confident_thresholds<T: Prob>(
    pred_probs: &[T],
    labels: &[u32],
    classes: usize,
) -> Result<Vec<f64>, ConfidentError> {
    let x = Input::new(pred_probs, labels, classes)?;
    Ok(Thresholds::new(&x).to_f64())
}

/// The confident joint of cleanlab's `count.compute_confident_joint`; matrices are
/// `[given label][true label]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfidentJoint {
    /// Confident counts, diagonal raised to at least 1, before calibration.
    pub counts: Vec<Vec<i64>>,
    /// `counts` calibrated to the label counts (as [`calibrate_confident_joint`], summing in
    /// the column-major order numpy uses on cleanlab's transposed confusion matrix).
    pub calibrated: Vec<Vec<i64>>,
    /// Samples counted off the diagonal (their confident class is not their label), ascending.
    pub off_diagonal: Vec<usize>,
}

fn confident_joint<T: Prob>(x: &Input<T>) -> ConfidentJoint {
    let thresholds = Thresholds::new(x);
    let mut counts = vec![vec![0i64; x.classes]; x.classes];
    let mut off_diagonal = Vec::new();
    for i in 0..x.n {
        let row = x.row(i);
        let mut bins = 0usize;
        let mut first = 0usize;
        for (k, &p) in row.iter().enumerate() {
            if thresholds.reaches(k, p) {
                if bins == 0 {
                    first = k;
                }
                bins += 1;
            }
        }
        if bins == 0 {
            continue;
        }
        let guess = if bins > 1 { argmax(row) } else { first };
        counts[x.label(i)][guess] += 1;
        if guess != x.label(i) {
            off_diagonal.push(i);
        }
    }
    for (k, row) in counts.iter_mut().enumerate() {
        row[k] = row[k].max(1);
    }
    let calibrated = calibrate(&counts, &label_counts(x.labels, x.classes), true);
    ConfidentJoint {
        counts,
        calibrated,
        off_diagonal,
    }
}

/// cleanlab's `count.compute_confident_joint(labels, pred_probs, calibrate=True,
/// return_indices_of_off_diagonals=True)`.
pub fn compute_confident_joint<T: Prob>(
    pred_probs: &[T],
    labels: &[u32],
    classes: usize,
) -> Result<ConfidentJoint, ConfidentError> {
    let x = Input::new(pred_probs, labels, classes)?;
    Ok(confident_joint(&x))
}

fn label_counts(labels: &[u32], classes: usize) -> Vec<i64> {
    let mut counts = vec![0i64; classes];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts
}

/// cleanlab's `count.calibrate_confident_joint`: scales every row of `joint`
/// (`[given][true]`, square) to its label count, then the whole matrix to the number of
/// labels, and rounds preserving row totals. Bit-exact for a row-major (C-ordered) numpy
/// array; [`compute_confident_joint`] calibrates its own, column-major, joint.
pub fn calibrate_confident_joint(
    joint: &[Vec<i64>],
    labels: &[u32],
) -> Result<Vec<Vec<i64>>, ConfidentError> {
    let classes = joint.len();
    check_labels(labels, classes)?;
    if let Some((row, r)) = joint.iter().enumerate().find(|(_, r)| r.len() != classes) {
        return Err(ConfidentError::JointNotSquare {
            row,
            len: r.len(),
            classes,
        });
    }
    Ok(calibrate(joint, &label_counts(labels, classes), false))
}

/// The calibration; `column_major` sums the matrix in column-major order, as numpy does for
/// the Fortran-ordered joint inside `compute_confident_joint`.
fn calibrate(joint: &[Vec<i64>], label_counts: &[i64], column_major: bool) -> Vec<Vec<i64>> {
    let classes = joint.len();
    let mut flat = Vec::with_capacity(classes * classes);
    for (row, &count) in joint.iter().zip(label_counts) {
        let total = (row.iter().sum::<i64>() as f64).max(TINY_VALUE);
        flat.extend(row.iter().map(|&c| c as f64 / total * count as f64));
    }
    // np.sum adds in memory order: the joint of `compute_confident_joint` is a transposed
    // (column-major) confusion matrix, and that order changes the last bits of the total.
    let total = if column_major {
        let columns: Vec<f64> = (0..classes * classes)
            .map(|i| flat[(i % classes) * classes + i / classes])
            .collect();
        pairwise_sum(&columns)
    } else {
        pairwise_sum(&flat)
    }
    .max(TINY_VALUE);
    let labels = label_counts.iter().sum::<i64>() as f64;
    for v in &mut flat {
        *v = *v / total * labels;
    }
    flat.chunks(classes.max(1))
        .map(round_preserving_sum)
        .collect()
}

/// cleanlab's `internal.util.round_preserving_sum`: rounds half-to-even, then moves the entries
/// with the largest rounding residue up (or the smallest down) until the integers add up to
/// the rounded sum of `values`.
pub fn round_preserving_sum(values: &[f64]) -> Vec<i64> {
    let mut ints: Vec<f64> = values.iter().map(|v| v.round_ties_even()).collect();
    let target = pairwise_sum(values).round_ties_even();
    // One pass always suffices for finite input; the bound only guards against a hang.
    for _ in 0..=values.len() {
        let sum = pairwise_sum(&ints).round_ties_even();
        if (sum - target).abs() <= FLOATING_POINT_COMPARISON {
            break;
        }
        let diff = (target - sum).round_ties_even();
        let step = if diff < 0.0 { -1.0 } else { 1.0 };
        let changes = (diff.abs() as usize).min(values.len());
        let residues: Vec<f64> = values.iter().zip(&ints).map(|(v, i)| v - i).collect();
        let mut order = numpy_argsort(&residues);
        if step > 0.0 {
            // numpy reverses the ascending order: largest residue first, ties by last index.
            order.reverse();
        }
        for &i in order.iter().take(changes) {
            ints[i] += step;
        }
    }
    ints.iter().map(|&v| v as i64).collect()
}

/// cleanlab's `filter._keep_at_least_n_per_class` (with `frac_noise=1`): the prune-count
/// matrix `[true][given]` from a calibrated joint `[given][true]`, with every diagonal raised to
/// at least `n`, the increase taken evenly from the column's non-zero noise counts (truncated to
/// integers, as numpy's `astype(int)`).
pub fn prune_count_matrix(joint: &[Vec<i64>], n: usize) -> Vec<Vec<i64>> {
    let classes = joint.len();
    // prune[true][given] = joint[given][true]
    let prune: Vec<Vec<i64>> = (0..classes)
        .map(|t| (0..classes).map(|g| joint[g][t]).collect())
        .collect();
    let n = n as i64;
    let diagonal: Vec<i64> = (0..classes).map(|k| prune[k][k].max(n)).collect();
    let shift: Vec<f64> = (0..classes)
        .map(|col| {
            let nonzero = (0..classes).filter(|&r| prune[r][col] != 0).count() as f64;
            (diagonal[col] - prune[col][col]) as f64 / (nonzero - 1.0).max(1.0)
        })
        .collect();
    (0..classes)
        .map(|r| {
            (0..classes)
                .map(|c| {
                    if r == c {
                        diagonal[c]
                    } else {
                        (prune[r][c] as f64 - shift[c]).max(0.0).trunc() as i64
                    }
                })
                .collect()
        })
        .collect()
}

/// Samples labelled k with the largest margin p_j − p_k, `prune[j][k]` of them for every j ≠ k
/// (cleanlab's `_prune_by_count`).
fn prune_by_noise_rate<T: Prob>(
    x: &Input<T>,
    members: &[Vec<usize>],
    prune: &[Vec<i64>],
) -> Vec<bool> {
    let mut mask = vec![false; x.n];
    for (k, idx) in members.iter().enumerate() {
        if idx.len() <= MIN_EXAMPLES_PER_CLASS {
            continue;
        }
        for (j, row) in prune.iter().enumerate() {
            let count = usize::try_from(row[k]).unwrap_or(0);
            if j == k || count == 0 {
                continue;
            }
            let neg_margins: Vec<T> = idx.iter().map(|&i| -(x.at(i, j) - x.at(i, k))).collect();
            // np.argsort(-margin): largest margin first.
            for &o in numpy_argsort(&neg_margins).iter().take(count) {
                mask[idx[o]] = true;
            }
        }
    }
    mask
}

/// Samples labelled k with the smallest p_k, `n_k − prune[k][k]` of them (cleanlab's
/// `_prune_by_class`).
fn prune_by_class<T: Prob>(x: &Input<T>, members: &[Vec<usize>], prune: &[Vec<i64>]) -> Vec<bool> {
    let mut mask = vec![false; x.n];
    for (k, idx) in members.iter().enumerate() {
        if idx.len() <= MIN_EXAMPLES_PER_CLASS {
            continue;
        }
        let count = usize::try_from(idx.len() as i64 - prune[k][k]).unwrap_or(0);
        let probs: Vec<T> = idx.iter().map(|&i| x.at(i, k)).collect();
        for &o in numpy_argsort(&probs).iter().take(count) {
            mask[idx[o]] = true;
        }
    }
    mask
}

/// cleanlab's `filter.find_label_issues(labels, pred_probs, filter_by=filter_by)`: a mask,
/// `true` for the samples whose label is likely wrong. `pred_probs` is row-major
/// `[labels.len(), classes]`, ideally out-of-sample probabilities (e.g. from K-fold
/// cross-validation).
pub fn find_label_issues<T: Prob>(
    pred_probs: &[T],
    labels: &[u32],
    classes: usize,
    filter_by: FilterBy,
) -> Result<Vec<bool>, ConfidentError> {
    let x = Input::new(pred_probs, labels, classes)?;
    let mut mask = match filter_by {
        FilterBy::ConfidentLearning => {
            let mut mask = vec![false; x.n];
            for i in confident_joint(&x).off_diagonal {
                mask[i] = true;
            }
            mask
        }
        FilterBy::PredictedNeqGiven => (0..x.n).map(|i| argmax(x.row(i)) != x.label(i)).collect(),
        FilterBy::PruneByNoiseRate | FilterBy::PruneByClass | FilterBy::Both => {
            let joint = confident_joint(&x);
            let prune = prune_count_matrix(&joint.calibrated, MIN_EXAMPLES_PER_CLASS);
            let members = x.members();
            match filter_by {
                FilterBy::PruneByNoiseRate => prune_by_noise_rate(&x, &members, &prune),
                FilterBy::PruneByClass => prune_by_class(&x, &members, &prune),
                _ => {
                    let by_class = prune_by_class(&x, &members, &prune);
                    let by_noise = prune_by_noise_rate(&x, &members, &prune);
                    by_class
                        .iter()
                        .zip(&by_noise)
                        .map(|(a, b)| *a && *b)
                        .collect()
                }
            }
        }
    };
    // cleanlab's `_reduce_issues`: never flag a sample whose label is the arg-max once its
    // probability is raised by 1e-6.
    let bump = T::from_f64(FLOATING_POINT_COMPARISON);
    for (i, flagged) in mask.iter_mut().enumerate() {
        if *flagged {
            let mut row = x.row(i).to_vec();
            let label = x.label(i);
            row[label] = row[label] + bump;
            if argmax(&row) == label {
                *flagged = false;
            }
        }
    }
    Ok(mask)
}

/// Self-confidence of every sample: the predicted probability of its given label.
pub fn self_confidence<T: Prob>(
    pred_probs: &[T],
    labels: &[u32],
    classes: usize,
) -> Result<Vec<f64>, ConfidentError> {
    let x = Input::new(pred_probs, labels, classes)?;
    Ok((0..x.n).map(|i| x.at(i, x.label(i)).to_f64()).collect())
}

/// The suggested label of every sample: the arg-max class (the first one on ties).
pub fn suggested_labels<T: Prob>(
    pred_probs: &[T],
    labels: &[u32],
    classes: usize,
) -> Result<Vec<u32>, ConfidentError> {
    let x = Input::new(pred_probs, labels, classes)?;
    Ok((0..x.n).map(|i| argmax(x.row(i)) as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 samples, 3 classes (hand-checked below).
    #[rustfmt::skip]
    const PROBS: [f64; 24] = [
        0.90, 0.05, 0.05, // 0: label 0
        0.80, 0.10, 0.10, // 1: label 0
        0.20, 0.70, 0.10, // 2: label 0, looks like 1
        0.10, 0.80, 0.10, // 3: label 1
        0.05, 0.90, 0.05, // 4: label 1
        0.60, 0.30, 0.10, // 5: label 1, looks like 0
        0.10, 0.10, 0.80, // 6: label 2
        0.20, 0.20, 0.60, // 7: label 2
    ];
    const LABELS: [u32; 8] = [0, 0, 0, 1, 1, 1, 2, 2];

    #[test]
    fn hand_checked_thresholds_joint_and_masks() {
        // Thresholds: class 0 (0.9 + 0.8 + 0.2) / 3 = 0.6333..., class 1 (0.8 + 0.9 + 0.3) / 3
        // = 0.6666..., class 2 (0.8 + 0.6) / 2 = 0.7.
        let t = confident_thresholds(&PROBS, &LABELS, 3).unwrap();
        let expect = [1.9 / 3.0, 2.0 / 3.0, 0.7];
        for (a, b) in t.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{t:?}");
        }
        // Confident classes (p >= t - 1e-6): 0 → {0}, 1 → {0}, 2 → {1}, 3 → {1}, 4 → {1},
        // 5 → none (0.6 < 0.633), 6 → {2}, 7 → none (0.6 < 0.7).
        // counts[given][true] = [[2, 1, 0], [0, 2, 0], [0, 0, 1]]; sample 2 is off-diagonal.
        let cj = compute_confident_joint(&PROBS, &LABELS, 3).unwrap();
        assert_eq!(cj.counts, vec![vec![2, 1, 0], vec![0, 2, 0], vec![0, 0, 1]]);
        assert_eq!(cj.off_diagonal, vec![2]);
        // Calibration: rows scaled to the label counts 3, 3, 2 → [[2, 1, 0], [0, 3, 0],
        // [0, 0, 2]], already summing to 8.
        assert_eq!(
            cj.calibrated,
            vec![vec![2, 1, 0], vec![0, 3, 0], vec![0, 0, 2]]
        );
        // Prune counts [true][given]: one sample labelled 0 is truly 1.
        let prune = prune_count_matrix(&cj.calibrated, 1);
        assert_eq!(prune, vec![vec![2, 0, 0], vec![1, 3, 0], vec![0, 0, 2]]);
        // prune_by_noise_rate: among label 0, largest p1 - p0 is sample 2 (0.5).
        let noise = find_label_issues(&PROBS, &LABELS, 3, FilterBy::PruneByNoiseRate).unwrap();
        assert_eq!(
            noise,
            [false, false, true, false, false, false, false, false]
        );
        // prune_by_class: class 0 drops 3 - 2 = 1 lowest p0 (sample 2); class 1 drops
        // 3 - 3 = 0; class 2 drops 2 - 2 = 0.
        let class = find_label_issues(&PROBS, &LABELS, 3, FilterBy::PruneByClass).unwrap();
        assert_eq!(class, noise);
        let both = find_label_issues(&PROBS, &LABELS, 3, FilterBy::Both).unwrap();
        assert_eq!(both, noise);
        let cl = find_label_issues(&PROBS, &LABELS, 3, FilterBy::ConfidentLearning).unwrap();
        assert_eq!(cl, noise);
        // predicted ≠ given: samples 2 and 5.
        let neq = find_label_issues(&PROBS, &LABELS, 3, FilterBy::PredictedNeqGiven).unwrap();
        assert_eq!(neq, [false, false, true, false, false, true, false, false]);
        assert_eq!(
            self_confidence(&PROBS, &LABELS, 3).unwrap(),
            [0.9, 0.8, 0.2, 0.8, 0.9, 0.3, 0.8, 0.6]
        );
        assert_eq!(
            suggested_labels(&PROBS, &LABELS, 3).unwrap(),
            [0, 0, 1, 1, 1, 0, 2, 2]
        );
        // The same values as f32 give the same masks here.
        let p32: Vec<f32> = PROBS.iter().map(|&v| v as f32).collect();
        for &f in FilterBy::value_variants() {
            assert_eq!(
                find_label_issues(&p32, &LABELS, 3, f).unwrap(),
                find_label_issues(&PROBS, &LABELS, 3, f).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn missing_class_gets_threshold_two() {
        // Class 2 has no sample: its threshold is 2 and nothing is counted as class 2.
        let probs = [
            0.7f32, 0.2, 0.1, 0.6, 0.3, 0.1, 0.2, 0.7, 0.1, 0.1, 0.1, 0.8,
        ];
        let labels = [0, 0, 1, 1];
        let t = confident_thresholds(&probs, &labels, 3).unwrap();
        assert_eq!(t[2], 2.0);
        assert_eq!(t[0], f64::from((0.7f32 + 0.6f32) / 2.0));
        let cj = compute_confident_joint(&probs, &labels, 3).unwrap();
        // Sample 3 (label 1, p1 = 0.1) is confident of nothing; row 2 has no label.
        assert_eq!(cj.counts, vec![vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 1]]);
        assert_eq!(
            cj.calibrated,
            vec![vec![2, 0, 0], vec![0, 2, 0], vec![0, 0, 0]]
        );
        assert_eq!(
            find_label_issues(&probs, &labels, 3, FilterBy::PredictedNeqGiven).unwrap(),
            [false, false, false, true]
        );
    }

    #[test]
    fn rounding_preserves_totals_like_numpy() {
        // Expected values from cleanlab's `round_preserving_sum` (numpy 2.4, AVX-512).
        // round(2.5) = 2 (half to even); the lost unit goes to the largest residue.
        assert_eq!(round_preserving_sum(&[2.5, 1.4, 1.1]), vec![3, 1, 1]);
        assert_eq!(round_preserving_sum(&[0.6, 0.6, 0.8]), vec![0, 1, 1]);
        assert_eq!(round_preserving_sum(&[3.0, 0.0]), vec![3, 0]);
        // Tied residues: numpy's sorting network decides, not the index order.
        assert_eq!(round_preserving_sum(&[0.4, 0.4, 0.2]), vec![0, 1, 0]);
        assert_eq!(
            round_preserving_sum(&[0.4, 0.4, 0.2, 0.0]),
            vec![1, 0, 0, 0]
        );
        let row = [30.0, 0.0, 0.0, 2.25, 0.0, 1.375, 2.25, 1.375, 0.0, 0.0];
        // A stable sort would raise index 7; numpy raises index 5.
        assert_eq!(
            round_preserving_sum(&row),
            vec![30, 0, 0, 2, 0, 2, 2, 1, 0, 0]
        );
    }

    #[test]
    fn argsort_follows_numpy_on_ties() {
        // `np.argsort` results (numpy 2.4, AVX-512).
        assert_eq!(numpy_argsort(&[0.4, 0.4, 0.2, 0.0]), [3, 2, 1, 0]);
        let residues = [0.0, 0.0, 0.0, 0.25, 0.0, 0.375, 0.25, 0.375, -0.125, -0.125];
        let expected = [9, 8, 0, 1, 2, 4, 3, 6, 7, 5];
        assert_eq!(numpy_argsort(&residues), expected);
        let r32: Vec<f32> = residues.iter().map(|&v| v as f32).collect();
        assert_eq!(numpy_argsort(&r32), expected);
        // Already sorted: untouched.
        assert_eq!(numpy_argsort(&[1.0, 1.0, 2.0, 2.0]), [0, 1, 2, 3]);
        // Long arrays (partitioning, std::sort fallback) are a permutation in sorted order.
        for n in [257, 1000, 3000] {
            let mut rng = crate::rng::Rng::new(n as u64);
            let v: Vec<f64> = (0..n).map(|_| rng.below(7) as f64).collect();
            let order = numpy_argsort(&v);
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            assert!(order.windows(2).all(|w| v[w[0]] <= v[w[1]]));
            let mut ones = vec![0.0; n];
            ones[0] = 1.0;
            let order = numpy_argsort(&ones);
            assert_eq!(order[n - 1], 0, "the one value sorts last");
        }
    }

    #[test]
    fn pairwise_sum_matches_numpy_grouping() {
        // f32 addition is not associative: numpy's 8 accumulators give a fixed answer.
        let v: Vec<f32> = (0..200)
            .map(|i| if i % 9 == 0 { 1e7 } else { 0.7 })
            .collect();
        // `np.sum(np.array(v, np.float32))`
        assert_eq!(pairwise_sum(&v), 230000144.0);
        let sequential: f32 = v.iter().sum();
        assert_ne!(sequential, 230000144.0);
    }

    #[test]
    fn calibration_sums_in_numpy_memory_order() {
        // From a 150 x 6 case: the four equal counts of row 0 round differently depending on
        // the order of the total. Expected rows from cleanlab's `calibrate_confident_joint` on
        // a C-ordered and on a Fortran-ordered copy of this joint (numpy 2.4).
        let joint = vec![
            vec![12, 0, 1, 1, 1, 1],
            vec![4, 14, 2, 3, 1, 2],
            vec![2, 1, 10, 1, 3, 2],
            vec![1, 4, 1, 14, 0, 1],
            vec![0, 4, 4, 1, 14, 1],
            vec![2, 1, 1, 1, 2, 14],
        ];
        let counts = [26, 27, 21, 26, 26, 24];
        let labels: Vec<u32> = (0..6u32)
            .flat_map(|c| std::iter::repeat_n(c, counts[c as usize]))
            .collect();
        let c_order = calibrate_confident_joint(&joint, &labels).unwrap();
        assert_eq!(c_order[0], [19, 0, 1, 2, 2, 2]);
        let f_order = calibrate(&joint, &label_counts(&labels, 6), true);
        assert_eq!(f_order[0], [19, 0, 2, 1, 2, 2]);
    }

    #[test]
    fn keeps_at_least_one_per_class() {
        // Calibrated diagonal 0 for class 1: raised to 1, taking 1 / 1 from its noise count
        // (cleanlab's `_keep_at_least_n_per_class(joint.T, 1)`).
        let joint = vec![vec![5, 0], vec![3, 0]];
        assert_eq!(prune_count_matrix(&joint, 1), vec![vec![5, 2], vec![0, 1]]);
    }

    #[test]
    fn bad_input_errors() {
        let p = [0.5f32, 0.5, 0.2, 0.8];
        let e = |r: Result<Vec<bool>, ConfidentError>| r.unwrap_err().to_string();
        let f = FilterBy::default();
        assert!(e(find_label_issues::<f32>(&[], &[], 2, f)).contains("no samples"));
        assert!(e(find_label_issues(&p, &[0, 1], 0, f)).contains("classes must be positive"));
        assert!(e(find_label_issues(&p[..3], &[0, 1], 2, f)).contains("3 values, not 2 samples"));
        assert!(e(find_label_issues(&p, &[0, 2], 2, f)).contains("label 2 of sample 1"));
        let nan = [0.5f32, f32::NAN, 0.2, 0.8];
        assert!(
            e(find_label_issues(&nan, &[0, 1], 2, f)).contains("pred_probs[0][1] is not finite")
        );
        let big = [0.5f32, 0.5, 1.1, 0.8];
        assert!(e(find_label_issues(&big, &[0, 1], 2, f)).contains("not a probability"));
        assert!(e(find_label_issues(&p, &[1, 1], 2, f)).contains("at least 2 classes"));
        // All-zero labels are allowed, as in cleanlab.
        assert!(find_label_issues(&p, &[0, 0], 2, f).is_ok());
        let err = crate::config::choice::parse::<FilterBy>("filter_by", "prune").unwrap_err();
        assert!(
            err.contains("prune_by_noise_rate, prune_by_class, both"),
            "{err}"
        );
        crate::config::choice::assert_names_agree(|f: &FilterBy| f.name());
        assert!(calibrate_confident_joint(&[vec![1, 0], vec![0, 1]], &[0, 3]).is_err());
        assert!(self_confidence(&p, &[0], 2).is_err());
    }
}
