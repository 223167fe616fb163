//! The embedding cache under damage: records corrupted on disk are discarded, recomputed and
//! reported; a backbone that produces NaN is an error naming the image and caches nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{asset, bccp, failure, make_folder, success};

/// Bytes of one cache record of MobileNetV2: digest, 1280 f32, CRC-32.
const RECORD: usize = 32 + 4 * 1280 + 4;

/// `bccp embed` of `data` with MobileNetV2 weights `weights` at 32×32 into `out`, cached in
/// `cache`, one image per forward pass: an embedding's last bits depend on which images share
/// its batch (about 5e-6 apart here), so only single-image batches are bitwise reproducible
/// whichever images a run has to recompute.
fn embed(data: &Path, out: &Path, cache: &Path, weights: &Path) -> Output {
    bccp(&[
        "embed",
        "--data",
        data.to_str().unwrap(),
        "--backbone",
        "mobilenet_v2",
        "--weights",
        weights.to_str().unwrap(),
        "--image-size",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-size",
        "1",
    ])
}

/// The files under `cache/embeddings`.
fn cache_files(cache: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(cache.join("embeddings")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Asserts that two embedding files hold bitwise the same embeddings (and the same rest).
fn assert_same_embeddings(a: &Path, b: &Path) {
    let (x, y) = (
        bccp::embeddings::EmbeddingSet::load(a).unwrap(),
        bccp::embeddings::EmbeddingSet::load(b).unwrap(),
    );
    let bits = |s: &bccp::embeddings::EmbeddingSet| -> Vec<u32> {
        let v = s
            .embeddings
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v.iter().map(|f| f.to_bits()).collect()
    };
    let diff = common::max_abs_diff(&x.embeddings, &y.embeddings);
    assert!(
        bits(&x) == bits(&y),
        "embeddings of {} and {} differ (max abs diff {diff})",
        a.display(),
        b.display()
    );
    assert_eq!((x.paths, x.targets), (y.paths, y.targets));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn corrupt_cache_records_are_discarded_recomputed_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, cache) = (tmp.path().join("src"), tmp.path().join("cache"));
    make_folder(&src, &[3, 3]);
    let weights = asset("weights/mobilenet_v2.safetensors");
    let (a, b, c) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
        tmp.path().join("c.safetensors"),
    );

    let first = embed(&src, &a, &cache, &weights);
    assert!(
        success(&first).contains("0 from cache, 6 computed"),
        "{}",
        success(&first)
    );
    assert!(!stderr(&first).contains("warning"), "{}", stderr(&first));
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    let mut bytes = std::fs::read(file).unwrap();
    assert_eq!(bytes.len(), 6 * RECORD);

    // A third of the records get random bytes over part of their values, one more gets NaN
    // over all of its values: what a bad disk or a stray write would do.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for r in [0, 3] {
        for byte in &mut bytes[r * RECORD + 100..r * RECORD + 164] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
    }
    for v in bytes[RECORD + 32..2 * RECORD - 4].chunks_exact_mut(4) {
        v.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(file, &bytes).unwrap();

    let second = embed(&src, &b, &cache, &weights);
    let out = success(&second);
    assert!(out.contains("3 from cache, 3 computed"), "{out}");
    let warning = format!(
        "warning: embedding cache {}: 3 corrupt records discarded and recomputed",
        file.display()
    );
    let err = stderr(&second);
    assert!(err.contains(&warning), "{err}");
    assert_eq!(err.matches("warning: embedding cache").count(), 1, "{err}");
    // The recomputed embeddings are bitwise those of the first run.
    assert_same_embeddings(&a, &b);

    // Repaired for good: the next run is all hits and says nothing.
    let third = embed(&src, &c, &cache, &weights);
    assert!(
        success(&third).contains("6 from cache, 0 computed"),
        "{}",
        success(&third)
    );
    assert!(!stderr(&third).contains("warning"), "{}", stderr(&third));
    assert_eq!(std::fs::read(file).unwrap().len(), 6 * RECORD);
    assert_same_embeddings(&a, &c);
}

#[test]
fn nan_weights_are_an_error_naming_the_image_and_cache_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, cache) = (tmp.path().join("src"), tmp.path().join("cache"));
    make_folder(&src, &[2, 1]);
    // MobileNetV2 with the last convolution's weights all NaN.
    let mut tensors = candle_core::safetensors::load(
        asset("weights/mobilenet_v2.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = "features.18.0.weight";
    let t = &tensors[name];
    let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(name.to_owned(), nan);
    let weights = tmp.path().join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &weights).unwrap();

    let run = embed(&src, &tmp.path().join("out.safetensors"), &cache, &weights);
    let err = failure(&run);
    assert!(
        err.contains("non-finite")
            && err.contains(src.join("class0").join("img000.png").to_str().unwrap()),
        "{err}"
    );
    assert!(!tmp.path().join("out.safetensors").exists());
    for f in cache_files(&cache) {
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 0, "{}", f.display());
    }
}
