//! A thin, blocking client of MLflow's REST API (`/api/2.0/mlflow/…`) and of its artifact proxy
//! (`/api/2.0/mlflow-artifacts/artifacts/…`, served by `mlflow server --serve-artifacts`): the
//! calls bccp needs to mirror a run — experiments, runs, batched params and metrics, artifact
//! uploads, registered models, versions and aliases. Every failure names the server and the call.

use std::time::Duration;

use serde_json::{json, Value};

use super::{Result, TrackingError};

/// MLflow's limits on one `runs/log-batch` call.
pub const MAX_METRICS_PER_BATCH: usize = 1000;
/// At most this many params per `runs/log-batch` call.
pub const MAX_PARAMS_PER_BATCH: usize = 100;
/// At most this many tags per `runs/log-batch` call.
pub const MAX_TAGS_PER_BATCH: usize = 100;
/// At most this many entities (metrics + params + tags) per `runs/log-batch` call.
pub const MAX_ENTITIES_PER_BATCH: usize = 1000;

/// One metric value at a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub step: i64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// A created run: its id and where its artifacts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    pub artifact_uri: String,
}

/// A client of one tracking server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Client {
    /// A client of the server at `uri` (`http://HOST[:PORT][/PREFIX]` or `https://…`); nothing
    /// is sent yet.
    pub fn new(uri: &str) -> Result<Self> {
        let base = uri.trim_end_matches('/');
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            return Err(TrackingError::BadUri(uri.to_owned()));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build();
        Ok(Self {
            base: base.to_owned(),
            agent,
        })
    }

    /// The server's URI.
    pub fn uri(&self) -> &str {
        &self.base
    }

    fn fail(&self, call: &str, message: String) -> TrackingError {
        TrackingError::Call {
            uri: self.base.clone(),
            call: call.to_owned(),
            message,
        }
    }

    /// Turns a ureq result into the JSON answer, or an error naming the call; a refusal keeps
    /// MLflow's `error_code` (returned separately so callers can accept some).
    fn answer(
        &self,
        call: &str,
        result: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<std::result::Result<Value, (u16, String, String)>> {
        match result {
            Ok(resp) => {
                let text = resp
                    .into_string()
                    .map_err(|e| self.fail(call, format!("reading the answer: {e}")))?;
                if text.trim().is_empty() {
                    return Ok(Ok(Value::Null));
                }
                serde_json::from_str(&text)
                    .map(Ok)
                    .map_err(|e| self.fail(call, format!("the answer is not JSON ({e}): {text}")))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let parsed: Option<Value> = serde_json::from_str(&text).ok();
                let code = parsed
                    .as_ref()
                    .and_then(|v| v["error_code"].as_str())
                    .unwrap_or("")
                    .to_owned();
                let message = parsed
                    .as_ref()
                    .and_then(|v| v["message"].as_str())
                    .map(str::to_owned)
                    .unwrap_or(text);
                Ok(Err((status, code, message)))
            }
            Err(ureq::Error::Transport(t)) => Err(self.fail(
                call,
                format!("cannot reach the server ({t}); is `mlflow server` running there?"),
            )),
        }
    }

    fn refused(&self, call: &str, (status, code, message): (u16, String, String)) -> TrackingError {
        let code = if code.is_empty() {
            String::new()
        } else {
            format!(" {code}")
        };
        self.fail(call, format!("refused (HTTP {status}{code}): {message}"))
    }

    fn post(&self, call: &str, body: &Value) -> Result<Value> {
        let url = format!("{}/api/2.0/mlflow/{call}", self.base);
        let result = self.agent.post(&url).send_json(body);
        self.answer(call, result)?
            .map_err(|refusal| self.refused(call, refusal))
    }

    /// The id of the active experiment `name`, created when absent.
    pub fn experiment(&self, name: &str) -> Result<String> {
        let call = "experiments/get-by-name";
        let url = format!("{}/api/2.0/mlflow/{call}", self.base);
        let result = self.agent.get(&url).query("experiment_name", name).call();
        match self.answer(call, result)? {
            Ok(v) => v["experiment"]["experiment_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| self.fail(call, format!("no experiment_id in {v}"))),
            Err((_, code, _)) if code == "RESOURCE_DOES_NOT_EXIST" => {
                let v = self.post("experiments/create", &json!({ "name": name }))?;
                v["experiment_id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.fail("experiments/create", format!("no id in {v}")))
            }
            Err(refusal) => Err(self.refused(call, refusal)),
        }
    }

    /// Starts a run named `name` in experiment `experiment_id` with `tags`.
    pub fn create_run(
        &self,
        experiment_id: &str,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<RunInfo> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let v = self.post(
            "runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": name,
                "start_time": now_ms(),
                "tags": tags,
            }),
        )?;
        let info = &v["run"]["info"];
        match (info["run_id"].as_str(), info["artifact_uri"].as_str()) {
            (Some(id), Some(uri)) => Ok(RunInfo {
                run_id: id.to_owned(),
                experiment_id: experiment_id.to_owned(),
                artifact_uri: uri.to_owned(),
            }),
            _ => Err(self.fail("runs/create", format!("no run_id/artifact_uri in {v}"))),
        }
    }

    /// Logs `params` and `metrics` to a run in as many `runs/log-batch` calls as MLflow's
    /// limits need (≤ 1000 metrics, ≤ 100 params, ≤ 1000 entities per call).
    pub fn log_batch(
        &self,
        run_id: &str,
        params: &[(String, String)],
        metrics: &[Metric],
    ) -> Result<()> {
        for (params, metrics) in batches(params, metrics) {
            let params: Vec<Value> = params
                .iter()
                .map(|(k, v)| json!({ "key": k, "value": v }))
                .collect();
            let metrics: Vec<Value> = metrics
                .iter()
                .map(|m| {
                    json!({
                        "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp
                    })
                })
                .collect();
            self.post(
                "runs/log-batch",
                &json!({ "run_id": run_id, "params": params, "metrics": metrics }),
            )?;
        }
        Ok(())
    }

    /// Ends a run with `status` (`FINISHED` or `FAILED`).
    pub fn end_run(&self, run_id: &str, status: &str) -> Result<()> {
        self.post(
            "runs/update",
            &json!({ "run_id": run_id, "status": status, "end_time": now_ms() }),
        )
        .map(drop)
    }

    /// Uploads `bytes` as the artifact `rel_path` of a run whose artifact URI is
    /// `artifact_uri`, through the server's artifact proxy (`mlflow-artifacts:` URIs only).
    pub fn upload_artifact(&self, artifact_uri: &str, rel_path: &str, bytes: &[u8]) -> Result<()> {
        let root = proxy_path(artifact_uri)
            .ok_or_else(|| TrackingError::ArtifactUri(artifact_uri.to_owned()))?;
        let call = format!("mlflow-artifacts/artifacts/{root}/{rel_path}");
        let url = format!("{}/api/2.0/{call}", self.base);
        let result = self
            .agent
            .put(&url)
            .set("Content-Type", "application/octet-stream")
            .send_bytes(bytes);
        self.answer(&call, result)?
            .map(drop)
            .map_err(|refusal| self.refused(&call, refusal))
    }

    /// Creates registered model `name`; one that exists already is fine.
    pub fn ensure_registered_model(&self, name: &str) -> Result<()> {
        let call = "registered-models/create";
        let url = format!("{}/api/2.0/mlflow/{call}", self.base);
        let result = self.agent.post(&url).send_json(json!({ "name": name }));
        match self.answer(call, result)? {
            Ok(_) => Ok(()),
            Err((_, code, _)) if code == "RESOURCE_ALREADY_EXISTS" => Ok(()),
            Err(refusal) => Err(self.refused(call, refusal)),
        }
    }

    /// Registers a version of model `name` from run `run_id`'s artifacts at `source`; returns
    /// the version MLflow gave it.
    pub fn create_model_version(
        &self,
        name: &str,
        source: &str,
        run_id: &str,
        tags: &[(String, String)],
    ) -> Result<String> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let v = self.post(
            "model-versions/create",
            &json!({ "name": name, "source": source, "run_id": run_id, "tags": tags }),
        )?;
        v["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.fail("model-versions/create", format!("no version in {v}")))
    }

    /// Points alias `alias` of registered model `name` at `version`.
    pub fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<()> {
        self.post(
            "registered-models/alias",
            &json!({ "name": name, "alias": alias, "version": version }),
        )
        .map(drop)
    }
}

/// A registered model version as the registry answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVersion {
    pub version: String,
    pub run_id: String,
    /// Where its artifacts are (`mlflow-artifacts:/…` or `s3://…`).
    pub source: String,
}

impl Client {
    /// The version alias `alias` of registered model `name` points at.
    pub fn alias(&self, name: &str, alias: &str) -> Result<ModelVersion> {
        let call = "registered-models/alias";
        let url = format!("{}/api/2.0/mlflow/{call}", self.base);
        let result = self
            .agent
            .get(&url)
            .query("name", name)
            .query("alias", alias)
            .call();
        let v = self
            .answer(call, result)?
            .map_err(|refusal| self.refused(call, refusal))?;
        let mv = &v["model_version"];
        match (
            mv["version"].as_str(),
            mv["run_id"].as_str(),
            mv["source"].as_str(),
        ) {
            (Some(version), Some(run_id), Some(source)) => Ok(ModelVersion {
                version: version.to_owned(),
                run_id: run_id.to_owned(),
                source: source.to_owned(),
            }),
            _ => Err(self.fail(call, format!("no version/run_id/source in {v}"))),
        }
    }

    /// The files (not folders) directly under an artifact URI served by the proxy.
    pub fn list_artifacts(&self, artifact_uri: &str) -> Result<Vec<String>> {
        let root = proxy_path(artifact_uri)
            .ok_or_else(|| TrackingError::ArtifactUri(artifact_uri.to_owned()))?;
        let call = "mlflow-artifacts/artifacts";
        let url = format!("{}/api/2.0/{call}", self.base);
        let result = self.agent.get(&url).query("path", &root).call();
        let v = self
            .answer(call, result)?
            .map_err(|refusal| self.refused(call, refusal))?;
        let files = v["files"].as_array().cloned().unwrap_or_default();
        Ok(files
            .iter()
            .filter(|f| !f["is_dir"].as_bool().unwrap_or(false))
            .filter_map(|f| f["path"].as_str())
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
            .collect())
    }

    /// The bytes of artifact `rel_path` under an artifact URI served by the proxy.
    pub fn download_artifact(&self, artifact_uri: &str, rel_path: &str) -> Result<Vec<u8>> {
        let root = proxy_path(artifact_uri)
            .ok_or_else(|| TrackingError::ArtifactUri(artifact_uri.to_owned()))?;
        let call = format!("mlflow-artifacts/artifacts/{root}/{rel_path}");
        let url = format!("{}/api/2.0/{call}", self.base);
        match self.agent.get(&url).call() {
            Ok(resp) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes)
                    .map_err(|e| self.fail(&call, format!("reading the answer: {e}")))?;
                Ok(bytes)
            }
            Err(e) => Err(match self.answer(&call, Err(e))? {
                Ok(_) => self.fail(&call, "no answer".to_owned()),
                Err(refusal) => self.refused(&call, refusal),
            }),
        }
    }
}

/// The path under the artifact proxy of an `mlflow-artifacts:` URI
/// (`mlflow-artifacts:/1/RUN/artifacts` or `mlflow-artifacts://HOST:PORT/1/RUN/artifacts`
/// → `1/RUN/artifacts`); `None` for any other scheme.
pub fn proxy_path(artifact_uri: &str) -> Option<String> {
    let rest = artifact_uri.strip_prefix("mlflow-artifacts:")?;
    let path = match rest.strip_prefix("//") {
        Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
        None => rest,
    };
    let path = path.trim_matches('/');
    (!path.is_empty()).then(|| path.to_owned())
}

/// One `log-batch` call's share of params and metrics.
type Batch<'a> = (&'a [(String, String)], &'a [Metric]);

/// Splits params and metrics into `log-batch` calls within MLflow's limits.
fn batches<'a>(params: &'a [(String, String)], metrics: &'a [Metric]) -> Vec<Batch<'a>> {
    let mut out = Vec::new();
    let (mut p, mut m) = (params, metrics);
    while !p.is_empty() || !m.is_empty() {
        let np = p.len().min(MAX_PARAMS_PER_BATCH);
        let nm = m
            .len()
            .min(MAX_METRICS_PER_BATCH)
            .min(MAX_ENTITIES_PER_BATCH - np);
        out.push((&p[..np], &m[..nm]));
        p = &p[np..];
        m = &m[nm..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_every_limit_and_keep_order() {
        let params: Vec<(String, String)> =
            (0..250).map(|i| (format!("p{i}"), i.to_string())).collect();
        let metrics: Vec<Metric> = (0..2500)
            .map(|i| Metric {
                key: "m".into(),
                value: i as f64,
                step: i,
                timestamp: 0,
            })
            .collect();
        let b = batches(&params, &metrics);
        for (p, m) in &b {
            assert!(p.len() <= MAX_PARAMS_PER_BATCH && m.len() <= MAX_METRICS_PER_BATCH);
            assert!(p.len() + m.len() <= MAX_ENTITIES_PER_BATCH);
        }
        let p: Vec<_> = b.iter().flat_map(|(p, _)| p.iter()).cloned().collect();
        let m: Vec<_> = b.iter().flat_map(|(_, m)| m.iter()).cloned().collect();
        assert!(p == params && m == metrics);
        assert_eq!(
            b.len(),
            3,
            "900 + 1000 + 600 metrics, 100 + 100 + 50 params"
        );
        assert!(batches(&[], &[]).is_empty());
    }

    #[test]
    fn proxy_paths_and_bad_uris() {
        assert_eq!(
            proxy_path("mlflow-artifacts:/1/abc/artifacts").as_deref(),
            Some("1/abc/artifacts")
        );
        assert_eq!(
            proxy_path("mlflow-artifacts://h:5000/1/abc/artifacts").as_deref(),
            Some("1/abc/artifacts")
        );
        assert_eq!(proxy_path("s3://bucket/1/abc/artifacts"), None);
        assert_eq!(proxy_path("mlflow-artifacts:"), None);
        for bad in ["localhost:5000", "ftp://h", "http://", "http:///x", ""] {
            let err = Client::new(bad).unwrap_err().to_string();
            assert!(err.contains("http://"), "{bad}: {err}");
        }
        assert_eq!(Client::new("http://h:1/").unwrap().uri(), "http://h:1");
    }
}
