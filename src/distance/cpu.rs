//! The CPU search: query blocks × candidate chunks on rayon, each keeping a running top-k.
//!
//! L2 and cosine: a GEMM per (query block, candidate block) tile into a small scratch, then a
//! fused epilogue (`‖x‖² − 2q·x`, or `−q̂·x̂`) feeding the top-k; the Q×N matrix never exists.
//! L1: the SIMD kernel of [`super::l1_simd`] over candidate tiles that stay in cache.
//! bf16 pre-selection (L2, cosine): the AVX512-BF16 kernel of [`super::bf16_kernel`] over
//! packed candidate tiles, [`bf16_kernel::MR`] queries at a time, into the same epilogue.
//! Keys are "smaller is better"; [`super`] turns them into exact distances afterwards.

use rayon::prelude::*;

use super::bf16_kernel::{self, PANEL};
use super::l1_simd;
use super::topk::RunningTopK;
use super::Metric;

/// Query rows per block.
const QUERY_BLOCK: usize = 512;
/// Candidate rows per GEMM tile (scratch = QUERY_BLOCK × CANDIDATE_BLOCK floats, 1 MiB;
/// 512 × 512 measured fastest here, ahead of 128–384 query rows or 256–2048 candidates).
const CANDIDATE_BLOCK: usize = 512;
/// Candidate rows per L1 tile (64 × D floats stay in L2 for D ≤ 1280).
const L1_TILE: usize = 64;
/// Candidate rows per bf16 tile (a multiple of [`PANEL`]; 256 × D bf16 values, 640 KiB at
/// D = 1280, stay in L2 while every query of the block streams past them).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const BF16_TILE: usize = 256;
/// Query rows per bf16 work unit: each unit packs its candidates' tiles once per block, so
/// large blocks pack each candidate once (a unit's running top-k is block × kept entries).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const BF16_QUERY_BLOCK: usize = 4096;

/// A search over row-major f32 matrices.
pub struct Problem<'a> {
    pub queries: &'a [f32],
    pub candidates: &'a [f32],
    pub dim: usize,
    pub k: usize,
    pub metric: Metric,
    /// (query classes, candidate classes) for the other-class constraint.
    pub classes: Option<(&'a [i64], &'a [i64])>,
}

impl<'a> Problem<'a> {
    /// The pre-selection of search `s` keeping `k + margin` candidates per query (all of them
    /// when there are fewer).
    pub fn keeping(
        queries: &'a [f32],
        candidates: &'a [f32],
        dim: usize,
        s: &super::Search<'a>,
        margin: usize,
    ) -> Self {
        Self {
            queries,
            candidates,
            dim,
            k: (s.k + margin).min(candidates.len() / dim),
            metric: s.metric,
            classes: s.other_class,
        }
    }

    fn n_queries(&self) -> usize {
        self.queries.len() / self.dim
    }
    /// The number of candidate rows.
    pub fn n_candidates(&self) -> usize {
        self.candidates.len() / self.dim
    }
}

/// Rows scaled to unit L2 norm (the caller rejects zero rows).
pub fn normalise_rows(m: &[f32], dim: usize) -> Vec<f32> {
    let mut out = m.to_vec();
    out.par_chunks_mut(dim).for_each(normalise_row);
    out
}

/// One row scaled to unit L2 norm, in place (the same bits whichever way rows are grouped).
fn normalise_row(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    row.iter_mut().for_each(|v| *v /= norm);
}

fn sq_norms(m: &[f32], dim: usize) -> Vec<f32> {
    m.par_chunks(dim)
        .map(|row| row.iter().map(|v| v * v).sum())
        .collect()
}

/// One unit of work: a block of queries against a range of candidates.
struct Work {
    q0: usize,
    q1: usize,
    c0: usize,
    c1: usize,
}

/// Top-k keys and indices, [Q × k] each, sorted best first per query.
pub fn search(p: &Problem) -> (Vec<f32>, Vec<i64>) {
    run(p, &Prepared::new(p), QUERY_BLOCK)
}

/// [`search`] with bf16 dot products (L2 and cosine), or `None` when the CPU lacks the kernel
/// ([`bf16_kernel::available`]). Keys are those of [`search`] up to bf16 rounding, bounded by
/// [`super::exact::bf16_dot_error`].
pub fn search_bf16(p: &Problem) -> Option<(Vec<f32>, Vec<i64>)> {
    if !cfg!(target_arch = "x86_64") || !bf16_kernel::available() || p.metric == Metric::L1 {
        return None;
    }
    let mut prepared = Prepared::new(p);
    prepared.bf16 = Some(Packed::new(p, prepared.queries.as_deref()));
    Some(run(p, &prepared, BF16_QUERY_BLOCK))
}

fn run(p: &Problem, prepared: &Prepared, query_block: usize) -> (Vec<f32>, Vec<i64>) {
    let (nq, nc, k) = (p.n_queries(), p.n_candidates(), p.k);
    // Enough pieces for every thread even when there are few query blocks.
    let q_blocks = nq.div_ceil(query_block);
    let wanted = (2 * rayon::current_num_threads()).div_ceil(q_blocks.max(1));
    let chunks = wanted.clamp(1, nc.div_ceil(CANDIDATE_BLOCK).max(1));
    // Chunks start on a packed panel (bf16).
    let chunk_len = nc.div_ceil(chunks).next_multiple_of(PANEL);
    let work: Vec<Work> = (0..q_blocks)
        .flat_map(|b| {
            (0..chunks).map(move |c| Work {
                q0: b * query_block,
                q1: ((b + 1) * query_block).min(nq),
                c0: c * chunk_len,
                c1: ((c + 1) * chunk_len).min(nc),
            })
        })
        .filter(|w| w.c0 < w.c1)
        .collect();

    let partial: Vec<(Vec<f32>, Vec<i64>)> = work.par_iter().map(|w| prepared.run(p, w)).collect();

    // Merge the chunks of each query block.
    let mut keys = vec![f32::INFINITY; nq * k];
    let mut idx = vec![-1i64; nq * k];
    for (w, (pk, pi)) in work.iter().zip(&partial) {
        for (row, q) in (w.q0..w.q1).enumerate() {
            let mut top =
                RunningTopK::resume(&mut keys[q * k..(q + 1) * k], &mut idx[q * k..(q + 1) * k]);
            for j in 0..k {
                if pi[row * k + j] >= 0 {
                    top.push(pk[row * k + j], pi[row * k + j]);
                }
            }
        }
    }
    (keys, idx)
}

/// Per-search data derived once: normalised query rows for cosine, squared candidate norms for
/// L2. Candidate rows are never copied as a whole (a memory-mapped matrix stays in the file):
/// cosine normalises each candidate tile into a scratch buffer as it goes.
struct Prepared {
    queries: Option<Vec<f32>>,
    cand_sq_norms: Vec<f32>,
    /// Packed bf16 rows when the dot products are bf16's.
    bf16: Option<Packed>,
}

/// Query rows rounded to bf16 and packed for [`bf16_kernel::dots`] (cosine rows normalised in
/// f32 first). Candidates are packed tile by tile as the work units reach them.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Packed {
    /// Words (bf16 pairs) per row.
    d2: usize,
    /// [Q × d2].
    queries: Vec<u32>,
}

impl Packed {
    /// `normalised`: the queries already normalised (cosine).
    fn new(p: &Problem, normalised: Option<&[f32]>) -> Self {
        let (d, d2) = (p.dim, bf16_kernel::pairs(p.dim));
        let qs = normalised.unwrap_or(p.queries);
        let mut queries = vec![0u32; p.n_queries() * d2];
        queries
            .par_chunks_mut(d2)
            .zip(qs.par_chunks(d))
            .for_each(|(out, row)| bf16_kernel::pack_row(row, out));
        Self { d2, queries }
    }
}

impl Prepared {
    fn new(p: &Problem) -> Self {
        match p.metric {
            Metric::Cosine => Self {
                queries: Some(normalise_rows(p.queries, p.dim)),
                cand_sq_norms: Vec::new(),
                bf16: None,
            },
            Metric::L2 => Self {
                queries: None,
                cand_sq_norms: sq_norms(p.candidates, p.dim),
                bf16: None,
            },
            Metric::L1 => Self {
                queries: None,
                cand_sq_norms: Vec::new(),
                bf16: None,
            },
        }
    }

    fn run(&self, p: &Problem, w: &Work) -> (Vec<f32>, Vec<i64>) {
        let k = p.k;
        let rows = w.q1 - w.q0;
        let same_class = |q: usize, c: usize| p.classes.is_some_and(|(qc, cc)| qc[q] == cc[c]);
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = &self.bf16 {
            return run_bf16(p, packed, &self.cand_sq_norms, w, |q, c| !same_class(q, c));
        }
        let mut keys = vec![0f32; rows * k];
        let mut idx = vec![0i64; rows * k];
        let mut tops: Vec<RunningTopK> = keys
            .chunks_mut(k)
            .zip(idx.chunks_mut(k))
            .map(|(kk, ii)| RunningTopK::new(kk, ii))
            .collect();
        match p.metric {
            Metric::L1 => {
                let kernel = l1_simd::select_2x4();
                let d = p.dim;
                let row_of = |i: usize| &p.candidates[i * d..(i + 1) * d];
                for t0 in (w.c0..w.c1).step_by(L1_TILE) {
                    let t1 = (t0 + L1_TILE).min(w.c1);
                    // Two queries at a time (the last one paired with itself when odd).
                    for r0 in (0..rows).step_by(2) {
                        let r1 = (r0 + 1).min(rows - 1);
                        let (qa, qb) = (w.q0 + r0, w.q0 + r1);
                        let qv = [
                            &p.queries[qa * d..(qa + 1) * d],
                            &p.queries[qb * d..(qb + 1) * d],
                        ];
                        for c in (t0..t1).step_by(4) {
                            // Pad the last group of a tile with its last candidate.
                            let ids = [
                                c,
                                (c + 1).min(t1 - 1),
                                (c + 2).min(t1 - 1),
                                (c + 3).min(t1 - 1),
                            ];
                            let dist = kernel(qv, ids.map(row_of));
                            for (r, q) in
                                [(r0, qa), (r1, qb)]
                                    .into_iter()
                                    .take(if r1 > r0 { 2 } else { 1 })
                            {
                                let top = &mut tops[r];
                                for (lane, &i) in ids.iter().enumerate().take(t1 - c) {
                                    let v = dist[r - r0][lane];
                                    if v <= top.threshold() && !same_class(q, i) {
                                        top.push(v, i as i64);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Metric::L2 | Metric::Cosine => {
                let norms = &self.cand_sq_norms;
                let offer = |top: &mut RunningTopK, q: usize, dots: &[f32], base: usize| {
                    offer_dots(top, dots, base, p.metric, norms, |c| !same_class(q, c))
                };
                {
                    let qs = match p.metric {
                        Metric::Cosine => self.queries.as_deref().unwrap_or(p.queries),
                        _ => p.queries,
                    };
                    let d = p.dim;
                    let mut scratch = vec![0f32; rows * CANDIDATE_BLOCK];
                    let mut unit = match p.metric {
                        Metric::Cosine => vec![0f32; CANDIDATE_BLOCK * d],
                        _ => Vec::new(),
                    };
                    for b0 in (w.c0..w.c1).step_by(CANDIDATE_BLOCK) {
                        let b1 = (b0 + CANDIDATE_BLOCK).min(w.c1);
                        let cols = b1 - b0;
                        let tile = &p.candidates[b0 * d..b1 * d];
                        let tile = if p.metric == Metric::Cosine {
                            let unit = &mut unit[..cols * d];
                            unit.copy_from_slice(tile);
                            unit.chunks_mut(d).for_each(normalise_row);
                            &*unit
                        } else {
                            tile
                        };
                        gemm_tile(
                            &qs[w.q0 * d..w.q1 * d],
                            tile,
                            d,
                            &mut scratch[..rows * cols],
                        );
                        for (row, top) in tops.iter_mut().enumerate() {
                            offer(top, w.q0 + row, &scratch[row * cols..(row + 1) * cols], b0);
                        }
                    }
                }
            }
        }
        drop(tops);
        (keys, idx)
    }
}

/// The bf16 pre-selection of a work unit: each [`BF16_TILE`] of candidates packed (normalised
/// first for cosine), then [`bf16_kernel::MR`] queries at a time against it; the kernel
/// compares the keys with each query's threshold in registers, so only the flagged keys are
/// read and offered (`eligible(query, candidate)`: the other-class rule).
#[cfg(target_arch = "x86_64")]
fn run_bf16(
    p: &Problem,
    packed: &Packed,
    norms: &[f32],
    w: &Work,
    eligible: impl Fn(usize, usize) -> bool,
) -> (Vec<f32>, Vec<i64>) {
    use bf16_kernel::MR;
    let (d, d2) = (p.dim, packed.d2);
    let rows = w.q1 - w.q0;
    let mut tops: Vec<LazyTopK> = (0..rows).map(|_| LazyTopK::new(p.k)).collect();
    let l2 = p.metric == Metric::L2;
    let mut scratch = vec![0f32; MR * BF16_TILE];
    let mut tile = vec![0u32; BF16_TILE * d2];
    let mut tile_norms = vec![f32::INFINITY; BF16_TILE];
    let mut hits = [0u64; MR * BF16_TILE / PANEL];
    let mut unit = match p.metric {
        Metric::Cosine => vec![0f32; PANEL * d],
        _ => Vec::new(),
    };
    for b0 in (w.c0..w.c1).step_by(BF16_TILE) {
        let cols = (b0 + BF16_TILE).min(w.c1) - b0;
        let panels = cols.div_ceil(PANEL);
        let x = &mut tile[..panels * d2 * PANEL];
        for (j, panel) in x.chunks_mut(d2 * PANEL).enumerate() {
            let r0 = b0 + j * PANEL;
            let r1 = (r0 + PANEL).min(b0 + cols);
            let src = &p.candidates[r0 * d..r1 * d];
            if p.metric == Metric::Cosine {
                let unit = &mut unit[..src.len()];
                unit.copy_from_slice(src);
                unit.chunks_mut(d).for_each(normalise_row);
                bf16_kernel::pack_panel(unit, d, panel);
            } else {
                bf16_kernel::pack_panel(src, d, panel);
            }
        }
        let x = &*x;
        let stride = panels * PANEL;
        if l2 {
            tile_norms[..cols].copy_from_slice(&norms[b0..b0 + cols]);
            tile_norms[cols..].fill(f32::INFINITY);
        }
        let tile_norms = l2.then_some(&tile_norms[..stride]);
        for r0 in (0..rows).step_by(MR) {
            let n = MR.min(rows - r0);
            let q = &packed.queries[(w.q0 + r0) * d2..(w.q0 + r0 + n) * d2];
            let mut thresholds = [0f32; MR];
            for (t, top) in thresholds.iter_mut().zip(&tops[r0..r0 + n]) {
                *t = top.threshold();
            }
            // SAFETY: `search_bf16` packs rows only when `bf16_kernel::available()`; `q` holds
            // n rows of d2 words, `x` `panels` panels, the norms `stride` values, the scratch
            // n rows of `stride`, and `hits` n × panels masks.
            unsafe {
                bf16_kernel::keys(
                    q,
                    n,
                    x,
                    panels,
                    d2,
                    tile_norms,
                    &thresholds,
                    &mut scratch,
                    stride,
                    &mut hits,
                )
            };
            for r in 0..n {
                let (top, query) = (&mut tops[r0 + r], w.q0 + r0 + r);
                let keys = &scratch[r * stride..(r + 1) * stride];
                for (j, &mask) in hits[r * panels..(r + 1) * panels].iter().enumerate() {
                    let mut mask = mask;
                    // Lowest column first; the threshold only falls as keys enter.
                    while mask != 0 {
                        let col = j * PANEL + mask.trailing_zeros() as usize;
                        mask &= mask - 1;
                        if col >= cols {
                            break;
                        }
                        let c = b0 + col;
                        if keys[col] <= top.threshold() && eligible(query, c) {
                            top.push(keys[col], c as i64);
                        }
                    }
                }
            }
        }
    }
    let mut keys = vec![0f32; rows * p.k];
    let mut idx = vec![0i64; rows * p.k];
    for ((top, kk), ii) in tops
        .into_iter()
        .zip(keys.chunks_mut(p.k))
        .zip(idx.chunks_mut(p.k))
    {
        top.finish(kk, ii);
    }
    (keys, idx)
}

/// A running top-k for a wide k (the bf16 pre-selection keeps k + 32): candidates at or under
/// the threshold are appended, and the k best by (key, index) selected (not sorted) only when
/// the buffer of 3k + 16 fills, instead of an insertion per candidate; sorted at the end. Same
/// result as [`RunningTopK`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct LazyTopK {
    k: usize,
    items: Vec<(f32, i64)>,
    threshold: f32,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl LazyTopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(3 * k + 16),
            threshold: f32::INFINITY,
        }
    }

    /// The key a candidate must reach (ties are settled by index when the buffer is cut).
    #[inline]
    fn threshold(&self) -> f32 {
        self.threshold
    }

    #[inline]
    fn push(&mut self, key: f32, index: i64) {
        self.items.push((key, index));
        if self.items.len() == self.items.capacity() {
            self.cut();
        }
    }

    fn cut(&mut self) {
        let order = |a: &(f32, i64), b: &(f32, i64)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if self.items.len() > self.k {
            self.items.select_nth_unstable_by(self.k - 1, order);
            self.items.truncate(self.k);
        }
        if self.items.len() == self.k {
            // The k-th best: the largest of the k kept.
            self.threshold = self.items.iter().fold(f32::NEG_INFINITY, |m, i| m.max(i.0));
        }
    }

    /// Writes the k best, best first, into `keys` and `indices` (+∞ and −1 when fewer).
    fn finish(mut self, keys: &mut [f32], indices: &mut [i64]) {
        self.cut();
        self.items
            .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        keys.fill(f32::INFINITY);
        indices.fill(-1);
        for (j, &(key, index)) in self.items.iter().enumerate() {
            keys[j] = key;
            indices[j] = index;
        }
    }
}

/// Offers one query's candidates `base..base + dots.len()`, given their dot products with it,
/// to its top-k: key `‖x‖² − 2q·x` (L2, `norms` the squared candidate norms) or `−q̂·x̂`
/// (cosine), `eligible(c)` applying the other-class rule.
#[inline]
fn offer_dots(
    top: &mut RunningTopK,
    dots: &[f32],
    base: usize,
    metric: Metric,
    norms: &[f32],
    eligible: impl Fn(usize) -> bool,
) {
    // Keys 16 at a time in fixed-size arrays, so that the key computation and the "any key at
    // or below the threshold?" test compile to a few vector instructions; pushes are rare.
    let mut chunks = dots.chunks_exact(16);
    for (chunk, ds) in chunks.by_ref().enumerate() {
        let base = base + chunk * 16;
        let ds: &[f32; 16] = ds.try_into().expect("chunks of 16");
        let mut keys = [0f32; 16];
        match metric {
            Metric::L2 => {
                let ns: &[f32; 16] = norms[base..base + 16].try_into().expect("16 norms");
                for j in 0..16 {
                    keys[j] = ns[j] - 2.0 * ds[j];
                }
            }
            _ => {
                for j in 0..16 {
                    keys[j] = -ds[j];
                }
            }
        }
        let threshold = top.threshold();
        let mut hits = 0u32;
        for (j, &key) in keys.iter().enumerate() {
            hits |= u32::from(key <= threshold) << j;
        }
        // Only the keys at or below the threshold, lowest index first (the threshold can only
        // fall as they enter).
        while hits != 0 {
            let j = hits.trailing_zeros() as usize;
            hits &= hits - 1;
            let c = base + j;
            if keys[j] <= top.threshold() && eligible(c) {
                top.push(keys[j], c as i64);
            }
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let base = base + (dots.len() - rest.len());
        let keys: Vec<f32> = match metric {
            Metric::L2 => rest
                .iter()
                .zip(&norms[base..base + rest.len()])
                .map(|(&d, &n)| n - 2.0 * d)
                .collect(),
            _ => rest.iter().map(|&d| -d).collect(),
        };
        push_keys(top, &keys, base, &eligible);
    }
}

/// Pushes the keys of candidates `base..` that reach the threshold (and are eligible).
#[inline]
fn push_keys(top: &mut RunningTopK, keys: &[f32], base: usize, eligible: impl Fn(usize) -> bool) {
    for (j, &key) in keys.iter().enumerate() {
        let c = base + j;
        if key <= top.threshold() && eligible(c) {
            top.push(key, c as i64);
        }
    }
}

/// `out[i][j] = q_i · x_j` for `q` [m × d] and `x` [n × d], single-threaded (the caller
/// parallelises over tiles).
fn gemm_tile(q: &[f32], x: &[f32], d: usize, out: &mut [f32]) {
    let m = q.len() / d;
    let n = x.len() / d;
    debug_assert_eq!(out.len(), m * n);
    // SAFETY: dst is m×n row-major (row stride n, column stride 1); lhs is q, m×d row-major;
    // rhs is xᵀ, d×n, read from x (n×d row-major) with row stride 1 and column stride d. All
    // pointers cover exactly these extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            d,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            x.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
