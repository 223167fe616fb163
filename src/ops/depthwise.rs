//! Direct depthwise 2-D convolution (one filter per channel, multiplier 1), forward and
//! backward, as candle custom ops.
//!
//! candle runs a grouped convolution as one convolution per group, so MobileNetV2's and
//! EfficientNet's depthwise layers (hundreds of groups) are slow there. This op walks each
//! (image, channel) plane once: for every output row and filter tap it adds a scaled input row,
//! an inner loop the compiler vectorises for stride 1. Padding may be asymmetric (TF "same").
//! Forward, input gradient and weight gradient are three ops; the forward op's `bwd` applies
//! the other two, so the op is differentiable with candle's autograd. f32 only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Geometry of a depthwise convolution: stride and padding (top, bottom, left, right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseParams {
    pub stride: (usize, usize),
    pub pad_top: usize,
    pub pad_bottom: usize,
    pub pad_left: usize,
    pub pad_right: usize,
}

impl DepthwiseParams {
    /// Symmetric padding `pad` on every side with the same stride on both axes.
    pub fn symmetric(stride: usize, pad: usize) -> Self {
        Self {
            stride: (stride, stride),
            pad_top: pad,
            pad_bottom: pad,
            pad_left: pad,
            pad_right: pad,
        }
    }

    /// Output size along one axis, or an error when the kernel does not fit.
    fn out_dim(
        input: usize,
        pad_lo: usize,
        pad_hi: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<usize> {
        let padded = input + pad_lo + pad_hi;
        if stride == 0 || kernel == 0 || padded < kernel {
            candle_core::bail!("depthwise conv: kernel {kernel} does not fit input {input} padded by {pad_lo}+{pad_hi} (stride {stride})");
        }
        Ok((padded - kernel) / stride + 1)
    }
}

/// Sizes of one call, derived from the input and weight shapes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Dims {
    fn new(x: &Shape, weight: &Shape, p: &DepthwiseParams) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (wc, one, kh, kw) = weight.dims4()?;
        if wc != c || one != 1 {
            candle_core::bail!("depthwise conv: weight shape {weight:?} does not match input {x:?}, expected [{c}, 1, kh, kw]");
        }
        let oh = DepthwiseParams::out_dim(h, p.pad_top, p.pad_bottom, kh, p.stride.0)?;
        let ow = DepthwiseParams::out_dim(w, p.pad_left, p.pad_right, kw, p.stride.1)?;
        Ok(Self {
            n,
            c,
            h,
            w,
            kh,
            kw,
            oh,
            ow,
        })
    }
}

/// Range of output indices `o` for which `o * stride + k - pad` lies in `[0, len)`.
fn valid_range(
    k: usize,
    pad: usize,
    stride: usize,
    len: usize,
    out_len: usize,
) -> std::ops::Range<usize> {
    // o*stride >= pad - k  and  o*stride <= len - 1 + pad - k
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi_num = (len + pad).checked_sub(k + 1);
    let hi = match hi_num {
        Some(v) => (v / stride + 1).min(out_len),
        None => 0,
    };
    lo.min(hi)..hi
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("depthwise conv: {what} must be f32, found {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("depthwise conv: {what} must be contiguous"),
    }
}

/// One filter column `kx` of the forward pass: the output columns it reaches and where their
/// inputs start in the row's stride phase `phase` (`row[phase], row[phase + s], …`).
struct ColumnTap {
    kx: usize,
    cols: std::ops::Range<usize>,
    phase: usize,
    start: usize,
}

fn column_taps(d: &Dims, p: &DepthwiseParams) -> Vec<ColumnTap> {
    let s = p.stride.1 as isize;
    (0..d.kw)
        .filter_map(|kx| {
            let cols = valid_range(kx, p.pad_left, p.stride.1, d.w, d.ow);
            if cols.is_empty() {
                return None;
            }
            // Input column of output column ox: ox·s + t = (ox + off)·s + phase.
            let t = kx as isize - p.pad_left as isize;
            let phase = t.rem_euclid(s);
            let off = (t - phase) / s;
            let start = (cols.start as isize + off) as usize;
            Some(ColumnTap {
                kx,
                cols,
                phase: phase as usize,
                start,
            })
        })
        .collect()
}

/// Forward: `out[n,c,oy,ox] = Σ x[n,c,oy·s+ky−pt, ox·s+kx−pl] · w[c,0,ky,kx]`.
///
/// Per (image, channel) plane: with stride s > 1 the plane is first split into its s column
/// phases, so every filter tap becomes a contiguous `out_row += tap · src` that vectorises;
/// the valid row and column ranges of each tap are computed once per call.
fn forward(x: &[f32], weight: &[f32], d: Dims, p: &DepthwiseParams) -> Vec<f32> {
    let (sh, sw) = p.stride;
    let rows: Vec<std::ops::Range<usize>> = (0..d.kh)
        .map(|ky| valid_range(ky, p.pad_top, sh, d.h, d.oh))
        .collect();
    let taps = column_taps(&d, p);
    // Phase q of a row holds columns q, q + s, …: its length and offset in the phased row.
    let phase_len: Vec<usize> = (0..sw).map(|q| (d.w + sw - 1 - q) / sw).collect();
    let phase_offset: Vec<usize> = phase_len
        .iter()
        .scan(0, |acc, &l| Some(std::mem::replace(acc, *acc + l)))
        .collect();
    let mut out = vec![0f32; d.n * d.c * d.oh * d.ow];
    let plane_len = d.oh * d.ow;
    // MobileNet's most common layer (3×3, stride 1, padding 1) has its own kernel.
    let pads = (p.pad_top, p.pad_bottom, p.pad_left, p.pad_right);
    let same_3x3 = d.kh == 3 && d.kw == 3 && p.stride == (1, 1) && pads == (1, 1, 1, 1) && d.w >= 3;
    // Several small planes per task, so tiny late-layer maps do not drown in task overhead.
    let planes_per_task = (PLANE_WORK / plane_len.max(1)).max(1);
    out.par_chunks_mut(plane_len * planes_per_task)
        .enumerate()
        .for_each(|(task, outs)| {
            for (k, out) in outs.chunks_mut(plane_len).enumerate() {
                let plane = task * planes_per_task + k;
                let c = plane % d.c;
                let input = &x[plane * d.h * d.w..(plane + 1) * d.h * d.w];
                let filter = &weight[c * d.kh * d.kw..(c + 1) * d.kh * d.kw];
                if same_3x3 {
                    conv3x3_same_plane(input, d.h, d.w, filter, out);
                    continue;
                }
                let phased: Vec<f32>;
                let input = if sw == 1 {
                    input
                } else {
                    let mut buf = vec![0f32; d.h * d.w];
                    for (src, dst) in input.chunks_exact(d.w).zip(buf.chunks_exact_mut(d.w)) {
                        for q in 0..sw {
                            for (j, v) in dst[phase_offset[q]..phase_offset[q] + phase_len[q]]
                                .iter_mut()
                                .enumerate()
                            {
                                *v = src[q + j * sw];
                            }
                        }
                    }
                    phased = buf;
                    &phased
                };
                for (oy, out_row) in out.chunks_exact_mut(d.ow).enumerate() {
                    for ky in 0..d.kh {
                        if !rows[ky].contains(&oy) {
                            continue;
                        }
                        let row = &input[(oy * sh + ky - p.pad_top) * d.w..][..d.w];
                        for tap in &taps {
                            let weight = filter[ky * d.kw + tap.kx];
                            let begin = phase_offset[tap.phase] + tap.start;
                            let src = &row[begin..begin + tap.cols.len()];
                            for (o, &v) in out_row[tap.cols.clone()].iter_mut().zip(src) {
                                *o += weight * v;
                            }
                        }
                    }
                }
            }
        });
    out
}

/// 3×3 depthwise, stride 1, padding 1, on one plane: each output is its nine products summed
/// in registers (one write instead of nine read-modify-write passes). Rows outside the plane
/// read as zeros. Needs `w ≥ 3`.
fn conv3x3_same_plane(input: &[f32], h: usize, w: usize, f: &[f32], out: &mut [f32]) {
    let zeros = vec![0f32; w];
    for (oy, out_row) in out.chunks_exact_mut(w).enumerate() {
        let row = |iy: Option<usize>| {
            iy.filter(|&r| r < h)
                .map_or(&zeros[..], |r| &input[r * w..(r + 1) * w])
        };
        let rows = [row(oy.checked_sub(1)), row(Some(oy)), row(Some(oy + 1))];
        // Interior columns 1..w−1: taps at x−1, x, x+1.
        let inner = &mut out_row[1..w - 1];
        inner.fill(0.0);
        for (ky, r) in rows.iter().enumerate() {
            let (f0, f1, f2) = (f[3 * ky], f[3 * ky + 1], f[3 * ky + 2]);
            let (left, mid, right) = (&r[..w - 2], &r[1..w - 1], &r[2..]);
            for (((o, &a), &b), &c) in inner.iter_mut().zip(left).zip(mid).zip(right) {
                *o += f0 * a + f1 * b + f2 * c;
            }
        }
        // Border columns: the tap outside the plane reads zero.
        let (mut first, mut last) = (0f32, 0f32);
        for (ky, r) in rows.iter().enumerate() {
            first += f[3 * ky + 1] * r[0] + f[3 * ky + 2] * r[1];
            last += f[3 * ky] * r[w - 2] + f[3 * ky + 1] * r[w - 1];
        }
        out_row[0] = first;
        out_row[w - 1] = last;
    }
}

/// Output values per parallel task of the forward pass.
const PLANE_WORK: usize = 4096;

/// Input gradient: scatters `grad[n,c,oy,ox] · w[c,0,ky,kx]` back to the input positions.
fn backward_input(grad: &[f32], weight: &[f32], d: Dims, p: &DepthwiseParams) -> Vec<f32> {
    let (sh, sw) = p.stride;
    let mut gx = vec![0f32; d.n * d.c * d.h * d.w];
    gx.par_chunks_mut(d.h * d.w)
        .enumerate()
        .for_each(|(plane, gx)| {
            let c = plane % d.c;
            let g = &grad[plane * d.oh * d.ow..(plane + 1) * d.oh * d.ow];
            let filter = &weight[c * d.kh * d.kw..(c + 1) * d.kh * d.kw];
            for ky in 0..d.kh {
                for oy in valid_range(ky, p.pad_top, sh, d.h, d.oh) {
                    let iy = oy * sh + ky - p.pad_top;
                    let g_row = &g[oy * d.ow..(oy + 1) * d.ow];
                    let gx_row = &mut gx[iy * d.w..(iy + 1) * d.w];
                    for kx in 0..d.kw {
                        let tap = filter[ky * d.kw + kx];
                        for ox in valid_range(kx, p.pad_left, sw, d.w, d.ow) {
                            gx_row[ox * sw + kx - p.pad_left] += tap * g_row[ox];
                        }
                    }
                }
            }
        });
    gx
}

/// Weight gradient: `gw[c,0,ky,kx] = Σ_n Σ_oy,ox grad[n,c,oy,ox] · x[n,c,iy,ix]`.
fn backward_weight(x: &[f32], grad: &[f32], d: Dims, p: &DepthwiseParams) -> Vec<f32> {
    let (sh, sw) = p.stride;
    let mut gw = vec![0f32; d.c * d.kh * d.kw];
    gw.par_chunks_mut(d.kh * d.kw)
        .enumerate()
        .for_each(|(c, gw)| {
            for n in 0..d.n {
                let plane = n * d.c + c;
                let input = &x[plane * d.h * d.w..(plane + 1) * d.h * d.w];
                let g = &grad[plane * d.oh * d.ow..(plane + 1) * d.oh * d.ow];
                for ky in 0..d.kh {
                    for oy in valid_range(ky, p.pad_top, sh, d.h, d.oh) {
                        let row = &input[(oy * sh + ky - p.pad_top) * d.w..][..d.w];
                        let g_row = &g[oy * d.ow..(oy + 1) * d.ow];
                        for kx in 0..d.kw {
                            let mut acc = 0f32;
                            for ox in valid_range(kx, p.pad_left, sw, d.w, d.ow) {
                                acc += g_row[ox] * row[ox * sw + kx - p.pad_left];
                            }
                            gw[ky * d.kw + kx] += acc;
                        }
                    }
                }
            }
        });
    gw
}

/// The forward op: `x.apply_op2(weight, DepthwiseConv2d(params))`.
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2d(DepthwiseParams);

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(l1.shape(), l2.shape(), &self.0)?;
        let out = forward(
            f32_slice(s1, l1, "input")?,
            f32_slice(s2, l2, "weight")?,
            d,
            &self.0,
        );
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.c, d.oh, d.ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = Dims::new(l1.shape(), l2.shape(), &self.0)?;
        let out = super::depthwise_cuda::launch(
            super::depthwise_cuda::Kernel::Forward,
            (s1, l1),
            (s2, l2),
            d,
            &self.0,
            d.n * d.c * d.oh * d.ow,
        )?;
        Ok((out, Shape::from((d.n, d.c, d.oh, d.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(
            weight,
            &DepthwiseBackwardInput {
                params: self.0,
                input_shape: x.shape().clone(),
            },
        )?;
        let gw = x.apply_op2_no_bwd(
            &grad,
            &DepthwiseBackwardWeight {
                params: self.0,
                weight_shape: weight.shape().clone(),
            },
        )?;
        Ok((Some(gx), Some(gw)))
    }
}

/// The output gradient of a backward op must have the forward output's shape (CPU and CUDA
/// paths alike).
fn check_gradient(shape: &Shape, d: Dims) -> Result<()> {
    if shape.dims() != [d.n, d.c, d.oh, d.ow] {
        candle_core::bail!(
            "depthwise conv backward: gradient shape {:?} does not match the output [{}, {}, {}, {}]",
            shape,
            d.n,
            d.c,
            d.oh,
            d.ow
        );
    }
    Ok(())
}

/// `grad_out.apply_op2(weight)` → gradient with respect to the input.
struct DepthwiseBackwardInput {
    params: DepthwiseParams,
    input_shape: Shape,
}

impl CustomOp2 for DepthwiseBackwardInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-backward-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(&self.input_shape, l2.shape(), &self.params)?;
        check_gradient(l1.shape(), d)?;
        let gx = backward_input(
            f32_slice(s1, l1, "gradient")?,
            f32_slice(s2, l2, "weight")?,
            d,
            &self.params,
        );
        Ok((CpuStorage::F32(gx), self.input_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = Dims::new(&self.input_shape, l2.shape(), &self.params)?;
        check_gradient(l1.shape(), d)?;
        let out = super::depthwise_cuda::launch(
            super::depthwise_cuda::Kernel::BackwardInput,
            (s1, l1),
            (s2, l2),
            d,
            &self.params,
            d.n * d.c * d.h * d.w,
        )?;
        Ok((out, self.input_shape.clone()))
    }
}

/// `x.apply_op2(grad_out)` → gradient with respect to the weight.
struct DepthwiseBackwardWeight {
    params: DepthwiseParams,
    weight_shape: Shape,
}

impl CustomOp2 for DepthwiseBackwardWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-backward-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(l1.shape(), &self.weight_shape, &self.params)?;
        check_gradient(l2.shape(), d)?;
        let gw = backward_weight(
            f32_slice(s1, l1, "input")?,
            f32_slice(s2, l2, "gradient")?,
            d,
            &self.params,
        );
        Ok((CpuStorage::F32(gw), self.weight_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = Dims::new(l1.shape(), &self.weight_shape, &self.params)?;
        check_gradient(l2.shape(), d)?;
        let out = super::depthwise_cuda::launch(
            super::depthwise_cuda::Kernel::BackwardWeight,
            (s1, l1),
            (s2, l2),
            d,
            &self.params,
            d.c * d.kh * d.kw,
        )?;
        Ok((out, self.weight_shape.clone()))
    }
}

static USE_GROUPED_CONV: AtomicBool = AtomicBool::new(false);

/// Routes [`depthwise_conv2d`] to candle's grouped convolution (`true`) or to the direct op
/// (`false`, the default), process-wide. For before/after benchmarks only.
pub fn set_grouped_conv_reference(on: bool) {
    USE_GROUPED_CONV.store(on, Ordering::Relaxed);
}

/// Depthwise convolution of `x` [N, C, H, W] with `weight` [C, 1, KH, KW] (f32): the direct
/// op on the CPU and (feature `cuda`) CUDA; elsewhere (Metal) candle's grouped convolution with
/// explicit padding.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, params: DepthwiseParams) -> Result<Tensor> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        candle_core::bail!(
            "depthwise conv: f32 tensors expected, found {:?} and {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    let direct = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if direct && !USE_GROUPED_CONV.load(Ordering::Relaxed) {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, DepthwiseConv2d(params));
    }
    grouped_conv_fallback(x, weight, params)
}

/// candle's grouped convolution with explicit padding (the reference the op is tested against).
pub fn grouped_conv_fallback(x: &Tensor, weight: &Tensor, p: DepthwiseParams) -> Result<Tensor> {
    let x = x
        .pad_with_zeros(2, p.pad_top, p.pad_bottom)?
        .pad_with_zeros(3, p.pad_left, p.pad_right)?;
    if p.stride.0 != p.stride.1 {
        candle_core::bail!(
            "depthwise conv fallback: only equal strides are supported, found {:?}",
            p.stride
        );
    }
    let groups = weight.dim(0)?;
    x.conv2d(weight, 0, p.stride.0, 1, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn backward_ops_refuse_a_gradient_of_the_wrong_shape() {
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let (x, w) = (zeros(&[1, 2, 5, 5]), zeros(&[2, 1, 3, 3]));
        let params = DepthwiseParams::symmetric(1, 0);
        // The output is [1, 2, 3, 3]; a [1, 2, 4, 4] gradient is refused by both ops.
        let bad = zeros(&[1, 2, 4, 4]);
        let input = DepthwiseBackwardInput {
            params,
            input_shape: x.shape().clone(),
        };
        let err = bad.apply_op2_no_bwd(&w, &input).unwrap_err().to_string();
        assert!(
            err.contains("does not match the output [1, 2, 3, 3]"),
            "{err}"
        );
        let weight = DepthwiseBackwardWeight {
            params,
            weight_shape: w.shape().clone(),
        };
        let err = x.apply_op2_no_bwd(&bad, &weight).unwrap_err().to_string();
        assert!(
            err.contains("does not match the output [1, 2, 3, 3]"),
            "{err}"
        );
        assert!(zeros(&[1, 2, 3, 3]).apply_op2_no_bwd(&w, &input).is_ok());
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff: f32 = max_abs_diff(a, b);
        let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        diff / scale.max(1e-6)
    }

    #[test]
    fn exact_small_case() {
        // 1×1×3×3 input 1..9, 2×2 filter of ones, stride 1, padding 0 → sums of 2×2 windows.
        let dev = Device::Cpu;
        let x = Tensor::arange(1f32, 10., &dev)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let w = Tensor::ones((1, 1, 2, 2), DType::F32, &dev).unwrap();
        let y = depthwise_conv2d(&x, &w, DepthwiseParams::symmetric(1, 0)).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![12., 16., 24., 28.]
        );
        // Stride 2, padding 1: windows at (-1,-1), (-1,1), (1,-1), (1,1).
        let y = depthwise_conv2d(&x, &w, DepthwiseParams::symmetric(2, 1)).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 5., 11., 28.]
        );
    }

    #[test]
    fn matches_grouped_conv_forward_and_naive_gradients() {
        let dev = Device::Cpu;
        let cases = [
            // (n, c, h, w, k, stride, pad_top, pad_bottom, pad_left, pad_right)
            (2, 5, 9, 11, 3, 1, 1, 1, 1, 1),
            (1, 3, 8, 8, 3, 2, 0, 1, 0, 1),
            (3, 4, 13, 10, 5, 2, 2, 2, 2, 2),
            (2, 2, 7, 7, 5, 1, 2, 2, 2, 2),
            (1, 6, 6, 9, 3, 2, 1, 1, 1, 1),
            (2, 3, 5, 5, 1, 1, 0, 0, 0, 0),
            (1, 2, 10, 10, 3, 3, 0, 0, 0, 0),
        ];
        for (n, c, h, w, k, s, pt, pb, pl, pr) in cases {
            let p = DepthwiseParams {
                stride: (s, s),
                pad_top: pt,
                pad_bottom: pb,
                pad_left: pl,
                pad_right: pr,
            };
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap()).unwrap();
            let ours = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), p).unwrap();
            let reference = grouped_conv_fallback(x.as_tensor(), wt.as_tensor(), p).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_rel_diff(&ours, &reference) < 1e-5,
                "forward {:?}",
                (n, c, h, w, k, s)
            );

            // Gradients of the random linear functional Σ probe·y, against naive loops
            // (candle's own conv backward is wrong for some strided shapes).
            let probe = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let grads = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (gx_ref, gw_ref) = naive_grads(x.as_tensor(), wt.as_tensor(), &probe, &p);
            assert!(
                max_rel_diff(grads.get(x.as_tensor()).unwrap(), &gx_ref) < 1e-5,
                "input gradient {:?}",
                (n, c, h, w, k, s)
            );
            assert!(
                max_rel_diff(grads.get(wt.as_tensor()).unwrap(), &gw_ref) < 1e-5,
                "weight gradient {:?}",
                (n, c, h, w, k, s)
            );
        }
    }

    /// Gradients of Σ probe·conv(x, w) with respect to x and w, by the definition.
    fn naive_grads(
        x: &Tensor,
        w: &Tensor,
        probe: &Tensor,
        p: &DepthwiseParams,
    ) -> (Tensor, Tensor) {
        let (n, c, h, wd) = x.dims4().unwrap();
        let (_, _, kh, kw) = w.dims4().unwrap();
        let (_, _, oh, ow) = probe.dims4().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pv = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut gx = vec![0f32; xv.len()];
        let mut gw = vec![0f32; wv.len()];
        for b in 0..n {
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let g = pv[((b * c + ch) * oh + oy) * ow + ox];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * p.stride.0 + ky) as isize - p.pad_top as isize;
                                let ix = (ox * p.stride.1 + kx) as isize - p.pad_left as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * c + ch) * h + iy as usize) * wd + ix as usize;
                                let wi = (ch * kh + ky) * kw + kx;
                                gx[xi] += g * wv[wi];
                                gw[wi] += g * xv[xi];
                            }
                        }
                    }
                }
            }
        }
        let dev = x.device();
        (
            Tensor::from_vec(gx, x.shape(), dev).unwrap(),
            Tensor::from_vec(gw, w.shape(), dev).unwrap(),
        )
    }

    #[test]
    fn rejects_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 1, 3, 3), DType::F32, &dev).unwrap();
        let err = depthwise_conv2d(&x, &w, DepthwiseParams::symmetric(1, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
        let w = Tensor::zeros((3, 1, 7, 7), DType::F32, &dev).unwrap();
        let err = depthwise_conv2d(&x, &w, DepthwiseParams::symmetric(1, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
