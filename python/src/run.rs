//! `Run`: a registered run (`bccp::registry::TrainedRun`) loaded for prediction.

use std::path::PathBuf;

use bccp::registry::{Registry, RegistryError, TrainedRun};
use numpy::{PyArray2, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{to_matrix, to_vector};
use crate::embed::device;
use crate::errors::{compute, input_error, Failure};

fn failure(e: RegistryError) -> Failure {
    match e {
        RegistryError::Io { .. } => Failure::runtime(e),
        _ => Failure::input(e),
    }
}

/// A registered run, checked file by file and loaded (`bccp predict --model SPEC`).
#[pyclass(module = "bccp", frozen)]
pub struct Run {
    inner: TrainedRun,
}

#[pymethods]
impl Run {
    /// Loads `spec` (`NAME`, `NAME:VERSION` or `NAME@ALIAS`) from the registry `runs_dir`.
    #[staticmethod]
    #[pyo3(signature = (spec, runs_dir="runs".into(), device="cpu", cache_dir=None))]
    fn load(
        py: Python<'_>,
        spec: String,
        runs_dir: PathBuf,
        device: &str,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let device = self::device(device)?;
        let inner = compute(py, move || {
            TrainedRun::load(
                &Registry::open(runs_dir),
                &spec,
                &device,
                cache_dir.as_deref(),
            )
            .map_err(failure)
        })?;
        Ok(Self { inner })
    }

    /// The class names, in the head's order.
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.classes().to_vec()
    }

    /// The run's folder.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.run.path.clone()
    }

    /// Predicts image files (`paths`) or uint8 pixel arrays (`images`, as `embed` takes them):
    /// a dict with `target` int64 [n], `class` (names) and `probabilities` float32 [n, C].
    #[pyo3(signature = (paths=None, images=None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        paths: Option<Vec<PathBuf>>,
        images: Option<Vec<Bound<'py, PyArrayDyn<u8>>>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let run = &self.inner;
        let predictions = match (paths, images) {
            (Some(paths), None) => compute(py, || run.predict(&paths).map_err(failure))?,
            (None, Some(images)) => {
                let pre = *run.preprocess();
                let mut pixels = Vec::with_capacity(images.len() * pre.len());
                for (i, a) in images.iter().enumerate() {
                    let img = crate::embed::to_image(&a.readonly(), i)?;
                    pixels.extend(pre.apply(&img));
                }
                let n = images.len();
                compute(py, || run.predict_pixels(&pixels, n).map_err(failure))?
            }
            _ => return input_error("give either paths or images (one of them)"),
        };
        let n = predictions.len();
        let classes = run.classes().len();
        let dict = PyDict::new(py);
        dict.set_item(
            "target",
            to_vector(py, predictions.iter().map(|p| p.target as i64).collect()),
        )?;
        dict.set_item(
            "class",
            predictions
                .iter()
                .map(|p| p.class.clone())
                .collect::<Vec<_>>(),
        )?;
        let probs: Vec<f32> = predictions
            .into_iter()
            .flat_map(|p| p.probabilities)
            .collect();
        let probs: Bound<'py, PyArray2<f32>> = to_matrix(py, probs, n, classes)?;
        dict.set_item("probabilities", probs)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!("bccp.Run({})", self.inner.run.path.display())
    }
}
