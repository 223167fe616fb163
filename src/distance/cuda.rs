//! The CUDA search (feature `cuda`): `kernels/distance.cu` launched on the tensors' device.
//! L1: one kernel with fused per-query top-k. L2 / cosine: a GEMM tile of dot products
//! (cuBLAS through candle), then the fused top-k epilogue kernel; tiles are merged on the host
//! (Q × k values per tile). Queries are tiled too ([`QUERY_TILE`] rows), so device memory is
//! bounded whatever Q. Returns `None` where the kernels do not apply (k > 16, or an L1 query
//! block that does not fit in shared memory), after recording why ([`super::take_fallback`]);
//! the caller then uses the generic path and `bccp closest` prints the note.
//!
//! Precision: the L2 / cosine GEMMs run in TF32 on the tensor cores (10-bit mantissa). They
//! only pre-select `k + RERANK` candidates per query; those are re-ranked by their exact f32
//! values on the host, so results equal an f32 search unless the true k-th neighbour is beaten
//! by more than `RERANK` others within TF32's rounding. Only the queries and the chosen
//! candidates are read back: the inputs are checked (finite, non-zero for cosine) on the device.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Storage, Tensor, D};

use super::topk::RunningTopK;
use super::{
    check_row_magnitude, finish, validate_sizes, DistanceError, Metric, Neighbors, Search,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distance.ptx"));
const MODULE: &str = "bccp_distance";
const MAX_K: usize = 16;
const L1_QUERIES: usize = 8;
const THREADS: u32 = 256;
const SHARED_LIMIT: usize = 48 * 1024;
/// Candidate columns per GEMM tile.
const TILE: usize = 16_384;
/// Query rows per tile (with [`TILE`], a 256 MiB GEMM output at most).
const QUERY_TILE: usize = 4_096;
/// Extra candidates the TF32 GEMM pre-selects per query for the exact re-ranking.
const RERANK: usize = 8;

fn device_of(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Runs `f` with a view of a contiguous f32 tensor's elements on the device: exactly its
/// `start_offset .. start_offset + elem_count` range of the buffer, so a row-slice view
/// (`x.narrow(0, a, n)`, a non-zero offset) is passed without a copy. (It used to call
/// `Tensor::copy`, which clones the whole buffer and keeps the offset, then recurse: unbounded
/// recursion and memory growth.)
fn with_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, f32>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("expected a CUDA tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
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

fn shared_bytes(floats: usize, k: usize) -> usize {
    let keys = THREADS as usize * k;
    4 * (floats + keys + keys % 2) + 8 * keys
}

/// `a · b` with cuBLAS allowed to use TF32 tensor cores (candle's process-wide switch, set
/// for this call and restored).
fn tf32_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let before = candle_core::cuda_backend::gemm_reduced_precision_f32();
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
    let product = a.matmul(b);
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(before);
    product
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

/// The whole CUDA search: the checks of `validate` (on the device), the kernels, then the
/// exact f32 values of the chosen pairs, re-ranked. `None` when the kernels do not apply.
pub fn search_checked(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> anyhow::Result<Option<Neighbors>> {
    let (nq, _) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    validate_sizes(nq, nc, s)?;
    if nq == 0 {
        // Nothing to allocate or launch (a zero-byte allocation is a CUDA error, a grid of
        // zero blocks an invalid launch): the empty result, as the CPU path gives.
        return Ok(Some(Neighbors {
            k: s.k,
            indices: Vec::new(),
            values: Vec::new(),
        }));
    }
    for (t, what) in [(queries, "queries"), (candidates, "candidates")] {
        match first_bad_row(t, s.metric == Metric::Cosine)? {
            (Some(row), _) => return Err(DistanceError::NonFinite { what, row }.into()),
            (None, Some(row)) => return Err(DistanceError::ZeroNorm { what, row }.into()),
            _ => {}
        }
    }
    // Finite but huge rows would overflow the f32 kernels: their magnitudes, summed in f64
    // on the device, one value per row read back.
    for (t, what) in [(queries, "queries"), (candidates, "candidates")] {
        let t = t.to_dtype(DType::F64)?;
        let sums = match s.metric {
            Metric::L1 => t.abs()?.sum(D::Minus1)?,
            Metric::L2 | Metric::Cosine => t.sqr()?.sum(D::Minus1)?,
        };
        for (row, value) in sums.to_vec1::<f64>()?.into_iter().enumerate() {
            check_row_magnitude(what, row, s.metric, value)?;
        }
    }
    // Queries in tiles, so device memory is bounded whatever Q: one tile's GEMM output is
    // QUERY_TILE × TILE floats (256 MiB), plus the candidates and one tile of queries.
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
        let Some(part) = search_tile(&queries.narrow(0, q0, qn)?, candidates, &tile)? else {
            return Ok(None);
        };
        out.indices.extend(part.indices);
        out.values.extend(part.values);
    }
    Ok(Some(out))
}

/// [`search_checked`] for one tile of queries (checked already): the kernels, then the exact
/// f32 values of the chosen pairs, re-ranked. `None` when the kernels do not apply.
fn search_tile(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> anyhow::Result<Option<Neighbors>> {
    let (nq, dim) = queries.dims2()?;
    let Some((picked, indices)) = search(queries, candidates, s)? else {
        return Ok(None);
    };
    // Exact values: the queries and only the picked candidate rows come to the host.
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let q = host(queries)?;
    let rows: Vec<u32> = indices.iter().map(|&i| i.max(0) as u32).collect();
    let rows_t = Tensor::new(rows.as_slice(), queries.device())?;
    let gathered = host(&candidates.index_select(&rows_t, 0)?)?;
    // `finish` over the gathered rows: slot j's candidate is gathered row j.
    let slots: Vec<i64> = indices
        .iter()
        .enumerate()
        .map(|(j, &i)| if i < 0 { -1 } else { j as i64 })
        .collect();
    let exact = finish(&q, &gathered, dim, s.metric, picked, slots);
    // Re-rank each query's picked candidates by exact value (ties to the lower index), keep k.
    let k = s.k;
    let mut out = Neighbors {
        k,
        indices: Vec::with_capacity(nq * k),
        values: Vec::with_capacity(nq * k),
    };
    for qi in 0..nq {
        let mut cands: Vec<(f32, i64)> = (0..picked)
            .map(|j| qi * picked + j)
            .filter(|&slot| indices[slot] >= 0)
            .map(|slot| (exact.values[slot], indices[slot]))
            .collect();
        let key = |v: f32| if s.metric == Metric::Cosine { -v } else { v };
        cands.sort_by(|a, b| key(a.0).total_cmp(&key(b.0)).then(a.1.cmp(&b.1)));
        cands.dedup_by_key(|c| c.1);
        for j in 0..k {
            let (v, i) = cands
                .get(j)
                .copied()
                .unwrap_or((s.metric.empty_value(), -1));
            out.indices.push(i);
            out.values.push(v);
        }
    }
    Ok(Some(out))
}

/// Per query, how many candidates the kernels return (`k`, or `k + RERANK` for the TF32
/// GEMMs), with their keys and indices on the host; `None` when the kernels do not apply.
fn search(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> anyhow::Result<Option<(usize, Vec<i64>)>> {
    let (nq, dim) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    if s.k > MAX_K {
        super::note_fallback(format!("k = {} is over the CUDA kernels' {MAX_K}", s.k));
        return Ok(None);
    }
    let k = match s.metric {
        Metric::L1 => s.k,
        Metric::L2 | Metric::Cosine => (s.k + RERANK).min(MAX_K).min(nc),
    };
    let dev = device_of(queries)?;
    let classes = match s.other_class {
        Some((qc, cc)) => Some((dev.clone_htod(qc)?, dev.clone_htod(cc)?)),
        None => None,
    };
    match s.metric {
        Metric::L1 => {
            let shared = shared_bytes(L1_QUERIES * dim, k);
            if shared > SHARED_LIMIT {
                super::note_fallback(format!(
                    "the L1 kernel needs {shared} bytes of shared memory at dimension {dim} and k = {k}, over its {SHARED_LIMIT}"
                ));
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
            drop(keys);
            Ok(Some((k, dev.clone_dtoh(&idx)?)))
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
                let dots = tf32_matmul(&q, &c.narrow(0, c0, cn)?.t()?)?.contiguous()?;
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
            drop(all_keys);
            Ok(Some((k, all_idx)))
        }
    }
}
