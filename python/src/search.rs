//! `closest`: the library's exact k-nearest search (`bccp::distance::search_host`).

use bccp::distance::{search_host, DistanceError, Metric, Precision, Search};
use numpy::{PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::arrays::{matrix, to_matrix, vector};
use crate::errors::{compute, input_error, Failure};

/// Parses a metric name as the command line does (`l1`, `l2`, `cosine` and the reference's
/// `l1_norm`, `l2_norm`, `cosine_similarity`).
pub fn parse_metric(name: &str) -> PyResult<Metric> {
    match name {
        "l1" | "l1_norm" => Ok(Metric::L1),
        "l2" | "l2_norm" => Ok(Metric::L2),
        "cosine" | "cosine_similarity" => Ok(Metric::Cosine),
        _ => input_error(format!(
            "unknown metric {name:?}; valid: l1, l2, cosine (or l1_norm, l2_norm, cosine_similarity)"
        )),
    }
}

fn failure(e: DistanceError) -> Failure {
    match e {
        DistanceError::Tensor(_) | DistanceError::Cuda(_) => Failure::runtime(e),
        _ => Failure::input(e),
    }
}

/// The k best candidates of every query: (indices int64 [Q, k], values float32 [Q, k]), best
/// first (smallest L1/L2, largest cosine), ties to the lower index; with both label arrays,
/// only candidates of another class (empty slots: index -1, value ±inf).
#[pyfunction]
#[pyo3(signature = (queries, candidates, metric, k, query_labels=None, candidate_labels=None))]
#[allow(clippy::type_complexity)]
pub fn closest<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    candidates: PyReadonlyArray2<'py, f32>,
    metric: &str,
    k: usize,
    query_labels: Option<PyReadonlyArray1<'py, i64>>,
    candidate_labels: Option<PyReadonlyArray1<'py, i64>>,
) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>)> {
    let metric = parse_metric(metric)?;
    let (q, nq, dq) = matrix(&queries, "queries")?;
    let (c, _, dc) = matrix(&candidates, "candidates")?;
    if dq != dc {
        return Err(failure(DistanceError::DimMismatch {
            queries: dq,
            candidates: dc,
        })
        .into());
    }
    let labels = match (&query_labels, &candidate_labels) {
        (Some(ql), Some(cl)) => {
            Some((vector(ql, "query_labels")?, vector(cl, "candidate_labels")?))
        }
        (None, None) => None,
        _ => {
            return input_error(
                "give both query_labels and candidate_labels (other-class search) or neither",
            )
        }
    };
    let search = Search {
        metric,
        k,
        other_class: labels,
        precision: Precision::F32,
    };
    let found = compute(py, || search_host(q, c, dq, &search).map_err(failure))?;
    Ok((
        to_matrix(py, found.indices, nq, k)?,
        to_matrix(py, found.values, nq, k)?,
    ))
}
