//! CUDA paths against the CPU (built only with `--features cuda`; run on a machine with a GPU,
//! see the GPU issue's `scripts/gpu-check.sh`). Without a usable device these tests fail.
#![cfg(feature = "cuda")]

use bccp::distance::{search, search_host, Metric, Search};
use bccp::ops::{depthwise_conv2d, DepthwiseParams};
use bccp::rng::Rng;
use candle_core::{Device, Tensor, Var};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.unit_f64() as f32 - 0.5).collect()
}

#[test]
fn distance_search_matches_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(3);
    for &(nq, nc, dim) in &[(7, 33, 3), (100, 5000, 512), (1, 20000, 1280)] {
        let q = random(&mut rng, nq * dim);
        let c = random(&mut rng, nc * dim);
        let qc: Vec<i64> = (0..nq as i64).map(|i| i % 3).collect();
        let cc: Vec<i64> = (0..nc as i64).map(|i| i % 4).collect();
        let tq = Tensor::from_slice(&q, (nq, dim), &dev).unwrap();
        let tc = Tensor::from_slice(&c, (nc, dim), &dev).unwrap();
        for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
            for (k, other) in [(1, false), (5, true)] {
                let s = Search {
                    metric,
                    k,
                    other_class: other.then_some((&qc[..], &cc[..])),
                };
                let want = search_host(&q, &c, dim, &s).unwrap();
                let got = search(&tq, &tc, &s).unwrap();
                let same = got
                    .indices
                    .iter()
                    .zip(&want.indices)
                    .filter(|(a, b)| a == b)
                    .count();
                assert!(
                    same as f64 >= 0.99 * want.indices.len() as f64,
                    "{metric:?} k={k}: {same}/{}",
                    want.indices.len()
                );
                for (a, b) in got.values.iter().zip(&want.values) {
                    assert!(
                        (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                        "{metric:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn depthwise_matches_cpu_forward_and_backward() {
    let dev = gpu();
    for (n, c, h, w, k, s, pad) in [
        (2, 8, 17, 13, 3, 1, 1),
        (1, 4, 16, 16, 5, 2, 2),
        (3, 6, 9, 9, 3, 2, 0),
    ] {
        let p = DepthwiseParams::symmetric(s, pad);
        let x = Tensor::randn(0f32, 1., (n, c, h, w), &Device::Cpu).unwrap();
        let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &Device::Cpu).unwrap();
        let cpu_x = Var::from_tensor(&x).unwrap();
        let cpu_w = Var::from_tensor(&wt).unwrap();
        let gpu_x = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let gpu_w = Var::from_tensor(&wt.to_device(&dev).unwrap()).unwrap();
        let y_cpu = depthwise_conv2d(cpu_x.as_tensor(), cpu_w.as_tensor(), p).unwrap();
        let y_gpu = depthwise_conv2d(gpu_x.as_tensor(), gpu_w.as_tensor(), p).unwrap();
        let probe = Tensor::randn(0f32, 1., y_cpu.dims(), &Device::Cpu).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a.to_device(&Device::Cpu).unwrap() - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&y_gpu, &y_cpu) < 1e-4);
        let g_cpu = (y_cpu * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_gpu = (y_gpu * probe.to_device(&dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            diff(
                g_gpu.get(gpu_x.as_tensor()).unwrap(),
                g_cpu.get(cpu_x.as_tensor()).unwrap()
            ) < 1e-3
        );
        assert!(
            diff(
                g_gpu.get(gpu_w.as_tensor()).unwrap(),
                g_cpu.get(cpu_w.as_tensor()).unwrap()
            ) < 1e-3
        );
    }
}
