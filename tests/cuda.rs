//! CUDA paths against the CPU (built only with `--features cuda`; run on a machine with a GPU,
//! see the GPU issue's `scripts/gpu-check.sh`). Without a usable device these tests fail.
#![cfg(feature = "cuda")]

mod common;

use bccp::distance::{search, search_host, Metric, Search};
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
