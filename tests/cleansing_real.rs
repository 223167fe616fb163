//! The cut-off finds wrong labels on real data: Fashion-MNIST images with the real MobileNetV2
//! weights (64×64), 1500 Monday + 1500 Tuesday records, users 70% right, the same replay the
//! main job uses (closest pairs, L2, half the reuse buffer). The best detector of the cleansing
//! grid (combined score, p70, 5-fold, two rounds, replay trusted) must find the wrong labels
//! with precision and recall above stated floors on the pretrained features, and better on
//! features tuned on the reuse buffer (the default).

mod common;

use std::path::Path;

use common::{asset, bccp, success};

/// An image folder of the first `per_class` training images of every Fashion-MNIST class,
/// linked (not copied) from the fetched assets.
fn subset(dir: &Path, per_class: usize) -> std::path::PathBuf {
    let source = asset("fashion-mnist/train");
    let out = dir.join("subset");
    for class in std::fs::read_dir(&source).unwrap() {
        let class = class.unwrap();
        if !class.file_type().unwrap().is_dir() {
            continue;
        }
        let mut names: Vec<_> = std::fs::read_dir(class.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".png"))
            .collect();
        names.sort();
        let target = out.join(class.file_name());
        std::fs::create_dir_all(&target).unwrap();
        for name in names.into_iter().take(per_class) {
            std::os::unix::fs::symlink(class.path().join(&name), target.join(&name)).unwrap();
        }
    }
    out
}

/// Floors, below what this setting measured here (precision 0.736 / recall 0.782 with seed 1,
/// 0.781 / 0.772 with seed 2) by a margin for other machines; the cut-off as the main job ran it
/// before (label_prob_mean, p75, 5-fold, replay not trusted) had precision 0.638 / 0.647 in the
/// same setting, under the precision floor.
const PRECISION_FLOOR: f64 = 0.68;
const RECALL_FLOOR: f64 = 0.70;
/// Noise-detection F1 of the same cut-off on the tuned, normalised features: a floor and the
/// least gain over the pretrained features' F1 (measured here with seed 1: 0.807 against
/// 0.762, ROC AUC 0.970).
const TUNED_F1_FLOOR: f64 = 0.77;
const TUNED_F1_GAIN: f64 = 0.02;

#[test]
fn bccp_cleansing_finds_wrong_labels_on_fashion_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let source = subset(tmp.path(), 300);
    let days = tmp.path().join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        days.to_str().unwrap(),
        "--seed",
        "42",
    ]));
    let runs = tmp.path().join("runs");
    let train = |name: &str, extra: &[&str]| -> serde_json::Value {
        let weights = asset("weights/mobilenet_v2.safetensors");
        let cache = tmp.path().join("cache");
        let mut args = vec![
            "train",
            "-d",
            days.to_str().unwrap(),
            "-t",
            "tuesday",
            "--monday-num",
            "1500",
            "--tuesday-num",
            "1500",
            "-l",
            "user_feedback",
            "--user-accuracy",
            "0.7",
            "-s",
            "l2_norm",
            "-r",
            "0.5",
            "--method",
            "bccp",
            "--cutoff-score",
            "combined",
            "--cutoff-percentile",
            "70",
            "--cutoff-folds",
            "5",
            "--cutoff-rounds",
            "2",
            "--cutoff-trust-replay",
            "true",
            "--image-size",
            "64",
            "--weights",
            weights.to_str().unwrap(),
            "--device",
            "cpu",
            "--seed",
            "1",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--model-name",
            name,
        ];
        args.extend_from_slice(extra);
        success(&bccp(&args));
        let path = runs.join(name).join("1/metrics.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let metrics = train("pretrained", &["--cleanse-features", "pretrained"]);
    let precision = metrics["noise_precision"].as_f64().unwrap();
    let recall = metrics["noise_recall"].as_f64().unwrap();
    assert!(
        precision >= PRECISION_FLOOR && recall >= RECALL_FLOOR,
        "noise detection precision {precision:.3} recall {recall:.3}, floors {PRECISION_FLOOR} / {RECALL_FLOOR}: {metrics}"
    );
    // The wrong labels are about 30% of Tuesday's 1200 training labels.
    let noisy = metrics["noisy_labels"].as_u64().unwrap();
    assert!((300..=420).contains(&noisy), "{noisy} wrong labels");

    // Scored on a copy of the backbone fine-tuned on the reuse buffer, rows normalised (what
    // the default `--cleanse-features auto` does on a Tuesday run): the same wrong labels are
    // found better.
    let tuned = train("auto", &[]);
    // The default relabels what it cuts: every one of the 1200 Tuesday and 600 replayed rows
    // is trained on.
    assert_eq!(tuned["removed_by_cutoff"], 0, "{tuned}");
    assert_eq!(tuned["train_size"], 1800, "{tuned}");
    assert!(tuned["relabelled_by_cutoff"].as_u64() > Some(0), "{tuned}");
    assert_eq!(tuned["noisy_labels"], metrics["noisy_labels"]);
    let f1 = |m: &serde_json::Value| m["noise_f1"].as_f64().unwrap();
    let auc = |m: &serde_json::Value| m["noise_score_auc"].as_f64().unwrap();
    assert!(
        f1(&tuned) >= TUNED_F1_FLOOR && f1(&tuned) >= f1(&metrics) + TUNED_F1_GAIN,
        "F1 {:.3} tuned against {:.3}, floor {TUNED_F1_FLOOR}, gain {TUNED_F1_GAIN}: {tuned}",
        f1(&tuned),
        f1(&metrics)
    );
    assert!(auc(&tuned) > auc(&metrics), "AUC {tuned} against {metrics}");
}
