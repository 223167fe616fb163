//! `bccp label-issues`: confident learning as a tool — on cleanlab-style `.npy` inputs, or on
//! an image dataset whose out-of-sample probabilities bccp computes (embeddings, K-fold heads).

use std::path::Path;

use serde::Serialize;

use crate::backbone::{EmbedStats, Embedder};
use crate::baselines::{
    find_label_issues, kfold_pred_probs, self_confidence, suggested_labels, FilterBy,
};
use crate::config::{MAX_EPOCHS, MAX_FOLDS};
use crate::data::ImageList;
use crate::fsutil::write_atomic;
use crate::npy;
use crate::progress::Progress;
use crate::train::TrainConfig;

/// Why a label-issue report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LabelIssuesError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Npy(#[from] crate::npy::NpyError),
    #[error(transparent)]
    Confident(#[from] crate::baselines::ConfidentError),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("cannot write {path}: {error}")]
    Write {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LabelIssuesError>;

/// `ensure!` with a [`LabelIssuesError::Input`].
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(LabelIssuesError::Input(format!($($fmt)*)));
        }
    };
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> LabelIssuesError + '_ {
    move |error| LabelIssuesError::Write {
        path: path.to_path_buf(),
        error,
    }
}

/// The issue mask of `pred_probs` [n, k] and `labels` [n] read from `.npy` files.
pub fn mask_from_npy(pred_probs: &Path, labels: &Path, filter_by: FilterBy) -> Result<Vec<bool>> {
    let (probs, given, k) = read_npy_inputs(pred_probs, labels)?;
    Ok(find_label_issues(&probs, &given, k, filter_by)?)
}

/// The issue masks of shards of samples, one (`pred_probs`, `labels`) pair of `.npy` files per
/// shard, in shard order: the thresholds, the confident joint and the pruning are computed
/// once over all shards together (the arrays are small: samples × classes), so each shard's
/// mask is its part of the unsharded mask.
pub fn masks_from_npy_shards(
    shards: &[(&Path, &Path)],
    filter_by: FilterBy,
) -> Result<Vec<Vec<bool>>> {
    let (mut probs, mut given, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut classes: Option<(usize, &Path)> = None;
    for &(p, l) in shards {
        let (sp, sl, k) = read_npy_inputs(p, l)?;
        if let Some((k0, first)) = classes {
            ensure!(
                k == k0,
                "--pred-probs {} has {k} classes but {} has {k0}: shards must share the classes",
                p.display(),
                first.display()
            );
        }
        classes = Some((k, p));
        sizes.push(sl.len());
        probs.extend(sp);
        given.extend(sl);
    }
    let (k, _) = classes.ok_or_else(|| LabelIssuesError::Input("no --pred-probs given".into()))?;
    let mask = find_label_issues(&probs, &given, k, filter_by)?;
    let mut at = 0;
    Ok(sizes
        .into_iter()
        .map(|n| {
            at += n;
            mask[at - n..at].to_vec()
        })
        .collect())
}

/// `pred_probs` [n, k] (flattened) and `labels` [n] read from `.npy` files, checked, with k.
fn read_npy_inputs(pred_probs: &Path, labels: &Path) -> Result<(Vec<f64>, Vec<u32>, usize)> {
    let probs = npy::read(pred_probs)?;
    let given = npy::read(labels)?;
    ensure!(
        probs.shape.len() == 2,
        "--pred-probs {} has shape {:?}; expected [samples, classes]",
        pred_probs.display(),
        probs.shape
    );
    let (n, k) = (probs.shape[0], probs.shape[1]);
    ensure!(
        given.shape == [n],
        "--labels {} has shape {:?}; expected [{n}] to match --pred-probs",
        labels.display(),
        given.shape
    );
    let labels_u32: Vec<u32> = given
        .values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            ensure!(
                v >= 0.0 && v.fract() == 0.0 && (v as usize) < k,
                "--labels {}: label {v} at index {i} is not a class index in 0..{k}",
                labels.display()
            );
            Ok(v as u32)
        })
        .collect::<Result<_>>()?;
    Ok((probs.values, labels_u32, k))
}

/// One line of the dataset report.
#[derive(Debug, Clone, Serialize)]
pub struct IssueRecord {
    pub path: String,
    pub given_label: String,
    pub suggested_label: String,
    pub self_confidence: f64,
    pub is_issue: bool,
}

/// Issues per class of a dataset report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassSummary {
    pub class: String,
    pub samples: usize,
    pub issues: usize,
}

/// The per-sample report and the per-class summary of a labelled image list.
pub fn dataset_report(
    paths: &[String],
    classes: &[String],
    labels: &[u32],
    probs: &[f32],
    filter_by: FilterBy,
) -> Result<(Vec<IssueRecord>, Vec<ClassSummary>)> {
    let k = classes.len();
    let mask = find_label_issues(probs, labels, k, filter_by)?;
    let confidence = self_confidence(probs, labels, k)?;
    let suggested = suggested_labels(probs, labels, k)?;
    let records: Vec<IssueRecord> = (0..labels.len())
        .map(|i| IssueRecord {
            path: paths[i].clone(),
            given_label: classes[labels[i] as usize].clone(),
            suggested_label: classes[suggested[i] as usize].clone(),
            self_confidence: confidence[i],
            is_issue: mask[i],
        })
        .collect();
    let summary = classes
        .iter()
        .enumerate()
        .map(|(c, name)| ClassSummary {
            class: name.clone(),
            samples: labels.iter().filter(|&&l| l as usize == c).count(),
            issues: (0..labels.len())
                .filter(|&i| mask[i] && labels[i] as usize == c)
                .count(),
        })
        .collect();
    Ok((records, summary))
}

/// Settings of [`dataset_issues`].
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetIssueOptions {
    pub filter_by: FilterBy,
    /// Cross-validation folds (2 or more).
    pub folds: usize,
    /// Epochs of each fold's head.
    pub epochs: usize,
    pub seed: u64,
}

/// A labelled image dataset's issues: the per-sample report and the per-class summary.
#[derive(Debug, Clone)]
pub struct DatasetIssues {
    pub records: Vec<IssueRecord>,
    pub summary: Vec<ClassSummary>,
    /// How the embedding went (cache hits, corrupt cache records discarded, …).
    pub embed_stats: EmbedStats,
}

/// Confident learning on an image folder or manifest: embeds it with `embedder`, computes
/// K-fold out-of-sample probabilities of a linear head, and reports the label issues.
pub fn dataset_issues(
    dataset: &Path,
    embedder: &Embedder,
    opts: &DatasetIssueOptions,
    progress: &Progress,
) -> Result<DatasetIssues> {
    ensure!(
        opts.folds >= 2,
        "the number of folds {} must be 2 or more",
        opts.folds
    );
    ensure!(
        opts.folds <= MAX_FOLDS,
        "the number of folds {} is too large; {MAX_FOLDS} or less",
        opts.folds
    );
    ensure!(opts.epochs >= 1, "the number of epochs must be 1 or more");
    ensure!(
        opts.epochs <= MAX_EPOCHS,
        "the number of epochs {} is too large; {MAX_EPOCHS} or less",
        opts.epochs
    );
    let list = ImageList::from_path(dataset)?;
    ensure!(
        list.len() > opts.folds,
        "{} holds {} images; {} folds need more",
        dataset.display(),
        list.len(),
        opts.folds
    );
    let (set, embed_stats) = embedder.embed(&list, progress)?;
    let labels: Vec<u32> = set.targets.iter().map(|&t| t as u32).collect();
    let cfg = TrainConfig {
        epochs: opts.epochs,
        seed: opts.seed,
        ..Default::default()
    };
    let features = set.embeddings.to_device(embedder.device())?;
    let probs = kfold_pred_probs(
        &features,
        &labels,
        set.classes.len(),
        opts.folds,
        &cfg,
        progress,
    )?;
    let (records, summary) = dataset_report(
        &set.paths,
        &set.classes,
        &labels,
        &probs.probs,
        opts.filter_by,
    )?;
    Ok(DatasetIssues {
        records,
        summary,
        embed_stats,
    })
}

/// Where the per-class summary of a report goes: `REPORT.summary.json` beside it.
pub fn summary_path(report: &Path) -> std::path::PathBuf {
    report.with_extension("summary.json")
}

/// Writes the per-class summary as pretty JSON, atomically.
pub fn write_summary(path: &Path, summary: &[ClassSummary]) -> Result<()> {
    let text = serde_json::to_string_pretty(summary)
        .map_err(|e| write_error(path)(std::io::Error::other(e)))?
        + "\n";
    write_atomic(path, text.as_bytes()).map_err(write_error(path))
}

/// Writes `records` as JSON Lines, atomically.
pub fn write_jsonl(path: &Path, records: &[IssueRecord]) -> Result<()> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r)
            .map_err(|e| write_error(path)(std::io::Error::other(e)))?;
        out.push(b'\n');
    }
    write_atomic(path, &out).map_err(write_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_inputs_are_checked_and_flag_the_odd_one_out() {
        let dir = tempfile::tempdir().unwrap();
        let write_f64 = |name: &str, shape: &[usize], values: &[f64]| {
            let p = dir.path().join(name);
            npy::write_f64(&p, shape, values).unwrap();
            p
        };
        // Eight confident samples of two classes; sample 3 is labelled 0 but looks like 1.
        let mut probs = Vec::new();
        let labels = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        for i in 0..8 {
            let p1 = if i < 3 { 0.1 } else { 0.9 };
            probs.extend_from_slice(&[1.0 - p1, p1]);
        }
        let p = write_f64("p.npy", &[8, 2], &probs);
        let l = write_f64("l.npy", &[8], &labels);
        let mask = mask_from_npy(&p, &l, FilterBy::PredictedNeqGiven).unwrap();
        assert_eq!(
            mask,
            vec![false, false, false, true, false, false, false, false]
        );

        let short = write_f64("s.npy", &[7], &labels[..7]);
        let err = mask_from_npy(&p, &short, FilterBy::default()).unwrap_err();
        assert!(err.to_string().contains("expected [8]"), "{err}");
        let bad = write_f64("b.npy", &[8], &[0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]);
        let err = mask_from_npy(&p, &bad, FilterBy::default()).unwrap_err();
        assert!(err.to_string().contains("label 2 at index 3"), "{err}");
    }
}
