//! Cleansing a candidate training set before the final training: the methods `bccp train
//! --method` compares (none, the Bayesian cut-off, confident learning, the ANL-CE loss), each
//! reduced to which samples it flags and which labels it keeps.

use candle_core::Tensor;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::baselines::{
    assign_folds, compute_confident_joint, find_label_issues, kfold_pred_probs, FilterBy,
};
use crate::cutoff::{self, Action, Amount, McStats, Percentile, Scope, Score};
use crate::progress::Progress;
use crate::rng::Rng;
use crate::train::{train_head, Loss, TrainConfig};

/// How noisy labels are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Train on every label as given.
    #[default]
    None,
    /// The Bayesian (MC-dropout) cut-off (`-b Y`).
    Bccp,
    /// Confident learning: drop what cleanlab's `find_label_issues` flags on K-fold
    /// out-of-sample probabilities.
    Cleanlab,
    /// Train on every label with the noise-robust ANL-CE loss.
    AnlCe,
}

impl Method {
    /// Every method, in command-line order.
    pub const ALL: [Method; 4] = [Method::None, Method::Bccp, Method::Cleanlab, Method::AnlCe];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Bccp => "bccp",
            Method::Cleanlab => "cleanlab",
            Method::AnlCe => "anl_ce",
        }
    }

    /// The loss the final training uses with this method, given the one asked for.
    pub fn loss(self, asked: Loss) -> Loss {
        match self {
            Method::AnlCe => Loss::AnlCe,
            _ => asked,
        }
    }
}

/// Why a cleansing method could not run.
#[derive(Debug, thiserror::Error)]
pub enum CleanseError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Distance(#[from] crate::distance::DistanceError),
    #[error(transparent)]
    Confident(#[from] crate::baselines::ConfidentError),
    #[error("cutoff_folds {folds} exceeds the {samples} training samples")]
    TooManyFolds { folds: usize, samples: usize },
}

type Result<T> = std::result::Result<T, CleanseError>;

/// Settings of the cleansing methods.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanseConfig {
    pub method: Method,
    pub cutoff_score: Score,
    pub cutoff_percentile: Percentile,
    pub cutoff_action: Action,
    pub mc_passes: usize,
    /// 1: the MC-dropout head scores the samples it was trained on (the reference); K ≥ 2:
    /// each sample is scored by a head trained on the other K − 1 folds (out of sample).
    pub cutoff_folds: usize,
    /// cleanlab's `filter_by`.
    pub filter_by: FilterBy,
    /// Folds of the cross-validated probabilities confident learning ranks.
    pub folds: usize,
    /// One cut over all samples, or one per given class.
    pub cutoff_scope: Scope,
    /// Rounds of the cut-off: after the first, the MC-dropout heads are trained again on the
    /// samples the previous round kept and every sample is scored and cut again.
    pub cutoff_rounds: usize,
    /// With `Relabel`: a cut sample takes the MC-mean prediction only when its probability is
    /// at least this, and is dropped otherwise (0: every cut sample is relabelled).
    pub relabel_confidence: f64,
    /// Never cut the replayed samples (yesterday's cleansed training data) and leave them out
    /// of the estimated noise; they still train the scoring heads and count as neighbours.
    pub cutoff_trust_replay: bool,
}

/// What a method did to the candidate set.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleansed {
    /// Samples the method considers mislabelled (dropped or relabelled).
    pub flagged: Vec<bool>,
    /// Indices trained on, in order.
    pub kept: Vec<u32>,
    /// The label of every sample after cleansing.
    pub labels: Vec<u32>,
    pub removed: usize,
    pub relabelled: usize,
    /// The per-sample noise score, when the method ranks samples by one.
    pub scores: Option<Vec<f32>>,
    /// The class the method's own model predicts for each sample (the label it would
    /// suggest), when it has one.
    pub predicted: Option<Vec<u32>>,
}

impl Cleansed {
    /// Everything kept, labels as given.
    fn untouched(given: &[u32]) -> Self {
        Self {
            flagged: vec![false; given.len()],
            kept: (0..given.len() as u32).collect(),
            labels: given.to_vec(),
            removed: 0,
            relabelled: 0,
            scores: None,
            predicted: None,
        }
    }
}

/// Applies `cfg.method` to the candidates `features` [n, F] with labels `given`; `replayed`
/// marks the rows replayed from the reuse buffer (empty: none); `trusted` marks the rows whose
/// label a person verified (empty: none): they are never flagged, cut or relabelled, whatever
/// the method, and stay out of the estimated noise; `train` holds the head-training settings
/// (and the seed).
#[allow(clippy::too_many_arguments)]
pub fn cleanse(
    cfg: &CleanseConfig,
    features: &Tensor,
    given: &[u32],
    replayed: &[bool],
    trusted: &[bool],
    classes: usize,
    train: &TrainConfig,
    progress: &Progress,
) -> Result<Cleansed> {
    match cfg.method {
        Method::None | Method::AnlCe => Ok(Cleansed::untouched(given)),
        Method::Bccp => bayesian_cutoff(
            cfg, features, given, replayed, trusted, classes, train, progress,
        ),
        Method::Cleanlab => {
            let probs = kfold_pred_probs(features, given, classes, cfg.folds, train, progress)?;
            let mut flagged = find_label_issues(&probs.probs, given, classes, cfg.filter_by)?;
            for (f, &t) in flagged.iter_mut().zip(trusted) {
                *f &= !t;
            }
            let predicted = probs
                .probs
                .chunks(classes)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |best, (k, &p)| {
                            if p > best.1 {
                                (k as u32, p)
                            } else {
                                best
                            }
                        })
                        .0
                })
                .collect();
            let kept: Vec<u32> = (0..given.len() as u32)
                .filter(|&i| !flagged[i as usize])
                .collect();
            // 1 − self-confidence ranks the samples for the detection AUC.
            let scores = given
                .iter()
                .enumerate()
                .map(|(i, &l)| 1.0 - probs.probs[i * classes + l as usize])
                .collect();
            Ok(Cleansed {
                removed: given.len() - kept.len(),
                flagged,
                kept,
                labels: given.to_vec(),
                relabelled: 0,
                scores: Some(scores),
                predicted: Some(predicted),
            })
        }
    }
}

/// Stream of [`Rng::derive`] that seeds the heads of cut-off rounds after the first.
const ROUND_STREAM: u64 = 0x2042;

/// The Bayesian cut-off: MC-dropout scores, the cut (global or per class, a percentile or an
/// estimated amount), again on the kept samples for `cutoff_rounds`, then the action.
#[allow(clippy::too_many_arguments)]
fn bayesian_cutoff(
    cfg: &CleanseConfig,
    features: &Tensor,
    given: &[u32],
    replayed: &[bool],
    trusted: &[bool],
    classes: usize,
    train: &TrainConfig,
    progress: &Progress,
) -> Result<Cleansed> {
    let n = given.len();
    let eligible: Vec<bool> = (0..n)
        .map(|i| {
            let replay = cfg.cutoff_trust_replay && replayed.get(i).copied().unwrap_or(false);
            !(replay || trusted.get(i).copied().unwrap_or(false))
        })
        .collect();
    // The label-only part of a score (k-NN disagreement) does not change between rounds.
    let knn = match cfg.cutoff_score {
        Score::KnnDisagreement | Score::Combined => {
            Some(cutoff::knn_disagreement(features, given)?)
        }
        _ => None,
    };
    let mut is_cut = vec![false; n];
    let mut last = None;
    for round in 0..cfg.cutoff_rounds.max(1) {
        let seed = if round == 0 {
            train.seed
        } else {
            Rng::derive(train.seed, ROUND_STREAM + round as u64).next_u64()
        };
        let mc_cfg = TrainConfig {
            dropout: 0.5,
            seed,
            ..train.clone()
        };
        let fit: Vec<bool> = is_cut.iter().map(|&c| !c).collect();
        let stats = if cfg.cutoff_folds >= 2 {
            out_of_sample_stats(features, given, classes, cfg, &mc_cfg, &fit, progress)?
        } else {
            in_sample_stats(features, given, classes, cfg, &mc_cfg, &fit, progress)?
        };
        let scores = match (cfg.cutoff_score, &knn) {
            (Score::KnnDisagreement, Some(k)) => k.clone(),
            (Score::Combined, Some(k)) => {
                let mc = cutoff::score(&stats, Score::LabelProbMean, features, given)?;
                cutoff::rank_average(&[&mc, k])
            }
            (which, _) => cutoff::score(&stats, which, features, given)?,
        };
        let probs = stats.mean_probs.to_device(&candle_core::Device::Cpu)?;
        let (predicted, confidence) = top_class(&probs)?;
        let estimate = match cfg.cutoff_percentile {
            Percentile::Joint | Percentile::Mixture => {
                let flat = probs.flatten_all()?.to_vec1::<f32>()?;
                Some(match cfg.cutoff_percentile {
                    Percentile::Joint => joint_noise_counts(&flat, given, classes, &eligible)?,
                    _ => cutoff::mixture_noise_counts(&flat, given, classes, &eligible),
                })
            }
            _ => None,
        };
        let amount = Amount::of(
            cfg.cutoff_percentile,
            given,
            &predicted,
            &eligible,
            classes,
            estimate.as_deref(),
        );
        let next = cutoff::select(
            &scores,
            given,
            classes,
            &eligible,
            cfg.cutoff_scope,
            &amount,
        );
        let settled = next == is_cut;
        is_cut = next;
        last = Some((scores, predicted, confidence));
        if settled {
            break;
        }
    }
    let Some((scores, mut predicted, mut confidence)) = last else {
        return Ok(Cleansed::untouched(given));
    };
    if cfg.cutoff_action == Action::PseudoLabel && is_cut.iter().any(|&c| c) {
        (predicted, confidence) = teacher_predictions(features, given, &is_cut, classes, train)?;
    }
    let result = cutoff::apply(
        scores,
        &is_cut,
        given,
        &predicted,
        &confidence,
        cfg.cutoff_action,
        cfg.relabel_confidence,
    );
    Ok(Cleansed {
        flagged: is_cut,
        kept: result.kept.iter().map(|&i| i as u32).collect(),
        labels: result.labels,
        removed: result.dropped.len(),
        relabelled: result.relabelled.len(),
        scores: Some(result.scores),
        predicted: Some(predicted),
    })
}

/// Stream of [`Rng::derive`] that seeds the pseudo-labelling teacher.
const TEACHER_STREAM: u64 = 0x7EAC;

/// The prediction (class, probability) for every sample of a head trained, with the final
/// training's settings, on the samples the cut kept: the pseudo-labelling teacher.
fn teacher_predictions(
    features: &Tensor,
    given: &[u32],
    is_cut: &[bool],
    classes: usize,
    train: &TrainConfig,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let kept: Vec<u32> = (0..given.len() as u32)
        .filter(|&i| !is_cut[i as usize])
        .collect();
    if kept.is_empty() {
        // Nothing to learn from: every cut sample keeps a probability of 0 and is dropped.
        return Ok((given.to_vec(), vec![0.0; given.len()]));
    }
    let device = features.device();
    let x = features.index_select(&Tensor::new(kept.as_slice(), device)?, 0)?;
    let y: Vec<u32> = kept.iter().map(|&i| given[i as usize]).collect();
    let cfg = TrainConfig {
        seed: Rng::derive(train.seed, TEACHER_STREAM).next_u64(),
        ..train.clone()
    };
    let head = train_head(&x, &y, classes, &cfg, &Progress::hidden())?;
    let probs = candle_nn::ops::softmax_last_dim(&head.logits(features)?)?
        .to_device(&candle_core::Device::Cpu)?;
    top_class(&probs)
}

/// The most probable class of each row of `probs` [n, classes] and its probability.
fn top_class(probs: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    Ok((
        probs.argmax(1)?.to_vec1::<u32>()?,
        probs.max(1)?.to_vec1::<f32>()?,
    ))
}

/// The noisy labels of each given class that confident learning estimates from `probs`
/// (row-major [n, classes]) over the `eligible` samples: the off-diagonal mass of each row of
/// the calibrated confident joint (rows sum to the label counts).
pub fn joint_noise_counts(
    probs: &[f32],
    labels: &[u32],
    classes: usize,
    eligible: &[bool],
) -> Result<Vec<f64>> {
    let rows: Vec<usize> = (0..labels.len()).filter(|&i| eligible[i]).collect();
    if rows.is_empty() {
        return Ok(vec![0.0; classes]);
    }
    let sub_probs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| probs[i * classes..(i + 1) * classes].iter().copied())
        .collect();
    let sub_labels: Vec<u32> = rows.iter().map(|&i| labels[i]).collect();
    let joint = compute_confident_joint(&sub_probs, &sub_labels, classes)?;
    Ok(joint
        .calibrated
        .iter()
        .enumerate()
        .map(|(c, row)| {
            row.iter()
                .enumerate()
                .filter(|&(j, _)| j != c)
                .map(|(_, &v)| v as f64)
                .sum()
        })
        .collect())
}

/// MC-dropout statistics of every sample from one head trained on the samples `fit` marks.
fn in_sample_stats(
    features: &Tensor,
    given: &[u32],
    classes: usize,
    cfg: &CleanseConfig,
    mc_cfg: &TrainConfig,
    fit: &[bool],
    progress: &Progress,
) -> Result<McStats> {
    let head = if fit.iter().all(|&f| f) {
        train_head(features, given, classes, mc_cfg, progress)?
    } else {
        let rows: Vec<u32> = (0..given.len() as u32)
            .filter(|&i| fit[i as usize])
            .collect();
        let x = features.index_select(&Tensor::new(rows.as_slice(), features.device())?, 0)?;
        let y: Vec<u32> = rows.iter().map(|&i| given[i as usize]).collect();
        train_head(&x, &y, classes, mc_cfg, progress)?
    };
    Ok(cutoff::mc_stats(
        &head,
        features,
        given,
        cfg.mc_passes,
        0.5,
        mc_cfg.seed,
    )?)
}

/// MC-dropout statistics of every sample from a head that never saw it: K folds, each scored
/// by a head trained on the samples of the other folds that `fit` marks, put back in sample
/// order.
fn out_of_sample_stats(
    features: &Tensor,
    given: &[u32],
    classes: usize,
    cfg: &CleanseConfig,
    mc_cfg: &TrainConfig,
    fit: &[bool],
    progress: &Progress,
) -> Result<McStats> {
    let n = given.len();
    if cfg.cutoff_folds > n {
        return Err(CleanseError::TooManyFolds {
            folds: cfg.cutoff_folds,
            samples: n,
        });
    }
    let device = features.device();
    let fold = assign_folds(given, cfg.cutoff_folds, mc_cfg.seed);
    let mut order = Vec::with_capacity(n);
    let mut parts = Vec::with_capacity(cfg.cutoff_folds);
    for f in 0..cfg.cutoff_folds {
        let train: Vec<u32> = (0..n as u32)
            .filter(|&i| fold[i as usize] != f && fit[i as usize])
            .collect();
        let held: Vec<u32> = (0..n as u32).filter(|&i| fold[i as usize] == f).collect();
        if held.is_empty() {
            continue;
        }
        let train_x = features.index_select(&Tensor::new(train.as_slice(), device)?, 0)?;
        let train_y: Vec<u32> = train.iter().map(|&i| given[i as usize]).collect();
        let head = train_head(&train_x, &train_y, classes, mc_cfg, progress)?;
        let held_x = features.index_select(&Tensor::new(held.as_slice(), device)?, 0)?;
        let labels: Vec<u32> = held.iter().map(|&i| given[i as usize]).collect();
        parts.push(cutoff::mc_stats(
            &head,
            &held_x,
            &labels,
            cfg.mc_passes,
            0.5,
            mc_cfg.seed ^ f as u64,
        )?);
        order.extend(held);
    }
    // Row r of the concatenation is sample order[r]; invert to sample order.
    let mut inverse = vec![0u32; n];
    for (r, &i) in order.iter().enumerate() {
        inverse[i as usize] = r as u32;
    }
    let inverse = Tensor::new(inverse.as_slice(), device)?;
    let gather = |get: fn(&McStats) -> &Tensor| -> Result<Tensor> {
        let all = Tensor::cat(&parts.iter().map(get).collect::<Vec<_>>(), 0)?;
        Ok(all.index_select(&inverse, 0)?)
    };
    Ok(McStats {
        mean_probs: gather(|s| &s.mean_probs)?,
        logit_sum_var: gather(|s| &s.logit_sum_var)?,
        label_prob_var: gather(|s| &s.label_prob_var)?,
        mean_entropy: gather(|s| &s.mean_entropy)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random features with random labels: in sample the MC head has memorised every label
    /// (mean probability of the given label high); out of sample it is near chance.
    #[test]
    fn out_of_sample_cutoff_stats_cannot_memorise() {
        let (n, classes) = (200, 10);
        let (features, given) = crate::testutil::random_labelled(n, 256, classes, 5);
        let train = TrainConfig {
            epochs: 60,
            batch_size: 16,
            lr: 1e-2,
            dropout: 0.5,
            ..Default::default()
        };
        let cfg = CleanseConfig {
            method: Method::Bccp,
            cutoff_score: Score::LabelProbMean,
            cutoff_percentile: Percentile::Fixed(90.0),
            cutoff_action: Action::Drop,
            mc_passes: 4,
            cutoff_folds: 5,
            filter_by: FilterBy::default(),
            folds: 5,
            cutoff_scope: Scope::Global,
            cutoff_rounds: 1,
            relabel_confidence: 0.0,
            cutoff_trust_replay: false,
        };
        let hidden = Progress::hidden();
        let label_prob = |stats: &McStats| -> f32 {
            let p = stats.mean_probs.to_vec2::<f32>().unwrap();
            p.iter()
                .zip(&given)
                .map(|(row, &l)| row[l as usize])
                .sum::<f32>()
                / n as f32
        };
        let all = vec![true; n];
        let oos =
            out_of_sample_stats(&features, &given, classes, &cfg, &train, &all, &hidden).unwrap();
        assert_eq!(oos.mean_probs.dims(), &[n, classes]);
        let head = train_head(&features, &given, classes, &train, &hidden).unwrap();
        let ins = cutoff::mc_stats(&head, &features, &given, 4, 0.5, 1).unwrap();
        let (p_oos, p_ins) = (label_prob(&oos), label_prob(&ins));
        assert!(p_ins > 0.5, "in sample, mean p(given label) {p_ins}");
        assert!(p_oos < 0.2, "out of sample, mean p(given label) {p_oos}");
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        crate::config::choice::assert_names_agree(|m: &Method| m.name());
        let err = crate::config::choice::parse::<Method>("method", "clean").unwrap_err();
        assert!(
            err.contains("\"clean\"") && err.contains("cleanlab, anl_ce"),
            "{err}"
        );
        assert_eq!(Method::AnlCe.loss(Loss::CrossEntropy), Loss::AnlCe);
        assert_eq!(
            Method::Cleanlab.loss(Loss::CrossEntropy),
            Loss::CrossEntropy
        );
    }
    #[test]
    fn joint_noise_counts_by_hand() {
        // Labels 0, 0, 1, 1. Thresholds (mean self-confidence): class 0 (0.9 + 0.1) / 2 = 0.5,
        // class 1 (0.95 + 0.7) / 2 = 0.825. Sample 0 is confidently 0, sample 1 (label 0)
        // confidently 1, sample 2 confidently 1, sample 3 reaches no threshold. Joint
        // [[1, 1], [0, 1]], calibrated to the label counts (2, 2): [[1, 1], [0, 2]].
        let probs = [0.9f32, 0.1, 0.1, 0.9, 0.05, 0.95, 0.3, 0.7];
        let labels = [0u32, 0, 1, 1];
        let all = [true; 4];
        assert_eq!(
            joint_noise_counts(&probs, &labels, 2, &all).unwrap(),
            vec![1.0, 0.0]
        );
        // Without the wrong sample (trusted), nothing is left to estimate in class 0.
        let eligible = [true, false, true, true];
        assert_eq!(
            joint_noise_counts(&probs, &labels, 2, &eligible).unwrap(),
            vec![0.0, 0.0]
        );
        assert_eq!(
            joint_noise_counts(&probs, &labels, 2, &[false; 4]).unwrap(),
            vec![0.0, 0.0]
        );
    }

    /// Two clusters per class, 20% of the labels flipped, a few replayed (trusted) rows.
    fn clustered(n: usize, seed: u64) -> (Tensor, Vec<u32>, Vec<bool>, Vec<bool>) {
        let (classes, dim) = (3usize, 16usize);
        let mut rng = crate::rng::Rng::new(seed);
        let mut x = Vec::with_capacity(n * dim);
        let (mut given, mut noisy) = (Vec::new(), Vec::new());
        for i in 0..n {
            let truth = (i % classes) as u32;
            for d in 0..dim {
                let centre = if d == truth as usize { 3.0 } else { 0.0 };
                x.push(centre + rng.unit_f64() as f32 - 0.5);
            }
            let flip = rng.unit_f64() < 0.2;
            given.push(if flip {
                (truth + 1) % classes as u32
            } else {
                truth
            });
            noisy.push(flip);
        }
        let replayed: Vec<bool> = (0..n).map(|i| i >= n * 3 / 4).collect();
        for i in 0..n {
            if replayed[i] {
                given[i] = (i % classes) as u32;
                noisy[i] = false;
            }
        }
        let t = Tensor::from_vec(x, (n, dim), &candle_core::Device::Cpu).unwrap();
        (t, given, noisy, replayed)
    }

    fn options(seed: u64) -> (CleanseConfig, TrainConfig) {
        let cfg = CleanseConfig {
            method: Method::Bccp,
            cutoff_score: Score::Combined,
            cutoff_percentile: Percentile::Joint,
            cutoff_action: Action::Relabel,
            mc_passes: 4,
            cutoff_folds: 3,
            filter_by: FilterBy::default(),
            folds: 3,
            cutoff_scope: Scope::PerClass,
            cutoff_rounds: 2,
            relabel_confidence: 0.8,
            cutoff_trust_replay: true,
        };
        let train = TrainConfig {
            epochs: 10,
            batch_size: 32,
            lr: 1e-2,
            seed,
            ..Default::default()
        };
        (cfg, train)
    }

    #[test]
    fn new_options_find_flipped_labels_trust_replay_and_repeat_per_seed() {
        let (x, given, noisy, replayed) = clustered(240, 3);
        let hidden = Progress::hidden();
        let (cfg, train) = options(7);
        let a = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        let b = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        assert_eq!(a, b, "the same seed gives the same cleansing");
        let (_, other_seed) = options(8);
        let c = cleanse(&cfg, &x, &given, &replayed, &[], 3, &other_seed, &hidden).unwrap();
        assert_ne!(a.scores, c.scores, "another seed, other dropout masks");
        // Replayed rows are never flagged.
        assert!(a.flagged.iter().zip(&replayed).all(|(f, r)| !(*f && *r)));
        let d = crate::train::eval::detection(&a.flagged, &noisy);
        assert!(d.precision >= 0.8 && d.recall >= 0.8, "{d:?}");
        // Relabelled samples took a confident prediction; the rest of the flagged were dropped.
        assert_eq!(
            a.removed + a.relabelled,
            a.flagged.iter().filter(|&&f| f).count()
        );
    }

    /// Verified rows are trusted by every method: the flipped labels a person verified (here:
    /// confirmed as given, against the data) are never flagged, cut or relabelled, while the
    /// same rows are flagged without the trust.
    #[test]
    fn verified_rows_are_never_flagged() {
        let (x, given, noisy, replayed) = clustered(240, 3);
        let hidden = Progress::hidden();
        let (cfg, train) = options(7);
        for method in [Method::Bccp, Method::Cleanlab] {
            let cfg = CleanseConfig {
                method,
                ..cfg.clone()
            };
            let free = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
            // Half of the flipped labels that the untrusted run flagged become verified.
            let trusted: Vec<bool> = (0..given.len())
                .map(|i| noisy[i] && free.flagged[i] && i % 2 == 0)
                .collect();
            let n_trusted = trusted.iter().filter(|&&t| t).count();
            assert!(n_trusted >= 5, "{method:?}: {n_trusted}");
            let got = cleanse(&cfg, &x, &given, &replayed, &trusted, 3, &train, &hidden).unwrap();
            for i in (0..given.len()).filter(|&i| trusted[i]) {
                assert!(!got.flagged[i], "{method:?}: verified row {i} flagged");
                assert!(got.kept.contains(&(i as u32)), "{method:?}: row {i} cut");
                assert_eq!(got.labels[i], given[i], "{method:?}: row {i} relabelled");
            }
            // The other flipped labels are still found.
            let rest: Vec<usize> = (0..given.len())
                .filter(|&i| noisy[i] && !trusted[i])
                .collect();
            let found = rest.iter().filter(|&&i| got.flagged[i]).count();
            assert!(
                found * 10 >= rest.len() * 7,
                "{method:?}: {found}/{}",
                rest.len()
            );
            let predicted = got.predicted.as_ref().unwrap();
            assert_eq!(predicted.len(), given.len());
            // The suggestion of a flipped, flagged label is mostly the true class.
            let right = rest
                .iter()
                .filter(|&&i| got.flagged[i] && predicted[i] == (i % 3) as u32)
                .count();
            assert!(right * 10 >= found * 8, "{method:?}: {right}/{found}");
        }
    }

    /// Pseudo-labelling: the cut samples take the prediction of a head trained on the kept
    /// ones. On separable clusters that teacher recovers the true class of every flipped label
    /// it is confident about.
    #[test]
    fn pseudo_labels_restore_the_true_class_of_cut_samples() {
        let (x, given, noisy, replayed) = clustered(240, 3);
        let hidden = Progress::hidden();
        let (cfg, train) = options(7);
        let cfg = CleanseConfig {
            cutoff_action: Action::PseudoLabel,
            relabel_confidence: 0.6,
            ..cfg
        };
        let got = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        let flagged = got.flagged.iter().filter(|&&f| f).count();
        assert_eq!(got.removed + got.relabelled, flagged);
        assert!(got.relabelled * 10 >= flagged * 8, "{got:?}");
        let mut fixed = 0;
        for i in 0..given.len() {
            let truth = (i % 3) as u32;
            if got.flagged[i] && got.kept.contains(&(i as u32)) {
                assert_eq!(got.labels[i], truth, "sample {i}");
                fixed += usize::from(noisy[i]);
            } else if !got.flagged[i] {
                assert_eq!(
                    got.labels[i], given[i],
                    "unflagged sample {i} keeps its label"
                );
            }
        }
        assert!(
            fixed * 10 >= noisy.iter().filter(|&&b| b).count() * 7,
            "{fixed}"
        );
        // Deterministic per seed; the same cut as relabelling, other labels' source.
        let again = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        assert_eq!(got, again);
        let relabel = CleanseConfig {
            cutoff_action: Action::Relabel,
            ..cfg
        };
        let mc = cleanse(&relabel, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        assert_eq!(mc.flagged, got.flagged);
    }

    /// One in-sample round with a global fixed percentile is the reference's path: one
    /// MC-dropout head on every sample, its scores, the plain cut.
    #[test]
    fn one_round_in_sample_is_the_reference_path() {
        let (x, given, _, replayed) = clustered(120, 5);
        let hidden = Progress::hidden();
        let (cfg, train) = options(1);
        let cfg = CleanseConfig {
            cutoff_score: Score::LabelProbMean,
            cutoff_percentile: Percentile::Fixed(80.0),
            cutoff_action: Action::Drop,
            cutoff_folds: 1,
            cutoff_scope: Scope::Global,
            cutoff_rounds: 1,
            relabel_confidence: 0.0,
            cutoff_trust_replay: false,
            ..cfg
        };
        let got = cleanse(&cfg, &x, &given, &replayed, &[], 3, &train, &hidden).unwrap();
        let mc_cfg = TrainConfig {
            dropout: 0.5,
            ..train.clone()
        };
        let head = train_head(&x, &given, 3, &mc_cfg, &hidden).unwrap();
        let stats = cutoff::mc_stats(&head, &x, &given, 4, 0.5, train.seed).unwrap();
        let scores = cutoff::score(&stats, Score::LabelProbMean, &x, &given).unwrap();
        let predicted: Vec<u32> = stats.mean_probs.argmax(1).unwrap().to_vec1().unwrap();
        let want = cutoff::cut(
            scores,
            &given,
            &predicted,
            Percentile::Fixed(80.0),
            Action::Drop,
        );
        assert_eq!(got.removed, 24);
        assert_eq!(
            got.kept,
            want.kept.iter().map(|&i| i as u32).collect::<Vec<_>>()
        );
    }
}
