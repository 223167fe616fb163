//! The Bayesian cut-off: an MC-dropout classifier (dropout p = 0.5 before a linear head) scores
//! every training sample; the highest-scoring share is dropped or relabelled.
//!
//! The T stochastic passes run fused: masks [T, n, F] × features → logits [T, n, C] in one
//! batched product per chunk of samples, then per-sample reductions — no per-pass loop, no host
//! round trip per pass.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor, D};
use clap::ValueEnum;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::distance::{search, DistanceError, Metric, Precision, Search};
use crate::rng::Rng;
use crate::train::Head;

mod mixture;
pub use mixture::{mixture_noise_counts, TwoGaussians};

/// How uncertain / suspicious a training sample is (higher = more likely noisy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// The reference's: variance over passes of the sum of logits.
    LogitSumVar,
    /// Variance over passes of the given label's probability.
    LabelProbVar,
    /// Entropy of the MC-mean prediction.
    Entropy,
    /// Mutual information between prediction and weights (BALD).
    Bald,
    /// 1 − MC-mean probability of the given label (the default).
    #[default]
    LabelProbMean,
    /// Top MC-mean probability minus the given label's.
    Margin,
    /// Share of the k nearest neighbours (embedding space) whose label differs.
    KnnDisagreement,
    /// Rank average of `label_prob_mean` and `knn_disagreement`: each score is replaced by its
    /// rank among the candidates (ties averaged, scaled to (0, 1]) and the two are averaged.
    Combined,
}

impl Score {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Score::LogitSumVar => "logit_sum_var",
            Score::LabelProbVar => "label_prob_var",
            Score::Entropy => "entropy",
            Score::Bald => "bald",
            Score::LabelProbMean => "label_prob_mean",
            Score::Margin => "margin",
            Score::KnnDisagreement => "knn_disagreement",
            Score::Combined => "combined",
        }
    }
}

/// Per-sample statistics of the T stochastic passes.
#[derive(Debug, Clone)]
pub struct McStats {
    /// MC-mean class probabilities [n, C].
    pub mean_probs: Tensor,
    /// Variance over passes of Σ logits [n].
    pub logit_sum_var: Tensor,
    /// Variance over passes of the given label's probability [n].
    pub label_prob_var: Tensor,
    /// Mean over passes of each pass's entropy [n].
    pub mean_entropy: Tensor,
}

/// Samples per fused chunk (T × chunk × F floats of masked features).
const CHUNK: usize = 1024;

/// Draws the dropout masks of all passes for samples `[start, start + n)`: [T, n, F], keep
/// probability 1 − p, scaled by 1 / (1 − p). Each sample's masks come from its own stream, so
/// chunking does not change them.
pub fn mc_masks(
    seed: u64,
    passes: usize,
    start: usize,
    n: usize,
    features: usize,
    p: f32,
    device: &Device,
) -> Result<Tensor> {
    let mut values = vec![0f32; passes * n * features];
    values
        .par_chunks_mut(features)
        .enumerate()
        .for_each(|(row, out)| {
            let (t, i) = (row / n, start + row % n);
            fill_mask_row(seed, t, i, p, out, None);
        });
    Tensor::from_vec(values, (passes, n, features), device)
}

/// Writes the dropout mask of pass `t` for sample `i` into `out` — or, given the sample's
/// features, the masked features directly (one pass over memory instead of three).
fn fill_mask_row(seed: u64, t: usize, i: usize, p: f32, out: &mut [f32], features: Option<&[f32]>) {
    let mut rng = Rng::derive(seed, ((t as u64) << 40) | i as u64);
    crate::train::fill_dropout(&mut rng, p, out);
    if let Some(x) = features {
        out.iter_mut().zip(x).for_each(|(v, &xv)| *v *= xv);
    }
}

/// The masked features [T, n, F] of samples `[start, start + n)` (host rows `x`), with the
/// masks of [`mc_masks`].
pub fn mc_masked(
    seed: u64,
    passes: usize,
    start: usize,
    x: &[f32],
    features: usize,
    p: f32,
    device: &Device,
) -> Result<Tensor> {
    let n = x.len() / features;
    let mut values = vec![0f32; passes * x.len()];
    values
        .par_chunks_mut(features)
        .enumerate()
        .for_each(|(row, out)| {
            let (t, r) = (row / n, row % n);
            fill_mask_row(
                seed,
                t,
                start + r,
                p,
                out,
                Some(&x[r * features..(r + 1) * features]),
            );
        });
    Tensor::from_vec(values, (passes, n, features), device)
}

/// The fused passes on the CPU without materialising the masked features: per sample (in
/// parallel) and pass, the masked row is built in a small buffer (the same masks as
/// [`mc_masks`]) and dotted with every class's weights. Returns logits [T, n, C].
pub fn mc_logits_cpu(
    head: &Head,
    seed: u64,
    passes: usize,
    start: usize,
    x: &[f32],
    features: usize,
    p: f32,
) -> Result<Tensor> {
    let n = x.len() / features;
    let c = head.classes;
    let w = head
        .linear
        .weight()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = match head.linear.bias() {
        Some(b) => b
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?,
        None => vec![0f32; c],
    };
    // Sample-major [n, T, C], reordered to [T, n, C] at the end.
    let mut per_sample = vec![0f32; n * passes * c];
    per_sample
        .par_chunks_mut(passes * c)
        .enumerate()
        .for_each(|(r, out)| {
            let row = &x[r * features..(r + 1) * features];
            let mut masked = vec![0f32; features];
            for t in 0..passes {
                fill_mask_row(seed, t, start + r, p, &mut masked, Some(row));
                for k in 0..c {
                    let wk = &w[k * features..(k + 1) * features];
                    let dot = dot16(&masked, wk);
                    out[t * c + k] = dot + b[k];
                }
            }
        });
    let mut logits = vec![0f32; n * passes * c];
    for r in 0..n {
        for t in 0..passes {
            logits[(t * n + r) * c..(t * n + r + 1) * c]
                .copy_from_slice(&per_sample[(r * passes + t) * c..(r * passes + t + 1) * c]);
        }
    }
    Tensor::from_vec(logits, (passes, n, c), &Device::Cpu)
}

/// Dot product with sixteen independent partial sums (vectorises; a plain `sum()` does not).
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let whole = a.len() / 16 * 16;
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The fused MC passes over one chunk: masks [T, n, F] ⊙ x [n, F] → logits [T, n, C].
pub fn mc_logits(head: &Head, x: &Tensor, masks: &Tensor) -> Result<Tensor> {
    let (t, n, f) = masks.dims3()?;
    let masked = masks.broadcast_mul(&x.unsqueeze(0)?)?;
    head.logits(&masked.reshape((t * n, f))?)?
        .reshape((t, n, head.classes))
}

fn stats_of(logits: &Tensor, labels: &Tensor) -> Result<McStats> {
    let probs = candle_nn::ops::softmax_last_dim(logits)?; // [T, n, C]
    let t = logits.dim(0)?;
    let label_idx = labels
        .to_dtype(DType::U32)?
        .reshape((1, (), 1))?
        .repeat((t, 1, 1))?;
    let label_p = probs.gather(&label_idx, 2)?.squeeze(2)?; // [T, n]
    let sums = logits.sum(D::Minus1)?; // [T, n]
    let var = |v: &Tensor| -> Result<Tensor> {
        let mean = v.mean_keepdim(0)?;
        v.broadcast_sub(&mean)?.sqr()?.mean(0)
    };
    let entropy =
        |p: &Tensor| -> Result<Tensor> { (p.clamp(1e-12, 1.0)?.log()? * p)?.sum(D::Minus1)?.neg() };
    Ok(McStats {
        mean_probs: probs.mean(0)?,
        logit_sum_var: var(&sums)?,
        label_prob_var: var(&label_p)?,
        mean_entropy: entropy(&probs)?.mean(0)?,
    })
}

/// Runs T fused MC-dropout passes of `head` over `features` [N, F] with given `labels`.
pub fn mc_stats(
    head: &Head,
    features: &Tensor,
    labels: &[u32],
    passes: usize,
    p: f32,
    seed: u64,
) -> Result<McStats> {
    let (n, f) = features.dims2()?;
    let device = features.device();
    let labels = Tensor::new(labels, device)?;
    let host = features
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let chunk = &host[start * f..(start + len) * f];
        let logits = if device.is_cpu() {
            mc_logits_cpu(head, seed, passes, start, chunk, f, p)?
        } else {
            let masked = mc_masked(seed, passes, start, chunk, f, p, device)?;
            head.logits(&masked.reshape((passes * len, f))?)?.reshape((
                passes,
                len,
                head.classes,
            ))?
        };
        parts.push(stats_of(&logits, &labels.narrow(0, start, len)?)?);
    }
    let cat =
        |get: fn(&McStats) -> &Tensor| Tensor::cat(&parts.iter().map(get).collect::<Vec<_>>(), 0);
    Ok(McStats {
        mean_probs: cat(|s| &s.mean_probs)?,
        logit_sum_var: cat(|s| &s.logit_sum_var)?,
        label_prob_var: cat(|s| &s.label_prob_var)?,
        mean_entropy: cat(|s| &s.mean_entropy)?,
    })
}

/// Neighbours used by `knn_disagreement`.
pub const KNN: usize = 10;

/// The chosen score of every sample.
pub fn score(
    stats: &McStats,
    which: Score,
    features: &Tensor,
    labels: &[u32],
) -> std::result::Result<Vec<f32>, DistanceError> {
    let labels_t = Tensor::new(labels, stats.mean_probs.device())?;
    let label_mean = stats
        .mean_probs
        .gather(&labels_t.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let entropy_of_mean = (stats.mean_probs.clamp(1e-12, 1.0)?.log()? * &stats.mean_probs)?
        .sum(D::Minus1)?
        .neg()?;
    let t = match which {
        Score::LogitSumVar => stats.logit_sum_var.clone(),
        Score::LabelProbVar => stats.label_prob_var.clone(),
        Score::Entropy => entropy_of_mean,
        Score::Bald => (entropy_of_mean - &stats.mean_entropy)?,
        Score::LabelProbMean => (1.0 - label_mean)?,
        Score::Margin => (stats.mean_probs.max(D::Minus1)? - label_mean)?,
        Score::KnnDisagreement => return knn_disagreement(features, labels),
        Score::Combined => {
            let mc = (1.0 - label_mean)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?;
            let knn = knn_disagreement(features, labels)?;
            return Ok(rank_average(&[&mc, &knn]));
        }
    };
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?)
}

/// Every score replaced by its rank among the samples (1 for the lowest, ties given their
/// average rank) divided by the number of samples, so each lies in (0, 1].
pub fn normalised_ranks(scores: &[f32]) -> Vec<f32> {
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0f32; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // 1-based ranks i + 1 ..= j + 1, averaged.
        let rank = (i + j + 2) as f64 / 2.0 / n as f64;
        for &o in &order[i..=j] {
            ranks[o] = rank as f32;
        }
        i = j + 1;
    }
    ranks
}

/// The mean of the normalised ranks ([`normalised_ranks`]) of several scores of the same
/// samples: scores on different scales count alike.
pub fn rank_average(scores: &[&[f32]]) -> Vec<f32> {
    let n = scores.first().map_or(0, |s| s.len());
    let mut sum = vec![0f64; n];
    for s in scores {
        for (acc, r) in sum.iter_mut().zip(normalised_ranks(s)) {
            *acc += f64::from(r);
        }
    }
    let parts = scores.len().max(1) as f64;
    sum.into_iter().map(|v| (v / parts) as f32).collect()
}

/// Share of each sample's `KNN` nearest neighbours (cosine, itself excluded) whose label
/// differs from its own.
pub fn knn_disagreement(
    features: &Tensor,
    labels: &[u32],
) -> std::result::Result<Vec<f32>, DistanceError> {
    let (n, _) = features.dims2()?;
    let k = KNN.min(n.saturating_sub(1)).max(1);
    let x = features.to_dtype(DType::F32)?;
    // Ask for k + 1 and skip the sample itself; the project's search (CPU kernels, or the
    // CUDA kernels for a CUDA tensor).
    let nn = search(
        &x,
        &x,
        &Search {
            metric: Metric::Cosine,
            k: (k + 1).min(n),
            other_class: None,
            precision: Precision::F32,
        },
    )?;
    let kk = nn.k;
    Ok((0..n)
        .map(|i| {
            let others: Vec<usize> = nn.indices[i * kk..(i + 1) * kk]
                .iter()
                .filter(|&&j| j >= 0 && j as usize != i)
                .take(k)
                .map(|&j| j as usize)
                .collect();
            let differ = others.iter().filter(|&&j| labels[j] != labels[i]).count();
            differ as f32 / others.len().max(1) as f32
        })
        .collect())
}

/// What to do with the samples above the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Leave the sample out of training.
    #[default]
    Drop,
    /// Replace the label by the MC-mean prediction.
    Relabel,
    /// Pseudo-labelling: a head is trained on the kept samples, and a cut sample takes its
    /// prediction (a teacher that never learnt the cut labels) when confident enough.
    PseudoLabel,
}

impl Action {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Relabel => "relabel",
            Action::PseudoLabel => "pseudo_label",
        }
    }
}

/// Where to cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Percentile {
    /// Samples above this percentile (0–100) of the scores are cut.
    Fixed(f64),
    /// Cut the estimated share of noisy labels: the share whose MC-mean prediction differs
    /// from the given label.
    Auto,
    /// Cut the number of noisy labels the confident joint of the MC-mean probabilities
    /// estimates (Northcutt et al.: per-class thresholds at the mean self-confidence, the
    /// joint calibrated to the label counts; its off-diagonal mass is the noise).
    Joint,
    /// Cut the number of noisy labels a two-component mixture of the per-sample loss
    /// `−ln p(given label)` estimates ([`mixture_noise_counts`]).
    Mixture,
}

impl FromStr for Percentile {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => return Ok(Percentile::Auto),
            "joint" => return Ok(Percentile::Joint),
            "mixture" => return Ok(Percentile::Mixture),
            _ => {}
        }
        match s.parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(Percentile::Fixed(p)),
            _ => Err(format!(
                "invalid cut-off percentile {s:?}; expected a number in [0, 100], auto, joint or mixture"
            )),
        }
    }
}

impl Default for Percentile {
    /// The reference's 90th percentile.
    fn default() -> Self {
        Percentile::Fixed(90.0)
    }
}

impl fmt::Display for Percentile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Percentile::Auto => f.write_str("auto"),
            Percentile::Joint => f.write_str("joint"),
            Percentile::Mixture => f.write_str("mixture"),
            Percentile::Fixed(p) => write!(f, "{p}"),
        }
    }
}

/// A number (`90`, `97.5`), `"auto"`, `"joint"` or `"mixture"`, in TOML and JSON alike.
impl Serialize for Percentile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Percentile::Auto => s.serialize_str("auto"),
            Percentile::Joint => s.serialize_str("joint"),
            Percentile::Mixture => s.serialize_str("mixture"),
            Percentile::Fixed(p) => s.serialize_f64(*p),
        }
    }
}

impl<'de> Deserialize<'de> for Percentile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(p) => p.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the cut is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One ranking of all samples: the highest scores are cut, whatever their label.
    #[default]
    Global,
    /// Each given class separately: the percentile (or the estimated noise) of each class is
    /// cut among that class's samples, so an easy class is not cut for a hard one's scores.
    PerClass,
}

impl Scope {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::PerClass => "per_class",
        }
    }
}

/// How many samples a cut removes.
#[derive(Debug, Clone, PartialEq)]
pub enum Amount {
    /// This share of the samples (of each class, per class): ⌊n·share⌉.
    Share(f64),
    /// This many samples of each given class (estimates need not be whole numbers; a global
    /// cut takes ⌊Σ⌉).
    PerClass(Vec<f64>),
}

impl Amount {
    /// The amount a percentile choice asks for: `Fixed(q)` the share 1 − q/100; `auto` the
    /// samples of each class whose MC-mean prediction differs from the label; `joint` and
    /// `mixture` the estimate the caller gives (`estimate`, per class).
    pub fn of(
        percentile: Percentile,
        labels: &[u32],
        predicted: &[u32],
        eligible: &[bool],
        classes: usize,
        estimate: Option<&[f64]>,
    ) -> Amount {
        match percentile {
            Percentile::Fixed(q) => Amount::Share(1.0 - q / 100.0),
            Percentile::Auto => {
                let mut counts = vec![0f64; classes];
                for i in 0..labels.len() {
                    if eligible[i] && predicted[i] != labels[i] {
                        counts[labels[i] as usize] += 1.0;
                    }
                }
                Amount::PerClass(counts)
            }
            Percentile::Joint | Percentile::Mixture => {
                Amount::PerClass(estimate.map_or_else(|| vec![0.0; classes], <[f64]>::to_vec))
            }
        }
    }
}

/// Marks the samples to cut: among the `eligible` ones (the others are trusted: never cut,
/// never counted), the highest `scores` — over all of them (`Global`) or within each given
/// class (`PerClass`) — as many as `amount` says. Ties go to the lower index, so discrete
/// scores (k-NN shares) cut exactly that many too.
pub fn select(
    scores: &[f32],
    labels: &[u32],
    classes: usize,
    eligible: &[bool],
    scope: Scope,
    amount: &Amount,
) -> Vec<bool> {
    let n = scores.len();
    let groups: Vec<Vec<usize>> = match scope {
        Scope::Global => vec![(0..n).filter(|&i| eligible[i]).collect()],
        Scope::PerClass => {
            let mut g = vec![Vec::new(); classes];
            for i in (0..n).filter(|&i| eligible[i]) {
                g[labels[i] as usize].push(i);
            }
            g
        }
    };
    let mut is_cut = vec![false; n];
    for (c, mut members) in groups.into_iter().enumerate() {
        let size = members.len() as f64;
        let want = match (amount, scope) {
            (Amount::Share(share), _) => size * share,
            (Amount::PerClass(counts), Scope::Global) => counts.iter().sum::<f64>(),
            (Amount::PerClass(counts), Scope::PerClass) => counts.get(c).copied().unwrap_or(0.0),
        };
        let n_cut = want.round().clamp(0.0, size) as usize;
        members.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for &i in &members[..n_cut] {
            is_cut[i] = true;
        }
    }
    is_cut
}

/// The outcome of a cut.
#[derive(Debug, Clone, PartialEq)]
pub struct CutResult {
    pub scores: Vec<f32>,
    /// Indices kept with their (possibly new) labels.
    pub kept: Vec<usize>,
    pub dropped: Vec<usize>,
    /// (index, new label) of relabelled samples (also in `kept`).
    pub relabelled: Vec<(usize, u32)>,
    /// Labels after the cut, for every sample (dropped ones keep their old label).
    pub labels: Vec<u32>,
}

/// Applies `action` to the samples `is_cut` marks. `Relabel` and `PseudoLabel` give a cut
/// sample the prediction `predicted` (the MC mean, or the pseudo-labelling teacher's) when that
/// prediction's probability (`confidence`) is at least `relabel_confidence`, and drop it
/// otherwise (0 relabels every cut sample).
pub fn apply(
    scores: Vec<f32>,
    is_cut: &[bool],
    labels: &[u32],
    predicted: &[u32],
    confidence: &[f32],
    action: Action,
    relabel_confidence: f64,
) -> CutResult {
    let mut result = CutResult {
        kept: Vec::new(),
        dropped: Vec::new(),
        relabelled: Vec::new(),
        labels: labels.to_vec(),
        scores: Vec::new(),
    };
    for i in 0..labels.len() {
        if !is_cut[i] {
            result.kept.push(i);
            continue;
        }
        let sure = f64::from(confidence[i]) >= relabel_confidence;
        match action {
            Action::Relabel | Action::PseudoLabel if sure => {
                result.labels[i] = predicted[i];
                result.relabelled.push((i, predicted[i]));
                result.kept.push(i);
            }
            Action::Drop | Action::Relabel | Action::PseudoLabel => result.dropped.push(i),
        }
    }
    result.scores = scores;
    result
}

/// Cuts the samples ranked above the chosen percentile over all samples (a global cut, every
/// sample eligible, every cut sample relabelled with `Relabel`): the top ⌊n·(1 − q/100)⌉
/// scores, or with `auto` as many as the predictions disagree with the labels.
pub fn cut(
    scores: Vec<f32>,
    labels: &[u32],
    predicted: &[u32],
    percentile_choice: Percentile,
    action: Action,
) -> CutResult {
    let n = labels.len();
    let classes = labels
        .iter()
        .chain(predicted)
        .map(|&l| l as usize + 1)
        .max()
        .unwrap_or(0);
    let eligible = vec![true; n];
    let amount = Amount::of(
        percentile_choice,
        labels,
        predicted,
        &eligible,
        classes,
        None,
    );
    let is_cut = select(&scores, labels, classes, &eligible, Scope::Global, &amount);
    apply(
        scores,
        &is_cut,
        labels,
        predicted,
        &vec![1.0; n],
        action,
        0.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_nn::Linear;

    fn head(classes: usize, f: usize, seed: u64) -> Head {
        let mut rng = Rng::new(seed);
        let w: Vec<f32> = (0..classes * f)
            .map(|_| rng.unit_f64() as f32 - 0.5)
            .collect();
        let b: Vec<f32> = (0..classes).map(|_| rng.unit_f64() as f32 - 0.5).collect();
        Head {
            linear: Linear::new(
                Tensor::from_vec(w, (classes, f), &Device::Cpu).unwrap(),
                Some(Tensor::from_vec(b, classes, &Device::Cpu).unwrap()),
            ),
            classes,
        }
    }

    #[test]
    fn fused_passes_equal_explicit_passes() {
        let (n, f, c, t) = (37, 12, 4, 10);
        let h = head(c, f, 1);
        let mut rng = Rng::new(2);
        let x = Tensor::from_vec(
            (0..n * f)
                .map(|_| rng.unit_f64() as f32)
                .collect::<Vec<_>>(),
            (n, f),
            &Device::Cpu,
        )
        .unwrap();
        let masks = mc_masks(9, t, 0, n, f, 0.5, &Device::Cpu).unwrap();
        let fused = mc_logits(&h, &x, &masks).unwrap();
        for pass in 0..t {
            let explicit = h
                .logits(&(x.clone() * masks.get(pass).unwrap()).unwrap())
                .unwrap();
            let d: f32 = max_abs_diff(&fused.get(pass).unwrap(), &explicit);
            assert!(d < 1e-5, "pass {pass}: {d}");
        }
        // The direct masked features equal masks ⊙ x.
        let host = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let direct = mc_masked(9, t, 0, &host, f, 0.5, &Device::Cpu).unwrap();
        let d: f32 = max_abs_diff(
            &direct,
            &masks.broadcast_mul(&x.unsqueeze(0).unwrap()).unwrap(),
        );
        assert_eq!(d, 0.0);
        // The CPU path (no masked tensor) gives the same logits.
        let cpu = mc_logits_cpu(&h, 9, t, 0, &host, f, 0.5).unwrap();
        let d: f32 = max_abs_diff(&cpu, &fused);
        assert!(d < 1e-5, "cpu path: {d}");
        // Chunking does not change the masks.
        let part = mc_masks(9, t, 5, 3, f, 0.5, &Device::Cpu).unwrap();
        let d: f32 = max_abs_diff(&part, &masks.narrow(1, 5, 3).unwrap());
        assert_eq!(d, 0.0);
    }

    #[test]
    fn scores_by_hand_and_cut() {
        // Two passes, one sample, two classes: logits (0, 0) then (ln 3, 0).
        let logits = Tensor::new(&[[[0f32, 0.0]], [[3f32.ln(), 0.0]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let s = stats_of(&logits, &labels).unwrap();
        // p = (0.5, 0.5) and (0.75, 0.25): mean (0.625, 0.375); label prob 0.5, 0.25.
        let mean = s.mean_probs.to_vec2::<f32>().unwrap();
        assert!((mean[0][0] - 0.625).abs() < 1e-6);
        assert!((s.label_prob_var.to_vec1::<f32>().unwrap()[0] - 0.015625).abs() < 1e-6);
        let sum_var = (3f32.ln() / 2.0).powi(2);
        assert!((s.logit_sum_var.to_vec1::<f32>().unwrap()[0] - sum_var).abs() < 1e-6);
        let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let lpm = score(&s, Score::LabelProbMean, &x, &[1]).unwrap()[0];
        assert!((lpm - 0.625).abs() < 1e-6);
        let margin = score(&s, Score::Margin, &x, &[1]).unwrap()[0];
        assert!((margin - 0.25).abs() < 1e-6);
        let h = |p: f32, q: f32| -(p * p.ln() + q * q.ln());
        let bald = score(&s, Score::Bald, &x, &[1]).unwrap()[0];
        assert!((bald - (h(0.625, 0.375) - (h(0.5, 0.5) + h(0.75, 0.25)) / 2.0)).abs() < 1e-5);

        let r = cut(
            vec![0.1, 0.9, 0.5, 0.95],
            &[0, 1, 1, 0],
            &[0, 0, 1, 1],
            Percentile::Fixed(50.0),
            Action::Drop,
        );
        assert_eq!(
            (r.kept.clone(), r.dropped.clone()),
            (vec![0, 2], vec![1, 3])
        );
        let r = cut(
            vec![0.1, 0.9, 0.5, 0.95],
            &[0, 1, 1, 0],
            &[0, 0, 1, 1],
            Percentile::Auto,
            Action::Relabel,
        );
        // Half the predictions disagree → cut above the 50th percentile.
        assert_eq!(r.relabelled, vec![(1, 0), (3, 1)]);
        assert_eq!(r.labels, vec![0, 0, 1, 1]);
        assert!("x".parse::<Percentile>().is_err() && "101".parse::<Percentile>().is_err());
        assert_eq!("auto".parse::<Percentile>(), Ok(Percentile::Auto));
    }

    #[test]
    fn knn_disagreement_counts_other_labels() {
        // Points on a line; the one labelled 1 among 0s disagrees with all its neighbours.
        let x: Vec<f32> = (0..12).flat_map(|i| [1.0, i as f32 * 0.01]).collect();
        let mut labels = vec![0u32; 12];
        labels[6] = 1;
        let t = Tensor::from_vec(x, (12, 2), &Device::Cpu).unwrap();
        let s = knn_disagreement(&t, &labels).unwrap();
        assert_eq!(s[6], 1.0);
        assert!(s[0] <= 0.1);
    }
    #[test]
    fn ranks_and_rank_average_by_hand() {
        // 0.1 is rank 1, the two 0.3s share ranks 2 and 3 (2.5), 0.9 is rank 4; over n = 4.
        assert_eq!(
            normalised_ranks(&[0.3, 0.1, 0.3, 0.9]),
            vec![0.625, 0.25, 0.625, 1.0]
        );
        let a = [0.3f32, 0.1, 0.3, 0.9];
        let b = [0.0f32, 1.0, 0.5, 0.5];
        // b's ranks: 0.25, 1.0, 0.625, 0.625.
        assert_eq!(rank_average(&[&a, &b]), vec![0.4375, 0.625, 0.625, 0.8125]);
        assert!(rank_average(&[]).is_empty());
    }

    #[test]
    fn combined_score_is_the_rank_average_of_its_parts() {
        // Three samples on a line, two classes; MC-mean probabilities by hand.
        let x = Tensor::new(&[[1f32, 0.0], [1.0, 0.1], [1.0, 0.2]], &Device::Cpu).unwrap();
        let labels = [0u32, 0, 1];
        let probs = Tensor::new(&[[0.9f32, 0.1], [0.4, 0.6], [0.5, 0.5]], &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let stats = McStats {
            mean_probs: probs,
            logit_sum_var: zeros.clone(),
            label_prob_var: zeros.clone(),
            mean_entropy: zeros,
        };
        // 1 − p(label): 0.1, 0.6, 0.5 → ranks 1/3, 1, 2/3. k-NN (k = 2, itself excluded):
        // sample 0 sees 0 and 1 → 1/2; 1 sees 0 and 1 → 1/2; 2 sees 0, 0 → 1 → ranks 1/2, 1/2, 1.
        let knn = knn_disagreement(&x, &labels).unwrap();
        assert_eq!(knn, vec![0.5, 0.5, 1.0]);
        let c = score(&stats, Score::Combined, &x, &labels).unwrap();
        let want = [
            (1.0 / 3.0 + 0.5) / 2.0,
            (1.0 + 0.5) / 2.0,
            (2.0 / 3.0 + 1.0) / 2.0,
        ];
        for (got, want) in c.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{c:?}");
        }
    }

    /// A hard class (clean samples score high) next to an easy one: a global 75th percentile
    /// spends both cuts on the hard class, one of them on a clean sample, and misses the easy
    /// class's wrong label; a 75th percentile per class cuts exactly the two wrong labels.
    #[test]
    fn global_percentile_over_cuts_a_hard_class_per_class_does_not() {
        let scores = [0.6f32, 0.7, 0.8, 0.9, 0.05, 0.1, 0.15, 0.5];
        let labels = [0u32, 0, 0, 0, 1, 1, 1, 1];
        let noisy = [false, false, false, true, false, false, false, true];
        let all = [true; 8];
        let amount = Amount::Share(0.25);
        let global = select(&scores, &labels, 2, &all, Scope::Global, &amount);
        assert_eq!(
            global,
            vec![false, false, true, true, false, false, false, false]
        );
        let class0_cut = global[..4].iter().filter(|&&c| c).count();
        assert_eq!(class0_cut, 2, "two cuts in a class with one wrong label");
        let per_class = select(&scores, &labels, 2, &all, Scope::PerClass, &amount);
        assert_eq!(per_class.as_slice(), &noisy);
        // The same through a per-class estimate of the noise (one wrong label per class).
        let estimated = Amount::PerClass(vec![1.0, 1.0]);
        assert_eq!(
            select(&scores, &labels, 2, &all, Scope::PerClass, &estimated).as_slice(),
            &noisy
        );
        // Globally, that estimate cuts the two highest: 0.9 and 0.8.
        assert_eq!(
            select(&scores, &labels, 2, &all, Scope::Global, &estimated),
            global
        );
    }

    #[test]
    fn trusted_samples_are_never_cut_nor_counted() {
        let scores = [0.9f32, 0.8, 0.1, 0.2];
        let labels = [0u32, 0, 0, 0];
        let eligible = [false, true, true, true];
        // Half of the three eligible samples: ⌊1.5⌉ = 2, the best two eligible.
        let cut = select(
            &scores,
            &labels,
            1,
            &eligible,
            Scope::Global,
            &Amount::Share(0.5),
        );
        assert_eq!(cut, vec![false, true, false, true]);
        // Auto counts the disagreements of eligible samples only.
        let predicted = [1u32, 1, 0, 1];
        assert_eq!(
            Amount::of(Percentile::Auto, &labels, &predicted, &eligible, 2, None),
            Amount::PerClass(vec![2.0, 0.0])
        );
        assert_eq!(
            Amount::of(
                Percentile::Joint,
                &labels,
                &predicted,
                &eligible,
                2,
                Some(&[1.5, 0.0])
            ),
            Amount::PerClass(vec![1.5, 0.0])
        );
        assert_eq!(
            Amount::of(
                Percentile::Fixed(75.0),
                &labels,
                &predicted,
                &eligible,
                2,
                None
            ),
            Amount::Share(0.25)
        );
    }

    #[test]
    fn relabel_only_when_confident() {
        let is_cut = [true, true, false];
        let r = apply(
            vec![0.9, 0.8, 0.1],
            &is_cut,
            &[0, 0, 1],
            &[1, 2, 1],
            &[0.95, 0.6, 0.99],
            Action::Relabel,
            0.9,
        );
        assert_eq!(r.relabelled, vec![(0, 1)]);
        assert_eq!(r.dropped, vec![1]);
        assert_eq!(r.kept, vec![0, 2]);
        assert_eq!(r.labels, vec![1, 0, 1]);
        // Threshold 0 relabels every cut sample; Drop drops them whatever the confidence.
        let r = apply(
            vec![0.0; 3],
            &is_cut,
            &[0, 0, 1],
            &[1, 2, 1],
            &[0.95, 0.6, 0.99],
            Action::Relabel,
            0.0,
        );
        assert_eq!(r.relabelled, vec![(0, 1), (1, 2)]);
        let r = apply(
            vec![0.0; 3],
            &is_cut,
            &[0, 0, 1],
            &[1, 2, 1],
            &[1.0; 3],
            Action::Drop,
            0.0,
        );
        assert_eq!((r.dropped, r.kept), (vec![0, 1], vec![2]));
        assert_eq!("joint".parse::<Percentile>(), Ok(Percentile::Joint));
        assert_eq!(Percentile::Joint.to_string(), "joint");
    }
}
