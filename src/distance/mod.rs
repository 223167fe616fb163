//! Batched nearest-neighbour search: for queries [Q, D] and candidates [N, D], the k best
//! candidates of each query under L1, L2 or cosine, optionally only among candidates of
//! another class (the closest-pair constraint). Works in tiles with a running top-k, so memory
//! stays O((Q + N)·D + tile); the Q×N matrix is never built.
//!
//! Results: indices (i64 [Q, k]) and values (f32 [Q, k]), best first — smallest L1 / L2
//! distance, largest cosine similarity; ties go to the lower candidate index. Values are
//! recomputed exactly for the chosen pairs. When a query has fewer than k eligible candidates
//! (other-class constraint), its remaining slots hold index −1 and value +∞ (L1, L2) or −∞
//! (cosine).

pub mod bf16;
pub mod bf16_kernel;
pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod exact;
pub mod generic;
pub mod l1_simd;
pub mod topk;

use candle_core::{DType, Device, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// A distance or similarity between embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Σ|a − x| (smaller is closer).
    #[value(alias = "l1_norm")]
    #[serde(alias = "l1_norm")]
    L1,
    /// sqrt(Σ(a − x)²) (smaller is closer).
    #[value(alias = "l2_norm")]
    #[serde(alias = "l2_norm")]
    L2,
    /// a·x / (‖a‖‖x‖) (larger is closer).
    #[value(alias = "cosine_similarity")]
    #[serde(alias = "cosine_similarity")]
    Cosine,
}

impl Metric {
    /// The exact value for one pair.
    pub fn value(self, a: &[f32], x: &[f32]) -> f32 {
        match self {
            Metric::L1 => a.iter().zip(x).map(|(p, q)| (p - q).abs()).sum(),
            Metric::L2 => a
                .iter()
                .zip(x)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f32>()
                .sqrt(),
            Metric::Cosine => {
                let dot: f32 = a.iter().zip(x).map(|(p, q)| p * q).sum();
                let na = a.iter().map(|v| v * v).sum::<f32>().sqrt();
                let nx = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                dot / (na * nx)
            }
        }
    }

    /// [`Metric::value`] of `a` with each of `xs`, bit for bit the same, four candidates at a
    /// time: each candidate's sum is still taken in index order from −0.0 (as `Iterator::sum`
    /// does), only the four sums are interleaved, which the re-ranking's throughput needs.
    pub fn values(self, a: &[f32], xs: &[&[f32]]) -> Vec<f32> {
        let na = match self {
            Metric::Cosine => a.iter().map(|v| v * v).sum::<f32>().sqrt(),
            _ => 0.0,
        };
        let mut out = Vec::with_capacity(xs.len());
        let mut groups = xs.chunks_exact(4);
        for g in groups.by_ref() {
            let (mut s, mut nx) = ([-0.0f32; 4], [-0.0f32; 4]);
            for (i, &p) in a.iter().enumerate() {
                for j in 0..4 {
                    let q = g[j][i];
                    match self {
                        Metric::L1 => s[j] += (p - q).abs(),
                        Metric::L2 => s[j] += (p - q) * (p - q),
                        Metric::Cosine => {
                            s[j] += p * q;
                            nx[j] += q * q;
                        }
                    }
                }
            }
            for j in 0..4 {
                out.push(match self {
                    Metric::L1 => s[j],
                    Metric::L2 => s[j].sqrt(),
                    Metric::Cosine => s[j] / (na * nx[j].sqrt()),
                });
            }
        }
        out.extend(groups.remainder().iter().map(|x| self.value(a, x)));
        out
    }

    /// The value of an empty slot.
    pub fn empty_value(self) -> f32 {
        match self {
            Metric::Cosine => f32::NEG_INFINITY,
            _ => f32::INFINITY,
        }
    }
}

/// Invalid input to a search.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DistanceError {
    #[error("queries have dimension {queries} but candidates have {candidates}; they must match")]
    DimMismatch { queries: usize, candidates: usize },
    #[error("{what} must be a 2-D f32 matrix [rows, dim], found {found}")]
    BadShape { what: &'static str, found: String },
    #[error("{what} row {row} holds a NaN or infinite value")]
    NonFinite { what: &'static str, row: usize },
    #[error("{what} row {row} is all zeros: cosine similarity is undefined for it")]
    ZeroNorm { what: &'static str, row: usize },
    #[error("there are no candidates (N = 0)")]
    NoCandidates,
    #[error("k = {k} is larger than the number of candidates N = {n}")]
    KTooLarge { k: usize, n: usize },
    #[error("k must be 1 or more")]
    KZero,
    #[error("k = {k} is too large; {max} or less", max = MAX_K)]
    KOverLimit { k: usize },
    #[error(
        "{what} row {row} is too large for {metric:?} in f32: its {measure} is {value:e}, over \
         {limit:e} (distances would overflow); scale the embeddings down"
    )]
    Overflow {
        what: &'static str,
        row: usize,
        metric: Metric,
        measure: &'static str,
        value: f64,
        limit: f64,
    },
    #[error("{what} has {found} class labels for {rows} rows")]
    ClassCount {
        what: &'static str,
        found: usize,
        rows: usize,
    },
    /// A tensor operation failed (the message of candle's error).
    #[error("{0}")]
    Tensor(String),
    /// A failure of the CUDA search (its launcher reports driver errors as text).
    #[error("CUDA search: {0}")]
    Cuda(String),
}

impl From<candle_core::Error> for DistanceError {
    fn from(e: candle_core::Error) -> Self {
        DistanceError::Tensor(e.to_string())
    }
}

/// The k best candidates of every query.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    pub k: usize,
    /// [Q × k], row-major, −1 for an empty slot.
    pub indices: Vec<i64>,
    /// [Q × k], row-major.
    pub values: Vec<f32>,
}

impl Neighbors {
    /// Number of queries.
    pub fn len(&self) -> usize {
        self.indices.len() / self.k.max(1)
    }

    /// True when there are no queries.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// (indices i64 [Q, k], values f32 [Q, k]) on `device`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let shape = (self.len(), self.k);
        Ok((
            Tensor::from_slice(&self.indices, shape, device)?,
            Tensor::from_slice(&self.values, shape, device)?,
        ))
    }
}

/// The arithmetic of the CPU search's pre-selection; the result is the same exact one either
/// way (see [`exact`]), only the speed differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 GEMM tiles.
    #[default]
    F32,
    /// bf16 dot products (AVX512-BF16) for L2 and cosine on the CPU, certified against the
    /// exact f32 values, the queries it cannot certify searched again in f32 ([`bf16`]). L1,
    /// device tensors and CPUs without AVX512-BF16 ([`bf16::available`]) search in f32.
    Bf16,
}

/// A search request over host matrices.
#[derive(Debug, Clone, Copy)]
pub struct Search<'a> {
    pub metric: Metric,
    pub k: usize,
    /// (query classes, candidate classes): only candidates of another class are eligible.
    pub other_class: Option<(&'a [i64], &'a [i64])>,
    /// The CPU pre-selection's arithmetic.
    pub precision: Precision,
}

/// The most neighbours per query (`k`).
pub const MAX_K: usize = 4096;

/// What [`check_magnitude`] sums over a row for `metric`, and the most it allows: L2 and
/// cosine need the squared norm at most `f32::MAX / 4`, since ‖a − x‖² ≤ 4·max(‖a‖², ‖x‖²)
/// and a·x ≤ ‖a‖‖x‖; L1 needs Σ|v| at most `f32::MAX / 2`, since Σ|a − x| ≤ Σ|a| + Σ|x|.
pub(crate) fn magnitude_rule(metric: Metric) -> (&'static str, f64) {
    match metric {
        Metric::L1 => ("sum of absolute values", f64::from(f32::MAX) / 2.0),
        Metric::L2 | Metric::Cosine => ("squared norm", f64::from(f32::MAX) / 4.0),
    }
}

/// Refuses a row whose values are finite but so large that the f32 search would overflow
/// (and return wrong neighbours): its magnitude ([`magnitude_rule`]) is summed in f64.
/// Embeddings are nowhere near (rows of norm 1 to 100).
pub fn check_magnitude(
    values: &[f32],
    what: &'static str,
    row: usize,
    metric: Metric,
) -> Result<(), DistanceError> {
    let value = row_magnitude(values, metric);
    check_row_magnitude(what, row, metric, value)
}

/// A row's magnitude for [`magnitude_rule`] in f64: Σ|v| (L1) or Σv² (L2, cosine), summed in
/// 8 interleaved lanes (f64 sums of f32 values: a few ulps of f64 whatever the order).
fn row_magnitude(values: &[f32], metric: Metric) -> f64 {
    let term = |v: f32| match metric {
        Metric::L1 => f64::from(v).abs(),
        Metric::L2 | Metric::Cosine => f64::from(v) * f64::from(v),
    };
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for c in chunks.by_ref() {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += term(v);
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| term(v)).sum();
    lanes.iter().sum::<f64>() + rest
}

/// The check of [`check_magnitude`] on a row's summed magnitude.
pub(crate) fn check_row_magnitude(
    what: &'static str,
    row: usize,
    metric: Metric,
    value: f64,
) -> Result<(), DistanceError> {
    let (measure, limit) = magnitude_rule(metric);
    if value <= limit {
        return Ok(());
    }
    Err(DistanceError::Overflow {
        what,
        row,
        metric,
        measure,
        value,
        limit,
    })
}

/// Refuses the first row (in order) that is non-finite, all zeros for cosine, or too large
/// (rows are checked in parallel); returns the largest row magnitude ([`row_magnitude`]).
fn check_matrix(
    m: &[f32],
    dim: usize,
    what: &'static str,
    metric: Metric,
) -> Result<f64, DistanceError> {
    use rayon::prelude::*;
    let checked: Vec<Result<f64, DistanceError>> = m
        .par_chunks(dim.max(1))
        .enumerate()
        .map(|(row, values)| {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(DistanceError::NonFinite { what, row });
            }
            if metric == Metric::Cosine && values.iter().all(|&v| v == 0.0) {
                return Err(DistanceError::ZeroNorm { what, row });
            }
            let value = row_magnitude(values, metric);
            check_row_magnitude(what, row, metric, value).map(|()| value)
        })
        .collect();
    let mut largest = 0f64;
    for r in checked {
        largest = largest.max(r?);
    }
    Ok(largest)
}

/// Checks a search's input; returns the largest candidate magnitude ([`row_magnitude`]: the
/// squared norm for L2 and cosine).
fn validate(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
) -> Result<f64, DistanceError> {
    let nc = candidates.len() / dim.max(1);
    let nq = queries.len() / dim.max(1);
    validate_sizes(nq, nc, s)?;
    check_matrix(queries, dim, "queries", s.metric)?;
    check_matrix(candidates, dim, "candidates", s.metric)
}

/// The checks of [`validate`] that need only the sizes: k, and the class arrays' lengths.
fn validate_sizes(nq: usize, nc: usize, s: &Search) -> Result<(), DistanceError> {
    if s.k == 0 {
        return Err(DistanceError::KZero);
    }
    if nc == 0 {
        return Err(DistanceError::NoCandidates);
    }
    if s.k > MAX_K {
        return Err(DistanceError::KOverLimit { k: s.k });
    }
    if s.k > nc {
        return Err(DistanceError::KTooLarge { k: s.k, n: nc });
    }
    if let Some((qc, cc)) = s.other_class {
        if qc.len() != nq {
            return Err(DistanceError::ClassCount {
                what: "queries",
                found: qc.len(),
                rows: nq,
            });
        }
        if cc.len() != nc {
            return Err(DistanceError::ClassCount {
                what: "candidates",
                found: cc.len(),
                rows: nc,
            });
        }
    }
    Ok(())
}

/// Searches on a device whose custom kernels did not apply and that fell back to the generic
/// path (which copies tiles to the host), and why the last one did.
static FALLBACKS: std::sync::Mutex<(usize, Option<String>)> = std::sync::Mutex::new((0, None));

/// Records a fall-back from the device kernels to the generic path (never silent: callers read
/// it back with [`take_fallback`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn note_fallback(why: String) {
    if let Ok(mut f) = FALLBACKS.lock() {
        f.0 += 1;
        f.1 = Some(why);
    }
}

/// How many searches fell back from the device kernels to the generic path since the last
/// call, and why the last did; resets the count. A command prints it so a slow path is never
/// taken silently.
pub fn take_fallback() -> Option<(usize, String)> {
    let mut f = FALLBACKS.lock().ok()?;
    let taken = (f.0, f.1.take()?);
    f.0 = 0;
    Some(taken)
}

/// Checks that row-major host matrices hold whole rows of `dim` (> 0) values.
pub(crate) fn check_host_shape(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
) -> Result<(), DistanceError> {
    if dim == 0 || !queries.len().is_multiple_of(dim) || !candidates.len().is_multiple_of(dim) {
        return Err(DistanceError::BadShape {
            what: "input",
            found: format!(
                "{} and {} values for dim {dim}",
                queries.len(),
                candidates.len()
            ),
        });
    }
    Ok(())
}

/// Searches row-major host matrices (`dim` columns) on the CPU.
pub fn search_host(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
) -> Result<Neighbors, DistanceError> {
    check_host_shape(queries, candidates, dim)?;
    let largest = validate(queries, candidates, dim, s)?;
    // The bounds' largest candidate norm (L2 only), from the validation's squared norms.
    let max_norm = match s.metric {
        Metric::L2 => largest.sqrt(),
        _ => 0.0,
    };
    if s.precision == Precision::Bf16 && s.metric != Metric::L1 && bf16::available() {
        return Ok(bf16::search(queries, candidates, dim, s, max_norm));
    }
    Ok(search_host_f32(queries, candidates, dim, s, max_norm))
}

/// [`search_host`]'s f32 path on validated input (`max_norm`: the largest candidate L2 norm
/// for L2, else 0).
fn search_host_f32(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    max_norm: f64,
) -> Neighbors {
    let problem = cpu::Problem::keeping(queries, candidates, dim, s, exact::RERANK);
    let pre = exact::Preselected::of(&problem, cpu::search(&problem));
    let bounds = exact::Bounds::with_max_norm(s.metric, dim, exact::KeyArith::F32, max_norm);
    exact_with_bounds(queries, candidates, dim, s, &pre, &bounds)
}

/// The exact result from a pre-selection over host matrices: re-ranked, and the queries that
/// cannot be certified scanned in full (counted, see [`take_rechecks`]).
pub(crate) fn exact_from_host(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    pre: &exact::Preselected,
    arith: exact::KeyArith,
) -> Neighbors {
    let bounds = exact::Bounds::new(s.metric, dim, arith, candidates);
    exact_with_bounds(queries, candidates, dim, s, pre, &bounds)
}

/// [`exact_from_host`] with its bounds given.
pub(crate) fn exact_with_bounds(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    pre: &exact::Preselected,
    bounds: &exact::Bounds,
) -> Neighbors {
    let (mut out, uncertified) = exact::rerank(queries, dim, s, pre, bounds, |slot| {
        let c = pre.indices[slot] as usize;
        &candidates[c * dim..(c + 1) * dim]
    });
    note_rechecks(0, uncertified.len());
    exact::scan_into(&mut out, queries, candidates, dim, s, &uncertified);
    out
}

/// Queries whose fast result could not be certified exact and were recomputed: on the device in
/// f32 after a TF32 pass, on the host in f32 after a bf16 pass, and by a full scan on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rechecks {
    pub device_f32: usize,
    pub host_f32: usize,
    pub host_scan: usize,
}

static RECHECKS: std::sync::Mutex<Rechecks> = std::sync::Mutex::new(Rechecks {
    device_f32: 0,
    host_f32: 0,
    host_scan: 0,
});

fn note_rechecks(device_f32: usize, host_scan: usize) {
    if let Ok(mut r) = RECHECKS.lock() {
        r.device_f32 += device_f32;
        r.host_scan += host_scan;
    }
}

/// Counts queries of a bf16 pre-selection searched again in f32 (see [`Rechecks`]).
fn note_host_f32(queries: usize) {
    if let Ok(mut r) = RECHECKS.lock() {
        r.host_f32 += queries;
    }
}

/// The queries re-checked since the last call (see [`Rechecks`]); resets the counts.
pub fn take_rechecks() -> Rechecks {
    RECHECKS
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default()
}

fn host_matrix(t: &Tensor, what: &'static str) -> Result<(Vec<f32>, usize, usize), DistanceError> {
    let (rows, dim) = t.dims2().map_err(|_| DistanceError::BadShape {
        what,
        found: format!("{:?}", t.dims()),
    })?;
    let data = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((data, rows, dim))
}

/// Searches tensors: the CPU path for CPU tensors; the CUDA kernels for CUDA tensors (feature
/// `cuda`); elsewhere (Metal) candle's generic tensor ops tile by tile (correct, not fast).
pub fn search(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> Result<Neighbors, DistanceError> {
    let (_, dq) = queries.dims2().map_err(|_| DistanceError::BadShape {
        what: "queries",
        found: format!("{:?}", queries.dims()),
    })?;
    let (_, dc) = candidates.dims2().map_err(|_| DistanceError::BadShape {
        what: "candidates",
        found: format!("{:?}", candidates.dims()),
    })?;
    if dq != dc {
        return Err(DistanceError::DimMismatch {
            queries: dq,
            candidates: dc,
        });
    }
    if queries.device().is_cpu() {
        let (q, _, d) = host_matrix(queries, "queries")?;
        let (c, _, _) = host_matrix(candidates, "candidates")?;
        return search_host(&q, &c, d, s);
    }
    #[cfg(feature = "cuda")]
    if queries.device().is_cuda() {
        match cuda::search_checked(queries, candidates, s)
            .map_err(|e| DistanceError::Cuda(format!("{e:#}")))?
        {
            cuda::Outcome::Done(found) => return Ok(found),
            cuda::Outcome::NotApplicable(why) => note_fallback(why),
        }
    }
    generic::search(queries, candidates, s)
}

/// The CUDA kernels' search alone: an error, never the generic path, when they do not apply
/// (k over their capacity, an L1 query block over the device's shared memory). For tests and
/// benchmarks that must measure the kernels.
#[cfg(feature = "cuda")]
pub fn search_kernels(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> Result<Neighbors, DistanceError> {
    if !queries.device().is_cuda() {
        return Err(DistanceError::Cuda(
            "the inputs are not on a CUDA device".into(),
        ));
    }
    match cuda::search_checked(queries, candidates, s)
        .map_err(|e| DistanceError::Cuda(format!("{e:#}")))?
    {
        cuda::Outcome::Done(found) => Ok(found),
        cuda::Outcome::NotApplicable(why) => Err(DistanceError::Cuda(why)),
    }
}

/// The naive reference: every pair, f32 values from [`Metric::value`], ties to the lower
/// index. For tests and checks only.
pub fn search_naive(queries: &[f32], candidates: &[f32], dim: usize, s: &Search) -> Neighbors {
    let nq = queries.len() / dim;
    let mut out = Neighbors {
        k: s.k,
        indices: vec![-1; nq * s.k],
        values: vec![s.metric.empty_value(); nq * s.k],
    };
    let all: Vec<usize> = (0..nq).collect();
    exact::scan_into(&mut out, queries, candidates, dim, s, &all);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn fallbacks_are_counted_and_reported_once() {
        let _ = take_fallback();
        assert_eq!(take_fallback(), None);
        note_fallback("first".into());
        note_fallback("the L1 kernel needs more shared memory".into());
        assert_eq!(
            take_fallback(),
            Some((2, "the L1 kernel needs more shared memory".to_owned()))
        );
        assert_eq!(take_fallback(), None, "reset after reading");
    }

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
            .collect()
    }

    /// Every path gives the naive reference's result: the same indices, bit-identical values.
    fn assert_parity(got: &Neighbors, want: &Neighbors, ctx: &str) {
        assert_eq!(got.k, want.k, "{ctx}");
        assert_eq!(got.indices, want.indices, "{ctx}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.values), bits(&want.values), "{ctx}");
    }

    /// `n` rows around `centres` cluster centres: exact copies of the centre (every fourth row)
    /// and copies moved by at most `spread` in each coordinate, so that neighbours tie exactly
    /// or within rounding.
    fn clustered(rng: &mut Rng, n: usize, dim: usize, centres: usize, spread: f64) -> Vec<f32> {
        let c = random(rng, centres * dim);
        (0..n)
            .flat_map(|i| {
                let centre = &c[(i % centres) * dim..(i % centres + 1) * dim];
                let jitter: Vec<f32> = (0..dim)
                    .map(|_| ((rng.unit_f64() * 2.0 - 1.0) * spread) as f32)
                    .collect();
                centre
                    .iter()
                    .zip(jitter)
                    .map(move |(&x, j)| if i % 4 == 0 { x } else { x + j })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn near_duplicates_and_ties_match_naive_exactly() {
        let mut rng = Rng::new(5);
        for &(nq, nc, dim, spread) in &[
            (40, 300, 16, 1e-6),
            (40, 300, 64, 1e-4),
            (20, 12, 8, 1e-5),
            (30, 2000, 128, 1e-7),
        ] {
            let c = clustered(&mut rng, nc, dim, 7, spread);
            let q = clustered(&mut rng, nq, dim, 7, spread);
            let qc: Vec<i64> = (0..nq).map(|i| (i % 2) as i64).collect();
            // Class 1 is rare among candidates: some queries have few eligible ones.
            let cc: Vec<i64> = (0..nc).map(|i| i64::from(i % 9 == 0)).collect();
            for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
                for k in [1usize, 5, 9, 16, 17] {
                    if k > nc {
                        continue;
                    }
                    for other in [false, true] {
                        let s = Search {
                            metric,
                            k,
                            other_class: other.then_some((&qc[..], &cc[..])),
                            precision: Precision::F32,
                        };
                        let want = search_naive(&q, &c, dim, &s);
                        let ctx = format!("{metric:?} k={k} other={other} N={nc} D={dim}");
                        assert_parity(&search_host(&q, &c, dim, &s).unwrap(), &want, &ctx);
                        let tq = Tensor::from_slice(&q, (nq, dim), &Device::Cpu).unwrap();
                        let tc = Tensor::from_slice(&c, (nc, dim), &Device::Cpu).unwrap();
                        let generic = generic::search(&tq, &tc, &s).unwrap();
                        assert_parity(&generic, &want, &format!("generic {ctx}"));
                    }
                }
            }
        }
        // Exact duplicate clusters wider than the margin cannot be certified: the full scans
        // ran (and still gave the naive result above).
        assert!(take_rechecks().host_scan > 0);
    }

    #[test]
    fn parity_with_naive_on_ragged_sizes() {
        let mut rng = Rng::new(11);
        for &(nq, nc, dim) in &[
            (1, 1, 1),
            (7, 33, 3),
            (7, 5000, 512),
            (1000, 33, 1280),
            (1, 5000, 3),
            (1000, 1, 512),
            (7, 33, 1280),
            (1000, 5000, 3),
            (1, 1, 1280),
        ] {
            let q = random(&mut rng, nq * dim);
            let c = random(&mut rng, nc * dim);
            let qc: Vec<i64> = (0..nq).map(|i| (i % 3) as i64).collect();
            let cc: Vec<i64> = (0..nc).map(|i| (i % 4) as i64).collect();
            for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
                for k in [1usize, 5] {
                    if k > nc {
                        continue;
                    }
                    for other in [false, true] {
                        let s = Search {
                            metric,
                            k,
                            other_class: other.then_some((&qc[..], &cc[..])),
                            precision: Precision::F32,
                        };
                        let got = search_host(&q, &c, dim, &s).unwrap();
                        let want = search_naive(&q, &c, dim, &s);
                        let ctx = format!("{metric:?} k={k} other={other} Q={nq} N={nc} D={dim}");
                        assert_parity(&got, &want, &ctx);
                        if nq <= 7 && nc <= 5000 {
                            let tq = Tensor::from_slice(&q, (nq, dim), &Device::Cpu).unwrap();
                            let tc = Tensor::from_slice(&c, (nc, dim), &Device::Cpu).unwrap();
                            let generic = generic::search(&tq, &tc, &s).unwrap();
                            assert_parity(&generic, &want, &format!("generic {ctx}"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exact_small_case_and_tie_break() {
        // 1-D points: candidates 0, 2, 2, 5; query 1.
        let c = [0.0f32, 2.0, 2.0, 5.0];
        let s = Search {
            metric: Metric::L1,
            k: 3,
            other_class: None,
            precision: Precision::F32,
        };
        let n = search_host(&[1.0], &c, 1, &s).unwrap();
        assert_eq!(n.indices, vec![0, 1, 2]);
        assert_eq!(n.values, vec![1.0, 1.0, 1.0]);
        let s = Search {
            metric: Metric::L2,
            k: 2,
            other_class: None,
            precision: Precision::F32,
        };
        assert_eq!(search_host(&[4.0], &c, 1, &s).unwrap().indices, vec![3, 1]);
        // Cosine in 2-D: the query (1, 0) is closest in angle to (2, 0.1).
        let c2 = [0.0f32, 1.0, 2.0, 0.1, -1.0, 0.0];
        let s = Search {
            metric: Metric::Cosine,
            k: 3,
            other_class: None,
            precision: Precision::F32,
        };
        let n = search_host(&[1.0, 0.0], &c2, 2, &s).unwrap();
        assert_eq!(n.indices, vec![1, 0, 2]);
        assert!((n.values[0] - 2.0 / 4.01f32.sqrt()).abs() < 1e-6 && n.values[2] == -1.0);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let s = |k| Search {
            metric: Metric::L2,
            k,
            other_class: None,
            precision: Precision::F32,
        };
        let err = |r: Result<Neighbors, DistanceError>| r.unwrap_err().to_string();
        assert!(err(search_host(&[1.0, f32::NAN], &[0.0, 0.0], 2, &s(1)))
            .contains("queries row 0 holds a NaN"));
        assert!(err(search_host(
            &[1.0, 1.0],
            &[0.0, 0.0, 1.0, f32::INFINITY],
            2,
            &s(1)
        ))
        .contains("candidates row 1"));
        assert!(err(search_host(&[1.0], &[], 1, &s(1))).contains("N = 0"));
        assert!(err(search_host(&[1.0], &[1.0, 2.0], 1, &s(3)))
            .contains("k = 3 is larger than the number of candidates N = 2"));
        assert!(err(search_host(&[1.0], &[1.0], 1, &s(0))).contains("k must be"));
        let cos = Search {
            metric: Metric::Cosine,
            k: 1,
            other_class: None,
            precision: Precision::F32,
        };
        assert!(err(search_host(&[0.0, 0.0], &[1.0, 1.0], 2, &cos)).contains("all zeros"));
        let q = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let c = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let e = search(&q, &c, &s(1)).unwrap_err().to_string();
        assert!(e.contains("dimension 3") && e.contains("4"), "{e}");

        // All candidates of the query's class: the slots stay empty (index −1, value +∞).
        let s = Search {
            metric: Metric::L1,
            k: 2,
            other_class: Some((&[1], &[1, 1, 0])),
            precision: Precision::F32,
        };
        let n = search_host(&[0.0], &[1.0, 2.0, 3.0], 1, &s).unwrap();
        assert_eq!(n.indices, vec![2, -1]);
        assert_eq!(n.values, vec![3.0, f32::INFINITY]);
        let s = Search {
            metric: Metric::L1,
            k: 1,
            other_class: Some((&[1], &[1, 1])),
            precision: Precision::F32,
        };
        assert_eq!(
            search_host(&[0.0], &[1.0, 2.0], 1, &s).unwrap().indices,
            vec![-1]
        );
    }

    #[test]
    fn finite_rows_that_would_overflow_are_refused() {
        // Candidate 1 is (3e19, 3e19): finite, but its squared norm 1.8e39 overflows f32, and
        // with it every L2 distance and cosine norm that involves it.
        let q = [1.0f32, 1.0];
        let c = [2.0f32, 2.0, 3e19, 3e19, 5.0, 5.0];
        for metric in [Metric::L2, Metric::Cosine] {
            let s = Search {
                metric,
                k: 1,
                other_class: None,
                precision: Precision::F32,
            };
            let err = search_host(&q, &c, 2, &s).unwrap_err();
            assert!(
                matches!(
                    err,
                    DistanceError::Overflow {
                        what: "candidates",
                        row: 1,
                        ..
                    }
                ),
                "{metric:?} {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains("candidates row 1") && message.contains("squared norm"),
                "{message}"
            );
            // The same through the tensor entry point, and for a query row.
            let tq = Tensor::from_slice(&c, (3, 2), &Device::Cpu).unwrap();
            let tc = Tensor::from_slice(&q, (1, 2), &Device::Cpu).unwrap();
            let err = search(&tq, &tc, &s).unwrap_err().to_string();
            assert!(err.contains("queries row 1"), "{err}");
        }
        // L1: 3e19 is fine (sums stay far below f32::MAX), 3e38 over 2 dims is not.
        let s = Search {
            metric: Metric::L1,
            k: 1,
            other_class: None,
            precision: Precision::F32,
        };
        assert_eq!(search_host(&q, &c, 2, &s).unwrap().indices, vec![0]);
        let c = [2.0f32, 2.0, 3e38, 3e38];
        let err = search_host(&q, &c, 2, &s).unwrap_err().to_string();
        assert!(
            err.contains("candidates row 1") && err.contains("sum of absolute values"),
            "{err}"
        );
        // Large but safe rows still search exactly.
        let c = [1e18f32, 0.0, -1e18, 0.0];
        let s = Search {
            metric: Metric::L2,
            k: 2,
            other_class: None,
            precision: Precision::F32,
        };
        let n = search_host(&[1e18, 1.0], &c, 2, &s).unwrap();
        assert_eq!(n.indices, vec![0, 1]);
        assert!(n.values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn k_is_bounded() {
        let s = Search {
            metric: Metric::L1,
            k: MAX_K + 1,
            other_class: None,
            precision: Precision::F32,
        };
        let c = vec![0.0f32; MAX_K + 1];
        let err = search_host(&[0.0], &c, 1, &s).unwrap_err().to_string();
        assert!(
            err.contains("4097") && err.contains("4096 or less"),
            "{err}"
        );
    }
}
