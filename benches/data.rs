//! Data-layer throughput: decode + preprocess (the input side of `embed`) and the corruptions
//! of `prepare`. Run with `cargo bench --bench data`.

use std::path::PathBuf;

use bccp::data::corrupt::{corrupt, Corruption};
use bccp::data::loader::load_batch;
use bccp::data::Preprocess;
use bccp::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

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

criterion_group!(benches, decode_preprocess, corruptions);
criterion_main!(benches);
