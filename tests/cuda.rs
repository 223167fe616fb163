//! CUDA paths against the CPU (built only with `--features cuda`; run on a machine with a GPU,
//! see the GPU issue's `scripts/gpu-check.sh`). Without a usable device these tests fail.
#![cfg(feature = "cuda")]

mod common;

use bccp::distance::{search, search_host, take_rechecks, Metric, Neighbors, Precision, Search};
use bccp::ops::{depthwise_conv2d, DepthwiseParams};
use bccp::rng::Rng;
use candle_core::{Device, Tensor, Var};
use common::{max_abs_diff, rel_diff};

fn gpu() -> Device {
    // BCCP_CUDA_TESTS_DEVICE=cpu runs everything on the CPU instead: a logic check of the tests
    // and of scripts/gpu-check.sh on a machine without a GPU (CPU against CPU proves nothing
    // about CUDA).
    if std::env::var("BCCP_CUDA_TESTS_DEVICE").as_deref() == Ok("cpu") {
        return Device::Cpu;
    }
    Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.unit_f64() as f32 - 0.5).collect()
}

fn on_cuda(dev: &Device) -> bool {
    matches!(dev, Device::Cuda(_))
}

/// The device result equals the CPU path's: the same indices and bit-identical values (both
/// re-rank by the same exact f32 values; tolerance 0).
fn assert_same(got: &Neighbors, want: &Neighbors, ctx: &str) {
    assert_eq!(got.k, want.k, "{ctx}");
    assert_eq!(got.indices, want.indices, "{ctx}: indices");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.values), bits(&want.values), "{ctx}: values");
}

/// `n` rows around `centres` centres: every fourth row an exact copy of its centre, the others
/// moved by at most `spread` per coordinate (ties and near-ties that rounding can reorder).
fn clustered(rng: &mut Rng, n: usize, dim: usize, centres: usize, spread: f64) -> Vec<f32> {
    let c = random(rng, centres * dim);
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        for d in 0..dim {
            let x = c[(i % centres) * dim + d];
            let jitter = ((rng.unit_f64() * 2.0 - 1.0) * spread) as f32;
            out.push(if i % 4 == 0 { x } else { x + jitter });
        }
    }
    out
}

/// Runs every metric, each k and with and without the other-class rule on the device and on
/// the CPU path, and compares them exactly.
fn check_all(dev: &Device, q: &[f32], c: &[f32], dim: usize, ks: &[usize], ctx: &str) {
    let (nq, nc) = (q.len() / dim, c.len() / dim);
    let qc: Vec<i64> = (0..nq as i64).map(|i| i % 3).collect();
    let cc: Vec<i64> = (0..nc as i64).map(|i| i % 4).collect();
    let tq = Tensor::from_slice(q, (nq, dim), dev).unwrap();
    let tc = Tensor::from_slice(c, (nc, dim), dev).unwrap();
    for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
        for &k in ks {
            for other in [false, true] {
                let s = Search {
                    metric,
                    k,
                    other_class: other.then_some((&qc[..], &cc[..])),
                    precision: Precision::F32,
                };
                let want = search_host(q, c, dim, &s).unwrap();
                let got = search(&tq, &tc, &s).unwrap();
                assert_same(
                    &got,
                    &want,
                    &format!("{ctx} {metric:?} k={k} other={other}"),
                );
            }
        }
    }
}

#[test]
fn distance_random_inputs_match_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(3);
    // The last case crosses a query tile (4 096 rows) and a candidate tile (16 384 columns).
    for &(nq, nc, dim) in &[
        (7, 33, 3),
        (100, 5000, 512),
        (1, 20000, 1280),
        (4100, 16400, 8),
    ] {
        let q = random(&mut rng, nq * dim);
        let c = random(&mut rng, nc * dim);
        check_all(
            &dev,
            &q,
            &c,
            dim,
            &[1, 5],
            &format!("Q={nq} N={nc} D={dim}"),
        );
    }
}

#[test]
fn distance_sliced_inputs_match_cpu() {
    // Row slices have a non-zero offset in their buffer (the case that used to recurse).
    let dev = gpu();
    let mut rng = Rng::new(4);
    let dim = 24;
    let (q_all, c_all) = (random(&mut rng, 50 * dim), random(&mut rng, 400 * dim));
    let tq = Tensor::from_slice(&q_all, (50, dim), &dev).unwrap();
    let tc = Tensor::from_slice(&c_all, (400, dim), &dev).unwrap();
    let (q, c) = (
        tq.narrow(0, 13, 20).unwrap(),
        tc.narrow(0, 101, 250).unwrap(),
    );
    let (hq, hc) = (&q_all[13 * dim..33 * dim], &c_all[101 * dim..351 * dim]);
    for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
        let s = Search {
            metric,
            k: 5,
            other_class: None,
            precision: Precision::F32,
        };
        let want = search_host(hq, hc, dim, &s).unwrap();
        assert_same(&search(&q, &c, &s).unwrap(), &want, &format!("{metric:?}"));
    }
}

#[test]
fn distance_duplicates_ties_and_every_k_match_cpu() {
    // k = 17 is over the kernels' capacity (the generic path); k = 9 and 16 leave the TF32
    // GEMM less than its margin (f32 GEMMs); exact duplicate clusters larger than the margin
    // force host scans.
    let dev = gpu();
    let mut rng = Rng::new(5);
    for &(nc, dim, spread) in &[(300, 16, 0.0), (300, 64, 1e-6), (2000, 128, 1e-4)] {
        let c = clustered(&mut rng, nc, dim, 7, spread);
        let q = clustered(&mut rng, 40, dim, 7, spread);
        let ctx = format!("N={nc} D={dim} spread={spread}");
        check_all(&dev, &q, &c, dim, &[1, 5, 9, 16, 17], &ctx);
    }
}

#[test]
fn distance_tf32_reordered_near_duplicates_match_cpu() {
    // Neighbours closer together than TF32's rounding (2⁻¹⁰ relative) of the dot products:
    // the TF32 keys reorder them, and only the exact re-ranking and the f32 re-check give the
    // CPU's order.
    let dev = gpu();
    let mut rng = Rng::new(6);
    let dim = 256;
    let c = clustered(&mut rng, 3000, dim, 5, 3e-4);
    let q = clustered(&mut rng, 64, dim, 5, 3e-4);
    let _ = take_rechecks();
    check_all(&dev, &q, &c, dim, &[1, 5], "near-duplicates");
    if on_cuda(&dev) {
        assert!(
            take_rechecks().device_f32 > 0,
            "some TF32 results could not be certified and were re-checked in f32"
        );
    }
}

#[test]
fn distance_small_and_sparse_candidate_sets_match_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(7);
    // N < k + margin: every candidate is kept.
    let (q, c) = (random(&mut rng, 9 * 5), random(&mut rng, 10 * 5));
    check_all(&dev, &q, &c, 5, &[1, 5, 9], "N=10");
    // Few eligible other-class candidates: class 1 holds 2 of 60 rows, so queries of class 0
    // have 2 eligible candidates for k = 5 (three empty slots).
    let dim = 6;
    let (q, c) = (random(&mut rng, 8 * dim), random(&mut rng, 60 * dim));
    let qc = vec![0i64; 8];
    let cc: Vec<i64> = (0..60).map(|i| i64::from(i == 7 || i == 41)).collect();
    let tq = Tensor::from_slice(&q, (8, dim), &dev).unwrap();
    let tc = Tensor::from_slice(&c, (60, dim), &dev).unwrap();
    for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
        let s = Search {
            metric,
            k: 5,
            other_class: Some((&qc, &cc)),
            precision: Precision::F32,
        };
        let want = search_host(&q, &c, dim, &s).unwrap();
        assert_eq!(
            &want.indices[..5],
            &[want.indices[0], want.indices[1], -1, -1, -1]
        );
        assert_same(
            &search(&tq, &tc, &s).unwrap(),
            &want,
            &format!("{metric:?}"),
        );
    }
}

#[test]
fn distance_zero_queries_give_an_empty_result() {
    let dev = gpu();
    let c = Tensor::ones((10, 4), candle_core::DType::F32, &dev).unwrap();
    let q = c.narrow(0, 0, 0).unwrap();
    for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
        let s = Search {
            metric,
            k: 3,
            other_class: None,
            precision: Precision::F32,
        };
        let got = search(&q, &c, &s).unwrap();
        assert!(
            got.indices.is_empty() && got.values.is_empty(),
            "{metric:?}"
        );
    }
}

#[test]
fn distance_l1_at_1280_dims_runs_on_the_kernels() {
    // 8 queries × 1 280 floats (40 KiB) plus the merge buffers used to exceed 48 KiB of shared
    // memory for k > 2; the entry point below errors instead of falling back.
    let dev = gpu();
    let mut rng = Rng::new(8);
    let dim = 1280;
    let (q, c) = (random(&mut rng, 20 * dim), random(&mut rng, 3000 * dim));
    let s = Search {
        metric: Metric::L1,
        k: 5,
        other_class: None,
        precision: Precision::F32,
    };
    let tq = Tensor::from_slice(&q, (20, dim), &dev).unwrap();
    let tc = Tensor::from_slice(&c, (3000, dim), &dev).unwrap();
    let want = search_host(&q, &c, dim, &s).unwrap();
    let got = if on_cuda(&dev) {
        bccp::distance::search_kernels(&tq, &tc, &s).unwrap()
    } else {
        search(&tq, &tc, &s).unwrap()
    };
    assert_same(&got, &want, "L1 D=1280 k=5");
}

#[test]
fn depthwise_matches_cpu_forward_and_backward() {
    let dev = gpu();
    let asymmetric = |stride, (top, bottom, left, right)| DepthwiseParams {
        stride,
        pad_top: top,
        pad_bottom: bottom,
        pad_left: left,
        pad_right: right,
    };
    for (n, c, h, w, k, p) in [
        (2, 8, 17, 13, 3, DepthwiseParams::symmetric(1, 1)),
        (1, 4, 16, 16, 5, DepthwiseParams::symmetric(2, 2)),
        (3, 6, 9, 9, 3, DepthwiseParams::symmetric(2, 0)),
        // TensorFlow's "same" padding at stride 2 (EfficientNet-Lite): one extra row and
        // column at the bottom and right.
        (2, 5, 12, 11, 3, asymmetric((2, 2), (0, 1, 0, 1))),
        (1, 3, 10, 7, 3, asymmetric((1, 2), (1, 0, 2, 1))),
    ] {
        let x = Tensor::randn(0f32, 1., (n, c, h, w), &Device::Cpu).unwrap();
        let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &Device::Cpu).unwrap();
        let cpu_x = Var::from_tensor(&x).unwrap();
        let cpu_w = Var::from_tensor(&wt).unwrap();
        let gpu_x = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let gpu_w = Var::from_tensor(&wt.to_device(&dev).unwrap()).unwrap();
        let y_cpu = depthwise_conv2d(cpu_x.as_tensor(), cpu_w.as_tensor(), p).unwrap();
        let y_gpu = depthwise_conv2d(gpu_x.as_tensor(), gpu_w.as_tensor(), p).unwrap();
        let probe = Tensor::randn(0f32, 1., y_cpu.dims(), &Device::Cpu).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 { max_abs_diff(a, b) };
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

#[test]
fn depthwise_empty_batch_gives_an_empty_output() {
    // A batch of zero images (a view, so nothing of size zero is allocated): nothing is
    // launched and the output has the right empty shape.
    let dev = gpu();
    let x = Tensor::randn(0f32, 1., (2, 4, 9, 9), &dev)
        .unwrap()
        .narrow(0, 0, 0)
        .unwrap();
    let w = Tensor::randn(0f32, 1., (4, 1, 3, 3), &dev).unwrap();
    let y = depthwise_conv2d(&x, &w, DepthwiseParams::symmetric(2, 1)).unwrap();
    assert_eq!(y.dims(), &[0, 4, 5, 5]);
}

/// A random linear head over `f` features and `c` classes on `dev`.
fn random_head(rng: &mut Rng, f: usize, c: usize, dev: &Device) -> bccp::train::Head {
    bccp::train::Head {
        linear: candle_nn::Linear::new(
            Tensor::from_vec(random(rng, c * f), (c, f), dev).unwrap(),
            Some(Tensor::from_vec(random(rng, c), c, dev).unwrap()),
        ),
        classes: c,
    }
}

#[test]
fn fused_mc_cutoff_matches_cpu() {
    use bccp::cutoff::{mc_logits, mc_masks, mc_stats};
    let dev = gpu();
    // More samples than one fused chunk (1024), so the chunking is exercised on both sides.
    let (n, f, c, passes) = (2500, 320, 10, 10);
    let mut rng = Rng::new(11);
    let x = random(&mut rng, n * f);
    let mut head_rng = Rng::new(12);
    let cpu_head = random_head(&mut head_rng, f, c, &Device::Cpu);
    let mut head_rng = Rng::new(12);
    let gpu_head = random_head(&mut head_rng, f, c, &dev);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % c as u32).collect();
    let cpu_x = Tensor::from_slice(&x, (n, f), &Device::Cpu).unwrap();
    let gpu_x = Tensor::from_slice(&x, (n, f), &dev).unwrap();

    for p in [0.5f32, 0.3] {
        let want = mc_stats(&cpu_head, &cpu_x, &labels, passes, p, 7).unwrap();
        let got = mc_stats(&gpu_head, &gpu_x, &labels, passes, p, 7).unwrap();
        assert!(
            got.mean_probs.device().same_device(&dev),
            "statistics stay on the GPU"
        );
        for (name, g, w) in [
            ("mean_probs", &got.mean_probs, &want.mean_probs),
            ("logit_sum_var", &got.logit_sum_var, &want.logit_sum_var),
            ("label_prob_var", &got.label_prob_var, &want.label_prob_var),
            ("mean_entropy", &got.mean_entropy, &want.mean_entropy),
        ] {
            assert_eq!(g.dims(), w.dims(), "{name}");
            let err = rel_diff(g, w, 1e-3);
            assert!(err < 1e-3, "p={p} {name}: relative difference {err}");
        }
    }

    // The unfused building blocks agree too: the same masks on both devices, the same logits.
    let (start, len) = (1000, 300);
    let cpu_masks = mc_masks(9, passes, start, len, f, 0.5, &Device::Cpu).unwrap();
    let gpu_masks = mc_masks(9, passes, start, len, f, 0.5, &dev).unwrap();
    assert_eq!(rel_diff(&gpu_masks, &cpu_masks, 1.0), 0.0, "masks differ");
    let want = mc_logits(&cpu_head, &cpu_x.narrow(0, start, len).unwrap(), &cpu_masks).unwrap();
    let got = mc_logits(&gpu_head, &gpu_x.narrow(0, start, len).unwrap(), &gpu_masks).unwrap();
    assert_eq!(got.dims(), &[passes, len, c]);
    let err = rel_diff(&got, &want, 1e-3);
    assert!(err < 1e-4, "mc_logits: relative difference {err}");
}

#[test]
fn training_step_matches_cpu() {
    use bccp::progress::Progress;
    use bccp::train::{train_head, Loss, TrainConfig};
    let dev = gpu();
    let (n, f, c) = (512, 256, 10);
    let mut rng = Rng::new(21);
    // Class-dependent features, so the gradients are not noise.
    let labels: Vec<u32> = (0..n as u32).map(|i| i % c as u32).collect();
    let mut x = random(&mut rng, n * f);
    for (i, &l) in labels.iter().enumerate() {
        x[i * f + l as usize] += 1.5;
    }
    let cpu_x = Tensor::from_slice(&x, (n, f), &Device::Cpu).unwrap();
    let gpu_x = Tensor::from_slice(&x, (n, f), &dev).unwrap();
    let lr = 1e-3;
    for (what, cfg) in [
        (
            // Exactly one optimiser step: one epoch, one batch.
            "one step",
            TrainConfig {
                epochs: 1,
                batch_size: n,
                lr,
                ..Default::default()
            },
        ),
        (
            "two epochs, batches of 64, dropout 0.5, ANL-CE",
            TrainConfig {
                epochs: 2,
                batch_size: 64,
                lr,
                dropout: 0.5,
                loss: Loss::AnlCe,
                ..Default::default()
            },
        ),
    ] {
        let want = train_head(&cpu_x, &labels, c, &cfg, &Progress::hidden()).unwrap();
        let got = train_head(&gpu_x, &labels, c, &cfg, &Progress::hidden()).unwrap();
        assert!(got.linear.weight().device().same_device(&dev));
        // Adam's first steps move every weight by about ±lr whatever the gradient's size, so a
        // gradient within rounding of zero may step the other way on the GPU: allow a few such
        // parameters (at most 0.1 %), each off by at most 2·lr per step.
        let steps = cfg.epochs * n.div_ceil(cfg.batch_size);
        let diff = |a: &Tensor, b: &Tensor| -> Vec<f32> {
            (&a.to_device(&Device::Cpu).unwrap() - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut d = diff(got.linear.weight(), want.linear.weight());
        d.extend(diff(
            got.linear.bias().unwrap(),
            want.linear.bias().unwrap(),
        ));
        let off = d.iter().filter(|&&v| v > 1e-5).count();
        let max = d.iter().copied().fold(0f32, f32::max);
        assert!(
            off * 1000 <= d.len() && f64::from(max) <= 2.1 * lr * steps as f64,
            "{what}: {off}/{} parameters differ by more than 1e-5 (max {max})",
            d.len()
        );
        // The trained heads give the same logits and predictions.
        let err = rel_diff(
            &got.logits(&gpu_x).unwrap(),
            &want.logits(&cpu_x).unwrap(),
            1e-3,
        );
        let tol = if steps == 1 { 1e-3 } else { 5e-3 };
        assert!(err < tol, "{what}: logits relative difference {err}");
        let same = got
            .predict(&gpu_x)
            .unwrap()
            .iter()
            .zip(&want.predict(&cpu_x).unwrap())
            .filter(|(a, b)| a == b)
            .count();
        assert!(same * 100 >= n * 99, "{what}: {same}/{n} equal predictions");
    }
}

/// A file of the repository: relative to the working directory (the repo root, or a GPU bundle
/// made by scripts/build-cuda.sh), else to where the tests were built.
fn repo_file(rel: &str) -> std::path::PathBuf {
    let here = std::path::PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn mobilenet_v2_embeds_on_cuda_as_on_cpu() {
    use bccp::backbone::{assets_dir, zoo, Backbone};
    let dev = gpu();
    let spec = zoo::find("mobilenet_v2").unwrap();
    let weights = assets_dir().join("weights/mobilenet_v2.safetensors");
    assert!(
        weights.is_file(),
        "{} missing: run scripts/fetch-assets.sh (or set BCCP_ASSETS)",
        weights.display()
    );
    let cpu = Backbone::load(&spec, &weights, &Device::Cpu).unwrap();
    let cuda = Backbone::load(&spec, &weights, &dev).unwrap();

    // Real photos (64×64) with torchvision's features, from tests/fixtures.
    let fixture = candle_core::safetensors::load(
        repo_file("tests/fixtures/mobilenet_v2_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let input = &fixture["input"];
    let want = cpu.embed(input).unwrap();
    let got = cuda.embed(&input.to_device(&dev).unwrap()).unwrap();
    assert_eq!(got.dims(), &[3, 1280]);
    assert!(got.device().same_device(&dev));
    for k in 0..3 {
        let g = got.get(k).unwrap();
        let e = rel_diff(&g, &want.get(k).unwrap(), 1e-6);
        assert!(e < 1e-3, "photo {k}: CUDA vs CPU relative error {e}");
        let e = rel_diff(&g, &fixture["features"].get(k).unwrap(), 1e-6);
        assert!(
            e < 1e-3,
            "photo {k}: CUDA vs torchvision relative error {e}"
        );
    }

    // A full-size random batch (224×224) exercises every layer at the real shapes.
    let x = Tensor::randn(0f32, 1., (4, 3, 224, 224), &Device::Cpu).unwrap();
    let want = cpu.embed(&x).unwrap();
    let got = cuda.embed(&x.to_device(&dev).unwrap()).unwrap();
    for k in 0..4 {
        let e = rel_diff(&got.get(k).unwrap(), &want.get(k).unwrap(), 1e-6);
        assert!(e < 1e-3, "random image {k}: CUDA vs CPU relative error {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput probes for scripts/gpu_compare.py (ignored: run with `--ignored perf_`). Each
// prints `BCCP_PERF {json}` lines. Sizes from the environment, defaults as PyTorch's side:
//   BCCP_PERF_DISTANCE="Q,N,D" (8192,1048576,512), BCCP_PERF_BATCH (256),
//   BCCP_PERF_BUDGET_S seconds of timed repetitions per figure (10), BCCP_PERF_REPS (5).
// ---------------------------------------------------------------------------------------------

fn env_usizes(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}={v}")))
            .collect(),
        _ => default.to_vec(),
    }
}

/// Median seconds of `f` after one warm-up call: as many repetitions as fit the budget, at
/// least one and at most BCCP_PERF_REPS.
fn time_median(dev: &Device, mut f: impl FnMut()) -> (f64, usize) {
    let budget = env_usizes("BCCP_PERF_BUDGET_S", &[10])[0] as f64;
    let max_reps = env_usizes("BCCP_PERF_REPS", &[5])[0].max(1);
    let run = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        dev.synchronize().unwrap();
        t.elapsed().as_secs_f64()
    };
    let warm = run(&mut f);
    let reps = ((budget / warm.max(1e-6)) as usize).clamp(1, max_reps);
    let mut times: Vec<f64> = (0..reps).map(|_| run(&mut f)).collect();
    times.sort_by(f64::total_cmp);
    (times[reps / 2], reps)
}

fn report(fields: serde_json::Value) {
    println!("BCCP_PERF {fields}");
}

#[test]
#[ignore = "throughput probe for scripts/gpu_compare.py"]
fn perf_distance() {
    let dev = gpu();
    let s = env_usizes("BCCP_PERF_DISTANCE", &[8192, 1_048_576, 512]);
    let (q, n, d) = (s[0], s[1], s[2]);
    let candidates = Tensor::randn(0f32, 1., (n, d), &dev).unwrap();
    let queries = Tensor::randn(0f32, 1., (q, d), &dev).unwrap();
    for (metric, name) in [
        (Metric::L2, "l2"),
        (Metric::Cosine, "cosine"),
        (Metric::L1, "l1"),
    ] {
        let search_spec = Search {
            metric,
            k: 1,
            other_class: None,
            precision: Precision::F32,
        };
        let (secs, reps) = time_median(&dev, || {
            search(&queries, &candidates, &search_spec).unwrap();
        });
        report(serde_json::json!({
            "kind": "distance", "metric": name, "q": q, "n": n, "d": d, "k": 1,
            "seconds": secs, "reps": reps,
            "mpairs_per_s": (q * n) as f64 / secs / 1e6,
        }));
    }
}

#[test]
#[ignore = "throughput probe for scripts/gpu_compare.py"]
fn perf_embed() {
    use bccp::backbone::{assets_dir, zoo, Backbone};
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    let dev = gpu();
    let batch = env_usizes("BCCP_PERF_BATCH", &[256])[0];
    let size = env_usizes("BCCP_PERF_SIZE", &[224])[0];
    let x32 = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev).unwrap();
    let weights = assets_dir().join("weights/mobilenet_v2.safetensors");
    for (name, dtype) in [
        ("mobilenet_v2", DType::F32),
        ("mobilenet_v2", DType::BF16),
        ("resnet50", DType::F32),
        ("resnet50", DType::BF16),
    ] {
        let spec = zoo::find(name).unwrap();
        let built = if name == "mobilenet_v2" && dtype == DType::F32 && weights.is_file() {
            Backbone::load(&spec, &weights, &dev)
                .map(|b| (b, "real"))
                .map_err(anyhow::Error::from)
        } else {
            // Random weights (as PyTorch's side: weights=None), as plain tensors like loaded
            // weights (Vars would make every forward pass record a backward graph).
            let varmap = VarMap::new();
            Backbone::from_var_builder(&spec, VarBuilder::from_varmap(&varmap, DType::F32, &dev))
                .and_then(|_| {
                    let tensors: std::collections::HashMap<String, Tensor> = varmap
                        .data()
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                        .collect();
                    Backbone::from_var_builder(
                        &spec,
                        VarBuilder::from_tensors(tensors, dtype, &dev),
                    )
                })
                .map(|b| (b, "random"))
                .map_err(anyhow::Error::from)
        };
        let dt = if dtype == DType::F32 { "f32" } else { "bf16" };
        let outcome = built.and_then(|(model, w)| {
            let x = x32.to_dtype(dtype)?;
            model.embed(&x)?; // fails here when an op has no kernel for the dtype
            let (secs, reps) = time_median(&dev, || {
                model.embed(&x).unwrap();
            });
            Ok((secs, reps, w))
        });
        match outcome {
            Ok((secs, reps, w)) => report(serde_json::json!({
                "kind": "embed", "model": name, "dtype": dt, "batch": batch, "size": size,
                "weights": w, "seconds": secs, "reps": reps,
                "images_per_s": batch as f64 / secs,
            })),
            Err(e) => report(serde_json::json!({
                "kind": "embed", "model": name, "dtype": dt, "batch": batch, "size": size,
                "error": format!("{e:#}").lines().next().unwrap_or("").to_owned(),
            })),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mixed precision (`--precision bf16`) on the GPU: candle's ops on bf16 activations, f32
// weights cast per layer, gradients and optimiser state f32.
// ---------------------------------------------------------------------------------------------

/// `name`'s checkpoint with random weights (batch-norm statistics away from the identity, so
/// folding is exercised), written to `dir`; MobileNetV2's real weights when bundled.
fn weights_for(name: &str, seed: u64, dir: &std::path::Path) -> std::path::PathBuf {
    let real = bccp::backbone::assets_dir().join("weights/mobilenet_v2.safetensors");
    if name == "mobilenet_v2" && real.is_file() {
        return real;
    }
    common::weights::random_checkpoint(name, seed, dir, Some((-0.02, 0.02)))
}

/// Features (on the host) and every variable's gradient of one training step through a fixed
/// linear head and cross-entropy.
fn training_step(
    model: &bccp::backbone::Backbone,
    vars: &[Var],
    x: &Tensor,
    head: &Tensor,
    labels: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    model.set_training(true);
    let features = model.embed(x).unwrap();
    model.set_training(false);
    assert_eq!(
        features.dtype(),
        candle_core::DType::F32,
        "features come back f32"
    );
    let logits = features.matmul(&head.t().unwrap()).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, labels).unwrap();
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("variable {i} {:?} has no gradient", v.dims()));
            assert_eq!(
                g.dtype(),
                candle_core::DType::F32,
                "variable {i}: f32 gradient"
            );
            g.to_device(&Device::Cpu).unwrap()
        })
        .collect();
    (features.to_device(&Device::Cpu).unwrap(), grads)
}

/// Cosine of two lists of tensors taken as one vector each.
fn cosine(a: &[Tensor], b: &[Tensor]) -> f64 {
    let flat = |ts: &[Tensor]| -> Vec<f32> {
        ts.iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let (a, b) = (flat(a), flat(b));
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(&a) * norm(&b)).max(f64::MIN_POSITIVE)
}

#[test]
fn mixed_precision_training_steps_follow_f32_within_bf16_rounding() {
    use bccp::backbone::layers::BnMode;
    use bccp::backbone::{zoo, Backbone};
    use bccp::ops::bf16_gemm::Precision;
    let dev = gpu();
    if !on_cuda(&dev) {
        eprintln!("skipped: bf16 on candle's ops runs on a CUDA GPU (the CPU takes the engine)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // (network, batch-norms, input size, batch, largest relative error of the features)
    let cases = [
        ("mobilenet_v2", BnMode::Frozen, 96, 8, 0.15),
        ("efficientnet_lite0", BnMode::Frozen, 64, 8, 0.15),
        ("resnet18", BnMode::Frozen, 64, 8, 0.1),
        ("resnet18", BnMode::Train, 64, 8, 0.1),
        ("vit_base_patch16_224", BnMode::Frozen, 224, 2, 0.1),
        ("dinov2_small", BnMode::Frozen, 56, 4, 0.1),
    ];
    for (i, (name, bn, size, n, feature_tol)) in cases.into_iter().enumerate() {
        let ctx = format!("{name} (bn {})", bn.name());
        let spec = zoo::find(name).unwrap();
        let weights = weights_for(name, 40 + i as u64, dir.path());
        let (f32_net, f32_vars) = Backbone::load_trainable_bn(&spec, &weights, &dev, bn).unwrap();
        let (mut bf16_net, bf16_vars) =
            Backbone::load_trainable_bn(&spec, &weights, &dev, bn).unwrap();
        bf16_net.set_precision(Precision::Bf16).unwrap();
        assert_eq!(bf16_net.precision(), Precision::Bf16, "{ctx}");
        let mut rng = Rng::new(7 + i as u64);
        let x = Tensor::from_vec(
            random(&mut rng, n * 3 * size * size),
            (n, 3, size, size),
            &dev,
        )
        .unwrap();
        let dim = spec.embedding_dim;
        let head = Tensor::from_vec(random(&mut rng, 10 * dim), (10, dim), &dev)
            .unwrap()
            .affine(0.2, 0.)
            .unwrap();
        let labels = Tensor::from_vec((0..n as u32).map(|j| j % 10).collect(), n, &dev).unwrap();
        let (f32_features, f32_grads) = training_step(&f32_net, &f32_vars, &x, &head, &labels);
        let (bf16_features, bf16_grads) = training_step(&bf16_net, &bf16_vars, &x, &head, &labels);
        // Each training forward moves a training batch-norm's running statistics: read the
        // f32 network's before it runs again below.
        let f32_stats = f32_net.running_stats().unwrap();
        let feature_err = rel_diff(&bf16_features, &f32_features, 1e-6);
        let grad_cos = cosine(&bf16_grads, &f32_grads);
        // How far f32's own gradient moves when the input is rounded to bf16's 8 significant
        // bits (relative noise of ±2⁻⁸); the bf16 path rounds at every layer: allow ten times
        // that (tests/finetune_engine.rs checks the same casts in f16 on the CPU).
        let noise: Vec<f32> = random(&mut rng, n * 3 * size * size)
            .into_iter()
            .map(|v| v * 2f32.powi(-7))
            .collect();
        let noise = Tensor::from_vec(noise, (n, 3, size, size), &dev).unwrap();
        let rounded = (&x + x.mul(&noise).unwrap()).unwrap();
        let (_, moved) = training_step(&f32_net, &f32_vars, &rounded, &head, &labels);
        let baseline = cosine(&moved, &f32_grads);
        eprintln!(
            "{ctx}: features relative error {feature_err:.4}, gradient cosine {grad_cos:.5} (f32 under input rounding {baseline:.5})"
        );
        // bf16 keeps 8 significant bits: the features move, but not far; the step points the
        // same way.
        assert!(
            feature_err > 0.0,
            "{ctx}: bf16 gave the f32 features bit for bit"
        );
        assert!(
            feature_err < feature_tol,
            "{ctx}: features relative error {feature_err}"
        );
        assert!(
            1.0 - grad_cos <= 10.0 * (1.0 - baseline) + 1e-3,
            "{ctx}: gradient cosine {grad_cos} against {baseline} for f32 under input rounding"
        );
        if bn == BnMode::Train {
            // The running statistics moved with the batch's, in f32.
            let stats = bf16_net.running_stats().unwrap();
            assert!(!stats.is_empty(), "{ctx}: running statistics");
            assert!(
                stats.iter().all(|t| t.dtype() == candle_core::DType::F32),
                "{ctx}"
            );
            let err = rel_diff(
                &stats[0].to_device(&Device::Cpu).unwrap(),
                &f32_stats[0].to_device(&Device::Cpu).unwrap(),
                1e-6,
            );
            assert!(err < 0.05, "{ctx}: first running mean relative error {err}");
        }
    }
}

#[test]
#[ignore = "throughput probe for scripts/gpu_compare.py"]
fn perf_finetune() {
    use bccp::backbone::layers::BnMode;
    use bccp::backbone::{zoo, Backbone};
    use bccp::ops::bf16_gemm::Precision;
    use bccp::train::adam::Adam;
    let dev = gpu();
    let size = env_usizes("BCCP_PERF_TRAIN_SIZE", &[224])[0];
    let dir = tempfile::tempdir().unwrap();
    for (name, batch) in [
        ("mobilenet_v2", 64),
        ("resnet18", 64),
        ("vit_base_patch16_224", 32),
    ] {
        let batch = env_usizes("BCCP_PERF_TRAIN_BATCH", &[batch])[0];
        let spec = zoo::find(name).unwrap();
        let weights = weights_for(name, 3, dir.path());
        for precision in [Precision::F32, Precision::Bf16] {
            let outcome = (|| -> anyhow::Result<(f64, usize)> {
                let (mut net, vars) =
                    Backbone::load_trainable_bn(&spec, &weights, &dev, BnMode::Frozen)?;
                net.set_precision(precision)?;
                let dim = spec.embedding_dim;
                let head = candle_core::Var::from_tensor(&Tensor::zeros(
                    (10, dim),
                    candle_core::DType::F32,
                    &dev,
                )?)?;
                let mut all = vars.clone();
                all.push(head.clone());
                let mut adam = Adam::new(all, 1e-4)?;
                let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
                let labels = Tensor::from_vec(
                    (0..batch as u32).map(|j| j % 10).collect::<Vec<u32>>(),
                    batch,
                    &dev,
                )?;
                let mut step = || -> anyhow::Result<()> {
                    let logits = net.embed(&x)?.matmul(&head.as_tensor().t()?)?;
                    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                    adam.step(&loss.backward()?)?;
                    Ok(())
                };
                step()?; // fails here when an op has no kernel for the dtype
                Ok(time_median(&dev, || step().unwrap()))
            })();
            let dt = precision.name();
            match outcome {
                Ok((secs, reps)) => report(serde_json::json!({
                    "kind": "finetune", "model": name, "dtype": dt, "batch": batch, "size": size,
                    "seconds": secs, "reps": reps, "images_per_s": batch as f64 / secs,
                })),
                Err(e) => report(serde_json::json!({
                    "kind": "finetune", "model": name, "dtype": dt, "batch": batch, "size": size,
                    "error": format!("{e:#}").lines().next().unwrap_or("").to_owned(),
                })),
            }
        }
    }
}
