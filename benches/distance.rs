//! Closest-candidate search throughput on the CPU (k = 1): `distance/{l2,cosine}/d{512,1280}`
//! with Q = 2048, N = 65536, and `distance/l1/d{512,1280}` with Q = 256, N = 65536. One
//! iteration is the whole search. `scripts/compare_distance.py` runs numpy, torch, scipy and
//! faiss on the same sizes in the same run. Threads: RAYON_NUM_THREADS.

use bccp::distance::{l1_simd, search_host, Metric, Search};
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
        for (metric, name, q) in [
            (Metric::L2, "l2", 2048usize),
            (Metric::Cosine, "cosine", 2048),
            (Metric::L1, "l1", 256),
        ] {
            let queries = randn(q, dim, 2);
            let search = Search {
                metric,
                k: 1,
                other_class: None,
            };
            group.throughput(Throughput::Elements((q * N) as u64));
            group.bench_function(format!("{name}/d{dim}"), |b| {
                b.iter(|| search_host(&queries, &candidates, dim, &search).expect("search"))
            });
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
