//! Upper bounds on the sizes a backbone is run at, checked before anything is allocated: a
//! typo such as `--image-size 100000` must be a clear error, not an allocation failure that
//! aborts the process.

use crate::data::Preprocess;

use super::BackboneError;

/// The largest `--image-size`: 4096 (16 megapixels per image, 192 MiB as f32 input).
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// The largest batch (images per forward pass, or samples per training step).
pub const MAX_BATCH_SIZE: usize = 65_536;

/// Activation memory of a forward pass, as a multiple of its input: MobileNetV2's expansion
/// layers hold up to about 8× the input at once and a few such buffers live together; 40×
/// covers the zoo's networks at inference. Training keeps every activation for the backward
/// pass, about 3× more.
const ACTIVATIONS_PER_INPUT: u64 = 40;
const TRAINING_FACTOR: u64 = 3;

/// The memory budget of one batch when the machine's memory cannot be read: 8 GiB.
pub const FALLBACK_BATCH_BUDGET: u64 = 8 << 30;

/// Rough bytes one batch of `batch` images takes: the f32 input tensor
/// (batch × 3 × H × W × 4 bytes) plus the network's activations.
pub fn batch_bytes(pre: &Preprocess, batch: usize, training: bool) -> u64 {
    let input = (batch as u64)
        .saturating_mul(pre.len() as u64)
        .saturating_mul(4);
    let activations = if training {
        ACTIVATIONS_PER_INPUT * TRAINING_FACTOR
    } else {
        ACTIVATIONS_PER_INPUT
    };
    input.saturating_mul(1 + activations)
}

/// The memory one batch may take: half of the machine's memory (`MemTotal` of
/// `/proc/meminfo`), else [`FALLBACK_BATCH_BUDGET`].
pub fn batch_budget() -> u64 {
    total_memory().map_or(FALLBACK_BATCH_BUDGET, |total| total / 2)
}

/// Physical memory in bytes, where the system says (Linux).
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a batch size over [`MAX_BATCH_SIZE`] or a batch whose estimated memory
/// ([`batch_bytes`]) is over [`batch_budget`].
pub fn check_batch(pre: &Preprocess, batch: usize, training: bool) -> Result<(), BackboneError> {
    if batch == 0 {
        return Err(BackboneError::BatchSize);
    }
    if batch > MAX_BATCH_SIZE {
        return Err(BackboneError::BatchTooLarge {
            batch,
            max: MAX_BATCH_SIZE,
        });
    }
    let need = batch_bytes(pre, batch, training);
    let budget = batch_budget();
    if need > budget {
        return Err(BackboneError::BatchMemory {
            batch,
            width: pre.width,
            height: pre.height,
            need,
            budget,
        });
    }
    Ok(())
}

/// The largest batch of at most `wanted` images whose estimated memory fits
/// [`batch_budget`] (at least 1): what a run embeds its dataset in, so that a large
/// `--image-size` lowers the batch instead of failing. `wanted` itself whenever it fits.
pub fn fit_batch(pre: &Preprocess, wanted: usize, training: bool) -> usize {
    let per_image = batch_bytes(pre, 1, training).max(1);
    let fits = usize::try_from(batch_budget() / per_image).unwrap_or(usize::MAX);
    wanted.min(fits).max(1)
}

/// Bytes as GiB with one decimal, for messages.
pub(crate) fn gib(bytes: &u64) -> String {
    format!("{:.1} GiB", *bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bounds() {
        let pre = Preprocess::imagenet(224);
        // The defaults (embedding 64 images at 224) are far inside any budget.
        assert_eq!(batch_bytes(&pre, 64, false), 64 * 3 * 224 * 224 * 4 * 41);
        assert!(check_batch(&pre, 64, false).is_ok());
        assert!(check_batch(&pre, MAX_BATCH_SIZE, false).is_err());
        let err = check_batch(&Preprocess::imagenet(64), MAX_BATCH_SIZE + 1, false).unwrap_err();
        assert!(err.to_string().contains("65536"), "{err}");
        // 65536 images at 4096×4096: petabytes, refused with the estimate and the budget.
        let err = check_batch(&Preprocess::imagenet(4096), 65_536, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("4096×4096") && err.contains("GiB") && err.contains("budget"),
            "{err}"
        );
        assert!(matches!(
            check_batch(&pre, 0, false),
            Err(BackboneError::BatchSize)
        ));
        assert!(batch_budget() >= 1 << 30);
        assert_eq!(fit_batch(&pre, 64, false), 64);
        let huge = Preprocess::imagenet(MAX_IMAGE_SIZE);
        let fitted = fit_batch(&huge, 64, false);
        assert!((1..64).contains(&fitted), "{fitted}");
        assert!(fitted == 1 || check_batch(&huge, fitted, false).is_ok());
    }
}
