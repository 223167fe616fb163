//! Back-propagation on the channels-last engine (`EngineTrainer`) against candle's autograd
//! through the candle path of the same network, with the real MobileNetV2 and
//! EfficientNet-Lite0 weights (from `scripts/fetch-assets.sh`).

mod common;

use bccp::backbone::channels_last::EngineTrainer;
use bccp::backbone::layers::BnMode;
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
        let trainer = EngineTrainer::trunk(model.trunk().unwrap()).unwrap();
        check_gradients(name, &model, &vars, &trainer, n, (h, w));
    }
}

/// `name`'s network with random weights (batch-norm statistics far from the identity, so that
/// folding is exercised) loaded trainable as `bccp train` loads weights.
fn random_trainable(name: &str, seed: u64) -> (Backbone, Vec<candle_core::Var>) {
    random_trainable_bn(name, seed, BnMode::Frozen)
}

/// [`random_trainable`] with the batch-norms in `bn` mode.
fn random_trainable_bn(name: &str, seed: u64, bn: BnMode) -> (Backbone, Vec<candle_core::Var>) {
    let spec = zoo::find(name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = common::weights::random_checkpoint(name, seed, dir.path(), None);
    Backbone::load_trainable_bn(&spec, &file, &Device::Cpu, bn).unwrap()
}

/// The cosine of two lists of tensors taken as one vector each.
fn cosine_of(a: &[Tensor], b: &[Tensor]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (p, q) in a.iter().zip(b) {
        let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (u, v) in p.iter().zip(&q) {
            dot += f64::from(*u) * f64::from(*v);
            na += f64::from(*u).powi(2);
            nb += f64::from(*v).powi(2);
        }
    }
    dot / (na * nb).sqrt().max(f64::MIN_POSITIVE)
}

/// The CNNs' mixed precision on candle's ops (what `--precision bf16` runs on a CUDA GPU):
/// a bf16 input runs every layer in bf16 (f32 weights cast per layer, the depthwise op and a
/// training batch-norm's statistics in f32), the pooled features and every gradient come back
/// f32, within the rounding of the f32 network's. Checked here on candle's CPU kernels in f16,
/// which run the same casts (candle's CPU matrix product has no bf16); `tests/cuda.rs` runs
/// bf16 through `Backbone::set_precision` on a GPU.
#[test]
fn half_precision_activations_on_candle_ops_follow_f32_with_f32_gradients() {
    use candle_core::DType;
    for (name, bn) in [
        ("mobilenet_v2", BnMode::Frozen),
        ("efficientnet_lite0", BnMode::Frozen),
        ("resnet18", BnMode::Frozen),
        ("resnet18", BnMode::Train),
    ] {
        let ctx = format!("{name} (bn {})", bn.name());
        let (model, vars) = random_trainable_bn(name, 11, bn);
        let (n, size) = if bn == BnMode::Train {
            (8, 65)
        } else {
            (2, 33)
        };
        let x = Tensor::from_vec(
            values(n * 3 * size * size, 5, 1.0),
            (n, 3, size, size),
            &Device::Cpu,
        )
        .unwrap();
        let dim = model.spec().embedding_dim;
        let head = Tensor::from_vec(values(dim, 6, 0.1), (dim, 1), &Device::Cpu).unwrap();
        let run = |x: &Tensor| {
            model.set_training(true);
            let f = model.embed(x).unwrap();
            model.set_training(false);
            let grads = f
                .matmul(&head)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<Tensor> = vars
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .expect("every variable has a gradient")
                        .clone()
                })
                .collect();
            (f, g)
        };
        let (f32_features, f32_grads) = run(&x);
        let (half_features, half_grads) = run(&x.to_dtype(DType::F16).unwrap());
        assert_eq!(
            half_features.dtype(),
            DType::F32,
            "{ctx}: features come back f32"
        );
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = (flat(&half_features), flat(&f32_features));
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
            / b.iter().map(|y| y * y).sum::<f32>().sqrt();
        assert!(err > 0.0, "{ctx}: f16 gave the f32 features bit for bit");
        assert!(err < 0.02, "{ctx}: features relative error {err}");
        assert!(
            half_grads.iter().all(|g| g.dtype() == DType::F32),
            "{ctx}: f32 gradients"
        );
        let cosine = cosine_of(&half_grads, &f32_grads);
        // How far f32's own gradient moves when the input is rounded to 11 significant bits
        // (relative noise of ±2⁻¹¹): a training batch-norm over few values amplifies every
        // rounding. The f16 path rounds at every layer, so allow ten times that.
        let rounding = values(n * 3 * size * size, 9, 2f64.powi(-11));
        let rounding = Tensor::from_vec(rounding, (n, 3, size, size), &Device::Cpu).unwrap();
        let (_, moved) = run(&(&x + x.mul(&rounding).unwrap()).unwrap());
        let baseline = cosine_of(&moved, &f32_grads);
        eprintln!(
            "{ctx}: features relative error {err:.4}, gradient cosine {cosine:.5} (f32 under input rounding {baseline:.5})"
        );
        assert!(
            1.0 - cosine <= 10.0 * (1.0 - baseline) + 1e-4,
            "{ctx}: gradient cosine {cosine} against {baseline} for f32 under input rounding"
        );
        if bn == BnMode::Train {
            let stats = model.running_stats().unwrap();
            assert!(
                stats.iter().all(|t| t.dtype() == DType::F32),
                "{ctx}: f32 statistics"
            );
        }
    }
}

#[test]
fn resnet_gradients_match_candle_autograd_and_freezing_keeps_the_rest() {
    // ResNet-18: basic blocks, 3×3 convolutions and 1×1 stride-2 projections; ResNet-50:
    // bottlenecks (pointwise layers). An odd, non-square input for the max-pool's edges.
    for (name, n, size) in [
        ("resnet18", 2, (32, 32)),
        ("resnet18", 1, (37, 29)),
        ("resnet50", 2, (32, 32)),
    ] {
        let (model, vars) = random_trainable(name, 7);
        let mut trainer = EngineTrainer::for_backbone(&model).unwrap().unwrap();
        check_gradients(name, &model, &vars, &trainer, n, size);

        // Frozen blocks get zero gradients, the others exactly the unfrozen ones.
        let pixels = values(n * 3 * size.0 * size.1, 1, 2.0);
        let dim = trainer.dim();
        let probe = values(n * dim, 2, 1.0);
        let all = trainer
            .backward(&trainer.forward(&pixels, n, size).unwrap(), &probe)
            .unwrap();
        for blocks in [1, 3] {
            let frozen = trainer.freeze(blocks).unwrap();
            let part = trainer
                .backward(&trainer.forward(&pixels, n, size).unwrap(), &probe)
                .unwrap();
            assert!(part[..frozen].iter().flatten().all(|&g| g == 0.0));
            assert_eq!(part[frozen..], all[frozen..], "{name}: {blocks} frozen");
        }
    }
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut w) = (0f64, 0f64);
    for (g, r) in got.iter().zip(want) {
        d += f64::from(g - r).powi(2);
        w += f64::from(*r).powi(2);
    }
    (d / w.max(1e-30)).sqrt()
}

#[test]
fn bf16_products_give_the_f32_gradients_within_their_rounding() {
    if !bccp::ops::bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    for (name, n, size) in [
        ("mobilenet_v2", 2, (32, 32)),
        ("resnet18", 2, (32, 32)),
        ("resnet18", 1, (37, 29)),
        ("resnet50", 2, (32, 32)),
    ] {
        let (model, _vars) = if name == "mobilenet_v2" {
            let spec = zoo::find(name).unwrap();
            let w = asset("weights/mobilenet_v2.safetensors");
            Backbone::load_trainable(&spec, &w, &Device::Cpu).unwrap()
        } else {
            random_trainable(name, 7)
        };
        let f32_trainer = EngineTrainer::for_backbone(&model).unwrap().unwrap();
        let mut bf16_trainer = f32_trainer.clone();
        bf16_trainer
            .set_precision(bccp::ops::bf16_gemm::Precision::Bf16)
            .unwrap();
        let pixels = values(n * 3 * size.0 * size.1, 1, 2.0);
        let probe = values(n * f32_trainer.dim(), 2, 1.0);
        let run = |t: &EngineTrainer| {
            let fwd = t.forward(&pixels, n, size).unwrap();
            let grads = t.backward(&fwd, &probe).unwrap();
            (fwd.features.clone(), grads)
        };
        let (f_want, g_want) = run(&f32_trainer);
        let (f_got, g_got) = run(&bf16_trainer);
        let f_err = rel_l2(&f_got, &f_want);
        let g_errs: Vec<f64> = g_got
            .iter()
            .zip(&g_want)
            .map(|(g, w)| rel_l2(g, w))
            .collect();
        let worst = g_errs.iter().cloned().fold(0f64, f64::max);
        assert!(g_errs.iter().all(|e| e.is_finite()), "{name}: {g_errs:?}");
        let all = rel_l2(&g_got.concat(), &g_want.concat());
        eprintln!(
            "{name} {n}×{:?}: features {f_err:.2e}, all gradients {all:.2e}, worst tensor {worst:.2e}",
            size
        );
        // bf16 keeps 8 significant bits (a relative rounding of 2⁻⁹ per operand).
        // bf16 keeps 8 significant bits. PyTorch's CPU autocast to bf16 on the same inputs
        // and probe (torchvision's networks, MobileNetV2 with these weights) lands at features
        // / all gradients 0.114 / 0.350 (MobileNetV2), 0.0076 / 0.098 (ResNet-18), 0.0097 /
        // 0.181 (ResNet-50): it also rounds the depthwise convolutions and the activations,
        // which stay f32 here. The bounds sit at those figures.
        let (f_max, g_max) = match name {
            "mobilenet_v2" => (0.114, 0.35),
            "resnet18" => (0.0076, 0.098),
            _ => (0.0097, 0.181),
        };
        assert!(f_err > 0.0, "{name}: the bf16 products were not used");
        assert!(f_err < f_max, "{name}: features off by {f_err:e}");
        assert!(all < g_max, "{name}: gradients off by {all:e}");
    }
}

/// The engine's features and every parameter's gradient of `Σ probe · features` against
/// candle's autograd through `model`'s candle path, on `n` random images of `(h, w)`; and the
/// batch's gradient against the sum of its images'.
fn check_gradients(
    name: &str,
    model: &Backbone,
    vars: &[candle_core::Var],
    trainer: &EngineTrainer,
    n: usize,
    (h, w): (usize, usize),
) {
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
        let err =
            a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / max_abs(b).max(1e-12);
        assert!(
            err < 1e-4,
            "{name}: parameter {i}: per-image sum off by {err}"
        );
    }
}

/// `n` 40×40 PNGs in `dir`, two classes told apart by colour, with noise; their labels.
fn tiny_set(dir: &std::path::Path, n: usize) -> (Vec<std::path::PathBuf>, Vec<u32>) {
    let mut rng = bccp::rng::Rng::new(9);
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = (i % 2) as u32;
        let img = image::RgbImage::from_fn(40, 40, |_, _| {
            let noise = (rng.unit_f64() * 80.0) as u8;
            match class {
                0 => image::Rgb([150 + noise, 40, noise]),
                _ => image::Rgb([noise, 60, 150 + noise]),
            }
        });
        let path = dir.join(format!("{i}.png"));
        img.save(&path).unwrap();
        files.push(path);
        labels.push(class);
    }
    (files, labels)
}

/// One epoch-run of fine-tuning `model` (its trainable `vars`) with the backbone at 1e-3 on
/// `engine`, `"candle"` (autograd) or `"channels-last"`; the trained head.
fn finetune_on(
    engine: &str,
    model: &Backbone,
    vars: &[candle_core::Var],
    images: &bccp::train::finetune::TrainImages,
    labels: &[u32],
    cfg: &bccp::train::TrainConfig,
) -> bccp::train::Head {
    finetune_checkpointed(engine, model, vars, images, labels, cfg, None).0
}

/// [`finetune_on`] with `checkpointing`; the head and the epochs' figures.
fn finetune_checkpointed(
    engine: &str,
    model: &Backbone,
    vars: &[candle_core::Var],
    images: &bccp::train::finetune::TrainImages,
    labels: &[u32],
    cfg: &bccp::train::TrainConfig,
    checkpointing: Option<bccp::train::checkpoint::Checkpointing<'_>>,
) -> (bccp::train::Head, Vec<bccp::train::EpochStats>) {
    use bccp::progress::Progress;
    use bccp::train::finetune::{finetune_candle, finetune_channels_last};
    let run = match engine {
        "candle" | "candle-bn" => finetune_candle(
            model,
            vars.to_vec(),
            images,
            labels,
            2,
            cfg,
            1e-3,
            None,
            &Device::Cpu,
            &Progress::hidden(),
            checkpointing,
        ),
        _ => finetune_channels_last(
            EngineTrainer::trunk(model.trunk().unwrap()).unwrap(),
            vars,
            images,
            labels,
            2,
            cfg,
            1e-3,
            None,
            &Progress::hidden(),
            checkpointing,
        ),
    };
    run.unwrap()
}

/// MobileNetV2 at 32×32 and 8 images of [`tiny_set`] in `dir`: the spec, the weights, the
/// preprocessing, the files and their labels.
fn small_mobilenet_set(
    dir: &std::path::Path,
) -> (
    zoo::BackboneSpec,
    std::path::PathBuf,
    bccp::data::loader::Preprocess,
    Vec<std::path::PathBuf>,
    Vec<u32>,
) {
    let (files, labels) = tiny_set(dir, 8);
    let spec = zoo::find("mobilenet_v2").unwrap();
    let weights = asset("weights/mobilenet_v2.safetensors");
    let pre = spec.preprocess_at(Some(32)).unwrap();
    (spec, weights, pre, files, labels)
}

fn all_params(vars: &[candle_core::Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
}

#[test]
fn channels_last_finetune_agrees_with_candle_caches_and_exports() {
    use bccp::backbone::channels_last::EngineTrainer;
    use bccp::progress::Progress;
    use bccp::train::finetune::{finetune_candle, finetune_channels_last, TestImages, TrainImages};
    use bccp::train::TrainConfig;

    let tmp = tempfile::tempdir().unwrap();
    let (files, labels) = tiny_set(tmp.path(), 10);
    let spec = zoo::find("mobilenet_v2").unwrap();
    let weights = asset("weights/mobilenet_v2.safetensors");
    let pre = spec.preprocess_at(Some(32)).unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 4,
        dropout: 0.5,
        ..Default::default()
    };
    let backbone_lr = 1e-4;
    let cached = TrainImages::new(&files, &pre, 1).unwrap();
    let streamed = TrainImages::new(&files, &pre, 0).unwrap();
    assert!(cached.is_cached() && !streamed.is_cached());
    assert_eq!(
        cached.batch(&[3, 0]).unwrap(),
        streamed.batch(&[3, 0]).unwrap()
    );

    let engine_run = |images: &TrainImages| {
        let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
        let trainer = EngineTrainer::trunk(model.trunk().unwrap()).unwrap();
        let (head, history) = finetune_channels_last(
            trainer,
            &vars,
            images,
            &labels,
            2,
            &cfg,
            backbone_lr,
            Some(TestImages {
                images: &streamed,
                labels: &labels,
            }),
            &Progress::hidden(),
            None,
        )
        .unwrap();
        (model, vars, head, history)
    };
    let (mut model, vars, head, history) = engine_run(&cached);
    // Decoding per batch trains the same network, to the bit.
    let (_, vars_streamed, head_streamed, history_streamed) = engine_run(&streamed);
    assert_eq!(all_params(&vars), all_params(&vars_streamed));
    assert_eq!(history, history_streamed);
    // One record per epoch, in order, every figure a finite share or loss.
    assert_eq!(history.iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
    for e in &history {
        let test = e.test_accuracy.expect("test images were given");
        assert!(e.loss.is_finite() && e.loss > 0.0, "{e:?}");
        assert!((0.0..=1.0).contains(&e.train_accuracy), "{e:?}");
        assert!((0.0..=1.0).contains(&test), "{e:?}");
    }
    assert_eq!(
        head.linear
            .weight()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        head_streamed
            .linear
            .weight()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    // candle's autograd from the same start: the same steps up to float noise, far closer to
    // the engine's result than either is to the pretrained weights.
    let (reference, ref_vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
    let pretrained = all_params(&ref_vars);
    let (ref_head, ref_history) = finetune_candle(
        &reference,
        ref_vars.clone(),
        &cached,
        &labels,
        2,
        &cfg,
        backbone_lr,
        None,
        &Device::Cpu,
        &Progress::hidden(),
        None,
    )
    .unwrap();
    // The same steps record the same losses, up to float noise; no test figures without test
    // images.
    assert_eq!(ref_history.len(), 2);
    for (a, b) in history.iter().zip(&ref_history) {
        assert!(
            (a.loss - b.loss).abs() < 1e-3 * b.loss,
            "epoch {}: loss {} (engine) vs {} (candle)",
            a.epoch,
            a.loss,
            b.loss
        );
        assert_eq!(b.test_accuracy, None);
    }
    let moved = max_diff(&all_params(&vars), &pretrained);
    let apart = max_diff(&all_params(&vars), &all_params(&ref_vars));
    eprintln!("backbone moved {moved:e}, engine vs candle {apart:e}");
    assert!(
        moved > 0.0 && apart < 0.1 * moved,
        "moved {moved}, apart {apart}"
    );
    let x = Tensor::from_vec(
        cached.batch(&(0..10).collect::<Vec<u32>>()).unwrap(),
        (10, 3, 32, 32),
        &Device::Cpu,
    )
    .unwrap();
    let logits = head.logits(&model.embed(&x).unwrap()).unwrap();
    let ref_logits = ref_head.logits(&reference.embed(&x).unwrap()).unwrap();
    let err = common::rel_diff(&logits, &ref_logits, 0.0);
    eprintln!("logits engine vs candle: relative {err:e}");
    assert!(err < 1e-2, "logits differ by {err} (relative)");

    // The trained weights are in the exported model: rebuilt from the export, on the
    // channels-last engine and on candle's ops, it embeds as the trained network does.
    let trained = model.embed(&x).unwrap();
    let exported: std::collections::HashMap<String, Tensor> =
        model.export_tuned().unwrap().into_iter().collect();
    let rebuilt = Backbone::from_tuned(&spec, &exported, &Device::Cpu)
        .unwrap()
        .unwrap();
    assert!(rebuilt.runs_channels_last());
    let err = common::rel_diff(&rebuilt.embed(&x).unwrap(), &trained, 0.0);
    assert!(err < 1e-5, "exported model embeds differently: {err}");
    model.refresh_channels_last().unwrap();
    assert!(model.runs_channels_last());
    let err = common::rel_diff(&model.embed(&x).unwrap(), &trained, 0.0);
    assert!(err < 1e-5, "refreshed engine embeds differently: {err}");
}

#[test]
fn frozen_blocks_keep_their_weights_to_the_bit() {
    use bccp::progress::Progress;
    use bccp::train::finetune::{finetune, TrainImages};
    use bccp::train::TrainConfig;

    let tmp = tempfile::tempdir().unwrap();
    let (spec, weights, pre, files, labels) = small_mobilenet_set(tmp.path());
    let images = TrainImages::new(&files, &pre, 64).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 4,
        freeze_blocks: 3,
        ..Default::default()
    };
    for engine in ["channels-last", "candle"] {
        let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
        // MobileNetV2: the stem and its 17 inverted-residual blocks.
        let counts = model.block_var_counts();
        assert_eq!(counts.len(), 18);
        assert_eq!(
            counts.iter().sum::<usize>() + 2,
            vars.len(),
            "+ the 1×1 head"
        );
        let frozen: usize = counts[..3].iter().sum();
        let before = all_params(&vars);
        finetune_on(engine, &model, &vars, &images, &labels, &cfg);
        let after = all_params(&vars);
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            match i < frozen {
                true => assert!(same, "{engine}: frozen variable {i} changed"),
                false => assert!(!same, "{engine}: trained variable {i} did not change"),
            }
        }
    }

    // More blocks than the backbone has: an error naming the flag, the backbone, its blocks.
    let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
    let err = finetune(
        &model,
        vars,
        &files,
        &labels,
        2,
        &pre,
        &TrainConfig {
            freeze_blocks: 19,
            ..cfg
        },
        1e-3,
        64,
        None,
        &Device::Cpu,
        &Progress::hidden(),
        None,
    )
    .expect_err("19 blocks of 18")
    .to_string();
    assert_eq!(
        err,
        "--freeze-blocks 19 is more than mobilenet_v2's 18 blocks; 0 to 18 (0 trains every block)"
    );
}

#[test]
fn accumulating_two_batches_steps_as_one_batch_of_twice_the_size() {
    use bccp::train::finetune::TrainImages;
    use bccp::train::TrainConfig;

    let tmp = tempfile::tempdir().unwrap();
    let (spec, weights, pre, files, labels) = small_mobilenet_set(tmp.path());
    let images = TrainImages::new(&files, &pre, 64).unwrap();
    // Batch-norm frozen, no dropout: the steps depend on the samples only.
    let cfg = |batch_size, accumulate| TrainConfig {
        epochs: 1,
        batch_size,
        accumulate,
        dropout: 0.0,
        ..Default::default()
    };
    for engine in ["candle", "channels-last"] {
        let run = |cfg: TrainConfig| {
            let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
            let head = finetune_on(engine, &model, &vars, &images, &labels, &cfg);
            let mut params = all_params(&vars);
            params.push(
                head.linear
                    .weight()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            params
        };
        let pretrained = {
            let (_, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
            all_params(&vars)
        };
        let accumulated = run(cfg(2, 2));
        let whole = run(cfg(4, 1));
        let small_steps = run(cfg(2, 1));
        // Adam divides by the gradient's own size, so a near-zero gradient's float noise can
        // move single elements; the whole update is compared in the L2 norm.
        let norm = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(p, q)| f64::from(p - q).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let moved = norm(&whole[..pretrained.len()], &pretrained);
        let apart = norm(&accumulated, &whole) / moved;
        let control = norm(&small_steps, &whole) / moved;
        eprintln!(
            "{engine}: update norm {moved:e}; accumulated vs one batch {apart:e}, steps of 2 vs one batch {control:e} (relative)"
        );
        assert!(moved > 0.0, "{engine}: the backbone did not move");
        assert!(
            control > 0.1,
            "{engine}: steps of 2 should differ: {control}"
        );
        // Measured: 1.1e-5 (candle), 5.0e-4 (engine, whose chunks split the two batches
        // differently from the one); steps of 2 instead: 1.43.
        let tolerance = if engine == "candle" { 1e-4 } else { 5e-3 };
        assert!(
            apart < tolerance,
            "{engine}: accumulated {apart} (relative) apart from one batch of twice the size"
        );
    }
}

/// Bits of every value of `vars`.
fn bits(vars: &[candle_core::Var]) -> Vec<Vec<u32>> {
    all_params(vars)
        .iter()
        .map(|p| p.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn a_resumed_finetune_ends_as_an_uninterrupted_one_on_both_engines() {
    use bccp::train::checkpoint::{Checkpoint, Checkpointing, Fingerprint};
    use bccp::train::finetune::TrainImages;
    use bccp::train::{LrSchedule, TrainConfig};

    let tmp = tempfile::tempdir().unwrap();
    let (spec, weights, pre, files, labels) = small_mobilenet_set(tmp.path());
    let images = TrainImages::new(&files, &pre, 64).unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        batch_size: 3,
        accumulate: 2,
        dropout: 0.5,
        freeze_blocks: 2,
        lr_schedule: LrSchedule::Cosine,
        ..Default::default()
    };
    // "candle-bn": batch-norms in training mode (`--bn train`), whose running statistics the
    // checkpoint carries too.
    for engine in ["channels-last", "candle", "candle-bn"] {
        let load = || {
            let bn = match engine {
                "candle-bn" => BnMode::Train,
                _ => BnMode::Frozen,
            };
            Backbone::load_trainable_bn(&spec, &weights, &Device::Cpu, bn).unwrap()
        };
        let (straight_model, straight_vars) = load();
        let model = &straight_model;
        let (straight, straight_history) =
            finetune_checkpointed(engine, model, &straight_vars, &images, &labels, &cfg, None);
        let checkpoint = Checkpoint::new(
            tmp.path().join(engine),
            Fingerprint::new().with("engine", engine),
        );
        let at = |start, stop_after| Checkpointing {
            checkpoint: &checkpoint,
            start,
            stop_after,
        };
        // Stopped after the first epoch, on fresh weights; then resumed on fresh weights again
        // (as a new process would load them), from the checkpoint alone.
        let (model, vars) = load();
        let (_, first) = finetune_checkpointed(
            engine,
            &model,
            &vars,
            &images,
            &labels,
            &cfg,
            Some(at(None, Some(1))),
        );
        assert_eq!(first, straight_history[..1], "{engine}");
        let start = checkpoint
            .load()
            .unwrap()
            .expect("a checkpoint after epoch 1");
        assert_eq!(start.epochs_done, 1, "{engine}");
        let (resumed_model, resumed_vars) = load();
        let (resumed, history) = finetune_checkpointed(
            engine,
            &resumed_model,
            &resumed_vars,
            &images,
            &labels,
            &cfg,
            Some(at(Some(start), None)),
        );
        assert_eq!(history, straight_history, "{engine}");
        assert_eq!(
            bits(&resumed_vars),
            bits(&straight_vars),
            "{engine}: backbone"
        );
        let running = |m: &Backbone| {
            let stats = m.running_stats().unwrap();
            let vars: Vec<candle_core::Var> = stats
                .iter()
                .map(|t| candle_core::Var::from_tensor(t).unwrap())
                .collect();
            bits(&vars)
        };
        assert_eq!(
            running(&resumed_model),
            running(&straight_model),
            "{engine}: running statistics"
        );
        assert_eq!(
            running(&straight_model).is_empty(),
            engine != "candle-bn",
            "{engine}: running statistics only in training mode"
        );
        let head = |h: &bccp::train::Head| {
            h.tensors()
                .iter()
                .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(head(&resumed), head(&straight), "{engine}: head");
        // The start state is what training continues from: a finished one with its first
        // trained backbone tensor zeroed returns that tensor, without training further.
        let mut done = checkpoint.load().unwrap().unwrap();
        assert_eq!(done.epochs_done, 3);
        done.backbone[0] = done.backbone[0].zeros_like().unwrap();
        let (model, zeroed_vars) = load();
        let frozen: usize = model.block_var_counts()[..2].iter().sum();
        let (_, history) = finetune_checkpointed(
            engine,
            &model,
            &zeroed_vars,
            &images,
            &labels,
            &cfg,
            Some(at(Some(done), None)),
        );
        assert_eq!(history, straight_history, "{engine}");
        let first_trained = &all_params(&zeroed_vars)[frozen];
        assert!(first_trained.iter().all(|&x| x == 0.0), "{engine}");
    }
}
