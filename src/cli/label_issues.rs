//! `bccp label-issues`: likely wrong labels by confident learning, from `.npy` inputs or from
//! an image dataset that bccp embeds and cross-validates itself.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{BackboneArgs, CacheArgs, DeviceArgs};
use bccp::backbone::Embedder;
use bccp::baselines::FilterBy;
use bccp::label_issues::{
    dataset_issues, mask_from_npy, masks_from_npy_shards, summary_path, write_jsonl, write_summary,
    DatasetIssueOptions,
};

#[derive(Args, Debug)]
pub struct LabelIssuesArgs {
    /// Out-of-sample predicted probabilities, .npy [samples, classes] (with --labels). Repeat
    /// --pred-probs, --labels and --out once per shard of samples (in shard order): the
    /// thresholds and the pruning are computed over all shards together, one mask per shard.
    #[arg(long, requires = "labels", conflicts_with = "dataset")]
    pred_probs: Vec<PathBuf>,
    /// Given labels, .npy [samples] of class indices (with --pred-probs).
    #[arg(long, requires = "pred_probs")]
    labels: Vec<PathBuf>,
    /// Or: an image folder ROOT/<class>/<file> or a JSON Lines manifest; bccp embeds it and
    /// computes K-fold probabilities itself.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// cleanlab's filter_by.
    #[arg(long, value_enum, default_value_t = FilterBy::PruneByNoiseRate)]
    filter_by: FilterBy,
    /// Output: a boolean mask .npy (with --pred-probs; one per shard) or a JSON Lines report
    /// (with --dataset).
    #[arg(long, required = true)]
    out: Vec<PathBuf>,
    /// The backbone that embeds --dataset.
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: LabelIssuesArgs, quiet: bool) -> Result<()> {
    if args.pred_probs.len() > 1 {
        return shards(&args);
    }
    if let (Some(probs), Some(labels)) = (args.pred_probs.first(), args.labels.first()) {
        anyhow::ensure!(
            args.labels.len() == 1 && args.out.len() == 1,
            "one --pred-probs needs one --labels and one --out (found {} and {})",
            args.labels.len(),
            args.out.len()
        );
        let mask = mask_from_npy(probs, labels, args.filter_by)?;
        bccp::npy::write_bool(&args.out[0], &mask)?;
        println!(
            "{} of {} samples flagged ({}); wrote {}",
            mask.iter().filter(|&&m| m).count(),
            mask.len(),
            args.filter_by.name(),
            args.out[0].display()
        );
        return Ok(());
    }
    let [out] = args.out.as_slice() else {
        anyhow::bail!("--dataset writes one report: give one --out");
    };
    let dataset = args
        .dataset
        .as_ref()
        .context("give --pred-probs P.npy --labels L.npy, or --dataset DIR")?;
    anyhow::ensure!(args.folds >= 2, "--folds {} must be 2 or more", args.folds);
    let config = args
        .backbone
        .embedder(&args.device, args.cache.dir(), 64, false)?;
    let embedder = Embedder::new(&config)?;
    let opts = DatasetIssueOptions {
        filter_by: args.filter_by,
        folds: args.folds,
        epochs: args.epochs,
        seed: args.seed,
    };
    let issues = dataset_issues(dataset, &embedder, &opts, &super::progress(quiet))?;
    super::print_cache_warning(&issues.embed_stats);
    write_jsonl(out, &issues.records)?;
    let summary_file = summary_path(out);
    write_summary(&summary_file, &issues.summary)?;
    println!("| class | samples | issues |\n|---|---:|---:|");
    for c in &issues.summary {
        println!("| {} | {} | {} |", c.class, c.samples, c.issues);
    }
    let flagged: usize = issues.summary.iter().map(|c| c.issues).sum();
    println!(
        "\n{flagged} of {} samples flagged ({}, {}-fold probabilities of a linear head on {} features); wrote {} and {}",
        issues.records.len(),
        args.filter_by.name(),
        args.folds,
        embedder.spec().name,
        out.display(),
        summary_file.display()
    );
    Ok(())
}

/// Confident learning over shards of samples: one (--pred-probs, --labels, --out) per shard.
fn shards(args: &LabelIssuesArgs) -> Result<()> {
    let n = args.pred_probs.len();
    anyhow::ensure!(
        args.labels.len() == n && args.out.len() == n,
        "{n} --pred-probs need {n} --labels and {n} --out, one per shard (found {} and {})",
        args.labels.len(),
        args.out.len()
    );
    let pairs: Vec<(&std::path::Path, &std::path::Path)> = args
        .pred_probs
        .iter()
        .zip(&args.labels)
        .map(|(p, l)| (p.as_path(), l.as_path()))
        .collect();
    let masks = masks_from_npy_shards(&pairs, args.filter_by)?;
    for (mask, out) in masks.iter().zip(&args.out) {
        bccp::npy::write_bool(out, mask)?;
        println!(
            "{} of {} samples flagged; wrote {}",
            mask.iter().filter(|&&m| m).count(),
            mask.len(),
            out.display()
        );
    }
    println!(
        "{} of {} samples flagged over {n} shards ({})",
        masks.iter().flatten().filter(|&&m| m).count(),
        masks.iter().map(Vec::len).sum::<usize>(),
        args.filter_by.name()
    );
    Ok(())
}
