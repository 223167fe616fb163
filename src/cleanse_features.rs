//! The features the cleansing stage scores (`--cleanse-features`, `--cleanse-normalise`):
//! the pretrained backbone's (what the final head trains on), or those of a copy of the
//! backbone fine-tuned on the reuse buffer, and optionally every row scaled to one length.
//!
//! Yesterday's data is trusted and labelled right, so a backbone fine-tuned on it sees
//! today's images with in-domain features: the scoring heads that look for wrong labels then
//! separate the classes better than a probe on ImageNet features can. The final head still
//! trains on the pretrained features, so only the choice of what to cut changes.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::backbone::zoo::{self, Architecture};
use crate::backbone::{Backbone, Embedder};
use crate::cleanse::Method;
use crate::config::RunConfig;
use crate::distance::generic::unit_rows;
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

/// Stream of [`Rng::derive`] that draws the buffer's sample ([`tune_sample`]).
const SAMPLE_STREAM: u64 = 0x5A3B;

/// Which backbone's features the cleansing stage scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum CleanseFeatures {
    /// The best measured choice (README, "Cleansing quality"): for the Bayesian cut-off on a
    /// run with a reuse buffer and a convolutional backbone, tuned features with every row
    /// normalised; otherwise (no buffer, the baselines, the vision transformers) the
    /// pretrained ones.
    #[default]
    Auto,
    /// The pretrained backbone's, as cached (the final head's features).
    Pretrained,
    /// A copy of the backbone fine-tuned on the reuse buffer (yesterday's trusted training
    /// data, its own labels; at most `--cleanse-tune-max` images of it) for
    /// `--cleanse-tune-epochs` epochs (Tuesday runs).
    Tuned,
}

impl CleanseFeatures {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            CleanseFeatures::Auto => "auto",
            CleanseFeatures::Pretrained => "pretrained",
            CleanseFeatures::Tuned => "tuned",
        }
    }
}

/// What the cleansing stage of a run with `cfg` scores: whether on tuned features (only with
/// a reuse buffer) and whether its rows are normalised. `auto` tunes the convolutional
/// backbones only: the grids measured a CNN, and a vision transformer's fine-tuning costs
/// about ten times as much per image on the CPU.
pub fn resolve(cfg: &RunConfig, has_buffer: bool) -> (bool, bool) {
    let convolutional = || {
        zoo::find(&cfg.backbone).is_ok_and(|spec| {
            matches!(
                spec.architecture,
                Architecture::MobilenetV2
                    | Architecture::EfficientnetLite0
                    | Architecture::Resnet18
                    | Architecture::Resnet34
                    | Architecture::Resnet50
            )
        })
    };
    let tuned = has_buffer
        && match cfg.cleanse_features {
            CleanseFeatures::Auto => cfg.method == Method::Bccp && convolutional(),
            CleanseFeatures::Pretrained => false,
            CleanseFeatures::Tuned => true,
        };
    let normalise =
        cfg.cleanse_normalise || (tuned && cfg.cleanse_features == CleanseFeatures::Auto);
    (tuned, normalise)
}

/// The rows of a buffer of `len` images that the fine-tuning sees: all of them when `max` is 0
/// or not below `len`, else a sample of `max` drawn with `seed`, in ascending order.
pub fn tune_sample(len: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..len).collect();
    if max == 0 || max >= len {
        return rows;
    }
    Rng::derive(seed, SAMPLE_STREAM).shuffle(&mut rows);
    rows.truncate(max);
    rows.sort_unstable();
    rows
}

/// Every row of `x` `[N, D]` scaled to L2 norm [`NORMALISED_LENGTH`] (a zero row stays zero).
pub fn normalise_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let unit = unit_rows(&x.to_dtype(DType::F32)?)?;
    (unit * NORMALISED_LENGTH)?.to_dtype(x.dtype())
}

/// The features the cleansing stage scores for the training rows (`x_train`, from the images
/// `train_files`): `cfg`'s [`CleanseFeatures`] as [`resolve`]d (tuned on the reuse buffer
/// `buffer`: images and labels, empty when the run has none); for the methods that flag
/// samples (the others score nothing).
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
    let (tuned, normalise) = resolve(cfg, !buffer.0.is_empty());
    let x = if tuned {
        tuned_features(cfg, embedder, buffer, classes, train_files, progress)?
    } else {
        x_train.clone()
    };
    Ok(if normalise { normalise_rows(&x)? } else { x })
}

/// Fine-tunes a copy of `embedder`'s backbone (batch-norm frozen) and a head on the reuse
/// `buffer` (images, labels; a sample of `cleanse_tune_max` of them when it holds more) with
/// `cfg`'s training settings for `cleanse_tune_epochs` epochs, then embeds `files` with the
/// tuned backbone, `[files, D]` in their order.
fn tuned_features(
    cfg: &RunConfig,
    embedder: &Embedder,
    (buffer_files, buffer_labels): (&[PathBuf], &[u32]),
    classes: usize,
    files: &[PathBuf],
    progress: &Progress,
) -> Result<Tensor, FinetuneError> {
    let device = embedder.device();
    let (mut model, vars) =
        Backbone::load_trainable(embedder.spec(), embedder.weights(), device)
            .map_err(|e| FinetuneError::Input(format!("the buffer fine-tuning: {e}")))?;
    let run = cfg.train();
    let epochs = cfg.cleanse_tune_epochs;
    let tune = TrainConfig {
        epochs,
        // The run's warm-up, shortened to leave an epoch at the full rate.
        warmup_epochs: run.warmup_epochs.min(epochs.saturating_sub(1)),
        seed: Rng::derive(run.seed, TUNE_STREAM).next_u64(),
        ..run
    };
    let rows = tune_sample(buffer_files.len(), cfg.cleanse_tune_max, run.seed);
    let tune_files: Vec<PathBuf> = rows.iter().map(|&i| buffer_files[i].clone()).collect();
    let tune_labels: Vec<u32> = rows.iter().map(|&i| buffer_labels[i]).collect();
    let pre = embedder.preprocess();
    finetune(
        &model,
        vars,
        &tune_files,
        &tune_labels,
        classes,
        pre,
        &tune,
        cfg.backbone_lr,
        cfg.cache_images_mib,
        None,
        device,
        progress,
        None,
    )?;
    model.refresh_channels_last()?;
    embed_files(&model, files, pre, EMBED_BATCH, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_get_one_length_and_keep_their_direction() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0], [-1.0, 0.0]], &Device::Cpu).unwrap();
        let y = normalise_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, [[6.0, 8.0], [0.0, 0.0], [-10.0, 0.0]]);
    }

    #[test]
    fn auto_tunes_and_normalises_for_the_cut_off_with_a_buffer_only() {
        let cfg = |method, features, normalise| RunConfig {
            method,
            cleanse_features: features,
            cleanse_normalise: normalise,
            ..RunConfig::default()
        };
        use CleanseFeatures::*;
        assert_eq!(RunConfig::default().cleanse_features, Auto);
        assert_eq!(resolve(&cfg(Method::Bccp, Auto, false), true), (true, true));
        assert_eq!(
            resolve(&cfg(Method::Bccp, Auto, false), false),
            (false, false)
        );
        assert_eq!(
            resolve(&cfg(Method::Bccp, Auto, true), false),
            (false, true)
        );
        assert_eq!(
            resolve(&cfg(Method::Cleanlab, Auto, false), true),
            (false, false)
        );
        assert_eq!(
            resolve(&cfg(Method::Cleanlab, Tuned, false), true),
            (true, false)
        );
        assert_eq!(
            resolve(&cfg(Method::Bccp, Tuned, false), false),
            (false, false)
        );
        assert_eq!(
            resolve(&cfg(Method::Bccp, Pretrained, true), true),
            (false, true)
        );
        // The vision transformers keep their pretrained features unless asked.
        let vit = |features| RunConfig {
            backbone: "vit_base_patch16_224".into(),
            ..cfg(Method::Bccp, features, false)
        };
        assert_eq!(resolve(&vit(Auto), true), (false, false));
        assert_eq!(resolve(&vit(Tuned), true), (true, false));
        let resnet = RunConfig {
            backbone: "resnet18".into(),
            ..cfg(Method::Bccp, Auto, false)
        };
        assert_eq!(resolve(&resnet, true), (true, true));
    }

    #[test]
    fn the_buffer_sample_is_a_seeded_sorted_subset() {
        assert_eq!(tune_sample(5, 0, 1), [0, 1, 2, 3, 4]);
        assert_eq!(tune_sample(5, 5, 1), [0, 1, 2, 3, 4]);
        assert_eq!(tune_sample(5, 9, 1), [0, 1, 2, 3, 4]);
        let a = tune_sample(1000, 100, 7);
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[99] < 1000);
        assert_eq!(a, tune_sample(1000, 100, 7));
        assert_ne!(a, tune_sample(1000, 100, 8));
        // Not the buffer's first rows: the sample spreads over it.
        assert!(a[99] > 500, "{a:?}");
    }

    #[test]
    fn names_round_trip() {
        for f in [
            CleanseFeatures::Auto,
            CleanseFeatures::Pretrained,
            CleanseFeatures::Tuned,
        ] {
            assert_eq!(CleanseFeatures::from_str(f.name(), false).unwrap(), f);
        }
    }
}
