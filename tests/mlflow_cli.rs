//! `bccp train --mlflow` and `bccp retrain --mlflow` against a real `mlflow server` (SQLite
//! backend store, local artifacts through `--serve-artifacts`), read back with MLflow's own
//! Python client: every setting as a param, every metric and its step, the artifacts' bytes
//! equal to the local run's files, the registered versions and the `champion` alias. Bad input:
//! an unreachable server, a malformed URI and a refused call give errors naming the URI and the
//! call, and the local run stays complete.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bccp::registry::{metric, Registry};
use common::mlflow::MlflowServer;
use common::{failure, files, prepared_small, quick_train, quick_train_args, success};

/// Reads back, with MlflowClient, every version of registered model `argv[2]`: its run's
/// params, metric histories (step, value), tags and status, its artifacts downloaded to
/// `argv[3]/<version>`, and the model's aliases.
const READ_BACK: &str = r#"
import json, os, sys
import mlflow
from mlflow import MlflowClient
uri, model, out = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
c = MlflowClient(tracking_uri=uri, registry_uri=uri)
rm = c.get_registered_model(model)
res = {"aliases": dict(rm.aliases), "versions": []}
for v in sorted(c.search_model_versions(f"name='{model}'"), key=lambda v: int(v.version)):
    run = c.get_run(v.run_id)
    hist = {k: [[m.step, m.value] for m in c.get_metric_history(v.run_id, k)]
            for k in run.data.metrics}
    d = os.path.join(out, v.version)
    os.makedirs(d)
    mlflow.artifacts.download_artifacts(run_id=v.run_id, dst_path=d)
    exp = c.get_experiment(run.info.experiment_id)
    res["versions"].append({"version": v.version, "run_id": v.run_id, "params": run.data.params,
        "metrics": hist, "tags": run.data.tags, "status": run.info.status, "dir": d,
        "experiment": exp.name, "bccp_run": v.tags.get("bccp.run")})
print(json.dumps(res))
"#;

/// Registers version 3 of model `m` from a new run holding the files of local run folder
/// `argv[2]`, then deletes that run's artifacts through the server's artifact proxy and moves
/// the `champion` alias to version 3; prints the version and the artifacts listed before and
/// after the deletion.
const MISSING_ARTIFACTS: &str = r#"
import json, sys
import mlflow
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
uri, folder = sys.argv[1:3]
mlflow.set_tracking_uri(uri)
c = MlflowClient(uri, registry_uri=uri)
v2 = c.get_model_version("m", "2")
run = c.create_run(c.get_run(v2.run_id).info.experiment_id)
c.log_artifacts(run.info.run_id, folder)
before = sorted(f.path for f in c.list_artifacts(run.info.run_id))
get_artifact_repository(run.info.artifact_uri).delete_artifacts()
after = [f.path for f in c.list_artifacts(run.info.run_id)]
c.set_terminated(run.info.run_id)
v = c.create_model_version("m", run.info.artifact_uri, run_id=run.info.run_id)
c.set_registered_model_alias("m", "champion", v.version)
print(json.dumps({"version": v.version, "before": before, "after": after}))
"#;

/// Checks that MLflow's version `v` (from [`READ_BACK`]) holds local run `name:version`.
fn assert_mirrors(v: &serde_json::Value, runs: &Path, name: &str, version: u32) {
    let reg = Registry::open(runs);
    let run = reg.resolve(&format!("{name}:{version}")).unwrap();
    let record = reg.read(&run).unwrap();
    assert_eq!(v["bccp_run"], format!("{name}:{version}"));
    assert_eq!(v["status"], "FINISHED");
    assert_eq!(v["tags"]["bccp.version"], env!("CARGO_PKG_VERSION"));
    // The commit bccp was built from (build.rs), in a git checkout.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if let Some(head) = head {
        assert_eq!(v["tags"]["mlflow.source.git.commit"], head.as_str());
    }
    assert_eq!(
        v["tags"]["mlflow.source.name"]
            .as_str()
            .unwrap()
            .split(' ')
            .next(),
        Some("bccp")
    );
    // Every setting, by its params.json name; a few by hand too.
    let params: BTreeMap<String, String> = serde_json::from_value(v["params"].clone()).unwrap();
    let expected: BTreeMap<String, String> = bccp::tracking::params_of(&record.params)
        .into_iter()
        .collect();
    assert_eq!(params, expected);
    assert_eq!(params["epochs"], "2");
    assert_eq!(params["model_name"], name);
    assert_eq!(params["image_size"], "32");
    // Every scalar the run has, once, at step 0, with its local value; the reference's name.
    let metrics: BTreeMap<String, Vec<(i64, f64)>> =
        serde_json::from_value(v["metrics"].clone()).unwrap();
    let mut expected = 0;
    for name in metric::ALL {
        if let Some(value) = record.metrics.scalar(name) {
            assert_eq!(metrics[name], [(0, value)], "{name}");
            expected += 1;
        }
    }
    assert!(expected >= 6, "{metrics:?}");
    // Per-epoch curves, step = epoch: every step MLflow holds equals the local history.
    let epochs = &record.metrics.epochs;
    assert_eq!(epochs.len(), 2, "--epochs 2");
    let curve = |f: &dyn Fn(&bccp::train::EpochStats) -> f64| -> Vec<(i64, f64)> {
        epochs.iter().map(|e| (e.epoch as i64, f(e))).collect()
    };
    let test = |e: &bccp::train::EpochStats| e.test_accuracy.unwrap();
    assert_eq!(metrics["train_acc"], curve(&|e| e.train_accuracy));
    assert_eq!(
        metrics["epoch.train_accuracy"],
        curve(&|e| e.train_accuracy)
    );
    assert_eq!(metrics["epoch.loss"], curve(&|e| e.loss));
    assert_eq!(metrics["test_acc"], curve(&test));
    assert_eq!(metrics["epoch.test_accuracy"], curve(&test));
    // The last epoch's head is the run's head.
    assert_eq!(
        metrics["test_acc"].last(),
        Some(&(2, record.metrics.test_accuracy))
    );
    assert_eq!(
        metrics["seconds.total"],
        [(0, record.metrics.seconds.total)]
    );
    // The artifacts are the run folder, byte for byte.
    let local = files(&run.path);
    let remote = files(Path::new(v["dir"].as_str().unwrap()));
    assert_eq!(
        local.len(),
        6,
        "{:?}",
        local.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(
        local == remote,
        "artifacts differ from {}",
        run.path.display()
    );
}

#[test]
fn train_mirrors_runs_and_bad_servers_leave_the_local_run() {
    let server = MlflowServer::start();
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let uri = server.uri();
    let out = success(&quick_train(
        &days,
        &runs,
        &cache,
        "m",
        &[
            "--mlflow",
            &uri,
            "--mlflow-experiment",
            "exp",
            "-t",
            "tuesday",
            "--tuesday-num",
            "18",
            "-l",
            "user_feedback",
            "--user-accuracy",
            "0.6",
            "-b",
            "Y",
        ],
    ));
    assert!(
        out.contains("mirrored to MLflow") && out.contains("model m version 1"),
        "{out}"
    );
    // The second run through MLFLOW_TRACKING_URI.
    let args = quick_train_args(&days, &runs, &cache, "m");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .arg("--quiet")
        .args(&args)
        .args(["--mlflow-experiment", "exp"])
        .env("MLFLOW_TRACKING_URI", &uri)
        .output()
        .unwrap();
    assert!(success(&out).contains("model m version 2"));
    let back = dir.path().join("back");
    let got = server.python(READ_BACK, &["m", back.to_str().unwrap()]);
    let versions = got["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{got}");
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["version"], (i + 1).to_string());
        assert_eq!(v["experiment"], "exp");
        assert_mirrors(v, &runs, "m", i as u32 + 1);
    }
    // The first run (Tuesday, user labels, the cut-off) has the noise-detection metrics.
    for name in [
        metric::NOISE_F1,
        metric::NOISE_SCORE_AUC,
        metric::TEST_ACCURACY_TUESDAY,
    ] {
        assert_eq!(versions[0]["metrics"][name][0][0], 0, "{name}: {got}");
    }
    assert_eq!(
        got["aliases"],
        serde_json::json!({}),
        "train promotes nothing"
    );

    // `bccp serve --model mlflow:m@champion` follows MLflow's alias: it downloads the version
    // the alias points at into the cache, then the next one when the alias moves.
    let move_alias = "import sys, json\nfrom mlflow import MlflowClient\n\
        c = MlflowClient(sys.argv[1], registry_uri=sys.argv[1])\n\
        c.set_registered_model_alias('m', 'champion', sys.argv[2])\nprint(json.dumps(1))";
    server.python(move_alias, &["1"]);
    let serve_cache = dir.path().join("serve-cache");
    let serving = common::http::ServeProcess::start(
        &[
            "--model",
            "mlflow:m@champion",
            "--mlflow",
            &uri,
            "--cache-dir",
            serve_cache.to_str().unwrap(),
            "--runs-dir",
            dir.path().join("no-runs").to_str().unwrap(),
            "--no-store",
            "--device",
            "cpu",
            "--poll-ms",
            "200",
        ],
        &[],
    );
    let addr = serving.addr;
    assert_eq!(common::http::get(addr, "/model").json()["version"], 1);
    server.python(move_alias, &["2"]);
    assert!(
        common::http::eventually(std::time::Duration::from_secs(30), || {
            common::http::get(addr, "/model").json()["version"] == 2
        }),
        "serve did not follow the alias: {}",
        common::http::get(addr, "/model").text()
    );
    // The alias moves to a version whose artifacts were deleted: serve keeps version 2, a
    // forced check says why, and requests are still answered.
    let local2 = Registry::open(&runs).resolve("m:2").unwrap().path;
    let got = server.python(MISSING_ARTIFACTS, &[local2.to_str().unwrap()]);
    assert_eq!(got["version"], "3", "{got}");
    assert_eq!(got["before"].as_array().unwrap().len(), 6, "{got}");
    assert_eq!(got["after"], serde_json::json!([]), "{got}");
    let forced = common::http::request(addr, "POST", "/admin/reload", &[], b"").unwrap();
    assert_eq!(forced.status, 500, "{}", forced.text());
    let outcome = forced.json();
    assert_eq!(outcome["result"], "failed", "{outcome}");
    assert_eq!(outcome["version"], 2, "{outcome}");
    let message = outcome["message"].as_str().unwrap();
    assert!(
        message.contains("mlflow:m@champion")
            && message.contains("version 3")
            && message.contains("artifacts are missing"),
        "{message}"
    );
    assert_eq!(common::http::get(addr, "/model").json()["version"], 2);
    let image = common::first_file(&days.join("monday/class0"));
    let reply = common::http::predict_png(addr, &image);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], 2);
    let metrics = common::http::get(addr, "/metrics").text();
    assert!(
        metrics.contains("bccp_model_reloads_total{result=\"sync_failed\"}"),
        "{metrics}"
    );
    serving.stop(std::time::Duration::from_secs(20));
    // A server started now, with the alias on that version, refuses to start, saying why.
    let err = failure(&common::bccp(&[
        "serve",
        "--model",
        "mlflow:m@champion",
        "--mlflow",
        &uri,
        "--cache-dir",
        dir.path().join("fresh-cache").to_str().unwrap(),
        "--no-store",
        "--device",
        "cpu",
        "--bind",
        "127.0.0.1:0",
    ]));
    assert!(
        err.contains("mlflow:m@champion") && err.contains("artifacts are missing"),
        "{err}"
    );
    // The cache holds MLflow's versions 1 and 2: the local runs m:1 and m:2, byte for byte;
    // nothing of version 3.
    let cached = std::fs::read_dir(serve_cache.join("remote-models"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("m");
    let reg = Registry::open(&runs);
    for v in [1, 2] {
        let local = files(&reg.resolve(&format!("m:{v}")).unwrap().path);
        assert!(
            local == files(&cached.join(v.to_string())),
            "cached version {v}"
        );
    }
    let entries = common::entries(&cached);
    assert!(
        !cached.join("3").exists() && !entries.iter().any(|e| e.starts_with(".download-")),
        "{entries:?}"
    );
    // An alias MLflow does not have: serve refuses to start, naming the spec and the call.
    let err = failure(&common::bccp(&[
        "serve",
        "--model",
        "mlflow:m@nope",
        "--mlflow",
        &uri,
        "--cache-dir",
        serve_cache.to_str().unwrap(),
        "--no-store",
        "--bind",
        "127.0.0.1:0",
    ]));
    assert!(
        err.contains("mlflow:m@nope") && err.contains("registered-models/alias"),
        "{err}"
    );

    // A server that is down: the error names the URI and the call; the local run is complete.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let err = failure(&quick_train(
        &days,
        &runs,
        &cache,
        "m",
        &["--mlflow", &down],
    ));
    assert!(
        err.contains(&down)
            && err.contains("experiments/get-by-name")
            && err.contains("cannot reach"),
        "{err}"
    );
    assert!(err.contains("m:3") && err.contains("kept"), "{err}");
    let reg = Registry::open(&runs);
    assert!(reg.is_complete(&reg.resolve("m:3").unwrap()));

    // A malformed URI is refused before any work.
    let err = failure(&quick_train(
        &days,
        &runs,
        &cache,
        "m",
        &["--mlflow", "localhost:5000"],
    ));
    assert!(
        err.contains("localhost:5000") && err.contains("http://HOST"),
        "{err}"
    );
    assert_eq!(reg.versions("m"), [1, 2, 3]);

    // A call the server refuses (runs/create in a deleted experiment): named, with MLflow's
    // reason; the local run is kept and no model version is registered.
    server.python(
        "import sys, json\nfrom mlflow import MlflowClient\nc = MlflowClient(sys.argv[1])\n\
         c.delete_experiment(c.create_experiment('gone'))\nprint(json.dumps(1))",
        &[],
    );
    let err = failure(&quick_train(
        &days,
        &runs,
        &cache,
        "m",
        &["--mlflow", &uri, "--mlflow-experiment", "gone"],
    ));
    assert!(
        err.contains(&uri) && err.contains("runs/create") && err.contains("refused"),
        "{err}"
    );
    assert!(reg.is_complete(&reg.resolve("m:4").unwrap()));
    // Versions 1 and 2 from bccp, 3 registered above with its artifacts deleted; none more.
    let count = "import sys, json\nfrom mlflow import MlflowClient\n\
        c = MlflowClient(sys.argv[1], registry_uri=sys.argv[1])\n\
        print(json.dumps(len(c.search_model_versions(\"name='m'\"))))";
    assert_eq!(server.python(count, &[]), 3);
}

/// `bccp retrain --mlflow`: every challenger is mirrored with its gate accuracies, and MLflow's
/// `champion` alias follows the promotion. A cycle whose mirroring fails (server down) keeps
/// the local promotion and leaves MLflow's alias where it was, not half-moved.
#[test]
fn retrain_moves_the_champion_alias_only_when_everything_is_mirrored() {
    let server = MlflowServer::start();
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let db = format!("sqlite:{}", dir.path().join("store.sqlite3").display());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let weights = common::asset("weights/mobilenet_v2.safetensors");
    let generate = |day: &str| {
        success(&common::bccp(&[
            "generate",
            "-d",
            days.to_str().unwrap(),
            "--db",
            &db,
            "--day",
            day,
            "--bulk",
            "--gate-fraction",
            "0.3",
        ]))
    };
    let retrain = |uri: &str| {
        common::bccp(&[
            "retrain",
            "--db",
            &db,
            "--model",
            "loop",
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--weights",
            weights.to_str().unwrap(),
            "--offline",
            "--device",
            "cpu",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--margin",
            "0",
            "--max-day-drop",
            "1",
            // On 14 candidates relabelling ties the majority-class baseline; dropping beats it.
            "--cutoff-action",
            "drop",
            "--mlflow",
            uri,
        ])
    };
    generate("monday");
    let out = success(&retrain(&server.uri()));
    assert!(
        out.contains("PROMOTED") && out.contains("MLflow alias loop@champion → version 1"),
        "{out}"
    );
    let back = dir.path().join("back");
    let got = server.python(READ_BACK, &["loop", back.to_str().unwrap()]);
    assert_eq!(
        got["aliases"],
        serde_json::json!({"champion": "1"}),
        "{got}"
    );
    let v = &got["versions"][0];
    assert_eq!(v["bccp_run"], "loop:1");
    assert_eq!(v["tags"]["mlflow.source.name"], "bccp retrain");
    let gate = v["metrics"]["gate_accuracy"][0][1].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&gate), "{got}");
    // The challenger's training curve; the gate scores it afterwards (test_acc at step 0).
    let record = Registry::open(&runs)
        .read(&Registry::open(&runs).resolve("loop:1").unwrap())
        .unwrap();
    let train_acc: Vec<(i64, f64)> = record
        .metrics
        .epochs
        .iter()
        .map(|e| (e.epoch as i64, e.train_accuracy))
        .collect();
    assert_eq!(train_acc.len(), 2);
    assert_eq!(v["metrics"]["train_acc"], serde_json::json!(train_acc));
    assert_eq!(
        v["metrics"]["test_acc"],
        serde_json::json!([[0, record.metrics.test_accuracy]])
    );
    let local = files(&Registry::open(&runs).resolve("loop:1").unwrap().path);
    assert!(local == files(Path::new(v["dir"].as_str().unwrap())));

    // The next cycle, with the server down: promoted locally, MLflow's alias untouched.
    generate("tuesday");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let err = failure(&retrain(&down));
    assert!(
        err.contains(&down) && err.contains("loop:2") && err.contains("kept"),
        "{err}"
    );
    let reg = Registry::open(&runs);
    assert_eq!(reg.resolve("loop@champion").unwrap().version, 2);
    let back = dir.path().join("back2");
    let got = server.python(READ_BACK, &["loop", back.to_str().unwrap()]);
    assert_eq!(
        got["aliases"],
        serde_json::json!({"champion": "1"}),
        "{got}"
    );
    assert_eq!(got["versions"].as_array().unwrap().len(), 1);
}

/// `bccp experiment --mlflow`: every run of the grid mirrored, with the experiment's table and
/// charts beside its files.
#[test]
fn experiment_mirrors_every_run_with_the_charts() {
    let server = MlflowServer::start();
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let config = dir.path().join("grid.toml");
    std::fs::write(
        &config,
        format!(
            r#"seeds = [1]
user_accuracy = [0.7]
cache_dir = "{cache}"
device = "cpu"
[run]
dataset = "{days}"
monday_num = 18
tuesday_num = 18
image_size = 32
weights = "{weights}"
epochs = 2
[[grid]]
method = ["none"]
"#,
            cache = dir.path().join("cache").display(),
            days = days.display(),
            weights = common::asset("weights/mobilenet_v2.safetensors").display(),
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let log = success(&common::bccp(&[
        "experiment",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--mlflow",
        &server.uri(),
    ]));
    assert!(log.contains("2 runs: 2 run now"), "{log}");
    let back = dir.path().join("back");
    let got = server.python(READ_BACK, &["experiment", back.to_str().unwrap()]);
    let versions = got["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{got}");
    let reg = Registry::open(out.join("registry"));
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["experiment"], "bccp");
        assert_eq!(v["tags"]["mlflow.source.name"], "bccp experiment");
        let run = reg.resolve(&format!("experiment:{}", i + 1)).unwrap();
        let record = reg.read(&run).unwrap();
        let params: BTreeMap<String, String> = serde_json::from_value(v["params"].clone()).unwrap();
        let expected: BTreeMap<String, String> = bccp::tracking::params_of(&record.params)
            .into_iter()
            .collect();
        assert_eq!(params, expected);
        assert_eq!(
            v["metrics"]["test_accuracy"],
            serde_json::json!([[0, record.metrics.test_accuracy]])
        );
        let remote = files(Path::new(v["dir"].as_str().unwrap()));
        let (charts, own): (Vec<_>, Vec<_>) = remote
            .into_iter()
            .partition(|(p, _)| p.starts_with("experiment"));
        assert!(
            own == files(&run.path),
            "run files of {}",
            run.path.display()
        );
        let names: Vec<String> = charts
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "experiment/accuracy.png",
                "experiment/detection.png",
                "experiment/results.csv",
                "experiment/results.md"
            ]
        );
        for (p, bytes) in &charts {
            assert!(
                *bytes == std::fs::read(out.join(p.file_name().unwrap())).unwrap(),
                "{}",
                p.display()
            );
        }
    }
}

/// `--finetune full` records its epochs as head training does: a short full fine-tune (36
/// images of 32×32, 2 epochs) mirrored to MLflow has one step per epoch of `epoch.loss`,
/// `train_acc` and `test_acc` (and their `epoch.*` twins), equal to the local history.
#[test]
fn full_finetune_mirrors_one_step_per_epoch() {
    let server = MlflowServer::start();
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let uri = server.uri();
    let out = success(&quick_train(
        &days,
        &runs,
        &cache,
        "ft",
        &["--finetune", "full", "--mlflow", &uri],
    ));
    assert!(out.contains("model ft version 1"), "{out}");
    let back = dir.path().join("back");
    let got = server.python(READ_BACK, &["ft", back.to_str().unwrap()]);
    let v = &got["versions"][0];
    assert_eq!(v["params"]["finetune"], "full", "{got}");
    let reg = Registry::open(&runs);
    let record = reg.read(&reg.resolve("ft:1").unwrap()).unwrap();
    let epochs = &record.metrics.epochs;
    assert_eq!(
        epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        [1, 2],
        "--epochs 2"
    );
    let metrics: BTreeMap<String, Vec<(i64, f64)>> =
        serde_json::from_value(v["metrics"].clone()).unwrap();
    let curve = |f: &dyn Fn(&bccp::train::EpochStats) -> f64| -> Vec<(i64, f64)> {
        epochs.iter().map(|e| (e.epoch as i64, f(e))).collect()
    };
    let test = |e: &bccp::train::EpochStats| e.test_accuracy.expect("a test split");
    for (name, want) in [
        ("epoch.loss", curve(&|e| e.loss)),
        ("train_acc", curve(&|e| e.train_accuracy)),
        ("epoch.train_accuracy", curve(&|e| e.train_accuracy)),
        ("test_acc", curve(&test)),
        ("epoch.test_accuracy", curve(&test)),
    ] {
        assert_eq!(metrics[name], want, "{name}");
    }
    for e in epochs {
        assert!(e.loss.is_finite() && e.loss > 0.0, "{e:?}");
        for acc in [e.train_accuracy, test(e)] {
            assert!((0.0..=1.0).contains(&acc), "{e:?}");
        }
    }
    let local = files(&reg.resolve("ft:1").unwrap().path);
    assert!(local == files(Path::new(v["dir"].as_str().unwrap())));
}
