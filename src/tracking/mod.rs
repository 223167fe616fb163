//! Mirroring registered runs to an MLflow tracking server. The local registry stays the source
//! of truth and is written first; a run is then copied to MLflow — params, metrics, its files
//! as artifacts, a registered model version — and an alias is moved only after all of that
//! succeeded, so a server that is down or refuses a call leaves the local run intact and no
//! alias half-moved.

pub mod mlflow;

use std::path::{Path, PathBuf};

use crate::registry::{metric, Registry, RegistryError, RunDir, RunMetrics};
use mlflow::{now_ms, Client, Metric};

/// The environment variable MLflow's own clients read for the tracking server.
pub const TRACKING_URI_ENV: &str = "MLFLOW_TRACKING_URI";

/// The metric name the reference logged for test accuracy (bccp's `test_accuracy` too).
pub const REFERENCE_TEST_ACC: &str = "test_acc";

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
    #[error("the run's artifact URI {0:?} is not served by the tracking server: start `mlflow server` with --serve-artifacts (artifacts go through mlflow-artifacts: URIs; s3:// artifact roots are not supported yet)")]
    ArtifactUri(String),
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

/// The metrics of a run, all at step 0: every scalar of [`metric::ALL`] the run has, the
/// reference's `test_acc`, the per-class test accuracies (`test_accuracy_class.<k>`), the stage
/// seconds (`seconds.<stage>`), then `extra`.
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
    out.push(at(REFERENCE_TEST_ACC.to_owned(), m.test_accuracy));
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
fn run_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
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
        for (name, path) in files {
            let bytes = std::fs::read(&path).map_err(|error| TrackingError::Io {
                path: path.clone(),
                error,
            })?;
            client.upload_artifact(&info.artifact_uri, &name, &bytes)?;
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
    }
}
