//! `x · Wᵀ` with bf16 operands and f32 sums ([`super::bf16_gemm`]), differentiable on candle's
//! autograd: the mixed precision of the vision transformers' linear layers, forward and
//! backward (`dx = dy · W`, `dW = dyᵀ · x`, both on bf16 operands), as PyTorch's CPU autocast
//! runs a linear layer. The weights, their gradients and everything between the products stay
//! f32. Each product packs its right operand once and splits its rows over rayon's pool; the
//! weight gradient splits its output rows, so no two threads add into the same sums and the
//! result does not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_gemm::{self, Lhs, PackedRhs, Precision, Rhs, Strided};
use super::fused_grad::slice;

/// Rows of the output per parallel task.
const ROWS_PER_TASK: usize = 96;

/// `x · wᵀ` over the last dimension of `x` (`[…, in]`, `w` `[out, in]`): on bf16 operands
/// with f32 sums for [`Precision::Bf16`] on a CPU that has the kernel ([`bf16_gemm::available`])
/// with f32 tensors; on a CUDA GPU, candle's product of the operands cast to bf16 (cuBLAS sums
/// in f32), the result cast back to f32 (autocast's linear layer; the casts carry the
/// gradients back to f32); candle's f32 product otherwise.
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    if precision == Precision::Bf16 && x.device().is_cuda() {
        let bf16 = candle_core::DType::BF16;
        return x
            .to_dtype(bf16)?
            .broadcast_matmul(&w.to_dtype(bf16)?.t()?)?
            .to_dtype(x.dtype());
    }
    let mixed = precision == Precision::Bf16
        && bf16_gemm::available()
        && [x, w]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32);
    if mixed {
        x.contiguous()?.apply_op2(&w.contiguous()?, Forward)
    } else {
        x.broadcast_matmul(&w.t()?)
    }
}

/// `dst[m, n] = lhs[m, k] · rhs`, rhs packed once, rows split over the pool.
fn rows_times(lhs: &[f32], rhs: &PackedRhs, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    let mut dst = vec![0f32; m * n];
    if n == 0 {
        return dst;
    }
    dst.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(lhs.par_chunks(ROWS_PER_TASK * k.max(1)))
        .for_each(|(out, rows)| {
            let rows_here = out.len() / n;
            bf16_gemm::gemm(
                (rows_here, n, k),
                out,
                false,
                Lhs::View(Strided::rows(rows, k)),
                Rhs::Packed(rhs),
                None,
            )
        });
    dst
}

/// The leading size and width of `[…, d]`.
fn rows_and_width(shape: &Shape) -> (usize, usize) {
    let d = shape.dims().last().copied().unwrap_or(1);
    (shape.elem_count() / d.max(1), d)
}

/// `[…, d]` as `[…, width]`.
fn with_width(shape: &Shape, width: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    Shape::from(dims)
}

/// `y = x · wᵀ`.
struct Forward;

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(self.name(), xs, xl)?, slice(self.name(), ws, wl)?);
        let (m, k) = rows_and_width(xl.shape());
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear-bf16: input width {k} against a weight of [{n}, {wk}]");
        }
        // wᵀ as the right operand: [k, n], element (p, j) at w[j·k + p].
        let packed = PackedRhs::new(Strided::transposed(w, k), k, n);
        let y = rows_times(x, &packed, (m, n, k));
        Ok((CpuStorage::F32(y), with_width(xl.shape(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &InputGrad)?;
        let dw = grad.apply_op2_no_bwd(x, &WeightGrad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = dy · w` (`dy` `[…, out]`, `w` `[out, in]`).
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "linear-bf16-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, w) = (slice(self.name(), gs, gl)?, slice(self.name(), ws, wl)?);
        let (m, n) = rows_and_width(gl.shape());
        let (wn, k) = wl.shape().dims2()?;
        if wn != n {
            candle_core::bail!("{}: gradient width {n} against [{wn}, {k}]", self.name());
        }
        let packed = PackedRhs::new(Strided::rows(w, k), n, k);
        let dx = rows_times(dy, &packed, (m, k, n));
        Ok((CpuStorage::F32(dx), with_width(gl.shape(), k)))
    }
}

/// `dw = dyᵀ · x` (`dy` `[…, out]`, `x` `[…, in]`): `[out, in]`, its rows split over the pool.
struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "linear-bf16-weight-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, x) = (slice(self.name(), gs, gl)?, slice(self.name(), xs, xl)?);
        let (m, n) = rows_and_width(gl.shape());
        let (xm, k) = rows_and_width(xl.shape());
        if xm != m {
            candle_core::bail!("{}: {m} gradient rows against {xm} inputs", self.name());
        }
        let mut dw = vec![0f32; n * k];
        if k > 0 && m > 0 {
            let packed = PackedRhs::new(Strided::rows(x, k), m, k);
            dw.par_chunks_mut(ROWS_PER_TASK * k)
                .enumerate()
                .for_each(|(t, out)| {
                    let first = t * ROWS_PER_TASK;
                    let rows_here = out.len() / k;
                    // dyᵀ's rows first..first + rows_here: element (i, p) at dy[p·n + first + i].
                    let lhs = Strided {
                        data: &dy[first..],
                        row_stride: 1,
                        col_stride: n,
                    };
                    bf16_gemm::gemm(
                        (rows_here, k, m),
                        out,
                        false,
                        Lhs::View(lhs),
                        Rhs::Packed(&packed),
                        None,
                    )
                });
        }
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Small integers: exact in bf16, and every sum exact in f32.
    fn ints(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.below(9) as f32 - 4.0).collect()
    }

    /// Forward and both gradients of `sum(linear(x, w) ⊙ c)` in `precision`.
    fn run(
        precision: Precision,
        (b, t, k, n): (usize, usize, usize, usize),
        values: (&[f32], &[f32], &[f32]),
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_slice(values.0, (b, t, k), &dev)?)?;
        let w = Var::from_tensor(&Tensor::from_slice(values.1, (n, k), &dev)?)?;
        let c = Tensor::from_slice(values.2, (b, t, n), &dev)?;
        let y = linear(x.as_tensor(), w.as_tensor(), precision)?;
        let grads = (&y * &c)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        Ok((
            flat(&y)?,
            flat(grads.get(x.as_tensor()).expect("dx"))?,
            flat(grads.get(w.as_tensor()).expect("dw"))?,
        ))
    }

    #[test]
    fn small_integers_give_the_f32_products_exactly() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        // Odd sizes and more rows than one task: tails everywhere.
        let dims = (2, 101, 37, 45);
        let (b, t, k, n) = dims;
        let (x, w, c) = (ints(b * t * k, 1), ints(n * k, 2), ints(b * t * n, 3));
        let mixed = run(Precision::Bf16, dims, (&x, &w, &c))?;
        let full = run(Precision::F32, dims, (&x, &w, &c))?;
        assert_eq!(mixed, full);
        // One hand-checked value of each: y[0,0,0] = Σ_p x[p]·w[p].
        let y00: f32 = (0..k).map(|p| x[p] * w[p]).sum();
        assert_eq!(mixed.0[0], y00);
        Ok(())
    }

    #[test]
    fn random_values_within_bf16_rounding_of_f64() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let (b, t, k, n) = (3, 50, 64, 40);
        let mut rng = crate::rng::Rng::new(7);
        let mut normal = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        let (x, w, c) = (normal(b * t * k), normal(n * k), normal(b * t * n));
        let (y, dx, dw) = run(Precision::Bf16, (b, t, k, n), (&x, &w, &c))?;
        let m = b * t;
        // Each operand rounds with relative error ≤ 2⁻⁸, so a product's error is ≤ 2⁻⁷ of
        // |a·b| (plus f32 summation, far smaller): bound by Σ |a|·|b|.
        let check = |got: f32, terms: &mut dyn Iterator<Item = (f32, f32)>| {
            let (mut exact, mut magnitude) = (0f64, 0f64);
            for (a, b) in terms {
                exact += f64::from(a) * f64::from(b);
                magnitude += f64::from(a.abs()) * f64::from(b.abs());
            }
            let err = (f64::from(got) - exact).abs();
            assert!(
                err <= magnitude * (2f64.powi(-7) + 1e-6),
                "{got} against {exact} (Σ|a·b| = {magnitude})"
            );
            err
        };
        let mut largest = 0f64;
        for i in 0..m {
            for j in 0..n {
                let e = check(
                    y[i * n + j],
                    &mut (0..k).map(|p| (x[i * k + p], w[j * k + p])),
                );
                largest = largest.max(e);
            }
            for p in 0..k {
                check(
                    dx[i * k + p],
                    &mut (0..n).map(|j| (c[i * n + j], w[j * k + p])),
                );
            }
        }
        for j in 0..n {
            for p in 0..k {
                check(
                    dw[j * k + p],
                    &mut (0..m).map(|i| (c[i * n + j], x[i * k + p])),
                );
            }
        }
        // And the rounding is really there: not f32's result.
        assert!(largest > 0.0);
        Ok(())
    }

    #[test]
    fn f32_takes_candles_product() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let w = Tensor::new(&[[1f32, 0.5], [0.25, 2.0], [1.0, 1.0]], &dev)?;
        let y = linear(&x, &w, Precision::F32)?.to_vec2::<f32>()?;
        assert_eq!(y, vec![vec![2.0, 4.25, 3.0], vec![5.0, 8.75, 7.0]]);
        Ok(())
    }
}
