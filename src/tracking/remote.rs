//! Models served from elsewhere: `mlflow:NAME@ALIAS` (a registered model's alias on an MLflow
//! server) or `s3://BUCKET/PREFIX/NAME/VERSION` (a run folder mirrored by `--artifacts`). The
//! version is downloaded into a local cache registry — into a temporary folder, checked (every
//! run file present and parsing, the model's SHA-256 equal to its provenance), then renamed to
//! `CACHE/NAME/VERSION` — and the cache's alias moved to it, so the server's own reload
//! machinery follows the remote alias.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::mlflow::Client;
use super::s3_mirror::download_folder;
use super::{Result, TrackingError};
use crate::registry::{files, Registry, RunDir};
use crate::s3::{S3Client, S3Config, S3Uri};

/// The scheme of MLflow model specs.
pub const MLFLOW_SCHEME: &str = "mlflow:";

/// Where a served model comes from.
pub enum RemoteModel {
    /// A registered model's alias on an MLflow server.
    Mlflow {
        client: Client,
        name: String,
        alias: String,
    },
    /// A mirrored run folder (`…/NAME/VERSION`).
    S3 {
        /// Boxed: the S3 client is several times the MLflow variant's size.
        client: Box<S3Client>,
        folder: S3Uri,
        name: String,
        version: u32,
    },
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec())
    }
}

fn bad_spec(what: &str, why: &str) -> TrackingError {
    TrackingError::RemoteModel {
        what: what.to_owned(),
        message: why.to_owned(),
    }
}

impl RemoteModel {
    /// The remote model of `spec`, or `None` for a local registry spec. An `mlflow:` spec needs
    /// `mlflow_uri` (--mlflow or MLFLOW_TRACKING_URI); an `s3://` one the AWS environment.
    pub fn parse(spec: &str, mlflow_uri: Option<&str>) -> Result<Option<Self>> {
        if let Some(rest) = spec.strip_prefix(MLFLOW_SCHEME) {
            let Some((name, alias)) = rest.split_once('@') else {
                return Err(bad_spec(
                    &format!("--model {spec}"),
                    "expected mlflow:NAME@ALIAS (e.g. mlflow:my-model@champion)",
                ));
            };
            if name.is_empty() || alias.is_empty() {
                return Err(bad_spec(
                    &format!("--model {spec}"),
                    "expected mlflow:NAME@ALIAS (e.g. mlflow:my-model@champion)",
                ));
            }
            crate::registry::check_name(name)?;
            let env = std::env::var(super::TRACKING_URI_ENV).ok();
            let Some(uri) = mlflow_uri
                .or(env.as_deref())
                .filter(|u| !u.trim().is_empty())
            else {
                return Err(bad_spec(
                    &format!("--model {spec}"),
                    "which MLflow server? give --mlflow http://HOST:PORT or set MLFLOW_TRACKING_URI",
                ));
            };
            return Ok(Some(Self::Mlflow {
                client: Client::new(uri)?,
                name: name.to_owned(),
                alias: alias.to_owned(),
            }));
        }
        if spec.starts_with("s3://") {
            let folder = S3Uri::parse(spec)?;
            let mut parts = folder.prefix.rsplit('/');
            let version = parts.next().and_then(|v| v.parse::<u32>().ok());
            let name = parts.next().filter(|n| !n.is_empty());
            let (Some(version), Some(name)) = (version, name) else {
                return Err(bad_spec(
                    &format!("--model {spec}"),
                    "expected the run folder s3://BUCKET[/PREFIX]/NAME/VERSION that --artifacts wrote",
                ));
            };
            crate::registry::check_name(name)?;
            let bucket = S3Uri {
                bucket: folder.bucket.clone(),
                prefix: String::new(),
            };
            let client = S3Client::new(&bucket, &S3Config::from_env()?)?;
            return Ok(Some(Self::S3 {
                client: Box::new(client),
                name: name.to_owned(),
                version,
                folder,
            }));
        }
        Ok(None)
    }

    /// The spec as given.
    pub fn spec(&self) -> String {
        match self {
            Self::Mlflow {
                client,
                name,
                alias,
            } => format!("{MLFLOW_SCHEME}{name}@{alias} (MLflow at {})", client.uri()),
            Self::S3 { folder, .. } => folder.to_string(),
        }
    }

    /// The spec the cache registry serves: `NAME@ALIAS` (followed) or `NAME:VERSION`.
    pub fn local_spec(&self) -> String {
        match self {
            Self::Mlflow { name, alias, .. } => format!("{name}@{alias}"),
            Self::S3 { name, version, .. } => format!("{name}:{version}"),
        }
    }

    /// Brings `cache` up to date: asks where the alias points, downloads that version when
    /// the cache lacks it, then moves the cache's alias. Returns the version. On any failure
    /// the cache and its alias stay as they were.
    pub fn sync(&self, cache: &Registry) -> Result<u32> {
        match self {
            Self::Mlflow {
                client,
                name,
                alias,
            } => {
                let mv = client.alias(name, alias)?;
                let version: u32 = mv.version.parse().map_err(|_| {
                    bad_spec(
                        &mv.version,
                        "MLflow answered a version that is not a number",
                    )
                })?;
                let what = format!("{}: {name} version {version} ({})", client.uri(), mv.source);
                ensure_cached(cache, name, version, &what, |dir| {
                    if mv.source.starts_with("s3://") {
                        let folder = S3Uri::parse(&mv.source)?;
                        let bucket = S3Uri {
                            bucket: folder.bucket.clone(),
                            prefix: String::new(),
                        };
                        let s3 = S3Client::new(&bucket, &S3Config::from_env()?)?;
                        download_folder(&s3, &folder, dir)?;
                        return Ok(());
                    }
                    for file in client.list_artifacts(&mv.source)? {
                        let bytes = client.download_artifact(&mv.source, &file)?;
                        write(&dir.join(&file), &bytes)?;
                    }
                    Ok(())
                })?;
                if cache.aliases(name)?.get(alias.as_str()) != Some(&version) {
                    cache.set_alias(name, alias, version)?;
                }
                Ok(version)
            }
            Self::S3 {
                client,
                folder,
                name,
                version,
            } => {
                ensure_cached(cache, name, *version, &folder.to_string(), |dir| {
                    download_folder(client, folder, dir).map(drop)
                })?;
                Ok(*version)
            }
        }
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|error| TrackingError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Downloads `name:version` with `fetch` into a temporary folder of `cache`, checks it and
/// renames it into place; a version already cached is left alone.
fn ensure_cached(
    cache: &Registry,
    name: &str,
    version: u32,
    what: &str,
    fetch: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let final_dir = cache.root().join(name).join(version.to_string());
    let run = RunDir {
        name: name.to_owned(),
        version,
        path: final_dir.clone(),
    };
    if cache.is_complete(&run) {
        return Ok(());
    }
    let parent = cache.root().join(name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| TrackingError::Io { path, error }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    crate::fsutil::remove_stale(&parent, ".download-");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging: PathBuf = parent.join(format!(".download-{}-{nanos}", std::process::id()));
    let tracked = crate::fsutil::TempPath::track(staging.clone());
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    let checked = fetch(&staging).and_then(|()| check_run(cache, name, version, &staging, what));
    let result = checked.and_then(|()| {
        if final_dir.exists() {
            // A half-written folder from elsewhere: replaced by the checked download.
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&staging, &final_dir).map_err(io(&final_dir))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    drop(tracked);
    result
}

/// Every run file present and parsing, and the model's SHA-256 equal to its provenance.
fn check_run(cache: &Registry, name: &str, version: u32, dir: &Path, what: &str) -> Result<()> {
    let run = RunDir {
        name: name.to_owned(),
        version,
        path: dir.to_path_buf(),
    };
    let missing: Vec<&str> = files::ALL
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.len() == files::ALL.len() {
        return Err(bad_spec(
            what,
            &format!(
                "the version has none of a run's files ({}): its artifacts are missing (deleted, or never uploaded)",
                files::ALL.join(", ")
            ),
        ));
    }
    if !missing.is_empty() {
        return Err(bad_spec(
            what,
            &format!(
                "the version's artifacts lack {} (not a bccp run folder, or its upload did not finish)",
                missing.join(", ")
            ),
        ));
    }
    let record = cache.read(&run)?;
    let model = dir.join(files::MODEL);
    let bytes = std::fs::read(&model).map_err(|error| TrackingError::Io {
        path: model.clone(),
        error,
    })?;
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if sha != record.provenance.model_sha256 {
        return Err(bad_spec(
            what,
            &format!(
                "the downloaded model's SHA-256 {sha} is not its provenance's {}",
                record.provenance.model_sha256
            ),
        ));
    }
    Ok(())
}
