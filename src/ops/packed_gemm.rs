//! The matrix product of a dense (1×1 or im2col) convolution with its bias, activation and an
//! optional residual fused into the product's last pass: `out = act(a · wᵀ + bias [+ res])`.
//!
//! Weights do not change between images, so they are packed once ([`PackedWeight`]): panels of
//! [`PANEL`] output channels, each `[k, PANEL]`, so the AVX-512 kernel loads one panel row per
//! step and broadcasts the activations (`a`, pixels × input channels, read in place). A tile
//! of up to 12 pixels × 2 panels keeps 24 accumulators in registers; the bias, residual and
//! clamp are applied before the tile is stored, so the output is written once. Without
//! AVX-512 the product goes through the `gemm` crate and the epilogue is a second pass.

use super::nhwc::{self, Act};

/// Output channels per packed panel (one AVX-512 register).
pub const PANEL: usize = 16;
/// Most pixel rows per register tile.
const MR: usize = 12;
/// The deepest product the fused kernel takes: it does not split the depth, so a tile's rows
/// (12 × k floats) must stay near L1. Deeper ones (ResNet's 3×3 convolutions past 128
/// channels) keep the `gemm` crate, which blocks the depth.
pub const MAX_K: usize = 1024;
/// Floats of `a` per row block (256 KiB: the block stays in L2 while every panel passes).
const BLOCK_FLOATS: usize = 64 * 1024;

/// A `[n, k]` weight (output channels × inputs) packed for the fused kernel: panel `p` holds
/// columns `p·16 .. p·16 + 16` as `[k, 16]`, the last panel padded with zeros.
#[derive(Debug, Clone, Default)]
pub struct PackedWeight {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs `w` (`[n, k]` row-major).
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert!(
            w.len() >= n * k,
            "PackedWeight: {} floats for [{n}, {k}]",
            w.len()
        );
        let mut packed = Self {
            data: vec![0f32; n.div_ceil(PANEL) * k * PANEL],
            n,
            k,
        };
        packed.fill(w);
        packed
    }

    /// Packs `w` (the same `[n, k]` shape) into this buffer again, after training changed it.
    pub fn repack(&mut self, w: &[f32]) {
        assert!(
            w.len() >= self.n * self.k,
            "PackedWeight: {} floats for [{}, {}]",
            w.len(),
            self.n,
            self.k
        );
        self.fill(w);
    }

    fn fill(&mut self, w: &[f32]) {
        let k = self.k;
        for (j, row) in w.chunks_exact(k.max(1)).take(self.n).enumerate() {
            let (p, lane) = (j / PANEL, j % PANEL);
            for (kk, v) in row.iter().enumerate() {
                self.data[(p * k + kk) * PANEL + lane] = *v;
            }
        }
    }

    /// A zero `[n, k]` weight, to be filled through [`Self::panel_row_mut`].
    pub fn zeros(n: usize, k: usize) -> Self {
        Self {
            data: vec![0f32; n.div_ceil(PANEL) * k * PANEL],
            n,
            k,
        }
    }

    /// The [`PANEL`] weights of outputs `panel·16 ..` at input `kk` (lanes past `n` are
    /// padding and must stay zero).
    pub fn panel_row_mut(&mut self, panel: usize, kk: usize) -> &mut [f32] {
        &mut self.data[(panel * self.k + kk) * PANEL..][..PANEL]
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per output channel.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Whether this CPU runs the fused kernel (AVX-512F); without it, [`dense_bias_act`] takes the
/// `gemm` crate's product and a second pass.
pub fn fused_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, n] = act(Σ_k a[m, k]·w[j, k] + bias[j] (+ residual[m, j]))` for the `[m, k]`
/// activations `a`: through `packed` (the same weight packed) when given, which needs
/// [`fused_available`]; otherwise through the `gemm` crate and a second pass over `out`.
#[allow(clippy::too_many_arguments)]
pub fn dense_bias_act(
    a: &[f32],
    m: usize,
    weight: &[f32],
    packed: Option<&PackedWeight>,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
) {
    let n = bias.len();
    let k = weight.len().checked_div(n).unwrap_or(0);
    assert!(
        a.len() >= m * k && weight.len() == n * k && out.len() >= m * n,
        "dense_bias_act: buffers too small for [{m}, {k}] x [{n}, {k}]^T"
    );
    if let Some(r) = residual {
        assert!(
            r.len() >= m * n,
            "dense_bias_act: residual shorter than [{m}, {n}]"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = packed {
        assert!(
            p.n == n && p.k == k,
            "dense_bias_act: packed weight is not [{n}, {k}]"
        );
        assert!(
            fused_available(),
            "dense_bias_act: packed weights need AVX-512F"
        );
        // SAFETY: AVX-512F was detected above; the assertions bound every access.
        unsafe { x86::run(a, m, p, bias, residual, act, out) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = packed; // only x86-64 has the fused kernel
    let out = &mut out[..m * n];
    nhwc::matmul_wt(a, weight, out, m, k, n);
    match residual {
        None => nhwc::bias_act_rows(out, bias, act),
        Some(r) => {
            nhwc::bias_act_rows(out, bias, Act::Identity);
            nhwc::add_act(out, &r[..m * n], act);
        }
    }
}

/// `out[m, n] = a · wᵀ + bias` through the packed weight alone (the fused kernel; needs
/// [`fused_available`]).
pub fn packed_bias(a: &[f32], m: usize, packed: &PackedWeight, bias: &[f32], out: &mut [f32]) {
    let (n, k) = (packed.n, packed.k);
    assert!(
        a.len() >= m * k && bias.len() == n && out.len() >= m * n && fused_available(),
        "packed_bias: buffers too small for [{m}, {k}] x [{n}, {k}]^T, or no AVX-512F"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F was detected above; the assertion bounds every access.
    unsafe {
        x86::run(a, m, packed, bias, None, Act::Identity, out)
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // intrinsics are safe in a `target_feature` context on newer compilers
mod x86 {
    use std::arch::x86_64::*;

    use super::{Act, PackedWeight, BLOCK_FLOATS, MR, PANEL};

    /// What a tile's epilogue needs besides its accumulators.
    #[derive(Clone, Copy)]
    struct Epilogue {
        bias: *const f32,
        residual: *const f32,
        /// Row stride of `out` and the residual.
        ldo: usize,
        clamp: bool,
        lo: __m512,
        hi: __m512,
        /// Lanes of the last panel of the tile that are real columns.
        last_mask: __mmask16,
    }

    /// `MR_` rows × `NP` panels: `a` the first row's inputs (row stride `lda`), `w` the first
    /// panel (the next is `k·16` floats on), `out` the tile's first output.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const MR_: usize, const NP: usize>(
        a: *const f32,
        lda: usize,
        w: *const f32,
        k: usize,
        e: Epilogue,
        out: *mut f32,
    ) {
        unsafe {
            let weights = |kk: usize| -> [__m512; NP] {
                std::array::from_fn(|p| _mm512_loadu_ps(w.add(p * k * PANEL + kk * PANEL)))
            };
            // The sums start from the first products (k ≥ 1): not from zeroed accumulators,
            // which the compiler builds in memory for the epilogue with a call to memset.
            let w0 = weights(0);
            let mut acc: [[__m512; NP]; MR_] = std::array::from_fn(|r| {
                let av = _mm512_set1_ps(*a.add(r * lda));
                std::array::from_fn(|p| _mm512_mul_ps(av, w0[p]))
            });
            for kk in 1..k {
                let wv = weights(kk);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    for p in 0..NP {
                        acc[p] = _mm512_fmadd_ps(av, wv[p], acc[p]);
                    }
                }
            }
            let mask = |p: usize| if p + 1 == NP { e.last_mask } else { 0xFFFF };
            let bias: [__m512; NP] =
                std::array::from_fn(|p| _mm512_maskz_loadu_ps(mask(p), e.bias.add(p * PANEL)));
            for (r, acc) in acc.iter().enumerate() {
                for (p, &v) in acc.iter().enumerate() {
                    let mask = mask(p);
                    let at = r * e.ldo + p * PANEL;
                    let mut v = _mm512_add_ps(v, bias[p]);
                    if !e.residual.is_null() {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e.residual.add(at)));
                    }
                    if e.clamp {
                        // A NaN comes through as the second operand (x86 max/min return
                        // it), as `f32::clamp` lets it through: bad weights stay visible.
                        v = _mm512_min_ps(e.hi, _mm512_max_ps(e.lo, v));
                    }
                    if mask == 0xFFFF {
                        _mm512_storeu_ps(out.add(at), v);
                    } else {
                        _mm512_mask_storeu_ps(out.add(at), mask, v);
                    }
                }
            }
        }
    }

    /// One tile of `rows` (1..=MR) rows × `np` (1 or 2) panels.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_dyn(
        rows: usize,
        np: usize,
        a: *const f32,
        lda: usize,
        w: *const f32,
        k: usize,
        e: Epilogue,
        out: *mut f32,
    ) {
        macro_rules! rows {
            ($np:literal) => {
                match rows {
                    1 => tile::<1, $np>(a, lda, w, k, e, out),
                    2 => tile::<2, $np>(a, lda, w, k, e, out),
                    3 => tile::<3, $np>(a, lda, w, k, e, out),
                    4 => tile::<4, $np>(a, lda, w, k, e, out),
                    5 => tile::<5, $np>(a, lda, w, k, e, out),
                    6 => tile::<6, $np>(a, lda, w, k, e, out),
                    7 => tile::<7, $np>(a, lda, w, k, e, out),
                    8 => tile::<8, $np>(a, lda, w, k, e, out),
                    9 => tile::<9, $np>(a, lda, w, k, e, out),
                    10 => tile::<10, $np>(a, lda, w, k, e, out),
                    11 => tile::<11, $np>(a, lda, w, k, e, out),
                    _ => tile::<MR, $np>(a, lda, w, k, e, out),
                }
            };
        }
        unsafe {
            if np == 2 {
                rows!(2)
            } else {
                rows!(1)
            }
        }
    }

    /// The whole product; the caller checked the buffers' sizes and AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run(
        a: &[f32],
        m: usize,
        w: &PackedWeight,
        bias: &[f32],
        residual: Option<&[f32]>,
        act: Act,
        out: &mut [f32],
    ) {
        let (n, k) = (w.n, w.k);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // No products: the epilogue on zero sums (the tiles need k ≥ 1).
            for (r, row) in out[..m * n].chunks_exact_mut(n).enumerate() {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = act.apply(bias[j] + residual.map_or(0.0, |res| res[r * n + j]));
                }
            }
            return;
        }
        let panels = n.div_ceil(PANEL);
        let tail = n - (panels - 1) * PANEL;
        let bias_ptr = bias.as_ptr();
        let (lo, hi) = match act {
            Act::Identity => (f32::NEG_INFINITY, f32::INFINITY),
            Act::Relu => (0.0, f32::INFINITY),
            Act::Relu6 => (0.0, 6.0),
        };
        let block = (BLOCK_FLOATS / k.max(1)).clamp(MR, 1024) / MR * MR;
        unsafe {
            let base = Epilogue {
                bias: bias_ptr,
                residual: std::ptr::null(),
                ldo: n,
                clamp: act != Act::Identity,
                lo: _mm512_set1_ps(lo),
                hi: _mm512_set1_ps(hi),
                last_mask: 0xFFFF,
            };
            let mut r0 = 0;
            while r0 < m {
                let rows_in_block = block.min(m - r0);
                let mut p = 0;
                while p < panels {
                    let np = if panels - p >= 2 { 2 } else { 1 };
                    let last = p + np == panels;
                    let mut e = base;
                    e.bias = bias_ptr.add(p * PANEL);
                    // A partial last panel reads and writes through its mask only.
                    if last && tail < PANEL {
                        e.last_mask = ((1u32 << tail) - 1) as __mmask16;
                    }
                    let wp = w.data.as_ptr().add(p * k * PANEL);
                    let mut r = r0;
                    while r < r0 + rows_in_block {
                        let rows = MR.min(r0 + rows_in_block - r);
                        let mut e = e;
                        if let Some(res) = residual {
                            e.residual = res.as_ptr().add(r * n + p * PANEL);
                        }
                        let o = out.as_mut_ptr().add(r * n + p * PANEL);
                        tile_dyn(rows, np, a.as_ptr().add(r * k), k, wp, k, e, o);
                        r += rows;
                    }
                    p += np;
                }
                r0 += rows_in_block;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..len)
            .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
            .collect()
    }

    /// The product in f64, then the epilogue.
    fn reference(
        a: &[f32],
        w: &[f32],
        b: &[f32],
        res: Option<&[f32]>,
        act: Act,
        m: usize,
    ) -> Vec<f64> {
        let n = b.len();
        let k = w.len() / n;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| a[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                let v = dot + b[j] as f64 + res.map_or(0.0, |r| r[i * n + j] as f64);
                out[i * n + j] = match act {
                    Act::Identity => v,
                    Act::Relu => v.max(0.0),
                    Act::Relu6 => v.clamp(0.0, 6.0),
                };
            }
        }
        out
    }

    #[test]
    fn packing_puts_each_column_in_its_panel_lane() {
        // w = [[1, 2], [3, 4], [5, 6]]: n = 3 (one padded panel), k = 2.
        let p = PackedWeight::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2);
        assert_eq!(p.data.len(), 2 * PANEL);
        assert_eq!(&p.data[..4], &[1.0, 3.0, 5.0, 0.0]);
        assert_eq!(&p.data[PANEL..PANEL + 4], &[2.0, 4.0, 6.0, 0.0]);
        assert!(p.data[3..PANEL].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn exact_on_a_hand_checked_case() {
        // a = [[1, 2]], w = [[3, 4], [-5, 1]], bias [0.5, 1]: a·wᵀ = [11, -3].
        let (a, w, b) = ([1.0, 2.0], [3.0, 4.0, -5.0, 1.0], [0.5, 1.0]);
        let res = [1.0, 0.5];
        type Case<'a> = (Option<&'a [f32]>, Act, [f32; 2]);
        let cases: [Case; 4] = [
            (None, Act::Identity, [11.5, -2.0]),
            (None, Act::Relu, [11.5, 0.0]),
            (None, Act::Relu6, [6.0, 0.0]),
            (Some(&res), Act::Identity, [12.5, -1.5]),
        ];
        let packed = PackedWeight::new(&w, 2, 2);
        for (r, act, want) in cases {
            for p in [None, Some(&packed).filter(|_| fused_available())] {
                let mut out = [0f32; 2];
                dense_bias_act(&a, 1, &w, p, &b, r, act, &mut out);
                assert_eq!(
                    out,
                    want,
                    "{act:?} residual {} packed {}",
                    r.is_some(),
                    p.is_some()
                );
            }
        }
    }

    #[test]
    fn a_nan_stays_nan_through_the_clamp() {
        // One NaN weight poisons its output channel on both paths, as f32::clamp would.
        let (m, k, n) = (3, 4, 20);
        let (a, mut w, b) = (values(m * k, 5), values(n * k, 6), values(n, 7));
        w[17 * k + 2] = f32::NAN;
        let packed = PackedWeight::new(&w, n, k);
        for p in [None, Some(&packed).filter(|_| fused_available())] {
            for act in [Act::Relu, Act::Relu6] {
                let mut out = vec![0f32; m * n];
                dense_bias_act(&a, m, &w, p, &b, None, act, &mut out);
                for (i, v) in out.iter().enumerate() {
                    assert_eq!(
                        v.is_nan(),
                        i % n == 17,
                        "{act:?} packed {}: {i}",
                        p.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn fused_kernel_matches_the_f64_product_at_every_tile_shape() {
        if !fused_available() {
            return;
        }
        // Rows around the 12-row tile and the row block, columns around whole and partial
        // panels and panel pairs, depths from 0 (the epilogue alone) to past a cache line.
        for (m, k, n) in [
            (3, 0, 20),
            (1, 1, 1),
            (5, 3, 16),
            (12, 27, 32),
            (13, 24, 24),
            (25, 96, 40),
            (37, 17, 144),
            (700, 160, 48),
            (8, 1280, 20),
        ] {
            let (a, w, b, res) = (
                values(m * k, 1),
                values(n * k, 2),
                values(n, 3),
                values(m * n, 4),
            );
            let packed = PackedWeight::new(&w, n, k);
            for (residual, act) in [
                (None, Act::Relu6),
                (Some(res.as_slice()), Act::Identity),
                (None, Act::Relu),
            ] {
                let want = reference(&a, &w, &b, residual, act, m);
                let mut out = vec![f32::NAN; m * n + 3];
                dense_bias_act(&a, m, &w, Some(&packed), &b, residual, act, &mut out);
                let mut unfused = vec![0f32; m * n];
                dense_bias_act(&a, m, &w, None, &b, residual, act, &mut unfused);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "[{m},{k},{n}] {i}: {got} vs {want}"
                    );
                    assert!((unfused[i] as f64 - want).abs() <= tol);
                }
                assert!(
                    out[m * n..].iter().all(|v| v.is_nan()),
                    "wrote past [{m}, {n}]"
                );
            }
        }
    }
}
