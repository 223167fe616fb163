//! `bccp closest`: the k closest candidates of every query embedding.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::DeviceArgs;
use bccp::distance::{search, Metric, Search};
use bccp::embeddings::EmbeddingSet;

#[derive(Args, Debug)]
pub struct ClosestArgs {
    /// Embedding file of the queries (`embeddings` f32 [Q, D], `targets` i64 [Q]).
    #[arg(long)]
    queries: PathBuf,
    /// Embedding file of the candidates (`embeddings` f32 [N, D], `targets` i64 [N]).
    #[arg(long)]
    candidates: PathBuf,
    /// The distance (l1, l2) or similarity (cosine).
    #[arg(long, value_enum)]
    metric: Metric,
    /// Neighbours per query.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Only candidates whose target differs from the query's.
    #[arg(long)]
    other_class: bool,
    /// Output safetensors file (`indices` i64 [Q, k], `values` f32 [Q, k]).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ClosestArgs) -> Result<()> {
    let device = args.device.device()?;
    let queries = EmbeddingSet::load(&args.queries)?;
    let candidates = EmbeddingSet::load(&args.candidates)?;
    let started = std::time::Instant::now();
    let how = Search {
        metric: args.metric,
        k: args.k,
        other_class: args
            .other_class
            .then_some((queries.targets.as_slice(), candidates.targets.as_slice())),
    };
    let neighbors = search(
        &queries.embeddings.to_device(&device)?,
        &candidates.embeddings.to_device(&device)?,
        &how,
    )
    .with_context(|| {
        format!(
            "searching {} against {}",
            args.queries.display(),
            args.candidates.display()
        )
    })?;
    let (indices, values) = neighbors.to_tensors(&candle_core::Device::Cpu)?;
    let tensors = HashMap::from([
        ("indices".to_owned(), indices),
        ("values".to_owned(), values),
    ]);
    let bytes = safetensors::serialize(&tensors, None)?;
    bccp::fsutil::write_atomic(&args.out, &bytes)
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
    if rechecks.host_scan > 0 {
        eprintln!(
            "note: {} queries had more near-duplicate candidates than the re-ranking margin and were scanned in full",
            rechecks.host_scan
        );
    }
    let empty = neighbors.indices.iter().filter(|&&i| i < 0).count();
    let note = match empty {
        0 => String::new(),
        n => format!(", {n} slots without an eligible candidate (index -1)"),
    };
    println!(
        "found the {} closest of {} candidates for {} queries ({:?}) in {:.2}s{note}; wrote {}",
        args.k,
        candidates.targets.len(),
        queries.targets.len(),
        args.metric,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
