//! The CUDA search (feature `cuda`): `kernels/distance.cu` launched on the tensors' device.
//! L1: one kernel with fused per-query top-k. L2 / cosine: a GEMM tile of dot products
//! (cuBLAS, called here so that its precision is chosen per call), then the fused top-k
//! epilogue kernel; tiles are merged on the host (Q × k values per tile). Queries are tiled
//! too ([`QUERY_TILE`] rows), so device memory is bounded whatever Q.
//!
//! Exactness: every kernel keeps `k + RERANK` candidates per query (at most [`MAX_K`]); they
//! are re-ranked by their exact f32 values and certified on the host ([`super::exact`]). The
//! L2 / cosine GEMMs run in TF32 on the tensor cores when the margin allows; a query whose TF32
//! result cannot be certified is searched again with an f32 GEMM, and one that still cannot
//! (near-duplicates beyond the margin) by a full scan on the host. Results therefore equal the
//! CPU path's, index for index and bit for bit. TF32 is asked of cuBLAS for the distance GEMM
//! alone; candle's process-wide flag is never touched.

use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys as blas};
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Storage, Tensor, D};

use super::exact::{self, Bounds, KeyArith, Preselected, RERANK};
use super::topk::RunningTopK;
use super::{check_row_magnitude, validate_sizes, DistanceError, Metric, Neighbors, Search};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distance.ptx"));
const MODULE: &str = "bccp_distance";
/// The kernels' per-thread top-k capacity (k plus the re-ranking margin).
const MAX_K: usize = 16;
const L1_QUERIES: usize = 8;
const THREADS: u32 = 256;
/// Dynamic shared memory a kernel gets without opting in.
const DEFAULT_SHARED: usize = 48 * 1024;
/// Candidate columns per GEMM tile.
const TILE: usize = 16_384;
/// Query rows per tile (with [`TILE`], a 256 MiB GEMM output at most).
const QUERY_TILE: usize = 4_096;

/// What the CUDA search did: the result, or why its kernels do not apply.
pub(super) enum Outcome {
    Done(Neighbors),
    NotApplicable(String),
}

fn device_of(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

fn to_i32(v: usize, what: &str) -> anyhow::Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} exceeds the kernels' 32-bit sizes"))
}

/// Runs `f` with a view of a contiguous f32 tensor's elements on the device: exactly its
/// `start_offset .. start_offset + elem_count` range of the buffer, so a row-slice view
/// (`x.narrow(0, a, n)`, a non-zero offset) is passed without a copy.
fn with_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, f32>) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        anyhow::bail!("expected a CUDA tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("expected a contiguous tensor"))?;
    let view = cuda.as_cuda_slice::<f32>()?.slice(start..end);
    f(&view)
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

/// Shared memory of the block merge: THREADS lists of k keys and indices.
fn merge_bytes(k: usize) -> usize {
    let keys = THREADS as usize * k;
    4 * (keys + keys % 2) + 8 * keys
}

/// Shared memory of the L1 kernel: its queries, reused for the merge buffers.
fn l1_shared_bytes(dim: usize, k: usize) -> usize {
    (4 * L1_QUERIES * dim).max(merge_bytes(k))
}

/// The most dynamic shared memory one block of `dev` can opt in to.
fn shared_limit(dev: &CudaDevice) -> anyhow::Result<usize> {
    let optin = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    Ok(usize::try_from(optin).unwrap_or(0).max(DEFAULT_SHARED))
}

/// `dots[i][j] = q_i · c_j` for row-major `q` [qn × dim] and `c` [cn × dim], through cuBLAS
/// with the compute type of `arith` for this call only.
fn gemm_dots(
    dev: &CudaDevice,
    q: &CudaView<'_, f32>,
    c: &CudaView<'_, f32>,
    (qn, cn, dim): (usize, usize, usize),
    arith: KeyArith,
) -> anyhow::Result<CudaSlice<f32>> {
    let (m, n, k) = (
        to_i32(cn, "tile")?,
        to_i32(qn, "queries")?,
        to_i32(dim, "dim")?,
    );
    let mut out = dev.alloc_zeros::<f32>(qn * cn)?;
    let compute = match arith {
        KeyArith::F32 => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        KeyArith::Tf32 => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        // `--precision bf16` is refused on a GPU before any search; its bound is the CPU
        // kernel's, not cuBLAS's.
        KeyArith::Bf16 => anyhow::bail!("bf16 keys are a CPU path (the GPU pre-selects in TF32)"),
    };
    let (alpha, beta) = (1f32, 0f32);
    let cublas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (c_ptr, _c_guard) = c.device_ptr(&stream);
    let (q_ptr, _q_guard) = q.device_ptr(&stream);
    let (o_ptr, _o_guard) = out.device_ptr_mut(&stream);
    // Column-major view: out' [cn × qn] = cᵀ' · q', where the row-major c [cn × dim] is the
    // column-major [dim × cn] (transposed here) and q [qn × dim] is column-major [dim × qn].
    // SAFETY: the pointers are live device buffers of cn×dim, qn×dim and qn×cn floats on the
    // handle's stream (the guards order them with other work), and the leading dimensions
    // match those extents.
    unsafe {
        gemm_ex(
            *cublas.handle(),
            blas::cublasOperation_t::CUBLAS_OP_T,
            blas::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            (&alpha as *const f32).cast(),
            c_ptr as *const _,
            blas::cudaDataType_t::CUDA_R_32F,
            k,
            q_ptr as *const _,
            blas::cudaDataType_t::CUDA_R_32F,
            k,
            (&beta as *const f32).cast(),
            o_ptr as *mut _,
            blas::cudaDataType_t::CUDA_R_32F,
            m,
            compute,
            blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }?;
    drop((_c_guard, _q_guard, _o_guard));
    Ok(out)
}

/// The first row of `t` [rows, dim] holding a non-finite value (or, when `nonzero`, only
/// zeros), found on the device; only one flag per row is read back.
fn first_bad_row(t: &Tensor, nonzero: bool) -> candle_core::Result<(Option<usize>, Option<usize>)> {
    let t = t.to_dtype(DType::F32)?;
    // 0·x is 0 for finite x and NaN otherwise; a row sum of NaN is not equal to itself.
    let z = (&t * 0.0)?.sum(D::Minus1)?;
    let bad: Vec<u8> = z.ne(&z)?.to_vec1()?;
    let zero = if nonzero {
        let norms: Vec<u8> = t.sqr()?.sum(D::Minus1)?.eq(0f32)?.to_vec1()?;
        norms.iter().position(|&b| b != 0)
    } else {
        None
    };
    Ok((bad.iter().position(|&b| b != 0), zero))
}

/// Per-row magnitudes summed in f64 on the device (Σ|x| for L1, Σx² otherwise), each checked
/// against f32 overflow; one value per row is read back.
fn checked_magnitudes(t: &Tensor, what: &'static str, metric: Metric) -> anyhow::Result<Vec<f64>> {
    let t = t.to_dtype(DType::F64)?;
    let sums = match metric {
        Metric::L1 => t.abs()?.sum(D::Minus1)?,
        Metric::L2 | Metric::Cosine => t.sqr()?.sum(D::Minus1)?,
    };
    let sums = sums.to_vec1::<f64>()?;
    for (row, &value) in sums.iter().enumerate() {
        check_row_magnitude(what, row, metric, value)?;
    }
    Ok(sums)
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The whole CUDA search: the checks of `validate` (on the device), the kernels, then the
/// exact re-ranking. [`Outcome::NotApplicable`] when the kernels do not apply.
pub(super) fn search_checked(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> anyhow::Result<Outcome> {
    let (nq, dim) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    validate_sizes(nq, nc, s)?;
    if nq == 0 {
        // Nothing to allocate or launch (a zero-byte allocation is a CUDA error, a grid of
        // zero blocks an invalid launch): the empty result, as the CPU path gives.
        return Ok(Outcome::Done(Neighbors {
            k: s.k,
            indices: Vec::new(),
            values: Vec::new(),
        }));
    }
    if s.k > MAX_K {
        return Ok(Outcome::NotApplicable(format!(
            "k = {} is over the CUDA kernels' {MAX_K}",
            s.k
        )));
    }
    let dev = device_of(queries)?;
    if s.metric == Metric::L1 {
        let need = l1_shared_bytes(dim, (s.k + RERANK).min(MAX_K).min(nc));
        let limit = shared_limit(&dev)?;
        if need > limit {
            return Ok(Outcome::NotApplicable(format!(
                "the L1 kernel needs {need} bytes of shared memory at dimension {dim}, over this device's {limit}"
            )));
        }
    }
    for (t, what) in [(queries, "queries"), (candidates, "candidates")] {
        match first_bad_row(t, s.metric == Metric::Cosine)? {
            (Some(row), _) => return Err(DistanceError::NonFinite { what, row }.into()),
            (None, Some(row)) => return Err(DistanceError::ZeroNorm { what, row }.into()),
            _ => {}
        }
    }
    // Finite but huge rows would overflow the f32 kernels.
    checked_magnitudes(queries, "queries", s.metric)?;
    let magnitudes = checked_magnitudes(candidates, "candidates", s.metric)?;
    let max_norm = match s.metric {
        Metric::L2 => magnitudes.iter().copied().fold(0.0, f64::max).sqrt(),
        _ => 0.0,
    };
    let mut host_candidates = None;
    let mut out = Neighbors {
        k: s.k,
        indices: Vec::with_capacity(nq * s.k),
        values: Vec::with_capacity(nq * s.k),
    };
    for q0 in (0..nq).step_by(QUERY_TILE) {
        let qn = QUERY_TILE.min(nq - q0);
        let tile = Search {
            other_class: s.other_class.map(|(qc, cc)| (&qc[q0..q0 + qn], cc)),
            ..*s
        };
        let part = search_tile(
            &queries.narrow(0, q0, qn)?,
            candidates,
            &tile,
            max_norm,
            &mut host_candidates,
        )?;
        out.indices.extend(part.indices);
        out.values.extend(part.values);
    }
    Ok(Outcome::Done(out))
}

/// One tile of queries (checked already): the kernels in TF32 where they may, then in f32
/// for the queries TF32 could not certify, then a host scan for any still uncertain.
fn search_tile(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
    max_norm: f64,
    host_candidates: &mut Option<Vec<f32>>,
) -> anyhow::Result<Neighbors> {
    let dim = queries.dim(1)?;
    let q_host = host(queries)?;
    let tf32_certain = s.metric != Metric::L1 && s.k + RERANK <= MAX_K;
    let arith = if tf32_certain {
        KeyArith::Tf32
    } else {
        KeyArith::F32
    };
    let (mut out, mut pending) = select_exact(queries, &q_host, candidates, s, arith, max_norm)?;
    if !pending.is_empty() && arith == KeyArith::Tf32 {
        super::note_rechecks(pending.len(), 0);
        let rows: Vec<u32> = pending.iter().map(|&q| q as u32).collect();
        let sub_q = queries.index_select(&Tensor::new(rows.as_slice(), queries.device())?, 0)?;
        let sub_host: Vec<f32> = pending
            .iter()
            .flat_map(|&q| q_host[q * dim..(q + 1) * dim].iter().copied())
            .collect();
        let sub_classes: Option<Vec<i64>> = s
            .other_class
            .map(|(qc, _)| pending.iter().map(|&q| qc[q]).collect());
        let sub = Search {
            other_class: s
                .other_class
                .zip(sub_classes.as_deref())
                .map(|((_, cc), qc)| (qc, cc)),
            ..*s
        };
        let (found, still) =
            select_exact(&sub_q, &sub_host, candidates, &sub, KeyArith::F32, max_norm)?;
        for (j, &q) in pending.iter().enumerate() {
            let (dst, src) = (q * s.k..(q + 1) * s.k, j * s.k..(j + 1) * s.k);
            out.indices[dst.clone()].copy_from_slice(&found.indices[src.clone()]);
            out.values[dst].copy_from_slice(&found.values[src]);
        }
        pending = still.into_iter().map(|j| pending[j]).collect();
    }
    if !pending.is_empty() {
        super::note_rechecks(0, pending.len());
        let all = match host_candidates {
            Some(c) => c,
            None => host_candidates.insert(host(candidates)?),
        };
        exact::scan_into(&mut out, &q_host, all, dim, s, &pending);
    }
    Ok(out)
}

/// The kernels' pre-selection for `queries`, re-ranked exactly: the result and the queries
/// that could not be certified.
fn select_exact(
    queries: &Tensor,
    q_host: &[f32],
    candidates: &Tensor,
    s: &Search,
    arith: KeyArith,
    max_norm: f64,
) -> anyhow::Result<(Neighbors, Vec<usize>)> {
    let dim = queries.dim(1)?;
    let pre = preselect(queries, candidates, s, arith)?;
    // Only the kept candidate rows come to the host: slot j's row is gathered row j.
    let rows: Vec<u32> = pre.indices.iter().map(|&i| i.max(0) as u32).collect();
    let rows_t = Tensor::new(rows.as_slice(), queries.device())?;
    let gathered = host(&candidates.index_select(&rows_t, 0)?)?;
    let bounds = Bounds::with_max_norm(s.metric, dim, arith, max_norm);
    Ok(exact::rerank(q_host, dim, s, &pre, &bounds, |slot| {
        &gathered[slot * dim..(slot + 1) * dim]
    }))
}

/// Per query, the `k + RERANK` best candidates by the kernels' keys (at most [`MAX_K`]).
fn preselect(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
    arith: KeyArith,
) -> anyhow::Result<Preselected> {
    let (nq, dim) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    let kept = (s.k + RERANK).min(MAX_K).min(nc);
    let dev = device_of(queries)?;
    let classes = match s.other_class {
        Some((qc, cc)) => Some((dev.clone_htod(qc)?, dev.clone_htod(cc)?)),
        None => None,
    };
    let (q_i32, c_i32, d_i32, k_i32) = (
        to_i32(nq, "queries")?,
        to_i32(nc, "candidates")?,
        to_i32(dim, "dim")?,
        to_i32(kept, "k")?,
    );
    let (keys, indices) = match s.metric {
        Metric::L1 => {
            let shared = l1_shared_bytes(dim, kept);
            let mut keys = dev.alloc_zeros::<f32>(nq * kept)?;
            let mut idx = dev.alloc_zeros::<i64>(nq * kept)?;
            let func = dev.get_or_load_custom_func("l1_topk_f32", MODULE, PTX)?;
            if shared > DEFAULT_SHARED {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    to_i32(shared, "shared memory")?,
                )?;
            }
            let q = queries.to_dtype(DType::F32)?;
            let c = candidates.to_dtype(DType::F32)?;
            with_slice(&q, |qs| {
                with_slice(&c, |cs| {
                    let ints = [q_i32, c_i32, d_i32, k_i32];
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
                    // given) and writes nq×kept keys and indices, all of which the buffers hold.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(())
                })
            })?;
            (dev.clone_dtoh(&keys)?, dev.clone_dtoh(&idx)?)
        }
        Metric::L2 | Metric::Cosine => {
            let normalise = |t: &Tensor| -> candle_core::Result<Tensor> {
                let t = t.to_dtype(DType::F32)?;
                match s.metric {
                    Metric::Cosine => super::generic::unit_rows(&t),
                    _ => Ok(t),
                }
            };
            let q = normalise(queries)?.contiguous()?;
            let c = normalise(candidates)?.contiguous()?;
            let c_sq = c.sqr()?.sum(D::Minus1)?.contiguous()?;
            let mode: i32 = if s.metric == Metric::L2 { 0 } else { 1 };
            let func = dev.get_or_load_custom_func("topk_rows_f32", MODULE, PTX)?;
            let mut all_keys = vec![0f32; nq * kept];
            let mut all_idx = vec![0i64; nq * kept];
            let mut tops: Vec<RunningTopK> = all_keys
                .chunks_mut(kept)
                .zip(all_idx.chunks_mut(kept))
                .map(|(a, b)| RunningTopK::new(a, b))
                .collect();
            for c0 in (0..nc).step_by(TILE) {
                let cn = TILE.min(nc - c0);
                let dots = with_slice(&q, |qs| {
                    with_slice(&c.narrow(0, c0, cn)?, |cs| {
                        gemm_dots(&dev, qs, cs, (nq, cn, dim), arith)
                    })
                })?;
                let mut keys = dev.alloc_zeros::<f32>(nq * kept)?;
                let mut idx = dev.alloc_zeros::<i64>(nq * kept)?;
                with_slice(&c_sq, |ns| {
                    let ints = [
                        q_i32,
                        to_i32(cn, "tile")?,
                        to_i32(c0, "tile start")?,
                        0i32,
                        k_i32,
                        mode,
                    ];
                    let null = 0u64;
                    let mut b = func.builder();
                    b.arg(&dots);
                    b.arg(ns);
                    push_tail(&mut b, &classes, &null, &mut keys, &mut idx, &ints);
                    let cfg = LaunchConfig {
                        grid_dim: (nq as u32, 1, 1),
                        block_dim: (THREADS, 1, 1),
                        shared_mem_bytes: merge_bytes(kept) as u32,
                    };
                    // SAFETY: the kernel reads nq×cn dots, nc norms (indexed from c0) and the
                    // classes, and writes nq×kept keys and indices.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(())
                })?;
                let (tk, ti) = (dev.clone_dtoh(&keys)?, dev.clone_dtoh(&idx)?);
                for (row, top) in tops.iter_mut().enumerate() {
                    for j in 0..kept {
                        if ti[row * kept + j] >= 0 {
                            top.push(tk[row * kept + j], ti[row * kept + j]);
                        }
                    }
                }
            }
            drop(tops);
            (all_keys, all_idx)
        }
    };
    Ok(Preselected {
        kept,
        keys,
        indices,
        everything: kept == nc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_merge_buffers_reuse_the_query_area() {
        // D = 1 280 at k + margin = 13: the queries (40 KiB) and the merge buffers (39 KiB)
        // share one area, under the 48 KiB every device gives without opting in.
        assert_eq!(l1_shared_bytes(1280, 13), 40_960);
        assert!(l1_shared_bytes(1280, MAX_K) <= DEFAULT_SHARED);
        assert_eq!(l1_shared_bytes(4, 16), merge_bytes(16));
    }
}
