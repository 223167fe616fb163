//! Backward passes of the channels-last kernels in [`super::nhwc`], for training on the same
//! layout as inference: a 1×1 (or im2col) convolution's gradients are two matrix products
//! (`dW += dZᵀ·X`, `dX += dZ·W`), a depthwise convolution's are accumulated per tap across
//! channels, and bias + activation turn the output gradient into the pre-activation one.
//! Every function accumulates into its gradient buffers (`+=`) and is single-threaded: the
//! caller splits the batch across threads, as in the forward.

use super::bf16_gemm::{self, Lhs, Precision, Rhs, Strided};
use super::nhwc::{Act, ConvGeometry};

/// `dst[m, n] (+)= Σ_k lhs(i, k) · rhs(k, j)` with the operands given by (column, row)
/// strides; `accumulate` adds to `dst`, else overwrites it. With [`Precision::Bf16`] the
/// operands are rounded to bf16 ([`bf16_gemm::gemm`]).
#[allow(clippy::too_many_arguments)]
fn gemm_acc(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |cs: usize, rs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.len() >= m * n
            && lhs.len() > last(lhs_cs, lhs_rs, m, k)
            && rhs.len() > last(rhs_cs, rhs_rs, k, n),
        "gemm_acc: buffers too small for [{m}, {k}] x [{k}, {n}]"
    );
    if precision == Precision::Bf16 {
        let view = |data, (col_stride, row_stride)| Strided {
            data,
            row_stride,
            col_stride,
        };
        let (lhs, rhs) = (view(lhs, (lhs_cs, lhs_rs)), view(rhs, (rhs_cs, rhs_rs)));
        bf16_gemm::gemm(
            (m, n, k),
            dst,
            accumulate,
            Lhs::View(lhs),
            Rhs::View(rhs),
            None,
        );
        return;
    }
    // SAFETY: the assertion keeps the last element of every strided view inside its slice
    // (all strides are non-negative); `dst` is exclusively borrowed and aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Weight gradient of `z = x · wᵀ` (a 1×1 convolution over `m` pixels, or a dense one over
/// its im2col rows): `dw[n, k] += Σ_m dz[m, n] · x[m, k]`.
pub fn weight_grad_acc(
    precision: Precision,
    dz: &[f32],
    x: &[f32],
    dw: &mut [f32],
    (m, k, n): (usize, usize, usize),
) {
    // dzᵀ is [n, m] with column stride n and row stride 1; x is [m, k] row-major.
    gemm_acc(precision, (n, k, m), dw, dz, (n, 1), x, (1, k), true);
}

/// [`weight_grad_acc`] in bf16 with `x` already as bf16 pairs (row-major `[m, k]`, k even:
/// [`bf16_gemm::im2col_hwc_pairs`]), which no product then converts again.
pub fn weight_grad_acc_bf16(
    dz: &[f32],
    x_pairs: &[u32],
    dw: &mut [f32],
    (m, k, n): (usize, usize, usize),
) {
    let dz_t = Strided::transposed(dz, n);
    bf16_gemm::gemm(
        (n, k, m),
        dw,
        true,
        Lhs::View(dz_t),
        Rhs::Bf16(x_pairs),
        None,
    );
}

/// Input gradient of `z = x · wᵀ`: `dx[m, k] += Σ_n dz[m, n] · w[n, k]`.
pub fn input_grad_acc(
    precision: Precision,
    dz: &[f32],
    w: &[f32],
    dx: &mut [f32],
    (m, k, n): (usize, usize, usize),
) {
    gemm_acc(precision, (m, k, n), dx, dz, (1, n), w, (1, k), true);
}

/// [`input_grad_acc`] overwriting `dx[..m·k]` instead of adding to it (no zeroing pass over a
/// large im2col gradient).
pub fn input_grad(
    precision: Precision,
    dz: &[f32],
    w: &[f32],
    dx: &mut [f32],
    (m, k, n): (usize, usize, usize),
) {
    gemm_acc(precision, (m, k, n), dx, dz, (1, n), w, (1, k), false);
}

/// The adjoint of [`super::nhwc::im2col_hwc`] for one image: adds each row of the gradient
/// `dcols` (`[out_h · out_w, k · k · c]`) back onto the input pixels its taps read, `dx`
/// (`[h, w, c]`); taps over the padding are dropped.
pub fn col2im_hwc_acc(dcols: &[f32], c: usize, g: &ConvGeometry, dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { wide::col2im_hwc_acc(dcols, c, g, dx) };
        return;
    }
    col2im_hwc_body(dcols, c, g, dx)
}

#[inline(always)]
fn col2im_hwc_body(dcols: &[f32], c: usize, g: &ConvGeometry, dx: &mut [f32]) {
    let k = g.kernel;
    let cols = k * k * c;
    assert!(
        dx.len() >= g.h * g.w * c && dcols.len() >= g.out_h * g.out_w * cols,
        "col2im: buffers too small"
    );
    for oy in 0..g.out_h {
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for ox in 0..g.out_w {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let row = &dcols[(oy * g.out_w + ox) * cols..][..cols];
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad_top;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride + kx - g.pad_left;
                    let src = &row[(ky * k + kx) * c..][..c];
                    dx[(iy * g.w + ix) * c..][..c]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(d, &s)| *d += s);
                }
            }
        }
    }
}

/// Backward of [`super::nhwc::max_pool_hwc`] over one image: each output's gradient `dy`
/// (`[out_h, out_w, c]`) is added to the first input of its window (taps in row order) that
/// equals the output `y`, in `dx` (`[h, w, c]`), as PyTorch routes it.
pub fn max_pool_grad_acc(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    c: usize,
    g: &ConvGeometry,
    dx: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { wide::max_pool_grad_acc(x, y, dy, c, g, dx) };
        return;
    }
    max_pool_grad_body(x, y, dy, c, g, dx)
}

#[inline(always)]
fn max_pool_grad_body(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    c: usize,
    g: &ConvGeometry,
    dx: &mut [f32],
) {
    assert!(
        x.len() >= g.h * g.w * c
            && dx.len() >= g.h * g.w * c
            && y.len() >= g.out_h * g.out_w * c
            && dy.len() >= g.out_h * g.out_w * c,
        "max_pool_grad: buffers too small"
    );
    // Per channel, the gradient not yet handed out: taken by the first tap that equals the
    // maximum, zero after it (selects, not branches, so that the loop vectorises).
    let mut left = vec![0f32; c];
    for oy in 0..g.out_h {
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for ox in 0..g.out_w {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let at = (oy * g.out_w + ox) * c;
            let ys = &y[at..][..c];
            left.copy_from_slice(&dy[at..][..c]);
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad_top;
                for kx in kx0..kx1 {
                    let from = (iy * g.w + ix(ox, kx, g)) * c;
                    let (xs, dxs) = (&x[from..][..c], &mut dx[from..][..c]);
                    for ((d, l), (&v, &m)) in dxs.iter_mut().zip(&mut left).zip(xs.iter().zip(ys)) {
                        let hit = v == m;
                        *d += if hit { *l } else { 0.0 };
                        *l = if hit { 0.0 } else { *l };
                    }
                }
            }
        }
    }
}

/// The input column of output column `ox`'s tap `kx` (inside the map).
fn ix(ox: usize, kx: usize, g: &ConvGeometry) -> usize {
    ox * g.stride + kx - g.pad_left
}

/// Turns the gradient of an activation's output into that of its input, in place, from the
/// output `y` (`0 < y < 6` passes for ReLU6, `y > 0` for ReLU: the masks of the candle ops).
pub fn act_grad(dy: &mut [f32], y: &[f32], act: Act) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { wide::act_grad(dy, y, act) };
        return;
    }
    act_grad_body(dy, y, act)
}

#[inline(always)]
fn act_grad_body(dy: &mut [f32], y: &[f32], act: Act) {
    // Selects, not branches: the masks follow the data, which no branch predictor guesses,
    // and a select vectorises.
    match act {
        Act::Identity => {}
        Act::Relu => dy.iter_mut().zip(y).for_each(|(d, &v)| {
            *d = if v <= 0.0 { 0.0 } else { *d };
        }),
        Act::Relu6 => dy.iter_mut().zip(y).for_each(|(d, &v)| {
            let cut = (v <= 0.0) | (v >= 6.0);
            *d = if cut { 0.0 } else { *d };
        }),
    }
}

/// Bias gradient: `db[c] += Σ_rows dz[row, c]` over rows of `db.len()` channels.
pub fn bias_grad_acc(dz: &[f32], db: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { wide::bias_grad_acc(dz, db) };
        return;
    }
    bias_grad_body(dz, db)
}

#[inline(always)]
fn bias_grad_body(dz: &[f32], db: &mut [f32]) {
    for row in dz.chunks_exact(db.len()) {
        db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
    }
}

/// Gradients of a depthwise convolution over one channels-last image (see
/// [`super::nhwc::DepthwiseFn`]): from the pre-activation output gradient `dz`
/// (`[out_h, out_w, c]`), accumulates the input's `dx` (`[h, w, c]`) when given and the
/// tap-major weight's `dtaps` (`[k·k, c]`).
pub fn depthwise_grad_acc(
    x: &[f32],
    taps: &[f32],
    dz: &[f32],
    g: &ConvGeometry,
    dx: Option<&mut [f32]>,
    dtaps: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { wide::depthwise_grad_acc(x, taps, dz, g, dx, dtaps) };
        return;
    }
    depthwise_grad_body(x, taps, dz, g, dx, dtaps)
}

/// [`depthwise_grad_acc`]'s loops, compiled once for the baseline target and once with
/// AVX-512 (the same operations per element, so the same bits).
#[inline(always)]
fn depthwise_grad_body(
    x: &[f32],
    taps: &[f32],
    dz: &[f32],
    g: &ConvGeometry,
    mut dx: Option<&mut [f32]>,
    dtaps: &mut [f32],
) {
    let c = dtaps.len() / (g.kernel * g.kernel).max(1);
    let k = g.kernel;
    assert!(
        c > 0
            && dtaps.len() == k * k * c
            && taps.len() >= k * k * c
            && x.len() >= g.h * g.w * c
            && dz.len() >= g.out_h * g.out_w * c
            && dx.as_ref().is_none_or(|d| d.len() >= g.h * g.w * c),
        "depthwise_grad: buffers do not fit {c} channels"
    );
    for oy in 0..g.out_h {
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for ox in 0..g.out_w {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let d = &dz[(oy * g.out_w + ox) * c..][..c];
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad_top;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride + kx - g.pad_left;
                    let (at, t) = ((iy * g.w + ix) * c, (ky * k + kx) * c);
                    let xs = &x[at..][..c];
                    let dw = &mut dtaps[t..][..c];
                    dw.iter_mut()
                        .zip(d)
                        .zip(xs)
                        .for_each(|((w, &d), &x)| *w += d * x);
                    if let Some(dx) = dx.as_deref_mut() {
                        let ws = &taps[t..][..c];
                        dx[at..][..c]
                            .iter_mut()
                            .zip(d)
                            .zip(ws)
                            .for_each(|((o, &d), &w)| *o += d * w);
                    }
                }
            }
        }
    }
}

/// The element-wise backward loops compiled with AVX-512 (vectorised by the compiler; the
/// same operations per element as the baseline build, so the same results to the bit).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{Act, ConvGeometry};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn depthwise_grad_acc(
        x: &[f32],
        taps: &[f32],
        dz: &[f32],
        g: &ConvGeometry,
        dx: Option<&mut [f32]>,
        dtaps: &mut [f32],
    ) {
        super::depthwise_grad_body(x, taps, dz, g, dx, dtaps)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_pool_grad_acc(
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        c: usize,
        g: &ConvGeometry,
        dx: &mut [f32],
    ) {
        super::max_pool_grad_body(x, y, dy, c, g, dx)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn col2im_hwc_acc(dcols: &[f32], c: usize, g: &ConvGeometry, dx: &mut [f32]) {
        super::col2im_hwc_body(dcols, c, g, dx)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn act_grad(dy: &mut [f32], y: &[f32], act: Act) {
        super::act_grad_body(dy, y, act)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn bias_grad_acc(dz: &[f32], db: &mut [f32]) {
        super::bias_grad_body(dz, db)
    }
}

/// Backward of a global average pool: each of an image's `pixels` rows of `dx`
/// (`[n · pixels, dim]`) gets the image's `dy` row (`[n, dim]`) divided by `pixels`.
pub fn global_avg_pool_grad(dy: &[f32], n: usize, pixels: usize, dim: usize, dx: &mut [f32]) {
    let scale = 1.0 / pixels as f32;
    for (i, d) in dy.chunks_exact(dim).enumerate().take(n) {
        for row in dx[i * pixels * dim..][..pixels * dim].chunks_exact_mut(dim) {
            row.iter_mut().zip(d).for_each(|(o, &g)| *o = g * scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::nhwc::{self, depthwise_portable, depthwise_taps_major};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.unit_f64() as f32 * 2.0 - 1.0).collect()
    }

    /// `Σ probe · f(params)` in f64, for central differences.
    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// Central difference of `loss` along each coordinate of `params` (step `h`), compared
    /// with `analytic`; returns the largest error relative to the largest gradient. A loss of
    /// NaN (a step across an activation's kink) skips the coordinate, for at most 10% of them.
    fn fd_check(
        params: &mut [f32],
        analytic: &[f32],
        h: f32,
        loss: &mut dyn FnMut(&[f32]) -> f64,
    ) -> f64 {
        let scale = analytic.iter().fold(0f32, |a, &g| a.max(g.abs())) as f64;
        assert!(scale > 0.0, "a zero gradient checks nothing");
        let (mut worst, mut skipped) = (0f64, 0);
        for i in 0..params.len() {
            let keep = params[i];
            params[i] = keep + h;
            let up = loss(params);
            params[i] = keep - h;
            let down = loss(params);
            params[i] = keep;
            let numeric = (up - down) / (2.0 * h as f64);
            if numeric.is_nan() {
                skipped += 1;
                continue;
            }
            worst = worst.max((numeric - analytic[i] as f64).abs() / scale);
        }
        assert!(
            skipped * 10 <= params.len(),
            "{skipped} of {} coordinates cross a kink",
            params.len()
        );
        worst
    }

    #[test]
    fn pointwise_gradients_match_finite_differences() {
        // z = act(x·wᵀ + b) over 7 pixels, 5 → 4 channels; loss = Σ probe · z.
        let (m, k, n) = (7, 5, 4);
        let (x, w, b, probe) = (
            values(m * k, 1),
            values(n * k, 2),
            values(n, 3),
            values(m * n, 4),
        );
        for act in [Act::Identity, Act::Relu] {
            let forward = |x: &[f32], w: &[f32], b: &[f32]| {
                let mut z = vec![0f32; m * n];
                nhwc::matmul_wt(x, w, &mut z, m, k, n);
                nhwc::bias_act_rows(&mut z, b, act);
                z
            };
            let y = forward(&x, &w, &b);
            let mut dz = probe.clone();
            act_grad(&mut dz, &y, act);
            let (mut dw, mut dx, mut db) = (vec![0f32; n * k], vec![0f32; m * k], vec![0f32; n]);
            weight_grad_acc(Precision::F32, &dz, &x, &mut dw, (m, k, n));
            input_grad_acc(Precision::F32, &dz, &w, &mut dx, (m, k, n));
            bias_grad_acc(&dz, &mut db);
            let h = 1e-2;
            let err_w = fd_check(&mut w.clone(), &dw, h, &mut |p| {
                dot(&forward(&x, p, &b), &probe)
            });
            let err_x = fd_check(&mut x.clone(), &dx, h, &mut |p| {
                dot(&forward(p, &w, &b), &probe)
            });
            let err_b = fd_check(&mut b.clone(), &db, h, &mut |p| {
                dot(&forward(&x, &w, p), &probe)
            });
            assert!(
                err_w < 1e-3 && err_x < 1e-3 && err_b < 1e-3,
                "{act:?}: {err_w} {err_x} {err_b}"
            );
        }
        // Accumulation: a second call adds the same amount again.
        let mut dw = vec![1f32; n * k];
        weight_grad_acc(Precision::F32, &probe, &x, &mut dw, (m, k, n));
        let mut once = vec![0f32; n * k];
        weight_grad_acc(Precision::F32, &probe, &x, &mut once, (m, k, n));
        for (a, b) in dw.iter().zip(&once) {
            assert!((a - 1.0 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn depthwise_gradients_match_finite_differences() {
        // Strides 1 and 2, symmetric and TensorFlow-style asymmetric padding, 3×3 and 5×5,
        // channels past a vector block; ReLU6 with values that cross both clamps.
        for &(h, w, c, k, s, pads) in &[
            (5, 6, 3, 3, 1, (1, 1, 1, 1)),
            (7, 6, 18, 3, 2, (0, 1, 0, 1)),
            (6, 5, 2, 5, 2, (1, 2, 1, 2)),
        ] {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x: Vec<f32> = values(h * w * c, 5).iter().map(|v| v * 4.0).collect();
            let weight = values(c * k * k, 6);
            let bias = values(c, 7);
            let probe = values(g.out_h * g.out_w * c, 8);
            for act in [Act::Identity, Act::Relu6] {
                let hstep = if act == Act::Relu6 { 1e-3 } else { 1e-2 };
                let taps = depthwise_taps_major(&weight, c, k);
                let run = |x: &[f32], taps: &[f32], b: &[f32]| {
                    let mut out = vec![0f32; g.out_h * g.out_w * c];
                    depthwise_portable(x, taps, b, &g, act, &mut out);
                    out
                };
                let clamped =
                    |v: &[f32]| -> Vec<bool> { v.iter().map(|&v| v <= 0.0 || v >= 6.0).collect() };
                let base = clamped(&run(&x, &taps, &bias));
                // The output, or NaN when a step moved an output across a kink of ReLU6 (where
                // a finite difference says nothing).
                let forward = |x: &[f32], taps: &[f32], b: &[f32]| {
                    let mut out = run(x, taps, b);
                    if act == Act::Relu6 && clamped(&out) != base {
                        out[0] = f32::NAN;
                    }
                    out
                };
                let y = forward(&x, &taps, &bias);
                if act == Act::Relu6 {
                    assert!(y.contains(&0.0), "some outputs clamp at 0");
                }
                let mut dz = probe.clone();
                act_grad(&mut dz, &y, act);
                let (mut dx, mut dtaps, mut db) =
                    (vec![0f32; x.len()], vec![0f32; taps.len()], vec![0f32; c]);
                depthwise_grad_acc(&x, &taps, &dz, &g, Some(&mut dx), &mut dtaps);
                bias_grad_acc(&dz, &mut db);
                let err_t = fd_check(&mut taps.clone(), &dtaps, hstep, &mut |p| {
                    dot(&forward(&x, p, &bias), &probe)
                });
                let err_x = fd_check(&mut x.clone(), &dx, hstep, &mut |p| {
                    dot(&forward(p, &taps, &bias), &probe)
                });
                let err_b = fd_check(&mut bias.clone(), &db, hstep, &mut |p| {
                    dot(&forward(&x, &taps, p), &probe)
                });
                assert!(
                    err_t < 2e-3 && err_x < 2e-3 && err_b < 2e-3,
                    "{h}x{w}x{c} k{k} s{s} {act:?}: {err_t} {err_x} {err_b}"
                );
                // Without an input gradient the weight gradient is the same.
                let mut alone = vec![0f32; taps.len()];
                depthwise_grad_acc(&x, &taps, &dz, &g, None, &mut alone);
                assert_eq!(alone, dtaps);
            }
        }
    }

    #[test]
    fn pooling_and_activation_gradients_by_hand() {
        // Two images of 2 pixels × 2 channels.
        let mut dx = vec![f32::NAN; 8];
        global_avg_pool_grad(&[2.0, 4.0, -2.0, 6.0], 2, 2, 2, &mut dx);
        assert_eq!(dx, [1.0, 2.0, 1.0, 2.0, -1.0, 3.0, -1.0, 3.0]);
        let y = [0.0, 3.0, 6.0, 7.0];
        let mut d = [1.0; 4];
        act_grad(&mut d, &y, Act::Relu6);
        assert_eq!(d, [0.0, 1.0, 0.0, 0.0]);
        let mut d = [1.0; 4];
        act_grad(&mut d, &y, Act::Relu);
        assert_eq!(d, [0.0, 1.0, 1.0, 1.0]);
        let mut db = [1.0, 0.0];
        bias_grad_acc(&[1.0, 2.0, 3.0, 4.0], &mut db);
        assert_eq!(db, [5.0, 6.0]);
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), r> = <x, col2im(r)> for every geometry (stride 1 and 2, symmetric and
        // asymmetric padding, 1×1 stride 2 as ResNet's shortcut projection).
        for &(h, w, c, k, s, pads) in &[
            (5, 6, 3, 3, 1, (1, 1, 1, 1)),
            (7, 6, 17, 3, 2, (1, 1, 1, 1)),
            (8, 8, 4, 1, 2, (0, 0, 0, 0)),
            (6, 5, 2, 5, 2, (1, 2, 1, 2)),
        ] {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x = values(h * w * c, 11);
            let r = values(g.out_h * g.out_w * k * k * c, 12);
            let mut cols = vec![0f32; r.len()];
            nhwc::im2col_hwc(&x, c, &g, &mut cols);
            let mut dx = vec![0.5f32; x.len()];
            col2im_hwc_acc(&r, c, &g, &mut dx);
            let back: Vec<f32> = dx.iter().map(|v| v - 0.5).collect();
            let (lhs, rhs) = (dot(&cols, &r), dot(&x, &back));
            assert!(
                (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
                "{h}x{w}x{c} k{k} s{s}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn input_grad_overwrites_what_input_grad_acc_adds() {
        let (m, k, n) = (7, 5, 3);
        let (dz, w) = (values(m * n, 13), values(n * k, 14));
        let mut acc = vec![0f32; m * k];
        input_grad_acc(Precision::F32, &dz, &w, &mut acc, (m, k, n));
        let mut over = vec![f32::NAN; m * k];
        input_grad(Precision::F32, &dz, &w, &mut over, (m, k, n));
        assert_eq!(acc, over);
    }

    #[test]
    fn max_pool_gradient_by_hand() {
        // One channel, 4×4, 3×3 windows with stride 2 and padding 1: output 2×2.
        let x = [
            1., 9., 2., 3., //
            4., 5., 6., 16., //
            7., 8., 10., 11., //
            12., 13., 14., 15.,
        ];
        let g = ConvGeometry::new(4, 4, 3, 2, (1, 1, 1, 1)).unwrap();
        let mut y = [0f32; 4];
        nhwc::max_pool_hwc(&x, 1, &g, &mut y);
        assert_eq!(y, [9., 16., 13., 16.]);
        let mut dx = [0f32; 16];
        max_pool_grad_acc(&x, &y, &[1., 2., 3., 4.], 1, &g, &mut dx);
        let mut want = [0f32; 16];
        want[1] = 1.0; // 9
        want[7] = 2.0 + 4.0; // 16 wins two windows
        want[13] = 3.0; // 13
        assert_eq!(dx, want);
        // A tie goes to the window's first tap only; two channels kept apart.
        let x = [2., 0., 2., 1., 2., 3., 0., 1.]; // 2×2 pixels × 2 channels
        let g = ConvGeometry::new(2, 2, 2, 2, (0, 0, 0, 0)).unwrap();
        let mut y = [0f32; 2];
        nhwc::max_pool_hwc(&x, 2, &g, &mut y);
        assert_eq!(y, [2., 3.]);
        let mut dx = [0f32; 8];
        max_pool_grad_acc(&x, &y, &[5., 7.], 2, &g, &mut dx);
        assert_eq!(dx, [5., 0., 0., 0., 0., 7., 0., 0.]);
    }
}
