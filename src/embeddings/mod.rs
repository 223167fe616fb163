//! The embedding file: a safetensors file holding `embeddings` (f32 [N, D]) and `targets`
//! (i64 [N]) (plus `ids` when the images came from a manifest), with the model, weights hash,
//! classes, image paths (in order) and the fingerprint of the image list (`list_sha256`) in its
//! metadata. A shard (`bccp embed --shard I/N`) also holds `rows` (i64 [N], each row's id in
//! the full image list) and the metadata `shard` (`I/N`) and `total_rows`. `bccp embed` writes
//! it; `closest` and `sample` read it without any backbone, `closest` through a memory mapping
//! ([`EmbeddingFile`]).

mod mapped;

pub use mapped::EmbeddingFile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Why an embedding file cannot be written or read; names the file.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingFileError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, EmbeddingFileError>;

pub(crate) fn format_error(path: &Path, message: impl ToString) -> EmbeddingFileError {
    EmbeddingFileError::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Embeddings of a dataset, in the order of its image list (unreadable images skipped).
#[derive(Debug, Clone)]
pub struct EmbeddingSet {
    /// [N, D] f32 on the CPU.
    pub embeddings: Tensor,
    pub targets: Vec<i64>,
    pub ids: Option<Vec<i64>>,
    pub paths: Vec<String>,
    pub classes: Vec<String>,
    pub model: String,
    pub weights_sha256: String,
    /// [`crate::data::ImageList::fingerprint`] of the full image list ("" when unknown).
    pub list_sha256: String,
    /// Set when the file holds one shard of the list.
    pub shard: Option<ShardRows>,
}

/// Which part of an image list an embedding set holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRows {
    pub spec: crate::shard::ShardSpec,
    /// Each row's id (position) in the full image list, increasing.
    pub rows: Vec<i64>,
    /// Images in the full list.
    pub total: usize,
}

impl EmbeddingSet {
    /// Writes the set as safetensors (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = vec![
            ("embeddings".to_owned(), self.embeddings.clone()),
            (
                "targets".to_owned(),
                Tensor::new(self.targets.as_slice(), &Device::Cpu)?,
            ),
        ];
        if let Some(ids) = &self.ids {
            tensors.push(("ids".to_owned(), Tensor::new(ids.as_slice(), &Device::Cpu)?));
        }
        let mut metadata: BTreeMap<&str, String> = [
            ("model", self.model.clone()),
            ("weights_sha256", self.weights_sha256.clone()),
            ("paths", json_list(&self.paths)),
            ("classes", json_list(&self.classes)),
        ]
        .into_iter()
        .collect();
        if !self.list_sha256.is_empty() {
            metadata.insert("list_sha256", self.list_sha256.clone());
        }
        if let Some(shard) = &self.shard {
            tensors.push((
                "rows".to_owned(),
                Tensor::new(shard.rows.as_slice(), &Device::Cpu)?,
            ));
            metadata.insert("shard", shard.spec.to_string());
            metadata.insert("total_rows", shard.total.to_string());
        }
        let bytes =
            serialize_safetensors(&tensors, &metadata).map_err(|e| format_error(path, e))?;
        crate::fsutil::write_atomic(path, &bytes).map_err(|error| EmbeddingFileError::Io {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Reads an embedding file written by [`EmbeddingSet::save`] (or any safetensors file with
    /// `embeddings` f32 [N, D] and `targets` i64 [N]) into memory.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_file(&EmbeddingFile::open(path)?)
    }

    /// The set held by a mapped file (the matrix copied into a tensor).
    pub fn from_file(file: &EmbeddingFile) -> Result<Self> {
        let path = file.path();
        let embeddings =
            Tensor::from_slice(&file.embeddings(), (file.rows(), file.dim()), &Device::Cpu)?;
        let json_list = |key: &str| -> Result<Vec<String>> {
            match file.metadata.get(key) {
                Some(text) => serde_json::from_str(text).map_err(|_| {
                    format_error(path, format!("metadata `{key}` is not a JSON list"))
                }),
                None => Ok(Vec::new()),
            }
        };
        let shard = match (file.shard()?, &file.global_rows) {
            (Some(spec), Some(rows)) => Some(ShardRows {
                spec,
                rows: rows.clone(),
                total: file.total_rows()?,
            }),
            _ => None,
        };
        Ok(Self {
            embeddings,
            targets: file.targets.clone(),
            ids: file.ids.clone(),
            paths: json_list("paths")?,
            classes: json_list("classes")?,
            model: file.meta("model").to_owned(),
            weights_sha256: file.meta("weights_sha256").to_owned(),
            list_sha256: file.meta("list_sha256").to_owned(),
            shard,
        })
    }
}

/// Serialises tensors (in the given order) and metadata (sorted by key) as safetensors, so
/// equal contents give equal bytes (the `safetensors` crate takes metadata as a `HashMap`,
/// whose order varies between runs).
pub(crate) fn serialize_safetensors(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<&str, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut data = Vec::new();
    for (name, tensor) in tensors {
        let (dtype, bytes) = match tensor.dtype() {
            DType::F32 => (
                "F32",
                tensor
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            DType::I64 => (
                "I64",
                tensor
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<i64>())
                    .map_err(|e| e.to_string())?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => return Err(format!("cannot write {other:?} tensor {name}")),
        };
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": tensor.dims(), "data_offsets": [data.len(), data.len() + bytes.len()] }),
        );
        data.extend_from_slice(&bytes);
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}

/// A list of strings as JSON text.
fn json_list(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}
