//! Full fine-tuning throughput on the CPU, MobileNetV2 (real weights), batch-norm frozen, Adam,
//! images already decoded: one iteration is one training step (forward, backward, Adam) of
//! `finetune64/channels_last` (the channels-last trainer that `bccp train --finetune full` runs
//! on the CPU) or `finetune64/candle_autograd` (candle's autograd on candle's ops, the path
//! before it and the one GPUs take), 64×64, batch 64; and `finetune224/channels_last` at
//! 224×224, batch 32 (candle's path is left out there: minutes per sample).
//! `scripts/bench-finetune.sh` runs PyTorch on the same steps in the same run. Needs
//! `scripts/fetch-assets.sh`. Threads: RAYON_NUM_THREADS.

use bccp::backbone::channels_last::TrunkTrainer;
use bccp::backbone::{zoo, Backbone};
use bccp::progress::Progress;
use bccp::rng::Rng;
use bccp::train::finetune::{finetune_candle, finetune_channels_last, TrainImages};
use bccp::train::TrainConfig;
use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CLASSES: usize = 10;

/// `(group, input size, batch, with candle's path)`.
const SHAPES: [(&str, u32, usize, bool); 2] = [
    ("finetune64", 64, 64, true),
    ("finetune224", 224, 32, false),
];

fn finetune(c: &mut Criterion) {
    bccp::runtime::init();
    let weights = bccp::backbone::assets_dir().join("weights/mobilenet_v2.safetensors");
    let spec = zoo::find("mobilenet_v2").expect("zoo");
    let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu)
        .expect("MobileNetV2 weights: run scripts/fetch-assets.sh");
    let trainer = TrunkTrainer::new(model.trunk().expect("trunk")).expect("trainer");
    for (group_name, size, batch, with_candle) in SHAPES {
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
        if with_candle {
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
