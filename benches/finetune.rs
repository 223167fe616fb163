//! Full fine-tuning throughput on the CPU, MobileNetV2 (real weights) at 64×64, batch 64,
//! batch-norm frozen, Adam, images already decoded: one iteration is one training step (forward,
//! backward, Adam) of `finetune64/channels_last` (the channels-last trainer that `bccp train
//! --finetune full` runs on the CPU) or `finetune64/candle_autograd` (candle's autograd on
//! candle's ops, the path before it and the one GPUs take). `scripts/bench-finetune.sh` runs
//! PyTorch on the same step in the same run. Needs `scripts/fetch-assets.sh`. Threads:
//! RAYON_NUM_THREADS.

use bccp::backbone::channels_last::TrunkTrainer;
use bccp::backbone::{zoo, Backbone};
use bccp::progress::Progress;
use bccp::rng::Rng;
use bccp::train::finetune::{finetune_candle, finetune_channels_last, TrainImages};
use bccp::train::TrainConfig;
use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 64;
const SIZE: u32 = 64;
const CLASSES: usize = 10;

fn finetune(c: &mut Criterion) {
    bccp::runtime::init();
    let weights = bccp::backbone::assets_dir().join("weights/mobilenet_v2.safetensors");
    let spec = zoo::find("mobilenet_v2").expect("zoo");
    let pre = spec.preprocess_at(Some(SIZE)).expect("preprocess");
    let mut rng = Rng::new(1);
    let pixels: Vec<f32> = (0..BATCH * pre.len())
        .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
        .collect();
    let images = TrainImages::from_pixels(pixels, &pre).expect("images");
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % CLASSES as u32).collect();
    // One epoch of one batch: one step per call.
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: BATCH,
        ..Default::default()
    };
    let (model, vars) = Backbone::load_trainable(&spec, &weights, &Device::Cpu)
        .expect("MobileNetV2 weights: run scripts/fetch-assets.sh");
    let trainer = TrunkTrainer::new(model.trunk().expect("trunk")).expect("trainer");

    let mut group = c.benchmark_group("finetune64");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
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
            )
            .expect("step")
        })
    });
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
            )
            .expect("step")
        })
    });
    group.finish();
}

criterion_group!(benches, finetune);
criterion_main!(benches);
