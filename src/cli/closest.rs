//! `bccp closest`: the k closest candidates of every query embedding, over all candidates or
//! over one shard of them (a partial result for `bccp merge-topk`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::DeviceArgs;
use bccp::distance::{search_host, DistanceError, Metric, Neighbors, Precision, Search};
use bccp::embeddings::EmbeddingFile;
use bccp::shard::{search_shard, search_shard_tensors, PartialTopK, ShardSpec, TopKContext};

#[derive(Args, Debug)]
pub struct ClosestArgs {
    /// Embedding file of the queries (`embeddings` f32 [Q, D], `targets` i64 [Q]).
    #[arg(long)]
    queries: PathBuf,
    /// Embedding file of the candidates (`embeddings` f32 [N, D], `targets` i64 [N]); may be a
    /// shard written by `bccp embed --shard`.
    #[arg(long)]
    candidates: PathBuf,
    /// Search only the J-th of M contiguous parts of the candidates (rows [J·N/M, (J+1)·N/M))
    /// and write a partial result with global ids for `bccp merge-topk`. A shard file of
    /// `embed --shard` is a part already (this flag may then only repeat its shard).
    #[arg(long, value_name = "J/M")]
    candidates_shard: Option<ShardSpec>,
    /// The distance (l1, l2) or similarity (cosine).
    #[arg(long, value_enum)]
    metric: Metric,
    /// Neighbours per query.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Only candidates whose target differs from the query's.
    #[arg(long)]
    other_class: bool,
    /// The pre-selection's arithmetic on the CPU: f32, or bf16 (l2 and cosine, on CPUs with
    /// AVX512-BF16). The result is the same exact one either way; bf16 is faster.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Output safetensors file (`indices` i64 [Q, k] global candidate ids, `values` f32 [Q, k];
    /// a "none" slot is index -1 with value +inf (l1, l2) or -inf (cosine)).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The candidate rows one run searches: a range of the file's rows, their global ids, the
/// shard they form and the length of the full list.
struct Part {
    spec: ShardSpec,
    rows: std::ops::Range<usize>,
    ids: Vec<i64>,
    total: usize,
}

fn part_of(file: &EmbeddingFile, flag: Option<ShardSpec>) -> Result<Part> {
    match file.shard()? {
        Some(held) => {
            if let Some(asked) = flag.filter(|&f| f != held) {
                anyhow::bail!(
                    "--candidates-shard {asked}: {} holds shard {held} (written by `embed --shard`); \
                     give --candidates-shard {held} or leave it out",
                    file.path().display()
                );
            }
            Ok(Part {
                spec: held,
                rows: 0..file.rows(),
                ids: file.global_ids(),
                total: file.total_rows()?,
            })
        }
        None => {
            let spec = flag.unwrap_or(ShardSpec::WHOLE);
            let rows = spec.range(file.rows());
            Ok(Part {
                spec,
                ids: rows.clone().map(|i| i as i64).collect(),
                rows,
                total: file.rows(),
            })
        }
    }
}

pub fn run(args: ClosestArgs) -> Result<()> {
    let device = args.device.device()?;
    if args.precision == Precision::Bf16 {
        if args.metric == Metric::L1 {
            anyhow::bail!(
                "--precision bf16 applies to --metric l2 and cosine (l1 has no dot product to \
                 pre-select with); use --precision f32 with l1"
            );
        }
        if !device.is_cpu() {
            anyhow::bail!(
                "--precision bf16 is for the CPU search; on a GPU the search pre-selects in TF32 \
                 already: leave --precision out (f32) or search on the CPU"
            );
        }
        if !bccp::distance::bf16::available() {
            eprintln!(
                "note: this CPU has no AVX512-BF16; --precision bf16 runs the f32 search (the same result)"
            );
        }
    }
    let queries = EmbeddingFile::open(&args.queries)?;
    let candidates = EmbeddingFile::open(&args.candidates)?;
    if queries.dim() != candidates.dim() {
        return Err(DistanceError::DimMismatch {
            queries: queries.dim(),
            candidates: candidates.dim(),
        })
        .with_context(|| {
            format!(
                "--queries {} against --candidates {}",
                args.queries.display(),
                args.candidates.display()
            )
        });
    }
    let part = part_of(&candidates, args.candidates_shard)?;
    let started = std::time::Instant::now();
    let dim = candidates.dim();
    let q = queries.embeddings();
    let all = candidates.embeddings();
    let c = &all[part.rows.start * dim..part.rows.end * dim];
    let ct = &candidates.targets[part.rows.clone()];
    let how = Search {
        metric: args.metric,
        k: args.k,
        other_class: args.other_class.then_some((queries.targets.as_slice(), ct)),
        precision: args.precision,
    };
    // A whole search keeps its rules (k ≤ N); a part pads with "none" instead.
    let whole = part.spec.is_whole();
    let found: Result<Neighbors, DistanceError> = if device.is_cpu() {
        if whole {
            search_host(&q, c, dim, &how)
        } else {
            search_shard(&q, c, dim, &how, &part.ids)
        }
    } else {
        let tq = candle_core::Tensor::from_slice(&q, (queries.rows(), dim), &device)?;
        let tc = candle_core::Tensor::from_slice(c, (part.rows.len(), dim), &device)?;
        if whole {
            bccp::distance::search(&tq, &tc, &how)
        } else {
            search_shard_tensors(&tq, &tc, &how, &part.ids)
        }
    };
    let neighbors = found.with_context(|| {
        format!(
            "searching {} against {}",
            args.queries.display(),
            args.candidates.display()
        )
    })?;
    let result = PartialTopK {
        shard: part.spec,
        context: TopKContext {
            k: args.k,
            metric: args.metric,
            other_class: args.other_class,
            queries: queries.rows(),
            queries_sha256: queries.content_sha256(),
            candidate_rows: part.total,
            candidates_list_sha256: candidates.meta("list_sha256").to_owned(),
            weights_sha256: candidates.meta("weights_sha256").to_owned(),
        },
        indices: neighbors.indices,
        values: neighbors.values,
    };
    result
        .save(&args.out)
        .with_context(|| format!("cannot write --out {}", args.out.display()))?;
    if let Some((n, why)) = bccp::distance::take_fallback() {
        eprintln!(
            "note: {n} search(es) ran on the generic device path (tiles copied to the host), not the custom kernels: {why}"
        );
    }
    let rechecks = bccp::distance::take_rechecks();
    if rechecks.device_f32 > 0 {
        eprintln!(
            "note: {} queries' TF32 results could not be proven exact and were searched again in f32",
            rechecks.device_f32
        );
    }
    if rechecks.host_f32 > 0 {
        eprintln!(
            "note: {} queries' bf16 pre-selection could not be proven exact and were searched again in f32",
            rechecks.host_f32
        );
    }
    if rechecks.host_scan > 0 {
        eprintln!(
            "note: {} queries had more near-duplicate candidates than the re-ranking margin and were scanned in full",
            rechecks.host_scan
        );
    }
    let empty = result.indices.iter().filter(|&&i| i < 0).count();
    let note = match empty {
        0 => String::new(),
        n => format!(", {n} slots without an eligible candidate (index -1)"),
    };
    let of = match whole {
        true => format!("{} candidates", part.ids.len()),
        false => format!(
            "{} candidates (shard {} of {} rows)",
            part.ids.len(),
            part.spec,
            part.total
        ),
    };
    println!(
        "found the {} closest of {of} for {} queries ({:?}) in {:.2}s{note}; wrote {}",
        args.k,
        queries.rows(),
        args.metric,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
