//! Learning-rate schedules per epoch (`--lr-schedule`, `--warmup-epochs`): the reference's
//! step decay (the rate × `lr_decay` after every epoch) or a cosine curve, either after an
//! optional linear warm-up. Head training and full fine-tuning (both learning rates) follow
//! the same [`Schedule`].

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// The shape of the learning rate over the epochs after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The rate × `lr_decay` after every epoch (the reference's; the default).
    #[default]
    Decay,
    /// Half a cosine from the full rate towards zero over the epochs after the warm-up
    /// (`lr_decay` unused).
    Cosine,
}

impl LrSchedule {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Decay => "decay",
            LrSchedule::Cosine => "cosine",
        }
    }
}

/// A learning-rate schedule over `epochs` epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    /// Epochs of linear warm-up: epoch `e < warmup_epochs` (0-based) runs at
    /// `base × (e + 1) / warmup_epochs`.
    pub warmup_epochs: usize,
    /// The factor per epoch of [`LrSchedule::Decay`].
    pub lr_decay: f64,
    pub epochs: usize,
}

impl Schedule {
    /// The learning rate of epoch `epoch` (0-based) for the base rate `base`. After the
    /// warm-up, epoch `w + k` runs at `base × lr_decay^k` (decay, multiplied step by step as
    /// the reference does, so that it equals its rates to the bit) or at
    /// `base × ½ (1 + cos(π k / (epochs − w)))` (cosine).
    pub fn lr(&self, base: f64, epoch: usize) -> f64 {
        let w = self.warmup_epochs;
        if epoch < w {
            return base * (epoch + 1) as f64 / w as f64;
        }
        let k = epoch - w;
        match self.kind {
            LrSchedule::Decay => {
                let mut lr = base;
                for _ in 0..k {
                    lr *= self.lr_decay;
                }
                lr
            }
            LrSchedule::Cosine => {
                let span = self.epochs.saturating_sub(w).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * k as f64 / span).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrSchedule, warmup_epochs: usize, epochs: usize) -> Schedule {
        Schedule {
            kind,
            warmup_epochs,
            lr_decay: 0.95,
            epochs,
        }
    }

    #[test]
    fn decay_without_warmup_is_the_reference_step_by_step() {
        let s = schedule(LrSchedule::Decay, 0, 15);
        // The loop this schedule replaced: lr starts at base and is multiplied after each epoch.
        let mut reference = 1e-3f64;
        for epoch in 0..15 {
            assert_eq!(
                s.lr(1e-3, epoch).to_bits(),
                reference.to_bits(),
                "epoch {epoch}"
            );
            reference *= 0.95;
        }
        assert_eq!(s.lr(0.01, 2), 0.01 * 0.95 * 0.95);
    }

    #[test]
    fn warmup_is_linear_then_the_schedule_starts_at_the_full_rate() {
        let s = schedule(LrSchedule::Decay, 4, 10);
        let got: Vec<f64> = (0..6).map(|e| s.lr(2.0, e)).collect();
        assert_eq!(got, [0.5, 1.0, 1.5, 2.0, 2.0, 2.0 * 0.95]);
    }

    #[test]
    fn cosine_falls_from_the_full_rate_after_the_warmup() {
        let s = schedule(LrSchedule::Cosine, 2, 6);
        let got: Vec<f64> = (0..6).map(|e| s.lr(1.0, e)).collect();
        // Warm-up 0.5, 1; then ½(1 + cos(πk/4)) for k = 0..3.
        let want = [
            0.5,
            1.0,
            1.0,
            0.853_553_390_593_273_8,
            0.5,
            0.146_446_609_406_726_3,
        ];
        for (e, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-15, "epoch {e}: {g} vs {w}");
        }
        // Without warm-up the first epoch is at the full rate and every later one below it.
        let s = schedule(LrSchedule::Cosine, 0, 3);
        assert_eq!(s.lr(2.0, 0), 2.0);
        assert!((s.lr(2.0, 1) - 1.5).abs() < 1e-15);
        assert!((s.lr(2.0, 2) - 0.5).abs() < 1e-15);
    }
}
