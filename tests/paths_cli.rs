//! The per-user folders (`bccp::paths`): commands run from a folder outside the checkout find
//! the assets `scripts/fetch-assets.sh` installed (no `--weights`), write the embedding cache
//! where `BCCP_CACHE` / `BCCP_HOME` say, and a missing weights file names the folder searched.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bccp::embeddings::EmbeddingSet;
use common::{asset, assets_dir, failure, make_folder, success};

/// A fresh temporary folder outside the checkout, to run commands in.
fn outside_checkout() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let checkout = std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap();
    let here = std::fs::canonicalize(tmp.path()).unwrap();
    assert!(
        !here.starts_with(&checkout),
        "{} is inside the checkout",
        here.display()
    );
    tmp
}

/// `bccp --quiet ARGS` run in `cwd` with the test's environment plus `env` (`None` removes a
/// variable).
fn bccp_in(cwd: &Path, env: &[(&str, Option<&Path>)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bccp"));
    cmd.current_dir(cwd).arg("--quiet").args(args);
    for (key, value) in env {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    cmd.output().expect("the bccp binary runs")
}

/// The number of files under `dir` (0 when it does not exist).
fn count_files(dir: &Path) -> usize {
    if !dir.is_dir() {
        return 0;
    }
    common::files(dir).len()
}

/// `n` images per class of the fetched Fashion-MNIST training split, copied into `dir`.
fn tiny_fashion_mnist(dir: &Path, n: usize) {
    let source = asset("fashion-mnist/train");
    for class in common::entries(&source) {
        let from = source.join(&class);
        if !from.is_dir() {
            continue;
        }
        std::fs::create_dir_all(dir.join(&class)).unwrap();
        for name in common::entries(&from).into_iter().take(n) {
            std::fs::copy(from.join(&name), dir.join(&class).join(&name)).unwrap();
        }
    }
}

#[test]
fn commands_run_from_any_folder_with_the_per_user_assets() {
    // The assets the binary resolves by itself, as the test process does (CI: the per-user
    // folder fetch-assets.sh installed into; no BCCP_ASSETS).
    let weights = asset("weights/mobilenet_v2.safetensors");
    asset("weights/efficientnet_lite0.safetensors");
    let tmp = outside_checkout();
    let cwd = tmp.path();
    let cache = cwd.join("cache");
    let env = [("BCCP_CACHE", Some(cache.as_path()))];
    let run = |args: &[&str]| bccp_in(cwd, &env, args);

    // models: the local weights are shown where they are, not under ./assets.
    let models = success(&run(&["models"]));
    let line = models
        .lines()
        .find(|l| l.starts_with("mobilenet_v2 "))
        .unwrap_or_else(|| panic!("{models}"));
    assert!(line.contains(&weights.display().to_string()), "{line}");

    // info on a small image folder.
    make_folder(&cwd.join("images"), &[2, 3]);
    let info = success(&run(&["info", "images"]));
    assert!(info.contains("with 2 classes"), "{info}");
    assert!(
        info.lines()
            .any(|l| l.starts_with("total") && l.ends_with(" 5")),
        "{info}"
    );

    // classify a real photo with the zoo's default weights.
    let photo = asset("photos/coffee.png");
    let out = success(&run(&[
        "classify",
        "--backbone",
        "efficientnet_lite0",
        "--device",
        "cpu",
        "--top",
        "1",
        photo.to_str().unwrap(),
    ]));
    assert!(out.contains("967") && out.contains("espresso"), "{out}");

    // embed the folder with mobilenet_v2: real embeddings, the cache under BCCP_CACHE.
    let out = success(&run(&[
        "embed",
        "--data",
        "images",
        "--backbone",
        "mobilenet_v2",
        "--device",
        "cpu",
        "--out",
        "emb.safetensors",
    ]));
    assert!(out.contains("embedded 5 images"), "{out}");
    let set = EmbeddingSet::load(&cwd.join("emb.safetensors")).unwrap();
    assert_eq!(set.embeddings.dims(), &[5, 1280]);
    assert!(common::max_abs(&set.embeddings) > 0.0);
    assert!(
        count_files(&cache) > 0,
        "nothing cached in {}",
        cache.display()
    );

    // prepare + train on a tiny Fashion-MNIST, the registry in ./runs.
    tiny_fashion_mnist(&cwd.join("fm"), 12);
    success(&run(&["prepare", "--source", "fm", "--out", "days"]));
    let out = success(&run(&[
        "train",
        "-d",
        "days",
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--model-name",
        "tiny",
    ]));
    assert!(!out.is_empty());
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cwd.join("runs/tiny/1/metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(metrics.is_object(), "{metrics}");
    assert!(
        !cwd.join("assets").exists(),
        "no assets folder was made here"
    );
}

#[test]
fn bccp_home_holds_the_cache_when_no_bccp_cache_is_set() {
    let real_assets = assets_dir();
    asset("weights/mobilenet_v2.safetensors");
    let tmp = outside_checkout();
    let home = tmp.path().join("home");
    make_folder(&tmp.path().join("images"), &[1, 1]);
    let out = bccp_in(
        tmp.path(),
        &[
            ("BCCP_HOME", Some(home.as_path())),
            ("BCCP_ASSETS", Some(real_assets.as_path())),
            ("BCCP_CACHE", None),
        ],
        &[
            "embed",
            "--data",
            "images",
            "--backbone",
            "mobilenet_v2",
            "--device",
            "cpu",
            "--out",
            "emb.safetensors",
        ],
    );
    success(&out);
    assert!(count_files(&home.join("cache")) > 0);
    assert_eq!(common::entries(&home), vec!["cache"]);
}

#[test]
fn missing_weights_name_the_folder_searched_and_the_fixes() {
    let tmp = outside_checkout();
    let empty: PathBuf = tmp.path().join("empty-assets");
    std::fs::create_dir(&empty).unwrap();
    make_folder(&tmp.path().join("images"), &[1]);
    let err = failure(&bccp_in(
        tmp.path(),
        &[("BCCP_ASSETS", Some(empty.as_path()))],
        &[
            "classify",
            "--backbone",
            "efficientnet_lite0",
            "--device",
            "cpu",
            "images/class0/img000.png",
        ],
    ));
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("weights of efficientnet_lite0 not found"),
        "{err}"
    );
    assert!(err.contains(&empty.display().to_string()), "{err}");
    for fix in [
        "scripts/fetch-assets.sh",
        "BCCP_ASSETS",
        "BCCP_HOME",
        "--weights",
    ] {
        assert!(err.contains(fix), "{fix} missing: {err}");
    }
}
