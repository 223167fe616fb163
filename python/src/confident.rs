//! `find_label_issues`: the library's port of cleanlab's confident learning
//! (`bccp::baselines::find_label_issues`), float32 or float64 probabilities as given.

use bccp::baselines::{self, ConfidentError, FilterBy, Prob};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::arrays::{matrix, to_vector, vector};
use crate::errors::{compute, input_error, Failure};

/// Parses cleanlab's `filter_by` names.
fn parse_filter_by(name: &str) -> PyResult<FilterBy> {
    let all = [
        FilterBy::PruneByNoiseRate,
        FilterBy::PruneByClass,
        FilterBy::Both,
        FilterBy::ConfidentLearning,
        FilterBy::PredictedNeqGiven,
    ];
    match all.into_iter().find(|f| f.name() == name) {
        Some(f) => Ok(f),
        None => input_error(format!(
            "unknown filter_by {name:?}; valid: {}",
            all.map(FilterBy::name).join(", ")
        )),
    }
}

fn failure(e: ConfidentError) -> Failure {
    Failure::input(e)
}

/// The labels as class indices below `classes` (cleanlab's checks, same wording as the CLI's).
fn class_indices(labels: &[i64], classes: usize) -> PyResult<Vec<u32>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 0 && (v as u64) < classes as u64 {
                Ok(v as u32)
            } else {
                input_error(format!(
                    "labels: label {v} at index {i} is not a class index in 0..{classes}"
                ))
            }
        })
        .collect()
}

fn mask<T: Prob + numpy::Element + Send + Sync>(
    py: Python<'_>,
    probs: &PyReadonlyArray2<'_, T>,
    labels: &[i64],
    filter_by: FilterBy,
) -> PyResult<Vec<bool>> {
    let (values, n, classes) = matrix(probs, "pred_probs")?;
    if labels.len() != n {
        return input_error(format!(
            "labels has {} entries but pred_probs has {n} rows; they must match",
            labels.len()
        ));
    }
    let given = class_indices(labels, classes)?;
    compute(py, || {
        baselines::find_label_issues(values, &given, classes, filter_by).map_err(failure)
    })
}

/// cleanlab's `filter.find_label_issues(labels, pred_probs, filter_by=...)`: a boolean mask,
/// True where the given label is likely wrong. `pred_probs` float32 or float64 [n, classes]
/// (arithmetic in its own precision, as numpy does), `labels` int64 [n].
#[pyfunction]
#[pyo3(signature = (labels, pred_probs, filter_by="prune_by_noise_rate"))]
pub fn find_label_issues<'py>(
    py: Python<'py>,
    labels: PyReadonlyArray1<'py, i64>,
    pred_probs: &Bound<'py, PyAny>,
    filter_by: &str,
) -> PyResult<Bound<'py, PyArray1<bool>>> {
    let filter_by = parse_filter_by(filter_by)?;
    let labels = vector(&labels, "labels")?;
    let flagged = if let Ok(p) = pred_probs.extract::<PyReadonlyArray2<'py, f32>>() {
        mask(py, &p, labels, filter_by)?
    } else if let Ok(p) = pred_probs.extract::<PyReadonlyArray2<'py, f64>>() {
        mask(py, &p, labels, filter_by)?
    } else {
        return input_error("pred_probs must be a float32 or float64 array [samples, classes]");
    };
    Ok(to_vector(py, flagged))
}
