//! The embedding cache: one append-only file of fixed-size records per (model, weights hash,
//! preprocessing), each record an image's content hash, its embedding and a checksum.
//!
//! A record is written whole or, after a crash, detected as a partial tail and ignored, so the
//! file is always readable; every record carries a CRC-32, so a record damaged on disk is
//! discarded and recomputed instead of being served. Keys are SHA-256 digests, so a changed
//! image, model, weight file or preprocessing never hits a stale entry.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{BackboneError, Result};
use sha2::{Digest, Sha256};

use crate::data::Preprocess;
use crate::ops::bf16_gemm::Precision;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

pub use crate::hash::hex;

/// The default cache folder: see [`crate::paths::cache_dir`].
pub fn default_cache_dir() -> PathBuf {
    crate::paths::cache_dir()
}

/// A file changed less than this long ago is hashed but not memoised: file timestamps tick
/// coarsely (a few milliseconds on Linux, more on some filesystems), so a second edit within
/// the same tick would leave every timestamp as it was (git's "racily clean" problem).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// What identifies one version of a file's content without reading it, when the platform can
/// tell and the file has settled (see [`SETTLE`]): on unix the size, modification time, inode
/// and status-change time (ctime). Users can set a file's mtime back after editing it in
/// place, but not its ctime, which any write moves forward. `None` otherwise: the content is
/// hashed and not memoised.
#[cfg(unix)]
fn content_stamp(meta: &std::fs::Metadata, settle: std::time::Duration) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ctime = std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(
        u64::try_from(meta.ctime()).ok()?,
        u32::try_from(meta.ctime_nsec()).ok()?,
    ))?;
    // In the future (clock skew) or too recent: not to be trusted.
    if std::time::SystemTime::now().duration_since(ctime).ok()? < settle {
        return None;
    }
    Some(format!(
        "{}\0{}.{}\0{}:{}\0{}.{}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.dev(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

#[cfg(not(unix))]
fn content_stamp(_meta: &std::fs::Metadata, _settle: std::time::Duration) -> Option<String> {
    None
}

/// SHA-256 of a weights file, memoised in `cache_dir` by (canonical path, size, modification
/// time, inode, status-change time) so large checkpoints (hundreds of MB for the hub models)
/// are hashed once. A file edited in place always gets a new ctime, hence is hashed anew even
/// when its mtime was restored; a file changed in the last two seconds is not memoised. On
/// platforms without ctime (non-unix) the content is hashed every time.
pub fn weights_hash(cache_dir: Option<&Path>, weights: &Path) -> Result<String> {
    weights_hash_settled(cache_dir, weights, SETTLE)
}

/// [`weights_hash`], memoising files unchanged for `settle`.
fn weights_hash_settled(
    cache_dir: Option<&Path>,
    weights: &Path,
    settle: std::time::Duration,
) -> Result<String> {
    let meta = std::fs::metadata(weights).map_err(BackboneError::io("read", weights))?;
    let canonical = std::fs::canonicalize(weights).unwrap_or_else(|_| weights.to_path_buf());
    let memo = match (cache_dir, content_stamp(&meta, settle)) {
        (Some(dir), Some(stamp)) => Some(dir.join("weights").join(hex(&sha256(
            format!("{}\0{stamp}", canonical.display()).as_bytes(),
        )))),
        _ => None,
    };
    if let Some(hash) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok()) {
        if hash.len() == 64 {
            return Ok(hash);
        }
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(weights).map_err(BackboneError::io("read", weights))?;
    std::io::copy(&mut file, &mut hasher).map_err(BackboneError::io("read", weights))?;
    let hash = hex(&hasher.finalize());
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

/// Version of the record format, part of the file name. Version 2 added the per-record
/// checksum; files of an older version (`MODEL-KEY.bin`) are never read — a cache of the new
/// version starts empty beside them, and they can be deleted.
pub const FORMAT_VERSION: u32 = 2;

/// Bytes of a record's checksum: CRC-32 (little-endian) of the digest and the values.
const CHECKSUM_LEN: usize = 4;

/// CRC-32 of a record's digest and value bytes.
fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut crc = flate2::Crc::new();
    crc.update(body);
    crc.sum().to_le_bytes()
}

/// The cache file for one (model, weights, preprocessing) combination.
///
/// Each record is the 32-byte SHA-256 of the image's bytes, `dim` little-endian f32 values and
/// a CRC-32 of both. On open, a record whose checksum fails or whose values are not all finite
/// is discarded (counted in [`EmbeddingCache::discarded`]) and the file is rewritten without it,
/// so the image is recomputed and appended again by whichever run needs it next.
pub struct EmbeddingCache {
    path: PathBuf,
    dim: usize,
    entries: HashMap<Digest32, Vec<f32>>,
    discarded: usize,
}

impl EmbeddingCache {
    /// Opens (or starts) the cache of `model` with weights `weights_sha256` and `pre` under
    /// `dir`; `dim` is the embedding width; `precision` the engine's products (bf16 ones
    /// have a cache of their own).
    ///
    /// A torn last record (an interrupted append) is cut off; corrupt records are dropped and
    /// the file is rewritten (atomically) with the valid ones. Another process appending at the
    /// same moment may lose its records to that rewrite, which only costs recomputing them.
    pub fn open(
        dir: &Path,
        model: &str,
        weights_sha256: &str,
        pre: &Preprocess,
        dim: usize,
        precision: Precision,
    ) -> Result<Self> {
        // `alpha over white`: images with alpha have been composited over white since this
        // marker (they were black-backed before), so older caches are not reused for them.
        let mut key = format!(
            "{model}\0{weights_sha256}\0{}x{}\0{:?}\0{:?}\0{dim}\0alpha over white",
            pre.width, pre.height, pre.mean, pre.std
        );
        // f32 keys are those of caches written before the choice existed.
        if precision != Precision::F32 {
            key.push_str(&format!("\0{} products", precision.name()));
        }
        let path = dir.join("embeddings").join(format!(
            "{model}-{}.v{FORMAT_VERSION}.bin",
            &hex(&sha256(key.as_bytes()))[..16]
        ));
        let mut entries = HashMap::new();
        let mut discarded = 0;
        let body = 32 + 4 * dim;
        let record = body + CHECKSUM_LEN;
        match std::fs::read(&path) {
            Ok(bytes) => {
                let whole = bytes.len() - bytes.len() % record;
                let mut valid = Vec::with_capacity(whole);
                for chunk in bytes[..whole].chunks_exact(record) {
                    let (data, sum) = chunk.split_at(body);
                    let values: Vec<f32> = data[32..]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    if sum != checksum(data) || !values.iter().all(|v| v.is_finite()) {
                        discarded += 1;
                        continue;
                    }
                    let mut digest = [0u8; 32];
                    digest.copy_from_slice(&data[..32]);
                    entries.insert(digest, values);
                    valid.extend_from_slice(chunk);
                }
                if discarded > 0 {
                    // Rewritten without the corrupt records, so they are reported once.
                    crate::fsutil::write_atomic(&path, &valid)
                        .map_err(BackboneError::io("rewrite embedding cache", &path))?;
                } else if whole != bytes.len() {
                    // A partial record at the end (an interrupted append) is cut off, so the
                    // next append starts on a record boundary.
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(whole as u64))
                        .map_err(BackboneError::io("repair embedding cache", &path))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BackboneError::io("read embedding cache", &path)(e));
            }
        }
        Ok(Self {
            path,
            dim,
            entries,
            discarded,
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Corrupt records (failed checksum or non-finite values) dropped when the file was opened.
    pub fn discarded(&self) -> usize {
        self.discarded
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

    /// Appends new embeddings (each `dim` long, all finite) and keeps them in memory.
    pub fn append(&mut self, new: &[(Digest32, Vec<f32>)]) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(BackboneError::io("create cache folder", parent))?;
        }
        let body = 32 + 4 * self.dim;
        let mut bytes = Vec::with_capacity(new.len() * (body + CHECKSUM_LEN));
        for (digest, values) in new {
            let problem = if values.len() != self.dim {
                Some(format!(
                    "embedding of width {} in a cache of width {}",
                    values.len(),
                    self.dim
                ))
            } else if !values.iter().all(|v| v.is_finite()) {
                Some(format!("non-finite embedding of image {}", hex(digest)))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(BackboneError::Cache {
                    path: self.path.clone(),
                    message,
                });
            }
            let start = bytes.len();
            bytes.extend_from_slice(digest);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            let sum = checksum(&bytes[start..]);
            bytes.extend_from_slice(&sum);
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
    const F32: Precision = Precision::F32;

    #[test]
    fn round_trip_and_partial_tail() {
        let dir = tempfile::tempdir().unwrap();
        let pre = Preprocess::imagenet(8);
        let mut cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert!(cache.is_empty());
        let a = sha256(b"a");
        let b = sha256(b"b");
        cache
            .append(&[(a, vec![1.0, 2.0]), (b, vec![3.0, -4.5])])
            .unwrap();
        let reopened = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.get(&b), Some(&[3.0f32, -4.5][..]));
        // Another weights hash or preprocessing is another cache.
        assert!(EmbeddingCache::open(dir.path(), "m", "w2", &pre, 2, F32)
            .unwrap()
            .is_empty());
        assert!(
            EmbeddingCache::open(dir.path(), "m", "w", &Preprocess::imagenet(9), 2, F32)
                .unwrap()
                .is_empty()
        );
        // So are bf16 products' embeddings.
        let bf16 = Precision::Bf16;
        assert!(EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, bf16)
            .unwrap()
            .is_empty());
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
        let mut repaired = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(repaired.len(), 2);
        let c = sha256(b"c");
        repaired.append(&[(c, vec![5.0, 6.0])]).unwrap();
        let reopened = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.get(&c), Some(&[5.0f32, 6.0][..]));
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// A cache at `dir` of width 2 holding the embeddings of "a", "b", "c"; its file.
    fn three_records(dir: &Path) -> PathBuf {
        let mut cache =
            EmbeddingCache::open(dir, "m", "w", &Preprocess::imagenet(8), 2, F32).unwrap();
        cache
            .append(&[
                (sha256(b"a"), vec![1.0, 2.0]),
                (sha256(b"b"), vec![3.0, 4.0]),
                (sha256(b"c"), vec![5.0, 6.0]),
            ])
            .unwrap();
        cache.path().to_path_buf()
    }

    const RECORD: usize = 32 + 4 * 2 + CHECKSUM_LEN;

    #[test]
    fn a_flipped_byte_discards_that_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let pre = Preprocess::imagenet(8);
        let file = three_records(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        assert_eq!(bytes.len(), 3 * RECORD);
        // One bit of the second record's first value.
        bytes[RECORD + 32] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let mut cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(cache.discarded(), 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&sha256(b"a")), Some(&[1.0f32, 2.0][..]));
        assert_eq!(cache.get(&sha256(b"b")), None);
        assert_eq!(cache.get(&sha256(b"c")), Some(&[5.0f32, 6.0][..]));
        // The file was rewritten without it: the next open reports nothing.
        assert_eq!(std::fs::read(&file).unwrap().len(), 2 * RECORD);
        cache.append(&[(sha256(b"b"), vec![3.0, 4.0])]).unwrap();
        let reopened = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(reopened.discarded(), 0);
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.get(&sha256(b"b")), Some(&[3.0f32, 4.0][..]));
        // A flipped digest byte is caught too.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[5] ^= 0x80;
        std::fs::write(&file, &bytes).unwrap();
        let cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!((cache.discarded(), cache.len()), (1, 2));
    }

    #[test]
    fn non_finite_values_are_discarded_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pre = Preprocess::imagenet(8);
        let file = three_records(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        // NaN over the first record's values, with a checksum that matches them.
        let nan = f32::NAN.to_le_bytes();
        bytes[32..36].copy_from_slice(&nan);
        let sum = checksum(&bytes[..RECORD - CHECKSUM_LEN]);
        bytes[RECORD - CHECKSUM_LEN..RECORD].copy_from_slice(&sum);
        // NaN over the third record's second value, checksum left as it was.
        bytes[2 * RECORD + 36..2 * RECORD + 40].copy_from_slice(&nan);
        std::fs::write(&file, &bytes).unwrap();
        let mut cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert_eq!(cache.discarded(), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&sha256(b"b")), Some(&[3.0f32, 4.0][..]));
        // Non-finite embeddings are never written.
        let err = cache
            .append(&[(sha256(b"d"), vec![f32::INFINITY, 0.0])])
            .unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap().len(), RECORD);
    }

    #[test]
    fn old_format_files_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let pre = Preprocess::imagenet(8);
        // A version-1 file: the same key, no version in the name, records without checksum.
        let key = format!(
            "m\0w\0{}x{}\0{:?}\0{:?}\02",
            pre.width, pre.height, pre.mean, pre.std
        );
        let old = dir
            .path()
            .join("embeddings")
            .join(format!("m-{}.bin", &hex(&sha256(key.as_bytes()))[..16]));
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        let mut v1 = sha256(b"a").to_vec();
        v1.extend_from_slice(&1.0f32.to_le_bytes());
        v1.extend_from_slice(&2.0f32.to_le_bytes());
        std::fs::write(&old, &v1).unwrap();
        let cache = EmbeddingCache::open(dir.path(), "m", "w", &pre, 2, F32).unwrap();
        assert!(cache.is_empty());
        assert_eq!(cache.discarded(), 0);
        assert_ne!(cache.path(), old);
        assert!(cache.path().to_string_lossy().ends_with(".v2.bin"));
        assert_eq!(std::fs::read(&old).unwrap(), v1, "old file left alone");
    }

    /// Rewrites `w` in place with `bytes` and puts its modification time back.
    fn edit_keeping_mtime(w: &Path, bytes: &[u8]) {
        let mtime = std::fs::metadata(w).unwrap().modified().unwrap();
        std::fs::write(w, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(w)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let meta = std::fs::metadata(w).unwrap();
        assert_eq!(
            (meta.modified().unwrap(), meta.len()),
            (mtime, bytes.len() as u64)
        );
    }

    #[test]
    fn weights_edited_in_place_with_mtime_restored_hash_anew() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w.safetensors");
        std::fs::write(&w, b"abc").unwrap();
        assert_eq!(
            weights_hash(Some(dir.path()), &w).unwrap(),
            hex(&sha256(b"abc"))
        );
        edit_keeping_mtime(&w, b"abd");
        assert_eq!(
            weights_hash(Some(dir.path()), &w).unwrap(),
            hex(&sha256(b"abd"))
        );
        // Both hashes came from the content: a file this fresh is never memoised.
        assert!(!dir.path().join("weights").exists());
    }

    #[cfg(unix)]
    #[test]
    fn weights_hash_is_memoised_by_ctime() {
        let dir = tempfile::tempdir().unwrap();
        let memos = || {
            std::fs::read_dir(dir.path().join("weights"))
                .map(Iterator::count)
                .unwrap_or(0)
        };
        let w = dir.path().join("w.safetensors");
        std::fs::write(&w, b"abc").unwrap();
        let settle = std::time::Duration::ZERO;
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            weights_hash_settled(Some(dir.path()), &w, settle).unwrap(),
            expected
        );
        assert_eq!(memos(), 1);
        assert_eq!(
            weights_hash_settled(Some(dir.path()), &w, settle).unwrap(),
            expected
        );
        assert_eq!(memos(), 1);
        assert_eq!(weights_hash(None, &w).unwrap(), expected);
        // Past the filesystem's timestamp tick, an in-place edit with the mtime put back
        // still changes the ctime, so the memo of the old content is not used.
        std::thread::sleep(std::time::Duration::from_millis(50));
        edit_keeping_mtime(&w, b"abd");
        assert_eq!(
            weights_hash_settled(Some(dir.path()), &w, settle).unwrap(),
            hex(&sha256(b"abd"))
        );
        assert_eq!(memos(), 2);
    }
}
