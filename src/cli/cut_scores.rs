//! `bccp cut-scores`: the percentile cut over per-shard score arrays, drawn once over all
//! shards together.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use bccp::cutoff::Scope;
use bccp::shard::cut_shards;

#[derive(Args, Debug)]
pub struct CutScoresArgs {
    /// Scores of one shard of samples, .npy [samples] (higher = more suspicious). Repeat once
    /// per shard, in shard order (ties go to the earlier sample).
    #[arg(long, required = true)]
    scores: Vec<PathBuf>,
    /// Given labels of the shard, .npy [samples] (needed with --scope per_class); one per
    /// --scores.
    #[arg(long)]
    labels: Vec<PathBuf>,
    /// Output: the shard's cut mask, a NumPy bool .npy; one per --scores.
    #[arg(long, required = true)]
    out: Vec<PathBuf>,
    /// Samples above this percentile (0-100) of the scores are cut.
    #[arg(long, default_value_t = 90.0)]
    percentile: f64,
    /// One ranking of all samples (global) or one per given class (per_class).
    #[arg(long, value_enum, default_value_t = Scope::Global)]
    scope: Scope,
}

fn read_1d(path: &PathBuf, flag: &str) -> Result<Vec<f64>> {
    let a = bccp::npy::read(path)?;
    anyhow::ensure!(
        a.shape.len() == 1,
        "{flag} {} has shape {:?}; expected [samples]",
        path.display(),
        a.shape
    );
    Ok(a.values)
}

pub fn run(args: CutScoresArgs) -> Result<()> {
    let n = args.scores.len();
    anyhow::ensure!(
        args.out.len() == n && (args.labels.is_empty() || args.labels.len() == n),
        "{n} --scores need {n} --out (and {n} --labels or none), one per shard; found {} and {}",
        args.out.len(),
        args.labels.len()
    );
    anyhow::ensure!(
        (0.0..=100.0).contains(&args.percentile),
        "--percentile {} must be in [0, 100]",
        args.percentile
    );
    let scores: Vec<Vec<f32>> = args
        .scores
        .iter()
        .map(|p| {
            Ok(read_1d(p, "--scores")?
                .into_iter()
                .map(|v| v as f32)
                .collect())
        })
        .collect::<Result<_>>()?;
    for (p, s) in args.scores.iter().zip(&scores) {
        anyhow::ensure!(
            s.iter().all(|v| !v.is_nan()),
            "--scores {} holds a NaN",
            p.display()
        );
    }
    let labels: Vec<Vec<u32>> = args
        .labels
        .iter()
        .zip(&scores)
        .map(|(p, s)| {
            let l = read_1d(p, "--labels")?;
            anyhow::ensure!(
                l.len() == s.len(),
                "--labels {} has {} labels for {} scores",
                p.display(),
                l.len(),
                s.len()
            );
            l.iter()
                .map(|&v| {
                    anyhow::ensure!(
                        v >= 0.0 && v.fract() == 0.0 && v < f64::from(u32::MAX),
                        "--labels {}: {v} is not a class index",
                        p.display()
                    );
                    Ok(v as u32)
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        args.scope == Scope::Global || !labels.is_empty(),
        "--scope per_class needs --labels for every shard"
    );
    let masks = cut_shards(
        &scores,
        (!labels.is_empty()).then_some(labels.as_slice()),
        args.percentile,
        args.scope,
    )?;
    for (mask, out) in masks.iter().zip(&args.out) {
        bccp::npy::write_bool(out, mask).with_context(|| format!("--out {}", out.display()))?;
    }
    let cut = masks.iter().flatten().filter(|&&m| m).count();
    let total: usize = masks.iter().map(Vec::len).sum();
    println!(
        "cut {cut} of {total} samples over {n} shards (above the {} percentile, {}); wrote {}",
        args.percentile,
        args.scope.name(),
        args.out
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
