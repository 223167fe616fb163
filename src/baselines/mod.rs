//! Baselines the Bayesian cut-off is compared against: confident learning (Northcutt et al.,
//! a bit-exact port of cleanlab's `find_label_issues`) on out-of-sample predicted
//! probabilities from K-fold cross-validation of the linear head on cached features.

pub mod confident;
pub mod kfold;
pub mod numpy_compat;

pub use confident::{
    calibrate_confident_joint, compute_confident_joint, confident_thresholds, find_label_issues,
    numpy_argsort, prune_count_matrix, round_preserving_sum, self_confidence, suggested_labels,
    ConfidentError, ConfidentJoint, FilterBy, Prob,
};
pub use kfold::{
    assign_folds, cross_fit, fold_holdout_indices, fold_train_indices, kfold_pred_probs,
    KFoldProbs, DEFAULT_FOLDS,
};
