//! Back-propagation on the channels-last engine (`TrunkTrainer`) against candle's autograd
//! through the candle path of the same network, with the real MobileNetV2 and
//! EfficientNet-Lite0 weights (from `scripts/fetch-assets.sh`).

mod common;

use bccp::backbone::channels_last::TrunkTrainer;
use bccp::backbone::{zoo, Backbone};
use candle_core::{Device, Tensor};
use common::asset;

fn values(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut rng = bccp::rng::Rng::new(seed);
    (0..n)
        .map(|_| ((rng.unit_f64() * 2.0 - 1.0) * scale) as f32)
        .collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, &x| a.max(x.abs()))
}

#[test]
fn every_parameter_gradient_matches_candle_autograd() {
    for (name, weights, n, (h, w)) in [
        (
            "mobilenet_v2",
            "weights/mobilenet_v2.safetensors",
            2,
            (32, 32),
        ),
        // TensorFlow padding is asymmetric on even maps; an odd, non-square input too.
        (
            "efficientnet_lite0",
            "weights/efficientnet_lite0.safetensors",
            2,
            (32, 32),
        ),
        (
            "efficientnet_lite0",
            "weights/efficientnet_lite0.safetensors",
            3,
            (37, 29),
        ),
    ] {
        let spec = zoo::find(name).unwrap();
        let (model, vars) = Backbone::load_trainable(&spec, &asset(weights), &Device::Cpu).unwrap();
        let trainer = TrunkTrainer::new(model.trunk().unwrap()).unwrap();
        let pixels = values(n * 3 * h * w, 1, 2.0);
        let x = Tensor::from_vec(pixels.clone(), (n, 3, h, w), &Device::Cpu).unwrap();

        // Reference: candle's autograd of Σ probe · features through the candle path.
        let features = model.embed(&x).unwrap();
        let dim = features.dim(1).unwrap();
        let probe = values(n * dim, 2, 1.0);
        let probe_t = Tensor::from_vec(probe.clone(), (n, dim), &Device::Cpu).unwrap();
        let grads = (&features * &probe_t)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let fwd = trainer.forward(&pixels, n, (h, w)).unwrap();
        let want = features.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = fwd
            .features
            .iter()
            .zip(&want)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
            / max_abs(&want);
        assert!(err < 1e-5, "{name}: features differ by {err} (relative)");

        let ours = trainer.to_checkpoint_layout(&trainer.backward(&fwd, &probe).unwrap());
        assert_eq!(ours.len(), vars.len(), "{name}: one gradient per variable");
        let mut worst = 0f32;
        for (i, (var, got)) in vars.iter().zip(&ours).enumerate() {
            let reference = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no candle gradient for variable {i}"));
            let reference = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), reference.len(), "{name}: variable {i}");
            let scale = max_abs(&reference);
            assert!(scale > 0.0, "{name}: variable {i} has a zero gradient");
            let err = got
                .iter()
                .zip(&reference)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
                / scale;
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{name} {n}×{h}×{w}: variable {i} ({:?}) gradient off by {err} (relative)",
                var.as_tensor().dims()
            );
        }
        eprintln!("{name} {n}×{h}×{w}: worst relative gradient error {worst:e}");

        // The batch's gradient is the sum of its images' (chunking does not change it).
        let one = |k: usize| {
            let image = 3 * h * w;
            let f = trainer
                .forward(&pixels[k * image..][..image], 1, (h, w))
                .unwrap();
            trainer.backward(&f, &probe[k * dim..][..dim]).unwrap()
        };
        let mut summed = one(0);
        for k in 1..n {
            for (s, g) in summed.iter_mut().zip(one(k)) {
                s.iter_mut().zip(&g).for_each(|(s, g)| *s += g);
            }
        }
        let batch = trainer.backward(&fwd, &probe).unwrap();
        for (i, (a, b)) in summed.iter().zip(&batch).enumerate() {
            let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()))
                / max_abs(b).max(1e-12);
            assert!(
                err < 1e-4,
                "{name}: parameter {i}: per-image sum off by {err}"
            );
        }
    }
}
