//! The AVX512-BF16 dot-product tile kernel of the bf16 pre-selection (std only, so that it can
//! be timed on its own).
//!
//! Layout. A row of D values is stored as ⌈D/2⌉ 32-bit words, each a pair of bf16 values
//! (element 2p in the low half, 2p + 1 in the high half, a zero pads an odd D): the unit that
//! `vdpbf16ps` consumes, `acc[lane] += a.lo·b.lo + a.hi·b.hi` in f32. Candidates are packed in
//! panels of [`PANEL`] rows, pair-major: word `p·PANEL + c` is pair p of the panel's row c, so
//! one step of the kernel loads the pair p of 64 candidates as four 16-lane vectors. Query rows
//! stay row-major; the kernel broadcasts one word (pair) of a query at a time.
//!
//! Kernel: [`MR`] query rows × [`PANEL`] candidates accumulate in 24 zmm registers over the
//! whole dimension (4 vector loads and 6 broadcasts per 24 `vdpbf16ps`), then store.

// Off x86-64 only the packing helpers are used (the kernel is never available there).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Candidates per packed panel (four 16-lane vectors).
pub const PANEL: usize = 64;
/// Query rows per kernel call.
pub const MR: usize = 6;

/// f32 → bf16, round to nearest, ties to even (the bits of a finite f32; a value that would
/// round past the largest finite bf16 becomes infinity, which validated inputs never reach).
pub fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Words (bf16 pairs) per row of `dim` values.
pub fn pairs(dim: usize) -> usize {
    dim.div_ceil(2)
}

/// One row as bf16 pairs (`out.len() == pairs(row.len())`).
pub fn pack_row(row: &[f32], out: &mut [u32]) {
    for (w, pair) in out.iter_mut().zip(row.chunks(2)) {
        let lo = u32::from(to_bf16(pair[0]));
        let hi = pair.get(1).map_or(0, |&v| u32::from(to_bf16(v)));
        *w = lo | (hi << 16);
    }
}

/// Packs up to [`PANEL`] rows (`rows`, row-major, `dim` columns) into one panel of
/// `pairs(dim) · PANEL` words; missing rows are zeros.
pub fn pack_panel(rows: &[f32], dim: usize, out: &mut [u32]) {
    debug_assert_eq!(out.len(), pairs(dim) * PANEL);
    if rows.len() < PANEL * dim {
        out.fill(0);
    }
    for (c, row) in rows.chunks_exact(dim).enumerate() {
        let mut words = row.chunks_exact(2);
        for (p, pair) in words.by_ref().enumerate() {
            out[p * PANEL + c] = u32::from(to_bf16(pair[0])) | (u32::from(to_bf16(pair[1])) << 16);
        }
        if let [last] = words.remainder() {
            out[(dim / 2) * PANEL + c] = u32::from(to_bf16(*last));
        }
    }
}

/// Whether this CPU runs the kernel (AVX512-F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r·out_stride + c] = q_r · x_c` (bf16 products, f32 sums) for the `rows` ≤ [`MR`] query
/// rows at `q` (each `d2` words) and every candidate c of the `panels` consecutive packed
/// panels at `x` (column `j·PANEL + c` for panel j).
///
/// # Safety
/// [`available`] must be true; `q` must hold `rows · d2` words, `x` `panels · d2 · PANEL`, and
/// `out` `(rows − 1) · out_stride + panels · PANEL` floats.
#[cfg(target_arch = "x86_64")]
pub unsafe fn dots(
    q: &[u32],
    rows: usize,
    x: &[u32],
    panels: usize,
    d2: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    debug_assert!(rows <= MR && q.len() >= rows * d2 && x.len() >= panels * d2 * PANEL);
    debug_assert!(rows == 0 || out.len() >= (rows - 1) * out_stride + panels * PANEL);
    let none = Epilogue {
        norms: std::ptr::null(),
        thresholds: [0.0; MR],
        hits: std::ptr::null_mut(),
    };
    for j in 0..panels {
        let panel = x.as_ptr().add(j * d2 * PANEL);
        let o = out.as_mut_ptr().add(j * PANEL);
        run_block::<false>(rows, q.as_ptr(), panel, d2, o, out_stride, &none, 0);
    }
}

/// Like [`dots`], but stores ranking keys, "smaller is closer", and flags the candidates whose
/// key is at or below their query's threshold: key `norms[c] − 2·q_r·x_c` (L2, `norms` the
/// tile's squared candidate norms, one per column) or `−q_r·x_c` (cosine, `norms` = `None`);
/// bit c of `hits[r·panels + j]` is set when candidate c of panel j has key ≤
/// `thresholds[r]`. The comparison runs on the accumulators, so a caller reads only the
/// flagged keys.
///
/// # Safety
/// As [`dots`]; `norms` (when given) must hold `panels · PANEL` floats, `thresholds` `rows`,
/// and `hits` `rows · panels`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn keys(
    q: &[u32],
    rows: usize,
    x: &[u32],
    panels: usize,
    d2: usize,
    norms: Option<&[f32]>,
    thresholds: &[f32],
    out: &mut [f32],
    out_stride: usize,
    hits: &mut [u64],
) {
    debug_assert!(rows <= MR && q.len() >= rows * d2 && x.len() >= panels * d2 * PANEL);
    debug_assert!(rows == 0 || out.len() >= (rows - 1) * out_stride + panels * PANEL);
    debug_assert!(thresholds.len() >= rows && hits.len() >= rows * panels);
    debug_assert!(norms.is_none_or(|n| n.len() >= panels * PANEL));
    let mut e = Epilogue {
        norms: std::ptr::null(),
        thresholds: [0.0; MR],
        hits: hits.as_mut_ptr(),
    };
    e.thresholds[..rows].copy_from_slice(&thresholds[..rows]);
    for j in 0..panels {
        let panel = x.as_ptr().add(j * d2 * PANEL);
        let o = out.as_mut_ptr().add(j * PANEL);
        e.norms = norms.map_or(std::ptr::null(), |n| n.as_ptr().add(j * PANEL));
        e.hits = hits.as_mut_ptr().add(j);
        run_block::<true>(rows, q.as_ptr(), panel, d2, o, out_stride, &e, panels);
    }
}

/// The key epilogue's inputs for one panel.
struct Epilogue {
    /// The panel's squared candidate norms (L2), or null (cosine).
    norms: *const f32,
    thresholds: [f32; MR],
    /// The panel's hit mask of row 0; row r's is `hits_stride` masks further.
    hits: *mut u64,
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_block<const KEYS: bool>(
    rows: usize,
    q: *const u32,
    panel: *const u32,
    d2: usize,
    out: *mut f32,
    out_stride: usize,
    e: &Epilogue,
    hits_stride: usize,
) {
    match rows {
        6 => block::<6, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        5 => block::<5, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        4 => block::<4, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        3 => block::<3, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        2 => block::<2, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        1 => block::<1, KEYS>(q, panel, d2, out, out_stride, e, hits_stride),
        _ => {}
    }
}

/// R query rows × one panel, accumulated in registers over all `d2` pairs; stores the dot
/// products, or with `KEYS` the keys and hit masks of [`keys`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const R: usize, const KEYS: bool>(
    q: *const u32,
    panel: *const u32,
    d2: usize,
    out: *mut f32,
    out_stride: usize,
    e: &Epilogue,
    hits_stride: usize,
) {
    const NV: usize = PANEL / 16;
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for p in 0..d2 {
        let step = panel.add(p * PANEL);
        let mut b = [_mm512_setzero_si512(); NV];
        for (v, bv) in b.iter_mut().enumerate() {
            *bv = _mm512_loadu_si512(step.add(v * 16).cast());
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*q.add(r * d2 + p) as i32));
            for (v, av) in row.iter_mut().enumerate() {
                *av = _mm512_dpbf16_ps(*av, a, std::mem::transmute::<__m512i, __m512bh>(b[v]));
            }
        }
    }
    if !KEYS {
        for (r, row) in acc.iter().enumerate() {
            for (v, av) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * out_stride + v * 16), *av);
            }
        }
        return;
    }
    let mut norms = [_mm512_setzero_ps(); NV];
    if !e.norms.is_null() {
        for (v, n) in norms.iter_mut().enumerate() {
            *n = _mm512_loadu_ps(e.norms.add(v * 16));
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let threshold = _mm512_set1_ps(e.thresholds[r]);
        let mut mask = 0u64;
        for (v, av) in row.iter().enumerate() {
            // ‖x‖² − (d + d) is ‖x‖² − 2d exactly as in f32; 0 − d for cosine.
            let key = _mm512_sub_ps(norms[v], _mm512_add_ps(*av, *av));
            let key = if e.norms.is_null() {
                _mm512_sub_ps(norms[v], *av)
            } else {
                key
            };
            _mm512_storeu_ps(out.add(r * out_stride + v * 16), key);
            let m = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(key, threshold);
            mask |= u64::from(m) << (16 * v);
        }
        *e.hits.add(r * hits_stride) = mask;
    }
}
