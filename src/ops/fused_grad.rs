//! Fused CPU ops with their own backward passes, for training the vision transformers on
//! candle's autograd: layer-norm over the last dimension, softmax over the last dimension, a
//! bias added along the last dimension and exact (erf) GELU.
//!
//! Written as differentiable tensor formulas, each of these is 5–10 passes over the
//! activations forward and as many again backward, and the gradient of every broadcast (a
//! bias, a layer-norm's gain) is a reduction over the leading dimensions that candle runs on
//! one thread; together they took about a third of a ViT-B/16 training step (perf). Here each
//! is one pass forward and one backward, over rows in parallel. Reductions over rows (the
//! gradients of biases and gains) sum fixed blocks of rows in order, so results do not
//! depend on the thread count.
//!
//! Each function takes the fused path for f32 tensors on the CPU (made contiguous first) and the
//! same formula in candle's ops elsewhere (CUDA, Metal, other dtypes), so callers need not
//! care.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Rows per block of a row reduction: the unit of parallel work and of the fixed summation
/// order.
const ROWS_PER_BLOCK: usize = 32;

/// Whether `xs` all take the fused path: f32 on the CPU.
fn fused(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// A contiguous f32 CPU tensor's values.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `storage` under `layout` as a contiguous slice, or an error naming `op`.
pub(crate) fn slice<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// The width of the last dimension of `shape` (1 for a scalar).
fn last_dim(shape: &Shape) -> usize {
    shape.dims().last().copied().unwrap_or(1)
}

/// Sums `rows` (a `[R, d]` matrix given by `row(r, out)` adding row `r` into `out`) over its
/// rows in fixed blocks, in parallel, then the blocks in order.
fn column_sums(rows: usize, d: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(ROWS_PER_BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0f32; d];
            for r in b * ROWS_PER_BLOCK..rows.min((b + 1) * ROWS_PER_BLOCK) {
                row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; d];
    for block in blocks {
        total.iter_mut().zip(block).for_each(|(t, v)| *t += v);
    }
    total
}

/// Mean and `1 / sqrt(variance + eps)` of one row (two passes, as the formula).
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Layer-norm over the last dimension: `(x − mean) / sqrt(var + eps) · weight + bias`, with
/// `weight` and `bias` of the last dimension's width.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, weight, bias]) {
        return x
            .contiguous()?
            .apply_op3(weight, bias, LayerNorm { eps: eps as f32 });
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(self.name(), s1, l1)?,
            slice(self.name(), s2, l2)?,
            slice(self.name(), s3, l3)?,
        );
        let d = last_dim(l1.shape());
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "fused-layer-norm: weight/bias of {} for rows of {d}",
                w.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let (mean, rstd) = moments(row, self.eps);
                for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * rstd * w + b;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, w, g) = (host(x)?, host(weight)?, host(grad)?);
        let d = w.len();
        let eps = self.eps;
        // dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)) per row.
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(d)
            .zip(xs.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (row, g))| {
                let (mean, rstd) = moments(row, eps);
                let (mut sum_gw, mut sum_gwx) = (0f32, 0f32);
                for ((&v, &g), &w) in row.iter().zip(g).zip(&w) {
                    let gw = g * w;
                    sum_gw += gw;
                    sum_gwx += gw * (v - mean) * rstd;
                }
                let n = d as f32;
                let (mean_gw, mean_gwx) = (sum_gw / n, sum_gwx / n);
                for (((dx, &v), &g), &w) in dx.iter_mut().zip(row).zip(g).zip(&w) {
                    let xhat = (v - mean) * rstd;
                    *dx = rstd * (g * w - mean_gw - xhat * mean_gwx);
                }
            });
        let rows = xs.len() / d.max(1);
        // dweight = Σ g·x̂, dbias = Σ g over the rows, one sum per column pair.
        let both = column_sums(rows, 2 * d, |r, acc| {
            let (row, g) = (&xs[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let (mean, rstd) = moments(row, eps);
            let (dw, db) = acc.split_at_mut(d);
            for (((dw, db), &v), &g) in dw.iter_mut().zip(db).zip(row).zip(g) {
                *dw += g * (v - mean) * rstd;
                *db += g;
            }
        });
        let device = x.device();
        let dw = Tensor::from_slice(&both[..d], weight.shape(), device)?;
        let db = Tensor::from_slice(&both[d..], weight.shape(), device)?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(dw),
            Some(db),
        ))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), storage, layout)?;
        let d = last_dim(layout.shape());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                o.iter_mut().for_each(|o| *o /= sum);
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (host(res)?, host(grad)?);
        let d = last_dim(arg.shape());
        // dx = y · (g − Σ g·y) per row.
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `x + bias`, `bias` of the last dimension's width added to every row.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused(&[x, bias]) {
        return x.contiguous()?.apply_op2(bias, BiasAdd);
    }
    x.broadcast_add(bias)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (slice(self.name(), s1, l1)?, slice(self.name(), s2, l2)?);
        let d = last_dim(l1.shape());
        if b.len() != d {
            candle_core::bail!("fused-bias-add: a bias of {} for rows of {d}", b.len());
        }
        let mut out = x.to_vec();
        out.par_chunks_mut(d).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = host(grad)?;
        let d = bias.elem_count();
        let db = column_sums(g.len() / d.max(1), d, |r, acc| {
            acc.iter_mut()
                .zip(&g[r * d..(r + 1) * d])
                .for_each(|(a, g)| *a += g);
        });
        Ok((
            Some(grad.reshape(x.shape())?),
            Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
        ))
    }
}

/// `erf(x)` in f32 without branches, so that loops over slices vectorise (libm's `erff`, a
/// scalar call with a branch per range, was a tenth of a ViT-B/16 training step): `x · P(t) /
/// Q(t)` with `t = x²/8 − 1`, evaluated in f64, on `|x| ≤ 4`, and ±1 beyond (where erf rounds
/// to ±1 in f32). P and Q (degrees 7 and 5) were fitted to erf on `(0, 4]` by reweighted least
/// squares in a Chebyshev basis (`scripts/fit_erf.py`): at most 7.5e-10 from erf before the
/// rounding to f32, so the result is erf's f32 rounding or a neighbour. NaN stays NaN.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: [f64; 8] = [
        0.353_530_995_894_006_77,
        0.757_736_099_590_984_5,
        0.705_751_955_987_299_8,
        0.330_831_095_179_322_85,
        0.076_555_128_347_901_61,
        0.004_287_971_272_913_557,
        -7.041_139_109_597_792e-5,
        -9.328_894_501_136_77e-6,
    ];
    const Q: [f64; 6] = [
        1.0,
        2.642_801_746_104_699_3,
        2.943_823_452_273_670_6,
        1.726_466_982_989_869,
        0.532_422_872_867_147_1,
        0.068_939_113_364_882_08,
    ];
    let x = f64::from(x.clamp(-4.0, 4.0));
    let t = x * x * 0.125 - 1.0;
    let p = P.iter().rev().fold(0.0, |acc, &c| acc * t + c);
    let q = Q.iter().rev().fold(0.0, |acc, &c| acc * t + c);
    (x * p / q) as f32
}

/// Exact GELU, `x · Φ(x) = 0.5 · x · (1 + erf(x / √2))`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    x.gelu_erf()
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), storage, layout)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = (erf(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (host(arg)?, host(grad)?);
        // d/dx = Φ(x) + x·φ(x), φ the standard normal density.
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(g.par_chunks(4096)))
            .for_each(|(dx, (x, g))| {
                for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                    let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = inv_sqrt_2pi * (-0.5 * v * v).exp();
                    *dx = g * (cdf + v * pdf);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn erf_is_within_an_ulp_of_libms_f64_erf() {
        // A dense grid over the fitted range and past it, and the special values.
        let mut worst_abs = 0f64;
        for i in -700_000..=700_000 {
            let x = i as f32 * 1e-5;
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let got = f64::from(erf(x));
            // One f32 ulp at the value (half of it is the rounding), plus the fit's 7.5e-10.
            let err = (got - want).abs();
            worst_abs = worst_abs.max(err);
            assert!(
                err <= f64::from(f32::EPSILON) * want.abs() + 1e-9,
                "erf({x}) = {got}, not {want}"
            );
        }
        assert!(worst_abs < 1.2e-7, "{worst_abs}");
        // Tiny arguments: relative accuracy (erf(x) ≈ 2x/√π).
        for x in [1e-30f32, 1e-10, 1e-6, -3e-4] {
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let rel = (f64::from(erf(x)) - want).abs() / want.abs();
            assert!(rel < 1e-6, "erf({x}): relative error {rel}");
        }
        assert_eq!((erf(0.0), erf(9.0), erf(-9.0)), (0.0, 1.0, -1.0));
        assert_eq!((erf(f32::INFINITY), erf(f32::NEG_INFINITY)), (1.0, -1.0));
        assert!(erf(f32::NAN).is_nan());
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.unit_f64() as f32 * 4.0 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (host(a).unwrap(), host(b).unwrap());
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    /// Value and every input's gradient of `sum(f(inputs) · probe)`, by the fused op and by
    /// the reference formula in candle's ops.
    fn compare(
        inputs: &[Tensor],
        fused_op: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let probe = rand(y.dims(), 99);
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs: Vec<Tensor> = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
            (y, gs)
        };
        let (y1, g1) = run(&fused_op);
        let (y2, g2) = run(&reference);
        assert!(max_rel(&y1, &y2) < 1e-5, "value {}", max_rel(&y1, &y2));
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_eq!(a.dims(), b.dims());
            assert!(max_rel(a, b) < 1e-4, "gradient {i}: {}", max_rel(a, b));
        }
    }

    #[test]
    fn layer_norm_and_its_gradients_equal_the_formula() {
        let (x, w, b) = (rand(&[3, 24, 37], 1), rand(&[24], 2), rand(&[24], 3));
        compare(
            &[x.transpose(1, 2).unwrap(), w, b], // strided: made contiguous first
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-6),
            |t| {
                let x = &t[0];
                let mean = x.mean_keepdim(D::Minus1)?;
                let c = x.broadcast_sub(&mean)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])
            },
        );
    }

    #[test]
    fn softmax_bias_and_gelu_and_their_gradients_equal_candles() {
        compare(
            &[rand(&[2, 5, 41], 4)],
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        );
        compare(
            &[rand(&[2, 70, 9], 5), rand(&[9], 6)],
            |t| bias_add(&t[0], &t[1]),
            |t| t[0].broadcast_add(&t[1]),
        );
        compare(
            &[rand(&[6, 1000], 7)],
            |t| gelu_erf(&t[0]),
            |t| t[0].gelu_erf(),
        );
    }

    #[test]
    fn hand_checked_values() {
        let x = Tensor::new(&[[1f32, 3.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        // Row [1, 3]: mean 2, variance 1, so (−1, 1) with eps 0; row [0, 0]: 0 / sqrt(eps).
        let y = layer_norm(
            &x,
            &Tensor::new(&[2f32, 1.0], &Device::Cpu).unwrap(),
            &Tensor::new(&[0.5f32, 0.0], &Device::Cpu).unwrap(),
            0.0,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert_eq!(y[0], vec![-1.5, 1.0]);
        let s = softmax_last_dim(&Tensor::new(&[0f32, 0.0, 0.0, 0.0], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(s, vec![0.25; 4]);
        let g = gelu_erf(&Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 0.841_344_7).abs() < 1e-6, "{}", g[1]);
    }

    #[test]
    fn row_sums_do_not_depend_on_the_thread_count() {
        let (x, b) = (rand(&[500, 33], 8), rand(&[33], 9));
        let grad_of_bias = || {
            let v = Var::from_tensor(&b).unwrap();
            let y = bias_add(&x, v.as_tensor()).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            host(g.get(v.as_tensor()).unwrap()).unwrap()
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(grad_of_bias);
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(grad_of_bias);
        assert_eq!(one, three);
    }
}
