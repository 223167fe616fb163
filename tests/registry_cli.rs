//! The typed registry through the command line: versions allocated under a lock by concurrent
//! `bccp train` processes, aliases moved by `bccp runs alias` and followed by `bccp predict`,
//! and run folders that are corrupt or incomplete refused with a message naming the file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{bccp, failure, prepared_small, quick_train_args, success};

fn predict(runs: &Path, model: &str, images: &[PathBuf]) -> std::process::Output {
    let mut args = vec![
        "predict".to_owned(),
        "--model".to_owned(),
        model.to_owned(),
        "--runs-dir".to_owned(),
        runs.display().to_string(),
    ];
    args.extend(images.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bccp(&args)
}

#[test]
fn concurrent_trains_aliases_and_corrupt_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");
    // Fill the embedding cache first so both processes reach registration together.
    let args = quick_train_args(&days, &runs, &cache, "m");
    success(&bccp(&args.iter().map(String::as_str).collect::<Vec<_>>()));

    // Two processes registering the same name at the same moment: distinct versions 2 and 3.
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_bccp"))
                .arg("--quiet")
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut registered: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = success(&c.wait_with_output().unwrap());
            out.lines()
                .find_map(|l| l.strip_prefix("registered ").map(|r| r[..3].to_owned()))
                .unwrap()
        })
        .collect();
    registered.sort();
    assert_eq!(registered, ["m:2", "m:3"]);
    for v in 1..=3 {
        let run = runs.join("m").join(v.to_string());
        for file in [
            "params.json",
            "provenance.json",
            "metrics.json",
            "labels.json",
            "split.json",
            "model.safetensors",
        ] {
            assert!(run.join(file).is_file(), "{}", run.join(file).display());
        }
    }

    // params.json is the run's settings, read back as a RunConfig.
    let params: bccp::config::RunConfig =
        serde_json::from_str(&std::fs::read_to_string(runs.join("m/2/params.json")).unwrap())
            .unwrap();
    assert_eq!(params.epochs, 2);
    assert_eq!(params.image_size, Some(32));

    // Aliases: set with `runs alias`, followed by predict, listed by `runs`.
    let image = days.join("monday/class0/img000.png");
    let image = if image.is_file() {
        image
    } else {
        let manifest = std::fs::read_to_string(days.join("monday.jsonl")).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
        days.join(first["image_path"].as_str().unwrap())
    };
    let err = failure(&predict(&runs, "m@champion", std::slice::from_ref(&image)));
    assert!(err.contains("no alias \"champion\""), "{err}");
    let runs_flag = runs.to_str().unwrap();
    success(&bccp(&[
        "runs",
        "--runs-dir",
        runs_flag,
        "alias",
        "m",
        "2",
        "champion",
    ]));
    let by_alias = success(&predict(&runs, "m@champion", std::slice::from_ref(&image)));
    let by_version = success(&predict(&runs, "m:2", std::slice::from_ref(&image)));
    assert_eq!(by_alias, by_version);
    assert_eq!(by_alias.lines().count(), 1);
    let listing = success(&bccp(&["runs", "--runs-dir", runs_flag]));
    let line = listing.lines().find(|l| l.contains(" 2 ")).unwrap();
    assert!(line.ends_with("champion"), "{listing}");
    let err = failure(&bccp(&[
        "runs",
        "--runs-dir",
        runs_flag,
        "alias",
        "m",
        "9",
        "champion",
    ]));
    assert!(err.contains("no version 9"), "{err}");

    // A truncated model file is refused, naming it; so is a class count edited in labels.json.
    let model = runs.join("m/3/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = failure(&predict(&runs, "m:3", std::slice::from_ref(&image)));
    assert!(
        err.contains("m/3/model.safetensors") && err.contains("corrupt"),
        "{err}"
    );
    let labels = runs.join("m/1/labels.json");
    std::fs::write(&labels, "[\"class0\", \"class1\"]\n").unwrap();
    let err = failure(&predict(&runs, "m:1", std::slice::from_ref(&image)));
    assert!(
        err.contains("m/1/labels.json") && err.contains("2 classes"),
        "{err}"
    );
    std::fs::remove_file(runs.join("m/2/split.json")).unwrap();
    let err = failure(&predict(&runs, "m:2", std::slice::from_ref(&image)));
    assert!(err.contains("split.json"), "{err}");
}
