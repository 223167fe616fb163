//! `bccp train`, `bccp predict` and `bccp runs` on real Fashion-MNIST with the real MobileNetV2
//! weights, at 64×64 and a few thousand images so the whole file runs in about a minute.

mod common;

use std::path::{Path, PathBuf};

use common::{asset, bccp, failure, success};

/// A prepared Fashion-MNIST dataset (the full train split, mixed corruption) in `dir`.
fn prepared(dir: &Path) -> PathBuf {
    let source = asset("fashion-mnist/train");
    let out = dir.join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "42",
    ]));
    out
}

fn train(days: &Path, runs: &Path, cache: &Path, extra: &[&str]) -> std::process::Output {
    let weights = asset("weights/mobilenet_v2.safetensors");
    let mut args = vec![
        "train",
        "-d",
        days.to_str().unwrap(),
        "--image-size",
        "64",
        "--weights",
        weights.to_str().unwrap(),
        "--device",
        "cpu",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bccp(&args)
}

fn metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

/// Runs `bccp predict --model model` on 20 Monday images (the first ones, or those with `ids`)
/// and counts the right answers.
fn predicted_right(days: &Path, runs: &Path, model: &str, ids: Option<&[u64]>) -> usize {
    let manifest = std::fs::read_to_string(days.join("monday.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = manifest
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| ids.is_none_or(|ids| ids.contains(&r["id"].as_u64().unwrap())))
        .take(20)
        .collect();
    let images: Vec<String> = records
        .iter()
        .map(|r| {
            days.join(r["image_path"].as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec![
        "predict",
        "--model",
        model,
        "--runs-dir",
        runs.to_str().unwrap(),
    ];
    args.extend(images.iter().map(String::as_str));
    let out = success(&bccp(&args));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(days.join("dataset.json")).unwrap()).unwrap();
    let classes: Vec<String> = serde_json::from_value(info["classes"].clone()).unwrap();
    out.lines()
        .zip(&records)
        .filter(|(line, r)| {
            line.split('\t').nth(1)
                == Some(classes[r["target"].as_u64().unwrap() as usize].as_str())
        })
        .count()
}

#[test]
fn monday_probe_tuesday_cutoff_predict_and_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared(tmp.path());
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");

    // Clean Monday labels: the linear probe on frozen MobileNetV2 features (measured 0.865).
    let out = success(&train(
        &days,
        &runs,
        &cache,
        &[
            "-t",
            "monday",
            "--monday-num",
            "3000",
            "--model-name",
            "mon",
        ],
    ));
    assert!(
        out.contains("configuration") && out.contains("registered mon:1"),
        "{out}"
    );
    let m = metrics(&runs.join("mon/1"));
    let acc = m["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.82, "Monday test accuracy {acc}");
    assert_eq!(m["train_size"], 2400);

    // Same seed, same metrics (all but the timings), even with embeddings from the cache.
    success(&train(
        &days,
        &runs,
        &cache,
        &[
            "-t",
            "monday",
            "--monday-num",
            "3000",
            "--model-name",
            "mon",
        ],
    ));
    let mut a = metrics(&runs.join("mon/1"));
    let mut b = metrics(&runs.join("mon/2"));
    a.as_object_mut().unwrap().remove("seconds");
    b.as_object_mut().unwrap().remove("seconds");
    assert_eq!(a, b);

    // 30% flipped Tuesday labels: the default cleansing (combined score, 5-fold, the confident
    // joint's estimate cut per class, replay trusted) finds them (measured precision 0.535,
    // recall 0.961, ROC AUC 0.936: the estimate over-cuts, so recall is high and precision
    // modest; the label_prob_mean default at p90 it replaced had precision 0.92 with recall
    // under 1/3); the reference's score does not.
    let tue = [
        "-t",
        "tuesday",
        "--monday-num",
        "3000",
        "--tuesday-num",
        "3000",
        "-l",
        "user_feedback",
        "--user-accuracy",
        "0.7",
        "-b",
        "Y",
        "-s",
        "l2_norm",
        "-r",
        "0.2",
    ];
    success(&train(
        &days,
        &runs,
        &cache,
        &[&tue[..], &["--model-name", "tue"]].concat(),
    ));
    let m = metrics(&runs.join("tue/1"));
    let precision = m["noise_precision"].as_f64().unwrap();
    let recall = m["noise_recall"].as_f64().unwrap();
    let auc = m["noise_score_auc"].as_f64().unwrap();
    assert!(
        precision > 0.45 && recall > 0.85 && auc > 0.85,
        "noise precision {precision} recall {recall} AUC {auc}: {m}"
    );
    assert_eq!(m["replayed"], 480);
    assert!(m["test_accuracy_tuesday"].as_f64().unwrap() > 0.5);
    success(&train(
        &days,
        &runs,
        &cache,
        &[
            &tue[..],
            &["--model-name", "ref", "--cutoff-score", "logit_sum_var"],
        ]
        .concat(),
    ));
    let reference = metrics(&runs.join("ref/1"))["noise_score_auc"]
        .as_f64()
        .unwrap();
    assert!(
        reference < 0.7,
        "the reference's score should be near chance, AUC {reference}"
    );

    // A simulated review of 5% of the 2 400 Tuesday candidates before the cut-off: spent on the
    // most suspicious flagged samples, nearly every label checked was wrong (measured 117 of 120
    // over 3 seeds); spent on random samples, about the users' error rate (30%, ~36).
    let noisy_before = m["noisy_labels"].as_u64().unwrap();
    for (pick, lo, hi) in [("flagged", 100, 120), ("random", 15, 60)] {
        let name = format!("review-{pick}");
        success(&train(
            &days,
            &runs,
            &cache,
            &[
                &tue[..],
                &["--model-name", &name, "--verify-budget", "0.05"],
                &["--verify-pick", pick],
            ]
            .concat(),
        ));
        let r = metrics(&runs.join(&name).join("1"));
        assert_eq!(r["verified"], 120, "{r}");
        let corrected = r["corrected_by_review"].as_u64().unwrap();
        assert!(
            (lo..=hi).contains(&corrected),
            "{pick}: {corrected} corrected"
        );
        // The corrected labels are no longer wrong in training.
        assert_eq!(
            r["noisy_labels"].as_u64().unwrap(),
            noisy_before - corrected,
            "{r}"
        );
    }

    // Predict with the registered Monday run on its first training images: mostly right.
    let right = predicted_right(&days, &runs, "mon:1", None);
    assert!(right >= 16, "{right}/20 right");

    let listing = success(&bccp(&["runs", "--runs-dir", runs.to_str().unwrap()]));
    assert!(
        listing.contains("mon") && listing.contains("tue") && listing.lines().count() == 7,
        "{listing}"
    );
}

#[test]
fn full_finetune_trains_the_backbone_and_predict_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared(tmp.path());
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");
    // 480 training images, 2 epochs of back-propagation through MobileNetV2 (measured: test
    // accuracy 0.683 against 0.650 for the linear probe with the same settings).
    let full_run = |extra: &[&'static str]| {
        let mut flags = vec![
            "-t",
            "monday",
            "--monday-num",
            "600",
            "--epochs",
            "2",
            "--finetune",
            "full",
        ];
        flags.extend_from_slice(extra);
        success(&train(&days, &runs, &cache, &flags))
    };
    let out = full_run(&["--model-name", "full"]);
    assert!(out.contains("registered full:1"), "{out}");
    let run = runs.join("full/1");
    let acc = metrics(&run)["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "fine-tuned test accuracy {acc}");
    // Both epochs recorded; after the last one the test split scores as the final evaluation
    // does, but for images on a decision boundary (the training engine's forward pass is not
    // bit-equal to the refreshed inference engine's).
    let epochs = metrics(&run)["epochs"].as_array().unwrap().clone();
    assert_eq!(epochs.len(), 2, "{epochs:?}");
    let last = epochs[1]["test_accuracy"].as_f64().unwrap();
    assert!((last - acc).abs() <= 0.02, "last epoch {last}, final {acc}");
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["finetune"], "full");

    // The run carries its backbone, and it moved away from the pretrained weights.
    let tuned =
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let spec = bccp::backbone::zoo::find("mobilenet_v2").unwrap();
    let pretrained: std::collections::HashMap<String, candle_core::Tensor> =
        bccp::backbone::Backbone::load(
            &spec,
            &asset("weights/mobilenet_v2.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .export_tuned()
        .unwrap()
        .into_iter()
        .collect();
    let key = "backbone.features.18.0.weight";
    let moved = common::max_abs_diff(&tuned[key], &pretrained[key]);
    assert!(moved > 0.0, "the last convolution did not change");
    assert!(tuned.contains_key("head.weight"));
    assert!(tuned.keys().filter(|k| k.starts_with("backbone.")).count() > 200);

    // Predict reads the tuned backbone: its training images come out mostly right.
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    let train_ids: Vec<u64> = serde_json::from_value(split["monday_train"].clone()).unwrap();
    let right = predicted_right(&days, &runs, "full", Some(&train_ids[..20]));
    assert!(right >= 15, "{right}/20 right");
    assert_eq!(params["precision"], "f32");

    // The same run with bf16 products (on CPUs with AVX512-BF16) learns as much.
    if !bccp::ops::bf16_gemm::available() {
        eprintln!("bf16 run skipped: this CPU has no AVX512-BF16");
        return;
    }
    let out = full_run(&["--precision", "bf16", "--model-name", "full16"]);
    assert!(out.contains("1 batches per step, bf16 products"), "{out}");
    let run16 = runs.join("full16/1");
    let acc16 = metrics(&run16)["test_accuracy"].as_f64().unwrap();
    eprintln!("test accuracy: f32 products {acc}, bf16 products {acc16}");
    // Learns as much: not more than 6 of the 120 test images worse (the two runs' sums
    // differ, so their trajectories do; measured f32 0.667–0.692, bf16 0.733–0.742).
    assert!(
        acc16 >= acc - 0.05,
        "bf16 products: test accuracy {acc16} against {acc} in f32"
    );
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run16.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["precision"], "bf16");
    let tuned16 =
        candle_core::safetensors::load(run16.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let apart = common::max_abs_diff(&tuned16[key], &tuned[key]);
    assert!(apart > 0.0, "bf16 training ended on the f32 run's weights");
}

#[test]
fn finetune_options_reach_the_run_and_frozen_blocks_keep_their_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared(tmp.path());
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");
    let flags = |freeze: &'static str| {
        vec![
            "-t",
            "monday",
            "--monday-num",
            "200",
            "--epochs",
            "2",
            "--finetune",
            "full",
            "--lr-schedule",
            "cosine",
            "--warmup-epochs",
            "1",
            "--accumulate",
            "2",
            "--freeze-blocks",
            freeze,
            "--model-name",
            "frozen",
        ]
    };
    // Every block of MobileNetV2 frozen (the stem and the 17 inverted-residual blocks): only
    // the final 1×1 convolution (features.18) and the head train.
    let out = success(&train(&days, &runs, &cache, &flags("18")));
    assert!(out.contains("lr schedule        cosine"), "{out}");
    assert!(
        out.contains("first 18 blocks frozen, 2 batches per step"),
        "{out}"
    );
    let run = runs.join("frozen/1");
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["lr_schedule"], "cosine");
    assert_eq!(params["warmup_epochs"], 1);
    assert_eq!(params["accumulate"], 2);
    assert_eq!(params["freeze_blocks"], 18);
    let tuned =
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let spec = bccp::backbone::zoo::find("mobilenet_v2").unwrap();
    let pretrained = bccp::backbone::Backbone::load(
        &spec,
        &asset("weights/mobilenet_v2.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .export_tuned()
    .unwrap();
    let (mut same, mut moved) = (0, 0);
    for (key, value) in &pretrained {
        let layer: usize = key
            .strip_prefix("backbone.features.")
            .and_then(|k| k.split('.').next())
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        let diff = common::max_abs_diff(&tuned[key], value);
        match layer {
            ..=17 => {
                assert_eq!(diff, 0.0, "{key} is frozen but changed");
                same += 1;
            }
            _ if key.ends_with("weight") && !key.contains("running") => {
                moved += usize::from(diff > 0.0);
            }
            _ => {}
        }
    }
    assert!(
        same > 200 && moved > 0,
        "{same} frozen tensors, {moved} moved"
    );

    // Batch-norms in training mode: the frozen blocks' keep their statistics (their exported
    // folds equal the pretrained ones up to unfolding and folding again), the final 1×1
    // convolution's follow the batches.
    let mut bn_flags = flags("18");
    bn_flags.extend(["--bn", "train"]);
    *bn_flags.iter_mut().find(|f| **f == "frozen").unwrap() = "bn";
    let out = success(&train(&days, &runs, &cache, &bn_flags));
    assert!(out.contains("batch-norm in training mode"), "{out}");
    let run = runs.join("bn/1");
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["bn"], "train");
    let tuned =
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut final_bias_moved = 0f32;
    for (key, value) in &pretrained {
        let diff = common::max_abs_diff(&tuned[key], value);
        if key.starts_with("backbone.features.18.") {
            if key.ends_with("1.bias") {
                final_bias_moved = diff;
            }
        } else {
            let err = common::rel_diff(&tuned[key], value, 1.0);
            assert!(
                err <= 1e-5,
                "{key} is frozen but moved {diff} ({err} relative)"
            );
        }
    }
    assert!(final_bias_moved > 1e-3, "{final_bias_moved}");

    // More blocks than MobileNetV2 has.
    let err = failure(&train(&days, &runs, &cache, &flags("19")));
    assert!(
        err.contains("--freeze-blocks 19 is more than mobilenet_v2's 18 blocks"),
        "{err}"
    );
}

#[test]
fn bad_flag_combinations_are_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let days = tmp.path().join("not-prepared");
    std::fs::create_dir_all(&days).unwrap();
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");
    let cases: [(&[&str], &str); 17] = [
        (
            &["-t", "monday", "-b", "Y", "--method", "cleanlab"],
            "cannot be combined with --method cleanlab",
        ),
        (
            &["-t", "monday", "--method", "magic"],
            "possible values: none, bccp, cleanlab, anl_ce",
        ),
        (
            &["-t", "monday", "--method", "cleanlab", "--folds", "1"],
            "--folds 1 must be 2 or more",
        ),
        (
            &["-t", "monday", "--finetune", "partial"],
            "possible values: head, full",
        ),
        (&["-t", "tuesday"], "--tuesday-num is required"),
        (
            &["-t", "tuesday", "--tuesday-num", "10", "-s", "random"],
            "--ratio is required",
        ),
        (
            &["-t", "monday", "-s", "random", "-r", "0.1"],
            "needs --target-day tuesday",
        ),
        (
            &["-t", "monday", "-l", "user_feedback"],
            "needs --target-day tuesday",
        ),
        (
            &[
                "-t",
                "tuesday",
                "--tuesday-num",
                "10",
                "--user-accuracy",
                "1.5",
            ],
            "--user-accuracy",
        ),
        (
            &["-t", "monday", "--verify-budget", "0.1"],
            "--verify-budget simulates a review of users' labels",
        ),
        (&["-t", "monday", "-b", "maybe"], "maybe"),
        (
            &["-t", "monday", "--freeze-blocks", "2"],
            "--freeze-blocks 2 freezes blocks of the backbone, which only --finetune full trains",
        ),
        (
            &["-t", "monday", "--finetune", "full", "--accumulate", "0"],
            "--accumulate 0 must be 1 or more",
        ),
        (
            &["-t", "monday", "--epochs", "2", "--warmup-epochs", "2"],
            "--warmup-epochs 2 must be below --epochs 2",
        ),
        (
            &["-t", "monday", "--lr-schedule", "step"],
            "possible values: decay, cosine",
        ),
        (
            &[
                "-t",
                "monday",
                "--finetune",
                "full",
                "--precision",
                "bf16",
                "--bn",
                "train",
            ],
            "--precision bf16 runs on the channels-last engine on the CPU, which keeps the batch-norms folded",
        ),
        (&["-t", "monday"], "not a prepared dataset"),
    ];
    for (flags, needle) in cases {
        let err = failure(&train(&days, &runs, &cache, flags));
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    assert!(!runs.exists(), "nothing is registered");
}

#[test]
fn a_transformer_fine_tunes_with_bf16_linear_layers() {
    if !bccp::ops::bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    // DINOv2-S with random weights of its checkpoint's names, at 42×42 (a 3×3 patch grid):
    // the pipeline's `--finetune full` on candle's autograd with the linear layers in bf16.
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let weights = tmp.path().join("dinov2.safetensors");
    common::random_weights("dinov2_small", &weights);
    let run = |precision: &str, name: &str| {
        success(&bccp(&[
            "train",
            "-d",
            days.to_str().unwrap(),
            "-t",
            "monday",
            "--backbone",
            "dinov2_small",
            "--weights",
            weights.to_str().unwrap(),
            "--image-size",
            "42",
            "--epochs",
            "1",
            "--finetune",
            "full",
            "--precision",
            precision,
            "--device",
            "cpu",
            "--runs-dir",
            tmp.path().join("runs").to_str().unwrap(),
            "--cache-dir",
            tmp.path().join("cache").to_str().unwrap(),
            "--model-name",
            name,
        ]))
    };
    run("f32", "vit32");
    run("bf16", "vit16");
    let load = |name: &str| {
        candle_core::safetensors::load(
            tmp.path()
                .join("runs")
                .join(name)
                .join("1/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (full, half) = (load("vit32"), load("vit16"));
    let params: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("runs/vit16/1/params.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(params["precision"], "bf16");
    // Both trained the same weights from the same start: the bf16 run's updates point the
    // f32 run's way (Adam's first steps are about ±lr per weight, so a gradient that bf16
    // rounding moves across zero flips its weight's step: compare directions, not values).
    let key = "backbone.blocks.11.mlp.fc2.weight";
    let start = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let step = |tuned: &std::collections::HashMap<String, candle_core::Tensor>| -> Vec<f32> {
        (&tuned[key] - &start["blocks.11.mlp.fc2.weight"])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (step(&full), step(&half));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
    let cosine = dot / (norm(&a) * norm(&b));
    eprintln!("last block's fc2: cosine of the bf16 and f32 updates {cosine:.3}");
    assert!(a != b, "bf16 training ended on the f32 run's weights");
    assert!(
        cosine > 0.8,
        "bf16 and f32 updates disagree: cosine {cosine}"
    );
}

#[test]
fn bf16_embeddings_train_a_head_that_predicts_in_bf16() {
    if !bccp::ops::bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let (runs, cache) = (tmp.path().join("runs"), tmp.path().join("cache"));
    success(&common::quick_train(&days, &runs, &cache, "head32", &[]));
    let out = success(&common::quick_train(
        &days,
        &runs,
        &cache,
        "head16",
        &["--precision", "bf16"],
    ));
    assert!(out.contains("registered head16:1"), "{out}");
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("head16/1/params.json")).unwrap())
            .unwrap();
    assert_eq!(params["precision"], "bf16");
    // The bf16 features went to a cache file of their own, beside the f32 run's.
    let cached = std::fs::read_dir(cache.join("embeddings"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".bin"))
        })
        .count();
    assert_eq!(cached, 2, "embedding cache files");
    // `predict` runs the run's own precision unless told otherwise.
    let images: Vec<String> = (0..3)
        .flat_map(|c| {
            let dir = days.join(format!("monday/class{c}"));
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path().display().to_string())
                .collect();
            names.sort();
            names.truncate(4);
            names
        })
        .collect();
    let predict = |extra: &[&str]| {
        let mut args = vec!["predict", "--model", "head16", "--runs-dir"];
        let runs = runs.to_str().unwrap();
        args.push(runs);
        args.extend_from_slice(extra);
        args.extend(images.iter().map(String::as_str));
        success(&bccp(&args))
    };
    let (default, half, full) = (
        predict(&[]),
        predict(&["--precision", "bf16"]),
        predict(&["--precision", "f32"]),
    );
    assert_eq!(default, half);
    assert_ne!(
        default, full,
        "bf16 and f32 features gave the same confidences"
    );
}
