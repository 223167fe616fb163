//! Full fine-tuning throughput on the CPU, batch-norm frozen, Adam, images already decoded: one
//! iteration is one training step (forward, backward, Adam) of one batch.
//! - MobileNetV2 (real weights): `finetune64/channels_last` (the channels-last trainer that
//!   `bccp train --finetune full` runs on the CPU) and `finetune64/candle_autograd` (candle's
//!   autograd on candle's ops, the path before it and the one GPUs take), 64×64, batch 64;
//!   `finetune224/channels_last` at 224×224, batch 32.
//! - ResNet-18 (`finetune224_resnet18/channels_last`, batch 32) at 224×224 on the engine, and
//!   ViT-B/16 (`finetune224_vit_b16/candle_autograd`, batch 8) at 224×224 on candle's
//!   autograd (the path transformers train on), random weights. candle's path is left out
//!   where it takes many seconds per step (ResNet-18: about 10 s on 2 threads).
//! - `finetune224_resnet18/channels_last_im2col`: its 3×3 convolutions through im2col
//!   instead of Winograd's F(2×2, 3×3) (the engine before Winograd, for the ratio).
//! - `…/channels_last_bf16`: the engine with bf16 products (`--precision bf16`), on CPUs
//!   with AVX512-BF16; `finetune224_vit_b16/candle_autograd_bf16`: ViT-B/16's linear layers
//!   on bf16 products (`ops::bf16_linear`).
//!
//! `scripts/bench-finetune.sh` runs PyTorch on the same steps in the same run. Needs
//! `scripts/fetch-assets.sh`. Threads: RAYON_NUM_THREADS.

use std::collections::HashMap;

use bccp::backbone::channels_last::EngineTrainer;
use bccp::backbone::{zoo, Backbone};
use bccp::ops::bf16_gemm::{self, Precision};
use bccp::ops::winograd;
use bccp::progress::Progress;
use bccp::rng::Rng;
use bccp::train::finetune::{finetune_candle, finetune_channels_last, TrainImages};
use bccp::train::TrainConfig;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CLASSES: usize = 10;

/// One group: `(group, backbone, input size, batch, steps per iteration, on the channels-last
/// engine, on candle's autograd)`. An iteration is a run of `steps` batches (one epoch), so
/// that a run's setup (optimiser state, first buffers) weighs on the step time as little as
/// in real runs; `scripts/compare_finetune.py` lists the same batches and steps.
type Shape = (&'static str, &'static str, u32, usize, usize, bool, bool);

const SHAPES: [Shape; 4] = [
    ("finetune64", "mobilenet_v2", 64, 64, 4, true, true),
    ("finetune224", "mobilenet_v2", 224, 32, 3, true, false),
    ("finetune224_resnet18", "resnet18", 224, 32, 3, true, false),
    (
        "finetune224_vit_b16",
        "vit_base_patch16_224",
        224,
        8,
        2,
        false,
        true,
    ),
];

/// `name`'s network with trainable parameters: MobileNetV2's real weights, random ones (as
/// PyTorch's side: `weights=None`) for the others, written to a temporary file and loaded as
/// `bccp train` loads weights.
fn trainable(name: &str) -> (Backbone, Vec<Var>) {
    let spec = zoo::find(name).expect("zoo");
    if name == "mobilenet_v2" {
        let weights = bccp::backbone::assets_dir().join("weights/mobilenet_v2.safetensors");
        return Backbone::load_trainable(&spec, &weights, &Device::Cpu)
            .expect("MobileNetV2 weights: run scripts/fetch-assets.sh");
    }
    let varmap = VarMap::new();
    Backbone::from_var_builder(
        &spec,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("random network");
    // A builder's default is zeros: weights of variance 1 / fan-in, gains near 1, biases
    // and batch-norm statistics near the identity.
    let mut rng = Rng::new(3);
    // In name order, so that the weights do not depend on the map's iteration order.
    let data = varmap.data().lock().expect("varmap");
    let mut named: Vec<_> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let tensors: HashMap<String, Tensor> = named
        .into_iter()
        .map(|(k, v)| {
            let dims = v.as_tensor().dims().to_vec();
            let count: usize = dims.iter().product();
            let (lo, hi) = match (k.rsplit('.').next(), dims.len()) {
                (Some("running_var"), _) => (0.5, 2.0),
                (Some("weight"), 1) => (0.5, 1.5),
                (_, 1) => (-0.2, 0.2),
                _ => {
                    let a = (3.0 / (count / dims[0].max(1)).max(1) as f64).sqrt();
                    (-a, a)
                }
            };
            let values: Vec<f32> = (0..count)
                .map(|_| (lo + (hi - lo) * rng.unit_f64()) as f32)
                .collect();
            let t = Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor");
            (k.clone(), t)
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("bccp-bench-finetune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&tensors, &file).expect("save random weights");
    let loaded = Backbone::load_trainable(&spec, &file, &Device::Cpu).expect("load");
    std::fs::remove_dir_all(&dir).ok();
    loaded
}

fn finetune(c: &mut Criterion) {
    bccp::runtime::init();
    for (group_name, name, size, batch, steps, engine, candle) in SHAPES {
        let (mut model, vars) = trainable(name);
        let spec = model.spec().clone();
        let pre = spec.preprocess_at(Some(size)).expect("preprocess");
        let mut rng = Rng::new(1);
        let images_per_run = batch * steps;
        let pixels: Vec<f32> = (0..images_per_run * pre.len())
            .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
            .collect();
        let images = TrainImages::from_pixels(pixels, &pre).expect("images");
        let labels: Vec<u32> = (0..images_per_run as u32)
            .map(|i| i % CLASSES as u32)
            .collect();
        // One epoch: `steps` steps per call.
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: batch,
            ..Default::default()
        };
        let mut group = c.benchmark_group(group_name);
        group.sample_size(10);
        group.throughput(Throughput::Elements(images_per_run as u64));
        if engine {
            let trainer = EngineTrainer::for_backbone(&model)
                .expect("trainer")
                .expect("a CNN");
            let mut paths = vec![("channels_last", trainer.clone())];
            if name == "resnet18" {
                // Its 3×3 convolutions through im2col instead of Winograd's transforms.
                winograd::set_enabled(false);
                let im2col = EngineTrainer::for_backbone(&model).expect("trainer");
                paths.push(("channels_last_im2col", im2col.expect("a CNN")));
            }
            if bf16_gemm::available() {
                let mut bf16 = trainer;
                bf16.set_precision(Precision::Bf16).expect("bf16");
                paths.push(("channels_last_bf16", bf16));
            }
            for (path, trainer) in paths {
                // Adam's updates re-pack the weights: the im2col path's must stay without
                // Winograd's.
                winograd::set_enabled(path != "channels_last_im2col");
                group.bench_function(path, |b| {
                    b.iter(|| {
                        finetune_channels_last(
                            trainer.clone(),
                            &vars,
                            &images,
                            &labels,
                            CLASSES,
                            &cfg,
                            1e-4,
                            None,
                            &Progress::hidden(),
                            None,
                        )
                        .expect("step")
                    })
                });
            }
            winograd::set_enabled(true);
        }
        if candle {
            let mut paths = vec![("candle_autograd", Precision::F32)];
            // The transformers' linear layers in bf16 (`ops::bf16_linear`).
            if !spec.has_batch_norm() && bf16_gemm::available() {
                paths.push(("candle_autograd_bf16", Precision::Bf16));
            }
            for (path, precision) in paths {
                model.set_precision(precision).expect("precision");
                group.bench_function(path, |b| {
                    b.iter(|| {
                        finetune_candle(
                            &model,
                            vars.clone(),
                            &images,
                            &labels,
                            CLASSES,
                            &cfg,
                            1e-4,
                            None,
                            &Device::Cpu,
                            &Progress::hidden(),
                            None,
                        )
                        .expect("step")
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, finetune);
criterion_main!(benches);
