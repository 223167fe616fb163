//! Regression tests of the reliability probe's findings that live in the command line and the
//! registry: a target out of range refused before any work, staging folders removed on SIGTERM
//! and after a killed process, atomic `closest` output, a NaN head and incomplete versions
//! refused by `predict`, and messages that name the cause.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{asset, bccp, entries, failure, make_folder, prepared_small, quick_train, success};

fn train(days: &Path, runs: &Path, extra: &[&str]) -> std::process::Output {
    quick_train(days, runs, &runs.with_extension("cache"), "m", extra)
}

#[test]
fn a_target_out_of_range_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let manifest = days.join("monday.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut record: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
    record["target"] = serde_json::json!(99);
    lines[4] = record.to_string();
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    let runs = tmp.path().join("runs");
    let err = failure(&train(&days, &runs, &[]));
    assert!(
        err.contains("monday.jsonl, line 5")
            && err.contains("target 99")
            && err.contains("3 classes"),
        "{err}"
    );
    assert!(!runs.exists(), "nothing registered");
    let err = failure(&bccp(&["info", days.to_str().unwrap()]));
    assert!(err.contains("line 5") && err.contains("target 99"), "{err}");
}

/// The PID of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn an_interrupted_prepare_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("days");
    let staging_prefix = ".days.staging-";
    // SIGTERM while prepare writes 60 000 Fashion-MNIST images into its staging folder.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args(["--quiet", "prepare", "--source"])
        .arg(asset("fashion-mnist/train"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let staging = loop {
        let found = entries(tmp.path())
            .into_iter()
            .find(|n| n.starts_with(staging_prefix));
        if let Some(name) = found {
            break tmp.path().join(name);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no staging folder appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let it write some images first.
    while common::files(&staging).len() < 50 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(128 + 15),
        "exit 143 after SIGTERM"
    );
    assert!(!staging.exists(), "staging folder removed");
    assert!(!out.exists());
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));

    // A staging folder a killed process left behind is removed by the next run.
    let stale = tmp.path().join(format!("{staging_prefix}{}", dead_pid()));
    std::fs::create_dir_all(stale.join("monday")).unwrap();
    let source = tmp.path().join("source");
    make_folder(&source, &[4, 4]);
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!stale.exists(), "stale staging folder removed");
    assert_eq!(entries(tmp.path()), ["days", "source"]);
}

#[test]
fn closest_writes_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    make_folder(&source, &[3, 3]);
    let emb = tmp.path().join("e.safetensors");
    let weights = asset("weights/mobilenet_v2.safetensors");
    success(&bccp(&[
        "embed",
        "--data",
        source.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image-size",
        "32",
        "--no-cache",
        "--device",
        "cpu",
        "--out",
        emb.to_str().unwrap(),
    ]));
    let dir = tmp.path().join("outdir");
    std::fs::create_dir(&dir).unwrap();
    let err = failure(&bccp(&[
        "closest",
        "--queries",
        emb.to_str().unwrap(),
        "--candidates",
        emb.to_str().unwrap(),
        "--metric",
        "l2",
        "--device",
        "cpu",
        "--out",
        dir.to_str().unwrap(),
    ]));
    assert!(err.contains("--out") && err.contains("outdir"), "{err}");
    assert_eq!(entries(tmp.path()), ["e.safetensors", "outdir", "source"]);
    assert!(entries(&dir).is_empty());
}

#[test]
fn predict_refuses_a_nan_head_and_skips_incomplete_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");
    success(&train(&days, &runs, &[]));
    success(&train(&days, &runs, &[]));
    let image = days.join(
        serde_json::from_str::<serde_json::Value>(
            std::fs::read_to_string(days.join("monday.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap()["image_path"]
            .as_str()
            .unwrap(),
    );
    let predict = |model: &str| {
        bccp(&[
            "predict",
            "--model",
            model,
            "--runs-dir",
            runs.to_str().unwrap(),
            "--device",
            "cpu",
            image.to_str().unwrap(),
        ])
    };
    // An empty version folder (made by hand, or by an older bccp) is skipped, and listed.
    std::fs::create_dir_all(runs.join("m/7")).unwrap();
    let by_latest = success(&predict("m"));
    assert_eq!(by_latest, success(&predict("m:2")));
    let listing = success(&bccp(&["runs", "--runs-dir", runs.to_str().unwrap()]));
    assert!(
        listing
            .lines()
            .any(|l| l.contains(" 7 ") && l.contains("incomplete")),
        "{listing}"
    );

    // A head with a NaN, even with a matching checksum, is refused naming the file.
    let model = runs.join("m/2/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&model, &candle_core::Device::Cpu).unwrap();
    let bias = tensors["head.bias"].clone();
    let mut values = bias.to_vec1::<f32>().unwrap();
    values[1] = f32::NAN;
    tensors.insert(
        "head.bias".into(),
        candle_core::Tensor::new(values.as_slice(), &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &model).unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let provenance = runs.join("m/2/provenance.json");
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&provenance).unwrap()).unwrap();
    p["model_sha256"] = serde_json::json!(bccp::backbone::cache::hex(
        &bccp::backbone::cache::sha256(&bytes)
    ));
    std::fs::write(&provenance, p.to_string()).unwrap();
    let err = failure(&predict("m:2"));
    assert!(
        err.contains("m/2/model.safetensors") && err.contains("head.bias") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn messages_name_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");

    // A cut-off that cuts everything says so.
    let err = failure(&train(
        &days,
        &runs,
        &[
            "--method",
            "bccp",
            "--cutoff-percentile",
            "0",
            "--cutoff-action",
            "drop",
        ],
    ));
    assert!(
        err.contains("removed all") && err.contains("cutoff percentile 0"),
        "{err}"
    );

    // A split that leaves a day empty is refused with the counts.
    let source = tmp.path().join("source");
    let out = tmp.path().join("tiny");
    let err = failure(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--split",
        "0.001",
    ]));
    assert!(
        err.contains("--split") && err.contains("Monday 0 and Tuesday 36"),
        "{err}"
    );
    assert!(!out.exists());

    // An image where a folder or manifest is expected.
    let png = source.join("class0/img000.png");
    let err = failure(&bccp(&[
        "embed",
        "--data",
        png.to_str().unwrap(),
        "--out",
        tmp.path().join("e.safetensors").to_str().unwrap(),
    ]));
    assert!(
        err.contains("image folder") && err.contains("manifest"),
        "{err}"
    );

    // IDX images of 0×0 pixels: the input file is named, not a staging path.
    let images = tmp.path().join("images.idx");
    let labels = tmp.path().join("labels.idx");
    let mut idx = vec![0, 0, 8, 3];
    for d in [1u32, 0, 0] {
        idx.extend_from_slice(&d.to_be_bytes());
    }
    std::fs::write(&images, idx).unwrap();
    std::fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 1, 0]).unwrap();
    let err = failure(&bccp(&[
        "import",
        "idx",
        "--images",
        images.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--classes",
        "a",
        "--out",
        tmp.path().join("imported").to_str().unwrap(),
    ]));
    assert!(err.contains("images.idx") && err.contains("0×0"), "{err}");
    assert!(!err.contains("staging"), "{err}");
}

#[test]
fn predict_refuses_changed_backbone_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");
    let weights = tmp.path().join("w.safetensors");
    std::fs::copy(asset("weights/mobilenet_v2.safetensors"), &weights).unwrap();
    let cache = tmp.path().join("cache");
    success(&bccp(&[
        "train",
        "-d",
        days.to_str().unwrap(),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--weights",
        weights.to_str().unwrap(),
        "--device",
        "cpu",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--model-name",
        "w",
    ]));
    let image = std::fs::read_dir(days.join("monday/class0"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let predict = || {
        bccp(&[
            "predict",
            "--model",
            "w",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--device",
            "cpu",
            "--cache-dir",
            cache.to_str().unwrap(),
            image.to_str().unwrap(),
        ])
    };
    success(&predict());
    // The same file name with other weights: refused, naming both hashes' files.
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let name = "features.0.0.weight";
    let scaled = (tensors[name].clone() * 1.5).unwrap();
    tensors.insert(name.into(), scaled);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = failure(&predict());
    assert!(
        err.contains("SHA-256") && err.contains("w.safetensors") && err.contains("would be wrong"),
        "{err}"
    );
}
