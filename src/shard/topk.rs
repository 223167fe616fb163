//! Partial top-k over one part of the candidates, with global ids, and the exact merge.

use rayon::prelude::*;

use super::{ShardError, ShardSpec};
use candle_core::Tensor;

use crate::distance::{search, search_host, DistanceError, Metric, Neighbors, Search, MAX_K};

/// What every part of one sharded search shares; parts whose contexts differ cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopKContext {
    pub k: usize,
    pub metric: Metric,
    /// Whether only candidates of another class were eligible.
    pub other_class: bool,
    /// Number of queries.
    pub queries: usize,
    /// SHA-256 of the queries (embeddings and targets), hex.
    pub queries_sha256: String,
    /// Rows of the whole candidate list (all parts together).
    pub candidate_rows: usize,
    /// Fingerprint of the candidates' full image list (empty when the file has none).
    pub candidates_list_sha256: String,
    /// Hash of the weights that embedded the candidates (empty when unknown).
    pub weights_sha256: String,
}

/// The top-k of every query against one part (`shard`) of the candidates: `indices` [Q × k]
/// row-major global candidate ids (−1 = none), `values` [Q × k] exact values, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialTopK {
    pub shard: ShardSpec,
    pub context: TopKContext,
    pub indices: Vec<i64>,
    pub values: Vec<f32>,
}

impl PartialTopK {
    /// The result as [`Neighbors`] (for a whole or merged result).
    pub fn neighbors(&self) -> Neighbors {
        Neighbors {
            k: self.context.k,
            indices: self.indices.clone(),
            values: self.values.clone(),
        }
    }
}

/// The ranking key of a value: smaller is closer.
fn rank_key(metric: Metric, v: f32) -> f32 {
    if metric == Metric::Cosine {
        -v
    } else {
        v
    }
}

/// The exact top-`s.k` of every query among `candidates` (row-major, `dim` columns), a part
/// of a larger list whose global ids are `rows` (one per candidate row, increasing). Unlike
/// [`search_host`], a part with fewer than k (eligible) rows, or none, is no error: its
/// remaining slots hold index −1 and value +∞ (L1, L2) or −∞ (cosine). Indices are global.
pub fn search_shard(
    queries: &[f32],
    candidates: &[f32],
    dim: usize,
    s: &Search,
    rows: &[i64],
) -> Result<Neighbors, DistanceError> {
    crate::distance::check_host_shape(queries, candidates, dim)?;
    let (nq, nc) = (queries.len() / dim, candidates.len() / dim);
    check_rows(rows, nc)?;
    check_k(s.k)?;
    let k = s.k;
    let mut out = Neighbors {
        k,
        indices: vec![-1; nq * k],
        values: vec![s.metric.empty_value(); nq * k],
    };
    if nc == 0 {
        return Ok(out);
    }
    let part = search_host(queries, candidates, dim, &Search { k: k.min(nc), ..*s })?;
    fill_global(&mut out, &part, rows);
    Ok(out)
}

/// [`search_shard`] on tensors, through [`crate::distance::search`] (the CUDA kernels for CUDA
/// tensors): for devices, which hold the part's matrix whole.
pub fn search_shard_tensors(
    queries: &Tensor,
    candidates: &Tensor,
    s: &Search,
    rows: &[i64],
) -> Result<Neighbors, DistanceError> {
    let shape = |t: &Tensor, what| {
        t.dims2().map_err(|_| DistanceError::BadShape {
            what,
            found: format!("{:?}", t.dims()),
        })
    };
    let (nq, _) = shape(queries, "queries")?;
    let (nc, _) = shape(candidates, "candidates")?;
    check_rows(rows, nc)?;
    check_k(s.k)?;
    let mut out = Neighbors {
        k: s.k,
        indices: vec![-1; nq * s.k],
        values: vec![s.metric.empty_value(); nq * s.k],
    };
    if nc == 0 {
        return Ok(out);
    }
    let part = search(
        queries,
        candidates,
        &Search {
            k: s.k.min(nc),
            ..*s
        },
    )?;
    fill_global(&mut out, &part, rows);
    Ok(out)
}

/// Copies a part's result (k' ≤ k slots per query, local indices) into `out` (k slots) with
/// global ids.
fn fill_global(out: &mut Neighbors, part: &Neighbors, rows: &[i64]) {
    let (k, kk) = (out.k, part.k);
    for q in 0..part.len() {
        for j in 0..kk {
            let i = part.indices[q * kk + j];
            if i >= 0 {
                out.indices[q * k + j] = rows[i as usize];
                out.values[q * k + j] = part.values[q * kk + j];
            }
        }
    }
}

fn check_rows(rows: &[i64], nc: usize) -> Result<(), DistanceError> {
    if rows.len() != nc {
        return Err(DistanceError::BadShape {
            what: "candidate ids",
            found: format!("{} ids for {nc} rows", rows.len()),
        });
    }
    if rows.windows(2).any(|w| w[0] >= w[1]) || rows.first().is_some_and(|&r| r < 0) {
        return Err(DistanceError::BadShape {
            what: "candidate ids",
            found: "ids that are not increasing and non-negative".into(),
        });
    }
    Ok(())
}

fn check_k(k: usize) -> Result<(), DistanceError> {
    if k == 0 {
        return Err(DistanceError::KZero);
    }
    if k > MAX_K {
        return Err(DistanceError::KOverLimit { k });
    }
    Ok(())
}

/// Checks that `parts` (name, part) are the complete set of shards of one search, then merges
/// them: per query, every part's entries ordered by value (best first), then by global id, and
/// the first k kept. The result (shard `0/1`) does not depend on the order of `parts`. Errors
/// name the parts: a different shard count, k, metric, other-class setting, queries or
/// candidate run (weights hash, image list), a shard given twice or missing, ids outside
/// their shard.
pub fn merge_topk(parts: &[(&str, &PartialTopK)]) -> Result<PartialTopK, ShardError> {
    let (first, head) = *parts.first().ok_or(ShardError::NoParts)?;
    let count = head.shard.count;
    let c0 = &head.context;
    let mut owner: Vec<Option<&str>> = vec![None; count];
    for &(file, part) in parts {
        // The fields are public: a hand-made spec may be out of range.
        ShardSpec::new(part.shard.index, part.shard.count).map_err(|e| ShardError::BadPart {
            file: file.into(),
            message: e.to_string(),
        })?;
        if part.shard.count != count {
            return Err(ShardError::CountMismatch {
                file: file.into(),
                shard: part.shard,
                count: part.shard.count,
                first: first.into(),
                first_count: count,
            });
        }
        check_context(file, &part.context, first, c0)?;
        if let Some(a) = owner[part.shard.index] {
            return Err(ShardError::Overlap {
                shard: part.shard,
                a: a.into(),
                b: file.into(),
            });
        }
        owner[part.shard.index] = Some(file);
        check_part(file, part)?;
    }
    let missing: Vec<String> = (0..count)
        .filter(|&i| owner[i].is_none())
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ShardError::Missing {
            missing: missing.join(", "),
            count,
        });
    }
    let (k, metric, nq) = (c0.k, c0.metric, c0.queries);
    let merged: Vec<(Vec<i64>, Vec<f32>)> = (0..nq)
        .into_par_iter()
        .map(|q| {
            let mut all: Vec<(f32, i64)> = parts
                .iter()
                .flat_map(|(_, p)| {
                    let span = q * k..(q + 1) * k;
                    p.values[span.clone()]
                        .iter()
                        .copied()
                        .zip(p.indices[span].iter().copied())
                })
                .filter(|&(_, i)| i >= 0)
                .collect();
            all.sort_by(|a, b| {
                rank_key(metric, a.0)
                    .total_cmp(&rank_key(metric, b.0))
                    .then(a.1.cmp(&b.1))
            });
            all.resize(k.max(all.len()), (metric.empty_value(), -1));
            all.truncate(k);
            all.into_iter().map(|(v, i)| (i, v)).unzip()
        })
        .collect();
    let mut out = PartialTopK {
        shard: ShardSpec::WHOLE,
        context: c0.clone(),
        indices: Vec::with_capacity(nq * k),
        values: Vec::with_capacity(nq * k),
    };
    for (idx, val) in merged {
        out.indices.extend(idx);
        out.values.extend(val);
    }
    Ok(out)
}

/// Refuses a part whose context differs from the first part's, naming the field.
fn check_context(
    file: &str,
    c: &TopKContext,
    first: &str,
    c0: &TopKContext,
) -> Result<(), ShardError> {
    const SEARCH: &str = "parts of one merge must come from the same search";
    const RUN: &str = "the candidate shards come from different embedding runs";
    let fields: [(&'static str, String, String, &'static str); 8] = [
        ("k", c.k.to_string(), c0.k.to_string(), SEARCH),
        (
            "metric",
            format!("{:?}", c.metric),
            format!("{:?}", c0.metric),
            SEARCH,
        ),
        (
            "other-class",
            c.other_class.to_string(),
            c0.other_class.to_string(),
            SEARCH,
        ),
        (
            "query count",
            c.queries.to_string(),
            c0.queries.to_string(),
            SEARCH,
        ),
        (
            "queries fingerprint",
            c.queries_sha256.clone(),
            c0.queries_sha256.clone(),
            "parts of one merge must search the same queries",
        ),
        (
            "candidate row count",
            c.candidate_rows.to_string(),
            c0.candidate_rows.to_string(),
            RUN,
        ),
        (
            "weights hash",
            c.weights_sha256.clone(),
            c0.weights_sha256.clone(),
            RUN,
        ),
        (
            "image-list fingerprint",
            c.candidates_list_sha256.clone(),
            c0.candidates_list_sha256.clone(),
            RUN,
        ),
    ];
    for (what, found, expected, why) in fields {
        if found != expected {
            return Err(ShardError::Mismatch {
                file: file.into(),
                first: first.into(),
                what,
                values: Box::new([found, expected]),
                why,
            });
        }
    }
    Ok(())
}

/// Refuses a part whose arrays do not have Q × k entries or whose ids lie outside its shard.
fn check_part(file: &str, p: &PartialTopK) -> Result<(), ShardError> {
    let want = p.context.queries * p.context.k;
    let bad = |message: String| ShardError::BadPart {
        file: file.into(),
        message,
    };
    if p.indices.len() != want || p.values.len() != want {
        return Err(bad(format!(
            "{} indices and {} values, expected {} queries × k = {} = {want}",
            p.indices.len(),
            p.values.len(),
            p.context.queries,
            p.context.k
        )));
    }
    let range = p.shard.range(p.context.candidate_rows);
    if let Some(&i) = p
        .indices
        .iter()
        .find(|&&i| i < -1 || (i >= 0 && !range.contains(&(i as usize))))
    {
        return Err(bad(format!(
            "candidate id {i} lies outside shard {} (rows {}..{} of {})",
            p.shard, range.start, range.end, p.context.candidate_rows
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::Precision;

    fn context(k: usize, queries: usize, rows: usize) -> TopKContext {
        TopKContext {
            k,
            metric: Metric::L1,
            other_class: false,
            queries,
            queries_sha256: "q".into(),
            candidate_rows: rows,
            candidates_list_sha256: "list".into(),
            weights_sha256: "w".into(),
        }
    }

    fn part(i: usize, n: usize, q: &[f32], c: &[f32], k: usize) -> PartialTopK {
        let spec = ShardSpec::new(i, n).unwrap();
        let r = spec.range(c.len());
        let rows: Vec<i64> = r.clone().map(|i| i as i64).collect();
        let s = Search {
            metric: Metric::L1,
            k,
            other_class: None,
            precision: Precision::F32,
        };
        let found = search_shard(q, &c[r], 1, &s, &rows).unwrap();
        PartialTopK {
            shard: spec,
            context: context(k, q.len(), c.len()),
            indices: found.indices,
            values: found.values,
        }
    }

    #[test]
    fn small_shards_pad_and_ties_go_to_the_lower_global_id() {
        // 1-D: candidates 3, 1, 1, 2, 1; query 0; three shards [0,1) [1,3) [3,5).
        let c = [3f32, 1.0, 1.0, 2.0, 1.0];
        let parts: Vec<PartialTopK> = (0..3).map(|i| part(i, 3, &[0.0], &c, 4)).collect();
        assert_eq!(parts[0].indices, vec![0, -1, -1, -1]);
        assert_eq!(parts[0].values[1], f32::INFINITY);
        let names = ["c", "a", "b"];
        let order = [2usize, 0, 1];
        let named: Vec<(&str, &PartialTopK)> =
            order.iter().map(|&i| (names[i], &parts[i])).collect();
        let merged = merge_topk(&named).unwrap();
        assert_eq!(merged.indices, vec![1, 2, 4, 3]);
        assert_eq!(merged.values, vec![1.0, 1.0, 1.0, 2.0]);
        assert_eq!(merged.shard, ShardSpec::WHOLE);
    }

    #[test]
    fn bad_sets_of_parts_are_refused_by_name() {
        let c = [3f32, 1.0, 1.0, 2.0, 1.0];
        let p: Vec<PartialTopK> = (0..3).map(|i| part(i, 3, &[0.0], &c, 2)).collect();
        let err = |parts: &[(&str, &PartialTopK)]| merge_topk(parts).unwrap_err().to_string();
        let e = err(&[("a", &p[0]), ("b", &p[1])]);
        assert!(e.contains("shard(s) 2 of 3 missing"), "{e}");
        let e = err(&[("a", &p[0]), ("b", &p[1]), ("c", &p[1])]);
        assert!(e.contains("b and c are both shard 1/3"), "{e}");
        let other = part(0, 2, &[0.0], &c, 2);
        let e = err(&[("a", &p[0]), ("x", &other)]);
        assert!(e.contains("x is shard 0/2 of 2, but a is of 3"), "{e}");
        for (what, change) in [
            (
                "k",
                Box::new(|c: &mut TopKContext| c.k = 3) as Box<dyn Fn(&mut TopKContext)>,
            ),
            (
                "metric",
                Box::new(|c: &mut TopKContext| c.metric = Metric::L2),
            ),
            (
                "weights hash",
                Box::new(|c: &mut TopKContext| c.weights_sha256 = "v".into()),
            ),
            (
                "image-list fingerprint",
                Box::new(|c: &mut TopKContext| c.candidates_list_sha256 = "l2".into()),
            ),
            (
                "queries fingerprint",
                Box::new(|c: &mut TopKContext| c.queries_sha256 = "r".into()),
            ),
        ] {
            let mut odd = p[1].clone();
            change(&mut odd.context);
            let e = err(&[("a", &p[0]), ("b", &odd), ("c", &p[2])]);
            assert!(
                e.starts_with(&format!("b has {what}")) && e.contains("but a has"),
                "{e}"
            );
        }
        let mut bad_spec = p[1].clone();
        bad_spec.shard = ShardSpec { index: 3, count: 3 };
        let e = err(&[("a", &p[0]), ("b", &bad_spec), ("c", &p[2])]);
        assert!(e.starts_with("b: invalid shard 3/3"), "{e}");
        let mut outside = p[1].clone();
        outside.indices[0] = 0;
        let e = err(&[("a", &p[0]), ("b", &outside), ("c", &p[2])]);
        assert!(
            e.contains("b: candidate id 0 lies outside shard 1/3"),
            "{e}"
        );
        assert!(matches!(merge_topk(&[]), Err(ShardError::NoParts)));
    }
}
