//! `bccp experiment`: a grid of train runs from a TOML file, with tables and charts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bccp::experiment::{self, ExperimentFile, RESULTS_CSV};

#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// The experiment file (see experiments/fashion-mnist.toml).
    #[arg(long)]
    config: PathBuf,
    /// Output folder (default: the file's `out`, else runs/experiments/<file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only write results.md and the charts from the existing results.csv.
    #[arg(long)]
    report_only: bool,
    #[command(flatten)]
    mlflow: super::MlflowArgs,
}

pub fn run(args: ExperimentArgs) -> Result<()> {
    let file = ExperimentFile::read(&args.config)?;
    let out = experiment::output_dir(&file, &args.config, args.out.as_deref());
    let mlflow = args.mlflow.target()?;
    if args.report_only {
        let rows = experiment::report::read_csv(&out.join(RESULTS_CSV))?;
        anyhow::ensure!(!rows.is_empty(), "{} has no results yet", out.display());
        experiment::write_reports(&rows, &out)?;
        println!("wrote the reports in {}", out.display());
        return Ok(());
    }
    let summary = experiment::run(&file, &out, |line| println!("{line}"))?;
    println!(
        "\n{} runs: {} run now, {} already in {RESULTS_CSV}; results.csv, results.md, accuracy.png and detection.png in {}",
        summary.total,
        summary.ran,
        summary.skipped,
        out.display()
    );
    if let Some(target) = mlflow {
        // Each run of this call, with the experiment's tables and charts beside its files.
        let reports: Vec<(String, PathBuf)> = [
            RESULTS_CSV,
            experiment::RESULTS_MD,
            experiment::ACCURACY_PNG,
            experiment::DETECTION_PNG,
        ]
        .iter()
        .map(|f| (format!("experiment/{f}"), out.join(f)))
        .filter(|(_, p)| p.is_file())
        .collect();
        for run in &summary.registered {
            let m = bccp::tracking::mirror_run(
                &target,
                &summary.registry,
                run,
                "bccp experiment",
                &[],
                &reports,
            )
            .map_err(|e| super::train::local_kept(e, run))?;
            super::print_mirrored(&target, &m);
        }
    }
    Ok(())
}
