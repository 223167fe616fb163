//! Cleansing a candidate training set before the final training: the methods `bccp train
//! --method` compares (none, the Bayesian cut-off, confident learning, the ANL-CE loss), each
//! reduced to which samples it flags and which labels it keeps.

use candle_core::Tensor;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::baselines::{cross_fit, find_label_issues, kfold_pred_probs, FilterBy};
use crate::cutoff::{self, Action, McStats, Percentile, Score};
use crate::progress::Progress;
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
        }
    }
}

/// Applies `cfg.method` to the candidates `features` [n, F] with labels `given`; `train` holds
/// the head-training settings (and the seed).
pub fn cleanse(
    cfg: &CleanseConfig,
    features: &Tensor,
    given: &[u32],
    classes: usize,
    train: &TrainConfig,
    progress: &Progress,
) -> Result<Cleansed> {
    match cfg.method {
        Method::None | Method::AnlCe => Ok(Cleansed::untouched(given)),
        Method::Bccp => {
            let mc_cfg = TrainConfig {
                dropout: 0.5,
                ..train.clone()
            };
            let stats = if cfg.cutoff_folds >= 2 {
                out_of_sample_stats(features, given, classes, cfg, &mc_cfg, progress)?
            } else {
                let mc_head = train_head(features, given, classes, &mc_cfg, progress)?;
                cutoff::mc_stats(&mc_head, features, given, cfg.mc_passes, 0.5, train.seed)?
            };
            let scores = cutoff::score(&stats, cfg.cutoff_score, features, given)?;
            let predicted: Vec<u32> = stats.mean_probs.argmax(1)?.to_vec1::<u32>()?;
            let result = cutoff::cut(
                scores,
                given,
                &predicted,
                cfg.cutoff_percentile,
                cfg.cutoff_action,
            );
            let mut flagged = vec![false; given.len()];
            for &i in result
                .dropped
                .iter()
                .chain(result.relabelled.iter().map(|(i, _)| i))
            {
                flagged[i] = true;
            }
            Ok(Cleansed {
                flagged,
                kept: result.kept.iter().map(|&i| i as u32).collect(),
                labels: result.labels,
                removed: result.dropped.len(),
                relabelled: result.relabelled.len(),
                scores: Some(result.scores),
            })
        }
        Method::Cleanlab => {
            let probs = kfold_pred_probs(features, given, classes, cfg.folds, train, progress)?;
            let flagged = find_label_issues(&probs.probs, given, classes, cfg.filter_by)?;
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
            })
        }
    }
}

/// MC-dropout statistics of every sample from a head that never saw it: K folds, each scored
/// by a head trained on the others, put back in sample order.
fn out_of_sample_stats(
    features: &Tensor,
    given: &[u32],
    classes: usize,
    cfg: &CleanseConfig,
    mc_cfg: &TrainConfig,
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
    let (_, folds) = cross_fit(
        features,
        given,
        classes,
        cfg.cutoff_folds,
        mc_cfg,
        progress,
        |f, head, held, held_x| {
            let labels: Vec<u32> = held.iter().map(|&i| given[i as usize]).collect();
            cutoff::mc_stats(
                head,
                held_x,
                &labels,
                cfg.mc_passes,
                0.5,
                mc_cfg.seed ^ f as u64,
            )
        },
    )?;
    let order: Vec<u32> = folds
        .iter()
        .flat_map(|(held, _)| held.iter().copied())
        .collect();
    let parts: Vec<McStats> = folds.into_iter().map(|(_, stats)| stats).collect();
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
        let oos = out_of_sample_stats(&features, &given, classes, &cfg, &train, &hidden).unwrap();
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
}
