//! Training a linear classification head on cached backbone features: losses (cross-entropy,
//! ANL-CE), Adam with the reference's schedule (lr × 0.95 per epoch), seeded shuffling and
//! seeded dropout, and evaluation (accuracy, per class, confusion matrix).

pub mod adam;
pub mod checkpoint;
pub mod epoch_loop;
pub mod eval;
pub mod finetune;
pub mod flat_adam;
pub mod loss;
pub mod schedule;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::Linear;

use crate::progress::Progress;
use crate::rng::Rng;

use adam::Adam;
use checkpoint::Checkpointing;
use epoch_loop::{EpochLoop, Rest};

pub use crate::ops::bf16_gemm::Precision;
pub use loss::Loss;
pub use schedule::{LrSchedule, Schedule};

/// Hyper-parameters of head training (the reference's defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Multiplies the learning rate after every epoch (with [`LrSchedule::Decay`]).
    pub lr_decay: f64,
    /// How the learning rate changes over the epochs after the warm-up.
    pub lr_schedule: LrSchedule,
    /// Epochs of linear learning-rate warm-up (0: none).
    pub warmup_epochs: usize,
    /// Full fine-tuning: the first blocks of the backbone that are not trained
    /// ([`crate::backbone::Backbone::block_var_counts`]; 0: all trained).
    pub freeze_blocks: usize,
    /// Full fine-tuning: batches whose gradients are summed into one step (1: a step per
    /// batch), each weighted by its share of the step's samples.
    pub accumulate: usize,
    /// Full fine-tuning on the channels-last engine: the arithmetic of its products (bf16:
    /// bf16 operands, f32 sums). Serialised only when not f32, so that the fingerprints of
    /// checkpoints written before the setting stay valid.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    pub loss: Loss,
    /// Dropout before the head while training (the MC-dropout classifier uses 0.5).
    pub dropout: f32,
    pub seed: u64,
}

impl TrainConfig {
    /// The learning-rate schedule of these settings.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.lr_schedule,
            warmup_epochs: self.warmup_epochs,
            lr_decay: self.lr_decay,
            epochs: self.epochs,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 15,
            batch_size: 64,
            lr: 1e-3,
            lr_decay: 0.95,
            lr_schedule: LrSchedule::Decay,
            warmup_epochs: 0,
            freeze_blocks: 0,
            accumulate: 1,
            precision: Precision::F32,
            loss: Loss::CrossEntropy,
            dropout: 0.0,
            seed: 42,
        }
    }
}

/// A linear head `logits = x Wᵀ + b` over `features` inputs and `classes` outputs.
#[derive(Debug, Clone)]
pub struct Head {
    pub linear: Linear,
    pub classes: usize,
}

impl Head {
    /// Logits [N, classes] of features [N, F].
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        self.linear.forward(features)
    }

    /// Argmax class of every row.
    pub fn predict(&self, features: &Tensor) -> Result<Vec<u32>> {
        self.logits(features)?.argmax(1)?.to_vec1::<u32>()
    }

    /// `weight` [classes, F] and `bias` [classes].
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("head.weight".to_owned(), self.linear.weight().clone())];
        if let Some(b) = self.linear.bias() {
            out.push(("head.bias".to_owned(), b.clone()));
        }
        out
    }

    /// Rebuilds a head from [`Head::tensors`].
    pub fn from_tensors(weight: Tensor, bias: Tensor) -> Result<Self> {
        let classes = weight.dim(0)?;
        Ok(Self {
            linear: Linear::new(weight, Some(bias)),
            classes,
        })
    }
}

/// A fresh linear head with PyTorch's default `nn.Linear` bounds, drawn from `seed`; returns
/// its trainable variables (weight, bias) and the layer.
pub fn init_head(
    classes: usize,
    features: usize,
    seed: u64,
    device: &Device,
) -> Result<(Vec<Var>, Linear)> {
    let mut rng = Rng::derive(seed, 0x1417);
    let bound = 1.0 / (features as f64).sqrt();
    let mut init = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| ((rng.unit_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let w = Var::from_vec(init(classes * features), (classes, features), device)?;
    let b = Var::from_vec(init(classes), classes, device)?;
    let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    Ok((vec![w, b], linear))
}

/// Fills `out` with a dropout mask drawn from `rng`: each entry 0 with probability `p`, else
/// 1 / (1 − p). At p = 0.5 every random bit is a fair coin, so one draw covers 64 entries; other
/// rates draw once per entry.
pub fn fill_dropout(rng: &mut Rng, p: f32, out: &mut [f32]) {
    let scale = 1.0 / (1.0 - p);
    if p == 0.5 {
        for chunk in out.chunks_mut(64) {
            let bits = rng.next_u64();
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = ((bits >> j) & 1) as f32 * scale;
            }
        }
    } else {
        for v in out.iter_mut() {
            *v = if rng.unit_f64() < f64::from(p) {
                0.0
            } else {
                scale
            };
        }
    }
}

/// A dropout mask [rows, cols] (see [`fill_dropout`]), drawn from `rng` (so runs are
/// reproducible; candle's CPU generator cannot be seeded).
pub fn dropout_mask(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    p: f32,
    device: &Device,
) -> Result<Tensor> {
    let mut values = vec![0f32; rows * cols];
    fill_dropout(rng, p, &mut values);
    Tensor::from_vec(values, (rows, cols), device)
}

/// The rows `idx` of host features `[_, f]` with a dropout mask from `rng` applied when
/// `dropout > 0`: the batch built in one pass on the host (the same values as gathering the
/// rows, then multiplying by [`dropout_mask`]).
fn host_batch(features: &[f32], f: usize, idx: &[u32], dropout: f32, rng: &mut Rng) -> Vec<f32> {
    let mut batch = vec![0f32; idx.len() * f];
    if dropout > 0.0 {
        fill_dropout(rng, dropout, &mut batch);
        for (row, &i) in batch.chunks_exact_mut(f).zip(idx) {
            let x = &features[i as usize * f..][..f];
            row.iter_mut().zip(x).for_each(|(m, x)| *m *= x);
        }
    } else {
        for (row, &i) in batch.chunks_exact_mut(f).zip(idx) {
            row.copy_from_slice(&features[i as usize * f..][..f]);
        }
    }
    batch
}

/// One epoch of head training, as recorded in `metrics.json` (`epochs`) and logged to MLflow
/// with the epoch as the step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's samples (each batch's mean, weighted by its size).
    pub loss: f64,
    /// Accuracy on the training samples (with the labels trained on) after the epoch.
    pub train_accuracy: f64,
    /// Accuracy on the run's test samples after the epoch, when they were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
}

/// Test samples watched while training: feature blocks (predicted one by one, as the final
/// evaluation does) and the true labels of their rows, in order.
#[derive(Debug, Clone, Copy)]
pub struct TestSet<'a> {
    pub parts: &'a [Tensor],
    pub labels: &'a [u32],
}

/// The share of `pred` equal to `truth` (0 for none).
fn accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    let hits = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    hits as f64 / truth.len().max(1) as f64
}

/// Trains a head on `features` [N, F] (f32) with integer `labels`; `progress` advances once per
/// epoch.
pub fn train_head(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    cfg: &TrainConfig,
    progress: &Progress,
) -> Result<Head> {
    fit(features, labels, classes, cfg, progress, None, None).map(|(head, _)| head)
}

/// [`train_head`] that also records every epoch: its mean loss, the training accuracy and,
/// with `test`, the test accuracy (the same weights as without recording). With
/// `checkpointing`, a checkpoint is saved after every epoch, and training continues after the
/// last completed epoch of its start state (the same head and figures as without a stop).
pub fn train_head_recorded(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    cfg: &TrainConfig,
    progress: &Progress,
    test: Option<TestSet<'_>>,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(Head, Vec<EpochStats>)> {
    fit(
        features,
        labels,
        classes,
        cfg,
        progress,
        Some(test),
        checkpointing,
    )
}

/// The training loop; `record` (with its optional test set) asks for per-epoch figures,
/// `checkpointing` for a checkpoint after every epoch (and maybe a state to continue from).
fn fit(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    cfg: &TrainConfig,
    progress: &Progress,
    record: Option<Option<TestSet<'_>>>,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(Head, Vec<EpochStats>)> {
    let (n, f) = features.dims2()?;
    if labels.len() != n {
        candle_core::bail!("{} labels for {n} training samples", labels.len());
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {bad} is not below the number of classes {classes}");
    }
    if n == 0 {
        candle_core::bail!("no training samples");
    }
    let device = features.device();
    let (vars, linear) = init_head(classes, f, cfg.seed, device)?;
    let mut opt = Adam::new(vars.clone(), cfg.lr)?;
    let targets = Tensor::new(labels, device)?;
    let (mut lp, rest) = EpochLoop::start(n, cfg.seed, &vars, &mut opt, checkpointing)?;
    if let Some(r) = rest {
        if !r.backbone.is_empty() || !r.optimisers.is_empty() {
            candle_core::bail!("checkpoint: backbone state for head-only training");
        }
    }
    let schedule = cfg.schedule();
    // On the CPU each batch is gathered (and masked) on the host in one pass: per step that
    // replaces three small tensor ops, whose overhead dominates a linear head's step.
    let host = match device.is_cpu() {
        true => Some(
            features
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
        false => None,
    };
    if let Some(Some(test)) = record {
        let rows: usize = test.parts.iter().map(|p| p.dim(0)).sum::<Result<usize>>()?;
        if rows != test.labels.len() {
            candle_core::bail!("{} test labels for {rows} test samples", test.labels.len());
        }
    }
    progress.start(cfg.epochs as u64, "epochs");
    progress.inc(lp.first as u64 - 1);
    for epoch in lp.first..=cfg.epochs {
        opt.set_learning_rate(schedule.lr(cfg.lr, epoch - 1));
        let mut loss_sum = 0f64;
        lp.shuffle_rng.shuffle(&mut lp.order);
        for chunk in lp.order.chunks(cfg.batch_size.max(1)) {
            let idx = Tensor::new(chunk, device)?;
            let x =
                match &host {
                    Some(h) => {
                        let batch = host_batch(h, f, chunk, cfg.dropout, &mut lp.dropout_rng);
                        Tensor::from_vec(batch, (chunk.len(), f), device)?
                    }
                    None if cfg.dropout > 0.0 => features.index_select(&idx, 0)?.mul(
                        &dropout_mask(&mut lp.dropout_rng, chunk.len(), f, cfg.dropout, device)?,
                    )?,
                    None => features.index_select(&idx, 0)?,
                };
            let y = targets.index_select(&idx, 0)?;
            let loss = cfg.loss.compute(&linear.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            if record.is_some() {
                let batch_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                loss_sum += batch_loss * chunk.len() as f64;
            }
        }
        if let Some(test) = record {
            let head = Head {
                linear: linear.clone(),
                classes,
            };
            let test_accuracy = match test {
                Some(t) => {
                    let mut pred = Vec::with_capacity(t.labels.len());
                    for part in t.parts {
                        pred.extend(head.predict(part)?);
                    }
                    Some(accuracy(&pred, t.labels))
                }
                None => None,
            };
            lp.history.push(EpochStats {
                epoch,
                loss: loss_sum / n as f64,
                train_accuracy: accuracy(&head.predict(features)?, labels),
                test_accuracy,
            });
        }
        progress.inc(1);
        let no_more = || {
            Ok(Rest {
                backbone: Vec::new(),
                optimisers: Vec::new(),
            })
        };
        if lp.end_epoch(epoch, &vars, &opt, no_more)? {
            break;
        }
    }
    progress.finish();
    Ok((Head { linear, classes }, lp.history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;

    /// Two Gaussian blobs per class in 8-D: a linear head separates them.
    fn blobs(n: usize, seed: u64) -> (Tensor, Vec<u32>) {
        let mut rng = Rng::new(seed);
        let mut x = Vec::with_capacity(n * 8);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let class = (i % 3) as u32;
            for d in 0..8 {
                let centre = if d == class as usize { 3.0 } else { 0.0 };
                x.push(centre + (rng.unit_f64() as f32 - 0.5));
            }
            y.push(class);
        }
        (Tensor::from_vec(x, (n, 8), &Device::Cpu).unwrap(), y)
    }

    #[test]
    fn learns_separable_classes_deterministically() {
        let (x, y) = blobs(600, 1);
        for loss in [Loss::CrossEntropy, Loss::AnlCe] {
            let cfg = TrainConfig {
                epochs: 20,
                batch_size: 8,
                loss,
                ..Default::default()
            };
            let head = train_head(&x, &y, 3, &cfg, &Progress::hidden()).unwrap();
            let pred = head.predict(&x).unwrap();
            let acc = pred.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64;
            assert!(
                acc > 0.98,
                "{loss:?}: accuracy {acc}, first predictions {:?} labels {:?}",
                &pred[..6],
                &y[..6]
            );
            let again = train_head(&x, &y, 3, &cfg, &Progress::hidden()).unwrap();
            let d: f32 = max_abs_diff(head.linear.weight(), again.linear.weight());
            assert_eq!(d, 0.0, "same seed, same weights");
        }
        let err = train_head(
            &x,
            &y[..10],
            3,
            &TrainConfig::default(),
            &Progress::hidden(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("10 labels for 600"), "{err}");
    }

    #[test]
    fn recording_keeps_the_weights_and_matches_the_final_head() {
        let (x, y) = blobs(300, 2);
        let (tx, ty) = blobs(90, 3);
        let cfg = TrainConfig {
            epochs: 4,
            batch_size: 16,
            dropout: 0.5,
            ..Default::default()
        };
        let hidden = Progress::hidden();
        let plain = train_head(&x, &y, 3, &cfg, &hidden).unwrap();
        let halves = [tx.narrow(0, 0, 40).unwrap(), tx.narrow(0, 40, 50).unwrap()];
        let test = TestSet {
            parts: &halves,
            labels: &ty,
        };
        let (head, epochs) =
            train_head_recorded(&x, &y, 3, &cfg, &hidden, Some(test), None).unwrap();
        let d: f32 = max_abs_diff(head.linear.weight(), plain.linear.weight());
        assert_eq!(d, 0.0, "recording changes nothing");
        assert_eq!(
            epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let last = &epochs[3];
        assert_eq!(
            last.train_accuracy,
            accuracy(&head.predict(&x).unwrap(), &y)
        );
        assert_eq!(
            last.test_accuracy,
            Some(accuracy(&head.predict(&tx).unwrap(), &ty))
        );
        assert!(epochs[0].loss > last.loss && last.loss > 0.0, "{epochs:?}");
        let (_, none) = train_head_recorded(&x, &y, 3, &cfg, &hidden, None, None).unwrap();
        assert!(none.iter().all(|e| e.test_accuracy.is_none()));
        assert_eq!(none[3].train_accuracy, last.train_accuracy);
        let bad = TestSet {
            parts: &halves,
            labels: &ty[..10],
        };
        let err = train_head_recorded(&x, &y, 3, &cfg, &hidden, Some(bad), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("10 test labels for 90"), "{err}");
        assert_eq!(accuracy(&[1, 2, 0], &[1, 2, 2]), 2.0 / 3.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    /// Bits of a tensor's values.
    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn resuming_after_a_stop_gives_the_uninterrupted_head_and_history() {
        use checkpoint::{Checkpoint, Fingerprint};
        let (x, y) = blobs(200, 4);
        let (tx, ty) = blobs(60, 5);
        let parts = [tx];
        let test = TestSet {
            parts: &parts,
            labels: &ty,
        };
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 16,
            dropout: 0.5,
            lr_schedule: LrSchedule::Cosine,
            warmup_epochs: 1,
            ..Default::default()
        };
        let hidden = Progress::hidden();
        let (straight, straight_history) =
            train_head_recorded(&x, &y, 3, &cfg, &hidden, Some(test), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoint::new(
            tmp.path().join("c"),
            Fingerprint::new().with("run", "blobs"),
        );
        let run = |start, stop_after| {
            let checkpointing = Checkpointing {
                checkpoint: &c,
                start,
                stop_after,
            };
            train_head_recorded(&x, &y, 3, &cfg, &hidden, Some(test), Some(checkpointing)).unwrap()
        };
        let (_, first) = run(None, Some(2));
        assert_eq!(first, straight_history[..2], "stopped after epoch 2");
        let start = c.load().unwrap().expect("a checkpoint after epoch 2");
        assert_eq!(start.epochs_done, 2);
        let (resumed, history) = run(Some(start), None);
        assert_eq!(history, straight_history);
        assert_eq!(
            bits(resumed.linear.weight()),
            bits(straight.linear.weight())
        );
        let (b1, b2) = (
            resumed.linear.bias().unwrap(),
            straight.linear.bias().unwrap(),
        );
        assert_eq!(bits(b1), bits(b2));
        assert_eq!(c.load().unwrap().unwrap().epochs_done, 5);
        // The start state is what training continues from: a finished one with a zeroed head
        // returns that head and the saved figures without training further.
        let mut done = c.load().unwrap().unwrap();
        done.head[0] = done.head[0].zeros_like().unwrap();
        let (zeroed, history) = run(Some(done), None);
        assert!(bits(zeroed.linear.weight()).iter().all(|&b| b == 0));
        assert_eq!(history, straight_history);
        // A checkpoint of another head (other classes) is refused, not half-applied.
        let mut wrong = c.load().unwrap().unwrap();
        wrong.epochs_done = 1;
        wrong.order.pop();
        let checkpointing = Checkpointing {
            checkpoint: &c,
            start: Some(wrong),
            stop_after: None,
        };
        let err = train_head_recorded(&x, &y, 3, &cfg, &hidden, None, Some(checkpointing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("199 samples for 200"), "{err}");
    }

    #[test]
    fn host_batches_equal_gathered_rows_times_the_mask() {
        let (n, f) = (20, 70); // 70 features: the 64-entry mask words straddle rows
        let x = Tensor::randn(0f32, 1., (n, f), &Device::Cpu).unwrap();
        let host = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let idx = [3u32, 17, 0, 3, 9];
        for p in [0.0f32, 0.5, 0.3] {
            let got = host_batch(&host, f, &idx, p, &mut Rng::new(5));
            let rows = x
                .index_select(&Tensor::new(&idx, &Device::Cpu).unwrap(), 0)
                .unwrap();
            let want = if p > 0.0 {
                let mask = dropout_mask(&mut Rng::new(5), idx.len(), f, p, &Device::Cpu).unwrap();
                rows.mul(&mask).unwrap()
            } else {
                rows
            };
            assert_eq!(
                got,
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "p {p}"
            );
        }
    }

    #[test]
    fn dropout_mask_keeps_half_scaled_by_two() {
        let m = dropout_mask(&mut Rng::new(3), 100, 100, 0.5, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || x == 2.0));
        let kept = v.iter().filter(|&&x| x == 2.0).count();
        assert!((4700..5300).contains(&kept), "{kept}");
        // Other rates: about 1 − p kept, scaled by 1 / (1 − p).
        let m = dropout_mask(&mut Rng::new(4), 100, 100, 0.2, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.25));
        let kept = v.iter().filter(|&&x| x == 1.25).count();
        assert!((7700..8300).contains(&kept), "{kept}");
    }
}
