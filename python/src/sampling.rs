//! `replay_pairs`: closest-pair replay (`--sampling-mode buffer`) from neighbours found
//! elsewhere, e.g. a sharded search merged with `merge_topk` (`bccp::sampling`).

use bccp::distance::Neighbors;
use bccp::sampling::{
    budget, buffer_neighbours as neighbours, pairs_from_neighbors, SamplingError,
};
use numpy::{PyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::arrays::{matrix, to_vector};
use crate::errors::{compute, input_error, Failure};
use crate::search::parse_metric;

fn failure(e: SamplingError) -> Failure {
    Failure::input(e)
}

/// The images `bccp sample --sampling-mode buffer --ratio RATIO` replays, from each buffer
/// image's nearest other-class neighbours over the whole buffer (`indices` int64 [n, k],
/// `values` float32 [n, k], as `closest` or a merged sharded search gives them): (index,
/// partner) int64 and value float32 arrays, two entries per pair, closest pairs first.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn replay_pairs<'py>(
    py: Python<'py>,
    indices: PyReadonlyArray2<'py, i64>,
    values: PyReadonlyArray2<'py, f32>,
    metric: &str,
    ratio: f64,
) -> PyResult<(
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
)> {
    let metric = parse_metric(metric)?;
    let (idx, n, k) = matrix(&indices, "indices")?;
    let (val, vn, vk) = matrix(&values, "values")?;
    if (n, k) != (vn, vk) {
        return input_error(format!(
            "indices has shape [{n}, {k}] but values has [{vn}, {vk}]; they must match"
        ));
    }
    if k == 0 {
        return input_error("indices and values need at least one neighbour per image (k >= 1)");
    }
    let pairs = budget(ratio, n).map_err(failure)? / 2;
    let nn = Neighbors {
        k,
        indices: idx.to_vec(),
        values: val.to_vec(),
    };
    let chosen = compute(py, move || {
        pairs_from_neighbors(&nn, metric, pairs).map_err(failure)
    })?;
    let index = chosen.iter().map(|s| s.index as i64).collect();
    let partner = chosen
        .iter()
        .map(|s| s.partner.map_or(-1, |p| p as i64))
        .collect();
    let value = chosen.iter().map(|s| s.value.unwrap_or(f32::NAN)).collect();
    Ok((
        to_vector(py, index),
        to_vector(py, partner),
        to_vector(py, value),
    ))
}

/// How many nearest other-class neighbours of each image `replay_pairs` pairs from, for a
/// buffer of `n` images (the `k` of the search that feeds it, as `bccp sample` uses).
#[pyfunction]
pub fn buffer_neighbours(n: usize) -> usize {
    neighbours(n)
}
