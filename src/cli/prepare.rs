//! `bccp prepare`: split an image folder into clean Monday and corrupted Tuesday data.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use bccp::data::{self, Corruption, PrepareOptions};

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Source image folder ROOT/<class>/<file>.
    #[arg(long)]
    source: PathBuf,
    /// Output folder (monday/, tuesday_original/, tuesday/, monday.jsonl, tuesday.jsonl).
    #[arg(long)]
    out: PathBuf,
    /// Share of each class that goes to Monday, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.5)]
    split: f64,
    /// Corruption of Tuesday's images.
    #[arg(long, value_enum, default_value_t = Corruption::Mixed)]
    corruption: Corruption,
    /// Seed of the split and the corruptions; the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
    /// Skip images that cannot be decoded (with a warning and a count) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Monday's date (YYYY-MM-DD, UTC) for the manifests' timestamps; Tuesday is the next day.
    #[arg(long, default_value = "2024-01-01")]
    monday_date: String,
}

pub fn run(args: PrepareArgs, quiet: bool) -> Result<()> {
    let monday_start = data::timestamp::parse_date(&args.monday_date).with_context(|| {
        format!(
            "invalid --monday-date {:?}: expected a date YYYY-MM-DD",
            args.monday_date
        )
    })?;
    let opts = PrepareOptions {
        source: args.source,
        out: args.out,
        split: args.split,
        corruption: args.corruption,
        seed: args.seed,
        force: args.force,
        skip_bad: args.skip_bad,
        monday_start,
    };
    let started = std::time::Instant::now();
    let summary = data::prepare(&opts, &super::progress(quiet))?;
    for (path, why) in &summary.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let info = &summary.info;
    let monday: usize = info.monday_per_class.iter().sum();
    let tuesday: usize = info.tuesday_per_class.iter().sum();
    println!(
        "prepared {} in {:.1}s: {monday} Monday and {tuesday} Tuesday images, {} classes, corruption {}, seed {}",
        opts.out.display(),
        started.elapsed().as_secs_f64(),
        info.classes.len(),
        info.corruption,
        info.seed
    );
    if !summary.skipped.is_empty() {
        eprintln!(
            "warning: {} unreadable images skipped",
            summary.skipped.len()
        );
    }
    if summary.ignored_files > 0 {
        eprintln!(
            "note: {} files with non-image extensions were ignored",
            summary.ignored_files
        );
    }
    super::print_skipped(&summary.scan_skipped);
    Ok(())
}
