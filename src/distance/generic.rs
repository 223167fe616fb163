//! The device-generic search: each tile of keys is computed with candle's tensor ops on the
//! tensors' device (Metal, or CUDA until custom kernels are wired), copied to the host, and fed
//! to the running top-k of `k + RERANK` candidates, then re-ranked exactly on the host
//! ([`super::exact`]). Correct everywhere, fast nowhere; the CPU has its own path.

use candle_core::{DType, Device, Tensor, D};

use super::exact::{KeyArith, Preselected, RERANK};
use super::topk::RunningTopK;
use super::{exact_from_host, validate, Metric, Neighbors, Search};

/// Elements of the largest temporary per tile (L1 broadcasts [rows, cols, D]).
const TILE_ELEMENTS: usize = 1 << 24;

/// Searches with tensor ops on the inputs' device.
pub fn search(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
) -> Result<Neighbors, super::DistanceError> {
    let queries = queries.to_dtype(DType::F32)?;
    let candidates = candidates.to_dtype(DType::F32)?;
    let (nq, dim) = queries.dims2()?;
    let (nc, _) = candidates.dims2()?;
    let host_q = queries
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let host_c = candidates
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    validate(&host_q, &host_c, dim, s)?;

    let k = (s.k + RERANK).min(nc);
    let mut keys = vec![0f32; nq * k];
    let mut idx = vec![0i64; nq * k];
    let mut tops: Vec<RunningTopK> = keys
        .chunks_mut(k)
        .zip(idx.chunks_mut(k))
        .map(|(a, b)| RunningTopK::new(a, b))
        .collect();
    let (q, c) = match s.metric {
        Metric::Cosine => (unit_rows(&queries)?, unit_rows(&candidates)?),
        _ => (queries.clone(), candidates.clone()),
    };
    let c_sq = c.sqr()?.sum(D::Minus1)?;
    let (q_tile, c_tile) = match s.metric {
        Metric::L1 => {
            let cols = (TILE_ELEMENTS / dim.max(1)).clamp(1, 4096).min(nc);
            ((TILE_ELEMENTS / (cols * dim.max(1))).max(1), cols)
        }
        _ => (nq.max(1), (TILE_ELEMENTS / nq.max(1)).clamp(1, nc)),
    };
    for q0 in (0..nq).step_by(q_tile) {
        let qn = q_tile.min(nq - q0);
        let qt = q.narrow(0, q0, qn)?;
        for c0 in (0..nc).step_by(c_tile) {
            let cn = c_tile.min(nc - c0);
            let ct = c.narrow(0, c0, cn)?;
            let tile = match s.metric {
                Metric::L1 => qt
                    .unsqueeze(1)?
                    .broadcast_sub(&ct.unsqueeze(0)?)?
                    .abs()?
                    .sum(D::Minus1)?,
                Metric::L2 => c_sq
                    .narrow(0, c0, cn)?
                    .unsqueeze(0)?
                    .broadcast_sub(&(qt.matmul(&ct.t()?)? * 2.0)?)?,
                Metric::Cosine => qt.matmul(&ct.t()?)?.neg()?,
            };
            let tile = tile.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            for (r, row) in tile.iter().enumerate() {
                let qi = q0 + r;
                for (j, &key) in row.iter().enumerate() {
                    let ci = c0 + j;
                    if s.other_class.is_some_and(|(qc, cc)| qc[qi] == cc[ci]) {
                        continue;
                    }
                    tops[qi].push(key, ci as i64);
                }
            }
        }
    }
    drop(tops);
    let pre = Preselected {
        kept: k,
        keys,
        indices: idx,
        everything: k == nc,
    };
    // f32 keys: bccp never switches candle's reduced-precision GEMM flag on.
    Ok(exact_from_host(
        &host_q,
        &host_c,
        dim,
        s,
        &pre,
        KeyArith::F32,
    ))
}

/// The rows of `t` `[N, D]` scaled to unit L2 norm (a zero row stays zero).
pub fn unit_rows(t: &Tensor) -> candle_core::Result<Tensor> {
    let norms = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    t.broadcast_div(&norms.clamp(f32::MIN_POSITIVE, f32::MAX)?)
}
