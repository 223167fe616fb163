//! `bccp merge-topk`: merges the partial results of `bccp closest --candidates-shard` into the
//! whole search's result.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use bccp::shard::{merge_topk, PartialTopK};

#[derive(Args, Debug)]
pub struct MergeTopkArgs {
    /// Output file, in the format of `bccp closest` (shard 0/1).
    #[arg(long)]
    out: PathBuf,
    /// The partial results, one per shard, in any order.
    #[arg(required = true, value_name = "PARTIAL")]
    parts: Vec<PathBuf>,
}

pub fn run(args: MergeTopkArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let loaded: Vec<PartialTopK> = args
        .parts
        .iter()
        .map(|p| PartialTopK::load(p))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = args.parts.iter().map(|p| p.display().to_string()).collect();
    let named: Vec<(&str, &PartialTopK)> = names.iter().map(String::as_str).zip(&loaded).collect();
    let merged = merge_topk(&named)?;
    merged
        .save(&args.out)
        .with_context(|| format!("cannot write --out {}", args.out.display()))?;
    let c = &merged.context;
    println!(
        "merged {} shards: the {} closest ({:?}) of {} candidates for {} queries in {:.2}s; wrote {}",
        loaded.len(),
        c.k,
        c.metric,
        c.candidate_rows,
        c.queries,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
