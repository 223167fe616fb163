//! The embedding file: a safetensors file holding `embeddings` (f32 [N, D]) and `targets`
//! (i64 [N]) (plus `ids` when the images came from a manifest), with the model, weights hash,
//! classes and image paths (in order) in its metadata. `bccp embed` writes it; `closest` and
//! `sample` read it without any backbone.

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

fn format_error(path: &Path, message: impl ToString) -> EmbeddingFileError {
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
        let metadata: BTreeMap<&str, String> = [
            ("model", self.model.clone()),
            ("weights_sha256", self.weights_sha256.clone()),
            ("paths", json_list(&self.paths)),
            ("classes", json_list(&self.classes)),
        ]
        .into_iter()
        .collect();
        let bytes =
            serialize_safetensors(&tensors, &metadata).map_err(|e| format_error(path, e))?;
        crate::fsutil::write_atomic(path, &bytes).map_err(|error| EmbeddingFileError::Io {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Reads an embedding file written by [`EmbeddingSet::save`] (or any safetensors file with
    /// `embeddings` f32 [N, D] and `targets` i64 [N]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|error| EmbeddingFileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_error(path, format!("not a safetensors file ({e})")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| format_error(path, format!("cannot read its tensors ({e})")))?;
        let get = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| format_error(path, format!("no `{name}` tensor")))
        };
        let embeddings = get("embeddings")?;
        let (n, _) = embeddings.dims2().map_err(|_| {
            format_error(
                path,
                format!("`embeddings` must be [N, D], found {:?}", embeddings.dims()),
            )
        })?;
        if embeddings.dtype() != DType::F32 {
            return Err(format_error(
                path,
                format!("`embeddings` must be f32, found {:?}", embeddings.dtype()),
            ));
        }
        let targets = get("targets")?;
        if targets.dims() != [n] || targets.dtype() != DType::I64 {
            return Err(format_error(
                path,
                format!(
                    "`targets` must be i64 [{n}], found {:?} {:?}",
                    targets.dtype(),
                    targets.dims()
                ),
            ));
        }
        let ids = match tensors.get("ids") {
            Some(t) => Some(t.to_vec1::<i64>()?),
            None => None,
        };
        let meta = meta.metadata().clone().unwrap_or_default();
        let json_list = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(text) => serde_json::from_str(text).map_err(|_| {
                    format_error(path, format!("metadata `{key}` is not a JSON list"))
                }),
                None => Ok(Vec::new()),
            }
        };
        Ok(Self {
            embeddings,
            targets: targets.to_vec1::<i64>()?,
            ids,
            paths: json_list("paths")?,
            classes: json_list("classes")?,
            model: meta.get("model").cloned().unwrap_or_default(),
            weights_sha256: meta.get("weights_sha256").cloned().unwrap_or_default(),
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
