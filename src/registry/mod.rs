//! The model registry: `ROOT/<name>/<version>/` holding a run's [`RunRecord`] as JSON files
//! (`params.json`, `provenance.json`, `metrics.json`, `labels.json`, `split.json`) and its
//! tensors (`model.safetensors`), plus `ROOT/<name>/aliases.json` (e.g. `champion` → 3).
//!
//! A run is written in a hidden staging folder, then, under the name's lock file, given the next
//! version and renamed into place whole: concurrent registrations of one name get distinct
//! versions, and a crash leaves no half-written version. Aliases move under the same lock, by
//! an atomic file replacement. While a run trains, `ROOT/<name>/.checkpoint/` holds its latest
//! per-epoch checkpoint ([`crate::train::checkpoint`]), removed once the run is registered.

pub mod record;
mod trained;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::backbone::cache::{hex, sha256};
use crate::fsutil::{write_atomic, TempPath};
pub use record::{
    files, metric, Provenance, RunMetrics, RunRecord, Split, StageSeconds, TrainedSample,
};
pub use trained::{Prediction, TrainedRun};

/// What can go wrong in the registry; every message names the folder or file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid {what} {name:?}: use letters, digits, '-', '_' and '.' (not starting with '.'){extra}")]
    BadName {
        what: &'static str,
        name: String,
        extra: &'static str,
    },
    #[error("invalid run {0:?}: expected NAME, NAME:VERSION or NAME@ALIAS")]
    BadSpec(String),
    #[error("no registered run named {name} in {root}")]
    NoRun { name: String, root: PathBuf },
    #[error("{name} has no version {version} in {root} (versions: {versions:?})")]
    NoVersion {
        name: String,
        version: u32,
        root: PathBuf,
        versions: Vec<u32>,
    },
    #[error("{name} has no alias {alias:?} in {root} (aliases: {aliases})")]
    NoAlias {
        name: String,
        alias: String,
        root: PathBuf,
        aliases: String,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{name} has no complete version in {root} (incomplete: {versions:?}); register a new run"
    )]
    Incomplete {
        name: String,
        root: PathBuf,
        versions: Vec<u32>,
    },
    #[error("{path} is corrupt or incomplete: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{run} was trained on backbone weights {detail}; its predictions would be wrong")]
    WeightsChanged { run: PathBuf, detail: String },
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result alias of the registry.
pub type Result<T> = std::result::Result<T, RegistryError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |error| RegistryError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn corrupt(path: &Path, message: impl ToString) -> RegistryError {
    RegistryError::Corrupt {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.')
}

/// Checks a run (model) name.
pub fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RegistryError::BadName {
            what: "model name",
            name: name.to_owned(),
            extra: "",
        })
    }
}

fn check_alias(alias: &str) -> Result<()> {
    if valid_name(alias) && !alias.chars().all(|c| c.is_ascii_digit()) {
        Ok(())
    } else {
        Err(RegistryError::BadName {
            what: "alias",
            name: alias.to_owned(),
            extra: "; an alias is not a number",
        })
    }
}

/// A registered run's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub name: String,
    pub version: u32,
    pub path: PathBuf,
}

/// Which version of a name: the latest, a number, or an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionRef {
    Latest,
    Number(u32),
    Alias(String),
}

/// Parses `NAME`, `NAME:VERSION` or `NAME@ALIAS`.
pub fn parse_spec(spec: &str) -> Result<(String, VersionRef)> {
    let bad = || RegistryError::BadSpec(spec.to_owned());
    let (name, version) = if let Some((n, v)) = spec.split_once(':') {
        (n, VersionRef::Number(v.parse().map_err(|_| bad())?))
    } else if let Some((n, a)) = spec.split_once('@') {
        check_alias(a)?;
        (n, VersionRef::Alias(a.to_owned()))
    } else {
        (spec, VersionRef::Latest)
    };
    check_name(name)?;
    Ok((name.to_owned(), version))
}

/// The registry under one root folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    root: PathBuf,
}

/// An exclusive lock on a file of one name's folder, released on drop.
pub struct NameLock(File);

impl Drop for NameLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

const ALIASES: &str = "aliases.json";
const LOCK: &str = ".lock";
const CHECKPOINT: &str = ".checkpoint";
/// The lock file of a name's checkpoint folder: held by the run that writes it.
pub const CHECKPOINT_LOCK: &str = ".checkpoint.lock";

impl Registry {
    /// The registry at `root` (created on the first registration).
    pub fn open(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, name: &str) -> Result<NameLock> {
        self.lock_file(name, LOCK)
    }

    /// An exclusive lock on the file `file` in `name`'s folder (waiting for another holder),
    /// released when the guard drops: version allocation uses `.lock`, re-training cycles
    /// their own file.
    pub fn lock_file(&self, name: &str, file: &str) -> Result<NameLock> {
        let (file, path) = self.open_lock_file(name, file)?;
        file.lock().map_err(io(&path))?;
        Ok(NameLock(file))
    }

    /// The file `file` of `name`'s folder opened for locking (both created when missing).
    fn open_lock_file(&self, name: &str, file: &str) -> Result<(File, PathBuf)> {
        check_name(name)?;
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(file);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((file, path))
    }

    /// The folder of the training checkpoint of a run of `name` under way
    /// (`ROOT/<name>/.checkpoint`; see [`crate::train::checkpoint`]). The run that writes it
    /// holds [`CHECKPOINT_LOCK`] ([`Self::try_lock_file`]).
    pub fn checkpoint_dir(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name).join(CHECKPOINT))
    }

    /// [`Self::lock_file`] without waiting: `None` when another holder has it.
    pub fn try_lock_file(&self, name: &str, file: &str) -> Result<Option<NameLock>> {
        let (file, path) = self.open_lock_file(name, file)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(NameLock(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
        }
    }

    /// Versions of `name`, ascending.
    pub fn versions(&self, name: &str) -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(self.root.join(name))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Whether a version folder holds every file of a run (a folder made by hand or by an
    /// older bccp may not).
    pub fn is_complete(&self, run: &RunDir) -> bool {
        [
            files::PARAMS,
            files::PROVENANCE,
            files::METRICS,
            files::LABELS,
            files::SPLIT,
            files::MODEL,
        ]
        .iter()
        .all(|f| run.path.join(f).is_file())
    }

    fn run_dir(&self, name: &str, version: u32) -> RunDir {
        RunDir {
            name: name.to_owned(),
            version,
            path: self.root.join(name).join(version.to_string()),
        }
    }

    /// Writes `record` and `tensors` as the next version of `name`.
    pub fn register(
        &self,
        name: &str,
        record: &RunRecord,
        tensors: &[(String, Tensor)],
    ) -> Result<RunDir> {
        check_name(name)?;
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let staging = Staging::create(&dir)?;
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let model = safetensors::serialize(&map, None)
            .map_err(|e| corrupt(&staging.path.join(files::MODEL), e))?;
        let mut record = record.clone();
        record.provenance.model_sha256 = hex(&sha256(&model));
        let model_path = staging.path.join(files::MODEL);
        std::fs::write(&model_path, &model).map_err(io(&model_path))?;
        let docs = record.documents().map_err(|e| corrupt(&staging.path, e))?;
        for (file, text) in docs {
            let path = staging.path.join(file);
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let _lock = self.lock(name)?;
        let version = self.versions(name).last().map_or(1, |v| v + 1);
        let path = dir.join(version.to_string());
        std::fs::rename(&staging.path, &path).map_err(io(&path))?;
        staging.release();
        Ok(RunDir {
            name: name.to_owned(),
            version,
            path,
        })
    }

    /// The aliases of `name` (alias → version).
    pub fn aliases(&self, name: &str) -> Result<BTreeMap<String, u32>> {
        let path = self.root.join(name).join(ALIASES);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| corrupt(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Points `alias` of `name` at `version` (which must exist), atomically.
    pub fn set_alias(&self, name: &str, alias: &str, version: u32) -> Result<()> {
        check_name(name)?;
        check_alias(alias)?;
        let _lock = self.lock(name)?;
        let versions = self.versions(name);
        if !versions.contains(&version) {
            return Err(self.no_version(name, version, versions));
        }
        let mut aliases = self.aliases(name)?;
        aliases.insert(alias.to_owned(), version);
        let path = self.root.join(name).join(ALIASES);
        let text = serde_json::to_string_pretty(&aliases).map_err(|e| corrupt(&path, e))? + "\n";
        write_atomic(&path, text.as_bytes()).map_err(io(&path))
    }

    fn no_version(&self, name: &str, version: u32, versions: Vec<u32>) -> RegistryError {
        if versions.is_empty() {
            return RegistryError::NoRun {
                name: name.to_owned(),
                root: self.root.clone(),
            };
        }
        RegistryError::NoVersion {
            name: name.to_owned(),
            version,
            root: self.root.clone(),
            versions,
        }
    }

    /// Resolves `NAME` (latest version), `NAME:VERSION` or `NAME@ALIAS`.
    pub fn resolve(&self, spec: &str) -> Result<RunDir> {
        let (name, wanted) = parse_spec(spec)?;
        let all = self.versions(&name);
        let version = match wanted {
            // The latest complete version: an incomplete folder is skipped, not predicted with.
            VersionRef::Latest => match all
                .iter()
                .rev()
                .find(|&&v| self.is_complete(&self.run_dir(&name, v)))
            {
                Some(&v) => v,
                None if all.is_empty() => {
                    return Err(RegistryError::NoRun {
                        name,
                        root: self.root.clone(),
                    })
                }
                None => {
                    return Err(RegistryError::Incomplete {
                        name,
                        root: self.root.clone(),
                        versions: all,
                    })
                }
            },
            VersionRef::Number(v) if all.contains(&v) => v,
            VersionRef::Number(v) => return Err(self.no_version(&name, v, all)),
            VersionRef::Alias(alias) => {
                let aliases = self.aliases(&name)?;
                match aliases.get(&alias) {
                    Some(&v) if all.contains(&v) => v,
                    Some(&v) => return Err(self.no_version(&name, v, all)),
                    None => {
                        let known: Vec<String> =
                            aliases.iter().map(|(a, v)| format!("{a} → {v}")).collect();
                        return Err(RegistryError::NoAlias {
                            name,
                            alias,
                            root: self.root.clone(),
                            aliases: if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            },
                        });
                    }
                }
            }
        };
        Ok(RunDir {
            path: self.root.join(&name).join(version.to_string()),
            name,
            version,
        })
    }

    /// Every run: by name, then version.
    pub fn list(&self) -> Vec<RunDir> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .into_iter()
            .flat_map(|name| {
                self.versions(&name).into_iter().map(move |version| RunDir {
                    path: self.root.join(&name).join(version.to_string()),
                    name: name.clone(),
                    version,
                })
            })
            .collect()
    }

    /// Reads the record of a run, checking every file parses.
    pub fn read(&self, run: &RunDir) -> Result<RunRecord> {
        fn doc<T: serde::de::DeserializeOwned>(dir: &Path, file: &str) -> Result<T> {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            serde_json::from_str(&text).map_err(|e| corrupt(&path, e))
        }
        Ok(RunRecord {
            params: doc(&run.path, files::PARAMS)?,
            provenance: doc(&run.path, files::PROVENANCE)?,
            metrics: doc(&run.path, files::METRICS)?,
            labels: doc(&run.path, files::LABELS)?,
            split: doc(&run.path, files::SPLIT)?,
        })
    }
}

/// A hidden staging folder for a new version (`.staging-PID-NANOS`), removed unless renamed
/// into place; tracked so an interrupted command removes it, and removed by the next
/// registration when its process is gone.
struct Staging {
    path: PathBuf,
    tracked: Option<TempPath>,
}

const STAGING_PREFIX: &str = ".staging-";

impl Staging {
    fn create(dir: &Path) -> Result<Self> {
        crate::fsutil::remove_stale(dir, STAGING_PREFIX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!("{STAGING_PREFIX}{}-{nanos}", std::process::id()));
        let tracked = TempPath::track(path.clone());
        std::fs::create_dir(&path).map_err(io(&path))?;
        Ok(Self {
            path,
            tracked: Some(tracked),
        })
    }

    /// The folder has been moved into place: nothing to clean up.
    fn release(mut self) {
        self.tracked = None;
        self.path = PathBuf::new();
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(classes: usize) -> RunRecord {
        RunRecord {
            params: crate::config::RunConfig::default(),
            provenance: Provenance::default(),
            metrics: RunMetrics::default(),
            labels: (0..classes).map(|c| format!("c{c}")).collect(),
            split: Split::default(),
        }
    }

    fn head(classes: usize) -> Vec<(String, Tensor)> {
        let z = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);
        vec![
            ("head.weight".to_owned(), z(&[classes, 3]).unwrap()),
            ("head.bias".to_owned(), z(&[classes]).unwrap()),
        ]
    }

    #[test]
    fn versions_increase_resolve_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let a = reg.register("m", &record(2), &head(2)).unwrap();
        let b = reg.register("m", &record(2), &head(2)).unwrap();
        assert_eq!((a.version, b.version), (1, 2));
        assert_eq!(reg.resolve("m").unwrap().version, 2);
        assert_eq!(reg.resolve("m:1").unwrap().version, 1);
        let err = reg.resolve("m:7").unwrap_err().to_string();
        assert!(
            err.contains("no version 7") && err.contains("[1, 2]"),
            "{err}"
        );
        let err = reg.resolve("other").unwrap_err().to_string();
        assert!(err.contains("no registered run named other"), "{err}");
        assert!(reg.register("../x", &record(2), &head(2)).is_err());
        assert!(reg.resolve("m:x").is_err());
        let back = reg.read(&a).unwrap();
        assert_eq!(back.labels, record(2).labels);
        assert_eq!(back.params, crate::config::RunConfig::default());
        assert_eq!(back.provenance.model_sha256.len(), 64);
        assert_eq!(reg.list().len(), 2);
        // No staging folder or lock file is mistaken for a version.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("m"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".staging"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn concurrent_registrations_get_distinct_versions() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let versions: Vec<u32> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..4)
                            .map(|_| reg.register("m", &record(2), &head(2)).unwrap().version)
                            .collect::<Vec<u32>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=32).collect::<Vec<u32>>());
        assert_eq!(reg.versions("m"), sorted);
    }

    #[test]
    fn aliases_move_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        for _ in 0..3 {
            reg.register("m", &record(2), &head(2)).unwrap();
        }
        let err = reg.resolve("m@champion").unwrap_err().to_string();
        assert!(
            err.contains("no alias \"champion\"") && err.contains("none"),
            "{err}"
        );
        reg.set_alias("m", "champion", 2).unwrap();
        assert_eq!(reg.resolve("m@champion").unwrap().version, 2);
        reg.set_alias("m", "champion", 3).unwrap();
        reg.set_alias("m", "previous", 2).unwrap();
        assert_eq!(reg.resolve("m@champion").unwrap().version, 3);
        assert_eq!(
            reg.aliases("m").unwrap(),
            BTreeMap::from([("champion".to_owned(), 3), ("previous".to_owned(), 2)])
        );
        let err = reg.set_alias("m", "champion", 9).unwrap_err().to_string();
        assert!(err.contains("no version 9"), "{err}");
        assert_eq!(reg.resolve("m@champion").unwrap().version, 3, "unchanged");
        for bad in ["7", "", ".x", "a/b"] {
            assert!(reg.set_alias("m", bad, 1).is_err(), "{bad:?}");
        }
        let err = reg
            .set_alias("nobody", "champion", 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no registered run named nobody"), "{err}");
    }

    #[test]
    fn corrupt_documents_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let run = reg.register("m", &record(2), &head(2)).unwrap();
        std::fs::write(run.path.join(files::METRICS), "{\"test_accuracy\": ").unwrap();
        let err = reg.read(&run).unwrap_err().to_string();
        assert!(
            err.contains("metrics.json") && err.contains("corrupt"),
            "{err}"
        );
        let run = reg.register("m", &record(2), &head(2)).unwrap();
        std::fs::remove_file(run.path.join(files::LABELS)).unwrap();
        let err = reg.read(&run).unwrap_err().to_string();
        assert!(err.contains("labels.json"), "{err}");
    }
}
