//! `--artifacts s3://…` and MLflow servers whose artifact root is on S3, against a real S3
//! stand-in (`moto_server`, tests/common/s3.rs) with a 4 KiB part size so the model file goes up
//! as a multipart upload; read back with boto3, MLflow's own client and bccp's downloader.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bccp::registry::Registry;
use bccp::s3::{S3Client, S3Config, S3Uri};
use common::mlflow::MlflowServer;
use common::s3::{MotoServer, KEY, PART_SIZE, REGION, SECRET};
use common::{failure, files, prepared_small, quick_train_args, success};

/// Lists `argv[1]` under prefix `argv[2]` and downloads every object: key → (bytes as hex,
/// ETag).
const LIST_BACK: &str = r#"
out = {}
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]):
    for o in page.get('Contents', []):
        body = s3.get_object(Bucket=sys.argv[1], Key=o['Key'])['Body'].read()
        out[o['Key']] = [body.hex(), o['ETag'].strip('"')]
print(json.dumps(out))
"#;

fn train_with(
    days: &Path,
    runs: &Path,
    cache: &Path,
    env: &[(&'static str, String)],
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .arg("--quiet")
        .args(quick_train_args(days, runs, cache, "m"))
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn config(moto: &MotoServer) -> S3Config {
    S3Config {
        endpoint: moto.endpoint(),
        region: REGION.to_owned(),
        credentials: Some((KEY.to_owned(), SECRET.to_owned(), None)),
        part_size: PART_SIZE,
        path_style: true,
    }
}

#[test]
fn train_mirrors_the_run_folder_to_s3_with_multipart_and_checksums() {
    let moto = MotoServer::start();
    moto.create_bucket("bccp-runs");
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let out = success(&train_with(
        &days,
        &runs,
        &cache,
        &moto.env(),
        &["--artifacts", "s3://bccp-runs/team/a"],
    ));
    assert!(
        out.contains("mirrored to s3://bccp-runs/team/a/m/1: 6 files")
            && out.contains("(1 in parts), checksums verified"),
        "{out}"
    );
    let run = Registry::open(&runs).resolve("m:1").unwrap();
    let local = files(&run.path);
    // boto3 reads the same bytes back; the model went up in parts (its ETag says how many).
    let got = moto.python(LIST_BACK, &["bccp-runs", "team/a/m/1/"]);
    let remote: BTreeMap<String, (String, String)> = serde_json::from_value(got).unwrap();
    assert_eq!(remote.len(), local.len(), "{remote:?}");
    for (name, bytes) in &local {
        let key = format!("team/a/m/1/{}", name.display());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(remote[&key].0, hex, "{key}");
        let etag = &remote[&key].1;
        if name.ends_with("model.safetensors") {
            assert!(bytes.len() > 2 * PART_SIZE, "{}", bytes.len());
            let parts = bytes.len().div_ceil(PART_SIZE);
            assert!(etag.ends_with(&format!("-{parts}")), "{etag}");
            let chunks: Vec<&[u8]> = bytes.chunks(PART_SIZE).collect();
            assert_eq!(*etag, bccp::s3::expected_etag(&chunks, true));
        } else {
            assert_eq!(*etag, bccp::s3::md5_hex(bytes), "{key}");
        }
    }
    // bccp's own read-back: every object checked against its ETag, written atomically.
    let client = S3Client::new(&S3Uri::parse("s3://bccp-runs").unwrap(), &config(&moto)).unwrap();
    let back = dir.path().join("back");
    let folder = S3Uri::parse("s3://bccp-runs/team/a/m/1").unwrap();
    let written = bccp::tracking::s3_mirror::download_folder(&client, &folder, &back).unwrap();
    assert_eq!(written.len(), 6);
    assert!(files(&back) == local);

    // A bucket that does not exist: the error names the URI and S3's reason; the run is kept.
    let err = failure(&train_with(
        &days,
        &runs,
        &cache,
        &moto.env(),
        &["--artifacts", "s3://no-such-bucket/x"],
    ));
    assert!(
        err.contains("s3://no-such-bucket/x/m/2/") && err.contains("NoSuchBucket"),
        "{err}"
    );
    assert!(err.contains("m:2") && err.contains("kept"), "{err}");
    let reg = Registry::open(&runs);
    assert!(reg.is_complete(&reg.resolve("m:2").unwrap()));
    // An unreachable endpoint: named, with the variable to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let mut env = moto.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", down.clone()));
    let err = failure(&train_with(
        &days,
        &runs,
        &cache,
        &env,
        &["--artifacts", "s3://bccp-runs/x"],
    ));
    assert!(
        err.contains(&down) && err.contains("cannot reach") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );
    assert!(reg.is_complete(&reg.resolve("m:3").unwrap()));
    // Refused before any work: a malformed URI, missing credentials, a bad part size.
    for (flag, drop_var, add, want) in [
        ("s3:/x", None, None, "--artifacts"),
        (
            "s3://bccp-runs/x",
            Some("AWS_SECRET_ACCESS_KEY"),
            None,
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "s3://bccp-runs/x",
            None,
            Some(("BCCP_S3_PART_SIZE", "12k")),
            "BCCP_S3_PART_SIZE",
        ),
    ] {
        let mut env = moto.env();
        env.retain(|(k, _)| Some(*k) != drop_var && Some(*k) != add.map(|a| a.0));
        if let Some((k, v)) = add {
            env.push((k, v.to_owned()));
        }
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"));
        cmd.arg("--quiet")
            .args(quick_train_args(&days, &runs, &cache, "m"))
            .args(["--artifacts", flag])
            .envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(v) = drop_var {
            cmd.env_remove(v);
        }
        let err = failure(&cmd.output().unwrap());
        assert!(err.contains(want), "{flag} {want}: {err}");
    }
    assert_eq!(reg.versions("m"), [1, 2, 3], "refused before training");
}

/// An MLflow server whose artifact root is `s3://…` (not proxied): bccp writes the run's
/// artifacts straight to S3; MLflow's client downloads them (through boto3) equal to the local
/// files, and boto3 sees them under the run's artifact URI.
#[test]
fn mlflow_with_an_s3_artifact_root_gets_artifacts_straight_from_bccp() {
    let moto = MotoServer::start();
    moto.create_bucket("mlflow-art");
    let server = MlflowServer::start_s3("s3://mlflow-art/root", moto.env());
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let uri = server.uri();
    let out = success(&train_with(
        &days,
        &runs,
        &cache,
        &moto.env(),
        &["--mlflow", &uri],
    ));
    assert!(out.contains("model m version 1"), "{out}");
    let read_back = r#"
import json, os, sys
import mlflow
from mlflow import MlflowClient
uri, out = sys.argv[1:3]
c = MlflowClient(tracking_uri=uri, registry_uri=uri)
v = c.get_model_version("m", "1")
run = c.get_run(v.run_id)
mlflow.set_tracking_uri(uri)
mlflow.artifacts.download_artifacts(run_id=v.run_id, dst_path=out)
print(json.dumps({"artifact_uri": run.info.artifact_uri, "source": v.source,
                  "train_acc": [[m.step, m.value] for m in c.get_metric_history(v.run_id, "train_acc")]}))
"#;
    let back = dir.path().join("back");
    let got = server.python(read_back, &[back.to_str().unwrap()]);
    let artifact_uri = got["artifact_uri"].as_str().unwrap();
    assert!(artifact_uri.starts_with("s3://mlflow-art/root/"), "{got}");
    assert_eq!(got["source"], artifact_uri);
    let run = Registry::open(&runs).resolve("m:1").unwrap();
    let local = files(&run.path);
    assert!(files(&back) == local, "MLflow's download differs");
    let record = Registry::open(&runs).read(&run).unwrap();
    let train_acc: Vec<(i64, f64)> = record
        .metrics
        .epochs
        .iter()
        .map(|e| (e.epoch as i64, e.train_accuracy))
        .collect();
    assert_eq!(got["train_acc"], serde_json::json!(train_acc));
    // The objects are in the bucket, under the run's artifact URI, byte for byte.
    let prefix = format!("{}/", artifact_uri.trim_start_matches("s3://mlflow-art/"));
    let listed = moto.python(LIST_BACK, &["mlflow-art", &prefix]);
    let listed = listed.as_object().unwrap();
    assert_eq!(listed.len(), local.len(), "{listed:?}");
    for (name, bytes) in &local {
        let key = format!("{prefix}{}", name.display());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(listed[&key][0], hex.as_str(), "{key}");
    }
}
