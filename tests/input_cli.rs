//! Hostile input: FIFOs and broken links named like images, truncated JPEG and PNG files,
//! huge size settings and finite embeddings whose f32 distances would overflow. Each case
//! checks the exit code, that the message names the file or setting, and that nothing is left
//! behind. The binary runs under a deadline, so a regression that blocks (a FIFO being read)
//! fails the test instead of hanging it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bccp::embeddings::EmbeddingSet;
use candle_core::{Device, Tensor};
use common::{asset, make_folder};

/// Runs `bccp --quiet args…`, killing it and failing the test after `limit`.
fn bccp_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bccp"))
        .arg("--quiet")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bccp binary runs");
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bccp {args:?} still running after {limit:?}: killed (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn run(args: &[&str]) -> Output {
    bccp_within(args, Duration::from_secs(120))
}

/// Standard error of a run that must have failed with exit code 1 (an error, not an abort).
fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    stderr
}

/// Standard output and error of a run that must have succeeded.
fn succeeded(out: &Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "stderr: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `bccp embed` of `data` with the real MobileNetV2 at 64×64, no cache.
fn embed_args<'a>(data: &'a Path, out: &'a Path, weights: &'a Path) -> Vec<&'a str> {
    vec![
        "embed",
        "--data",
        s(data),
        "--backbone",
        "mobilenet_v2",
        "--weights",
        s(weights),
        "--image-size",
        "64",
        "--out",
        s(out),
        "--device",
        "cpu",
        "--no-cache",
    ]
}

/// A manifest beside `days`' own, holding its Tuesday records plus one per extra image path.
fn manifest_with(days: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(days.join("tuesday.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let template: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    for (k, path) in extra.iter().enumerate() {
        let mut record = template.clone();
        record["id"] = serde_json::json!(1000 + k);
        record["image_path"] = serde_json::json!(path);
        record.as_object_mut().unwrap().remove("original_path");
        lines.push(record.to_string());
    }
    let manifest = days.join(name);
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    manifest
}

#[test]
fn fifos_and_broken_links_are_bad_images_not_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = asset("weights/mobilenet_v2.safetensors");
    let src = tmp.path().join("src");
    make_folder(&src, &[2, 2]);
    mkfifo(&src.join("class0/f.png"));

    // The folder scan skips the FIFO (reported), so prepare finishes without it.
    let days = tmp.path().join("days");
    let (_, stderr) = succeeded(&run(&["prepare", "--source", s(&src), "--out", s(&days)]));
    assert!(stderr.contains("not a file or folder"), "{stderr}");
    let manifests = std::fs::read_to_string(days.join("monday.jsonl")).unwrap()
        + &std::fs::read_to_string(days.join("tuesday.jsonl")).unwrap();
    assert_eq!(manifests.lines().count(), 4);
    assert!(!manifests.contains("f.png"));

    // A manifest naming a FIFO: refused at once, naming it; nothing written.
    mkfifo(&days.join("tuesday/class0/f.png"));
    let manifest = manifest_with(&days, "fifo.jsonl", &["tuesday/class0/f.png"]);
    let out = tmp.path().join("e.safetensors");
    let err = failed(&run(&embed_args(&manifest, &out, &weights)));
    assert!(
        err.contains("tuesday/class0/f.png") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(!out.exists());
    // With --skip-bad it is skipped and counted.
    let mut args = embed_args(&manifest, &out, &weights);
    args.push("--skip-bad");
    let (stdout, stderr) = succeeded(&run(&args));
    assert!(
        stdout.contains("embedded 2 images") && stdout.contains("1 unreadable skipped"),
        "{stdout}"
    );
    assert!(stderr.contains("f.png"), "{stderr}");
    assert_eq!(EmbeddingSet::load(&out).unwrap().targets.len(), 2);
    std::fs::remove_file(&out).unwrap();

    // A dangling link and a link loop: bad images, the OS error printed once.
    let class0 = days.join("tuesday/class0");
    std::os::unix::fs::symlink(class0.join("missing.png"), class0.join("gone.png")).unwrap();
    std::os::unix::fs::symlink(class0.join("loop.png"), class0.join("loop.png")).unwrap();
    for (name, link) in [("gone.jsonl", "gone.png"), ("loop.jsonl", "loop.png")] {
        let manifest = manifest_with(&days, name, &[&format!("tuesday/class0/{link}")]);
        let err = failed(&run(&embed_args(&manifest, &out, &weights)));
        assert!(
            err.contains(link) && err.contains("broken symbolic link"),
            "{err}"
        );
        assert_eq!(err.matches("os error").count(), 1, "{err}");
        assert!(!out.exists());
        let mut args = embed_args(&manifest, &out, &weights);
        args.push("--skip-bad");
        let (stdout, _) = succeeded(&run(&args));
        assert!(stdout.contains("1 unreadable skipped"), "{stdout}");
        std::fs::remove_file(&out).unwrap();
    }

    // An image named on the command line.
    let lite = asset("weights/efficientnet_lite0.safetensors");
    let fifo = days.join("tuesday/class0/f.png");
    let err = failed(&run(&[
        "classify",
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        s(&lite),
        "--device",
        "cpu",
        s(&fifo),
    ]));
    assert!(
        err.contains("f.png") && err.contains("not a regular file"),
        "{err}"
    );
}

/// JPEG bytes of a real photo.
fn jpeg_of(png: &Path) -> Vec<u8> {
    let img = image::open(png).unwrap().into_rgb8();
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&img)
        .unwrap();
    bytes
}

#[test]
fn truncated_images_are_refused_strictly() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = asset("weights/mobilenet_v2.safetensors");
    let src = tmp.path().join("src");
    make_folder(&src, &[1, 2]);
    let class0 = src.join("class0");
    let jpeg = jpeg_of(&asset("photos/chelsea.png"));
    std::fs::write(class0.join("chelsea.jpg"), &jpeg).unwrap();
    // A real camera JPEG decodes; cut in half it is refused.
    let rocket = std::fs::read(asset("photos/rocket.jpg")).unwrap();
    let path = Path::new("rocket.jpg");
    assert!(bccp::data::decode::decode_bytes(&rocket, path).is_ok());
    let err = bccp::data::decode::decode_bytes(&rocket[..rocket.len() / 2], path).unwrap_err();
    assert!(err.to_string().contains("ends early"), "{err}");
    std::fs::write(class0.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    // A PNG missing only its IEND chunk: every pixel row is there, the file is still cut.
    let png = std::fs::read(class0.join("img000.png")).unwrap();
    std::fs::write(class0.join("cut.png"), &png[..png.len() - 12]).unwrap();

    let out = tmp.path().join("e.safetensors");
    let err = failed(&run(&embed_args(&src, &out, &weights)));
    assert!(
        err.contains("cut.jpg") && err.contains("ends early"),
        "{err}"
    );
    assert!(!out.exists());
    let mut args = embed_args(&src, &out, &weights);
    args.push("--skip-bad");
    let (stdout, stderr) = succeeded(&run(&args));
    assert!(
        stdout.contains("embedded 4 images") && stdout.contains("2 unreadable skipped"),
        "{stdout}"
    );
    assert!(
        stderr.contains("cut.jpg") && stderr.contains("cut.png"),
        "{stderr}"
    );
    let set = EmbeddingSet::load(&out).unwrap();
    assert!(
        set.paths.iter().all(|p| !p.contains("cut")),
        "{:?}",
        set.paths
    );

    // prepare: refused naming the file, nothing left behind; skipped with --skip-bad.
    let days = tmp.path().join("days");
    let err = failed(&run(&["prepare", "--source", s(&src), "--out", s(&days)]));
    assert!(err.contains("cut.") && err.contains("ends early"), "{err}");
    assert!(!days.exists());
    assert_eq!(common::entries(tmp.path()), vec!["e.safetensors", "src"]);
    let (_, stderr) = succeeded(&run(&[
        "prepare",
        "--source",
        s(&src),
        "--out",
        s(&days),
        "--skip-bad",
    ]));
    assert!(
        stderr.contains("cut.jpg")
            && stderr.contains("cut.png")
            && stderr.contains("2 unreadable images skipped"),
        "{stderr}"
    );
    let manifests = std::fs::read_to_string(days.join("monday.jsonl")).unwrap()
        + &std::fs::read_to_string(days.join("tuesday.jsonl")).unwrap();
    assert_eq!(manifests.lines().count(), 4);
    assert!(!manifests.contains("cut."));

    // classify names it too.
    let lite = asset("weights/efficientnet_lite0.safetensors");
    let err = failed(&run(&[
        "classify",
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        s(&lite),
        "--device",
        "cpu",
        s(&class0.join("cut.jpg")),
    ]));
    assert!(
        err.contains("cut.jpg") && err.contains("ends early"),
        "{err}"
    );
}

#[test]
fn huge_sizes_are_errors_not_aborts() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = asset("weights/mobilenet_v2.safetensors");
    let src = tmp.path().join("src");
    make_folder(&src, &[2, 2]);
    let days = tmp.path().join("days");
    succeeded(&run(&["prepare", "--source", s(&src), "--out", s(&days)]));
    let runs = tmp.path().join("runs");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "-d",
            s(&days),
            "--weights",
            s(&weights),
            "--device",
            "cpu",
            "--runs-dir",
            s(&runs),
            "--no-cache",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (flag, value, limit) in [
        ("--image-size", "100000", "4096 or less"),
        ("--batch-size", "10000000", "65536 or less"),
        ("--epochs", "1000000000", "100000 or less"),
        ("--mc-passes", "100000", "1000 or less"),
        ("--folds", "5000", "100 or less"),
        ("--cutoff-folds", "5000", "100 or less"),
    ] {
        let err = failed(&train(&[flag, value]));
        assert!(
            err.contains(&format!("{flag} {value} is too large; {limit}")),
            "{err}"
        );
    }
    assert!(!runs.exists());
    let report = tmp.path().join("issues.jsonl");
    for (flag, value, want) in [
        (
            "--folds",
            "5000",
            "the number of folds 5000 is too large; 100 or less",
        ),
        (
            "--epochs",
            "1000000",
            "the number of epochs 1000000 is too large; 100000 or less",
        ),
    ] {
        let err = failed(&run(&[
            "label-issues",
            "--dataset",
            s(&src),
            "--weights",
            s(&weights),
            "--device",
            "cpu",
            "--no-cache",
            "--out",
            s(&report),
            flag,
            value,
        ]));
        assert!(err.contains(want), "{err}");
    }
    assert!(!report.exists());

    let out = tmp.path().join("e.safetensors");
    let mut args = embed_args(&src, &out, &weights);
    args[8] = "100000"; // --image-size
    let err = failed(&run(&args));
    assert!(
        err.contains("image size 100000 is too large; 4096 or less"),
        "{err}"
    );
    let mut args = embed_args(&src, &out, &weights);
    args.extend_from_slice(&["--batch-size", "10000000"]);
    let err = failed(&run(&args));
    assert!(
        err.contains("batch size 10000000 is too large; 65536 or less"),
        "{err}"
    );
    // Within the bounds but over the memory budget: the estimate and the budget.
    let mut args = embed_args(&src, &out, &weights);
    args[8] = "4096";
    args.extend_from_slice(&["--batch-size", "65536"]);
    let err = failed(&run(&args));
    assert!(
        err.contains("a batch of 65536 images at 4096×4096 needs about")
            && err.contains("over the budget"),
        "{err}"
    );
    assert!(!out.exists());
}

fn write_set(path: &Path, rows: &[[f32; 2]]) {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    let n = rows.len();
    EmbeddingSet {
        embeddings: Tensor::from_slice(&values, (n, 2), &Device::Cpu).unwrap(),
        targets: (0..n as i64).collect(),
        ids: None,
        paths: (0..n).map(|i| format!("c{i}/{i}.png")).collect(),
        classes: (0..n).map(|c| format!("c{c}")).collect(),
        model: "test".into(),
        weights_sha256: String::new(),
        list_sha256: String::new(),
        shard: None,
    }
    .save(path)
    .unwrap();
}

#[test]
fn closest_refuses_rows_that_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let (q, c, out) = (
        tmp.path().join("q.safetensors"),
        tmp.path().join("c.safetensors"),
        tmp.path().join("nn.safetensors"),
    );
    write_set(&q, &[[1.0, 1.0]]);
    write_set(&c, &[[2.0, 2.0], [3e19, 3e19], [5.0, 5.0]]);
    let closest = |metric: &str, k: &str| {
        run(&[
            "closest",
            "--queries",
            s(&q),
            "--candidates",
            s(&c),
            "--metric",
            metric,
            "--k",
            k,
            "--out",
            s(&out),
            "--device",
            "cpu",
        ])
    };
    for metric in ["l2", "cosine"] {
        let err = failed(&closest(metric, "1"));
        assert!(
            err.contains("candidates row 1") && err.contains("overflow"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // L1 sums stay far below f32::MAX here: the exact answer.
    succeeded(&closest("l1", "1"));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["indices"].to_vec2::<i64>().unwrap(), vec![vec![0]]);
    let err = failed(&closest("l1", "100000"));
    assert!(
        err.contains("k = 100000 is too large; 4096 or less"),
        "{err}"
    );
}
