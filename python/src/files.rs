//! `load_embeddings`: an embedding file written by `bccp embed` (or the library), as numpy.

use std::path::PathBuf;

use bccp::embeddings::{EmbeddingFileError, EmbeddingSet};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{to_matrix, to_vector};
use crate::errors::{compute, Failure};

/// Reads an embedding file: a dict with `embeddings` float32 [N, D], `targets` int64 [N],
/// `ids` int64 [N] or None, `paths`, `classes`, `model`, `weights_sha256`.
#[pyfunction]
pub fn load_embeddings(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let (set, values) = compute(py, move || {
        let set = EmbeddingSet::load(&path).map_err(|e| match e {
            EmbeddingFileError::Format { .. } => Failure::input(e),
            _ => Failure::runtime(e),
        })?;
        let values = set
            .embeddings
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(Failure::runtime)?;
        Ok((set, values))
    })?;
    let n = set.targets.len();
    let dim = values.len().checked_div(n).unwrap_or(0);
    let dict = PyDict::new(py);
    dict.set_item("embeddings", to_matrix(py, values, n, dim)?)?;
    dict.set_item("targets", to_vector(py, set.targets))?;
    match set.ids {
        Some(ids) => dict.set_item("ids", to_vector(py, ids))?,
        None => dict.set_item("ids", py.None())?,
    }
    dict.set_item("paths", set.paths)?;
    dict.set_item("classes", set.classes)?;
    dict.set_item("model", set.model)?;
    dict.set_item("weights_sha256", set.weights_sha256)?;
    Ok(dict)
}

/// The images of an image folder (`ROOT/<class>/<file>`, classes sorted) or a JSON Lines
/// manifest, in the order `bccp embed` embeds them: a dict with `files` (paths to read),
/// `paths` (as recorded in embedding files), `targets` int64, `ids` int64 or None, `classes`.
#[pyfunction]
pub fn image_list(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let list = compute(py, move || {
        bccp::data::ImageList::from_path(&path).map_err(|e| match e {
            bccp::data::DataError::Io { .. } => Failure::runtime(e),
            _ => Failure::input(e),
        })
    })?;
    let dict = PyDict::new(py);
    dict.set_item("files", list.files)?;
    dict.set_item("paths", list.recorded_paths)?;
    dict.set_item("targets", to_vector(py, list.targets))?;
    match list.ids {
        Some(ids) => dict.set_item("ids", to_vector(py, ids))?,
        None => dict.set_item("ids", py.None())?,
    }
    dict.set_item("classes", list.classes)?;
    Ok(dict)
}
