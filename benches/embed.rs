//! Embedding throughput on the CPU at 224×224, batch 32: `embed/mobilenet_v2` (real weights,
//! our depthwise op), `embed/mobilenet_v2_grouped_conv` (the same with candle's grouped conv,
//! i.e. before the op), `embed/resnet18` (random weights), and the depthwise layers alone.
//! `scripts/compare_embed.py` runs PyTorch on the same shapes in the same run.
//! Needs `scripts/fetch-assets.sh` (MobileNetV2 weights). Threads: RAYON_NUM_THREADS.

use bccp::backbone::{zoo, Backbone};
use bccp::ops::depthwise::{grouped_conv_fallback, set_grouped_conv_reference};
use bccp::ops::{depthwise_conv2d, DepthwiseParams};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 32;

fn input() -> Tensor {
    Tensor::randn(0f32, 1., (BATCH, 3, 224, 224), &Device::Cpu).expect("input")
}

fn embed(c: &mut Criterion) {
    bccp::runtime::init();
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    let x = input();

    let assets = bccp::backbone::assets_dir();
    let spec = zoo::find("mobilenet_v2").expect("zoo");
    let mobilenet = Backbone::load(
        &spec,
        &assets.join("weights/mobilenet_v2.safetensors"),
        &Device::Cpu,
    )
    .expect("MobileNetV2 weights: run scripts/fetch-assets.sh");
    group.bench_function("mobilenet_v2", |b| {
        b.iter(|| mobilenet.embed(&x).expect("forward"))
    });
    set_grouped_conv_reference(true);
    group.bench_function("mobilenet_v2_grouped_conv", |b| {
        b.iter(|| mobilenet.embed(&x).expect("forward"))
    });
    set_grouped_conv_reference(false);

    let varmap = VarMap::new();
    let resnet = Backbone::from_var_builder(
        &zoo::find("resnet18").expect("zoo"),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("resnet18");
    group.bench_function("resnet18", |b| {
        b.iter(|| resnet.embed(&x).expect("forward"))
    });
    group.finish();
}

fn depthwise_layers(c: &mut Criterion) {
    // MobileNetV2's depthwise shapes at batch 32: (channels, size, stride).
    let mut group = c.benchmark_group("depthwise");
    group.sample_size(10);
    for (channels, size, stride) in [(96, 112, 2), (144, 56, 1), (384, 14, 1), (960, 7, 1)] {
        let x = Tensor::randn(0f32, 1., (BATCH, channels, size, size), &Device::Cpu).expect("x");
        let w = Tensor::randn(0f32, 1., (channels, 1, 3, 3), &Device::Cpu).expect("w");
        let p = DepthwiseParams::symmetric(stride, 1);
        let id = format!("{channels}x{size}s{stride}");
        group.bench_function(format!("direct/{id}"), |b| {
            b.iter(|| depthwise_conv2d(&x, &w, p).expect("dw"))
        });
        group.bench_function(format!("grouped/{id}"), |b| {
            b.iter(|| grouped_conv_fallback(&x, &w, p).expect("dw"))
        });
    }
    group.finish();
}

criterion_group!(benches, embed, depthwise_layers);
criterion_main!(benches);
