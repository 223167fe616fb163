//! Full fine-tuning throughput on the CPU, batch-norm frozen, Adam, images already decoded: one
//! iteration is one training step (forward, backward, Adam) of one batch.
//! - MobileNetV2 (real weights): `finetune64/channels_last` (the channels-last trainer that
//!   `bccp train --finetune full` runs on the CPU) and `finetune64/candle_autograd` (candle's
//!   autograd on candle's ops, the path before it and the one GPUs take), 64×64, batch 64;
//!   `finetune224/channels_last` at 224×224, batch 32 (candle's path is left out there:
//!   minutes per sample).
//! - ResNet-18 (`finetune224_resnet18`, batch 32) and ViT-B/16 (`finetune224_vit_b16`,
//!   batch 8) at 224×224, random weights, on candle's autograd: the path they train on.
//!
//! `scripts/bench-finetune.sh` runs PyTorch on the same steps in the same run. Needs
//! `scripts/fetch-assets.sh`. Threads: RAYON_NUM_THREADS.

use std::collections::HashMap;

use bccp::backbone::channels_last::TrunkTrainer;
use bccp::backbone::{zoo, Backbone};
use bccp::progress::Progress;
use bccp::rng::Rng;
use bccp::train::finetune::{finetune_candle, finetune_channels_last, TrainImages};
use bccp::train::TrainConfig;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CLASSES: usize = 10;

/// One group: `(group, backbone, input size, batch, on the channels-last engine, on candle's
/// autograd)`.
type Shape = (&'static str, &'static str, u32, usize, bool, bool);

const SHAPES: [Shape; 4] = [
    ("finetune64", "mobilenet_v2", 64, 64, true, true),
    ("finetune224", "mobilenet_v2", 224, 32, true, false),
    ("finetune224_resnet18", "resnet18", 224, 32, false, true),
    (
        "finetune224_vit_b16",
        "vit_base_patch16_224",
        224,
        8,
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
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
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
    for (group_name, name, size, batch, engine, candle) in SHAPES {
        let (model, vars) = trainable(name);
        let spec = model.spec().clone();
        let pre = spec.preprocess_at(Some(size)).expect("preprocess");
        let mut rng = Rng::new(1);
        let pixels: Vec<f32> = (0..batch * pre.len())
            .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
            .collect();
        let images = TrainImages::from_pixels(pixels, &pre).expect("images");
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % CLASSES as u32).collect();
        // One epoch of one batch: one step per call.
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: batch,
            ..Default::default()
        };
        let mut group = c.benchmark_group(group_name);
        group.sample_size(10);
        group.throughput(Throughput::Elements(batch as u64));
        if engine {
            let trainer = TrunkTrainer::new(model.trunk().expect("trunk")).expect("trainer");
            group.bench_function("channels_last", |b| {
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
        if candle {
            group.bench_function("candle_autograd", |b| {
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
        group.finish();
    }
}

criterion_group!(benches, finetune);
criterion_main!(benches);
