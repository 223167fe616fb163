//! What a registered run holds, as types: its settings ([`RunConfig`]), where its inputs came
//! from ([`Provenance`]), its figures ([`RunMetrics`]), its class names and its data split.
//! The JSON files of a run folder are exactly these types serialised; metric names are spelled
//! here and nowhere else ([`metric`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;

/// Names of the scalar metrics, as they appear in `metrics.json` and in experiment tables.
pub mod metric {
    pub const TEST_ACCURACY: &str = "test_accuracy";
    pub const TEST_ACCURACY_MONDAY: &str = "test_accuracy_monday";
    pub const TEST_ACCURACY_TUESDAY: &str = "test_accuracy_tuesday";
    pub const TRAIN_SIZE: &str = "train_size";
    pub const REMOVED_BY_CUTOFF: &str = "removed_by_cutoff";
    pub const RELABELLED_BY_CUTOFF: &str = "relabelled_by_cutoff";
    pub const REPLAYED: &str = "replayed";
    pub const NOISY_LABELS: &str = "noisy_labels";
    pub const NOISE_PRECISION: &str = "noise_precision";
    pub const NOISE_RECALL: &str = "noise_recall";
    pub const NOISE_F1: &str = "noise_f1";
    pub const NOISE_SCORE_AUC: &str = "noise_score_auc";
    pub const VERIFIED: &str = "verified";
    pub const CORRECTED_BY_REVIEW: &str = "corrected_by_review";
    /// Every scalar metric, in the order `bccp train` prints them.
    pub const ALL: [&str; 14] = [
        TEST_ACCURACY,
        TEST_ACCURACY_MONDAY,
        TEST_ACCURACY_TUESDAY,
        TRAIN_SIZE,
        REPLAYED,
        REMOVED_BY_CUTOFF,
        RELABELLED_BY_CUTOFF,
        NOISY_LABELS,
        NOISE_PRECISION,
        NOISE_RECALL,
        NOISE_F1,
        NOISE_SCORE_AUC,
        VERIFIED,
        CORRECTED_BY_REVIEW,
    ];
}

/// Wall-clock seconds of each stage of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSeconds {
    /// Splitting and embedding (possibly shared with other runs of an experiment).
    pub embed: f64,
    pub sample: f64,
    pub cleanse: f64,
    pub train: f64,
    pub evaluate: f64,
    /// Everything, the embedding stage included.
    pub total: f64,
}

/// The figures of a run (`metrics.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMetrics {
    /// On Monday's test split, plus Tuesday's for a Tuesday run.
    pub test_accuracy: f64,
    pub test_accuracy_monday: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy_tuesday: Option<f64>,
    /// Per true class (`null` for a class absent from the test set).
    pub per_class_accuracy: Vec<Option<f64>>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// Samples the final head trained on.
    pub train_size: usize,
    pub removed_by_cutoff: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relabelled_by_cutoff: Option<usize>,
    /// Monday images replayed into Tuesday training.
    pub replayed: usize,
    /// Training labels that differ from the truth.
    pub noisy_labels: usize,
    /// How well the flagged samples match the truly noisy ones (methods that flag samples,
    /// on data with wrong labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_recall: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_f1: Option<f64>,
    /// ROC AUC of the method's per-sample score against the truly noisy labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_score_auc: Option<f64>,
    /// Candidates whose label the simulated review verified (`verify_budget`), and how many of
    /// those labels it corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrected_by_review: Option<usize>,
    pub seconds: StageSeconds,
    /// The final head's training, epoch by epoch (empty when not recorded: full fine-tuning,
    /// runs of older bccp versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<crate::train::EpochStats>,
}

impl RunMetrics {
    /// The scalar metric `name` (one of [`metric::ALL`]), when the run has it.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        match name {
            metric::TEST_ACCURACY => Some(self.test_accuracy),
            metric::TEST_ACCURACY_MONDAY => Some(self.test_accuracy_monday),
            metric::TEST_ACCURACY_TUESDAY => self.test_accuracy_tuesday,
            metric::TRAIN_SIZE => Some(self.train_size as f64),
            metric::REMOVED_BY_CUTOFF => Some(self.removed_by_cutoff as f64),
            metric::RELABELLED_BY_CUTOFF => self.relabelled_by_cutoff.map(|n| n as f64),
            metric::REPLAYED => Some(self.replayed as f64),
            metric::NOISY_LABELS => Some(self.noisy_labels as f64),
            metric::NOISE_PRECISION => self.noise_precision,
            metric::NOISE_RECALL => self.noise_recall,
            metric::NOISE_F1 => self.noise_f1,
            metric::NOISE_SCORE_AUC => self.noise_score_auc,
            metric::VERIFIED => self.verified.map(|n| n as f64),
            metric::CORRECTED_BY_REVIEW => self.corrected_by_review.map(|n| n as f64),
            _ => None,
        }
    }

    /// True for the metrics that count samples (printed without decimals).
    pub fn is_count(name: &str) -> bool {
        matches!(
            name,
            metric::TRAIN_SIZE
                | metric::REMOVED_BY_CUTOFF
                | metric::RELABELLED_BY_CUTOFF
                | metric::REPLAYED
                | metric::NOISY_LABELS
                | metric::VERIFIED
                | metric::CORRECTED_BY_REVIEW
        )
    }
}

/// Where a run's inputs came from (`provenance.json`): enough to check, later, that a
/// prediction uses the same backbone weights and to trace the data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The bccp version that wrote the run.
    pub bccp_version: String,
    /// The backbone weights file the run used.
    pub weights: String,
    pub weights_sha256: String,
    /// The input size the images were resized to.
    pub image_size: u32,
    pub monday_manifest_sha256: String,
    pub tuesday_manifest_sha256: Option<String>,
    /// SHA-256 of `model.safetensors`, checked when the run is loaded.
    pub model_sha256: String,
}

/// The manifest ids of each split of a run (`split.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub monday_train: Vec<u64>,
    pub monday_test: Vec<u64>,
    pub tuesday_train: Vec<u64>,
    pub tuesday_test: Vec<u64>,
    /// For a run of the self-cleansing loop: the data-store samples its head was trained on,
    /// after cleansing, with the labels used (the next cycle's reuse buffer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trained_on: Vec<TrainedSample>,
}

/// One sample a loop run was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedSample {
    /// Its id in the data store.
    pub id: i64,
    pub image_path: String,
    /// The label trained with (as given, or as the cut-off relabelled it).
    pub label: u32,
}

/// Everything a run folder holds besides its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub params: RunConfig,
    pub provenance: Provenance,
    pub metrics: RunMetrics,
    /// Class names; the head's output k is `labels[k]`.
    pub labels: Vec<String>,
    pub split: Split,
}

/// The files of a run folder.
pub mod files {
    pub const PARAMS: &str = "params.json";
    pub const PROVENANCE: &str = "provenance.json";
    pub const METRICS: &str = "metrics.json";
    pub const LABELS: &str = "labels.json";
    pub const SPLIT: &str = "split.json";
    pub const MODEL: &str = "model.safetensors";
    /// Every file a complete run folder holds.
    pub const ALL: [&str; 6] = [PARAMS, PROVENANCE, METRICS, LABELS, SPLIT, MODEL];
}

impl RunRecord {
    /// The JSON documents of the record, by file name.
    pub(crate) fn documents(&self) -> serde_json::Result<BTreeMap<&'static str, String>> {
        let pretty = |v: serde_json::Result<String>| v.map(|t| t + "\n");
        Ok(BTreeMap::from([
            (
                files::PARAMS,
                pretty(serde_json::to_string_pretty(&self.params))?,
            ),
            (
                files::PROVENANCE,
                pretty(serde_json::to_string_pretty(&self.provenance))?,
            ),
            (
                files::METRICS,
                pretty(serde_json::to_string_pretty(&self.metrics))?,
            ),
            (
                files::LABELS,
                pretty(serde_json::to_string_pretty(&self.labels))?,
            ),
            (
                files::SPLIT,
                pretty(serde_json::to_string_pretty(&self.split))?,
            ),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scalar_is_named_once_and_serialised_under_its_name() {
        let m = RunMetrics {
            test_accuracy: 0.5,
            test_accuracy_monday: 0.25,
            test_accuracy_tuesday: Some(0.75),
            per_class_accuracy: vec![Some(1.0), None],
            confusion: vec![vec![1, 0], vec![0, 0]],
            train_size: 7,
            removed_by_cutoff: 2,
            relabelled_by_cutoff: Some(1),
            replayed: 3,
            noisy_labels: 4,
            noise_precision: Some(0.1),
            noise_recall: Some(0.2),
            noise_f1: Some(0.3),
            noise_score_auc: Some(0.4),
            verified: Some(5),
            corrected_by_review: Some(6),
            seconds: StageSeconds::default(),
            epochs: vec![crate::train::EpochStats {
                epoch: 1,
                loss: 0.5,
                train_accuracy: 0.75,
                test_accuracy: None,
            }],
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json["epochs"],
            serde_json::json!([{"epoch": 1, "loss": 0.5, "train_accuracy": 0.75}])
        );
        for name in metric::ALL {
            assert_eq!(json[name].as_f64(), m.scalar(name), "{name}");
        }
        let back: RunMetrics = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        // Optional figures are left out, not written as null.
        let bare = RunMetrics::default();
        let json = serde_json::to_value(&bare).unwrap();
        for name in [metric::TEST_ACCURACY_TUESDAY, metric::NOISE_F1, "epochs"] {
            assert!(json.get(name).is_none(), "{name}");
        }
        assert_eq!(serde_json::from_value::<RunMetrics>(json).unwrap(), bare);
    }
}
