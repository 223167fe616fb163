//! The CUDA search (feature `cuda`): `kernels/distance.cu` launched on the tensors' device.
//! L1: one kernel with fused per-query top-k. L2 / cosine: a GEMM tile of dot products
//! (cuBLAS through candle), then the fused top-k epilogue kernel; tiles are merged on the host
//! (Q × k values per tile). Returns `None` where the kernels do not apply (k > 16, or an L1
//! query block that does not fit in shared memory); the caller then uses the generic path.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Storage, Tensor, D};

use super::topk::RunningTopK;
use super::{Metric, Search};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distance.ptx"));
const MODULE: &str = "bccp_distance";
const MAX_K: usize = 16;
const L1_QUERIES: usize = 8;
const THREADS: u32 = 256;
const SHARED_LIMIT: usize = 48 * 1024;
/// Candidate columns per GEMM tile.
const TILE: usize = 16_384;

fn device_of(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Runs `f` with the CUDA slice of a contiguous f32 tensor.
fn with_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaSlice<f32>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("expected a CUDA tensor")
    };
    if layout.start_offset() != 0 {
        let copy = t.copy()?;
        drop(storage);
        return with_slice(&copy, f);
    }
    f(cuda.as_cuda_slice::<f32>()?)
}

/// Pushes the arguments both kernels share after their two inputs: the class arrays (or two
/// null pointers), the output keys and indices, then the integer parameters.
fn push_tail<'a>(
    b: &mut LaunchArgs<'a>,
    classes: &'a Option<(CudaSlice<i64>, CudaSlice<i64>)>,
    null: &'a u64,
    keys: &'a mut CudaSlice<f32>,
    idx: &'a mut CudaSlice<i64>,
    ints: &'a [i32],
) {
    match classes {
        Some((qc, cc)) => {
            b.arg(qc);
            b.arg(cc);
        }
        None => {
            b.arg(null);
            b.arg(null);
        }
    }
    b.arg(keys);
    b.arg(idx);
    for v in ints {
        b.arg(v);
    }
}

fn shared_bytes(floats: usize, k: usize) -> usize {
    let keys = THREADS as usize * k;
    4 * (floats + keys + keys % 2) + 8 * keys
}

/// Top-k keys and indices [Q × k] on the host, or `None` when the kernels do not apply.
pub fn search(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> anyhow::Result<Option<(Vec<f32>, Vec<i64>)>> {
    let (nq, dim) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    let k = s.k;
    if k > MAX_K {
        return Ok(None);
    }
    let dev = device_of(queries)?;
    let classes = match s.other_class {
        Some((qc, cc)) => Some((dev.clone_htod(qc)?, dev.clone_htod(cc)?)),
        None => None,
    };
    match s.metric {
        Metric::L1 => {
            let shared = shared_bytes(L1_QUERIES * dim, k);
            if shared > SHARED_LIMIT {
                return Ok(None);
            }
            let mut keys = dev.alloc_zeros::<f32>(nq * k)?;
            let mut idx = dev.alloc_zeros::<i64>(nq * k)?;
            let func = dev.get_or_load_custom_func("l1_topk_f32", MODULE, PTX)?;
            let q = queries.to_dtype(DType::F32)?;
            let c = candidates.to_dtype(DType::F32)?;
            with_slice(&q, |qs| {
                with_slice(&c, |cs| {
                    let ints = [nq as i32, nc as i32, dim as i32, k as i32];
                    let null = 0u64;
                    let mut b = func.builder();
                    b.arg(qs);
                    b.arg(cs);
                    push_tail(&mut b, &classes, &null, &mut keys, &mut idx, &ints);
                    let cfg = LaunchConfig {
                        grid_dim: (nq.div_ceil(L1_QUERIES) as u32, 1, 1),
                        block_dim: (THREADS, 1, 1),
                        shared_mem_bytes: shared as u32,
                    };
                    // SAFETY: the kernel reads nq×dim and nc×dim floats (and nq, nc classes when
                    // given) and writes nq×k keys and indices, all of which the buffers hold.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(())
                })
            })?;
            Ok(Some((dev.clone_dtoh(&keys)?, dev.clone_dtoh(&idx)?)))
        }
        Metric::L2 | Metric::Cosine => {
            let normalise = |t: &Tensor| -> candle_core::Result<Tensor> {
                let t = t.to_dtype(DType::F32)?;
                match s.metric {
                    Metric::Cosine => t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?),
                    _ => Ok(t),
                }
            };
            let q = normalise(queries)?;
            let c = normalise(candidates)?;
            let c_sq = c.sqr()?.sum(D::Minus1)?.contiguous()?;
            let mode: i32 = if s.metric == Metric::L2 { 0 } else { 1 };
            let func = dev.get_or_load_custom_func("topk_rows_f32", MODULE, PTX)?;
            let mut all_keys = vec![0f32; nq * k];
            let mut all_idx = vec![0i64; nq * k];
            let mut tops: Vec<RunningTopK> = all_keys
                .chunks_mut(k)
                .zip(all_idx.chunks_mut(k))
                .map(|(a, b)| RunningTopK::new(a, b))
                .collect();
            for c0 in (0..nc).step_by(TILE) {
                let cn = TILE.min(nc - c0);
                let dots = q.matmul(&c.narrow(0, c0, cn)?.t()?)?.contiguous()?;
                let mut keys = dev.alloc_zeros::<f32>(nq * k)?;
                let mut idx = dev.alloc_zeros::<i64>(nq * k)?;
                with_slice(&dots, |ds| {
                    with_slice(&c_sq, |ns| {
                        let ints = [nq as i32, cn as i32, c0 as i32, 0i32, k as i32, mode];
                        let null = 0u64;
                        let mut b = func.builder();
                        b.arg(ds);
                        b.arg(ns);
                        push_tail(&mut b, &classes, &null, &mut keys, &mut idx, &ints);
                        let cfg = LaunchConfig {
                            grid_dim: (nq as u32, 1, 1),
                            block_dim: (THREADS, 1, 1),
                            shared_mem_bytes: shared_bytes(0, k) as u32,
                        };
                        // SAFETY: the kernel reads nq×cn dots, nc norms (indexed from c0) and
                        // the classes, and writes nq×k keys and indices.
                        unsafe { b.launch(cfg) }.w()?;
                        Ok(())
                    })
                })?;
                let (tk, ti) = (dev.clone_dtoh(&keys)?, dev.clone_dtoh(&idx)?);
                for (row, top) in tops.iter_mut().enumerate() {
                    for j in 0..k {
                        if ti[row * k + j] >= 0 {
                            top.push(tk[row * k + j], ti[row * k + j]);
                        }
                    }
                }
            }
            drop(tops);
            Ok(Some((all_keys, all_idx)))
        }
    }
}
