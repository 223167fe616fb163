//! Hugging Face hub weights: lookup in the local cache (the `huggingface_hub` layout), and
//! download through `hf-hub` when online.
//!
//! The cache folder is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
//! Offline mode (`HF_HUB_OFFLINE=1`, or `offline` set by the caller) never touches the network.
//! The cache lookup is our own (`models--org--name/refs/<revision>` → `snapshots/<commit>/file`)
//! so that it honours both variables and tolerates a trailing newline in `refs/main`, which
//! `hf-hub` 0.4's own lookup does not.

use std::path::{Path, PathBuf};

use super::zoo::HubFile;

/// Why a hub file could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{file} of {repo} (revision {revision}) is not in the hub cache {cache} and offline mode is on (HF_HUB_OFFLINE); download it once online, or pass --weights FILE.safetensors")]
    NotCached {
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },
    #[error("cannot download {file} of {repo} (revision {revision}) into {cache}: {message}; set HF_HUB_OFFLINE=1 to use the cache only, or pass --weights FILE.safetensors")]
    Download {
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
        message: String,
    },
}

/// The hub cache folder from the environment.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// True when `HF_HUB_OFFLINE` is set to a true value (1, true, yes, on).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The folder of a model repository in the cache.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached path of `file`, if present.
pub fn cached_file(cache: &Path, hub: &HubFile) -> Option<PathBuf> {
    let dir = repo_dir(cache, &hub.repo);
    let commit = if is_commit_hash(&hub.revision) {
        hub.revision.clone()
    } else {
        std::fs::read_to_string(dir.join("refs").join(&hub.revision))
            .ok()?
            .trim()
            .to_owned()
    };
    let path = dir.join("snapshots").join(commit).join(&hub.file);
    path.is_file().then_some(path)
}

/// Resolves a hub file: the cache first; then, unless offline, a download into the cache.
pub fn resolve(hub: &HubFile, offline: bool) -> Result<PathBuf, HubError> {
    let cache = cache_dir();
    if let Some(path) = cached_file(&cache, hub) {
        return Ok(path);
    }
    if offline || offline_from_env() {
        return Err(HubError::NotCached {
            repo: hub.repo.clone(),
            revision: hub.revision.clone(),
            file: hub.file.clone(),
            cache,
        });
    }
    let download_error = |message: String| HubError::Download {
        repo: hub.repo.clone(),
        revision: hub.revision.clone(),
        file: hub.file.clone(),
        cache: cache.clone(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| download_error(e.to_string()))?;
    let repo = hf_hub::Repo::with_revision(
        hub.repo.clone(),
        hf_hub::RepoType::Model,
        hub.revision.clone(),
    );
    api.repo(repo)
        .get(&hub.file)
        .map_err(|e| download_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_layout_lookup_tolerates_newline_and_commit_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let hub = HubFile {
            repo: "org/name".into(),
            revision: "main".into(),
            file: "model.safetensors".into(),
        };
        assert_eq!(cached_file(cache, &hub), None);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = repo_dir(cache, "org/name");
        assert!(repo.ends_with("models--org--name"));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        assert_eq!(cached_file(cache, &hub), None, "file itself missing");
        let file = repo
            .join("snapshots")
            .join(commit)
            .join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(cached_file(cache, &hub), Some(file.clone()));
        let pinned = HubFile {
            revision: commit.into(),
            ..hub
        };
        assert_eq!(cached_file(cache, &pinned), Some(file));
    }
}
