//! Sharded exact search from Python (`bccp::shard`): deterministic parts of a row list, the
//! partial top-k of one part with global ids ("none" = index -1), and the exact merge by
//! (value, global id). A part is a dict: `shard` (index, count), `indices`, `values`, `context`.

use std::path::PathBuf;

use bccp::backbone::cache::{hex, sha256};
use bccp::distance::{Metric, Precision, Search};
use bccp::shard::{
    merge_topk as merge, search_shard as search, PartialTopK, ShardError, ShardSpec, TopKContext,
};
use numpy::{PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{matrix, to_matrix, vector};
use crate::errors::{compute, input_error, Failure};
use crate::search::parse_metric;

fn failure(e: ShardError) -> Failure {
    match e {
        ShardError::File { .. } => Failure::runtime(e),
        _ => Failure::input(e),
    }
}

fn spec(index: usize, count: usize) -> PyResult<ShardSpec> {
    ShardSpec::new(index, count).map_err(|e| failure(e).into())
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::L1 => "l1",
        Metric::L2 => "l2",
        Metric::Cosine => "cosine",
    }
}

/// Rows `(start, stop)` of shard `index` of `count` in a list of `n` rows (`I/N`).
#[pyfunction]
pub fn shard_range(index: usize, count: usize, n: usize) -> PyResult<(usize, usize)> {
    let r = spec(index, count)?.range(n);
    Ok((r.start, r.end))
}

/// The top-k of every query against shard `shard` = (index, count) of a candidate list of
/// `candidate_rows` rows; `candidates` holds that shard's rows only (`shard_range`). Returns a
/// part for `merge_topk`: global candidate ids, a shard with fewer than k eligible rows padded
/// with index -1 and value +inf (l1, l2) or -inf (cosine). The queries' fingerprint is the
/// one `bccp closest` records (SHA-256 of the f32 values, then the labels as i64, little
/// endian), so parts with labels match the CLI's parts of the same queries.
#[pyfunction]
#[pyo3(signature = (queries, candidates, metric, k, shard, candidate_rows, query_labels=None, candidate_labels=None, weights_sha256=String::new(), candidates_list_sha256=String::new()))]
#[allow(clippy::too_many_arguments)]
pub fn search_shard<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    candidates: PyReadonlyArray2<'py, f32>,
    metric: &str,
    k: usize,
    shard: (usize, usize),
    candidate_rows: usize,
    query_labels: Option<PyReadonlyArray1<'py, i64>>,
    candidate_labels: Option<PyReadonlyArray1<'py, i64>>,
    weights_sha256: String,
    candidates_list_sha256: String,
) -> PyResult<Bound<'py, PyDict>> {
    let metric = parse_metric(metric)?;
    let spec = spec(shard.0, shard.1)?;
    let (q, nq, dq) = matrix(&queries, "queries")?;
    let (c, nc, dc) = matrix(&candidates, "candidates")?;
    let rows = spec.range(candidate_rows);
    if nc != rows.len() {
        return input_error(format!(
            "candidates has {nc} rows, but shard {}/{} of {candidate_rows} rows is rows {}..{} ({} rows)",
            spec.index,
            spec.count,
            rows.start,
            rows.end,
            rows.len()
        ));
    }
    if dq != dc && nc > 0 {
        return input_error(format!(
            "queries have dimension {dq} but candidates have {dc}; they must match"
        ));
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
    let ids: Vec<i64> = rows.clone().map(|r| r as i64).collect();
    let s = Search {
        metric,
        k,
        other_class: labels,
        precision: Precision::F32,
    };
    let (found, queries_sha256) = compute(py, || {
        let mut bytes: Vec<u8> = q.iter().flat_map(|v| v.to_le_bytes()).collect();
        if let Some((ql, _)) = labels {
            bytes.extend(ql.iter().flat_map(|v| v.to_le_bytes()));
        }
        let found = search(q, c, dq, &s, &ids).map_err(Failure::input)?;
        Ok((found, hex(&sha256(&bytes))))
    })?;
    let part = PartialTopK {
        shard: spec,
        context: TopKContext {
            k,
            metric,
            other_class: labels.is_some(),
            queries: nq,
            queries_sha256,
            candidate_rows,
            candidates_list_sha256,
            weights_sha256,
        },
        indices: found.indices,
        values: found.values,
    };
    part_dict(py, part)
}

/// A library part as a part dict (the arrays own its buffers).
fn part_dict(py: Python<'_>, p: PartialTopK) -> PyResult<Bound<'_, PyDict>> {
    let c = p.context;
    let context = PyDict::new(py);
    context.set_item("k", c.k)?;
    context.set_item("metric", metric_name(c.metric))?;
    context.set_item("other_class", c.other_class)?;
    context.set_item("queries", c.queries)?;
    context.set_item("queries_sha256", c.queries_sha256)?;
    context.set_item("candidate_rows", c.candidate_rows)?;
    context.set_item("candidates_list_sha256", c.candidates_list_sha256)?;
    context.set_item("weights_sha256", c.weights_sha256)?;
    let part = PyDict::new(py);
    part.set_item("shard", (p.shard.index, p.shard.count))?;
    part.set_item("indices", to_matrix(py, p.indices, c.queries, c.k)?)?;
    part.set_item("values", to_matrix(py, p.values, c.queries, c.k)?)?;
    part.set_item("context", context)?;
    Ok(part)
}

/// Reads a partial top-k file (`bccp closest --candidates-shard`, `bccp merge-topk`) as a part.
#[pyfunction]
pub fn load_topk(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let part = compute(py, move || PartialTopK::load(&path).map_err(failure))?;
    part_dict(py, part)
}

/// Writes a part as a partial top-k file that `bccp merge-topk` reads.
#[pyfunction]
pub fn save_topk(py: Python<'_>, part: Bound<'_, PyAny>, path: PathBuf) -> PyResult<()> {
    let name = path.display().to_string();
    let part = part_of(&part, &name)?;
    compute(py, move || part.save(&path).map_err(failure))
}

/// A part dict back as the library's `PartialTopK`.
fn part_of(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PartialTopK> {
    let bad = |what: &str| {
        input_error::<PartialTopK>(format!(
            "{name}: {what}; a part is a dict from search_shard (shard, indices, values, context)"
        ))
    };
    let Ok(d) = obj.cast::<PyDict>() else {
        return bad("not a dict");
    };
    let get = |key: &str| d.get_item(key).ok().flatten();
    let (Some(shard), Some(indices), Some(values), Some(context)) =
        (get("shard"), get("indices"), get("values"), get("context"))
    else {
        return bad("missing one of shard, indices, values, context");
    };
    let Ok((index, count)) = shard.extract::<(usize, usize)>() else {
        return bad("shard is not (index, count)");
    };
    let Ok(c) = context.cast::<PyDict>() else {
        return bad("context is not a dict");
    };
    let field = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        match c.get_item(key)? {
            Some(v) => Ok(v),
            None => input_error(format!("{name}: context has no {key}")),
        }
    };
    let context = TopKContext {
        k: field("k")?.extract()?,
        metric: parse_metric(&field("metric")?.extract::<String>()?)?,
        other_class: field("other_class")?.extract()?,
        queries: field("queries")?.extract()?,
        queries_sha256: field("queries_sha256")?.extract()?,
        candidate_rows: field("candidate_rows")?.extract()?,
        candidates_list_sha256: field("candidates_list_sha256")?.extract()?,
        weights_sha256: field("weights_sha256")?.extract()?,
    };
    let (Ok(indices), Ok(values)) = (
        indices.extract::<PyReadonlyArray2<'_, i64>>(),
        values.extract::<PyReadonlyArray2<'_, f32>>(),
    ) else {
        return bad("indices must be int64 [Q, k] and values float32 [Q, k]");
    };
    Ok(PartialTopK {
        shard: spec(index, count)?,
        context,
        indices: matrix(&indices, "indices")?.0.to_vec(),
        values: matrix(&values, "values")?.0.to_vec(),
    })
}

/// Merges the parts of one sharded search (every shard exactly once, any order) into the exact
/// whole result: (indices int64 [Q, k], values float32 [Q, k]), ordered by value then global
/// id — equal to `closest` on the whole candidate list. `names` label the parts in errors
/// (default: "part 0", "part 1", ...).
#[pyfunction]
#[pyo3(signature = (parts, names=None))]
#[allow(clippy::type_complexity)]
pub fn merge_topk<'py>(
    py: Python<'py>,
    parts: Vec<Bound<'py, PyAny>>,
    names: Option<Vec<String>>,
) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>)> {
    let names = names.unwrap_or_else(|| (0..parts.len()).map(|i| format!("part {i}")).collect());
    if names.len() != parts.len() {
        return input_error(format!(
            "{} names for {} parts; give one name per part",
            names.len(),
            parts.len()
        ));
    }
    let parsed = parts
        .iter()
        .zip(&names)
        .map(|(p, n)| part_of(p, n))
        .collect::<PyResult<Vec<_>>>()?;
    let merged = compute(py, || {
        let refs: Vec<(&str, &PartialTopK)> = names
            .iter()
            .map(String::as_str)
            .zip(parsed.iter())
            .collect();
        merge(&refs).map_err(failure)
    })?;
    let (nq, k) = (merged.context.queries, merged.context.k);
    Ok((
        to_matrix(py, merged.indices, nq, k)?,
        to_matrix(py, merged.values, nq, k)?,
    ))
}
