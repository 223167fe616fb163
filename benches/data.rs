//! Data-layer throughput: decode + preprocess (the input side of `embed`) and the corruptions
//! of `prepare`. Run with `cargo bench --bench data`.

use std::path::PathBuf;

use bccp::data::corrupt::{corrupt, Corruption};
use bccp::data::loader::load_batch;
use bccp::data::resize::resize_normalised;
use bccp::data::Preprocess;
use bccp::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use image::imageops::FilterType;

fn write_images(dir: &std::path::Path, n: usize, size: u32) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            image::RgbImage::from_fn(size, size, |x, y| {
                image::Rgb([(x + i as u32) as u8, y as u8, (x ^ y) as u8])
            })
            .save(&path)
            .expect("write bench image");
            path
        })
        .collect()
}

fn decode_preprocess(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("decode_preprocess_224");
    for (name, size) in [("28px", 28u32), ("256px", 256)] {
        let paths = write_images(dir.path(), 64, size);
        group.throughput(Throughput::Elements(paths.len() as u64));
        let pre = Preprocess::imagenet(224);
        group.bench_function(name, |b| {
            b.iter(|| load_batch(&paths, 0, &pre, false).expect("decode"))
        });
    }
    group.finish();
}

/// The preprocessing resize against the `image` crate's resize + the same normalisation it
/// replaces (bit-identical outputs, `data::resize`'s tests): 28 → 256 px as the served
/// Fashion-MNIST images, 640×480 → 224 as a photo.
fn resize(c: &mut Criterion) {
    let mut group = c.benchmark_group("resize");
    group.throughput(Throughput::Elements(1));
    for (name, (wi, hi), size) in [
        ("28_to_256", (28, 28), 256u32),
        ("640x480_to_224", (640, 480), 224),
    ] {
        let img =
            image::RgbImage::from_fn(wi, hi, |x, y| image::Rgb([x as u8, y as u8, (x * y) as u8]));
        let pre = Preprocess::imagenet(size);
        group.bench_function(format!("bccp/{name}"), |b| {
            b.iter(|| resize_normalised(&img, size as usize, size as usize, pre.mean, pre.std))
        });
        group.bench_function(format!("image_crate/{name}"), |b| {
            b.iter(|| {
                let r = image::imageops::resize(&img, size, size, FilterType::Triangle);
                pre.apply(&image::DynamicImage::ImageRgb8(r))
            })
        });
    }
    group.finish();
}

fn corruptions(c: &mut Criterion) {
    let base = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut group = c.benchmark_group("corrupt_224");
    group.throughput(Throughput::Elements(1));
    for kind in [
        Corruption::RandomBoxes,
        Corruption::Mosaic,
        Corruption::RandomLine,
    ] {
        group.bench_function(kind.name(), |b| {
            let mut rng = Rng::new(1);
            b.iter(|| {
                let mut img = base.clone();
                corrupt(&mut img, kind, &mut rng)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode_preprocess, resize, corruptions);
criterion_main!(benches);
