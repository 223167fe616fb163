//! Image folders as users have them, through the command line: nested class folders, hidden
//! files, a symlink loop and an unsupported file reported per class, and a decompression bomb
//! refused by `embed` with the size limit named, then skipped with `--skip-bad`.

mod common;

use std::path::Path;

use common::{asset, bccp, failure, success};

fn png(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([shade, (x * 5) as u8, (y * 5) as u8])
    })
    .save(path)
    .unwrap();
}

/// A PNG whose header declares `width`×`height` pixels but holds one (a decompression bomb).
fn bomb(path: &Path, width: u32, height: u32) {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&[0], 1, 1, image::ExtendedColorType::L8)
        .unwrap();
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn nested_folders_hidden_files_links_and_bombs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    png(&root.join("cat/a.png"), 10);
    png(&root.join("cat/2024/01/b.png"), 20);
    png(&root.join("cat/2024/02/c.jpg"), 30);
    png(&root.join("cat/.thumbs/hidden.png"), 40);
    png(&root.join("dog/x.png"), 50);
    png(&root.join("dog/deep/er/y.png"), 60);
    std::fs::write(root.join("dog/notes.txt"), "not an image").unwrap();
    std::os::unix::fs::symlink(&root, root.join("dog/deep/loop")).unwrap();

    let info = success(&bccp(&["info", root.to_str().unwrap()]));
    assert!(
        info.contains("image folder") && info.contains("2 classes"),
        "{info}"
    );
    let count = |class: &str| -> Option<String> {
        info.lines()
            .find(|l| l.starts_with(class))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
    };
    assert_eq!(count("cat").as_deref(), Some("3"), "{info}");
    assert_eq!(count("dog").as_deref(), Some("2"), "{info}");
    assert_eq!(count("total").as_deref(), Some("5"), "{info}");

    let out = tmp.path().join("e.safetensors");
    let weights = asset("weights/mobilenet_v2.safetensors");
    let embed = |extra: &[&str]| {
        let mut args = vec![
            "embed",
            "--data",
            root.to_str().unwrap(),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            weights.to_str().unwrap(),
            "--image-size",
            "32",
            "--no-cache",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        bccp(&args)
    };
    let run = embed(&[]);
    let notes = String::from_utf8_lossy(&run.stderr).into_owned();
    let stdout = success(&run);
    assert!(stdout.contains("embedded 5 images"), "{stdout}");
    assert!(
        notes.contains("class dog: 1 file(s) skipped (unsupported extension)")
            && notes.contains("class dog: 1 file(s) skipped (symlink loop)"),
        "{notes}"
    );
    let set = bccp::embeddings::EmbeddingSet::load(&out).unwrap();
    assert_eq!(
        set.paths,
        [
            "cat/2024/01/b.png",
            "cat/2024/02/c.jpg",
            "cat/a.png",
            "dog/deep/er/y.png",
            "dog/x.png"
        ]
    );
    assert_eq!(set.targets, [0, 0, 0, 1, 1]);

    // A 16000×14464 PNG of a few bytes: refused before decoding, naming the limit; skipped
    // with --skip-bad.
    bomb(&root.join("cat/2024/bomb.png"), 16000, 14464);
    std::fs::remove_file(&out).unwrap();
    let err = failure(&embed(&[]));
    assert!(
        err.contains("bomb.png") && err.contains("16000×14464") && err.contains("MAX_IMAGE_PIXELS"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    let run = embed(&["--skip-bad"]);
    let warn = String::from_utf8_lossy(&run.stderr).into_owned();
    let stdout = success(&run);
    assert!(
        stdout.contains("embedded 5 images") && stdout.contains("1 unreadable skipped"),
        "{stdout}"
    );
    assert!(warn.contains("bomb.png"), "{warn}");
}
