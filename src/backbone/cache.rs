//! The embedding cache: one append-only file of fixed-size records per (model, weights hash,
//! preprocessing), each record an image's content hash followed by its embedding.
//!
//! A record is written whole or, after a crash, detected as a partial tail and ignored, so the
//! file is always readable. Keys are SHA-256 digests, so a changed image, model, weight file or
//! preprocessing never hits a stale entry.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{BackboneError, Result};
use sha2::{Digest, Sha256};

use crate::data::Preprocess;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// Lowercase hex of a digest.
pub fn hex(d: &Digest32) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The default cache folder: see [`crate::paths::cache_dir`].
pub fn default_cache_dir() -> PathBuf {
    crate::paths::cache_dir()
}

/// SHA-256 of a weights file, memoised in `cache_dir` by (path, size, modification time) so
/// large checkpoints are hashed once.
pub fn weights_hash(cache_dir: Option<&Path>, weights: &Path) -> Result<String> {
    let meta = std::fs::metadata(weights).map_err(BackboneError::io("read", weights))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = std::fs::canonicalize(weights).unwrap_or_else(|_| weights.to_path_buf());
    let memo_key = hex(&sha256(
        format!("{}\0{}\0{mtime}", canonical.display(), meta.len()).as_bytes(),
    ));
    let memo = cache_dir.map(|d| d.join("weights").join(memo_key));
    if let Some(hash) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok()) {
        if hash.len() == 64 {
            return Ok(hash);
        }
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(weights).map_err(BackboneError::io("read", weights))?;
    std::io::copy(&mut file, &mut hasher).map_err(BackboneError::io("read", weights))?;
    let hash = hex(&hasher.finalize().into());
    if let Some(memo) = memo {
        if let Some(parent) = memo.parent() {
            std::fs::create_dir_all(parent)
                .map_err(BackboneError::io("create cache folder", parent))?;
        }
        crate::fsutil::write_atomic(&memo, hash.as_bytes())
            .map_err(BackboneError::io("write", &memo))?;
    }
    Ok(hash)
}

/// The cache file for one (model, weights, preprocessing) combination.
pub struct EmbeddingCache {
    path: PathBuf,
    dim: usize,
    entries: HashMap<Digest32, Vec<f32>>,
}

impl EmbeddingCache {
    /// Opens (or starts) the cache of `model` with weights `weights_sha256` and `pre` under
    /// `dir`; `dim` is the embedding width.
    pub fn open(
        dir: &Path,
        model: &str,
        weights_sha256: &str,
        pre: &Preprocess,
        dim: usize,
    ) -> Result<Self> {
        let key = format!(
            "{model}\0{weights_sha256}\0{}x{}\0{:?}\0{:?}\0{dim}",
            pre.width, pre.height, pre.mean, pre.std
        );
        let path = dir.join("embeddings").join(format!(
            "{model}-{}.bin",
            &hex(&sha256(key.as_bytes()))[..16]
        ));
        let mut entries = HashMap::new();
        let record = 32 + 4 * dim;
        match std::fs::read(&path) {
            Ok(bytes) => {
                // A partial record at the end (an interrupted append) is cut off, so the next
                // append starts on a record boundary.
                let whole = bytes.len() - bytes.len() % record;
                if whole != bytes.len() {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(whole as u64))
                        .map_err(BackboneError::io("repair embedding cache", &path))?;
                }
                for chunk in bytes.chunks_exact(record) {
                    let mut digest = [0u8; 32];
                    digest.copy_from_slice(&chunk[..32]);
                    let values = chunk[32..]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    entries.insert(digest, values);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BackboneError::io("read embedding cache", &path)(e));
            }
        }
        Ok(Self { path, dim, entries })
    }

    /// The cached embedding of an image with content hash `digest`.
    pub fn get(&self, digest: &Digest32) -> Option<&[f32]> {
        self.entries.get(digest).map(Vec::as_slice)
    }

    /// Number of cached embeddings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends new embeddings (each `dim` long) and keeps them in memory.
    pub fn append(&mut self, new: &[(Digest32, Vec<f32>)]) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(BackboneError::io("create cache folder", parent))?;
        }
        let mut bytes = Vec::with_capacity(new.len() * (32 + 4 * self.dim));
        for (digest, values) in new {
            if values.len() != self.dim {
                return Err(BackboneError::Cache {
                    path: self.path.clone(),
                    message: format!(
                        "embedding of width {} in a cache of width {}",
                        values.len(),
                        self.dim
                    ),
                });
            }
            bytes.extend_from_slice(digest);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(BackboneError::io("open embedding cache", &self.path))?;
        file.write_all(&bytes)
            .map_err(BackboneError::io("write embedding cache", &self.path))?;
        for (digest, values) in new {
            self.entries.insert(*digest, values.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_tail() {
        let dir = tempfile::tempdir().unwrap();
        let pre = Preprocess::imagenet(8);
        let mut cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2).unwrap();
        assert!(cache.is_empty());
        let a = sha256(b"a");
        let b = sha256(b"b");
        cache
            .append(&[(a, vec![1.0, 2.0]), (b, vec![3.0, -4.5])])
            .unwrap();
        let reopened = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.get(&b), Some(&[3.0f32, -4.5][..]));
        // Another weights hash or preprocessing is another cache.
        assert!(EmbeddingCache::open(dir.path(), "m", "w2", &pre, 2)
            .unwrap()
            .is_empty());
        assert!(
            EmbeddingCache::open(dir.path(), "m", "w", &Preprocess::imagenet(9), 2)
                .unwrap()
                .is_empty()
        );
        // A torn append leaves the complete records readable.
        let file = std::fs::read_dir(dir.path().join("embeddings"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(&[7u8; 13]).unwrap();
        let mut repaired = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2).unwrap();
        assert_eq!(repaired.len(), 2);
        let c = sha256(b"c");
        repaired.append(&[(c, vec![5.0, 6.0])]).unwrap();
        let reopened = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2).unwrap();
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.get(&c), Some(&[5.0f32, 6.0][..]));
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn weights_hash_is_memoised() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w.safetensors");
        std::fs::write(&w, b"abc").unwrap();
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(weights_hash(Some(dir.path()), &w).unwrap(), expected);
        assert_eq!(
            std::fs::read_dir(dir.path().join("weights"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(weights_hash(Some(dir.path()), &w).unwrap(), expected);
        assert_eq!(weights_hash(None, &w).unwrap(), expected);
    }
}
