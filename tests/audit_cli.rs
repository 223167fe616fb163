//! `bccp audit` on a constructed dataset of real Fashion-MNIST images with planted issues:
//! exact duplicates, near-duplicates (resized, re-encoded as JPEG), outliers (Open Clip Art
//! drawings), corrupted copies (`bccp prepare`'s boxes and lines), and leaks across the
//! train/test splits and days that `bccp prepare` makes of them. Each detector must find the
//! planted cases with the floors below; report.html must show its thumbnails in headless
//! Chromium (Debian's `chromium`; the test fails, never skips, without it).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::{asset, bccp, success};
use serde_json::Value;

const CLASSES: [&str; 4] = ["bag", "sneaker", "trouser", "tshirt_top"];
const PER_CLASS: usize = 30;

/// The planted file name prefixes and what they are.
fn kind(path: &str) -> &str {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.split('_').next().unwrap_or("")
}

/// Source folder: PER_CLASS real images per class, plus planted copies.
fn build_source(root: &Path) {
    let fm = asset("fashion-mnist/train");
    let clip = asset("openclipart");
    let mut drawings: Vec<PathBuf> = std::fs::read_dir(clip.join("animals"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    drawings.sort();
    let mut rng = bccp::rng::Rng::new(7);
    for (c, class) in CLASSES.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(fm.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(PER_CLASS) {
            let name = f.file_name().unwrap().to_string_lossy().replace('_', "-");
            std::fs::copy(f, dir.join(format!("img_{name}"))).unwrap();
        }
        // One exact copy, one near copy (56×56, JPEG), one corrupted copy per class, from
        // images past the first PER_CLASS (the original is planted too).
        let base = |k: usize| {
            let f = &files[PER_CLASS + k];
            (f, f.file_stem().unwrap().to_string_lossy().to_string())
        };
        let (f, stem) = base(0);
        std::fs::copy(f, dir.join(format!("img_{stem}.png"))).unwrap();
        std::fs::copy(f, dir.join(format!("dup_{stem}.png"))).unwrap();
        let (f, stem) = base(1);
        std::fs::copy(f, dir.join(format!("img_{stem}.png"))).unwrap();
        image::open(f)
            .unwrap()
            .resize_exact(56, 56, image::imageops::FilterType::Triangle)
            .to_rgb8()
            .save(dir.join(format!("near_{stem}.jpg")))
            .unwrap();
        for k in 2..4 {
            let (f, stem) = base(k);
            std::fs::copy(f, dir.join(format!("img_{stem}.png"))).unwrap();
            let mut img = image::open(f).unwrap().to_luma8();
            if (c + k) % 2 == 0 {
                bccp::data::corrupt::random_boxes(&mut img, &mut rng);
            } else {
                bccp::data::corrupt::random_line(&mut img, &mut rng);
            }
            img.save(dir.join(format!("corrupt_{stem}.png"))).unwrap();
        }
        // One outlier: a colour drawing of another dataset, shrunk to 28×28.
        image::open(&drawings[c * 7])
            .unwrap()
            .resize_exact(28, 28, image::imageops::FilterType::Triangle)
            .to_rgb8()
            .save(dir.join(format!("out_{c}.png")))
            .unwrap();
    }
}

/// (precision, recall) of `flagged` against `truth`.
fn pr(flagged: &BTreeSet<usize>, truth: &BTreeSet<usize>) -> (f64, f64) {
    let hit = flagged.intersection(truth).count() as f64;
    (
        hit / flagged.len().max(1) as f64,
        hit / truth.len().max(1) as f64,
    )
}

/// Debian's Chromium, or the `chromium` on the PATH.
/// A headless-Chromium screenshot of `page`; the number of black pixels (the thumbnails'
/// Fashion-MNIST backgrounds; the page's text is #222 and its image boxes #eee).
fn screenshot(page: &Path, shot: &Path) -> usize {
    let url = format!("file://{}", page.display());
    common::browser::screenshot(&url, 1280, 1400, shot)
        .pixels()
        .filter(|p| p.0[..3].iter().all(|&v| v <= 10))
        .count()
}

#[test]
fn audit_finds_planted_issues_and_the_report_shows_thumbnails() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    build_source(&source);
    let days = tmp.path().join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        days.to_str().unwrap(),
        "--corruption",
        "none",
    ]));
    let out = tmp.path().join("audit");
    let weights = asset("weights/mobilenet_v2.safetensors");
    let stdout = success(&bccp(&[
        "audit",
        "--dataset",
        days.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--no-cache",
        "--folds",
        "3",
        "--epochs",
        "5",
        "--page-size",
        "12",
    ]));
    eprintln!("{stdout}");
    let records: Vec<Value> = std::fs::read_to_string(out.join("report.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let n = records.len();
    assert_eq!(n, CLASSES.len() * (PER_CLASS + 4 * 2 + 1));
    assert_eq!(summary["samples"], n);
    let path = |i: usize| records[i]["path"].as_str().unwrap().to_string();
    let set = |f: &dyn Fn(&Value) -> bool| -> BTreeSet<usize> {
        (0..n).filter(|&i| f(&records[i])).collect()
    };
    // Planted partners: the stem after the prefix names the original `img_STEM`.
    let stem = |p: &str| {
        let name = p.rsplit('/').next().unwrap();
        let name = name.split_once('_').unwrap().1;
        name.rsplit_once('.').unwrap().0.to_string()
    };
    let by_stem: HashMap<String, usize> = (0..n)
        .filter(|&i| kind(&path(i)) == "img")
        .map(|i| (stem(&path(i)), i))
        .collect();
    let planted = |prefix: &str| -> BTreeSet<usize> {
        let mut s = BTreeSet::new();
        for i in (0..n).filter(|&i| kind(&path(i)) == prefix) {
            s.insert(i);
            if let Some(&o) = by_stem.get(&stem(&path(i))) {
                s.insert(o);
            }
        }
        s
    };

    // Exact duplicates: every planted pair, nothing else.
    let exact_truth = planted("dup");
    assert_eq!(exact_truth.len(), 2 * CLASSES.len());
    let exact = set(&|r| !r["exact_duplicate_group"].is_null());
    assert_eq!(exact, exact_truth, "exact duplicates");

    // Near duplicates (exact pairs are near too): recall 1, precision ≥ 0.8.
    let near_truth: BTreeSet<usize> = planted("near").union(&exact_truth).copied().collect();
    let near = set(&|r| r["near_duplicate"].as_bool().unwrap());
    for i in (0..n).filter(|&i| ["near", "out", "corrupt"].contains(&kind(&path(i)))) {
        let r = &records[i];
        eprintln!(
            "{}: nearest {} / pixels {}, outlier z {}, corruption {}",
            path(i),
            r["nearest_distance"],
            r["pixel_nearest_distance"],
            r["outlier_score"],
            r["corruption_score"]
        );
    }
    let (p, r) = pr(&near, &near_truth);
    eprintln!("near duplicates: precision {p:.3}, recall {r:.3}");
    assert!(
        r >= 1.0 && p >= 0.8,
        "near duplicates: precision {p}, recall {r}"
    );

    // Leaks: a planted pair whose members landed in different splits / days, and only those.
    for (field, flag) in [("split", "split_leak"), ("day", "day_leak")] {
        let mut truth = BTreeSet::new();
        for prefix in ["dup", "near"] {
            for i in (0..n).filter(|&i| kind(&path(i)) == prefix) {
                let o = by_stem[&stem(&path(i))];
                if records[i][field] != records[o][field] {
                    truth.insert(i);
                    truth.insert(o);
                }
            }
        }
        let found = set(&|r| r[flag].as_bool().unwrap());
        eprintln!("{flag}: planted {truth:?}, found {found:?}");
        assert_eq!(found, truth, "{flag}");
    }

    // Outliers: the drawings, recall ≥ 0.75; precision ≥ 0.75 counting the corrupted copies
    // as right too (they are out of the clean distribution as well).
    let out_truth = set(&|r| kind(r["path"].as_str().unwrap()) == "out");
    let odd = set(&|r| ["out", "corrupt"].contains(&kind(r["path"].as_str().unwrap())));
    let outl = set(&|r| r["outlier"].as_bool().unwrap());
    let (_, r) = pr(&outl, &out_truth);
    let (p, _) = pr(&outl, &odd);
    eprintln!("outliers: precision {p:.3}, recall {r:.3}");
    assert!(
        r >= 0.75 && p >= 0.75,
        "outliers: precision {p}, recall {r}"
    );

    // Corrupted: the boxes and lines, recall ≥ 0.7, precision ≥ 0.4 (the pixel statistics are a
    // weak detector: lines that miss the object leave no trace, bright clean items look boxed).
    let corrupt_truth = set(&|r| kind(r["path"].as_str().unwrap()) == "corrupt");
    let corr = set(&|r| r["corrupted"].as_bool().unwrap());
    let (p, r) = pr(&corr, &corrupt_truth);
    eprintln!("corrupted: precision {p:.3}, recall {r:.3}");
    assert!(r >= 0.7 && p >= 0.4, "corrupted: precision {p}, recall {r}");

    // Class balance: four equal classes.
    assert_eq!(summary["imbalance_ratio"], 1.0);

    // The page: sections present, no network references, thumbnails drawn.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for id in [
        "label",
        "exact",
        "near",
        "leaks",
        "outliers",
        "corrupted",
        "classes",
    ] {
        assert!(html.contains(&format!("<section id={id}>")), "section {id}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    let with = screenshot(&out.join("report.html"), &tmp.path().join("with.png"));
    if let Some(k) = std::env::var_os("BCCP_KEEP_SCREENSHOT") {
        std::fs::copy(tmp.path().join("with.png"), k).unwrap();
    }
    std::fs::rename(out.join("thumbs"), tmp.path().join("thumbs-away")).unwrap();
    let without = screenshot(&out.join("report.html"), &tmp.path().join("without.png"));
    eprintln!("black pixels: {with} with thumbnails, {without} without");
    assert!(
        with > without + 20_000,
        "thumbnails not drawn: {with} black pixels with them, {without} without"
    );
}

#[test]
fn audit_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let err = common::failure(&bccp(&[
        "audit",
        "--dataset",
        tmp.path().join("missing").to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]));
    assert!(err.contains("--dataset"), "{err}");
    let err = common::failure(&bccp(&[
        "audit",
        "--folder",
        tmp.path().to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--near-factor=-1",
    ]));
    assert!(err.contains("--near-factor"), "{err}");
}

#[test]
fn audit_of_a_folder_has_no_splits_and_rewrites_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    common::make_folder(&folder, &[12, 12, 12]);
    // One exact copy.
    std::fs::copy(
        folder.join("class0/img000.png"),
        folder.join("class0/copy.png"),
    )
    .unwrap();
    let out = tmp.path().join("audit");
    let weights = asset("weights/mobilenet_v2.safetensors");
    let args = [
        "audit",
        "--folder",
        folder.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--no-cache",
        "--folds",
        "2",
        "--epochs",
        "2",
    ];
    for _ in 0..2 {
        success(&bccp(&args));
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["samples"], 37);
    assert_eq!(summary["exact_duplicate_groups"], 1);
    assert_eq!(summary["split_leaks"], 0);
    assert_eq!(summary["day_leaks"], 0);
    assert!(summary["corruption_check"].is_null());
    assert!((summary["imbalance_ratio"].as_f64().unwrap() - 13.0 / 12.0).abs() < 1e-9);
    let lines = std::fs::read_to_string(out.join("report.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 37);
    assert!(lines.lines().all(|l| l.contains("\"split\":null")));
    // Only the three outputs and the thumbnails, no temporary files left behind.
    assert_eq!(
        common::entries(&out),
        ["report.html", "report.jsonl", "summary.json", "thumbs"]
    );
}

#[test]
fn audit_of_a_store_reads_its_samples_splits_and_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let db = format!("sqlite:{}", tmp.path().join("store.sqlite3").display());
    success(&bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &db,
        "--bulk",
    ]));
    let out = tmp.path().join("audit");
    let weights = asset("weights/mobilenet_v2.safetensors");
    success(&bccp(&[
        "audit",
        "--db",
        &db,
        "--out",
        out.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--no-cache",
        "--folds",
        "2",
        "--epochs",
        "2",
    ]));
    let records: Vec<Value> = std::fs::read_to_string(out.join("report.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 36, "3 classes × 12, split over both days");
    // Every line carries its store id, so a reviewer's answer can be stored against it.
    let ids: BTreeSet<i64> = records.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 36);
    let sources: BTreeSet<&str> = records.iter().map(|r| r["day"].as_str().unwrap()).collect();
    assert_eq!(sources, BTreeSet::from(["monday", "tuesday"]));
    let splits: BTreeSet<&str> = records
        .iter()
        .map(|r| r["split"].as_str().unwrap())
        .collect();
    assert!(splits.contains("train"), "{splits:?}");
    // --db with --folder is refused by name.
    let err = common::failure(&bccp(&[
        "audit",
        "--db",
        &db,
        "--folder",
        days.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("--folder") && err.contains("--db"), "{err}");
}
