//! Mixed-precision matrix products for training on the channels-last engine (`--precision
//! bf16`): `dst (+)= lhs · rhs` with both operands rounded to bf16 (to nearest, ties to even)
//! and the products summed in f32, as `vdpbf16ps` (AVX512-BF16) computes them: twice the
//! multiply-adds of an f32 FMA per instruction. It is what PyTorch's CPU autocast to bf16 does
//! to a convolution's operands; the weights, their gradients and the optimiser stay f32.
//!
//! Blocking (Goto's): columns in blocks of [`NC`], depth in blocks of [`KC`]. Per (column,
//! depth) block the right operand is packed into panels of [`PANEL`] columns, pair-major
//! (word `kk·16 + c` holds depth elements 2kk and 2kk + 1 of column c, the unit `vdpbf16ps`
//! consumes). Per [`MC`] rows the left operand is packed row-major (a row's pairs together)
//! when its rows are contiguous in the source, else pair-major (word `kk·MC' + i` for row i),
//! which is a vector copy when its columns are contiguous, as for the transposed output
//! gradient of a weight gradient. A tile of up to 12 rows × 2 panels keeps 24 accumulators in
//! registers; the last depth block adds the bias and residual and clamps before the one store.
//! Subnormal values count as zero (the instruction's rule).

use super::nhwc::{self, Act, ConvGeometry};
use crate::distance::bf16_kernel::{pack_row, to_bf16};

/// Columns per packed panel of the right operand (one AVX-512 register of f32 sums).
pub const PANEL: usize = 16;
/// Most rows per register tile.
const MR: usize = 12;
/// Depth per packed block (128 pairs: a 12-row tile's slice of the left operand is 6 KiB);
/// even, so that a block starts on a pair.
const KC: usize = 256;
const _: () = assert!(KC.is_multiple_of(2));
/// Rows per packed block of the left operand (96 KiB of pairs at full depth, in L2).
const MC: usize = 192;
/// Columns per packed block of the right operand (256 KiB of pairs at full depth, in L2).
const NC: usize = 512;

/// The arithmetic of the engine's training products (`--precision`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 operands and sums (the default).
    #[default]
    F32,
    /// bf16 operands, f32 sums ([`gemm`]); weights, gradients and the optimiser stay f32.
    Bf16,
}

impl Precision {
    /// Whether this is the default, f32 (left out of a checkpoint's fingerprint).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// A read-only matrix view: element `(i, j)` at `data[i · row_stride + j · col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A row-major matrix of `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix of `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Whether a `rows × cols` view stays inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// A right operand `[k, n]` packed once for many products ([`Rhs::Packed`]): a layer's weight
/// between two optimiser steps. Panels of [`PANEL`] columns over the whole depth, pair-major.
#[derive(Debug, Clone, Default)]
pub struct PackedRhs {
    words: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs `rhs` (`[k, n]`); needs [`available`].
    pub fn new(rhs: Strided, k: usize, n: usize) -> Self {
        let mut packed = Self::default();
        packed.repack(rhs, k, n);
        packed
    }

    /// Packs `rhs` (`[k, n]`) into this buffer, reusing its allocation; needs [`available`].
    pub fn repack(&mut self, rhs: Strided, k: usize, n: usize) {
        assert!(
            rhs.fits(k, n),
            "bf16 PackedRhs: the view is too small for [{k}, {n}]"
        );
        assert!(available(), "bf16 PackedRhs: this CPU has no AVX512-BF16");
        let pstride = k.div_ceil(2) * PANEL;
        self.words.clear();
        self.words.resize(n.div_ceil(PANEL) * pstride, 0);
        (self.k, self.n) = (k, n);
        #[cfg(target_arch = "x86_64")]
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // SAFETY: the features were checked; the view fits, and every panel's slice of
            // this depth block lies inside `words` (sized for all panels over the full depth).
            unsafe {
                x86::pack_rhs(
                    &rhs,
                    (pc, kc),
                    (0, n),
                    &mut self.words[pc / 2 * PANEL..],
                    pstride,
                )
            };
        }
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// What the last pass over a tile adds before storing it: `act(sum + bias[j] (+ residual[i, j]))`
/// (the residual in the destination's layout).
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub act: Act,
}

/// Errors unless this CPU can run `precision`'s products (bf16 needs [`available`]).
pub fn check(precision: Precision) -> candle_core::Result<()> {
    if precision == Precision::Bf16 && !available() {
        candle_core::bail!("bf16 products need a CPU with AVX512-BF16, which this one lacks");
    }
    Ok(())
}

/// Errors unless `device` can run `precision`'s products: bf16 runs on a CUDA GPU (candle's
/// bf16 ops, mixed precision) and on a CPU that has the kernel ([`available`]).
pub fn check_on(precision: Precision, device: &candle_core::Device) -> candle_core::Result<()> {
    match device {
        _ if precision == Precision::F32 || device.is_cuda() => Ok(()),
        candle_core::Device::Cpu => check(precision),
        _ => candle_core::bail!(
            "bf16 runs on CUDA GPUs and on CPUs with AVX512-BF16, not on this device"
        ),
    }
}

/// Whether this CPU runs the kernel (AVX512-F, -BW, -VL and -BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The left operand of [`gemm`]: a view, converted to bf16 block by block, or bf16 pairs
/// already, row-major (row i's pairs at `i·⌈k/2⌉`: [`pack_pairs`], [`im2col_hwc_pairs`]), which
/// no product converts again.
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    View(Strided<'a>),
    Pairs(&'a [u32]),
}

/// The right operand of [`gemm`]: a view, converted block by block; packed beforehand
/// ([`PackedRhs`]: a layer's weight between two optimiser steps); or a row-major bf16 matrix
/// `[k, n]`, `n` even, as the words of [`pack_pairs`] / [`im2col_hwc_pairs`] hold it (the
/// im2col matrix of a weight gradient, whose depth runs down the rows).
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    View(Strided<'a>),
    Packed(&'a PackedRhs),
    Bf16(&'a [u32]),
}

/// `dst[i, j] = act((dst[i, j] if accumulate) + Σ_p bf16(lhs(i, p)) · bf16(rhs(p, j)) + bias[j]
/// (+ residual[i, j]))` for `dst` row-major `[m, n]`, the sums in f32; without `epilogue` no
/// bias, residual or activation. Needs [`available`] (panics otherwise: callers check it when
/// the precision is chosen).
pub fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Lhs,
    rhs: Rhs,
    epilogue: Option<Epilogue>,
) {
    let rhs_fits = match rhs {
        Rhs::View(v) => v.fits(k, n),
        Rhs::Packed(p) => p.k == k && p.n == n,
        Rhs::Bf16(w) => n.is_multiple_of(2) && w.len() >= k * n / 2,
    };
    assert!(
        rhs_fits,
        "bf16 gemm: the right operand does not fit [{k}, {n}]"
    );
    let lhs_fits = match lhs {
        Lhs::View(v) => v.fits(m, k),
        Lhs::Pairs(w) => w.len() >= m * k.div_ceil(2),
    };
    assert!(
        dst.len() >= m * n && lhs_fits,
        "bf16 gemm: buffers too small for [{m}, {k}] x [{k}, {n}]"
    );
    if let Some(e) = &epilogue {
        assert!(
            e.bias.len() >= n && e.residual.is_none_or(|r| r.len() >= m * n),
            "bf16 gemm: bias or residual shorter than [{m}, {n}]"
        );
    }
    assert!(available(), "bf16 gemm: this CPU has no AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        let dst = &mut dst[..m * n];
        if !accumulate {
            dst.fill(0.0);
        }
        if let Some(e) = epilogue {
            apply_epilogue(dst, n, &e);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (apack, bpack) = &mut *packs;
        apack.resize(MC.div_ceil(PANEL) * PANEL * KC / 2, 0);
        bpack.resize(NC * KC / 2, 0);
        let left = match &lhs {
            Lhs::View(v) => x86::LeftOp::View(v),
            Lhs::Pairs(w) => x86::LeftOp::Pairs(w),
        };
        let right = match &rhs {
            Rhs::View(v) => x86::Right::View(v),
            Rhs::Packed(p) => x86::Right::Packed(p),
            Rhs::Bf16(w) => x86::Right::Bf16(w, n),
        };
        // SAFETY: the features were detected above; the assertions bound every view, the
        // packs are sized for the largest block, and `dst` aliases nothing it reads.
        unsafe {
            x86::run(
                (m, n, k),
                dst,
                accumulate,
                left,
                right,
                epilogue,
                (apack, bpack),
            )
        }
    });
}

/// `src` as bf16 pairs (word i holds elements 2i and 2i + 1, a zero pads an odd length), the
/// row layout of [`Lhs::Pairs`] and [`Rhs::Bf16`]; `out.len() == ⌈src.len()/2⌉`.
pub fn pack_pairs(src: &[f32], out: &mut [u32]) {
    assert_eq!(
        out.len(),
        src.len().div_ceil(2),
        "pack_pairs: output length"
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were detected; `src` holds `len` floats and `out` their pairs.
        unsafe { x86::pairs_along(src.as_ptr(), src.len(), out.as_mut_ptr()) };
        return;
    }
    pack_row(src, out);
}

/// [`super::nhwc::im2col_hwc`] written straight as bf16 pairs ([`pack_pairs`] of each row),
/// for an even channel count `c` (a tap's channels then never share a pair with the next).
pub fn im2col_hwc_pairs(x: &[f32], c: usize, g: &ConvGeometry, out: &mut [u32]) {
    let row_words = g.kernel * g.kernel * c / 2;
    assert!(
        c.is_multiple_of(2)
            && x.len() >= g.h * g.w * c
            && out.len() >= g.out_h * g.out_w * row_words,
        "im2col_hwc_pairs: an odd channel count or buffers too small"
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were detected; the assertion bounds every row and tap.
        unsafe { x86::im2col_hwc_pairs(x, c, g, out) };
        return;
    }
    nhwc::im2col_hwc_with(x, c, g, out, c / 2, 0, pack_pairs);
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's packing buffers (left, right), reused across products.
    static PACKS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The epilogue on its own, for an empty depth.
fn apply_epilogue(dst: &mut [f32], n: usize, e: &Epilogue) {
    for (i, row) in dst.chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let mut x = *v + e.bias[j];
            if let Some(r) = e.residual {
                x += r[i * n + j];
            }
            *v = e.act.apply(x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // intrinsics are safe in a `target_feature` context on newer compilers
mod x86 {
    use std::arch::x86_64::*;

    use super::{
        nhwc, to_bf16, Act, ConvGeometry, Epilogue, PackedRhs, Strided, KC, MC, MR, NC, PANEL,
    };

    /// The left operand: a view packed block by block, or row-major bf16 pairs.
    #[derive(Clone, Copy)]
    pub enum LeftOp<'a> {
        View(&'a Strided<'a>),
        Pairs(&'a [u32]),
    }

    /// The right operand: a view packed block by block, packed beforehand, or a row-major
    /// bf16 matrix (its values and row length) packed block by block.
    #[derive(Clone, Copy)]
    pub enum Right<'a> {
        View(&'a Strided<'a>),
        Packed(&'a PackedRhs),
        Bf16(&'a [u32], usize),
    }

    /// Where a tile goes and what its store adds.
    #[derive(Clone, Copy)]
    struct TileOut {
        dst: *mut f32,
        /// Row stride of `dst` and the residual.
        ldd: usize,
        /// Add the destination's values (a later depth block, or an accumulating product).
        load: bool,
        /// Bias of the tile's first column, when this is the last depth block with an epilogue.
        bias: *const f32,
        residual: *const f32,
        clamp: bool,
        lo: f32,
        hi: f32,
        /// Lanes of the tile's last panel that are real columns.
        last_mask: __mmask16,
    }

    /// Interleaves `lo`'s and `hi`'s 16 values as bf16 pairs: word t = (lo[t], hi[t]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pair_words(lo: __m512, hi: __m512) -> __m512i {
        unsafe {
            // Low 16 halves: lo converted, high 16: hi converted.
            let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let order = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            _mm512_permutexvar_epi16(order, halves)
        }
    }

    /// Interleaves two rows' 16 (masked) bf16 values as pairs: word t = (row0[t], row1[t]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pairs_across_bf16(
        row0: *const u16,
        row1: Option<*const u16>,
        mask: __mmask16,
    ) -> __m512i {
        unsafe {
            let lo = _mm256_maskz_loadu_epi16(mask, row0.cast());
            let hi = match row1 {
                Some(r) => _mm256_maskz_loadu_epi16(mask, r.cast()),
                None => _mm256_setzero_si256(),
            };
            let halves = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let order = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            _mm512_permutexvar_epi16(order, halves)
        }
    }

    /// Packs rows `pc .. pc + kc`, columns `jc .. jc + nc` of a row-major bf16 matrix (`ld`
    /// values per row) as [`pack_rhs`] does an f32 view.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_rhs_bf16(
        rows: *const u16,
        ld: usize,
        (pc, kc): (usize, usize),
        (jc, nc): (usize, usize),
        out: &mut [u32],
        panel_stride: usize,
    ) {
        let kcp = kc.div_ceil(2);
        unsafe {
            for pp in 0..nc.div_ceil(PANEL) {
                let j0 = jc + pp * PANEL;
                let mask = lane_mask(nc - pp * PANEL);
                for kk in 0..kcp {
                    let p = pc + 2 * kk;
                    let row0 = rows.add(p * ld + j0);
                    let row1 = (2 * kk + 1 < kc).then(|| rows.add((p + 1) * ld + j0));
                    let v = pairs_across_bf16(row0, row1, mask);
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add(pp * panel_stride + kk * PANEL).cast(),
                        v,
                    );
                }
            }
        }
    }

    /// [`super::im2col_hwc_pairs`] with the conversion inlined.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn im2col_hwc_pairs(x: &[f32], c: usize, g: &ConvGeometry, out: &mut [u32]) {
        nhwc::im2col_hwc_with(x, c, g, out, c / 2, 0, |src, dst| unsafe {
            pairs_along(src.as_ptr(), src.len(), dst.as_mut_ptr())
        });
    }

    /// `len` consecutive floats at `src` as ⌈len/2⌉ pair words at `out` (a zero pads an odd
    /// length).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pairs_along(src: *const f32, len: usize, out: *mut u32) {
        unsafe {
            let mut i = 0;
            while i + 32 <= len {
                let lo = _mm512_loadu_ps(src.add(i));
                let hi = _mm512_loadu_ps(src.add(i + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.add(i / 2).cast(), v);
                i += 32;
            }
            let rest = len - i;
            if rest > 0 {
                let mask = |c: usize| ((1u32 << c.min(16)) - 1) as __mmask16;
                let lo = _mm512_maskz_loadu_ps(mask(rest), src.add(i));
                let hi = if rest > 16 {
                    _mm512_maskz_loadu_ps(mask(rest - 16), src.add(i + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(out.add(i / 2).cast(), mask(rest.div_ceil(2)), v);
            }
        }
    }

    /// Pair words of 16 (masked) consecutive values of two rows: `row0` the even depth,
    /// `row1` the odd one (none: zeros past an odd depth).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pairs_across(row0: *const f32, row1: Option<*const f32>, mask: __mmask16) -> __m512i {
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask, row0);
            let hi = match row1 {
                Some(r) => _mm512_maskz_loadu_ps(mask, r),
                None => _mm512_setzero_ps(),
            };
            pair_words(lo, hi)
        }
    }

    fn lane_mask(count: usize) -> __mmask16 {
        if count >= 16 {
            0xFFFF
        } else {
            ((1u32 << count) - 1) as __mmask16
        }
    }

    /// Packs `rhs[pc .. pc + kc, jc .. jc + nc]` into panels `[panel][kc/2][16]` of pair
    /// words, columns past `nc` zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_rhs(
        rhs: &Strided,
        (pc, kc): (usize, usize),
        (jc, nc): (usize, usize),
        out: &mut [u32],
        panel_stride: usize,
    ) {
        let kcp = kc.div_ceil(2);
        debug_assert!(panel_stride >= kcp * PANEL);
        debug_assert!(out.len() >= (nc.div_ceil(PANEL) - 1) * panel_stride + kcp * PANEL);
        let panels = nc.div_ceil(PANEL);
        let base = rhs.data.as_ptr();
        unsafe {
            if rhs.col_stride == 1 {
                for pp in 0..panels {
                    let j0 = jc + pp * PANEL;
                    let mask = lane_mask(nc - pp * PANEL);
                    for kk in 0..kcp {
                        let p = pc + 2 * kk;
                        let row0 = base.add(p * rhs.row_stride + j0);
                        let row1 =
                            (2 * kk + 1 < kc).then(|| base.add((p + 1) * rhs.row_stride + j0));
                        let v = pairs_across(row0, row1, mask);
                        _mm512_storeu_si512(
                            out.as_mut_ptr().add(pp * panel_stride + kk * PANEL).cast(),
                            v,
                        );
                    }
                }
                return;
            }
            if nc % PANEL != 0 {
                out[(panels - 1) * panel_stride..][..kcp * PANEL].fill(0);
            }
            let mut words = [0u32; KC / 2];
            for c in 0..nc {
                let (pp, lane) = (c / PANEL, c % PANEL);
                if rhs.row_stride == 1 {
                    pairs_along(
                        base.add((jc + c) * rhs.col_stride + pc),
                        kc,
                        words.as_mut_ptr(),
                    );
                } else {
                    for (kk, w) in words[..kcp].iter_mut().enumerate() {
                        *w = pair_of(rhs, (pc + 2 * kk, jc + c), pc + kc, true);
                    }
                }
                for (kk, w) in words[..kcp].iter().enumerate() {
                    out[pp * panel_stride + kk * PANEL + lane] = *w;
                }
            }
        }
    }

    /// The pair word of depth `p` and `p + 1` (zero at or past `end`) at `fixed` (a column of
    /// the right operand, `along_rows`, or a row of the left one).
    fn pair_of(view: &Strided, (p, fixed): (usize, usize), end: usize, along_rows: bool) -> u32 {
        let get = |p: usize| {
            if p >= end {
                0
            } else if along_rows {
                u32::from(to_bf16(view.at(p, fixed)))
            } else {
                u32::from(to_bf16(view.at(fixed, p)))
            }
        };
        get(p) | (get(p + 1) << 16)
    }

    /// Packs `lhs[ic .. ic + mc, pc .. pc + kc]`; returns whether the pack is pair-major and
    /// its stride (words per row when row-major, per pair when pair-major).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_lhs(
        lhs: &Strided,
        (ic, mc): (usize, usize),
        (pc, kc): (usize, usize),
        out: &mut [u32],
    ) -> (bool, usize) {
        let kcp = kc.div_ceil(2);
        let base = lhs.data.as_ptr();
        unsafe {
            if lhs.col_stride == 1 {
                for r in 0..mc {
                    pairs_along(
                        base.add((ic + r) * lhs.row_stride + pc),
                        kc,
                        out.as_mut_ptr().add(r * kcp),
                    );
                }
                return (false, kcp);
            }
            if lhs.row_stride == 1 {
                let stride = mc.div_ceil(PANEL) * PANEL;
                for kk in 0..kcp {
                    let p = pc + 2 * kk;
                    let row0 = base.add(p * lhs.col_stride + ic);
                    let row1 = (2 * kk + 1 < kc).then(|| base.add((p + 1) * lhs.col_stride + ic));
                    for i0 in (0..mc).step_by(PANEL) {
                        let v =
                            pairs_across(row0.add(i0), row1.map(|r| r.add(i0)), lane_mask(mc - i0));
                        _mm512_storeu_si512(out.as_mut_ptr().add(kk * stride + i0).cast(), v);
                    }
                }
                return (true, stride);
            }
            for r in 0..mc {
                for kk in 0..kcp {
                    out[r * kcp + kk] = pair_of(lhs, (pc + 2 * kk, ic + r), pc + kc, false);
                }
            }
            (false, kcp)
        }
    }

    /// `R` rows × `NP` panels over `kcp` pairs: `a` the first row's pairs (row-major: rows
    /// `stride` words apart; pair-major: pairs `stride` words apart), `b` the first panel (the
    /// next `pstride` words on).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize, const NP: usize, const PAIR_MAJOR: bool>(
        a: *const u32,
        stride: usize,
        (b, pstride): (*const u32, usize),
        kcp: usize,
        t: TileOut,
    ) {
        let (rs, ps) = if PAIR_MAJOR { (1, stride) } else { (stride, 1) };
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NP]; R];
            for kk in 0..kcp {
                let bv: [__m512bh; NP] = std::array::from_fn(|p| {
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * pstride + kk * PANEL).cast()))
                });
                let ak = a.add(kk * ps);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*ak.add(r * rs) as i32));
                    for p in 0..NP {
                        acc[p] = _mm512_dpbf16_ps(acc[p], av, bv[p]);
                    }
                }
            }
            // The sums leave the registers through a plain copy (unrolled, every register
            // written once): the epilogue's loop then reads memory, and the compiler neither
            // keeps the accumulators in a zero-initialised stack array nor spills them.
            let mut sums = std::mem::MaybeUninit::<[[__m512; NP]; R]>::uninit();
            let out = sums.as_mut_ptr().cast::<__m512>();
            for (r, acc) in acc.iter().enumerate() {
                for (p, &sum) in acc.iter().enumerate() {
                    out.add(r * NP + p).write(sum);
                }
            }
            let sums = sums.assume_init_ref();
            let mask = |p: usize| if p + 1 == NP { t.last_mask } else { 0xFFFF };
            let (lo, hi) = (_mm512_set1_ps(t.lo), _mm512_set1_ps(t.hi));
            for (r, row) in sums.iter().enumerate() {
                for (p, &sum) in row.iter().enumerate() {
                    let (mask, at) = (mask(p), r * t.ldd + p * PANEL);
                    let mut v = sum;
                    if t.load {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, t.dst.add(at)));
                    }
                    if !t.bias.is_null() {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, t.bias.add(p * PANEL)));
                        if !t.residual.is_null() {
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, t.residual.add(at)));
                        }
                        if t.clamp {
                            // NaN passes through as the second operand, as `f32::clamp` lets it.
                            v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
                        }
                    }
                    _mm512_mask_storeu_ps(t.dst.add(at), mask, v);
                }
            }
        }
    }

    /// One tile of `rows` (1..=MR) rows × `np` (1 or 2) panels.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_dyn(
        (rows, np, pair_major): (usize, usize, bool),
        a: *const u32,
        stride: usize,
        b: (*const u32, usize),
        kcp: usize,
        t: TileOut,
    ) {
        macro_rules! rows {
            ($np:literal, $pm:literal) => {
                match rows {
                    1 => tile::<1, $np, $pm>(a, stride, b, kcp, t),
                    2 => tile::<2, $np, $pm>(a, stride, b, kcp, t),
                    3 => tile::<3, $np, $pm>(a, stride, b, kcp, t),
                    4 => tile::<4, $np, $pm>(a, stride, b, kcp, t),
                    5 => tile::<5, $np, $pm>(a, stride, b, kcp, t),
                    6 => tile::<6, $np, $pm>(a, stride, b, kcp, t),
                    7 => tile::<7, $np, $pm>(a, stride, b, kcp, t),
                    8 => tile::<8, $np, $pm>(a, stride, b, kcp, t),
                    9 => tile::<9, $np, $pm>(a, stride, b, kcp, t),
                    10 => tile::<10, $np, $pm>(a, stride, b, kcp, t),
                    11 => tile::<11, $np, $pm>(a, stride, b, kcp, t),
                    _ => tile::<MR, $np, $pm>(a, stride, b, kcp, t),
                }
            };
        }
        unsafe {
            match (np == 2, pair_major) {
                (true, true) => rows!(2, true),
                (true, false) => rows!(2, false),
                (false, true) => rows!(1, true),
                (false, false) => rows!(1, false),
            }
        }
    }

    /// The whole product; the caller checked the views' bounds and the CPU's features.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        accumulate: bool,
        lhs: LeftOp,
        rhs: Right,
        epilogue: Option<Epilogue>,
        (apack, bpack): (&mut [u32], &mut [u32]),
    ) {
        let (clamp, lo, hi) = match epilogue.map(|e| e.act) {
            None | Some(Act::Identity) => (false, f32::NEG_INFINITY, f32::INFINITY),
            Some(Act::Relu) => (true, 0.0, f32::INFINITY),
            Some(Act::Relu6) => (true, 0.0, 6.0),
        };
        let dptr = dst.as_mut_ptr();
        unsafe {
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                let panels = nc.div_ceil(PANEL);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    let kcp = kc.div_ceil(2);
                    // The block's first panel and the stride between panels.
                    let (b0, pstride) = match rhs {
                        Right::Packed(w) => {
                            let pstride = w.k.div_ceil(2) * PANEL;
                            (
                                w.words.as_ptr().add(jc / PANEL * pstride + pc / 2 * PANEL),
                                pstride,
                            )
                        }
                        Right::View(v) => {
                            pack_rhs(v, (pc, kc), (jc, nc), bpack, kcp * PANEL);
                            (bpack.as_ptr(), kcp * PANEL)
                        }
                        Right::Bf16(words, ld) => {
                            let rows = words.as_ptr().cast::<u16>();
                            pack_rhs_bf16(rows, ld, (pc, kc), (jc, nc), bpack, kcp * PANEL);
                            (bpack.as_ptr(), kcp * PANEL)
                        }
                    };
                    let last = pc + kc == k;
                    let load = accumulate || pc > 0;
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        // The block's first row, its layout and stride.
                        let (a0, pair_major, stride) = match lhs {
                            LeftOp::View(v) => {
                                let (pm, stride) = pack_lhs(v, (ic, mc), (pc, kc), apack);
                                (apack.as_ptr(), pm, stride)
                            }
                            LeftOp::Pairs(w) => {
                                let kp = k.div_ceil(2);
                                (w.as_ptr().add(ic * kp + pc / 2), false, kp)
                            }
                        };
                        let mut p = 0;
                        while p < panels {
                            let np = (panels - p).min(2);
                            let last_mask = if p + np == panels {
                                lane_mask(nc - (panels - 1) * PANEL)
                            } else {
                                0xFFFF
                            };
                            let col = jc + p * PANEL;
                            for r in (0..mc).step_by(MR) {
                                let rows = MR.min(mc - r);
                                let row = ic + r;
                                let (bias, residual) = match (&epilogue, last) {
                                    (Some(e), true) => (
                                        e.bias.as_ptr().add(col),
                                        e.residual.map_or(std::ptr::null(), |res| {
                                            res.as_ptr().add(row * n + col)
                                        }),
                                    ),
                                    _ => (std::ptr::null(), std::ptr::null()),
                                };
                                let t = TileOut {
                                    dst: dptr.add(row * n + col),
                                    ldd: n,
                                    load,
                                    bias,
                                    residual,
                                    clamp,
                                    lo,
                                    hi,
                                    last_mask,
                                };
                                let a = if pair_major {
                                    a0.add(r)
                                } else {
                                    a0.add(r * stride)
                                };
                                let b = (b0.add(p * pstride), pstride);
                                tile_dyn((rows, np, pair_major), a, stride, b, kcp, t);
                            }
                            p += np;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::bf16_kernel::from_bf16;
    use crate::rng::Rng;

    /// Whether the kernel's tests cannot run here (said on stderr).
    fn skipped() -> bool {
        let skip = !available();
        if skip {
            eprintln!("skipped: this CPU has no AVX512-BF16");
        }
        skip
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// What [`gemm`] computes, one scalar at a time: the operands rounded to bf16, the products
    /// summed in f64 (the tests' reference).
    fn reference(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        accumulate: bool,
        lhs: Strided,
        rhs: Strided,
    ) {
        let round = |v: f32| f64::from(from_bf16(to_bf16(v)));
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|p| round(lhs.at(i, p)) * round(rhs.at(p, j)))
                    .sum();
                let d = &mut dst[i * n + j];
                *d = if accumulate {
                    *d + sum as f32
                } else {
                    sum as f32
                };
            }
        }
    }

    fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| rng.unit_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    /// Small integers are exact in bf16 and their sums exact in f32: the kernel must give the
    /// exact product, whatever its order of summation.
    #[test]
    fn integer_products_are_exact_in_every_layout() {
        if skipped() {
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 17, 33),
            (200, 40, 300),
            (25, 530, 9),
        ] {
            let ints = |rng: &mut Rng, len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| (rng.next_u64() % 9) as f32 - 4.0)
                    .collect()
            };
            let a = ints(&mut rng, m * k);
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let b = ints(&mut rng, k * n);
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                }
            }
            let lhs = [Strided::rows(&a, k), Strided::transposed(&at, m)];
            let rhs = [Strided::rows(&b, n), Strided::transposed(&bt, k)];
            for l in lhs {
                for r in rhs {
                    let mut got = vec![f32::NAN; m * n];
                    gemm((m, n, k), &mut got, false, Lhs::View(l), Rhs::View(r), None);
                    assert_eq!(
                        got,
                        want,
                        "[{m}, {k}] x [{k}, {n}], strides {:?} {:?}",
                        (l.row_stride, l.col_stride),
                        (r.row_stride, r.col_stride)
                    );
                    // Accumulating adds the same product once more.
                    gemm((m, n, k), &mut got, true, Lhs::View(l), Rhs::View(r), None);
                    let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
                    assert_eq!(got, twice);
                }
            }
        }
    }

    /// Random operands: equal to the scalar reference (bf16 operands, f64 sums) within the
    /// f32 summation's error, and to the f32 product within the operands' rounding.
    #[test]
    fn random_products_match_the_reference_within_the_rounding_bounds() {
        if skipped() {
            return;
        }
        let mut rng = Rng::new(11);
        for &(m, n, k) in &[(37, 70, 600), (3, 1030, 257), (400, 24, 64)] {
            let a = random(&mut rng, m * k);
            let b = random(&mut rng, k * n);
            let mut got = vec![0f32; m * n];
            gemm(
                (m, n, k),
                &mut got,
                false,
                Lhs::View(Strided::rows(&a, k)),
                Rhs::View(Strided::rows(&b, n)),
                None,
            );
            let mut want = vec![0f32; m * n];
            reference(
                (m, n, k),
                &mut want,
                false,
                Strided::rows(&a, k),
                Strided::rows(&b, n),
            );
            for i in 0..m {
                for j in 0..n {
                    let abs: f32 = (0..k).map(|p| (a[i * k + p] * b[p * n + j]).abs()).sum();
                    let exact: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                    let (g, w) = (got[i * n + j], want[i * n + j]);
                    // f32 sums of k exact products: at most k·2⁻²⁴ of the absolute sum.
                    assert!(
                        (g - w).abs() <= k as f32 * 6e-8 * abs + 1e-6,
                        "({i}, {j}): {g} vs {w}"
                    );
                    // Each operand within 2⁻⁹ relative: a product within about 2⁻⁸.
                    assert!(
                        (g - exact).abs() <= 4e-3 * abs + 1e-5,
                        "({i}, {j}): {g} vs f32 {exact}"
                    );
                }
            }
        }
    }

    /// Packing the right operand beforehand changes nothing: same blocks, same sums.
    #[test]
    fn a_prepacked_right_operand_gives_the_same_bits() {
        if skipped() {
            return;
        }
        let mut rng = Rng::new(5);
        for &(m, n, k) in &[(7, 5, 3), (30, 530, 515), (13, 33, 256)] {
            let a = random(&mut rng, m * k);
            let b = random(&mut rng, k * n);
            let bias = random(&mut rng, n);
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            for rhs in [Strided::rows(&b, n), Strided::transposed(&bt, k)] {
                let e = Epilogue {
                    bias: &bias,
                    residual: None,
                    act: Act::Relu,
                };
                let mut want = vec![0f32; m * n];
                gemm(
                    (m, n, k),
                    &mut want,
                    false,
                    Lhs::View(Strided::rows(&a, k)),
                    Rhs::View(rhs),
                    Some(e),
                );
                let packed = PackedRhs::new(rhs, k, n);
                let mut got = vec![0f32; m * n];
                gemm(
                    (m, n, k),
                    &mut got,
                    false,
                    Lhs::View(Strided::rows(&a, k)),
                    Rhs::Packed(&packed),
                    Some(e),
                );
                assert_eq!(bits(&got), bits(&want), "[{m}, {k}] x [{k}, {n}]");
            }
        }
    }

    /// A left operand given as pairs gives the bits of the same operand converted per block,
    /// and im2col straight to pairs equals im2col then [`pack_pairs`].
    #[test]
    fn pairs_on_the_left_and_im2col_to_pairs_change_nothing() {
        if skipped() {
            return;
        }
        let mut rng = Rng::new(9);
        let (c, h, w) = (6, 9, 7);
        let x = random(&mut rng, h * w * c);
        for (kernel, stride, pads) in [
            (3, 1, (1, 1, 1, 1)),
            (3, 2, (1, 1, 1, 1)),
            (1, 2, (0, 0, 0, 0)),
        ] {
            let g = crate::ops::nhwc::ConvGeometry::new(h, w, kernel, stride, pads).unwrap();
            let (m, k) = (g.out_h * g.out_w, kernel * kernel * c);
            let mut cols = vec![0f32; m * k];
            crate::ops::nhwc::im2col_hwc(&x, c, &g, &mut cols);
            let mut want = vec![0u32; m * k / 2];
            for (row, words) in cols.chunks_exact(k).zip(want.chunks_exact_mut(k / 2)) {
                pack_pairs(row, words);
            }
            let mut got = vec![7u32; m * k / 2];
            im2col_hwc_pairs(&x, c, &g, &mut got);
            assert_eq!(got, want, "{kernel}x{kernel} stride {stride}");
        }
        for &(m, n, k) in &[(30, 530, 518), (13, 40, 6), (200, 17, 300)] {
            let a = random(&mut rng, m * k);
            let wt = random(&mut rng, n * k);
            let bias = random(&mut rng, n);
            let packed = PackedRhs::new(Strided::transposed(&wt, k), k, n);
            let e = Epilogue {
                bias: &bias,
                residual: None,
                act: Act::Relu6,
            };
            let mut want = vec![0f32; m * n];
            gemm(
                (m, n, k),
                &mut want,
                false,
                Lhs::View(Strided::rows(&a, k)),
                Rhs::Packed(&packed),
                Some(e),
            );
            let mut pairs = vec![0u32; m * k.div_ceil(2)];
            for (row, words) in a.chunks_exact(k).zip(pairs.chunks_exact_mut(k.div_ceil(2))) {
                pack_pairs(row, words);
            }
            let mut got = vec![0f32; m * n];
            gemm(
                (m, n, k),
                &mut got,
                false,
                Lhs::Pairs(&pairs),
                Rhs::Packed(&packed),
                Some(e),
            );
            assert_eq!(bits(&got), bits(&want), "[{m}, {k}] x [{k}, {n}]");
        }
    }

    /// A bf16 right operand (the pairs of an im2col) gives the bits of the f32 one.
    #[test]
    fn a_bf16_right_operand_gives_the_bits_of_its_f32_view() {
        if skipped() {
            return;
        }
        let mut rng = Rng::new(13);
        for &(m, n, k) in &[(64, 576, 301), (7, 18, 1), (20, 530, 600)] {
            let lhs_t = random(&mut rng, k * m);
            let b = random(&mut rng, k * n);
            let mut words = vec![0u32; k * n / 2];
            pack_pairs(&b, &mut words);
            let mut want = vec![0.5f32; m * n];
            let lhs = Strided::transposed(&lhs_t, m);
            gemm(
                (m, n, k),
                &mut want,
                true,
                Lhs::View(lhs),
                Rhs::View(Strided::rows(&b, n)),
                None,
            );
            let mut got = vec![0.5f32; m * n];
            gemm(
                (m, n, k),
                &mut got,
                true,
                Lhs::View(lhs),
                Rhs::Bf16(&words),
                None,
            );
            assert_eq!(bits(&got), bits(&want), "[{m}, {k}] x [{k}, {n}]");
        }
    }

    #[test]
    fn the_epilogue_adds_bias_and_residual_and_clamps_once() {
        if skipped() {
            return;
        }
        // Depth 600 spans three depth blocks: the epilogue must run on the last only.
        let (m, n, k) = (14, 21, 600);
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let bias: Vec<f32> = (0..n).map(|j| j as f32 - 80.0).collect();
        let residual: Vec<f32> = (0..m * n).map(|x| (x % 7) as f32).collect();
        for act in [Act::Identity, Act::Relu, Act::Relu6] {
            let mut got = vec![0f32; m * n];
            let e = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                act,
            };
            gemm(
                (m, n, k),
                &mut got,
                false,
                Lhs::View(Strided::rows(&a, k)),
                Rhs::View(Strided::rows(&b, n)),
                Some(e),
            );
            for i in 0..m {
                for j in 0..n {
                    let want = act.apply(75.0 + bias[j] + residual[i * n + j]);
                    assert_eq!(got[i * n + j], want, "{act:?} ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn an_empty_depth_gives_the_epilogue_of_zero() {
        if skipped() {
            return;
        }
        let bias = [1.0f32, -2.0];
        let mut got = vec![9f32; 4];
        let e = Epilogue {
            bias: &bias,
            residual: None,
            act: Act::Relu,
        };
        gemm(
            (2, 2, 0),
            &mut got,
            false,
            Lhs::View(Strided::rows(&[], 0)),
            Rhs::View(Strided::rows(&[], 2)),
            Some(e),
        );
        assert_eq!(got, [1.0, 0.0, 1.0, 0.0]);
    }
}
