//! Training losses: cross-entropy, and ANL-CE (Ye et al., "Active Negative Loss Functions for
//! Learning with Noisy Labels", NeurIPS 2023): normalised cross-entropy plus normalised negative
//! cross-entropy, α = β = 1, probabilities clamped to [1e-7, 1].

use candle_core::{DType, Result, Tensor, D};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// A classification loss over logits [N, C] and targets [N] (u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Cross-entropy.
    #[default]
    #[value(name = "ce")]
    #[serde(rename = "ce")]
    CrossEntropy,
    /// NCE + NNCE.
    AnlCe,
}

impl Loss {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Loss::CrossEntropy => "ce",
            Loss::AnlCe => "anl_ce",
        }
    }
}

/// Smallest probability ANL-CE uses (its A = −log 1e-7).
pub const MIN_PROB: f64 = 1e-7;

impl Loss {
    /// The mean loss of a batch.
    pub fn compute(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Loss::CrossEntropy => candle_nn::loss::cross_entropy(logits, targets),
            Loss::AnlCe => {
                let log_p =
                    candle_nn::ops::log_softmax(logits, D::Minus1)?.clamp(MIN_PROB.ln(), 0.0)?;
                let target = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
                let log_py = log_p.gather(&target, 1)?.squeeze(1)?;
                // NCE = −log p_y / Σ_k −log p_k
                let nce = log_py.div(&log_p.sum(D::Minus1)?)?;
                // NNCE = 1 − (A + log p_y) / Σ_k (A + log p_k), A = −log MIN_PROB
                let a = -MIN_PROB.ln();
                let shifted = (log_p + a)?;
                let nnce = (1.0 - (log_py + a)?.div(&shifted.sum(D::Minus1)?)?)?;
                (nce + nnce)?.mean_all()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn anl_ce_by_hand() {
        // Two classes, logits (0, ln 3): p = (0.25, 0.75); target 1.
        let logits = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let got: f32 = Loss::AnlCe
            .compute(&logits, &t)
            .unwrap()
            .to_scalar()
            .unwrap();
        let (p0, p1) = (0.25f64, 0.75f64);
        let nce = p1.ln() / (p0.ln() + p1.ln());
        let a = -(1e-7f64).ln();
        let nnce = 1.0 - (a + p1.ln()) / ((a + p0.ln()) + (a + p1.ln()));
        assert!(
            (f64::from(got) - (nce + nnce)).abs() < 1e-5,
            "{got} vs {}",
            nce + nnce
        );
        let ce: f32 = Loss::CrossEntropy
            .compute(&logits, &t)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((f64::from(ce) + p1.ln()).abs() < 1e-6);
        assert!(crate::config::choice::parse::<Loss>("loss", "focal")
            .unwrap_err()
            .contains("anl_ce"));
        crate::config::choice::assert_names_agree(|l: &Loss| l.name());
    }
}
