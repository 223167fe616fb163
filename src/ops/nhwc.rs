//! Channels-last (NHWC) f32 kernels for CPU inference of the convolutional backbones: a 1×1
//! convolution is one matrix product over every pixel of a chunk of images, and a depthwise
//! convolution vectorises across channels (which stay long at every depth, while the maps
//! shrink to 2×2). Each kernel is single-threaded: the caller splits the batch across threads.

/// Channels per vector block of the depthwise kernel (one AVX-512 register).
pub(crate) const LANES: usize = 16;
/// The largest depthwise kernel (5×5, EfficientNet).
const MAX_TAPS: usize = 25;

/// `out[m, j] = Σ_k a[m, k] · w[j, k]`: `a` is `[m, k]` row-major (pixels × input channels),
/// `w` is `[n, k]` row-major (a 1×1 convolution's weight), `out` is `[m, n]` row-major.
pub fn matmul_wt(a: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(
        a.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_wt: buffers too small for [{m}, {k}] x [{n}, {k}]^T"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    // SAFETY: the assertion above keeps every access of the [m, k], [k, n] (w transposed by
    // strides) and [m, n] views inside its slice; `out` is exclusively borrowed and does not
    // alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The activation after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    /// min(max(v, 0), 6): MobileNet's and EfficientNet-Lite's.
    Relu6,
}

impl Act {
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            // clamp, unlike max, lets a NaN through: bad weights stay visible.
            Act::Relu => v.clamp(0.0, f32::INFINITY),
            Act::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// Adds the per-channel `bias` to every row of `x` (`[rows, bias.len()]`), then applies `act`.
pub fn bias_act_rows(x: &mut [f32], bias: &[f32], act: Act) {
    let c = bias.len();
    for row in x.chunks_exact_mut(c) {
        match act {
            Act::Identity => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
            Act::Relu => row
                .iter_mut()
                .zip(bias)
                .for_each(|(v, b)| *v = (*v + b).clamp(0.0, f32::INFINITY)),
            Act::Relu6 => row
                .iter_mut()
                .zip(bias)
                .for_each(|(v, b)| *v = (*v + b).clamp(0.0, 6.0)),
        }
    }
}

/// `x = act(x + other)`, element-wise: a residual connection.
pub fn add_act(x: &mut [f32], other: &[f32], act: Act) {
    match act {
        Act::Identity => x.iter_mut().zip(other).for_each(|(v, o)| *v += o),
        _ => x
            .iter_mut()
            .zip(other)
            .for_each(|(v, o)| *v = act.apply(*v + o)),
    }
}

/// Geometry of a convolution over one `h × w` map: kernel, stride and padding (top, left;
/// bottom and right only shape the output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeometry {
    /// The geometry for padding (top, bottom, left, right); `None` when the kernel does not
    /// fit the padded map.
    pub fn new(
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        (pt, pb, pl, pr): (usize, usize, usize, usize),
    ) -> Option<Self> {
        let (ph, pw) = (h + pt + pb, w + pl + pr);
        if kernel == 0 || stride == 0 || ph < kernel || pw < kernel {
            return None;
        }
        Some(Self {
            h,
            w,
            kernel,
            stride,
            pad_top: pt,
            pad_left: pl,
            out_h: (ph - kernel) / stride + 1,
            out_w: (pw - kernel) / stride + 1,
        })
    }

    /// The outputs `[lo, hi)` (of `outs` along a row or column) whose tap `tap` lands inside
    /// a map of `size` pixels padded by `pad` before it: `0 ≤ o·stride + tap − pad < size`.
    pub(crate) fn inside(
        &self,
        tap: usize,
        pad: usize,
        size: usize,
        outs: usize,
    ) -> (usize, usize) {
        let lo = pad.saturating_sub(tap).div_ceil(self.stride).min(outs);
        let hi = (size + pad).saturating_sub(tap).div_ceil(self.stride);
        (lo, hi.clamp(lo, outs))
    }

    /// The kernel taps `[lo, hi)` of output row (or column) `o` that land inside a map of
    /// `size` pixels padded by `pad` before it.
    pub(crate) fn taps(&self, o: usize, pad: usize, size: usize) -> (usize, usize) {
        let start = o * self.stride;
        let lo = pad.saturating_sub(start);
        let hi = (size + pad).saturating_sub(start).min(self.kernel);
        (lo, hi.max(lo))
    }
}

/// The im2col matrix of one image `x` (`[c, h, w]`, channels first, as images arrive) for a
/// dense convolution: `[out_h · out_w, c · k · k]`, columns ordered as a `[cout, c, k, k]`
/// weight flattens, zeros where the kernel hangs over the padding.
pub fn im2col_chw(x: &[f32], c: usize, g: &ConvGeometry, out: &mut [f32]) {
    im2col_chw_range(x, c, g, 0..g.out_h, out);
}

/// The rows of [`im2col_chw`]'s matrix for output rows `rows` (`rows.len() · out_w` matrix
/// rows from the start of `out`), so a caller can build and use the matrix a block of rows at
/// a time while the block is in cache.
pub fn im2col_chw_range(
    x: &[f32],
    c: usize,
    g: &ConvGeometry,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let k = g.kernel;
    let cols = c * k * k;
    assert!(
        x.len() >= c * g.h * g.w && rows.end <= g.out_h && out.len() >= rows.len() * g.out_w * cols,
        "im2col: buffers too small"
    );
    match k {
        3 => im2col_chw_rows::<3>(x, c, g, rows, out),
        7 => im2col_chw_rows::<7>(x, c, g, rows, out),
        _ => im2col_chw_columns(x, c, g, rows, out),
    }
}

/// [`im2col_chw`] one matrix row at a time, for the stems' kernel sizes: each (channel, kernel
/// row) of an output pixel is a run of `K` input floats, copied whole (a fixed-size copy) where
/// the window lies inside the map; the matrix is written in order.
fn im2col_chw_rows<const K: usize>(
    x: &[f32],
    c: usize,
    g: &ConvGeometry,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let cols = c * K * K;
    let first = rows.start;
    for oy in rows {
        for ox in 0..g.out_w {
            let row = &mut out[((oy - first) * g.out_w + ox) * cols..][..cols];
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let ix0 = ox * g.stride + kx0 - g.pad_left;
            for ci in 0..c {
                for ky in 0..K {
                    let dst = &mut row[(ci * K + ky) * K..][..K];
                    let iy = (oy * g.stride + ky).wrapping_sub(g.pad_top);
                    if iy >= g.h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &x[(ci * g.h + iy) * g.w + ix0..];
                    if kx0 == 0 && kx1 == K {
                        dst.copy_from_slice(&src[..K]);
                    } else {
                        dst[..kx0].fill(0.0);
                        dst[kx1..].fill(0.0);
                        dst[kx0..kx1].copy_from_slice(&src[..kx1 - kx0]);
                    }
                }
            }
        }
    }
}

/// [`im2col_chw`] one matrix column at a time (any kernel size).
fn im2col_chw_columns(
    x: &[f32],
    c: usize,
    g: &ConvGeometry,
    out_rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let k = g.kernel;
    let cols = c * k * k;
    let first = out_rows.start;
    // Column by column within an output row: one input row feeds a strided run of the
    // matrix, the padding is filled around the run, and no element tests its bounds.
    for oy in out_rows {
        let rows = &mut out[(oy - first) * g.out_w * cols..][..g.out_w * cols];
        for ci in 0..c {
            for ky in 0..k {
                let iy = (oy * g.stride + ky).wrapping_sub(g.pad_top);
                for kx in 0..k {
                    let col = (ci * k + ky) * k + kx;
                    let column = rows[col..].iter_mut().step_by(cols);
                    if iy >= g.h {
                        column.for_each(|v| *v = 0.0);
                        continue;
                    }
                    let (lo, hi) = g.inside(kx, g.pad_left, g.w, g.out_w);
                    let src = &x[(ci * g.h + iy) * g.w..][..g.w];
                    let start = (lo * g.stride + kx).saturating_sub(g.pad_left);
                    let inner = src[start.min(g.w)..].iter().step_by(g.stride);
                    let mut column = column;
                    column.by_ref().take(lo).for_each(|v| *v = 0.0);
                    column
                        .by_ref()
                        .take(hi - lo)
                        .zip(inner)
                        .for_each(|(v, s)| *v = *s);
                    column.for_each(|v| *v = 0.0);
                }
            }
        }
    }
}

/// The im2col matrix of one channels-last image `x` (`[h, w, c]`) for a dense convolution:
/// `[out_h · out_w, k · k · c]`, columns ordered (ky, kx, channel) — a `[cout, k, k, c]` weight
/// (see [`weight_hwc`]) — zeros where the kernel hangs over the padding.
pub fn im2col_hwc(x: &[f32], c: usize, g: &ConvGeometry, out: &mut [f32]) {
    let k = g.kernel;
    let cols = k * k * c;
    assert!(
        x.len() >= g.h * g.w * c && out.len() >= g.out_h * g.out_w * cols,
        "im2col: buffers too small"
    );
    im2col_hwc_with(x, c, g, out, c, 0.0, |src, dst| dst.copy_from_slice(src));
}

/// The tap walk of [`im2col_hwc`] for any element type: each output pixel's row holds
/// `tap_len` elements per tap (ky, kx); `copy` fills a tap from the `c` input channels it reads,
/// and a tap over the padding is filled with `zero`. The caller checks the buffers' sizes.
pub fn im2col_hwc_with<T: Copy>(
    x: &[f32],
    c: usize,
    g: &ConvGeometry,
    out: &mut [T],
    tap_len: usize,
    zero: T,
    mut copy: impl FnMut(&[f32], &mut [T]),
) {
    let k = g.kernel;
    let row_len = k * k * tap_len;
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            let row = &mut out[(oy * g.out_w + ox) * row_len..][..row_len];
            for ky in 0..k {
                let iy = (oy * g.stride + ky).wrapping_sub(g.pad_top);
                for kx in 0..k {
                    let ix = (ox * g.stride + kx).wrapping_sub(g.pad_left);
                    let dst = &mut row[(ky * k + kx) * tap_len..][..tap_len];
                    if iy < g.h && ix < g.w {
                        copy(&x[(iy * g.w + ix) * c..][..c], dst);
                    } else {
                        dst.fill(zero);
                    }
                }
            }
        }
    }
}

/// A dense convolution's weight `[cout, c, k, k]` reordered to `[cout, k, k, c]`, the column
/// order of [`im2col_hwc`].
pub fn weight_hwc(weight: &[f32], cout: usize, c: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; weight.len()];
    for o in 0..cout {
        for ci in 0..c {
            for t in 0..k * k {
                out[(o * k * k + t) * c + ci] = weight[(o * c + ci) * k * k + t];
            }
        }
    }
    out
}

/// Max pooling of one channels-last image (`[h, w, c]` → `[out_h, out_w, c]`); the padding
/// never wins (as PyTorch's −∞ padding).
pub fn max_pool_hwc(x: &[f32], c: usize, g: &ConvGeometry, out: &mut [f32]) {
    for oy in 0..g.out_h {
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for ox in 0..g.out_w {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let o = &mut out[(oy * g.out_w + ox) * c..][..c];
            o.fill(f32::NEG_INFINITY);
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad_top;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride + kx - g.pad_left;
                    let xs = &x[(iy * g.w + ix) * c..][..c];
                    o.iter_mut().zip(xs).for_each(|(o, &v)| *o = o.max(v));
                }
            }
        }
    }
}

/// A depthwise convolution's weight rearranged tap-major, `[k·k, c]`, from `[c, 1, k, k]`.
pub fn depthwise_taps_major(weight: &[f32], c: usize, kernel: usize) -> Vec<f32> {
    let taps = kernel * kernel;
    let mut out = vec![0f32; taps * c];
    for ch in 0..c {
        for t in 0..taps {
            out[t * c + ch] = weight[ch * taps + t];
        }
    }
    out
}

/// A depthwise convolution over one image, channels last: `x` is `[h, w, c]`, `taps` is
/// `[k·k, c]` (see [`depthwise_taps_major`]), `out` is `[out_h, out_w, c]`, with the bias
/// added and `act` applied.
pub type DepthwiseFn = fn(&[f32], &[f32], &[f32], &ConvGeometry, Act, &mut [f32]);

/// The fastest depthwise kernel this CPU runs (AVX-512, AVX2 + FMA, or portable code).
pub fn depthwise_kernel() -> DepthwiseFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return x86::depthwise_avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return x86::depthwise_avx2;
        }
    }
    depthwise_portable
}

/// The depthwise kernel in portable code (FMA where the target always has it).
pub fn depthwise_portable(
    x: &[f32],
    taps: &[f32],
    bias: &[f32],
    g: &ConvGeometry,
    act: Act,
    out: &mut [f32],
) {
    type Lanes = [f32; LANES];
    const FMA: bool = cfg!(target_arch = "aarch64");
    depthwise_body::<_, 4>(
        x,
        taps,
        bias,
        g,
        act,
        out,
        |s: &Lanes| *s,
        |acc: Lanes, w: Lanes, x: Lanes| {
            std::array::from_fn(|j| {
                if FMA {
                    w[j].mul_add(x[j], acc[j])
                } else {
                    acc[j] + w[j] * x[j]
                }
            })
        },
        |v: Lanes, o: &mut Lanes| {
            for j in 0..LANES {
                o[j] = act.apply(v[j]);
            }
        },
    )
}

/// The lowest and highest value `act` lets through (the vector kernels clamp to them, and
/// leave `Identity` outputs untouched).
pub(crate) fn act_bounds(act: Act) -> (f32, f32) {
    match act {
        Act::Identity => (f32::NEG_INFINITY, f32::INFINITY),
        Act::Relu => (0.0, f32::INFINITY),
        Act::Relu6 => (0.0, 6.0),
    }
}

/// The depthwise kernel with explicit AVX-512 and AVX2 vectors (the compiler splits a
/// 16-lane array into 128/256-bit pieces when left to itself).
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // intrinsics are safe in a `target_feature` context on newer compilers
mod x86 {
    use std::arch::x86_64::*;

    use super::{act_bounds, depthwise_body, Act, ConvGeometry, LANES};

    type Lanes = [f32; LANES];

    #[target_feature(enable = "avx512f")]
    fn avx512(x: &[f32], t: &[f32], b: &[f32], g: &ConvGeometry, act: Act, o: &mut [f32]) {
        let (lo, hi) = act_bounds(act);
        let (lo, hi) = unsafe { (_mm512_set1_ps(lo), _mm512_set1_ps(hi)) };
        depthwise_body::<_, 8>(
            x,
            t,
            b,
            g,
            act,
            o,
            // SAFETY: each pointer comes from a reference to 16 floats.
            |s: &Lanes| unsafe { _mm512_loadu_ps(s.as_ptr()) },
            |acc, w, x| unsafe { _mm512_fmadd_ps(w, x, acc) },
            |v, d: &mut Lanes| unsafe {
                // NaN as the second operand comes through, as in `f32::clamp`.
                let v = match act {
                    Act::Identity => v,
                    _ => _mm512_min_ps(hi, _mm512_max_ps(lo, v)),
                };
                _mm512_storeu_ps(d.as_mut_ptr(), v)
            },
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2(x: &[f32], t: &[f32], b: &[f32], g: &ConvGeometry, act: Act, o: &mut [f32]) {
        let (lo, hi) = act_bounds(act);
        let (lo, hi) = unsafe { (_mm256_set1_ps(lo), _mm256_set1_ps(hi)) };
        depthwise_body::<_, 4>(
            x,
            t,
            b,
            g,
            act,
            o,
            // SAFETY: each pointer comes from a reference to 16 floats; the halves are 8 each.
            |s: &Lanes| unsafe {
                (
                    _mm256_loadu_ps(s.as_ptr()),
                    _mm256_loadu_ps(s[8..].as_ptr()),
                )
            },
            |acc: (__m256, __m256), w: (__m256, __m256), x: (__m256, __m256)| unsafe {
                (
                    _mm256_fmadd_ps(w.0, x.0, acc.0),
                    _mm256_fmadd_ps(w.1, x.1, acc.1),
                )
            },
            |v: (__m256, __m256), d: &mut Lanes| unsafe {
                let clamp = |v| match act {
                    Act::Identity => v,
                    _ => _mm256_min_ps(hi, _mm256_max_ps(lo, v)),
                };
                _mm256_storeu_ps(d.as_mut_ptr(), clamp(v.0));
                _mm256_storeu_ps(d[8..].as_mut_ptr(), clamp(v.1));
            },
        )
    }

    pub fn depthwise_avx512(
        x: &[f32],
        t: &[f32],
        b: &[f32],
        g: &ConvGeometry,
        r: Act,
        o: &mut [f32],
    ) {
        // SAFETY: only handed out by `depthwise_kernel` after detecting AVX-512F.
        unsafe { avx512(x, t, b, g, r, o) }
    }

    pub fn depthwise_avx2(
        x: &[f32],
        t: &[f32],
        b: &[f32],
        g: &ConvGeometry,
        r: Act,
        o: &mut [f32],
    ) {
        // SAFETY: only handed out by `depthwise_kernel` after detecting AVX2 and FMA.
        unsafe { avx2(x, t, b, g, r, o) }
    }
}

/// The [`LANES`] floats of `s` from `at`.
#[inline(always)]
pub(crate) fn lanes(s: &[f32], at: usize) -> &[f32; LANES] {
    s[at..at + LANES].try_into().expect("LANES-long slice")
}

/// How a depthwise kernel loads a vector of [`LANES`] floats, multiply-adds (`acc + w · x`,
/// one rounding where the vector type fuses) and stores one with the activation.
type VectorOps<'a, L, F, S> = (&'a L, &'a F, &'a S);

/// Inputs of [`channel_block`]: image, taps, bias, geometry, first channel.
type BlockArgs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a ConvGeometry, usize);

/// One block of [`LANES`] channels from `c0` of a depthwise convolution with a `K`×`K`
/// kernel and stride `ST` (0: the geometry's, read at run time): the taps and bias stay in
/// registers for the whole map; each output row's pixels whose taps all land inside the row
/// are computed `Q` at a time (independent sums; with the stride known, each input vector is
/// loaded once for the taps that share it), the pixels at the row's ends one at a time with
/// only their in-map taps. Every sum runs over the same taps in the same order (rows, then
/// columns), so a pixel's value does not depend on how it was grouped.
#[inline(always)]
fn channel_block<V, L, F, S, const K: usize, const ST: usize, const Q: usize>(
    (x, taps, bias, g, c0): BlockArgs,
    ops: VectorOps<L, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let (load, fma, store) = ops;
    let c = bias.len();
    let w: [[V; K]; K] = std::array::from_fn(|ky| {
        std::array::from_fn(|kx| load(lanes(taps, (ky * K + kx) * c + c0)))
    });
    let b = load(lanes(bias, c0));
    // Output columns whose K taps all land inside the row: ox·s ≥ pad and ox·s − pad + K ≤ w.
    let (lo, hi) = {
        let (lo, _) = g.inside(0, g.pad_left, g.w, g.out_w);
        let (_, hi) = g.inside(K - 1, g.pad_left, g.w, g.out_w);
        (lo, hi.max(lo))
    };
    // The group sees its first channel as channel 0.
    let (x, out) = (&x[c0..], &mut out[c0..]);
    for oy in 0..g.out_h {
        let rows = g.taps(oy, g.pad_top, g.h);
        for ox in (0..lo).chain(hi..g.out_w) {
            let cols = g.taps(ox, g.pad_left, g.w);
            let mut acc = b;
            for (ky, wy) in w.iter().enumerate().take(rows.1).skip(rows.0) {
                let iy = oy * g.stride + ky - g.pad_top;
                for (kx, wk) in wy.iter().enumerate().take(cols.1).skip(cols.0) {
                    let at = (iy * g.w + ox * g.stride + kx - g.pad_left) * c;
                    acc = fma(acc, *wk, load(lanes(x, at)));
                }
            }
            store(acc, lanes_mut(out, (oy * g.out_w + ox) * c));
        }
        let args = (x, c, g, oy, rows);
        let mut ox = lo;
        while ox + Q <= hi {
            strip::<V, L, F, S, K, ST, Q>(&w, b, args, ox, ops, out);
            ox += Q;
        }
        // What is left of the interior in halving strips, so it keeps independent sums too.
        if Q > 4 && ox + 4 <= hi {
            strip::<V, L, F, S, K, ST, 4>(&w, b, args, ox, ops, out);
            ox += 4;
        }
        if Q > 2 && ox + 2 <= hi {
            strip::<V, L, F, S, K, ST, 2>(&w, b, args, ox, ops, out);
            ox += 2;
        }
        if ox < hi {
            strip::<V, L, F, S, K, ST, 1>(&w, b, args, ox, ops, out);
        }
    }
}

/// Inputs of [`strip`]: image, channels, geometry, output row and its in-map tap rows.
type StripArgs<'a> = (&'a [f32], usize, &'a ConvGeometry, usize, (usize, usize));

/// `Q` neighbouring output pixels from `ox` of row `oy` (all of whose taps land inside the
/// row), with taps `w` and bias `b`.
#[inline(always)]
fn strip<V, L, F, S, const K: usize, const ST: usize, const Q: usize>(
    w: &[[V; K]; K],
    b: V,
    (x, c, g, oy, (ky0, ky1)): StripArgs,
    ox: usize,
    (load, fma, store): VectorOps<L, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let s = g.stride;
    let mut acc = [b; Q];
    let first = (ox * s - g.pad_left) * c;
    let row_at = |ky: usize| (oy * s + ky - g.pad_top) * g.w * c + first;
    // Rows fully inside the map take the unrolled loop (the taps stay in registers).
    if (ky0, ky1) == (0, K) {
        for (ky, wy) in w.iter().enumerate() {
            strip_row::<V, L, F, K, ST, Q>(&mut acc, wy, (x, row_at(ky), c, s), (load, fma));
        }
    } else {
        for (ky, wy) in w.iter().enumerate().take(ky1).skip(ky0) {
            strip_row::<V, L, F, K, ST, Q>(&mut acc, wy, (x, row_at(ky), c, s), (load, fma));
        }
    }
    store_strip(acc, (oy * g.out_w + ox) * c, c, store, out);
}

/// A strip's `Q` sums into `out`: pixel p's vector at `at + p · c`.
#[inline(always)]
fn store_strip<V, S, const Q: usize>(acc: [V; Q], at: usize, c: usize, store: &S, out: &mut [f32])
where
    S: Fn(V, &mut [f32; LANES]),
{
    assert!(
        at + (Q - 1) * c + LANES <= out.len(),
        "depthwise strip past its output"
    );
    let base = out[at..].as_mut_ptr();
    for (p, a) in acc.into_iter().enumerate() {
        // SAFETY: every vector ends within `out` (checked above); unchecked so the stores
        // are address arithmetic only.
        store(a, unsafe { &mut *(base.add(p * c) as *mut [f32; LANES]) });
    }
}

/// Output maps at most this wide, at stride 1, are convolved from a zero-padded copy of each
/// channel block ([`padded_block`]): their rows are too short for [`channel_block`]'s strips
/// to outweigh its edge pixels and remainders. Measured in MobileNetV2 (the engine, 2 cores):
/// 64×64 images 4 500–5 700 → 6 100–6 900 img/s; at 256×256 its 8×8×960 layer takes 1.6–2.0%
/// of the time instead of 2.5–4.0%. Wider maps (16, 32) measured slower this way in the
/// network, though faster alone; at stride 2 the copy costs more than it saves.
const PADDED_MAX_W: usize = 8;

thread_local! {
    /// The zero-padded input of the channel block [`padded_block`] is convolving.
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`channel_block`] for a narrow map at stride 1: the block's input is first copied, with
/// zeros where the kernel hangs over the map's edges, into `buf` (`[ph, pw, 16]`); every
/// output pixel is then a strip pixel (strips of `Q`, the last one overlapping the one before
/// it; halving strips when a row is shorter than `Q`). Same order of sums as
/// [`channel_block`] (bias, then rows, then columns of taps); a tap over the padding adds
/// `w · 0`, which leaves a finite sum as it is.
#[inline(always)]
fn padded_block<V, L, F, S, const K: usize, const Q: usize>(
    (x, taps, bias, g, c0): BlockArgs,
    ops: VectorOps<L, F, S>,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let load = ops.0;
    let c = bias.len();
    let w: [[V; K]; K] = std::array::from_fn(|ky| {
        std::array::from_fn(|kx| load(lanes(taps, (ky * K + kx) * c + c0)))
    });
    let b = load(lanes(bias, c0));
    // The padded rows and columns the outputs read.
    let (ph, pw) = (g.out_h - 1 + K, g.out_w - 1 + K);
    if buf.len() < ph * pw * LANES {
        buf.resize(ph * pw * LANES, 0.0);
    }
    for r in 0..ph {
        let iy = r.checked_sub(g.pad_top).filter(|&iy| iy < g.h);
        for q in 0..pw {
            let dst = lanes_mut(buf, (r * pw + q) * LANES);
            match (iy, q.checked_sub(g.pad_left).filter(|&ix| ix < g.w)) {
                (Some(iy), Some(ix)) => *dst = *lanes(x, (iy * g.w + ix) * c + c0),
                _ => *dst = [0.0; LANES],
            }
        }
    }
    let buf = &buf[..ph * pw * LANES];
    let out = &mut out[c0..];
    let args = (buf, pw, &w, b, c);
    for oy in 0..g.out_h {
        if g.out_w >= Q {
            // Strips of Q; the last one overlaps the one before it (its pixels' sums are
            // the same whichever strip computes them).
            let mut ox = 0;
            loop {
                let at = ox.min(g.out_w - Q);
                padded_strip::<V, L, F, S, K, Q>(args, (oy, at), ops, out);
                if at + Q >= g.out_w {
                    break;
                }
                ox += Q;
            }
        } else {
            let mut ox = 0;
            if Q > 4 && ox + 4 <= g.out_w {
                padded_strip::<V, L, F, S, K, 4>(args, (oy, ox), ops, out);
                ox += 4;
            }
            if Q > 2 && ox + 2 <= g.out_w {
                padded_strip::<V, L, F, S, K, 2>(args, (oy, ox), ops, out);
                ox += 2;
            }
            if ox < g.out_w {
                padded_strip::<V, L, F, S, K, 1>(args, (oy, ox), ops, out);
            }
        }
    }
}

/// One row of taps `wy` into the `Q` sums of a strip: pixel p's tap kx reads
/// the vector at `at + (p · stride + kx) · c` (`at`: the first pixel's first tap;
/// `c`: floats per input pixel).
#[inline(always)]
fn strip_row<V, L, F, const K: usize, const ST: usize, const Q: usize>(
    acc: &mut [V; Q],
    wy: &[V; K],
    (x, at, c, stride): (&[f32], usize, usize, usize),
    (load, fma): (&L, &F),
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    F: Fn(V, V, V) -> V,
{
    // A stride known at compile time (`ST` > 0) makes each input pixel's offset a constant
    // multiple of `c`, so the taps that share an input load it once.
    let stride = if ST > 0 { ST } else { stride };
    // The furthest vector read: pixel Q − 1, tap K − 1.
    let end = at + ((Q - 1) * stride + K - 1) * c + LANES;
    assert!(end <= x.len(), "depthwise strip past its input");
    let base = x[at..].as_ptr();
    for (kx, wk) in wy.iter().enumerate() {
        for (p, a) in acc.iter_mut().enumerate() {
            // SAFETY: every offset is below `end − at`, inside `x` (checked above);
            // unchecked so the strip is address arithmetic and multiply-adds only.
            let v = unsafe { &*(base.add((p * stride + kx) * c) as *const [f32; LANES]) };
            *a = fma(*a, *wk, load(v));
        }
    }
}

/// The [`LANES`] floats of `s` from `at`, to store into.
#[inline(always)]
pub(crate) fn lanes_mut(s: &mut [f32], at: usize) -> &mut [f32; LANES] {
    (&mut s[at..at + LANES])
        .try_into()
        .expect("LANES-long slice")
}

/// Inputs of [`padded_strip`]: the padded block, its width, taps, bias, channels of `out`.
type PaddedArgs<'a, V, const K: usize> = (&'a [f32], usize, &'a [[V; K]; K], V, usize);

/// `Q` neighbouring output pixels from `(oy, ox)` of a [`padded_block`].
#[inline(always)]
fn padded_strip<V, L, F, S, const K: usize, const Q: usize>(
    (buf, pw, w, b, c): PaddedArgs<V, K>,
    (oy, ox): (usize, usize),
    (load, fma, store): VectorOps<L, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let out_w = pw + 1 - K;
    let mut acc = [b; Q];
    for (ky, wy) in w.iter().enumerate() {
        let at = ((oy + ky) * pw + ox) * LANES;
        strip_row::<V, L, F, K, 1, Q>(&mut acc, wy, (buf, at, LANES, 1), (load, fma));
    }
    store_strip(acc, (oy * out_w + ox) * c, c, store, out);
}

/// The depthwise loop over vectors `V` of [`LANES`] channels, given how to load one, multiply-
/// add (`acc + w · x`) and store one with the activation: block by block (its taps in
/// registers, its few input rows in the first-level cache while its output rows pass), `Q`
/// pixels of a row at a time (see [`channel_block`]).
/// Channels past the last full block are computed one at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_body<V: Copy, const Q: usize>(
    x: &[f32],
    taps: &[f32],
    bias: &[f32],
    g: &ConvGeometry,
    act: Act,
    out: &mut [f32],
    load: impl Fn(&[f32; LANES]) -> V,
    fma: impl Fn(V, V, V) -> V,
    store: impl Fn(V, &mut [f32; LANES]),
) {
    let c = bias.len();
    let k = g.kernel;
    assert!(
        (1..=MAX_TAPS).contains(&(k * k))
            && taps.len() >= k * k * c
            && x.len() >= g.h * g.w * c
            && out.len() >= g.out_h * g.out_w * c,
        "depthwise: kernel {k} or buffers do not fit {c} channels"
    );
    let ops = (&load, &fma, &store);
    if g.stride == 1 && g.out_w <= PADDED_MAX_W && matches!(k, 3 | 5) {
        // Out of the thread-local and back: a closure would not take the caller's target
        // features, and the vector code would not be inlined.
        let mut buf = PADDED.take();
        for c0 in (0..c / LANES).map(|b| b * LANES) {
            let args = (x, taps, bias, g, c0);
            match k {
                3 => padded_block::<V, _, _, _, 3, Q>(args, ops, out, &mut buf),
                _ => padded_block::<V, _, _, _, 5, Q>(args, ops, out, &mut buf),
            }
        }
        PADDED.set(buf);
    } else {
        // Block by block; kernels 3 and 5 at strides 1 and 2 (MobileNetV2's,
        // EfficientNet's) have their stride fixed at compile time.
        for c0 in (0..c / LANES).map(|b| b * LANES) {
            let args = (x, taps, bias, g, c0);
            match (k, g.stride) {
                (3, 1) => channel_block::<V, _, _, _, 3, 1, Q>(args, ops, out),
                (3, 2) => channel_block::<V, _, _, _, 3, 2, Q>(args, ops, out),
                (5, 1) => channel_block::<V, _, _, _, 5, 1, Q>(args, ops, out),
                (5, 2) => channel_block::<V, _, _, _, 5, 2, Q>(args, ops, out),
                (1, _) => channel_block::<V, _, _, _, 1, 0, Q>(args, ops, out),
                (2, _) => channel_block::<V, _, _, _, 2, 0, Q>(args, ops, out),
                (3, _) => channel_block::<V, _, _, _, 3, 0, Q>(args, ops, out),
                (4, _) => channel_block::<V, _, _, _, 4, 0, Q>(args, ops, out),
                _ => channel_block::<V, _, _, _, 5, 0, Q>(args, ops, out),
            }
        }
    }
    for ch in (c / LANES) * LANES..c {
        for oy in 0..g.out_h {
            let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
            for ox in 0..g.out_w {
                let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
                let mut acc = bias[ch];
                for ky in ky0..ky1 {
                    let iy = oy * g.stride + ky - g.pad_top;
                    for kx in kx0..kx1 {
                        let ix = ox * g.stride + kx - g.pad_left;
                        acc += taps[(ky * k + kx) * c + ch] * x[(iy * g.w + ix) * c + ch];
                    }
                }
                out[(oy * g.out_w + ox) * c + ch] = act.apply(acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct NCHW-free reference: out[oy, ox, ch] = b + Σ w[ch, ky, kx]·x[iy, ix, ch].
    fn naive_depthwise(
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        g: &ConvGeometry,
        act: Act,
    ) -> Vec<f32> {
        let c = bias.len();
        let k = g.kernel;
        let mut out = vec![0f32; g.out_h * g.out_w * c];
        for oy in 0..g.out_h {
            for ox in 0..g.out_w {
                for ch in 0..c {
                    let mut acc = bias[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                let xi = (iy as usize * g.w + ix as usize) * c + ch;
                                acc += weight[(ch * k + ky) * k + kx] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    let v = acc as f32;
                    out[(oy * g.out_w + ox) * c + ch] = act.apply(v);
                }
            }
        }
        out
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 500.0 - 2.0
            })
            .collect()
    }

    type Pads = (usize, usize, usize, usize);

    /// Every depthwise kernel this CPU can run, not only the fastest.
    fn depthwise_kernels() -> Vec<(&'static str, DepthwiseFn)> {
        #[allow(unused_mut)]
        let mut kernels: Vec<(&str, DepthwiseFn)> = vec![
            ("portable", depthwise_portable),
            ("detected", depthwise_kernel()),
        ];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.push(("avx2", x86::depthwise_avx2));
        }
        kernels
    }

    /// Depthwise shapes `(h, w, channels, kernel, stride, padding)` for the kernel tests.
    fn depthwise_cases() -> Vec<(usize, usize, usize, usize, usize, Pads)> {
        vec![
            // Channels with and without a remainder past the vector blocks; maps down to 1×1.
            (5, 6, 16, 3, 1, (1, 1, 1, 1)),
            (7, 7, 35, 3, 2, (1, 1, 1, 1)),
            (2, 2, 48, 3, 1, (1, 1, 1, 1)),
            (1, 1, 20, 3, 1, (1, 1, 1, 1)),
            (9, 8, 32, 5, 2, (1, 2, 1, 2)),
            (4, 4, 17, 5, 1, (2, 2, 2, 2)),
            (6, 6, 3, 3, 2, (0, 1, 0, 1)),
            // Groups of 4 + 2 + 1 and 4 + 1 channel blocks.
            (4, 5, 112, 3, 1, (1, 1, 1, 1)),
            (5, 4, 80, 5, 2, (1, 2, 1, 2)),
            // Wider rows.
            (4, 20, 35, 3, 1, (1, 1, 1, 1)),
            (5, 31, 48, 3, 2, (0, 1, 0, 1)),
            (3, 26, 32, 5, 1, (2, 2, 2, 2)),
            (6, 37, 32, 3, 1, (1, 1, 1, 1)),
            (9, 40, 16, 3, 2, (0, 1, 0, 1)),
            (8, 29, 48, 5, 1, (2, 2, 2, 2)),
            (7, 33, 32, 5, 2, (1, 2, 1, 2)),
            (3, 3, 16, 3, 1, (1, 1, 1, 1)),
            (4, 2, 16, 5, 1, (2, 2, 2, 2)),
            // Interiors of 8 + 7 (strips of 8, 4, 2 and 1) and of 8 + 6, 8 + 5.
            (5, 17, 32, 3, 1, (1, 1, 1, 1)),
            (6, 31, 16, 3, 2, (1, 1, 1, 1)),
            (4, 18, 16, 5, 1, (2, 2, 2, 2)),
            // Stride 1 past the padded copy's width: interiors of 5·8 + 4 + 1, 5·8 + 2,
            // padding on one side only.
            (3, 47, 32, 3, 1, (1, 1, 1, 1)),
            (4, 46, 16, 5, 1, (2, 2, 2, 2)),
            (5, 38, 48, 3, 1, (0, 1, 0, 1)),
            // The padded copy: bands padded at one end only, rows of a strip and shorter
            // ones (7: 4 + 2 + 1; AVX2 and portable strips of 4 overlap on 5–8).
            (5, 6, 32, 3, 1, (0, 1, 1, 1)),
            (6, 5, 16, 3, 1, (1, 0, 1, 1)),
            (3, 7, 16, 3, 1, (1, 1, 1, 1)),
            (4, 8, 32, 3, 1, (1, 1, 1, 1)),
            (7, 8, 16, 5, 1, (2, 2, 2, 2)),
        ]
    }

    #[test]
    fn depthwise_matches_naive_for_every_kernel_variant() {
        let kernels = depthwise_kernels();
        for (h, w, c, k, s, pads) in depthwise_cases() {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x = values(h * w * c, 1);
            let weight = values(c * k * k, 2);
            let bias = values(c, 3);
            let taps = depthwise_taps_major(&weight, c, k);
            for act in [Act::Identity, Act::Relu, Act::Relu6] {
                let want = naive_depthwise(&x, &weight, &bias, &g, act);
                for (name, f) in &kernels {
                    let mut got = vec![f32::NAN; want.len()];
                    f(&x, &taps, &bias, &g, act, &mut got);
                    let err = max_err(&got, &want);
                    assert!(err < 1e-5, "{name} {h}x{w}x{c} k{k} s{s}: {err}");
                }
            }
        }
    }

    /// The depthwise sum in the vector kernels' order (bias, then rows, then columns of taps
    /// in the map), fused multiply-adds or not (never past the last full vector of channels),
    /// one channel at a time.
    fn ordered_depthwise(
        x: &[f32],
        taps: &[f32],
        bias: &[f32],
        g: &ConvGeometry,
        fused: bool,
    ) -> Vec<f32> {
        let (c, k) = (bias.len(), g.kernel);
        let mut out = vec![0f32; g.out_h * g.out_w * c];
        for oy in 0..g.out_h {
            let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
            for ox in 0..g.out_w {
                let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
                for ch in 0..c {
                    let mut acc = bias[ch];
                    for ky in ky0..ky1 {
                        for kx in kx0..kx1 {
                            let (iy, ix) = (
                                oy * g.stride + ky - g.pad_top,
                                ox * g.stride + kx - g.pad_left,
                            );
                            let (w, v) =
                                (taps[(ky * k + kx) * c + ch], x[(iy * g.w + ix) * c + ch]);
                            // Channels past the last full vector are summed one at a time,
                            // unfused, by every kernel.
                            acc = if fused && ch < c / LANES * LANES {
                                w.mul_add(v, acc)
                            } else {
                                acc + w * v
                            };
                        }
                    }
                    out[(oy * g.out_w + ox) * c + ch] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn vector_kernels_sum_in_one_order_bit_for_bit_whatever_the_strips() {
        // Rows with whole strips, a remainder and edges; strides 1 and 2; kernels 3 and 5;
        // a map narrower than a strip and one narrower than the kernel's reach.
        let mut kernels = vec![(
            "portable",
            depthwise_portable as DepthwiseFn,
            cfg!(target_arch = "aarch64"),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", x86::depthwise_avx512, true));
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(("avx2", x86::depthwise_avx2, true));
            }
        }
        for (h, w, c, k, s, pads) in depthwise_cases() {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x = values(h * w * c, 7);
            let taps = values(c * k * k, 8);
            let bias = values(c, 9);
            for (name, f, fused) in &kernels {
                let want = ordered_depthwise(&x, &taps, &bias, &g, *fused);
                let mut got = vec![f32::NAN; want.len()];
                f(&x, &taps, &bias, &g, Act::Identity, &mut got);
                let differ = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{name} {h}x{w}x{c} k{k} s{s}: {differ} values differ"
                );
            }
        }
    }

    #[test]
    fn a_nan_tap_stays_nan_in_every_depthwise_kernel() {
        let kernels = depthwise_kernels();
        let (c, k) = (32, 3);
        let g = ConvGeometry::new(4, 4, k, 1, (1, 1, 1, 1)).unwrap();
        let (x, bias) = (values(16 * c, 1), values(c, 3));
        let mut weight = values(c * k * k, 2);
        weight[5 * k * k + 4] = f32::NAN; // channel 5's centre tap
        let taps = depthwise_taps_major(&weight, c, k);
        for (name, f) in &kernels {
            for act in [Act::Relu, Act::Relu6] {
                let mut out = vec![0f32; 16 * c];
                f(&x, &taps, &bias, &g, act, &mut out);
                for (i, v) in out.iter().enumerate() {
                    assert_eq!(v.is_nan(), i % c == 5, "{name} {act:?}: {i}");
                }
            }
        }
    }

    #[test]
    fn hand_checked_depthwise_and_geometry() {
        // One channel, 3×3 ones kernel, padding 1: each output sums its in-map neighbours.
        let g = ConvGeometry::new(2, 2, 3, 1, (1, 1, 1, 1)).unwrap();
        assert_eq!((g.out_h, g.out_w), (2, 2));
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0f32; 4];
        depthwise_portable(&x, &[1.0; 9], &[0.5], &g, Act::Identity, &mut out);
        assert_eq!(out, [10.5; 4]);
        depthwise_portable(&x, &[1.0; 9], &[0.5], &g, Act::Relu6, &mut out);
        assert_eq!(out, [6.0; 4]);
        // A kernel bigger than the padded map has no geometry.
        assert!(ConvGeometry::new(2, 2, 5, 1, (1, 1, 1, 1)).is_none());
    }

    #[test]
    fn channels_first_im2col_matches_the_definition_at_every_geometry() {
        // Kernels 1/3/5, strides 1/2, symmetric and TF-"same" (bottom/right only) padding.
        for (h, w, k, stride, pads) in [
            (7, 6, 3, 2, (1, 1, 1, 1)),
            (8, 8, 3, 2, (0, 1, 0, 1)),
            (5, 9, 5, 1, (2, 2, 2, 2)),
            (6, 5, 1, 1, (0, 0, 0, 0)),
            (9, 4, 3, 1, (1, 1, 1, 1)),
            (4, 4, 5, 2, (2, 2, 2, 2)),
            (11, 9, 7, 2, (3, 3, 3, 3)),
            (5, 6, 7, 2, (3, 3, 3, 3)),
        ] {
            let c = 3;
            let x = values(c * h * w, 9);
            let g = ConvGeometry::new(h, w, k, stride, pads).unwrap();
            let cols = c * k * k;
            let mut got = vec![f32::NAN; g.out_h * g.out_w * cols];
            im2col_chw(&x, c, &g, &mut got);
            for (i, v) in got.iter().enumerate() {
                let (pixel, col) = (i / cols, i % cols);
                let (oy, ox) = (pixel / g.out_w, pixel % g.out_w);
                let (ci, ky, kx) = (col / (k * k), col / k % k, col % k);
                let iy = (oy * stride + ky) as isize - g.pad_top as isize;
                let ix = (ox * stride + kx) as isize - g.pad_left as isize;
                let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                let want = if inside {
                    x[(ci * h + iy as usize) * w + ix as usize]
                } else {
                    0.0
                };
                assert_eq!(*v, want, "{h}×{w} k{k} s{stride} {pads:?}: element {i}");
            }
        }
    }

    #[test]
    fn channels_first_im2col_by_row_blocks_equals_the_whole_matrix() {
        for &(h, w, c, k, s, pads) in &[
            (9, 7, 3, 3, 2, (1, 1, 1, 1)),
            (11, 6, 3, 7, 2, (3, 3, 3, 3)),
            (5, 8, 2, 5, 1, (2, 2, 2, 2)),
        ] {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x = values(c * h * w, 4);
            let cols = c * k * k;
            let mut whole = vec![f32::NAN; g.out_h * g.out_w * cols];
            im2col_chw(&x, c, &g, &mut whole);
            for block in 1..=g.out_h {
                let mut blocks = Vec::new();
                for start in (0..g.out_h).step_by(block) {
                    let rows = start..(start + block).min(g.out_h);
                    let mut part = vec![f32::NAN; rows.len() * g.out_w * cols];
                    im2col_chw_range(&x, c, &g, rows, &mut part);
                    blocks.extend(part);
                }
                assert!(
                    blocks
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{h}x{w} k{k} s{s}, blocks of {block} rows"
                );
            }
        }
    }

    #[test]
    fn channels_last_im2col_equals_channels_first() {
        // The same convolution through both layouts: 3 channels 7×6, 3×3, stride 2, padding 1.
        let (c, h, w, cout, k) = (3, 7, 6, 4, 3);
        let chw = values(c * h * w, 7);
        let hwc: Vec<f32> = (0..h * w * c)
            .map(|i| chw[(i % c) * h * w + i / c])
            .collect();
        let weight = values(cout * c * k * k, 8);
        let g = ConvGeometry::new(h, w, k, 2, (1, 1, 1, 1)).unwrap();
        let (rows, cols) = (g.out_h * g.out_w, c * k * k);
        let (mut a, mut b) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
        im2col_chw(&chw, c, &g, &mut a);
        im2col_hwc(&hwc, c, &g, &mut b);
        let (mut ya, mut yb) = (vec![0f32; rows * cout], vec![0f32; rows * cout]);
        matmul_wt(&a, &weight, &mut ya, rows, cols, cout);
        matmul_wt(
            &b,
            &weight_hwc(&weight, cout, c, k),
            &mut yb,
            rows,
            cols,
            cout,
        );
        let err = max_err(&ya, &yb);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn max_pool_by_hand() {
        // One channel 3×3, 3×3 window, stride 2, padding 1 → 2×2; negatives show the padding
        // never wins.
        let x = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0];
        let g = ConvGeometry::new(3, 3, 3, 2, (1, 1, 1, 1)).unwrap();
        let mut out = [0f32; 4];
        max_pool_hwc(&x, 1, &g, &mut out);
        assert_eq!(out, [-1.0, -2.0, -4.0, -5.0]);
    }

    #[test]
    fn im2col_then_matmul_is_a_dense_convolution() {
        // 1 input channel 3×3, 2×2 kernel, stride 1, no padding; weights [2, 1, 2, 2].
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let g = ConvGeometry::new(3, 3, 2, 1, (0, 0, 0, 0)).unwrap();
        let mut cols = vec![0f32; 4 * 4];
        im2col_chw(&x, 1, &g, &mut cols);
        assert_eq!(&cols[..4], &[1.0, 2.0, 4.0, 5.0]);
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = vec![0f32; 4 * 2];
        matmul_wt(&cols, &w, &mut out, 4, 4, 2);
        // Channel 0: x[y][x] + x[y+1][x+1]; channel 1: the 2×2 sum.
        assert_eq!(out, [6.0, 12.0, 8.0, 16.0, 12.0, 24.0, 14.0, 28.0]);
        let mut relu = out.clone();
        bias_act_rows(&mut out, &[-7.0, -10.0], Act::Relu6);
        assert_eq!(out, [0.0, 2.0, 1.0, 6.0, 5.0, 6.0, 6.0, 6.0]);
        bias_act_rows(&mut relu, &[-7.0, -10.0], Act::Relu);
        assert_eq!(relu, [0.0, 2.0, 1.0, 6.0, 5.0, 14.0, 7.0, 18.0]);
        let mut y = vec![1.0, -2.0];
        add_act(&mut y, &[0.5, 1.0], Act::Relu);
        assert_eq!(y, [1.5, 0.0]);
        add_act(&mut y, &[0.5, -1.0], Act::Identity);
        assert_eq!(y, [2.0, -1.0]);
    }
}
