//! Helpers shared by the integration tests: running the binary and building small datasets.

#![allow(dead_code)]

pub mod browser;
pub mod fashion;
pub mod http;
pub mod kafka;
pub mod mlflow;
pub mod pg;
pub mod process;
pub mod s3;
pub mod weights;

use std::path::{Path, PathBuf};
use std::process::Output;

/// The command `bccp --quiet args…`, not started yet (to spawn it and watch it).
pub fn bccp_command(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"));
    command.arg("--quiet").args(args);
    command
}

/// Runs `bccp` with `args` (quietly) and returns its output.
pub fn bccp(args: &[&str]) -> Output {
    bccp_command(args).output().expect("the bccp binary runs")
}

/// Standard error of a run that must have failed.
pub fn failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Standard output of a run that must have succeeded.
pub fn success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "expected success, stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes an image folder with `per_class[c]` PNGs of 100×80 RGB in class `class{c}`; pixel
/// values depend on class and index so every file differs.
pub fn make_folder(root: &Path, per_class: &[usize]) {
    for (c, &n) in per_class.iter().enumerate() {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..n {
            let img = image::RgbImage::from_fn(100, 80, |x, y| {
                image::Rgb([
                    (x * 7 + k as u32) as u8,
                    (y * 9 + c as u32 * 40) as u8,
                    ((x + y) * 3) as u8,
                ])
            });
            img.save(dir.join(format!("img{k:03}.png"))).unwrap();
        }
    }
}

/// A small prepared dataset in `dir/days`: synthetic images, 3 classes × 12, `bccp prepare`d.
pub fn prepared_small(dir: &Path) -> PathBuf {
    let source = dir.join("source");
    make_folder(&source, &[12, 12, 12]);
    let out = dir.join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    out
}

/// The arguments of a quick `bccp train` of `days` (32×32, 2 epochs, the real MobileNetV2
/// weights, the CPU) registered as `name` in `runs`, with its cache in `cache`.
pub fn quick_train_args(days: &Path, runs: &Path, cache: &Path, name: &str) -> Vec<String> {
    let weights = asset("weights/mobilenet_v2.safetensors");
    let args = [
        "train",
        "-d",
        days.to_str().unwrap(),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--weights",
        weights.to_str().unwrap(),
        "--device",
        "cpu",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--model-name",
        name,
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs a quick `bccp train` ([`quick_train_args`]) with `extra` flags.
pub fn quick_train(days: &Path, runs: &Path, cache: &Path, name: &str, extra: &[&str]) -> Output {
    let mut args = quick_train_args(days, runs, cache, name);
    args.extend(extra.iter().map(|s| s.to_string()));
    bccp(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The first entry of folder `dir` (e.g. an image of one class of a prepared day).
pub fn first_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .next()
        .unwrap_or_else(|| panic!("{} is empty", dir.display()))
        .unwrap()
        .path()
}

/// All files under `root`, relative, sorted, with their bytes.
pub fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(root).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// Names of the entries of a folder (to check that nothing was left behind).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The folder holding fetched real assets: the one the binary reads, `bccp::paths::assets_dir()`
/// (`BCCP_ASSETS`, else `BCCP_HOME/assets`, else the per-user folder `scripts/fetch-assets.sh`
/// installs into).
pub fn assets_dir() -> PathBuf {
    bccp::paths::assets_dir()
}

/// A fetched asset; panics with the command to run when it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let path = assets_dir().join(rel);
    assert!(
        path.exists(),
        "missing asset {}: run scripts/fetch-assets.sh (the README's test command does), or set BCCP_ASSETS or BCCP_HOME",
        path.display()
    );
    path
}

/// max |t| over all elements, on the CPU.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.to_device(&candle_core::Device::Cpu)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// max |a − b| over all elements (either may live on another device).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let cpu = |t: &candle_core::Tensor| t.to_device(&candle_core::Device::Cpu).unwrap();
    max_abs(&(cpu(a) - cpu(b)).unwrap())
}

/// max |a − b| / max(max |b|, floor) over all elements.
pub fn rel_diff(a: &candle_core::Tensor, b: &candle_core::Tensor, floor: f32) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(floor)
}

/// Writes weights of the zoo backbone `name` (its checkpoint's names and shapes) to `path`:
/// uniform noise in every tensor (norm gains near 1, the rest small), so that features are
/// neither constant nor NaN.
pub fn random_weights(name: &str, path: &Path) {
    use candle_nn::{VarBuilder, VarMap};
    let spec = bccp::backbone::zoo::find(name).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
    bccp::backbone::Backbone::from_var_builder(&spec, vb).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        let gain = t.rank() == 1 && name.contains("norm") && name.ends_with("weight");
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                if gain {
                    0.5 + u
                } else {
                    0.1 * (u - 0.5)
                }
            })
            .collect();
        var.set(&candle_core::Tensor::from_vec(values, t.shape(), t.device()).unwrap())
            .unwrap();
    }
    varmap.save(path).unwrap();
}
