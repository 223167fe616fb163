//! [`EmbeddingFile`]: an embedding file memory-mapped, its `embeddings` matrix read in place.
//!
//! The matrix is borrowed from the mapping (no copy) when it is 4-byte aligned on a
//! little-endian machine — always so for files of `bccp embed` and of the `safetensors`
//! libraries, whose headers are padded to 8 bytes — so a search over a 2 GB file holds the file's
//! pages and little else, and a search over one part of it touches only that part's pages.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{format_error, EmbeddingFileError, Result};
use crate::shard::ShardSpec;

/// An embedding file opened by memory mapping: the matrix stays in the file, the small arrays
/// (targets, ids, global row ids) and the metadata are read.
#[derive(Debug)]
pub struct EmbeddingFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Byte range of `embeddings` in the mapping.
    matrix: Range<usize>,
    rows: usize,
    dim: usize,
    pub targets: Vec<i64>,
    /// Manifest ids, when the images came from a manifest.
    pub ids: Option<Vec<i64>>,
    /// The `rows` tensor of a shard: each row's id in the full image list.
    pub global_rows: Option<Vec<i64>>,
    /// The file's metadata (`model`, `weights_sha256`, `paths`, `classes`, `list_sha256`,
    /// `shard`, `total_rows`).
    pub metadata: HashMap<String, String>,
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect()
}

impl EmbeddingFile {
    /// Maps `path` and checks its tensors: `embeddings` f32 [N, D], `targets` i64 [N],
    /// optional `ids` and `rows` i64 [N].
    pub fn open(path: &Path) -> Result<Self> {
        let io = |error| EmbeddingFileError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process; bccp replaces files by
        // rename (a new inode), never in place. A file truncated by another program while mapped
        // would fault, as reading a file being overwritten would give garbage: not our case.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| format_error(path, format!("not a safetensors file ({e})")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| format_error(path, format!("not a safetensors file ({e})")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let base = map.as_ptr() as usize;
        let view = |name: &str| st.tensor(name).ok();
        let emb = view("embeddings").ok_or_else(|| format_error(path, "no `embeddings` tensor"))?;
        let (rows, dim) = match emb.shape() {
            [n, d] => (*n, *d),
            other => {
                return Err(format_error(
                    path,
                    format!("`embeddings` must be [N, D], found {other:?}"),
                ))
            }
        };
        if emb.dtype() != safetensors::Dtype::F32 {
            return Err(format_error(
                path,
                format!("`embeddings` must be f32, found {:?}", emb.dtype()),
            ));
        }
        let start = emb.data().as_ptr() as usize - base;
        let matrix = start..start + emb.data().len();
        let long = |name: &str, required: bool| -> Result<Option<Vec<i64>>> {
            let Some(t) = view(name) else {
                return if required {
                    Err(format_error(path, format!("no `{name}` tensor")))
                } else {
                    Ok(None)
                };
            };
            if t.dtype() != safetensors::Dtype::I64 || t.shape() != [rows] {
                return Err(format_error(
                    path,
                    format!(
                        "`{name}` must be i64 [{rows}], found {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            Ok(Some(i64s(t.data())))
        };
        let targets = long("targets", true)?.unwrap_or_default();
        let ids = long("ids", false)?;
        let global_rows = long("rows", false)?;
        drop(st);
        let out = Self {
            path: path.to_path_buf(),
            map,
            matrix,
            rows,
            dim,
            targets,
            ids,
            global_rows,
            metadata,
        };
        out.check_shard()?;
        Ok(out)
    }

    /// The shard metadata of a shard file must agree with its `rows`.
    fn check_shard(&self) -> Result<()> {
        let (Some(spec), Some(rows)) = (self.shard()?, &self.global_rows) else {
            if self.global_rows.is_some() != self.metadata.contains_key("shard") {
                return Err(format_error(
                    &self.path,
                    "a shard file needs both the `rows` tensor and the `shard` metadata",
                ));
            }
            return Ok(());
        };
        let range = spec.range(self.total_rows()?);
        let inside = rows
            .iter()
            .all(|&r| r >= 0 && range.contains(&(r as usize)));
        if !inside || rows.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format_error(
                &self.path,
                format!(
                    "its `rows` must increase within shard {spec} (rows {}..{})",
                    range.start, range.end
                ),
            ));
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows in this file.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The [N × D] row-major matrix: borrowed from the mapping when aligned (the usual case),
    /// else copied.
    pub fn embeddings(&self) -> Cow<'_, [f32]> {
        let bytes = &self.map[self.matrix.clone()];
        if cfg!(target_endian = "little") && bytes.as_ptr().align_offset(4) == 0 {
            // SAFETY: the bytes are 4-aligned, their length a multiple of 4 (safetensors checked
            // N·D·4), every bit pattern is a valid f32, and the slice borrows `self.map`.
            Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4)
            })
        } else {
            Cow::Owned(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
        }
    }

    /// The metadata value `key`, or "" when absent.
    pub fn meta(&self, key: &str) -> &str {
        self.metadata.get(key).map_or("", String::as_str)
    }

    /// The shard this file holds (`shard` metadata of `bccp embed --shard`), if any.
    pub fn shard(&self) -> Result<Option<ShardSpec>> {
        match self.metadata.get("shard") {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|e| format_error(&self.path, format!("metadata `shard`: {e}"))),
        }
    }

    /// Rows of the full list: `total_rows` of a shard file, else this file's rows.
    pub fn total_rows(&self) -> Result<usize> {
        match self.metadata.get("total_rows") {
            None => Ok(self.rows),
            Some(s) => s.parse().map_err(|_| {
                format_error(
                    &self.path,
                    format!("metadata `total_rows` = {s:?} is not a count"),
                )
            }),
        }
    }

    /// Each row's global id: the `rows` of a shard file, else its position.
    pub fn global_ids(&self) -> Vec<i64> {
        self.global_rows
            .clone()
            .unwrap_or_else(|| (0..self.rows as i64).collect())
    }

    /// SHA-256 (hex) of the contents: the matrix's bytes and the targets.
    pub fn content_sha256(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(&self.map[self.matrix.clone()]);
        for t in &self.targets {
            h.update(t.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    }
}
