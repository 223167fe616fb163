//! Mirroring registered runs to an MLflow tracking server. The local registry stays the source
//! of truth and is written first; a run is then copied to MLflow — params, metrics, its files
//! as artifacts, a registered model version — and an alias is moved only after all of that
//! succeeded, so a server that is down or refuses a call leaves the local run intact and no
//! alias half-moved.

pub mod mlflow;
pub mod remote;
pub mod s3_mirror;

use std::path::{Path, PathBuf};

use crate::registry::{metric, Registry, RegistryError, RunDir, RunMetrics};
use mlflow::{now_ms, Client, Metric};

/// The environment variable MLflow's own clients read for the tracking server.
pub const TRACKING_URI_ENV: &str = "MLFLOW_TRACKING_URI";

/// The metric name the reference logged for test accuracy (bccp's `test_accuracy` too).
pub const REFERENCE_TEST_ACC: &str = "test_acc";
/// The metric name the reference logged for training accuracy, per epoch.
pub const REFERENCE_TRAIN_ACC: &str = "train_acc";
/// bccp's own per-epoch metrics (the fields of [`crate::train::EpochStats`]), step = epoch.
pub const EPOCH_LOSS: &str = "epoch.loss";
pub const EPOCH_TRAIN_ACCURACY: &str = "epoch.train_accuracy";
pub const EPOCH_TEST_ACCURACY: &str = "epoch.test_accuracy";

/// What can go wrong while mirroring; every message names the server and the call, or the file.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("invalid MLflow tracking URI {0:?} (--mlflow or MLFLOW_TRACKING_URI): expected http://HOST[:PORT][/PREFIX] or https://…")]
    BadUri(String),
    #[error("MLflow at {uri}: {call} failed: {message}")]
    Call {
        uri: String,
        call: String,
        message: String,
    },
    /// A model to serve from elsewhere (`--model mlflow:…` or `s3://…`) that cannot be used.
    #[error("{what}: {message}")]
    RemoteModel { what: String, message: String },
    #[error("the run's artifact URI {0:?} is neither served by the tracking server nor on S3: start `mlflow server` with --serve-artifacts (mlflow-artifacts: URIs) or an s3:// artifact root")]
    ArtifactUri(String),
    #[error(transparent)]
    S3(#[from] crate::s3::S3Error),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Result alias of tracking.
pub type Result<T> = std::result::Result<T, TrackingError>;

/// Where and how runs are mirrored.
#[derive(Debug, Clone)]
pub struct MlflowTarget {
    pub client: Client,
    /// The MLflow experiment the runs go to.
    pub experiment: String,
}

impl MlflowTarget {
    /// The target from `--mlflow` (else `MLFLOW_TRACKING_URI`); `None` when neither is set.
    pub fn resolve(flag: Option<&str>, experiment: &str) -> Result<Option<Self>> {
        let env = std::env::var(TRACKING_URI_ENV).ok();
        let uri = match flag.or(env.as_deref()).map(str::trim) {
            None | Some("") => return Ok(None),
            Some(uri) => uri,
        };
        Ok(Some(Self {
            client: Client::new(uri)?,
            experiment: experiment.to_owned(),
        }))
    }
}

/// A run as mirrored: its MLflow run id and registered model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    pub run_id: String,
    pub experiment_id: String,
    /// The registered model (the registry name) and its MLflow version.
    pub model: String,
    pub model_version: String,
    /// The artifact files uploaded, by name.
    pub artifacts: Vec<String>,
}

/// Every field of a JSON value as `(dotted.key, text)`: strings as they are, other values as
/// JSON.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// The params of a run: every RunConfig setting, by its `params.json` name.
pub fn params_of(config: &crate::config::RunConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    flatten(
        "",
        &serde_json::to_value(config).unwrap_or_default(),
        &mut out,
    );
    out
}

/// The metrics of a run. At step 0: every scalar of [`metric::ALL`] the run has (the
/// noise-detection figures among them), the per-class test accuracies
/// (`test_accuracy_class.<k>`), the stage seconds (`seconds.<stage>`), then `extra`. Per epoch
/// of the head's training, at step = epoch: `epoch.loss`, `epoch.train_accuracy` and the
/// reference's `train_acc`, and with a test set `epoch.test_accuracy` and the reference's
/// `test_acc` (whose last step is the run's test accuracy); without per-epoch test figures
/// `test_acc` is the final test accuracy at step 0.
pub fn metrics_of(m: &RunMetrics, extra: &[(String, f64)]) -> Vec<Metric> {
    let timestamp = now_ms();
    let at = |key: String, value: f64| Metric {
        key,
        value,
        step: 0,
        timestamp,
    };
    let mut out: Vec<Metric> = metric::ALL
        .iter()
        .filter_map(|&name| m.scalar(name).map(|v| at(name.to_owned(), v)))
        .collect();
    let test_curve = m.epochs.iter().any(|e| e.test_accuracy.is_some());
    if !test_curve {
        out.push(at(REFERENCE_TEST_ACC.to_owned(), m.test_accuracy));
    }
    for e in &m.epochs {
        let step = |key: &str, value: f64| Metric {
            key: key.to_owned(),
            value,
            step: e.epoch as i64,
            timestamp,
        };
        out.push(step(EPOCH_LOSS, e.loss));
        out.push(step(EPOCH_TRAIN_ACCURACY, e.train_accuracy));
        out.push(step(REFERENCE_TRAIN_ACC, e.train_accuracy));
        if let Some(acc) = e.test_accuracy {
            out.push(step(EPOCH_TEST_ACCURACY, acc));
            out.push(step(REFERENCE_TEST_ACC, acc));
        }
    }
    for (k, acc) in m.per_class_accuracy.iter().enumerate() {
        if let Some(acc) = acc {
            out.push(at(format!("test_accuracy_class.{k}"), *acc));
        }
    }
    let s = &m.seconds;
    for (stage, v) in [
        ("embed", s.embed),
        ("sample", s.sample),
        ("cleanse", s.cleanse),
        ("train", s.train),
        ("evaluate", s.evaluate),
        ("total", s.total),
    ] {
        out.push(at(format!("seconds.{stage}"), v));
    }
    out.extend(extra.iter().map(|(k, v)| at(k.clone(), *v)));
    out
}

/// The files of a run folder to upload, sorted by name.
pub(crate) fn run_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let io = |error| TrackingError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.is_file() {
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                files.push((name.to_owned(), path.clone()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Mirrors the registered run `run` of `registry` to MLflow: finds or creates the experiment,
/// creates a run tagged with `source` and the bccp version, logs every setting and metric
/// (plus `extra` metrics), uploads the run's files as artifacts (then `extra_files`, as
/// `(artifact path, local file)`), ends the run, and registers
/// a version of the model named like the registry name. A failure after the run was created
/// marks it FAILED (best effort) and returns the first error; nothing local is touched.
pub fn mirror_run(
    target: &MlflowTarget,
    registry: &Registry,
    run: &RunDir,
    source: &str,
    extra: &[(String, f64)],
    extra_files: &[(String, PathBuf)],
) -> Result<Mirrored> {
    let record = registry.read(run)?;
    let client = &target.client;
    let experiment_id = client.experiment(&target.experiment)?;
    let mut tags = vec![
        ("mlflow.source.name".to_owned(), source.to_owned()),
        ("mlflow.source.type".to_owned(), "LOCAL".to_owned()),
        (
            "bccp.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        (
            "bccp.run".to_owned(),
            format!("{}:{}", run.name, run.version),
        ),
        ("bccp.run_dir".to_owned(), run.path.display().to_string()),
    ];
    if let Some(commit) = option_env!("BCCP_GIT_COMMIT").filter(|c| !c.is_empty()) {
        tags.push(("mlflow.source.git.commit".to_owned(), commit.to_owned()));
    }
    let info = client.create_run(
        &experiment_id,
        &format!("{}-v{}", run.name, run.version),
        &tags,
    )?;
    let logged = (|| -> Result<Vec<String>> {
        client.log_batch(
            &info.run_id,
            &params_of(&record.params),
            &metrics_of(&record.metrics, extra),
        )?;
        let mut uploaded = Vec::new();
        let mut files = run_files(&run.path)?;
        files.extend(extra_files.iter().cloned());
        // An s3:// artifact root is written straight to S3 (AWS environment), not proxied.
        let s3 = match info.artifact_uri.starts_with("s3://") {
            true => {
                let uri = crate::s3::S3Uri::parse(&info.artifact_uri)?;
                let cfg = crate::s3::S3Config::from_env()?;
                Some((crate::s3::S3Client::new(&uri, &cfg)?, uri))
            }
            false => None,
        };
        for (name, path) in files {
            let bytes = std::fs::read(&path).map_err(|error| TrackingError::Io {
                path: path.clone(),
                error,
            })?;
            match &s3 {
                Some((s3, uri)) => drop(s3.put(&uri.key(&name), &bytes)?),
                None => client.upload_artifact(&info.artifact_uri, &name, &bytes)?,
            }
            uploaded.push(name);
        }
        client.end_run(&info.run_id, "FINISHED")?;
        Ok(uploaded)
    })();
    let artifacts = match logged {
        Ok(a) => a,
        Err(e) => {
            let _ = client.end_run(&info.run_id, "FAILED");
            return Err(e);
        }
    };
    client.ensure_registered_model(&run.name)?;
    let model_version = client.create_model_version(
        &run.name,
        &info.artifact_uri,
        &info.run_id,
        &[(
            "bccp.run".to_owned(),
            format!("{}:{}", run.name, run.version),
        )],
    )?;
    Ok(Mirrored {
        run_id: info.run_id,
        experiment_id,
        model: run.name.clone(),
        model_version,
        artifacts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_a_param_and_every_scalar_a_metric() {
        let cfg = crate::config::RunConfig::default();
        let params = params_of(&cfg);
        let json = serde_json::to_value(&cfg).unwrap();
        let top = json.as_object().unwrap();
        for key in top.keys() {
            assert!(
                params
                    .iter()
                    .any(|(k, _)| k == key || k.starts_with(&format!("{key}."))),
                "{key}"
            );
        }
        let m = RunMetrics {
            test_accuracy: 0.5,
            noise_f1: Some(0.25),
            per_class_accuracy: vec![Some(1.0), None],
            ..RunMetrics::default()
        };
        let got = metrics_of(&m, &[("gate_accuracy".to_owned(), 0.75)]);
        let value = |k: &str| got.iter().find(|x| x.key == k).map(|x| x.value);
        assert_eq!(value("test_accuracy"), Some(0.5));
        assert_eq!(value(REFERENCE_TEST_ACC), Some(0.5));
        assert_eq!(value("noise_f1"), Some(0.25));
        assert_eq!(value("noise_recall"), None);
        assert_eq!(value("test_accuracy_class.0"), Some(1.0));
        assert_eq!(value("test_accuracy_class.1"), None);
        assert_eq!(value("gate_accuracy"), Some(0.75));
        assert_eq!(value("seconds.total"), Some(0.0));

        // Per-epoch curves at step = epoch; `test_acc` becomes the test curve.
        let epoch = |epoch, loss, train, test| crate::train::EpochStats {
            epoch,
            loss,
            train_accuracy: train,
            test_accuracy: test,
        };
        let m = RunMetrics {
            test_accuracy: 0.5,
            epochs: vec![
                epoch(1, 2.0, 0.25, Some(0.375)),
                epoch(2, 1.0, 0.75, Some(0.5)),
            ],
            ..RunMetrics::default()
        };
        let got = metrics_of(&m, &[]);
        let curve = |k: &str| -> Vec<(i64, f64)> {
            got.iter()
                .filter(|x| x.key == k)
                .map(|x| (x.step, x.value))
                .collect()
        };
        assert_eq!(curve(REFERENCE_TEST_ACC), [(1, 0.375), (2, 0.5)]);
        assert_eq!(curve(EPOCH_TEST_ACCURACY), [(1, 0.375), (2, 0.5)]);
        assert_eq!(curve(REFERENCE_TRAIN_ACC), [(1, 0.25), (2, 0.75)]);
        assert_eq!(curve(EPOCH_TRAIN_ACCURACY), [(1, 0.25), (2, 0.75)]);
        assert_eq!(curve(EPOCH_LOSS), [(1, 2.0), (2, 1.0)]);
        assert_eq!(curve("test_accuracy"), [(0, 0.5)]);
        // Without test figures per epoch (retrain: the gate scores the head afterwards).
        let m = RunMetrics {
            test_accuracy: 0.5,
            epochs: vec![epoch(1, 2.0, 0.25, None)],
            ..RunMetrics::default()
        };
        let got = metrics_of(&m, &[]);
        let keys = |k: &str| got.iter().filter(|x| x.key == k).count();
        assert_eq!(keys(EPOCH_TEST_ACCURACY), 0);
        assert_eq!(value_of(&got, REFERENCE_TEST_ACC), Some((0, 0.5)));
        assert_eq!(value_of(&got, REFERENCE_TRAIN_ACC), Some((1, 0.25)));
    }

    fn value_of(got: &[Metric], k: &str) -> Option<(i64, f64)> {
        got.iter().find(|x| x.key == k).map(|x| (x.step, x.value))
    }
}
