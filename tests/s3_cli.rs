//! `--artifacts s3://…` and MLflow servers whose artifact root is on S3, against a real S3
//! stand-in (`moto_server`, tests/common/s3.rs) with a 4 KiB part size so the model file goes up
//! as a multipart upload; read back with boto3, MLflow's own client and bccp's downloader, and
//! served by `bccp serve --model s3://…/NAME/VERSION`. With moto's IAM authentication on, wrong
//! keys are refused with S3's codes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bccp::registry::Registry;
use bccp::s3::{S3Client, S3Config, S3Uri};
use common::mlflow::MlflowServer;
use common::s3::{MotoServer, PART_SIZE, REGION};
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
        credentials: Some((moto.key.clone(), moto.secret.clone(), None)),
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
    serves_the_mirrored_folder(&moto, dir.path(), &days, &runs);

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

/// The environment of `moto` with another access key id and secret.
fn with_key(moto: &MotoServer, key: &str, secret: &str) -> Vec<(&'static str, String)> {
    let mut env = moto.env();
    env.retain(|(k, _)| !k.starts_with("AWS_ACCESS_KEY_ID") && *k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_ACCESS_KEY_ID", key.to_owned()));
    env.push(("AWS_SECRET_ACCESS_KEY", secret.to_owned()));
    env
}

/// With IAM authentication on, moto checks keys and signatures as S3 does: a wrong secret and
/// an unknown key id are refused with S3's codes, naming the URI; the local run is kept and
/// nothing (no object, no pending multipart upload) is left in the bucket. The right key
/// mirrors the run (single PUTs and a multipart upload, all signed in headers).
#[test]
fn wrong_keys_are_refused_and_leave_nothing_behind() {
    let moto = MotoServer::start_with_iam();
    moto.create_bucket("bccp-auth");
    let dir = tempfile::tempdir().unwrap();
    let days = prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let target = ["--artifacts", "s3://bccp-auth/team"];
    let wrong_secret = with_key(&moto, &moto.key, "not-the-secret");
    let err = failure(&train_with(&days, &runs, &cache, &wrong_secret, &target));
    assert!(
        err.contains("s3://bccp-auth/team/m/1/") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    assert!(err.contains("m:1") && err.contains("kept"), "{err}");
    let unknown = with_key(&moto, "AKIAUNKNOWNBCCPKEY00", &moto.secret);
    let err = failure(&train_with(&days, &runs, &cache, &unknown, &target));
    assert!(
        err.contains("s3://bccp-auth/team/m/2/") && err.contains("InvalidAccessKeyId"),
        "{err}"
    );
    let reg = Registry::open(&runs);
    for v in ["m:1", "m:2"] {
        assert!(reg.is_complete(&reg.resolve(v).unwrap()), "{v}");
    }
    let leftovers = r#"
objects = s3.list_objects_v2(Bucket=sys.argv[1]).get('Contents', [])
uploads = s3.list_multipart_uploads(Bucket=sys.argv[1]).get('Uploads', [])
print(json.dumps([[o['Key'] for o in objects], [u['Key'] for u in uploads]]))
"#;
    assert_eq!(
        moto.python(leftovers, &["bccp-auth"]),
        serde_json::json!([[], []])
    );

    // The right key: mirrored, byte for byte, checked by boto3 with the same key.
    let out = success(&train_with(&days, &runs, &cache, &moto.env(), &target));
    assert!(
        out.contains("mirrored to s3://bccp-auth/team/m/3: 6 files"),
        "{out}"
    );
    let local = files(&reg.resolve("m:3").unwrap().path);
    // Listed without a prefix: moto 5.1.22 with IAM on answers SignatureDoesNotMatch even to
    // boto3's own ListObjectsV2 with the prefix `team/` (seen while writing this test).
    let got = moto.python(LIST_BACK, &["bccp-auth", ""]);
    let remote: BTreeMap<String, (String, String)> = serde_json::from_value(got).unwrap();
    assert_eq!(remote.len(), local.len(), "{remote:?}");
    for (name, bytes) in &local {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(remote[&format!("team/m/3/{}", name.display())].0, hex);
    }
}

/// `bccp serve --model s3://BUCKET/PREFIX/NAME/VERSION` (here `m:1`, mirrored under
/// `s3://bccp-runs/team/a`): the cached copy equals the local run, `/model` names it, its
/// prediction is the local run's; a folder that is not there refuses to start, saying why, and
/// leaves nothing half-downloaded.
fn serves_the_mirrored_folder(moto: &MotoServer, dir: &Path, days: &Path, runs: &Path) {
    let reg = Registry::open(runs);
    let local = files(&reg.resolve("m:1").unwrap().path);
    let serve_cache = dir.join("serve-cache");
    let serve_args = |model: &'static str, cache: &Path| -> Vec<String> {
        [
            "--model",
            model,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--runs-dir",
            dir.join("no-runs").to_str().unwrap(),
            "--no-store",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = serve_args("s3://bccp-runs/team/a/m/1", &serve_cache);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = common::http::ServeProcess::start(&args, &env);
    let addr = serving.addr;
    assert!(
        serving
            .first_line
            .contains("serving m:1 (s3://bccp-runs/team/a/m/1)"),
        "{}",
        serving.first_line
    );
    let info = common::http::get(addr, "/model").json();
    assert_eq!(info["name"], "m", "{info}");
    assert_eq!(info["version"], 1, "{info}");
    let path = std::path::PathBuf::from(info["path"].as_str().unwrap());
    assert!(path.starts_with(&serve_cache), "{info}");
    let image = common::first_file(&days.join("monday/class1"));
    let reply = common::http::predict_png(addr, &image);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let served = reply.json();
    assert_eq!(served["version"], 1);
    // `bccp predict` of the local run gives the same class.
    let line = success(&common::bccp(&[
        "predict",
        "--model",
        "m:1",
        "--runs-dir",
        runs.to_str().unwrap(),
        image.to_str().unwrap(),
    ]));
    let class = line.trim().split('\t').nth(1).unwrap_or_default();
    assert_eq!(served["class"], class, "{line}");
    serving.stop(std::time::Duration::from_secs(20));
    let cached = std::fs::read_dir(serve_cache.join("remote-models"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        files(&cached.join("m/1")) == local,
        "the cached copy differs"
    );

    // A folder that is not there: refused at start (with an empty cache), naming it.
    let fresh = dir.join("fresh-cache");
    std::fs::create_dir_all(&fresh).unwrap();
    let serve_fails = |model: &'static str, env: &[(&'static str, String)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"));
        cmd.args(["--quiet", "serve", "--bind", "127.0.0.1:0"])
            .args(serve_args(model, &fresh))
            .envs(env.iter().map(|(k, v)| (k, v)));
        failure(&cmd.output().unwrap())
    };
    let err = serve_fails("s3://bccp-runs/team/a/m/9", &moto.env());
    assert!(
        err.contains("s3://bccp-runs/team/a/m/9") && err.contains("no objects"),
        "{err}"
    );
    // Nothing half-downloaded stays in the cache.
    let left: Vec<_> = files(&fresh).into_iter().map(|(p, _)| p).collect();
    assert!(
        !left
            .iter()
            .any(|p| p.to_string_lossy().contains(".download-")
                || p.ends_with(bccp::registry::files::MODEL)),
        "{left:?}"
    );
}
