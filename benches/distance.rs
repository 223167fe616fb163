//! Closest-candidate search throughput on the CPU (k = 1): `distance/{l2,cosine}/d{512,1280}`
//! with Q = 2048, N = 65536, the same with the bf16 pre-selection as
//! `distance/{l2,cosine}_bf16/d{512,1280}` (where the CPU has AVX512-BF16; the queries it could
//! not certify, searched again in f32, are printed), and `distance/l1/d{512,1280}` with
//! Q = 256, N = 65536. One iteration is the whole search. `scripts/compare_distance.py` runs
//! numpy, torch, scipy and faiss on the same sizes in the same run. Threads: RAYON_NUM_THREADS.

use bccp::distance::{bf16, l1_simd, search_host, take_rechecks, Metric, Precision, Search};
use bccp::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const N: usize = 65_536;

/// Standard normal values (Box–Muller on bccp's seeded generator).
fn randn(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..rows * dim)
        .map(|_| {
            let (u, v) = (1.0 - rng.unit_f64(), rng.unit_f64());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn distance(c: &mut Criterion) {
    bccp::runtime::init();
    eprintln!("L1 kernel: {}", l1_simd::selected_name());
    let mut group = c.benchmark_group("distance");
    group.sample_size(10);
    for dim in [512usize, 1280] {
        let candidates = randn(N, dim, 1);
        for (metric, name, q, precision) in [
            (Metric::L2, "l2", 2048usize, Precision::F32),
            (Metric::Cosine, "cosine", 2048, Precision::F32),
            (Metric::L2, "l2_bf16", 2048, Precision::Bf16),
            (Metric::Cosine, "cosine_bf16", 2048, Precision::Bf16),
            (Metric::L1, "l1", 256, Precision::F32),
        ] {
            if precision == Precision::Bf16 && !bf16::available() {
                eprintln!("{name}/d{dim}: skipped, this CPU has no AVX512-BF16");
                continue;
            }
            let queries = randn(q, dim, 2);
            let search = Search {
                metric,
                k: 1,
                other_class: None,
                precision,
            };
            group.throughput(Throughput::Elements((q * N) as u64));
            let _ = take_rechecks();
            let mut searches = 0usize;
            group.bench_function(format!("{name}/d{dim}"), |b| {
                b.iter(|| {
                    searches += 1;
                    search_host(&queries, &candidates, dim, &search).expect("search")
                })
            });
            let r = take_rechecks();
            if precision == Precision::Bf16 {
                eprintln!(
                    "{name}/d{dim}: {} of {} queries per search searched again in f32, {} scanned",
                    r.host_f32 / searches.max(1),
                    q,
                    r.host_scan / searches.max(1)
                );
            }
        }
    }
    group.finish();
}

/// The same workloads on CUDA device 0 (feature `cuda`), as `distance_cuda/...`.
#[cfg(feature = "cuda")]
fn distance_cuda(c: &mut Criterion) {
    use candle_core::{Device, Tensor};
    let dev = Device::new_cuda(0).expect("CUDA device 0");
    let mut group = c.benchmark_group("distance_cuda");
    group.sample_size(10);
    for dim in [512usize, 1280] {
        let candidates = Tensor::from_vec(randn(N, dim, 1), (N, dim), &dev).expect("candidates");
        for (metric, name, q) in [
            (Metric::L2, "l2", 2048usize),
            (Metric::Cosine, "cosine", 2048),
            (Metric::L1, "l1", 256),
        ] {
            let queries = Tensor::from_vec(randn(q, dim, 2), (q, dim), &dev).expect("queries");
            let search = Search {
                metric,
                k: 1,
                other_class: None,
                precision: Precision::F32,
            };
            group.throughput(Throughput::Elements((q * N) as u64));
            group.bench_function(format!("{name}/d{dim}"), |b| {
                b.iter(|| bccp::distance::search(&queries, &candidates, &search).expect("search"))
            });
        }
    }
    group.finish();
}

#[cfg(not(feature = "cuda"))]
criterion_group!(benches, distance);
#[cfg(feature = "cuda")]
criterion_group!(benches, distance, distance_cuda);
criterion_main!(benches);
