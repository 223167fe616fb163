//! Mirroring registered run folders to S3-compatible storage (`--artifacts s3://BUCKET/PREFIX`):
//! a run's files go to `PREFIX/NAME/VERSION/FILE`, each upload checked against the ETag the
//! server answers; a run folder is read back the same way (every download checked).

use std::path::{Path, PathBuf};

use super::{run_files, Result, TrackingError};
use crate::registry::RunDir;
use crate::s3::{S3Client, S3Config, S3Error, S3Uri, Transferred};

/// Where run folders are mirrored.
pub struct S3Target {
    pub client: S3Client,
}

impl S3Target {
    /// The target of `--artifacts` (`None` when not given): the URI checked and the AWS
    /// environment read before any work.
    pub fn resolve(flag: Option<&str>) -> Result<Option<Self>> {
        let Some(uri) = flag.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let uri = S3Uri::parse(uri).map_err(|e| flag_error(&e))?;
        let client = S3Client::new(&uri, &S3Config::from_env()?)?;
        Ok(Some(Self { client }))
    }

    /// The folder run `name:version` is mirrored to.
    pub fn run_uri(&self, name: &str, version: u32) -> S3Uri {
        self.client.uri().join(&format!("{name}/{version}"))
    }
}

fn flag_error(e: &S3Error) -> TrackingError {
    TrackingError::S3(S3Error::BadSetting {
        name: "--artifacts",
        value: match e {
            S3Error::BadUri(u) => u.clone(),
            other => other.to_string(),
        },
        why: "expected s3://BUCKET[/PREFIX]".to_owned(),
    })
}

/// Uploads every file of `run`'s folder under the target; returns what went up, by name.
pub fn mirror_run_s3(target: &S3Target, run: &RunDir) -> Result<Vec<Transferred>> {
    let dest = target.run_uri(&run.name, run.version);
    let mut out = Vec::new();
    for (name, path) in run_files(&run.path)? {
        let bytes = read(&path)?;
        out.push(target.client.put(&dest.key(&name), &bytes)?);
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| TrackingError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Downloads every object under `folder` (one level: a run folder) into `dest`, each checked
/// against its ETag and written atomically; returns the files written, by name.
pub fn download_folder(client: &S3Client, folder: &S3Uri, dest: &Path) -> Result<Vec<PathBuf>> {
    let prefix = format!("{}/", folder.prefix);
    let keys = client.list(&prefix)?;
    if keys.is_empty() {
        return Err(TrackingError::S3(S3Error::Call {
            uri: folder.to_string(),
            call: "ListObjectsV2",
            endpoint: String::new(),
            message: "no objects under this prefix (is the run mirrored there?)".to_owned(),
        }));
    }
    std::fs::create_dir_all(dest).map_err(|error| TrackingError::Io {
        path: dest.to_path_buf(),
        error,
    })?;
    let mut out = Vec::new();
    for (key, _) in keys {
        let name = &key[prefix.len()..];
        if name.is_empty() || name.contains('/') {
            continue;
        }
        let bytes = client.get(&key)?;
        let path = dest.join(name);
        crate::fsutil::write_atomic(&path, &bytes).map_err(|error| TrackingError::Io {
            path: path.clone(),
            error,
        })?;
        out.push(path);
    }
    Ok(out)
}
