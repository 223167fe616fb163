//! Helpers shared by the unit tests.

use candle_core::{Device, Tensor};

use crate::rng::Rng;

/// `n` random `dim`-d features in [−0.5, 0.5) with random labels below `classes`: nothing to
/// learn, everything to memorise.
pub fn random_labelled(n: usize, dim: usize, classes: usize, seed: u64) -> (Tensor, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..n * dim).map(|_| rng.unit_f64() as f32 - 0.5).collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.below(classes as u64) as u32).collect();
    let features = Tensor::from_vec(x, (n, dim), &Device::Cpu).expect("shape");
    (features, labels)
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}
