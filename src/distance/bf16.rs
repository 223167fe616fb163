//! The bf16 pre-selection of the CPU search (L2 and cosine, [`super::Precision::Bf16`]).
//!
//! Queries and candidates are rounded to bf16 once per search (to nearest, ties to even; cosine
//! rows normalised in f32 first) and packed for the AVX512-BF16 kernel of
//! [`super::bf16_kernel`]; its f32 dot products feed the f32 path's top-k epilogue, which keeps
//! `k + MARGIN` candidates per query. [`super::exact`] then re-ranks them by their exact f32
//! values and certifies each query with the bound [`super::exact::bf16_dot_error`]; a query
//! it cannot certify (near-duplicates wider than the margin) is searched again by the f32 path
//! and counted ([`super::Rechecks::host_f32`]). The result is therefore the f32 search's, index
//! for index and bit for bit.

use rayon::prelude::*;

use super::exact::{self, KeyArith, Preselected};
use super::{cpu, Neighbors, Precision, Search};

/// Extra candidates the bf16 pre-selection keeps per query for the exact re-rank: wider than
/// f32's [`exact::RERANK`] since bf16's error bound is ~2⁻⁷‖q‖‖x‖. On standard-normal data
/// (N = 65 536, 256 queries, D = 512 and 1 280, k = 1 and 5; the certification test simulated
/// in numpy) 32 certified every query; 24 left 3% of them uncertified at D = 1 280, k = 5, and
/// 16 left 15–23%. The distance bench (k = 1, 2 048 queries) certifies all of them.
pub const MARGIN: usize = 32;

/// Whether this CPU has the bf16 kernel (AVX512-BF16); without it a bf16 search runs in f32.
pub fn available() -> bool {
    super::bf16_kernel::available()
}

/// The bf16 search of validated L2 or cosine input (f32 when the kernel is not available);
/// `max_norm` is the largest candidate L2 norm for L2 (else 0).
pub(super) fn search(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    max_norm: f64,
) -> Neighbors {
    let problem = cpu::Problem::keeping(queries, candidates, dim, s, MARGIN);
    let Some(found) = cpu::search_bf16(&problem) else {
        return super::search_host_f32(queries, candidates, dim, s, max_norm);
    };
    let pre = Preselected::of(&problem, found);
    let bounds = exact::Bounds::with_max_norm(s.metric, dim, KeyArith::Bf16, max_norm);
    let (mut out, uncertified) = exact::rerank(queries, dim, s, &pre, &bounds, |slot| {
        let c = pre.indices[slot] as usize;
        &candidates[c * dim..(c + 1) * dim]
    });
    if !uncertified.is_empty() {
        super::note_host_f32(uncertified.len());
        search_again_f32(
            &mut out,
            queries,
            candidates,
            dim,
            s,
            max_norm,
            &uncertified,
        );
    }
    out
}

/// Fills the `which` queries of `out` with the f32 search of those queries alone.
fn search_again_f32(
    out: &mut Neighbors,
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    max_norm: f64,
    which: &[usize],
) {
    let rows: Vec<f32> = which
        .par_iter()
        .flat_map_iter(|&q| queries[q * dim..(q + 1) * dim].iter().copied())
        .collect();
    let classes: Option<(Vec<i64>, &[i64])> = s
        .other_class
        .map(|(qc, cc)| (which.iter().map(|&q| qc[q]).collect(), cc));
    let sub = Search {
        other_class: classes.as_ref().map(|(qc, cc)| (&qc[..], *cc)),
        precision: Precision::F32,
        ..*s
    };
    let found = super::search_host_f32(&rows, candidates, dim, &sub, max_norm);
    let k = s.k;
    for (j, &q) in which.iter().enumerate() {
        out.indices[q * k..(q + 1) * k].copy_from_slice(&found.indices[j * k..(j + 1) * k]);
        out.values[q * k..(q + 1) * k].copy_from_slice(&found.values[j * k..(j + 1) * k]);
    }
}
