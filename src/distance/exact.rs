//! Exact results from an approximate pre-selection.
//!
//! Every search path ranks candidates by a fast key (a GEMM's `‖x‖² − 2q·x` in f32 or TF32,
//! a SIMD L1 sum) that can differ from the exact distance by rounding, so near-duplicates could
//! swap places. Each path therefore keeps `k + RERANK` candidates per query, re-ranks them by
//! the value [`Metric::value`] computes (the naive reference's value, ties to the lower index)
//! and *certifies* the result: with `T` the worst kept key and a proven bound on how far a key
//! can be from the exact distance, no candidate that was not kept can be closer than the k-th
//! kept one when `floor(T) − err > d_k + err`. A query that cannot be certified (a cluster of
//! duplicates larger than the margin, say) is recomputed by a full exact scan. The result is
//! therefore the naive reference's, index for index and bit for bit, on every path.
//!
//! The bounds are the textbook ones for floating-point dot products and sums (unit roundoff
//! u = 2⁻²⁴, a sum of D terms errs by at most ≈ D·u times the sum of magnitudes; TF32 rounds
//! each GEMM input to 10 mantissa bits, 2⁻¹⁰ relative with truncation), doubled for margin.
//! The bf16 pre-selection's dot-product error is derived in full at [`bf16_dot_error`].

use rayon::prelude::*;

use super::topk::RunningTopK;
use super::{Metric, Neighbors, Search};

/// Extra candidates a pre-selection keeps per query for the exact re-ranking.
pub const RERANK: usize = 8;

/// f32's unit roundoff.
const U: f64 = 1.0 / 16_777_216.0;
/// Relative error of rounding an f32 GEMM input to TF32 (10 explicit mantissa bits, truncation).
const U_TF32: f64 = 1.0 / 1024.0;
/// Relative error of rounding a normal f32 to bf16 to nearest: 8 significant bits (7 stored),
/// so half an ulp is 2⁻⁸ of the leading bit: u_b = 2⁻⁸ (1 + 2⁻⁸ lies halfway between the
/// neighbours 1 and 1 + 2⁻⁷).
const U_BF16: f64 = 1.0 / 256.0;
/// The smallest normal f32, 2⁻¹²⁶: the absolute error of a value the bf16 kernel flushes to
/// zero (a subnormal input or result).
const TINY: f64 = 1.175_494_350_822_287_5e-38;

/// A bound on |q·x − q̃·x̃ computed by the bf16 kernel| for any rows q, x of `dim` values with
/// ‖q‖ ≤ `q_norm` and ‖x‖ ≤ `x_norm`, where q̃, x̃ are the rows rounded to bf16.
///
/// Derivation. Rounding to nearest to 8 significant bits gives |q̃ᵢ − qᵢ| ≤ u_b|qᵢ| with
/// u_b = 2⁻⁸ for a normal value; the kernel (`vdpbf16ps`) may treat a subnormal input as zero,
/// so in every case |q̃ᵢ − qᵢ| ≤ u_b|qᵢ| + τ with τ = 2⁻¹²⁶, and the same for x. Then
///
/// |qᵢxᵢ − q̃ᵢx̃ᵢ| ≤ |qᵢ||x̃ᵢ − xᵢ| + |x̃ᵢ||q̃ᵢ − qᵢ|
/// ≤ (2u_b + u_b²)|qᵢ||xᵢ| + τ(1 + u_b)(|qᵢ| + |xᵢ|) + τ².
///
/// Summed over i, with Σ|qᵢ||xᵢ| ≤ ‖q‖‖x‖ (Cauchy–Schwarz) and ‖q‖₁ ≤ √D‖q‖, the inputs'
/// rounding costs at most (2u_b + u_b²)‖q‖‖x‖ plus τ(1 + u_b)√D(‖q‖ + ‖x‖) plus Dτ².
///
/// A product of two bf16 values (8 + 8 significant bits) is exact in f32 (24 bits), unless
/// it is flushed below τ. Each of the at most D + 1 f32 additions of a lane errs by at most
/// 2u·|its partial sum| with u = 2⁻²⁴ (2u: any faithful rounding, not only to nearest), or by
/// less than τ when flushed; every partial sum is at most Σ|q̃ᵢx̃ᵢ| ≤ (1 + u_b)²‖q‖‖x‖ plus
/// τ terms. With n = D + 4 ≥ D + 1, the total is at most
///
/// (2u_b + u_b² + 2.1·n·u)‖q‖‖x‖ + 2τ(√D(‖q‖ + ‖x‖) + 2n),
///
/// the factor 2.1 ≥ 2(1 + u_b)²(1 + n·u) and the doubled τ term covering the second-order
/// products. No other slack is added: the bound is the inputs' rounding plus the sums'
/// (`tests/distance_bf16.rs` checks it against the kernel, and that it is nearly reached when
/// every input rounds down by almost u_b).
pub fn bf16_dot_error(dim: usize, q_norm: f64, x_norm: f64) -> f64 {
    let n = dim as f64 + 4.0;
    (2.0 * U_BF16 + U_BF16 * U_BF16 + 2.1 * n * U) * q_norm * x_norm
        + 2.0 * TINY * ((dim as f64).sqrt() * (q_norm + x_norm) + 2.0 * n)
}

/// The arithmetic that computed the pre-selection's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyArith {
    /// f32 throughout.
    F32,
    /// GEMM inputs rounded to TF32 (tensor cores), f32 accumulation.
    Tf32,
    /// Dot products of rows rounded to bf16, f32 accumulation (the CPU's AVX512-BF16 kernel);
    /// the error bound is [`bf16_dot_error`].
    Bf16,
}

/// What the error bounds need to know about one search.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    metric: Metric,
    dim: usize,
    arith: KeyArith,
    /// The largest candidate L2 norm (L2 keys scale with it).
    max_norm: f64,
}

impl Bounds {
    /// Bounds for a search over `candidates` (row-major, `dim` columns).
    pub fn new(metric: Metric, dim: usize, arith: KeyArith, candidates: &[f32]) -> Self {
        let max_norm = match metric {
            Metric::L2 => candidates
                .par_chunks(dim.max(1))
                .map(|row| {
                    row.iter()
                        .map(|&v| f64::from(v) * f64::from(v))
                        .sum::<f64>()
                })
                .reduce(|| 0.0, f64::max)
                .sqrt(),
            _ => 0.0,
        };
        Self::with_max_norm(metric, dim, arith, max_norm)
    }

    /// Bounds when the largest candidate norm is already known.
    pub fn with_max_norm(metric: Metric, dim: usize, arith: KeyArith, max_norm: f64) -> Self {
        Self {
            metric,
            dim,
            arith,
            max_norm,
        }
    }

    fn terms(&self) -> f64 {
        self.dim as f64 + 4.0
    }

    /// The smallest exact value (in "smaller is closer" form: L1, L2 distance, −cosine) that a
    /// candidate whose key is `t` or more can have, for a query of L2 norm `q_norm`.
    fn value_floor(&self, t: f32, q_norm: f64) -> f64 {
        let t = f64::from(t);
        let n = self.terms();
        let gemm = match self.arith {
            KeyArith::F32 => n * U,
            KeyArith::Tf32 => 2.0 * U_TF32 + n * U,
            KeyArith::Bf16 => 0.0,
        };
        match self.metric {
            // Keys are sums of non-negative terms: relative error.
            Metric::L1 => t / (1.0 + 2.0 * n * U),
            Metric::L2 => {
                // key = ‖x‖² − 2q·x: the norm, the dot product and the subtraction.
                let m = self.max_norm;
                let rest = n * U * m * m + 2.0 * U * (m * m + 2.0 * q_norm * m);
                let beta = match self.arith {
                    KeyArith::Bf16 => 2.0 * bf16_dot_error(self.dim, q_norm, m) + 2.0 * rest,
                    _ => 2.0 * (2.0 * gemm * q_norm * m + rest),
                };
                (t + q_norm * q_norm - beta).max(0.0).sqrt()
            }
            // key = −q̂·x̂ over rows normalised in f32 (norms within 1 ± n·u).
            Metric::Cosine => match self.arith {
                KeyArith::Bf16 => {
                    let unit = 1.0 + n * U;
                    t - bf16_dot_error(self.dim, unit, unit) - 4.0 * n * U
                }
                _ => t - 2.0 * (gemm + 2.0 * n * U),
            },
        }
    }

    /// A bound on |f32 value from [`Metric::value`] − exact value| at exact value `d`.
    fn value_error(&self, d: f64) -> f64 {
        let n = self.terms();
        let err = match self.metric {
            Metric::L1 | Metric::L2 => 2.0 * n * U * d.abs(),
            Metric::Cosine => 6.0 * n * U,
        };
        err + f64::from(f32::MIN_POSITIVE)
    }
}

/// The exact value of a pair in f64, "smaller is closer" (−cosine for cosine).
fn exact_value(metric: Metric, q: &[f32], x: &[f32]) -> f64 {
    let pairs = q.iter().zip(x).map(|(&a, &b)| (f64::from(a), f64::from(b)));
    match metric {
        Metric::L1 => pairs.map(|(a, b)| (a - b).abs()).sum(),
        Metric::L2 => pairs.map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt(),
        Metric::Cosine => {
            let (mut dot, mut na, mut nx) = (0.0, 0.0, 0.0);
            for (a, b) in pairs {
                dot += a * b;
                na += a * a;
                nx += b * b;
            }
            -dot / (na.sqrt() * nx.sqrt())
        }
    }
}

/// The ranking key of a value: smaller is closer.
fn rank_key(metric: Metric, v: f32) -> f32 {
    if metric == Metric::Cosine {
        -v
    } else {
        v
    }
}

/// A pre-selection: per query, the `kept` best candidates by approximate key, best first
/// (index −1 and key +∞ in unfilled slots).
pub struct Preselected {
    pub kept: usize,
    pub keys: Vec<f32>,
    pub indices: Vec<i64>,
    /// Whether every candidate could be kept (N ≤ kept): nothing was left out.
    pub everything: bool,
}

impl Preselected {
    /// The (keys, indices) a CPU pre-selection of `problem` found.
    pub fn of(problem: &super::cpu::Problem, (keys, indices): (Vec<f32>, Vec<i64>)) -> Self {
        Self {
            kept: problem.k,
            keys,
            indices,
            everything: problem.k == problem.n_candidates(),
        }
    }
}

/// One query's exact top-k from its kept candidates, or `None` when it cannot be certified.
/// `row(slot)` is the candidate row kept in `slot` of this query.
fn rerank_query<'r>(
    q: &[f32],
    s: &Search,
    keys: &[f32],
    indices: &[i64],
    everything: bool,
    bounds: &Bounds,
    row: impl Fn(usize) -> &'r [f32],
) -> Option<(Vec<i64>, Vec<f32>)> {
    let (k, metric) = (s.k, s.metric);
    let kept: Vec<usize> = (0..indices.len()).filter(|&j| indices[j] >= 0).collect();
    let rows: Vec<&[f32]> = kept.iter().map(|&slot| row(slot)).collect();
    let mut scored: Vec<(f32, i64, usize)> = metric
        .values(q, &rows)
        .into_iter()
        .zip(&kept)
        .map(|(v, &slot)| (v, indices[slot], slot))
        .collect();
    scored.sort_by(|a, b| {
        rank_key(metric, a.0)
            .total_cmp(&rank_key(metric, b.0))
            .then(a.1.cmp(&b.1))
    });
    scored.dedup_by_key(|s| s.1);
    let valid = indices.iter().filter(|&&i| i >= 0).count();
    // Fewer kept than slots: every eligible candidate was kept.
    let complete = everything || valid < indices.len();
    if !complete {
        let q_norm = q
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let floor = bounds.value_floor(keys[keys.len() - 1], q_norm);
        let worst = scored
            .iter()
            .take(k)
            .map(|&(_, _, slot)| exact_value(metric, q, row(slot)))
            .fold(f64::NEG_INFINITY, f64::max);
        if floor - bounds.value_error(floor) <= worst + bounds.value_error(worst) {
            return None;
        }
    }
    let mut idx = Vec::with_capacity(k);
    let mut val = Vec::with_capacity(k);
    for j in 0..k {
        let (v, i) = scored
            .get(j)
            .map_or((metric.empty_value(), -1), |s| (s.0, s.1));
        idx.push(i);
        val.push(v);
    }
    Some((idx, val))
}

/// Re-ranks every query's kept candidates exactly. Returns the result (uncertified queries'
/// slots left empty) and the uncertified queries, in order. `row(slot)` is the candidate row
/// kept in global `slot` (query × kept + j).
pub fn rerank<'r>(
    queries: &[f32],
    dim: usize,
    s: &Search,
    pre: &Preselected,
    bounds: &Bounds,
    row: impl Fn(usize) -> &'r [f32] + Sync,
) -> (Neighbors, Vec<usize>) {
    let nq = queries.len() / dim.max(1);
    let kept = pre.kept;
    let per_query: Vec<Option<(Vec<i64>, Vec<f32>)>> = (0..nq)
        .into_par_iter()
        .map(|qi| {
            let span = qi * kept..(qi + 1) * kept;
            rerank_query(
                &queries[qi * dim..(qi + 1) * dim],
                s,
                &pre.keys[span.clone()],
                &pre.indices[span],
                pre.everything,
                bounds,
                |j| row(qi * kept + j),
            )
        })
        .collect();
    let mut out = Neighbors {
        k: s.k,
        indices: Vec::with_capacity(nq * s.k),
        values: Vec::with_capacity(nq * s.k),
    };
    let mut uncertified = Vec::new();
    for (qi, found) in per_query.into_iter().enumerate() {
        match found {
            Some((idx, val)) => {
                out.indices.extend(idx);
                out.values.extend(val);
            }
            None => {
                uncertified.push(qi);
                out.indices.extend(std::iter::repeat_n(-1, s.k));
                out.values
                    .extend(std::iter::repeat_n(s.metric.empty_value(), s.k));
            }
        }
    }
    (out, uncertified)
}

/// The exact top-k of one query by a full scan (the naive reference's order: [`Metric::value`]
/// in f32, ties to the lower index). `eligible(c)` filters candidates (the other-class rule).
pub fn scan_query(
    q: &[f32],
    candidates: &[f32],
    dim: usize,
    metric: Metric,
    k: usize,
    eligible: impl Fn(usize) -> bool,
) -> (Vec<i64>, Vec<f32>) {
    let (mut keys, mut idx) = (vec![0f32; k], vec![0i64; k]);
    {
        let mut top = RunningTopK::new(&mut keys, &mut idx);
        for (c, x) in candidates.chunks_exact(dim).enumerate() {
            if eligible(c) {
                top.push(rank_key(metric, metric.value(q, x)), c as i64);
            }
        }
    }
    let values = keys
        .iter()
        .zip(&idx)
        .map(|(&key, &i)| {
            if i < 0 {
                metric.empty_value()
            } else {
                rank_key(metric, key)
            }
        })
        .collect();
    (idx, values)
}

/// Fills `queries` (indices into the query matrix) of `out` by full exact scans, in parallel.
pub fn scan_into(
    out: &mut Neighbors,
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    which: &[usize],
) {
    let found: Vec<(Vec<i64>, Vec<f32>)> = which
        .par_iter()
        .map(|&qi| {
            scan_query(
                &queries[qi * dim..(qi + 1) * dim],
                candidates,
                dim,
                s.metric,
                s.k,
                |c| s.other_class.is_none_or(|(qc, cc)| qc[qi] != cc[c]),
            )
        })
        .collect();
    for (&qi, (idx, val)) in which.iter().zip(found) {
        out.indices[qi * s.k..(qi + 1) * s.k].copy_from_slice(&idx);
        out.values[qi * s.k..(qi + 1) * s.k].copy_from_slice(&val);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::Precision;

    #[test]
    fn floor_is_below_every_key_it_covers() {
        // L2: a candidate of key t = ‖x‖² − 2q·x has distance sqrt(t + ‖q‖²); the floor may
        // only be lower.
        let b = Bounds::with_max_norm(Metric::L2, 4, KeyArith::Tf32, 2.0);
        let (q, x) = ([1f32, 0., 0., 0.], [0.5f32, 0.5, 0., 0.]);
        let t = 0.5f32 - 2.0 * 0.5;
        let d = exact_value(Metric::L2, &q, &x);
        assert!(b.value_floor(t, 1.0) < d);
        assert!(d - b.value_floor(t, 1.0) < 0.05, "TF32 margin stays small");
        let f32_bound = Bounds::with_max_norm(Metric::L2, 4, KeyArith::F32, 2.0);
        assert!(f32_bound.value_floor(t, 1.0) > b.value_floor(t, 1.0));
    }

    #[test]
    fn duplicates_beyond_the_margin_are_not_certified() {
        // Twelve identical candidates at distance 0 and k' = 9: the ones left out tie with the
        // kept ones, so the query must be rescanned.
        let q = [1f32, 2.0];
        let cands: Vec<f32> = (0..12).flat_map(|_| [1f32, 2.0]).collect();
        let indices: Vec<i64> = (0..9).collect();
        let keys = vec![-5f32; 9];
        let b = Bounds::new(Metric::L2, 2, KeyArith::F32, &cands);
        let s = Search {
            metric: Metric::L2,
            k: 1,
            other_class: None,
            precision: Precision::F32,
        };
        let got = rerank_query(&q, &s, &keys, &indices, false, &b, |j| {
            &cands[j * 2..j * 2 + 2]
        });
        assert!(got.is_none());
        // The same with every candidate kept is certain.
        let got = rerank_query(&q, &s, &keys, &indices, true, &b, |j| {
            &cands[j * 2..j * 2 + 2]
        });
        assert_eq!(got, Some((vec![0], vec![0.0])));
    }

    #[test]
    fn scan_orders_by_value_then_index() {
        let cands = [3f32, 1.0, 1.0, 2.0];
        let (idx, val) = scan_query(&[0f32], &cands, 1, Metric::L1, 3, |c| c != 3);
        assert_eq!(idx, vec![1, 2, 0]);
        assert_eq!(val, vec![1.0, 1.0, 3.0]);
    }
}
