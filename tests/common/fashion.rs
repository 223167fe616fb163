//! Real Fashion-MNIST data for the loop tests (`retrain_cli`, `review_loop`): the test images by
//! class, a prepared Monday/Tuesday dataset of a few of them, the days generated into a store,
//! and the arguments of a quick `bccp retrain` cycle.

use std::path::{Path, PathBuf};

use super::{asset, bccp, success};

/// The Fashion-MNIST test images of each class (classes and files sorted).
pub fn class_files() -> Vec<Vec<PathBuf>> {
    let sorted = |dir: &Path| {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        entries
    };
    sorted(&asset("fashion-mnist/test"))
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|class| sorted(&class))
        .collect()
}

/// A prepared dataset of the first `per_class` test images of each of the 10 classes (half
/// arrive on Monday, half, corrupted, on Tuesday), in `dir/days`.
pub fn fashion_days(dir: &Path, per_class: usize) -> PathBuf {
    let source = dir.join("fmnist");
    for files in class_files() {
        let class = files[0].parent().unwrap().file_name().unwrap();
        let to = source.join(class);
        std::fs::create_dir_all(&to).unwrap();
        for f in files.iter().take(per_class) {
            std::fs::copy(f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let out = dir.join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--corruption",
        "mixed",
        "--seed",
        "7",
    ]));
    out
}

/// One day of `days` into the store at `db_url` (`bccp generate --bulk`): labels right with
/// probability `accuracy`, 30% held out as the gate set.
pub fn generate(db_url: &str, days: &Path, day: &str, accuracy: f64) {
    success(&bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        db_url,
        "--day",
        day,
        "--bulk",
        "--user-accuracy",
        &accuracy.to_string(),
        "--gate-fraction",
        "0.3",
    ]));
}

/// The arguments of a quick `bccp retrain` cycle of `model` (64×64 inputs, the real weights,
/// the CPU, offline), then `extra`.
pub fn retrain_args(
    db_url: &str,
    model: &str,
    runs: &Path,
    cache: &Path,
    extra: &[&str],
) -> Vec<String> {
    let weights = asset("weights/mobilenet_v2.safetensors");
    let mut args: Vec<String> = [
        "retrain",
        "--db",
        db_url,
        "--model",
        model,
        "--image-size",
        "64",
        "--weights",
        weights.to_str().unwrap(),
        "--offline",
        "--device",
        "cpu",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--max-day-drop",
        "0.15",
        "--margin",
        "0.01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs a quick `bccp retrain` cycle (see [`retrain_args`]) and returns its stdout.
pub fn retrain(db_url: &str, model: &str, runs: &Path, cache: &Path, extra: &[&str]) -> String {
    let args = retrain_args(db_url, model, runs, cache, extra);
    success(&bccp(&args.iter().map(String::as_str).collect::<Vec<_>>()))
}
