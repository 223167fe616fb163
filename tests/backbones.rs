//! Backbones with real weights (from `scripts/fetch-assets.sh`): MobileNetV2 against a PyTorch
//! reference forward pass, EfficientNet-Lite0 classifying real photos.

mod common;

use bccp::backbone::{zoo, Backbone};
use candle_core::{Device, Tensor};
use common::{asset, bccp, success};

fn load(name: &str, weights: &str) -> Backbone {
    let spec = zoo::find(name).unwrap();
    Backbone::load(&spec, &asset(weights), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b| over all elements.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_diff(a, b, 0.0)
}

#[test]
fn mobilenet_v2_matches_torchvision_on_real_photos() {
    // Fixture from scripts/mobilenet_v2_reference.py: chelsea, coffee and astronaut resized to
    // 64×64 (u8), the normalised input, and torchvision's pooled features.
    let fixture = candle_core::safetensors::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mobilenet_v2_reference.safetensors"
        ),
        &Device::Cpu,
    )
    .unwrap();
    let pixels = &fixture["pixels"];
    let (n, h, w, _) = pixels.dims4().unwrap();
    assert_eq!(n, 3);

    // Our preprocessing of the same pixels equals the reference input.
    let spec = zoo::find("mobilenet_v2").unwrap();
    let pre = bccp::data::Preprocess {
        width: w as u32,
        height: h as u32,
        ..spec.preprocess()
    };
    let raw = pixels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mut ours = Vec::new();
    for k in 0..n {
        let img = image::RgbImage::from_raw(
            w as u32,
            h as u32,
            raw[k * h * w * 3..(k + 1) * h * w * 3].to_vec(),
        )
        .unwrap();
        ours.extend(pre.apply(&image::DynamicImage::ImageRgb8(img)));
    }
    let input = Tensor::from_vec(ours, (n, 3, h, w), &Device::Cpu).unwrap();
    assert!(rel_err(&input, &fixture["input"]) < 1e-6);

    let model = load("mobilenet_v2", "weights/mobilenet_v2.safetensors");
    let features = model.embed(&input).unwrap();
    assert_eq!(features.dims(), &[3, 1280]);
    for k in 0..n {
        let err = rel_err(
            &features.get(k).unwrap(),
            &fixture["features"].get(k).unwrap(),
        );
        assert!(err < 1e-3, "image {k}: relative error {err}");
    }
}

#[test]
fn efficientnet_lite0_recognises_a_cat_and_an_espresso() {
    let model = load(
        "efficientnet_lite0",
        "weights/efficientnet_lite0.safetensors",
    );
    let pre = model.spec().preprocess();
    let paths = vec![asset("photos/chelsea.png"), asset("photos/coffee.png")];
    let batch = bccp::data::loader::load_batch(&paths, 0, &pre, false).unwrap();
    let logits = model
        .logits(&batch.to_tensor(&pre, &Device::Cpu).unwrap())
        .unwrap()
        .unwrap();
    let top1: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
    assert!([281, 282, 285].contains(&top1[0]), "chelsea → {}", top1[0]);
    assert_eq!(top1[1], 967, "coffee → {}", top1[1]);

    // The command prints names.
    let out = success(&bccp(&[
        "classify",
        "--model",
        "efficientnet_lite0",
        "--weights",
        asset("weights/efficientnet_lite0.safetensors")
            .to_str()
            .unwrap(),
        "--device",
        "cpu",
        paths[1].to_str().unwrap(),
    ]));
    let first = out.lines().nth(1).unwrap();
    assert!(first.contains("967") && first.contains("espresso"), "{out}");
    assert_eq!(out.lines().count(), 6, "{out}");
}

/// One Adam step on the summed embedding of `x`; returns the variables' count after checking
/// that every one got a finite, non-zero gradient.
fn one_step(model: &Backbone, vars: Vec<candle_core::Var>, x: &Tensor, name: &str) -> usize {
    // A loss with no fixed point at zero activations: the embedding's sum.
    let loss = model.embed(x).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (i, var) in vars.iter().enumerate() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient for var {i}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: var {i} gradient {norm}"
        );
    }
    let count = vars.len();
    let mut opt = bccp::train::adam::Adam::new(vars, 1e-5).unwrap();
    opt.step(&grads).unwrap();
    count
}

#[test]
fn fine_tuning_reaches_every_layer_and_exports_what_it_trained() {
    // ResNet-18 from random weights saved as a checkpoint (no hub here); an odd size.
    let tmp = tempfile::tempdir().unwrap();
    let resnet18 = tmp.path().join("resnet18.safetensors");
    let (varmap, _) = random_resnet(18, &mut bccp::rng::Rng::new(5));
    varmap.save(&resnet18).unwrap();
    let cases = [
        ("resnet18", resnet18, 45, 2 * 20),
        (
            "mobilenet_v2",
            asset("weights/mobilenet_v2.safetensors"),
            64,
            2 * 52,
        ),
        (
            "efficientnet_lite0",
            asset("weights/efficientnet_lite0.safetensors"),
            64,
            2 * 49,
        ),
    ];
    // Weight and folded bias of every convolution: MobileNetV2 has a stem, 17 blocks (the
    // first without expansion: 2 + 16·3 convolutions) and a head; EfficientNet-Lite0 a stem,
    // 16 blocks (2 + 15·3) and a head; ResNet-18 a stem, 8 blocks of 2 and 3 projections.
    for (name, weights, size, want_vars) in cases {
        let spec = zoo::find(name).unwrap();
        let mut rng = bccp::rng::Rng::new(7);
        let pixels: Vec<f32> = (0..2 * 3 * size * size)
            .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
            .collect();
        let x = Tensor::from_vec(pixels, (2, 3, size, size), &Device::Cpu).unwrap();
        let plain = Backbone::load(&spec, &weights, &Device::Cpu).unwrap();
        let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu).unwrap();
        // The trainable network runs candle's ops; the plain one the channels-last engine.
        let before = model.embed(&x).unwrap();
        let err = rel_err(&before, &plain.embed(&x).unwrap());
        assert!(err < 1e-5, "{name}: trainable vs plain {err}");

        // Export before training rebuilds the same network.
        let exported: std::collections::HashMap<String, Tensor> =
            model.export_tuned().unwrap().into_iter().collect();
        let rebuilt = Backbone::from_tuned(&spec, &exported, &Device::Cpu)
            .unwrap()
            .expect("tensors under backbone.");
        let err = rel_err(&rebuilt.embed(&x).unwrap(), &before);
        assert!(err < 1e-5, "{name}: export round trip {err}");

        // Every parameter gets a gradient; after a step the network changed, and what is
        // exported is what the live network computes (no stale copies of a weight).
        let count = one_step(&model, vars, &x, name);
        assert_eq!(count, want_vars, "{name}: variables");
        let after = model.embed(&x).unwrap();
        assert!(
            rel_err(&after, &before) > 1e-6,
            "{name}: one step changed nothing"
        );
        let exported: std::collections::HashMap<String, Tensor> =
            model.export_tuned().unwrap().into_iter().collect();
        let rebuilt = Backbone::from_tuned(&spec, &exported, &Device::Cpu)
            .unwrap()
            .expect("tensors under backbone.");
        let err = rel_err(&rebuilt.embed(&x).unwrap(), &after);
        assert!(
            err < 1e-5,
            "{name}: tuned export differs from the live network by {err}"
        );
    }
}

/// MobileNetV2 and EfficientNet-Lite0 with their real weights (candle's ops).
fn real_trunk_networks() -> (
    bccp::backbone::mobilenet_v2::MobileNetV2,
    bccp::backbone::efficientnet_lite::EfficientNetLite,
) {
    use bccp::backbone::{efficientnet_lite, mobilenet_v2};
    let vb = |file: &str| {
        let tensors = candle_core::safetensors::load(asset(file), &Device::Cpu).unwrap();
        candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu)
    };
    let mobilenet =
        mobilenet_v2::MobileNetV2::load(vb("weights/mobilenet_v2.safetensors")).unwrap();
    let efficientnet = efficientnet_lite::EfficientNetLite::load(
        &efficientnet_lite::Config::lite0(),
        vb("weights/efficientnet_lite0.safetensors"),
    )
    .unwrap();
    (mobilenet, efficientnet)
}

/// `n` images `[n, 3, h, w]` of uniform values in [-2, 2).
fn random_images(rng: &mut bccp::rng::Rng, n: usize, h: usize, w: usize) -> Tensor {
    let pixels: Vec<f32> = (0..n * 3 * h * w)
        .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
        .collect();
    Tensor::from_vec(pixels, (n, 3, h, w), &Device::Cpu).unwrap()
}

#[test]
fn channels_last_engine_matches_candle_ops() {
    use bccp::backbone::channels_last::ChannelsLastTrunk;

    let (mobilenet, efficientnet) = real_trunk_networks();
    let mut rng = bccp::rng::Rng::new(11);
    // Batches that do and do not fill the engine's chunks; square, odd and non-square maps
    // (TensorFlow padding of EfficientNet-Lite is asymmetric on even sizes).
    for (n, h, w) in [(11, 64, 64), (3, 45, 37), (2, 224, 224), (1, 32, 32)] {
        let x = random_images(&mut rng, n, h, w);
        for (name, trunk, reference) in [
            (
                "mobilenet_v2",
                mobilenet.trunk(),
                mobilenet.embed(&x).unwrap(),
            ),
            (
                "efficientnet_lite0",
                efficientnet.trunk(),
                efficientnet.embed(&x).unwrap(),
            ),
        ] {
            let engine = ChannelsLastTrunk::new(trunk).unwrap();
            let fast = engine.embed(&x).unwrap();
            assert_eq!(fast.dims(), reference.dims(), "{name}");
            let err = rel_err(&fast, &reference);
            assert!(err < 1e-5, "{name} {n}×{h}×{w}: relative error {err}");
            // An image's embedding does not depend on the batch around it, to the bit: the
            // cache may mix embeddings computed in different batches.
            let last = engine.embed(&x.narrow(0, n - 1, 1).unwrap()).unwrap();
            let in_batch = fast.narrow(0, n - 1, 1).unwrap();
            assert_eq!(
                last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                in_batch.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} {n}×{h}×{w}: batch-dependent embedding"
            );
        }
    }
}

/// Inverted-residual blocks run in bands of rows give the embeddings of whole maps to the bit:
/// bands of one row up to the default, strides 1 and 2, square, odd and non-square maps (the
/// real MobileNetV2 and EfficientNet-Lite0, whose depthwise layers keep the same padding on
/// every side only in MobileNetV2: EfficientNet-Lite's TensorFlow padding is never banded).
#[test]
fn channels_last_bands_equal_whole_maps() {
    use bccp::backbone::channels_last::{ChannelsLastTrunk, DEFAULT_BANDS};

    let (mobilenet, efficientnet) = real_trunk_networks();
    let mut rng = bccp::rng::Rng::new(12);
    for (n, h, w) in [(3, 64, 64), (2, 45, 37), (1, 33, 70), (2, 256, 256)] {
        let x = random_images(&mut rng, n, h, w);
        for (name, trunk) in [
            ("mobilenet_v2", mobilenet.trunk()),
            ("efficientnet_lite0", efficientnet.trunk()),
        ] {
            let mut engine = ChannelsLastTrunk::new(trunk).unwrap();
            engine.set_bands(None);
            let whole = engine.embed(&x).unwrap().flatten_all().unwrap();
            let whole = whole.to_vec1::<f32>().unwrap();
            for bands in [(0, 1), (0, 20_000), (0, 200_000), DEFAULT_BANDS] {
                engine.set_bands(Some(bands));
                let banded = engine.embed(&x).unwrap().flatten_all().unwrap();
                assert_eq!(
                    banded.to_vec1::<f32>().unwrap(),
                    whole,
                    "{name} {n}×{h}×{w}, bands {bands:?}"
                );
            }
        }
    }
}

#[test]
fn channels_last_resnets_match_candle_transformers() {
    use bccp::backbone::channels_last::ChannelsLastResNet;
    use candle_core::DType;
    use candle_nn::VarBuilder;

    let mut rng = bccp::rng::Rng::new(3);
    for (depth, n, h, w) in [(18, 2, 224, 224), (34, 3, 45, 37), (50, 3, 64, 64)] {
        let (varmap, candle) = random_resnet(depth, &mut rng);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = bccp::backbone::resnet::ResNet::load(depth, vb).unwrap();
        let engine = ChannelsLastResNet::new(&net).unwrap();
        let x = random_images(&mut rng, n, h, w);
        let want = candle_core::Module::forward(&candle, &x).unwrap();
        let got = engine.embed(&x).unwrap();
        assert_eq!(got.dims(), want.dims(), "ResNet-{depth}");
        assert_eq!(engine.dim(), want.dim(1).unwrap());
        let err = rel_err(&got, &want);
        assert!(
            err < 1e-4,
            "ResNet-{depth} {n}×{h}×{w}: relative error {err}"
        );
    }
}

/// ResNet-`depth` with random weights under the checkpoint's names (made by candle-transformers'
/// network, also returned), the batch-norm statistics far from the identity so that folding
/// them is tested.
fn random_resnet(
    depth: usize,
    rng: &mut bccp::rng::Rng,
) -> (candle_nn::VarMap, candle_nn::Func<'static>) {
    use candle_transformers::models::resnet;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    let candle = match depth {
        18 => resnet::resnet18_no_final_layer(vb),
        34 => resnet::resnet34_no_final_layer(vb),
        _ => resnet::resnet50_no_final_layer(vb),
    }
    .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let dims = var.as_tensor().dims().to_vec();
        let len: usize = dims.iter().product();
        let (lo, hi) = match name.rsplit('.').next() {
            Some("running_var") => (0.5, 2.0),
            Some("running_mean") | Some("bias") => (-0.2, 0.2),
            Some("weight") if dims.len() == 1 => (0.5, 1.5),
            _ => continue,
        };
        let values: Vec<f32> = (0..len)
            .map(|_| (lo + (hi - lo) * rng.unit_f64()) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap())
            .unwrap();
    }
    (varmap, candle)
}

#[test]
fn bf16_engine_products_keep_the_classes_and_the_features_within_rounding() {
    if !bccp::ops::bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    use bccp::ops::bf16_gemm::Precision;
    // EfficientNet-Lite0 on real photos: the same classes, logits within bf16 rounding.
    let mut model = load(
        "efficientnet_lite0",
        "weights/efficientnet_lite0.safetensors",
    );
    let pre = model.spec().preprocess();
    let paths = vec![asset("photos/chelsea.png"), asset("photos/coffee.png")];
    let batch = bccp::data::loader::load_batch(&paths, 0, &pre, false).unwrap();
    let x = batch.to_tensor(&pre, &Device::Cpu).unwrap();
    let f32_logits = model.logits(&x).unwrap().unwrap();
    model.set_precision(Precision::Bf16).unwrap();
    assert_eq!(model.precision(), Precision::Bf16);
    let bf16_logits = model.logits(&x).unwrap().unwrap();
    let top1: Vec<u32> = bf16_logits.argmax(1).unwrap().to_vec1().unwrap();
    assert!([281, 282, 285].contains(&top1[0]), "chelsea → {}", top1[0]);
    assert_eq!(top1[1], 967, "coffee → {}", top1[1]);
    let err = rel_err(&bf16_logits, &f32_logits);
    // bf16 keeps 8 significant bits (2⁻⁹ relative per operand); PyTorch's autocast lands at
    // 0.114 on MobileNetV2's features (tests/finetune_engine.rs), rounding more than this.
    assert!(err > 0.0 && err < 0.05, "logits off by {err}");
    // Back to f32: the f32 bits again.
    model.set_precision(Precision::F32).unwrap();
    let again = model.logits(&x).unwrap().unwrap();
    assert_eq!(rel_err(&again, &f32_logits), 0.0);

    // ResNet-18 (random weights, batch-norms folded): features within PyTorch's autocast error.
    let mut rng = bccp::rng::Rng::new(5);
    let (varmap, _) = random_resnet(18, &mut rng);
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    let mut resnet = Backbone::from_var_builder(&zoo::find("resnet18").unwrap(), vb).unwrap();
    let pixels: Vec<f32> = (0..2 * 3 * 64 * 64)
        .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
        .collect();
    let x = Tensor::from_vec(pixels, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let want = resnet.embed(&x).unwrap();
    resnet.set_precision(Precision::Bf16).unwrap();
    let err = rel_err(&resnet.embed(&x).unwrap(), &want);
    assert!(err > 0.0 && err < 0.0076, "ResNet-18 features off by {err}");

    // A network off the engine (a trainable copy runs on candle's ops) refuses bf16.
    let spec = zoo::find("mobilenet_v2").unwrap();
    let w = asset("weights/mobilenet_v2.safetensors");
    let (mut trainable, _) = Backbone::load_trainable(&spec, &w, &Device::Cpu).unwrap();
    let msg = trainable
        .set_precision(Precision::Bf16)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("channels-last") && msg.contains("mobilenet_v2"),
        "{msg}"
    );
    trainable.set_precision(Precision::F32).unwrap();
}
