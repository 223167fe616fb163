//! The training products of a ResNet-18 convolution on the channels-last engine, f32 against
//! bf16 operands (`--precision bf16`, on CPUs with AVX512-BF16), single-threaded as the engine
//! runs them (one chunk of images per thread): the forward `[m, k] · [k, n]` with its bias and
//! ReLU, the weight gradient `dzᵀ · x` (depth m) and the input gradient `dz · w`. Shapes: a
//! 3×3 convolution of layer1 (64 → 64 channels at 56×56) and of layer4 (512 → 512 at 7×7),
//! over the im2col rows of 4 images. `stem_…`: a stem convolution, direct against im2col.

use bccp::ops::bf16_gemm::{self, Epilogue, Lhs, PackedRhs, Precision, Rhs, Strided};
use bccp::ops::nhwc::{self, Act, ConvGeometry};
use bccp::ops::nhwc_grad;
use bccp::ops::packed_gemm::{self, PackedWeight};
use bccp::ops::stem::{self, StemWeight};
use bccp::ops::winograd::{self, Role, WinogradWeight};
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

/// A whole 3×3 convolution (stride 1, padding 1) of ResNet-18 on 4 channels-last images,
/// through im2col and the products above against Winograd's F(2×2, 3×3)
/// ([`bccp::ops::winograd`]): forward with bias and ReLU, input gradient (products + col2im
/// against the flipped convolution), weight gradient (im2col + product against the transforms).
fn conv3x3(c: &mut Criterion) {
    const IMAGES: usize = 4;
    for (name, size, ch) in [("layer1", 56, 64), ("layer3", 14, 256), ("layer4", 7, 512)] {
        let mut rng = Rng::new(2);
        let (pixels, width) = (IMAGES * size * size, 9 * ch);
        let x = values(&mut rng, pixels * ch);
        let w = values(&mut rng, ch * width);
        let dz = values(&mut rng, pixels * ch);
        let bias = values(&mut rng, ch);
        let g = ConvGeometry::new(size, size, 3, 1, (1, 1, 1, 1)).expect("geometry");
        let packed = packed_gemm::fused_available().then(|| PackedWeight::new(&w, ch, width));
        let forward = WinogradWeight::new(&w, ch, ch, Role::Forward);
        let backward = WinogradWeight::new(&w, ch, ch, Role::InputGrad);
        let mut cols = vec![0f32; pixels * width];
        let mut out = vec![0f32; pixels * ch];
        let mut dw = vec![0f32; ch * width];
        let scratch_len = winograd::conv_scratch(&forward, IMAGES, (size, size)).max(
            winograd::weight_grad_scratch((ch, ch), IMAGES, (size, size)),
        );
        let mut scratch = vec![0f32; scratch_len];
        let im2col = |x: &[f32], cols: &mut [f32]| {
            for (img, dst) in x
                .chunks_exact(size * size * ch)
                .zip(cols.chunks_exact_mut(size * size * width))
            {
                nhwc::im2col_hwc(img, ch, &g, dst);
            }
        };
        let mut group = c.benchmark_group(format!("conv3x3_{name}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements((2 * pixels * ch * width) as u64));
        group.bench_function("forward/im2col", |b| {
            b.iter(|| {
                im2col(&x, &mut cols);
                let p = packed.as_ref();
                packed_gemm::dense_bias_act(&cols, pixels, &w, p, &bias, None, Act::Relu, &mut out)
            })
        });
        group.bench_function("forward/winograd", |b| {
            b.iter(|| {
                let (x, s) = (&x, &mut scratch);
                winograd::conv(
                    x,
                    IMAGES,
                    (size, size),
                    &forward,
                    Some(&bias),
                    None,
                    Act::Relu,
                    &mut out,
                    s,
                )
            })
        });
        group.bench_function("input_grad/col2im", |b| {
            b.iter(|| {
                nhwc_grad::input_grad(Precision::F32, &dz, &w, &mut cols, (pixels, width, ch));
                out.fill(0.0);
                for (dcols, dx) in cols
                    .chunks_exact(size * size * width)
                    .zip(out.chunks_exact_mut(size * size * ch))
                {
                    nhwc_grad::col2im_hwc_acc(dcols, ch, &g, dx);
                }
            })
        });
        group.bench_function("input_grad/winograd", |b| {
            b.iter(|| {
                let (dz, s) = (&dz, &mut scratch);
                winograd::conv(
                    dz,
                    IMAGES,
                    (size, size),
                    &backward,
                    None,
                    None,
                    Act::Identity,
                    &mut out,
                    s,
                )
            })
        });
        group.bench_function("weight_grad/im2col", |b| {
            b.iter(|| {
                im2col(&x, &mut cols);
                nhwc_grad::weight_grad_acc(Precision::F32, &dz, &cols, &mut dw, (pixels, width, ch))
            })
        });
        group.bench_function("weight_grad/winograd", |b| {
            b.iter(|| {
                let s = &mut scratch;
                winograd::weight_grad_acc(&x, &dz, IMAGES, (size, size), (ch, ch), &mut dw, s)
            })
        });
        group.finish();
    }
}

/// A stem on one channels-first image (MobileNetV2's 3 → 32, 3×3, stride 2 at 256×256, the
/// reference server's size; ResNet's 3 → 64, 7×7, stride 2 at 224×224): the direct kernel
/// ([`bccp::ops::stem`]) against im2col of a block of output rows and its product, as the
/// engine ran stems before.
fn stems(c: &mut Criterion) {
    for (name, size, k, pad, cout) in [
        ("mobilenet256", 256, 3, 1, 32),
        ("resnet224", 224, 7, 3, 64),
    ] {
        let mut rng = Rng::new(3);
        let cin = 3;
        let cols = cin * k * k;
        let g = ConvGeometry::new(size, size, k, 2, (pad, pad, pad, pad)).expect("geometry");
        let x = values(&mut rng, cin * size * size);
        let w = values(&mut rng, cout * cols);
        let bias = values(&mut rng, cout);
        let mut out = vec![0f32; g.out_h * g.out_w * cout];
        let packed = packed_gemm::fused_available().then(|| PackedWeight::new(&w, cout, cols));
        let block = (64 * 1024 / (g.out_w * cols)).clamp(1, g.out_h);
        let mut scratch = vec![0f32; block * g.out_w * cols];
        let direct = StemWeight::new(&w, cout, cin, k).expect("stem weight");
        let kernel = stem::stem_kernel();
        let mut group = c.benchmark_group(format!("stem_{name}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements(
            (2 * g.out_h * g.out_w * cout * cols) as u64,
        ));
        group.bench_function("im2col_product", |b| {
            b.iter(|| {
                for oy in (0..g.out_h).step_by(block) {
                    let rows = oy..(oy + block).min(g.out_h);
                    let m = rows.len() * g.out_w;
                    nhwc::im2col_chw_range(&x, cin, &g, rows, &mut scratch);
                    let out = &mut out[oy * g.out_w * cout..][..m * cout];
                    let p = packed.as_ref();
                    packed_gemm::dense_bias_act(&scratch, m, &w, p, &bias, None, Act::Relu6, out)
                }
            })
        });
        group.bench_function("direct", |b| {
            b.iter(|| kernel(&x, &direct, &bias, &g, Act::Relu6, 0..g.out_h, &mut out))
        });
        group.finish();
    }
}

criterion_group!(benches, products, conv3x3, stems);
criterion_main!(benches);
