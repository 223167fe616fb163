//! `--finetune full`: back-propagation through the backbone and a fresh head together — on
//! the channels-last engine on the CPU for MobileNetV2 / EfficientNet-Lite, through candle's
//! autograd elsewhere — the decoded images kept in memory across epochs within a bound. The
//! batch-norm statistics stay frozen (they are folded into the convolutions, whose weights
//! and biases are trained), which suits small batches. Every epoch is recorded
//! ([`EpochStats`]): its mean loss, the training accuracy of its own forward passes and, with
//! test images, the test accuracy after the epoch.

use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Linear;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::adam::{Adam, AdamState};
use super::checkpoint::Checkpointing;
use super::epoch_loop::{copies, restore_vars, EpochLoop, Rest};
use super::flat_adam::FlatAdam;
use super::{accuracy, dropout_mask, init_head, EpochStats, Head, TrainConfig};
use crate::backbone::channels_last::EngineTrainer;
use crate::backbone::Backbone;
use crate::data::loader::{load_batch, Preprocess};
use crate::progress::Progress;

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

/// Default bound of the decoded-image cache of [`finetune`], in MiB.
pub const DEFAULT_CACHE_IMAGES_MIB: usize = 2048;

/// The training images, decoded and preprocessed: all kept in memory across epochs when they
/// fit a bound, else decoded again for every batch.
pub struct TrainImages<'a> {
    files: &'a [PathBuf],
    count: usize,
    pre: &'a Preprocess,
    cached: Option<Vec<f32>>,
}

impl<'a> TrainImages<'a> {
    /// Decodes every image of `files` now when their preprocessed pixels take at most
    /// `bound_mib` MiB (f32), else leaves decoding to each batch.
    pub fn new(files: &'a [PathBuf], pre: &'a Preprocess, bound_mib: usize) -> Result<Self> {
        let bytes = files.len().saturating_mul(pre.len()).saturating_mul(4);
        let cached = if bytes <= bound_mib.saturating_mul(1 << 20) {
            let mut all = Vec::with_capacity(files.len() * pre.len());
            for part in files.chunks(256) {
                all.extend_from_slice(&load_batch(part, 0, pre, false)?.pixels);
            }
            Some(all)
        } else {
            None
        };
        Ok(Self {
            files,
            count: files.len(),
            pre,
            cached,
        })
    }

    /// Images already decoded and preprocessed by `pre`: `pixels` is `[N, 3, H, W]` flattened.
    pub fn from_pixels(pixels: Vec<f32>, pre: &'a Preprocess) -> Result<Self> {
        if pre.is_empty() || !pixels.len().is_multiple_of(pre.len()) {
            return Err(FinetuneError::Input(format!(
                "{} pixel values are not a whole number of {}×{} images",
                pixels.len(),
                pre.width,
                pre.height
            )));
        }
        Ok(Self {
            files: &[],
            count: pixels.len() / pre.len(),
            pre,
            cached: Some(pixels),
        })
    }

    /// Whether every image is held in memory.
    pub fn is_cached(&self) -> bool {
        self.cached.is_some()
    }

    /// The pixels of images `idx`, `[idx.len(), 3, H, W]` flattened.
    pub fn batch(&self, idx: &[u32]) -> Result<Vec<f32>> {
        match &self.cached {
            Some(all) => {
                let len = self.pre.len();
                let mut out = Vec::with_capacity(idx.len() * len);
                for &i in idx {
                    out.extend_from_slice(&all[i as usize * len..][..len]);
                }
                Ok(out)
            }
            None => {
                let paths: Vec<PathBuf> = idx
                    .iter()
                    .map(|&i| self.files[i as usize].clone())
                    .collect();
                Ok(load_batch(&paths, 0, self.pre, false)?.pixels)
            }
        }
    }

    fn tensor(&self, idx: &[u32], device: &Device) -> Result<Tensor> {
        let (h, w) = (self.pre.height as usize, self.pre.width as usize);
        let x = Tensor::from_vec(self.batch(idx)?, (idx.len(), 3, h, w), &Device::Cpu)?;
        Ok(x.to_device(device)?)
    }
}

/// Test images scored after every epoch of [`finetune`] with the weights of that moment: their
/// pixels (decoded as the final evaluation decodes them) and their true labels.
#[derive(Clone, Copy)]
pub struct TestImages<'a> {
    pub images: &'a TrainImages<'a>,
    pub labels: &'a [u32],
}

/// One epoch's running figures: the loss summed over samples and the samples whose own
/// forward pass (before their step) predicted their label.
#[derive(Default)]
struct EpochTally {
    loss_sum: f64,
    hits: usize,
    samples: usize,
}

impl EpochTally {
    /// Adds one batch: its mean `loss` and its `logits` against the labels `y`.
    fn add(&mut self, loss: &Tensor, logits: &Tensor, y: &Tensor) -> Result<()> {
        let n = y.dim(0)?;
        self.loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        let truth = y.to_vec1::<u32>()?;
        self.hits += pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
        self.samples += n;
        Ok(())
    }

    /// The epoch's record; the test accuracy from `embed` (features of test image indices)
    /// when there are test images.
    fn finish(
        self,
        epoch: usize,
        linear: &Linear,
        classes: usize,
        test: Option<TestImages<'_>>,
        batch: usize,
        mut embed: impl FnMut(&TrainImages, &[u32]) -> Result<Tensor>,
    ) -> Result<EpochStats> {
        let test_accuracy = match test {
            None => None,
            Some(t) => {
                let head = Head {
                    linear: linear.clone(),
                    classes,
                };
                let all: Vec<u32> = (0..t.labels.len() as u32).collect();
                let mut pred = Vec::with_capacity(all.len());
                for chunk in all.chunks(batch.max(1)) {
                    pred.extend(head.predict(&embed(t.images, chunk)?)?);
                }
                Some(accuracy(&pred, t.labels))
            }
        };
        Ok(EpochStats {
            epoch,
            loss: self.loss_sum / self.samples.max(1) as f64,
            train_accuracy: self.hits as f64 / self.samples.max(1) as f64,
            test_accuracy,
        })
    }
}

/// Adds the gradients of `vars` in `grads` into `acc` (gradient accumulation).
fn add_grads(acc: &mut GradStore, grads: &GradStore, vars: &[Var]) -> Result<()> {
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let sum = match acc.remove(var.as_tensor()) {
                Some(prev) => prev.add(g)?,
                None => g.clone(),
            };
            acc.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The loss whose gradient a micro-batch of `n` samples adds to a step over `group` samples:
/// the batch's mean `loss` weighted by its share, so that the accumulated gradient is that of
/// the mean over the whole group (the loss itself when the batch is the group).
fn share_of(loss: &Tensor, n: usize, group: usize) -> Result<Tensor> {
    Ok(match n == group {
        true => loss.clone(),
        false => (loss * (n as f64 / group as f64))?,
    })
}

/// The backbone optimiser's state of a fine-tuning checkpoint's [`Rest`].
fn backbone_state(rest: &Rest) -> Result<&AdamState> {
    match rest.optimisers.as_slice() {
        [b] => Ok(b),
        other => Err(FinetuneError::Input(format!(
            "checkpoint: {} optimisers for fine-tuning (the head's and the backbone's)",
            other.len() + 1
        ))),
    }
}

/// As many test labels as test images.
fn check_test(test: Option<TestImages<'_>>) -> Result<()> {
    match test {
        Some(t) if t.images.count != t.labels.len() => Err(FinetuneError::Input(format!(
            "{} test labels for {} test images",
            t.labels.len(),
            t.images.count
        ))),
        _ => Ok(()),
    }
}

fn check_inputs(images: usize, labels: &[u32], classes: usize) -> Result<()> {
    if images != labels.len() {
        return Err(FinetuneError::Input(format!(
            "{} labels for {} training images",
            labels.len(),
            images
        )));
    }
    if images == 0 {
        return Err(FinetuneError::Input("no training images".into()));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(FinetuneError::Input(format!(
            "label {bad} is not below the number of classes {classes}"
        )));
    }
    Ok(())
}

/// How many leading trainable variables `--freeze-blocks blocks` keeps frozen, given the
/// variables of each of `name`'s blocks; an error naming the flag, the backbone and its block
/// count when it has fewer blocks.
pub fn frozen_vars(name: &str, blocks: usize, counts: &[usize]) -> Result<usize> {
    if blocks > counts.len() {
        return Err(FinetuneError::Input(format!(
            "--freeze-blocks {blocks} is more than {name}'s {} blocks; 0 to {} (0 trains every block)",
            counts.len(),
            counts.len()
        )));
    }
    Ok(counts[..blocks].iter().sum())
}

/// Fine-tunes `backbone` (its trainable `backbone_vars`, from [`Backbone::load_trainable`]) and
/// trains a fresh head on the images `files` with `labels`. The head learns at `cfg.lr`, the
/// backbone at `backbone_lr`; both follow `cfg`'s learning-rate [`super::Schedule`]. Decoded images stay in
/// memory when they fit `cache_mib` MiB. On the CPU, the CNNs (MobileNetV2, EfficientNet-Lite,
/// the ResNets) train on the channels-last engine ([`EngineTrainer`]) and the trained weights are written back into
/// `backbone_vars`; elsewhere through candle's autograd ([`finetune_candle`]). Returns the head
/// and every epoch's figures: mean loss, training accuracy of the epoch's own forward passes
/// (dropout applied, each batch before its step: no second pass over the training images)
/// and, with `test` (image files and true labels, kept decoded under a bound of the same size),
/// the accuracy on them after the epoch. `progress` advances once per batch. With
/// `checkpointing`, a checkpoint is saved after every epoch, and training continues from its
/// start state when it has one.
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
    cache_mib: usize,
    test: Option<(&[PathBuf], &[u32])>,
    device: &Device,
    progress: &Progress,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(Head, Vec<EpochStats>)> {
    check_inputs(files.len(), labels, classes)?;
    frozen_vars(
        &backbone.spec().name,
        cfg.freeze_blocks,
        &backbone.block_var_counts(),
    )?;
    let images = TrainImages::new(files, pre, cache_mib)?;
    let test_images = match test {
        Some((files, _)) => Some(TrainImages::new(files, pre, cache_mib)?),
        None => None,
    };
    let test = match (&test_images, test) {
        (Some(images), Some((_, labels))) => Some(TestImages { images, labels }),
        _ => None,
    };
    let engine = match device.is_cpu() && !backbone.trains_batch_norm() {
        true => EngineTrainer::for_backbone(backbone)?,
        false => None,
    };
    // On candle's autograd the products run in the backbone's own precision (the
    // transformers' linear layers, `Backbone::set_precision`), which must be the one asked for.
    if engine.is_none() && cfg.precision != backbone.precision() {
        let why = if !device.is_cpu() {
            "on a GPU, in the backbone's precision"
        } else if backbone.trains_batch_norm() {
            "--bn train"
        } else {
            "its products were not set to it"
        };
        return Err(FinetuneError::Input(format!(
            "--precision {} runs on the channels-last engine (the CNNs on the CPU, --bn frozen), in the transformers' linear layers on the CPU, and on CUDA GPUs once the backbone is set to it; {} trains here on candle's autograd ({why}), in {}: use --precision {}",
            cfg.precision.name(),
            backbone.spec().name,
            backbone.precision().name(),
            backbone.precision().name()
        )));
    }
    match engine {
        Some(mut trainer) => {
            trainer.set_precision(cfg.precision)?;
            finetune_channels_last(
                trainer,
                &backbone_vars,
                &images,
                labels,
                classes,
                cfg,
                backbone_lr,
                test,
                progress,
                checkpointing,
            )
        }
        None => finetune_candle(
            backbone,
            backbone_vars,
            &images,
            labels,
            classes,
            cfg,
            backbone_lr,
            test,
            device,
            progress,
            checkpointing,
        ),
    }
}

/// [`finetune`] through candle's autograd on `backbone`'s candle ops (any device, any
/// trainable backbone). The variables of the first `cfg.freeze_blocks` blocks are left out of
/// the optimiser: they keep their values.
#[allow(clippy::too_many_arguments)]
pub fn finetune_candle(
    backbone: &Backbone,
    backbone_vars: Vec<Var>,
    images: &TrainImages,
    labels: &[u32],
    classes: usize,
    cfg: &TrainConfig,
    backbone_lr: f64,
    test: Option<TestImages<'_>>,
    device: &Device,
    progress: &Progress,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(Head, Vec<EpochStats>)> {
    check_inputs(images.count, labels, classes)?;
    check_test(test)?;
    let dim = backbone.spec().embedding_dim;
    let mut backbone_vars = backbone_vars;
    let frozen = frozen_vars(
        &backbone.spec().name,
        cfg.freeze_blocks,
        &backbone.block_var_counts(),
    )?;
    if frozen > backbone_vars.len() {
        return Err(FinetuneError::Input(format!(
            "{} trainable variables for {frozen} frozen ones",
            backbone_vars.len()
        )));
    }
    let trained = backbone_vars.split_off(frozen);
    backbone.hold_batch_norms(cfg.freeze_blocks);
    let mut backbone_opt = Adam::new(trained.clone(), backbone_lr)?;
    let (head_vars, linear) = init_head(classes, dim, cfg.seed, device)?;
    let mut head_opt = Adam::new(head_vars.clone(), cfg.lr)?;
    let all_vars: Vec<Var> = head_vars.iter().chain(&trained).cloned().collect();
    let targets = Tensor::new(labels, device)?;
    let (mut lp, rest) = EpochLoop::start(
        labels.len(),
        cfg.seed,
        &head_vars,
        &mut head_opt,
        checkpointing,
    )?;
    if let Some(r) = rest {
        // The trained variables, then (`--bn train`) the batch-norms' running statistics.
        let (saved, running) = r.backbone.split_at(trained.len().min(r.backbone.len()));
        restore_vars(&trained, saved, "backbone")?;
        backbone.set_running_stats(running)?;
        backbone_opt.restore(backbone_state(&r)?)?;
    }
    let batch = cfg.batch_size.max(1);
    let accumulate = cfg.accumulate.max(1);
    let schedule = cfg.schedule();
    let batches = labels.len().div_ceil(batch);
    progress.start((cfg.epochs * batches) as u64, "fine-tune batches");
    progress.inc(((lp.first - 1) * batches) as u64);
    for epoch in lp.first..=cfg.epochs {
        head_opt.set_learning_rate(schedule.lr(cfg.lr, epoch - 1));
        backbone_opt.set_learning_rate(schedule.lr(backbone_lr, epoch - 1));
        lp.shuffle_rng.shuffle(&mut lp.order);
        let mut tally = EpochTally::default();
        for group in lp.order.chunks(batch.saturating_mul(accumulate)) {
            let mut step = GradStore::default();
            for chunk in group.chunks(batch) {
                let images = images.tensor(chunk, device)?;
                backbone.set_training(true);
                let embedded = backbone.embed(&images);
                backbone.set_training(false);
                let mut x = embedded?;
                if cfg.dropout > 0.0 {
                    let mask =
                        dropout_mask(&mut lp.dropout_rng, chunk.len(), dim, cfg.dropout, device)?;
                    x = x.mul(&mask)?;
                }
                let y = targets.index_select(&Tensor::new(chunk, device)?, 0)?;
                let logits = linear.forward(&x)?;
                let loss = cfg.loss.compute(&logits, &y)?;
                let grads = share_of(&loss, chunk.len(), group.len())?.backward()?;
                add_grads(&mut step, &grads, &all_vars)?;
                tally.add(&loss, &logits, &y)?;
                progress.inc(1);
            }
            head_opt.step(&step)?;
            backbone_opt.step(&step)?;
        }
        lp.history.push(
            tally.finish(epoch, &linear, classes, test, batch, |images, idx| {
                Ok(backbone.embed(&images.tensor(idx, device)?)?.detach())
            })?,
        );
        let rest = || {
            let mut saved = copies(&trained)?;
            saved.extend(backbone.running_stats()?);
            Ok(Rest {
                backbone: saved,
                optimisers: vec![backbone_opt.state()],
            })
        };
        if lp.end_epoch(epoch, &head_vars, &head_opt, rest)? {
            break;
        }
    }
    progress.finish();
    Ok((Head { linear, classes }, lp.history))
}

/// [`finetune`] on the channels-last engine: `trainer` holds the backbone's parameters, which
/// are written into `backbone_vars` at the end. The head, its loss and its Adam are candle's,
/// as in [`finetune_candle`]; the backbone's Adam runs on the host buffers ([`FlatAdam`]),
/// over the parameters after the first `cfg.freeze_blocks` blocks ([`EngineTrainer::freeze`]).
#[allow(clippy::too_many_arguments)]
pub fn finetune_channels_last(
    mut trainer: EngineTrainer,
    backbone_vars: &[Var],
    images: &TrainImages,
    labels: &[u32],
    classes: usize,
    cfg: &TrainConfig,
    backbone_lr: f64,
    test: Option<TestImages<'_>>,
    progress: &Progress,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(Head, Vec<EpochStats>)> {
    check_inputs(images.count, labels, classes)?;
    check_test(test)?;
    let device = &Device::Cpu;
    let size = (images.pre.height as usize, images.pre.width as usize);
    let dim = trainer.dim();
    frozen_vars("the trunk", cfg.freeze_blocks, &trainer.block_var_counts())?;
    let frozen = trainer.freeze(cfg.freeze_blocks)?;
    let mut backbone_opt =
        FlatAdam::new(trainer.param_lens().into_iter().skip(frozen), backbone_lr);
    let (head_vars, linear) = init_head(classes, dim, cfg.seed, device)?;
    let mut head_opt = Adam::new(head_vars.clone(), cfg.lr)?;
    let targets = Tensor::new(labels, device)?;
    let (mut lp, rest) = EpochLoop::start(
        labels.len(),
        cfg.seed,
        &head_vars,
        &mut head_opt,
        checkpointing,
    )?;
    if let Some(r) = rest {
        trainer.set_params(frozen, &r.backbone)?;
        backbone_opt.restore(backbone_state(&r)?)?;
    }
    let batch = cfg.batch_size.max(1);
    let accumulate = cfg.accumulate.max(1);
    let schedule = cfg.schedule();
    let batches = labels.len().div_ceil(batch);
    progress.start((cfg.epochs * batches) as u64, "fine-tune batches");
    progress.inc(((lp.first - 1) * batches) as u64);
    for epoch in lp.first..=cfg.epochs {
        head_opt.set_learning_rate(schedule.lr(cfg.lr, epoch - 1));
        backbone_opt.set_learning_rate(schedule.lr(backbone_lr, epoch - 1));
        lp.shuffle_rng.shuffle(&mut lp.order);
        let mut tally = EpochTally::default();
        for group in lp.order.chunks(batch.saturating_mul(accumulate)) {
            let mut head_step = GradStore::default();
            let mut backbone_step: Option<Vec<Vec<f32>>> = None;
            for chunk in group.chunks(batch) {
                let n = chunk.len();
                let fwd = trainer.forward(&images.batch(chunk)?, n, size)?;
                let features = Var::from_vec(fwd.features.clone(), (n, dim), device)?;
                let mut x = features.as_tensor().clone();
                if cfg.dropout > 0.0 {
                    let mask = dropout_mask(&mut lp.dropout_rng, n, dim, cfg.dropout, device)?;
                    x = x.mul(&mask)?;
                }
                let y = targets.index_select(&Tensor::new(chunk, device)?, 0)?;
                let logits = linear.forward(&x)?;
                let loss = cfg.loss.compute(&logits, &y)?;
                let grads = share_of(&loss, n, group.len())?.backward()?;
                add_grads(&mut head_step, &grads, &head_vars)?;
                tally.add(&loss, &logits, &y)?;
                let d_features = grads
                    .get(features.as_tensor())
                    .ok_or_else(|| {
                        FinetuneError::Input("the loss does not depend on the features".into())
                    })?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let backbone_grads = trainer.backward(&fwd, &d_features)?;
                trainer.recycle(fwd);
                backbone_step = Some(match backbone_step {
                    None => backbone_grads,
                    Some(mut sum) => {
                        for (s, g) in sum.iter_mut().zip(&backbone_grads).skip(frozen) {
                            s.iter_mut().zip(g).for_each(|(a, b)| *a += b);
                        }
                        trainer.recycle_gradients(backbone_grads);
                        sum
                    }
                });
                progress.inc(1);
            }
            head_opt.step(&head_step)?;
            if let Some(grads) = backbone_step {
                trainer.update(|params| {
                    backbone_opt.step(params.into_iter().skip(frozen).collect(), &grads[frozen..])
                });
                trainer.recycle_gradients(grads);
            }
        }
        lp.history.push(
            tally.finish(epoch, &linear, classes, test, batch, |images, idx| {
                let fwd = trainer.forward(&images.batch(idx)?, idx.len(), size)?;
                let features = Tensor::from_slice(&fwd.features, (idx.len(), dim), device)?;
                trainer.recycle(fwd);
                Ok(features)
            })?,
        );
        let rest = || {
            Ok(Rest {
                backbone: trainer.params_after(frozen)?,
                optimisers: vec![backbone_opt.state()?],
            })
        };
        if lp.end_epoch(epoch, &head_vars, &head_opt, rest)? {
            break;
        }
    }
    trainer.write_to(backbone_vars)?;
    progress.finish();
    Ok((Head { linear, classes }, lp.history))
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
