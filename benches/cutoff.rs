//! The MC-dropout cut-off: T = 10 fused passes (`cutoff::mc_stats`: masks [T, n, F] → logits →
//! reductions, per chunk) against 10 separate passes that each bring their logits back to the
//! host (the reference's loop), on n = 24 000 samples of 1280-d features, 10 classes.

use bccp::cutoff::{mc_logits, mc_masks, mc_stats};
use bccp::rng::Rng;
use bccp::train::Head;
use candle_core::{Device, Tensor};
use candle_nn::Linear;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const N: usize = 24_000;
const F: usize = 1280;
const C: usize = 10;
const T: usize = 10;

fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.unit_f64() as f32 - 0.5).collect()
}

fn cutoff(c: &mut Criterion) {
    bccp::runtime::init();
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    let x = Tensor::from_vec(random(&mut rng, N * F), (N, F), &dev).expect("x");
    let head = Head {
        linear: Linear::new(
            Tensor::from_vec(random(&mut rng, C * F), (C, F), &dev).expect("w"),
            Some(Tensor::from_vec(random(&mut rng, C), C, &dev).expect("b")),
        ),
        classes: C,
    };
    let labels: Vec<u32> = (0..N as u32).map(|i| i % C as u32).collect();
    let mut group = c.benchmark_group("cutoff");
    group.sample_size(10);
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("fused_t10", |b| {
        b.iter(|| mc_stats(&head, &x, &labels, T, 0.5, 7).expect("mc"))
    });
    group.bench_function("separate_t10", |b| {
        b.iter(|| {
            // One pass at a time, each pass's logits copied to the host, statistics there.
            let mut sums = vec![0f64; N];
            let mut sq = vec![0f64; N];
            for t in 0..T {
                let masks = mc_masks(7 + t as u64, 1, 0, N, F, 0.5, &dev).expect("masks");
                let logits = mc_logits(&head, &x, &masks)
                    .expect("logits")
                    .squeeze(0)
                    .expect("squeeze");
                let host = logits.to_vec2::<f32>().expect("to host");
                for (i, row) in host.iter().enumerate() {
                    let s: f64 = row.iter().map(|&v| f64::from(v)).sum();
                    sums[i] += s;
                    sq[i] += s * s;
                }
            }
            sums.iter()
                .zip(&sq)
                .map(|(s, q)| q / T as f64 - (s / T as f64).powi(2))
                .collect::<Vec<f64>>()
        })
    });
    group.finish();
}

criterion_group!(benches, cutoff);
criterion_main!(benches);
