//! The training products of a ResNet-18 convolution on the channels-last engine, f32 against
//! bf16 operands (`--precision bf16`, on CPUs with AVX512-BF16), single-threaded as the engine
//! runs them (one chunk of images per thread): the forward `[m, k] · [k, n]` with its bias and
//! ReLU, the weight gradient `dzᵀ · x` (depth m) and the input gradient `dz · w`. Shapes: a
//! 3×3 convolution of layer1 (64 → 64 channels at 56×56) and of layer4 (512 → 512 at 7×7),
//! over the im2col rows of 4 images.

use bccp::ops::bf16_gemm::{self, Epilogue, Lhs, PackedRhs, Precision, Rhs, Strided};
use bccp::ops::nhwc::Act;
use bccp::ops::nhwc_grad;
use bccp::ops::packed_gemm::{self, PackedWeight};
use bccp::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn values(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.unit_f64() as f32 - 0.5).collect()
}

fn products(c: &mut Criterion) {
    let bf16 = bf16_gemm::available();
    for (name, m, k, n) in [
        ("layer1_3x3", 4 * 56 * 56, 64 * 9, 64),
        ("layer4_3x3", 4 * 7 * 7, 512 * 9, 512),
    ] {
        let mut rng = Rng::new(1);
        let x = values(&mut rng, m * k);
        let w = values(&mut rng, n * k);
        let dz = values(&mut rng, m * n);
        let bias = values(&mut rng, n);
        let mut out = vec![0f32; m * n];
        let mut dw = vec![0f32; n * k];
        let mut dx = vec![0f32; m * k];
        let mut group = c.benchmark_group(format!("products_{name}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let packed = packed_gemm::fused_available().then(|| PackedWeight::new(&w, n, k));
        group.bench_function("forward/f32", |b| {
            b.iter(|| {
                packed_gemm::dense_bias_act(
                    &x,
                    m,
                    &w,
                    packed.as_ref(),
                    &bias,
                    None,
                    Act::Relu,
                    &mut out,
                )
            })
        });
        let mut precisions = vec![Precision::F32];
        if bf16 {
            let packed = PackedRhs::new(Strided::transposed(&w, k), k, n);
            group.bench_function("forward/bf16", |b| {
                b.iter(|| {
                    let e = Epilogue {
                        bias: &bias,
                        residual: None,
                        act: Act::Relu,
                    };
                    bf16_gemm::gemm(
                        (m, n, k),
                        &mut out,
                        false,
                        Lhs::View(Strided::rows(&x, k)),
                        Rhs::Packed(&packed),
                        Some(e),
                    )
                })
            });
            precisions.push(Precision::Bf16);
        }
        for p in precisions {
            group.bench_function(format!("weight_grad/{}", p.name()), |b| {
                b.iter(|| nhwc_grad::weight_grad_acc(p, &dz, &x, &mut dw, (m, k, n)))
            });
            group.bench_function(format!("input_grad/{}", p.name()), |b| {
                b.iter(|| nhwc_grad::input_grad(p, &dz, &w, &mut dx, (m, k, n)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, products);
criterion_main!(benches);
