//! CUDA launches of the depthwise kernels in `kernels/depthwise.cu` (feature `cuda`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result};

use super::depthwise::{DepthwiseParams, Dims};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
const MODULE: &str = "bccp_depthwise";

/// Which kernel of the module to launch.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kernel {
    Forward,
    BackwardInput,
    BackwardWeight,
}

/// Launches `kernel` on two contiguous f32 inputs and returns a new f32 buffer of `out_len`.
pub(super) fn launch(
    kernel: Kernel,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    d: Dims,
    p: &DepthwiseParams,
    out_len: usize,
) -> Result<CudaStorage> {
    let dev: CudaDevice = a.0.device().clone();
    let contiguous = |l: &Layout, what: &str| {
        l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("depthwise conv (cuda): {what} must be contiguous"))
        })
    };
    let (a0, a1) = contiguous(a.1, "first input")?;
    let (b0, b1) = contiguous(b.1, "second input")?;
    let a_slice = a.0.as_cuda_slice::<f32>()?.slice(a0..a1);
    let b_slice = b.0.as_cuda_slice::<f32>()?.slice(b0..b1);
    if out_len == 0 || a1 == a0 || b1 == b0 {
        // An empty batch (or a zero-sized plane): nothing to launch (a grid of zero blocks is an
        // invalid launch) and nothing to allocate (a zero-byte allocation is a CUDA error); the
        // result is all zeros, in a one-element buffer since the tensor has out_len elements.
        return Ok(CudaStorage::wrap_cuda_slice(
            dev.alloc_zeros::<f32>(out_len.max(1))?,
            dev,
        ));
    }
    let mut out = dev.alloc_zeros::<f32>(out_len)?;
    let name = match kernel {
        Kernel::Forward => "depthwise_fwd_f32",
        Kernel::BackwardInput => "depthwise_bwd_input_f32",
        Kernel::BackwardWeight => "depthwise_bwd_weight_f32",
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    // The kernels take 32-bit sizes (and index with 64-bit products): refuse what would wrap.
    let sizes = [
        d.n, d.c, d.h, d.w, d.kh, d.kw, d.oh, d.ow, p.stride.0, p.stride.1, p.pad_top, p.pad_left,
    ];
    let mut ints = [0i32; 12];
    for (slot, &v) in ints.iter_mut().zip(&sizes) {
        *slot = i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!(
                "depthwise conv (cuda): size {v} does not fit the kernels' 32-bit arguments"
            ))
        })?;
    }
    let blocks = u32::try_from(out_len).map_err(|_| {
        candle_core::Error::Msg(format!(
            "depthwise conv (cuda): {out_len} outputs exceed one launch's grid"
        ))
    })?;
    let cfg = match kernel {
        Kernel::BackwardWeight => LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 256 * 4,
        },
        _ => LaunchConfig::for_num_elems(blocks),
    };
    let mut builder = func.builder();
    builder.arg(&a_slice);
    builder.arg(&b_slice);
    builder.arg(&mut out);
    for v in &ints {
        builder.arg(v);
    }
    // SAFETY: the kernel reads `a` and `b` within the sizes implied by the dimensions, which
    // were checked against their shapes, and writes `out_len` elements of `out`.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
