//! Per-channel bias plus optional ReLU6, fused into one pass over the tensor (candle would
//! make three: the broadcast add, then `maximum` and `minimum` for the clamp).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct BiasAct {
    relu6: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias-act: f32 tensors expected");
        };
        let (Some((x0, x1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-act: contiguous tensors expected");
        };
        let (x, b) = (&x[x0..x1], &b[b0..b1]);
        let dims = l1.shape().dims();
        let c = b.len();
        if dims.len() < 2 || dims[1] != c {
            candle_core::bail!("bias-act: bias of {c} channels for input {dims:?}");
        }
        let plane: usize = dims[2..].iter().product();
        let relu6 = self.relu6;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(i, (o, xs))| {
                let bias = b[i % c];
                if relu6 {
                    o.iter_mut()
                        .zip(xs)
                        .for_each(|(o, &v)| *o = (v + bias).clamp(0.0, 6.0));
                } else {
                    o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v + bias);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu6 {
            let inside = res.gt(0f32)?.mul(&res.lt(6f32)?)?.to_dtype(DType::F32)?;
            grad.mul(&inside)?
        } else {
            grad.clone()
        };
        let mut gb = grad.clone();
        for axis in (2..x.rank()).rev() {
            gb = gb.sum(axis)?;
        }
        Ok((Some(grad), Some(gb.sum(0)?)))
    }
}

/// `x + bias` per channel (dimension 1), then ReLU6 when `relu6`; one fused pass on the CPU,
/// candle's tensor ops elsewhere, in `x`'s dtype (an f32 bias is cast to a bf16 `x`'s).
/// Differentiable.
pub fn bias_act(x: &Tensor, bias: &Tensor, relu6: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&bias.contiguous()?, BiasAct { relu6 });
    }
    let mut shape = vec![1usize; x.rank()];
    shape[1] = bias.elem_count();
    let y = x.broadcast_add(&bias.to_dtype(x.dtype())?.reshape(shape)?)?;
    if relu6 {
        y.clamp(0f32, 6f32)
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn matches_unfused_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 4., (2, 3, 4, 5), &dev).unwrap())).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 3.0], &dev).unwrap()).unwrap();
        for relu6 in [false, true] {
            let fused = bias_act(x.as_tensor(), b.as_tensor(), relu6).unwrap();
            let mut plain = x
                .as_tensor()
                .broadcast_add(&b.as_tensor().reshape((1, 3, 1, 1)).unwrap())
                .unwrap();
            if relu6 {
                plain = plain.clamp(0f32, 6f32).unwrap();
            }
            let diff: f32 = max_abs_diff(&fused, &plain);
            assert_eq!(diff, 0.0);
            let probe = Tensor::randn(0f32, 1., fused.dims(), &dev).unwrap();
            let g1 = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (plain * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &b] {
                let d: f32 = max_abs_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "relu6={relu6}: {d}");
            }
        }
        let err = bias_act(
            x.as_tensor(),
            &Tensor::zeros(2, DType::F32, &dev).unwrap(),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bias of 2 channels"), "{err}");
    }
}
