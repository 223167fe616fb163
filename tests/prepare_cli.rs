//! `bccp prepare` end to end on small synthetic folders: layout, manifests, determinism and
//! every bad input the issue lists.

mod common;

use bccp::data::{read_manifest, Day};
use common::{bccp, entries, failure, files, make_folder, success};

fn prepare(
    source: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bccp(&args)
}

#[test]
fn layout_manifests_and_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[10, 7, 4]);
    let out = tmp.path().join("days");
    let stdout = success(&prepare(&src, &out, &["--seed", "3"]));
    assert!(
        stdout.contains("11 Monday and 10 Tuesday images"),
        "{stdout}"
    );
    assert_eq!(
        entries(&out),
        vec![
            "dataset.json",
            "monday",
            "monday.jsonl",
            "tuesday",
            "tuesday.jsonl",
            "tuesday_original"
        ]
    );

    let monday = read_manifest(&out.join("monday.jsonl")).unwrap();
    let tuesday = read_manifest(&out.join("tuesday.jsonl")).unwrap();
    let ids: Vec<u64> = monday.iter().chain(&tuesday).map(|r| r.id).collect();
    assert_eq!(ids, (1..=21).collect::<Vec<_>>());
    assert!(monday
        .iter()
        .all(|r| r.day == Day::Monday && r.image_path.starts_with("monday/")));
    assert!(tuesday
        .iter()
        .all(|r| r.day == Day::Tuesday && r.timestamp.starts_with("2024-01-02T")));
    let per_class =
        |records: &[bccp::data::Record], c| records.iter().filter(|r| r.target == c).count();
    assert_eq!(
        [
            per_class(&monday, 0),
            per_class(&monday, 1),
            per_class(&monday, 2)
        ],
        [5, 4, 2]
    );
    for r in monday.iter().chain(&tuesday) {
        assert!(out.join(&r.image_path).is_file(), "{}", r.image_path);
        let class = r.image_path.split('/').nth(1).unwrap();
        assert_eq!(class, format!("class{}", r.target));
    }
    // Monday copies are byte-identical to the source; Tuesday's corrupted copies differ from
    // their originals, which are byte-identical to the source.
    for r in &monday {
        let rel = r.image_path.strip_prefix("monday/").unwrap();
        assert_eq!(
            std::fs::read(out.join(&r.image_path)).unwrap(),
            std::fs::read(src.join(rel)).unwrap()
        );
    }
    for r in &tuesday {
        let original = r.original_path.as_ref().unwrap();
        let rel = original.strip_prefix("tuesday_original/").unwrap();
        assert_eq!(
            std::fs::read(out.join(original)).unwrap(),
            std::fs::read(src.join(rel)).unwrap()
        );
        let a = image::open(out.join(&r.image_path)).unwrap().to_rgb8();
        let b = image::open(out.join(original)).unwrap().to_rgb8();
        assert_eq!(a.dimensions(), b.dimensions());
        assert_ne!(a, b, "{} is not corrupted", r.image_path);
    }
    let info = success(&bccp(&["info", out.to_str().unwrap()]));
    assert!(
        info.contains("class1") && info.contains("total                      11       10"),
        "{info}"
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_split() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[12, 9]);
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    success(&prepare(&src, &a, &["--seed", "11"]));
    success(&prepare(&src, &b, &["--seed", "11"]));
    success(&prepare(&src, &c, &["--seed", "12"]));
    assert_eq!(files(&a), files(&b));
    let manifest = |d: &std::path::Path| std::fs::read(d.join("monday.jsonl")).unwrap();
    assert_ne!(manifest(&a), manifest(&c));
}

#[test]
fn corruption_none_copies_bytes_and_jpeg_sources_get_png_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[4, 4]);
    let out = tmp.path().join("none");
    success(&prepare(&src, &out, &["--corruption", "none"]));
    for r in read_manifest(&out.join("tuesday.jsonl")).unwrap() {
        let rel = r.image_path.strip_prefix("tuesday/").unwrap();
        assert_eq!(
            std::fs::read(out.join(&r.image_path)).unwrap(),
            std::fs::read(src.join(rel)).unwrap()
        );
    }

    let jpg_src = tmp.path().join("jpg");
    std::fs::create_dir_all(jpg_src.join("a")).unwrap();
    std::fs::create_dir_all(jpg_src.join("b")).unwrap();
    for (class, k) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)] {
        let img = image::RgbImage::from_pixel(40, 40, image::Rgb([k * 100, 50, 60]));
        img.save(jpg_src.join(class).join(format!("p{k}.jpg")))
            .unwrap();
    }
    let out = tmp.path().join("jpg-days");
    success(&prepare(&jpg_src, &out, &["--corruption", "random_line"]));
    for r in read_manifest(&out.join("tuesday.jsonl")).unwrap() {
        assert!(r.image_path.ends_with(".jpg.png"), "{}", r.image_path);
        let img = image::open(out.join(&r.image_path)).unwrap();
        assert_eq!((img.width(), img.height()), (40, 40));
    }
}

/// Runs a prepare that must fail, checks its message, and that nothing was written.
fn fails_cleanly(src: &std::path::Path, extra: &[&str], needles: &[&str]) {
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    let err = failure(&prepare(src, &out, extra));
    for needle in needles {
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        entries(parent.path()).is_empty(),
        "left behind: {:?}",
        entries(parent.path())
    );
}

#[test]
fn bad_inputs_are_clear_errors_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    fails_cleanly(&missing, &[], &["missing", "does not exist"]);

    let src = tmp.path().join("src");
    make_folder(&src, &[3, 3]);
    fails_cleanly(&src, &["--split", "0"], &["--split", "between 0 and 1"]);
    fails_cleanly(&src, &["--split", "1.5"], &["--split"]);
    fails_cleanly(
        &src,
        &["--corruption", "snow"],
        &["snow", "random_boxes", "mosaic"],
    );
    fails_cleanly(&src, &["--monday-date", "2024-02-30"], &["--monday-date"]);

    // A file with an image extension that is not an image.
    let text = tmp.path().join("text");
    make_folder(&text, &[3, 3]);
    std::fs::write(text.join("class1/notes.png"), b"these are notes").unwrap();
    fails_cleanly(&text, &[], &["notes.png", "not an image"]);

    // A truncated PNG.
    let trunc = tmp.path().join("trunc");
    make_folder(&trunc, &[3, 3]);
    let victim = trunc.join("class0/img001.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    fails_cleanly(&trunc, &[], &["img001.png", "cannot decode"]);

    // With --skip-bad the same folder prepares, with a warning naming the file.
    let out = tmp.path().join("skipped");
    let run = prepare(&trunc, &out, &["--skip-bad"]);
    success(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("img001.png") && stderr.contains("1 unreadable images skipped"),
        "{stderr}"
    );
    let total = read_manifest(&out.join("monday.jsonl")).unwrap().len()
        + read_manifest(&out.join("tuesday.jsonl")).unwrap().len();
    assert_eq!(total, 5);

    // An empty class and a root without classes.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails_cleanly(&empty, &[], &["no class folders"]);
    make_folder(&empty, &[2]);
    std::fs::create_dir_all(empty.join("zzz")).unwrap();
    fails_cleanly(&empty, &[], &["holds no images", "zzz"]);
}

#[test]
fn refuses_non_empty_output_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[4, 4]);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let err = failure(&prepare(&src, &out, &[]));
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(entries(&out), vec!["keep.txt"]);
    assert_eq!(entries(tmp.path()), vec!["out", "src"]);

    success(&prepare(&src, &out, &["--force"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("monday.jsonl").is_file());
    assert_eq!(entries(tmp.path()), vec!["out", "src"]);

    // The output must not overlap the source.
    let err = failure(&prepare(&src, &src.join("inner"), &["--force"]));
    assert!(err.contains("--out"), "{err}");
}
