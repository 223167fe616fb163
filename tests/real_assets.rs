//! Tests on the real assets `scripts/fetch-assets.sh` installs: Fashion-MNIST through
//! `bccp import idx` and `bccp prepare`, and the converted safetensors weights.

mod common;

use std::io::Read;

use candle_core::{DType, Device};
use common::{asset, bccp, success};

/// Reads a gzip file independently of bccp's IDX reader.
fn gunzip(path: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn fashion_mnist_import_and_prepare() {
    let images = asset("fashion-mnist/raw/train-images-idx3-ubyte.gz");
    let labels = asset("fashion-mnist/raw/train-labels-idx1-ubyte.gz");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("train");
    let classes = "c0,c1,c2,c3,c4,c5,c6,c7,c8,c9";
    success(&bccp(&[
        "import",
        "idx",
        "--images",
        images.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--classes",
        classes,
        "--out",
        out.to_str().unwrap(),
    ]));
    let folder = bccp::data::ImageFolder::scan(&out).unwrap();
    assert_eq!(folder.items.len(), 60_000);
    assert_eq!(folder.class_counts(), vec![6000; 10]);

    // The raw files, read here byte by byte: header 16 bytes (images) / 8 bytes (labels).
    let raw_images = gunzip(&images);
    let raw_labels = gunzip(&labels);
    assert_eq!(&raw_images[..4], &[0, 0, 8, 3]);
    assert_eq!(raw_labels.len(), 8 + 60_000);
    // The first image of Fashion-MNIST's training set is an ankle boot (label 9).
    assert_eq!(raw_labels[8], 9);
    for index in [0usize, 1, 59_999] {
        let label = raw_labels[8 + index];
        let png = out.join(format!("c{label}/{index:05}.png"));
        let img = image::open(&png).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (28, 28));
        let start = 16 + index * 784;
        assert_eq!(
            img.as_raw().as_slice(),
            &raw_images[start..start + 784],
            "{}",
            png.display()
        );
    }
    let first = image::open(out.join("c9/00000.png")).unwrap().into_luma8();
    // A few pixels of the first image (row 4, columns 12..16), as stored in the IDX file.
    let row = 4 * 28;
    assert_eq!(
        &first.as_raw()[row + 12..row + 16],
        &raw_images[16 + row + 12..16 + row + 16]
    );
    assert!(first.as_raw().iter().any(|&v| v > 200));

    // Prepare the real folder: 3000 per class and day, and corrupted Tuesday images.
    let days = tmp.path().join("days");
    let stdout = success(&bccp(&[
        "prepare",
        "--source",
        out.to_str().unwrap(),
        "--out",
        days.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("30000 Monday and 30000 Tuesday images"),
        "{stdout}"
    );
    let info = bccp::data::prepare::read_dataset_info(&days).unwrap();
    assert_eq!(info.monday_per_class, vec![3000; 10]);
    assert_eq!(info.tuesday_per_class, vec![3000; 10]);
    let tuesday = bccp::data::read_manifest(&days.join("tuesday.jsonl")).unwrap();
    let changed = tuesday
        .iter()
        .take(300)
        .filter(|r| {
            std::fs::read(days.join(&r.image_path)).unwrap()
                != std::fs::read(days.join(r.original_path.as_ref().unwrap())).unwrap()
        })
        .count();
    // Boxes and lines always change a 28×28 image; mosaic regions there are narrower than
    // 10 px, where the 10×10 down-and-up scaling is the identity (see README), so about a third
    // of the images keep their pixels (their files are re-encoded PNGs).
    assert!(changed > 150, "only {changed} of 300 changed");
}

#[test]
fn converted_weights_load_in_candle() {
    let device = Device::Cpu;
    let mobilenet =
        candle_core::safetensors::load(asset("weights/mobilenet_v2.safetensors"), &device).unwrap();
    assert_eq!(mobilenet.len(), 312);
    assert_eq!(mobilenet["features.0.0.weight"].dims(), &[32, 3, 3, 3]);
    assert_eq!(mobilenet["features.18.0.weight"].dims(), &[1280, 320, 1, 1]);
    assert_eq!(mobilenet["features.1.conv.0.weight"].dims(), &[32, 1, 3, 3]);
    let var = mobilenet["features.18.1.running_var"]
        .to_dtype(DType::F32)
        .unwrap();
    let min: f32 = var.min_all().unwrap().to_scalar().unwrap();
    assert!(
        min > 0.0,
        "batch-norm variances must be positive, min {min}"
    );

    let lite =
        candle_core::safetensors::load(asset("weights/efficientnet_lite0.safetensors"), &device)
            .unwrap();
    assert_eq!(lite.len(), 296);
    assert_eq!(lite["_fc.weight"].dims(), &[1000, 1280]);
    assert_eq!(lite["_conv_stem.weight"].dims(), &[32, 3, 3, 3]);
    let w = lite["_conv_stem.weight"].flatten_all().unwrap();
    let sd: f32 = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(sd > 0.01 && sd < 10.0, "stem weights look wrong: rms {sd}");
}
