//! Embedding throughput on the CPU at 224×224, batch 32: `embed/mobilenet_v2` (real weights,
//! the channels-last engine that `bccp` runs), `embed/mobilenet_v2_candle_ops` (the same
//! network through candle's tensor ops and our depthwise op, i.e. before the engine),
//! `embed/mobilenet_v2_grouped_conv` (candle's ops with its grouped conv, before the depthwise
//! op), `embed/mobilenet_v2_whole_maps` (the engine with every block on whole maps, not in
//! bands of rows; `embed256/…` both at 256×256, the reference server's size), `embed/resnet18` (random weights; `resnet18_candle_ops` the same through
//! candle-transformers' ResNet, before the engine; `resnet18_im2col` the engine with its 3×3
//! convolutions through im2col instead of Winograd's transforms); `embed64/…` the same MobileNetV2 paths at 64×64,
//! batch 64 (the Fashion-MNIST setting); `embed_vit/vit_b16` (ViT-B/16, random weights, batch
//! 8; `…_bf16` its linear layers on bf16 products); and the depthwise layers alone.
//! `scripts/compare_embed.py` runs PyTorch on the 224×224 shapes in the same run.
//! Needs `scripts/fetch-assets.sh` (MobileNetV2 weights). Threads: RAYON_NUM_THREADS.

use bccp::backbone::channels_last::ChannelsLastTrunk;
use bccp::backbone::mobilenet_v2::MobileNetV2;
use bccp::backbone::{zoo, Backbone};
use bccp::ops::bf16_gemm::Precision;
use bccp::ops::depthwise::{grouped_conv_fallback, set_grouped_conv_reference};
use bccp::ops::{depthwise_conv2d, DepthwiseParams};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 32;

fn input(batch: usize, size: usize) -> Tensor {
    Tensor::randn(0f32, 1., (batch, 3, size, size), &Device::Cpu).expect("input")
}

/// MobileNetV2 with the real weights: as `bccp` loads it (channels-last engine) and as a bare
/// network (candle's tensor ops).
fn mobilenets() -> (Backbone, MobileNetV2) {
    let weights = bccp::backbone::assets_dir().join("weights/mobilenet_v2.safetensors");
    let spec = zoo::find("mobilenet_v2").expect("zoo");
    let engine = Backbone::load(&spec, &weights, &Device::Cpu)
        .expect("MobileNetV2 weights: run scripts/fetch-assets.sh");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("weights");
    let ops = MobileNetV2::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
        .expect("MobileNetV2");
    (engine, ops)
}

/// `<name>_bf16`: bf16 products (`bccp … --precision bf16`: the engine's, or a transformer's
/// linear layers), on CPUs that have AVX512-BF16; the backbone is left in f32.
fn bench_bf16(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    backbone: &mut Backbone,
    x: &Tensor,
) {
    if backbone.set_precision(Precision::Bf16).is_err() {
        eprintln!("{name}_bf16: skipped (no AVX512-BF16 on this CPU)");
        return;
    }
    group.bench_function(format!("{name}_bf16"), |b| {
        b.iter(|| backbone.embed(x).expect("forward"))
    });
    backbone.set_precision(Precision::F32).expect("f32");
}

fn embed(c: &mut Criterion) {
    bccp::runtime::init();
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    let x = input(BATCH, 224);

    let (mut mobilenet, mobilenet_ops) = mobilenets();
    group.bench_function("mobilenet_v2", |b| {
        b.iter(|| mobilenet.embed(&x).expect("forward"))
    });
    bench_bf16(&mut group, "mobilenet_v2", &mut mobilenet, &x);
    bench_whole_maps(&mut group, &mobilenet_ops, &x);
    group.bench_function("mobilenet_v2_candle_ops", |b| {
        b.iter(|| mobilenet_ops.embed(&x).expect("forward"))
    });
    set_grouped_conv_reference(true);
    group.bench_function("mobilenet_v2_grouped_conv", |b| {
        b.iter(|| mobilenet_ops.embed(&x).expect("forward"))
    });
    set_grouped_conv_reference(false);

    let varmap = VarMap::new();
    let mut resnet = Backbone::from_var_builder(
        &zoo::find("resnet18").expect("zoo"),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("resnet18");
    group.bench_function("resnet18", |b| {
        b.iter(|| resnet.embed(&x).expect("forward"))
    });
    // Its 3×3 convolutions through im2col instead of Winograd's F(2×2, 3×3).
    bccp::ops::winograd::set_enabled(false);
    resnet.refresh_channels_last().expect("engine");
    group.bench_function("resnet18_im2col", |b| {
        b.iter(|| resnet.embed(&x).expect("forward"))
    });
    bccp::ops::winograd::set_enabled(true);
    resnet.refresh_channels_last().expect("engine");
    bench_bf16(&mut group, "resnet18", &mut resnet, &x);
    let resnet_ops = candle_transformers::models::resnet::resnet18_no_final_layer(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("resnet18");
    group.bench_function("resnet18_candle_ops", |b| {
        b.iter(|| candle_core::Module::forward(&resnet_ops, &x).expect("forward"))
    });
    group.finish();
}

/// `mobilenet_v2_whole_maps`: the channels-last engine with every block on whole maps (as
/// before blocks ran in bands of rows).
fn bench_whole_maps(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    ops: &MobileNetV2,
    x: &Tensor,
) {
    let mut engine = ChannelsLastTrunk::new(ops.trunk()).expect("engine");
    engine.set_bands(None);
    group.bench_function("mobilenet_v2_whole_maps", |b| {
        b.iter(|| engine.embed(x).expect("forward"))
    });
}

/// MobileNetV2 at 256×256, batch 32 (what the reference's server feeds it), in bands of rows
/// (`bccp`'s default) and on whole maps.
fn embed_256(c: &mut Criterion) {
    bccp::runtime::init();
    let mut group = c.benchmark_group("embed256");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    let x = input(BATCH, 256);
    let (mobilenet, mobilenet_ops) = mobilenets();
    group.bench_function("mobilenet_v2", |b| {
        b.iter(|| mobilenet.embed(&x).expect("forward"))
    });
    bench_whole_maps(&mut group, &mobilenet_ops, &x);
    group.finish();
}

fn embed_small(c: &mut Criterion) {
    const SMALL_BATCH: usize = 64;
    bccp::runtime::init();
    let mut group = c.benchmark_group("embed64");
    group.sample_size(10);
    group.throughput(Throughput::Elements(SMALL_BATCH as u64));
    let x = input(SMALL_BATCH, 64);
    let (mut mobilenet, mobilenet_ops) = mobilenets();
    group.bench_function("mobilenet_v2", |b| {
        b.iter(|| mobilenet.embed(&x).expect("forward"))
    });
    bench_bf16(&mut group, "mobilenet_v2", &mut mobilenet, &x);
    group.bench_function("mobilenet_v2_candle_ops", |b| {
        b.iter(|| mobilenet_ops.embed(&x).expect("forward"))
    });
    group.finish();
}

/// ViT-B/16 at 224×224, batch 8 (random weights): candle's ops in f32, and its linear layers
/// on bf16 products (`ops::bf16_linear`).
fn embed_vit(c: &mut Criterion) {
    const VIT_BATCH: usize = 8;
    let x = input(VIT_BATCH, 224);
    let mut group = c.benchmark_group("embed_vit");
    group.sample_size(10);
    group.throughput(Throughput::Elements(VIT_BATCH as u64));
    let varmap = VarMap::new();
    let mut vit = Backbone::from_var_builder(
        &zoo::find("vit_base_patch16_224").expect("zoo"),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("vit");
    group.bench_function("vit_b16", |b| b.iter(|| vit.embed(&x).expect("forward")));
    bench_bf16(&mut group, "vit_b16", &mut vit, &x);
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

criterion_group!(
    benches,
    embed,
    embed_256,
    embed_small,
    embed_vit,
    depthwise_layers
);
criterion_main!(benches);
