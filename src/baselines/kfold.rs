//! Out-of-sample predicted probabilities by K-fold cross-validation of the linear head on cached
//! features, the input confident learning expects: every sample's probabilities come from a
//! head that never saw it.

use candle_core::{DType, Device, Result, Tensor};

use crate::progress::Progress;
use crate::rng::Rng;
use crate::train::{train_head, Head, TrainConfig};

/// The default number of folds.
pub const DEFAULT_FOLDS: usize = 5;

/// Stream of [`Rng::derive`] used for the fold assignment.
const FOLD_STREAM: u64 = 0xF01D;

/// Out-of-sample probabilities of every sample.
#[derive(Debug, Clone, PartialEq)]
pub struct KFoldProbs {
    /// Softmax of the held-out head's logits, row-major `[n, classes]`.
    pub probs: Vec<f32>,
    /// The fold each sample was held out in.
    pub fold: Vec<usize>,
    pub classes: usize,
    pub folds: usize,
}

/// Seeded fold of every sample, stratified by label: each class is shuffled and dealt out
/// round-robin (continuing across classes), so every class and every fold size differs by at
/// most one between folds. `folds` must be positive.
pub fn assign_folds(labels: &[u32], folds: usize, seed: u64) -> Vec<usize> {
    let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut rng = Rng::derive(seed, FOLD_STREAM);
    let mut fold = vec![0; labels.len()];
    let mut next = 0;
    for members in &mut by_class {
        rng.shuffle(members);
        for &i in members.iter() {
            fold[i] = next % folds.max(1);
            next += 1;
        }
    }
    fold
}

/// The samples fold `f`'s head is trained on: all those not held out in `f`, ascending.
pub fn fold_train_indices(fold: &[usize], f: usize) -> Vec<u32> {
    (0..fold.len() as u32)
        .filter(|&i| fold[i as usize] != f)
        .collect()
}

/// The samples held out in fold `f`, ascending.
pub fn fold_holdout_indices(fold: &[usize], f: usize) -> Vec<u32> {
    (0..fold.len() as u32)
        .filter(|&i| fold[i as usize] == f)
        .collect()
}

/// The held-out samples of one fold (indices ascending) with what [`cross_fit`]'s closure
/// made of them.
pub type FoldOutput<T> = (Vec<u32>, T);

/// K-fold cross-fitting: samples are dealt into `folds` stratified folds ([`assign_folds`] with
/// `cfg.seed`); for every fold a head is trained with `cfg` on the other folds and `apply`
/// receives the fold number, that head, and the held-out samples' indices and features. Returns
/// the fold of every sample and each fold's output, in fold order. Confident learning's
/// probabilities and the out-of-sample cut-off both stand on it.
pub fn cross_fit<T>(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    folds: usize,
    cfg: &TrainConfig,
    progress: &Progress,
    mut apply: impl FnMut(usize, &Head, &[u32], &Tensor) -> Result<T>,
) -> Result<(Vec<usize>, Vec<FoldOutput<T>>)> {
    let device = features.device();
    let fold = assign_folds(labels, folds, cfg.seed);
    let mut outputs = Vec::with_capacity(folds);
    for f in 0..folds {
        let train = fold_train_indices(&fold, f);
        let held = fold_holdout_indices(&fold, f);
        let train_x = features.index_select(&Tensor::new(train.as_slice(), device)?, 0)?;
        let train_y: Vec<u32> = train.iter().map(|&i| labels[i as usize]).collect();
        let head = train_head(&train_x, &train_y, classes, cfg, progress)?;
        let held_x = features.index_select(&Tensor::new(held.as_slice(), device)?, 0)?;
        let out = apply(f, &head, &held, &held_x)?;
        outputs.push((held, out));
    }
    Ok((fold, outputs))
}

/// Out-of-sample probabilities of `features` [n, F] (f32) by `folds`-fold cross-validation
/// ([`cross_fit`]): every sample's probabilities come from the head of the fold it was held out
/// in.
pub fn kfold_pred_probs(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    folds: usize,
    cfg: &TrainConfig,
    progress: &Progress,
) -> Result<KFoldProbs> {
    let (n, _) = features.dims2()?;
    if features.dtype() != DType::F32 {
        candle_core::bail!("features must be f32, not {:?}", features.dtype());
    }
    if labels.len() != n {
        candle_core::bail!("{} labels for {n} samples", labels.len());
    }
    if folds < 2 || folds > n {
        candle_core::bail!("{folds} folds for {n} samples: need 2 <= folds <= samples");
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {bad} is not below the number of classes {classes}");
    }
    let (fold, parts) = cross_fit(
        features,
        labels,
        classes,
        folds,
        cfg,
        progress,
        |_, head, _, held_x| {
            candle_nn::ops::softmax_last_dim(&head.logits(held_x)?)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()
        },
    )?;
    let mut probs = vec![0f32; n * classes];
    for (held, p) in parts {
        for (row, &i) in p.iter().zip(&held) {
            let i = i as usize;
            probs[i * classes..(i + 1) * classes].copy_from_slice(row);
        }
    }
    Ok(KFoldProbs {
        probs,
        fold,
        classes,
        folds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accuracy(probs: &[f32], labels: &[u32], classes: usize) -> f64 {
        let correct = probs
            .chunks(classes)
            .zip(labels)
            .filter(|(row, &l)| {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
                best == l as usize
            })
            .count();
        correct as f64 / labels.len() as f64
    }

    #[test]
    fn folds_partition_the_samples_stratified() {
        let mut rng = Rng::new(5);
        let labels: Vec<u32> = (0..103).map(|_| rng.below(4) as u32).collect();
        let folds = 5;
        let fold = assign_folds(&labels, folds, 42);
        assert_eq!(fold, assign_folds(&labels, folds, 42), "seeded");
        assert_ne!(fold, assign_folds(&labels, folds, 43));
        let mut held_times = vec![0; labels.len()];
        for f in 0..folds {
            let train = fold_train_indices(&fold, f);
            let held = fold_holdout_indices(&fold, f);
            assert_eq!(train.len() + held.len(), labels.len());
            for &i in &held {
                held_times[i as usize] += 1;
                assert!(
                    !train.contains(&i),
                    "sample {i} held out and trained on in fold {f}"
                );
            }
            // Fold sizes 20 or 21.
            assert!((20..=21).contains(&held.len()), "{}", held.len());
        }
        assert!(
            held_times.iter().all(|&t| t == 1),
            "each sample held out exactly once"
        );
        for class in 0..4 {
            let per_fold: Vec<usize> = (0..folds)
                .map(|f| {
                    (0..labels.len())
                        .filter(|&i| labels[i] == class && fold[i] == f)
                        .count()
                })
                .collect();
            let (lo, hi) = (per_fold.iter().min(), per_fold.iter().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{per_fold:?}");
        }
    }

    /// Random features with random labels: a head can memorise them (in-sample accuracy is
    /// high) but nothing generalises, so out-of-sample accuracy is near chance.
    #[test]
    fn out_of_sample_probabilities_cannot_memorise() {
        let (n, classes) = (200, 10);
        let (features, labels) = crate::testutil::random_labelled(n, 256, classes, 11);
        let cfg = TrainConfig {
            epochs: 60,
            batch_size: 16,
            lr: 1e-2,
            ..Default::default()
        };
        let hidden = Progress::hidden();
        let out = kfold_pred_probs(&features, &labels, classes, 5, &cfg, &hidden).unwrap();
        assert_eq!(out.probs.len(), n * classes);
        assert_eq!(out.fold, assign_folds(&labels, 5, cfg.seed));
        for row in out.probs.chunks(classes) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
        let head = train_head(&features, &labels, classes, &cfg, &hidden).unwrap();
        let in_sample = candle_nn::ops::softmax_last_dim(&head.logits(&features).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (oos, ins) = (
            accuracy(&out.probs, &labels, classes),
            accuracy(&in_sample, &labels, classes),
        );
        eprintln!("random labels: in-sample accuracy {ins:.3}, out-of-sample {oos:.3}");
        assert!(ins > 0.9, "in-sample accuracy {ins}");
        assert!(oos < 0.3, "out-of-sample accuracy {oos}");
    }

    #[test]
    fn rejects_bad_fold_counts() {
        let features = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let labels = [0, 1, 0, 1];
        let cfg = TrainConfig::default();
        let hidden = Progress::hidden();
        for folds in [0, 1, 5] {
            let err = kfold_pred_probs(&features, &labels, 2, folds, &cfg, &hidden)
                .unwrap_err()
                .to_string();
            assert!(err.contains("need 2 <= folds <= samples"), "{err}");
        }
        let err = kfold_pred_probs(&features, &labels[..3], 2, 2, &cfg, &hidden)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 labels for 4 samples"), "{err}");
        assert!(kfold_pred_probs(&features, &labels, 2, 4, &cfg, &hidden).is_ok());
    }
}
