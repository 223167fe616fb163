//! The features the cleansing stage scores (`--cleanse-features`, `--cleanse-normalise`):
//! the pretrained backbone's (what the final head trains on), or those of a copy of the
//! backbone fine-tuned on the reuse buffer, and optionally every row scaled to one length.
//!
//! Yesterday's data is trusted and labelled right, so a backbone fine-tuned on it sees
//! today's images with in-domain features: the scoring heads that look for wrong labels then
//! separate the classes better than a probe on ImageNet features can. The final head still
//! trains on the pretrained features, so only the choice of what to cut changes.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::backbone::zoo::BackboneSpec;
use crate::backbone::{Backbone, Embedder};
use crate::cleanse::Method;
use crate::config::RunConfig;
use crate::data::loader::Preprocess;
use crate::progress::Progress;
use crate::rng::Rng;
use crate::train::finetune::{embed_files, finetune, FinetuneError};
use crate::train::TrainConfig;

/// The L2 norm every row has after [`normalise_rows`]: the scale at which the scoring heads'
/// learning rate (1e-3, 15 epochs) fits them (norms of 5–10 measured best on Fashion-MNIST,
/// against MobileNetV2's raw 30 on average).
pub const NORMALISED_LENGTH: f64 = 10.0;

/// Images embedded per batch by the tuned backbone.
const EMBED_BATCH: usize = 64;

/// Stream of [`Rng::derive`] that seeds the buffer fine-tuning.
const TUNE_STREAM: u64 = 0x7E4E;

/// Which backbone's features the cleansing stage scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum CleanseFeatures {
    /// The pretrained backbone's, as cached (the final head's features).
    #[default]
    Pretrained,
    /// A copy of the backbone fine-tuned on the whole reuse buffer (yesterday's trusted
    /// training data, its own labels) for `--cleanse-tune-epochs` epochs (Tuesday runs).
    Tuned,
}

impl CleanseFeatures {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            CleanseFeatures::Pretrained => "pretrained",
            CleanseFeatures::Tuned => "tuned",
        }
    }
}

/// Every row of `x` `[N, D]` scaled to L2 norm [`NORMALISED_LENGTH`] (a zero row stays zero).
pub fn normalise_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let norms = x32.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let scale = (norms.clamp(1e-12, f64::MAX)?.recip()? * NORMALISED_LENGTH)?;
    x32.broadcast_mul(&scale)?.to_dtype(x.dtype())
}

/// The features the cleansing stage scores for the training rows (`x_train`, from the images
/// `train_files`): `cfg`'s [`CleanseFeatures`] (tuned on the reuse buffer `buffer`: images
/// and labels; with an empty buffer, the pretrained ones), normalised with
/// `cleanse_normalise`; for the methods that flag samples (the others score nothing).
pub fn for_cleansing(
    cfg: &RunConfig,
    x_train: &Tensor,
    train_files: &[PathBuf],
    buffer: (&[PathBuf], &[u32]),
    embedder: &Embedder,
    classes: usize,
    progress: &Progress,
) -> Result<Tensor, FinetuneError> {
    if !matches!(cfg.method, Method::Bccp | Method::Cleanlab) {
        return Ok(x_train.clone());
    }
    let x = match cfg.cleanse_features {
        CleanseFeatures::Tuned if !buffer.0.is_empty() => {
            let inputs = TuneInputs {
                spec: embedder.spec(),
                weights: embedder.weights(),
                pre: embedder.preprocess(),
                buffer_files: buffer.0,
                buffer_labels: buffer.1,
                classes,
                train: &cfg.train(),
                epochs: cfg.cleanse_tune_epochs,
                backbone_lr: cfg.backbone_lr,
                cache_images_mib: cfg.cache_images_mib,
                device: x_train.device(),
            };
            tuned_features(&inputs, train_files, progress)?
        }
        _ => x_train.clone(),
    };
    Ok(if cfg.cleanse_normalise {
        normalise_rows(&x)?
    } else {
        x
    })
}

/// What the buffer fine-tuning trains on and with.
pub struct TuneInputs<'a> {
    /// The backbone and its weights file (the run's pretrained backbone).
    pub spec: &'a BackboneSpec,
    pub weights: &'a std::path::Path,
    pub pre: &'a Preprocess,
    /// The reuse buffer's images and labels.
    pub buffer_files: &'a [PathBuf],
    pub buffer_labels: &'a [u32],
    pub classes: usize,
    /// The run's training settings; epochs and seed are replaced, the warm-up shortened.
    pub train: &'a TrainConfig,
    pub epochs: usize,
    pub backbone_lr: f64,
    pub cache_images_mib: usize,
    pub device: &'a Device,
}

/// Fine-tunes a copy of the backbone (batch-norm frozen) and a head on the reuse buffer, then
/// embeds `files` with the tuned backbone, `[files, D]` in their order.
pub fn tuned_features(
    t: &TuneInputs<'_>,
    files: &[PathBuf],
    progress: &Progress,
) -> Result<Tensor, FinetuneError> {
    let (mut model, vars) = Backbone::load_trainable(t.spec, t.weights, t.device)
        .map_err(|e| FinetuneError::Input(format!("the buffer fine-tuning: {e}")))?;
    let cfg = TrainConfig {
        epochs: t.epochs,
        // The run's warm-up, shortened to leave an epoch at the full rate.
        warmup_epochs: t.train.warmup_epochs.min(t.epochs.saturating_sub(1)),
        seed: Rng::derive(t.train.seed, TUNE_STREAM).next_u64(),
        ..t.train.clone()
    };
    finetune(
        &model,
        vars,
        t.buffer_files,
        t.buffer_labels,
        t.classes,
        t.pre,
        &cfg,
        t.backbone_lr,
        t.cache_images_mib,
        None,
        t.device,
        progress,
        None,
    )?;
    model.refresh_channels_last()?;
    embed_files(&model, files, t.pre, EMBED_BATCH, t.device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_get_one_length_and_keep_their_direction() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0], [-1.0, 0.0]], &Device::Cpu).unwrap();
        let y = normalise_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, [[6.0, 8.0], [0.0, 0.0], [-10.0, 0.0]]);
    }

    #[test]
    fn names_round_trip() {
        for f in [CleanseFeatures::Pretrained, CleanseFeatures::Tuned] {
            assert_eq!(CleanseFeatures::from_str(f.name(), false).unwrap(), f);
        }
    }
}
