//! `bccp audit`: the data-quality report (label issues, duplicates and leaks, outliers,
//! corrupted images, class balance) of a prepared dataset or an image folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{BackboneArgs, CacheArgs, DbArgs, DeviceArgs};
use bccp::audit::{audit, write_outputs, AuditInput, AuditOptions};
use bccp::backbone::Embedder;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// A dataset made by `bccp prepare` (Monday and Tuesday, split train/test as `bccp train`
    /// splits them).
    #[arg(long, conflicts_with_all = ["folder", "db"], required_unless_present_any = ["folder", "db"])]
    dataset: Option<PathBuf>,
    /// Or an image folder ROOT/<class>/<file> (no splits, no days).
    #[arg(long, conflicts_with = "db")]
    folder: Option<PathBuf>,
    /// Or the samples of a data store (`--db sqlite:PATH` or `postgres://…`): the given labels,
    /// the store's train/gate split, the source as the day.
    #[command(flatten)]
    db: DbArgs,
    /// Output folder: report.jsonl, summary.json, report.html and thumbs/.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Neighbours per sample (k-NN label disagreement; the outlier score is the distance to
    /// the k-th).
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Near-duplicate threshold: this share of the median nearest-neighbour distance.
    #[arg(long, default_value_t = 0.3)]
    near_factor: f32,
    /// Robust z-score of the k-th neighbour distance above which a sample is an outlier.
    #[arg(long, default_value_t = 3.0)]
    outlier_z: f32,
    /// Robust z-score of the corruption score above which an image is flagged.
    #[arg(long, default_value_t = 3.5)]
    corrupt_z: f32,
    /// Cross-validation folds of the label-issue probabilities.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    /// Samples (or duplicate groups) per page of report.html.
    #[arg(long, default_value_t = 60)]
    page_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: AuditArgs, quiet: bool) -> Result<()> {
    anyhow::ensure!(
        (1..=bccp::distance::MAX_K - 1).contains(&args.k),
        "--k {} must be in 1..{}",
        args.k,
        bccp::distance::MAX_K - 1
    );
    anyhow::ensure!(
        args.folds >= 2 && args.folds <= bccp::config::MAX_FOLDS,
        "--folds {} must be in 2..={}",
        args.folds,
        bccp::config::MAX_FOLDS
    );
    anyhow::ensure!(
        args.epochs >= 1 && args.epochs <= bccp::config::MAX_EPOCHS,
        "--epochs {} must be in 1..={}",
        args.epochs,
        bccp::config::MAX_EPOCHS
    );
    anyhow::ensure!(args.page_size >= 1, "--page-size must be 1 or more");
    for (flag, v) in [
        ("--near-factor", args.near_factor),
        ("--outlier-z", args.outlier_z),
        ("--corrupt-z", args.corrupt_z),
    ] {
        anyhow::ensure!(
            v.is_finite() && v >= 0.0,
            "{flag} {v} must be a number, 0 or more"
        );
    }
    let input = match (&args.dataset, &args.folder) {
        (Some(d), _) => AuditInput::prepared(d).with_context(|| {
            format!(
                "--dataset {} (a folder made by `bccp prepare`)",
                d.display()
            )
        })?,
        (None, Some(f)) => {
            let input = AuditInput::folder(f).with_context(|| {
                format!(
                    "--folder {} (an image folder ROOT/<class>/<file>)",
                    f.display()
                )
            })?;
            super::print_skipped(&input.list.skipped);
            input
        }
        (None, None) if args.db.db.is_some() => {
            let mut store = args.db.open()?;
            AuditInput::store(store.as_mut())
                .with_context(|| format!("--db {}", store.location()))?
        }
        (None, None) => anyhow::bail!("give --dataset PREPARED, --folder DIR or --db URL"),
    };
    let config = args
        .backbone
        .embedder(&args.device, args.cache.dir(), 64, false)?;
    let embedder = Embedder::new(&config)?;
    let opts = AuditOptions {
        k: args.k,
        near_factor: args.near_factor,
        outlier_z: args.outlier_z,
        corrupt_z: args.corrupt_z,
        folds: args.folds,
        epochs: args.epochs,
        seed: args.seed,
    };
    let result = audit(&input, &embedder, &opts, &super::progress(quiet))?;
    super::print_cache_warning(&result.embed_stats);
    write_outputs(&result, &args.out, args.page_size)?;
    let s = &result.summary;
    println!("| class | samples | label issues | exact dup. | near dup. | outliers | corrupted |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for c in &s.classes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            c.class,
            c.samples,
            c.label_issues,
            c.exact_duplicates,
            c.near_duplicates,
            c.outliers,
            c.corrupted
        );
    }
    println!(
        "\n{} samples: {} label issues, {} exact-duplicate groups, {} near-duplicate groups (threshold {:.4}), {} split leaks, {} day leaks, {} outliers, {} corrupted; imbalance {:.2}",
        s.samples,
        s.label_issues,
        s.exact_duplicate_groups,
        s.near_duplicate_groups,
        s.near_duplicate_threshold,
        s.split_leaks,
        s.day_leaks,
        s.outliers,
        s.corrupted,
        s.imbalance_ratio
    );
    if let Some(c) = &s.corruption_check {
        println!(
            "corrupted-image score against the clean originals: ROC AUC {:.4} ({} corrupted, {} originals); {} over the {} whose pixels changed",
            c.roc_auc,
            c.corrupted,
            c.originals,
            c.roc_auc_changed.map_or("–".to_string(), |a| format!("{a:.4}")),
            c.changed
        );
    }
    println!(
        "wrote {}/report.jsonl, summary.json, report.html",
        args.out.display()
    );
    Ok(())
}
