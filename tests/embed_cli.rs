//! `bccp embed`: output file, order, determinism, the cache; hub loading from a local
//! hub-format cache with offline mode.

mod common;

use std::path::Path;

use bccp::backbone::{zoo, Backbone};
use bccp::embeddings::EmbeddingSet;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use common::{asset, bccp, failure, make_folder, success};

/// `bccp embed` of `data` with MobileNetV2's real weights, batches of 2, `extra` flags; its
/// standard output (the run must succeed).
fn embed(data: &Path, out: &Path, extra: &[&str]) -> String {
    success(&embed_run(data, out, extra))
}

/// The `bccp embed` run of [`embed`], which may fail.
fn embed_run(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let weights = asset("weights/mobilenet_v2.safetensors");
    let mut args = vec![
        "embed",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "mobilenet_v2",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch",
        "2",
    ];
    args.extend_from_slice(extra);
    bccp(&args)
}

/// `bccp args…` with the Hugging Face cache at `hub`, offline.
fn bccp_offline_hub(hub: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args(args)
        .env("HF_HUB_CACHE", hub)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn embeds_in_order_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[3, 2]);
    let cache = tmp.path().join("cache");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let (a, b, c) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
        tmp.path().join("c.safetensors"),
    );

    let first = embed(&src, &a, &cache_arg);
    assert!(
        first.contains("embedded 5 images") && first.contains("0 from cache, 5 computed"),
        "{first}"
    );
    let set = EmbeddingSet::load(&a).unwrap();
    assert_eq!(set.embeddings.dims(), &[5, 1280]);
    assert_eq!(set.targets, vec![0, 0, 0, 1, 1]);
    assert_eq!(
        set.paths,
        vec![
            "class0/img000.png",
            "class0/img001.png",
            "class0/img002.png",
            "class1/img000.png",
            "class1/img001.png"
        ]
    );
    assert_eq!(set.classes, vec!["class0", "class1"]);
    assert_eq!(set.model, "mobilenet_v2");
    assert_eq!(set.weights_sha256.len(), 64);
    assert!(set.ids.is_none());

    // The second call is served from the cache, byte for byte the same file.
    let second = embed(&src, &b, &cache_arg);
    assert!(second.contains("5 from cache, 0 computed"), "{second}");
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "cached output differs"
    );

    // --no-cache recomputes, deterministically.
    let third = embed(&src, &c, &["--no-cache"]);
    assert!(third.contains("0 from cache, 5 computed"), "{third}");
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&c).unwrap(),
        "recomputed output differs"
    );

    // An edited image misses the cache; the others hit.
    let edited = src.join("class1/img001.png");
    image::RgbImage::from_pixel(100, 80, image::Rgb([1, 2, 3]))
        .save(&edited)
        .unwrap();
    let fourth = embed(&src, &c, &cache_arg);
    assert!(fourth.contains("4 from cache, 1 computed"), "{fourth}");

    // Embeddings are those of the model on each image alone.
    let spec = zoo::find("mobilenet_v2").unwrap();
    let model = Backbone::load(
        &spec,
        &asset("weights/mobilenet_v2.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let pre = spec.preprocess();
    let one =
        bccp::data::loader::load_batch(&[src.join("class0/img002.png")], 0, &pre, false).unwrap();
    let direct = model
        .embed(&one.to_tensor(&pre, &Device::Cpu).unwrap())
        .unwrap();
    let stored = set.embeddings.get(2).unwrap().unsqueeze(0).unwrap();
    let diff = common::max_abs_diff(&direct, &stored);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn embeds_a_manifest_with_ids_and_reports_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[2, 2]);
    let days = tmp.path().join("days");
    success(&bccp(&[
        "prepare",
        "--source",
        src.to_str().unwrap(),
        "--out",
        days.to_str().unwrap(),
    ]));
    let out = tmp.path().join("tuesday.safetensors");
    embed(&days.join("tuesday.jsonl"), &out, &["--no-cache"]);
    let set = EmbeddingSet::load(&out).unwrap();
    assert_eq!(set.ids, Some(vec![3, 4]));
    assert!(set.paths.iter().all(|p| p.starts_with("tuesday/")));
    assert_eq!(set.classes, vec!["class0", "class1"]);

    let err = failure(&bccp(&[
        "embed",
        "--data",
        src.to_str().unwrap(),
        "--model",
        "vgg16",
        "--out",
        "x.safetensors",
    ]));
    assert!(
        err.contains("vgg16") && err.contains("mobilenet_v2"),
        "{err}"
    );
    let err = failure(&bccp(&[
        "embed",
        "--data",
        src.to_str().unwrap(),
        "--model",
        "mobilenet_v2",
        "--weights",
        "/nope.safetensors",
        "--out",
        "x.safetensors",
    ]));
    assert!(err.contains("/nope.safetensors"), "{err}");
    // Weights of another network: the error names the tensor.
    let lite = asset("weights/efficientnet_lite0.safetensors");
    let err = failure(&bccp(&[
        "embed",
        "--data",
        src.to_str().unwrap(),
        "--model",
        "mobilenet_v2",
        "--weights",
        lite.to_str().unwrap(),
        "--out",
        "x.safetensors",
        "--no-cache",
    ]));
    assert!(err.contains("features.0.0.weight"), "{err}");
}

/// Writes random weights with the names and shapes `name`'s loader asks for into a hub-format
/// cache (`models--org--name/{refs/main, snapshots/<commit>/<file>}`).
fn fake_hub_weights(cache: &Path, name: &str) {
    hub_weights(cache, name, false);
}

/// [`fake_hub_weights`], with noise in every tensor when `noisy` ([`common::random_weights`]).
fn hub_weights(cache: &Path, name: &str, noisy: bool) {
    let spec = zoo::find(name).unwrap();
    let zoo::WeightSource::Hub(hub) = &spec.weights else {
        panic!("{name} is not a hub model")
    };
    let commit = "c0ffee0000000000000000000000000000000000";
    let repo = cache.join(format!("models--{}", hub.repo.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(&hub.revision), format!("{commit}\n")).unwrap();
    if noisy {
        common::random_weights(name, &snapshot.join(&hub.file));
        return;
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Backbone::from_var_builder(&spec, vb).unwrap();
    varmap.save(snapshot.join(&hub.file)).unwrap();
}

#[test]
fn hub_backbones_load_offline_from_a_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[1, 1]);
    let hub = tmp.path().join("hub");
    for name in [
        "resnet18",
        "resnet34",
        "resnet50",
        "vit_base_patch16_224",
        "clip_vit_b32",
        "dinov2_small",
    ] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let args = [
            "embed",
            "--data",
            src.to_str().unwrap(),
            "--model",
            name,
            "--out",
            out.to_str().unwrap(),
            "--no-cache",
            "--device",
            "cpu",
        ];
        // Missing from the cache: a clear error naming repo, file and cache folder.
        let err = failure(&bccp_offline_hub(&hub, &args));
        let spec = zoo::find(name).unwrap();
        let zoo::WeightSource::Hub(file) = &spec.weights else {
            unreachable!()
        };
        assert!(
            err.contains(&file.repo)
                && err.contains(&file.file)
                && err.contains(hub.to_str().unwrap()),
            "{err}"
        );

        fake_hub_weights(&hub, name);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
            .args(args)
            .arg("--offline")
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap();
        success(&run);
        let set = EmbeddingSet::load(&out).unwrap();
        assert_eq!(set.embeddings.dims(), &[2, spec.embedding_dim], "{name}");
        let finite: f32 = set
            .embeddings
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(finite.is_finite(), "{name}");
        // Free the fake weights as we go.
        std::fs::remove_dir_all(&hub).unwrap();
    }
}

#[test]
fn bf16_products_embed_within_rounding_into_a_cache_of_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_folder(&src, &[3, 2]);
    let cache = tmp.path().join("cache");
    let cache = cache.to_str().unwrap();
    let (a, b) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    if !bccp::ops::bf16_gemm::available() {
        let run = embed_run(&src, &b, &["--no-cache", "--precision", "bf16"]);
        let err = failure(&run);
        assert!(
            err.contains("--precision bf16") && err.contains("AVX512-BF16"),
            "{err}"
        );
        return;
    }
    let f32_run = embed(&src, &a, &["--cache-dir", cache]);
    assert!(f32_run.contains("0 from cache, 5 computed"), "{f32_run}");
    let bf16 = ["--cache-dir", cache, "--precision", "bf16"];
    let first = embed(&src, &b, &bf16);
    assert!(
        first.contains("(bf16 products)") && first.contains("0 from cache, 5 computed"),
        "{first}"
    );
    let again = embed(&src, &b, &bf16);
    assert!(again.contains("5 from cache, 0 computed"), "{again}");
    let (f32_set, bf16_set) = (
        EmbeddingSet::load(&a).unwrap(),
        EmbeddingSet::load(&b).unwrap(),
    );
    // Relative L2 error, of the order of PyTorch's own bf16 autocast on MobileNetV2's
    // features (0.114 on random pixels, tests/finetune_engine.rs); far below unrelated
    // features' (about 1).
    let (got, want) = (
        bf16_set
            .embeddings
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        f32_set
            .embeddings
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    let sq = |v: f64| v * v;
    let diff: f64 = got.iter().zip(&want).map(|(g, w)| sq((g - w) as f64)).sum();
    let norm: f64 = want.iter().map(|w| sq(*w as f64)).sum();
    let err = (diff / norm).sqrt();
    eprintln!("bf16 features: relative L2 error {err:.4}");
    assert!(err > 0.0 && err < 0.15, "bf16 features off by {err}");

    // A transformer runs its linear layers in bf16 (random weights of the right names):
    // features within bf16 rounding of f32's.
    let hub = tmp.path().join("hub");
    hub_weights(&hub, "dinov2_small", true);
    let vit = |out: &std::path::Path, precision: &str| {
        success(&bccp_offline_hub(
            &hub,
            &[
                "embed",
                "--data",
                src.to_str().unwrap(),
                "--model",
                "dinov2_small",
                "--out",
                out.to_str().unwrap(),
                "--no-cache",
                "--precision",
                precision,
            ],
        ))
    };
    let (v32, v16) = (
        tmp.path().join("v32.safetensors"),
        tmp.path().join("v16.safetensors"),
    );
    vit(&v32, "f32");
    assert!(vit(&v16, "bf16").contains("(bf16 products)"));
    let (a, b) = (
        EmbeddingSet::load(&v32).unwrap().embeddings,
        EmbeddingSet::load(&v16).unwrap().embeddings,
    );
    let diff = (&b - &a).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = a.sqr().unwrap().sum_all().unwrap();
    let err = (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
    eprintln!("bf16 DINOv2-S features: relative L2 error {err:.2e}");
    assert!(
        err > 0.0 && err < 0.01,
        "bf16 transformer features off by {err}"
    );
}
