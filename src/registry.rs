//! The model registry: `runs/<model-name>/<version>/` with `params.json`, `metrics.json`,
//! `model.safetensors` (the head) and `labels.json` (class names). A version is the next
//! integer; it is written in a staging folder and renamed into place whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::fsutil::StagedDir;

/// A registered run's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub name: String,
    pub version: u32,
    pub path: PathBuf,
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !ok {
        bail!("invalid --model-name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Versions of `name` under `root`, ascending.
pub fn versions(root: &Path, name: &str) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(root.join(name))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Writes a new version of `name`: JSON documents and head tensors.
pub fn register(
    root: &Path,
    name: &str,
    docs: &BTreeMap<&str, serde_json::Value>,
    tensors: &[(String, Tensor)],
) -> Result<RunDir> {
    check_name(name)?;
    let version = versions(root, name).last().map_or(1, |v| v + 1);
    let path = root.join(name).join(version.to_string());
    let staged =
        StagedDir::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    for (file, value) in docs {
        let text = serde_json::to_string_pretty(value)? + "\n";
        std::fs::write(staged.path().join(file), text)
            .with_context(|| format!("cannot write {file}"))?;
    }
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, staged.path().join("model.safetensors"))?;
    staged
        .commit()
        .with_context(|| format!("cannot register {}", path.display()))?;
    Ok(RunDir {
        name: name.to_owned(),
        version,
        path,
    })
}

/// Resolves `NAME` (latest version) or `NAME:VERSION`.
pub fn resolve(root: &Path, spec: &str) -> Result<RunDir> {
    let (name, version) =
        match spec.split_once(':') {
            Some((n, v)) => (
                n,
                Some(v.parse::<u32>().with_context(|| {
                    format!("invalid version in {spec:?}: expected NAME:NUMBER")
                })?),
            ),
            None => (spec, None),
        };
    check_name(name)?;
    let all = versions(root, name);
    let version = match version {
        Some(v) if all.contains(&v) => v,
        Some(v) => bail!(
            "{name} has no version {v} in {} (versions: {all:?})",
            root.display()
        ),
        None => *all
            .last()
            .with_context(|| format!("no registered run named {name} in {}", root.display()))?,
    };
    Ok(RunDir {
        name: name.to_owned(),
        version,
        path: root.join(name).join(version.to_string()),
    })
}

/// Reads a JSON document of a run.
pub fn read_json(run: &RunDir, file: &str) -> Result<serde_json::Value> {
    let path = run.path.join(file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Every run under `root`: (name, version).
pub fn list(root: &Path) -> Vec<RunDir> {
    let mut names: Vec<String> = std::fs::read_dir(root)
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
            versions(root, &name)
                .into_iter()
                .map(move |version| RunDir {
                    path: root.join(&name).join(version.to_string()),
                    name: name.clone(),
                    version,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let docs = BTreeMap::from([("params.json", serde_json::json!({"a": 1}))]);
        let t = vec![(
            "head.weight".to_owned(),
            Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )];
        let a = register(dir.path(), "m", &docs, &t).unwrap();
        let b = register(dir.path(), "m", &docs, &t).unwrap();
        assert_eq!((a.version, b.version), (1, 2));
        assert_eq!(resolve(dir.path(), "m").unwrap().version, 2);
        assert_eq!(resolve(dir.path(), "m:1").unwrap().version, 1);
        assert!(resolve(dir.path(), "m:7")
            .unwrap_err()
            .to_string()
            .contains("no version 7"));
        assert!(resolve(dir.path(), "other")
            .unwrap_err()
            .to_string()
            .contains("no registered run"));
        assert!(register(dir.path(), "../x", &docs, &t).is_err());
        assert_eq!(read_json(&a, "params.json").unwrap()["a"], 1);
        assert_eq!(list(dir.path()).len(), 2);
        assert!(a.path.join("model.safetensors").is_file());
    }
}
