//! `--finetune full`: back-propagation through the backbone and a fresh head together, the
//! images decoded again every epoch. The batch-norm statistics stay frozen (they are folded
//! into the convolutions, whose weights and biases are trained), which suits small batches.

use std::path::PathBuf;

use candle_core::{Device, Module, Tensor, Var};
use candle_nn::Optimizer;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::{adam, dropout_mask, init_head, Head, TrainConfig};
use crate::backbone::Backbone;
use crate::data::loader::{load_batch, Preprocess};
use crate::progress::Progress;
use crate::rng::Rng;

/// Why fine-tuning could not run.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, FinetuneError>;

/// What training updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Finetune {
    /// A linear head on cached frozen features (the default).
    #[default]
    Head,
    /// The backbone and the head, by back-propagation through the backbone.
    Full,
}

impl Finetune {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Finetune::Head => "head",
            Finetune::Full => "full",
        }
    }
}

/// Fine-tunes `backbone` (its trainable `backbone_vars`, from [`Backbone::load_trainable`]) and
/// trains a fresh head on the images `files` with `labels`. The head learns at `cfg.lr`, the
/// backbone at `backbone_lr`; both decay by `cfg.lr_decay` per epoch. `progress` advances once
/// per batch.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    backbone: &Backbone,
    backbone_vars: Vec<Var>,
    files: &[PathBuf],
    labels: &[u32],
    classes: usize,
    pre: &Preprocess,
    cfg: &TrainConfig,
    backbone_lr: f64,
    device: &Device,
    progress: &Progress,
) -> Result<Head> {
    if files.len() != labels.len() {
        return Err(FinetuneError::Input(format!(
            "{} labels for {} training images",
            labels.len(),
            files.len()
        )));
    }
    if files.is_empty() {
        return Err(FinetuneError::Input("no training images".into()));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(FinetuneError::Input(format!(
            "label {bad} is not below the number of classes {classes}"
        )));
    }
    let dim = backbone.spec().embedding_dim;
    let mut backbone_opt = adam(backbone_vars, backbone_lr)?;
    let (head_vars, linear) = init_head(classes, dim, cfg.seed, device)?;
    let mut head_opt = adam(head_vars, cfg.lr)?;
    let targets = Tensor::new(labels, device)?;
    let mut order: Vec<u32> = (0..files.len() as u32).collect();
    let mut shuffle_rng = Rng::derive(cfg.seed, 0x5EED);
    let mut dropout_rng = Rng::derive(cfg.seed, 0xD0);
    let batch = cfg.batch_size.max(1);
    let (mut lr, mut bb_lr) = (cfg.lr, backbone_lr);
    progress.start(
        (cfg.epochs * files.len().div_ceil(batch)) as u64,
        "fine-tune batches",
    );
    for _ in 0..cfg.epochs {
        shuffle_rng.shuffle(&mut order);
        for chunk in order.chunks(batch) {
            let paths: Vec<PathBuf> = chunk.iter().map(|&i| files[i as usize].clone()).collect();
            let images = load_batch(&paths, 0, pre, false)?.to_tensor(pre, device)?;
            let mut x = backbone.embed(&images)?;
            if cfg.dropout > 0.0 {
                let mask = dropout_mask(&mut dropout_rng, chunk.len(), dim, cfg.dropout, device)?;
                x = x.mul(&mask)?;
            }
            let y = targets.index_select(&Tensor::new(chunk, device)?, 0)?;
            let loss = cfg.loss.compute(&linear.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            head_opt.step(&grads)?;
            backbone_opt.step(&grads)?;
            progress.inc(1);
        }
        lr *= cfg.lr_decay;
        bb_lr *= cfg.lr_decay;
        head_opt.set_learning_rate(lr);
        backbone_opt.set_learning_rate(bb_lr);
    }
    progress.finish();
    Ok(Head { linear, classes })
}

/// Embeddings `[N, D]` of `files` by `backbone`, in batches, without the cache (for a
/// fine-tuned backbone, whose embeddings belong to one run).
pub fn embed_files(
    backbone: &Backbone,
    files: &[PathBuf],
    pre: &Preprocess,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(files.len().div_ceil(batch.max(1)));
    for chunk in files.chunks(batch.max(1)) {
        let images = load_batch(chunk, 0, pre, false)?.to_tensor(pre, device)?;
        parts.push(backbone.embed(&images)?.detach());
    }
    if parts.is_empty() {
        return Err(FinetuneError::Input("no images to embed".into()));
    }
    Ok(Tensor::cat(&parts, 0)?)
}
