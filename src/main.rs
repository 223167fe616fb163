//! The `bccp` command line: parses and validates arguments, calls the library, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use bccp::data::{self, Corruption, ImageFolder, PrepareOptions};
use bccp::progress::Progress;

#[derive(Parser, Debug)]
#[command(
    name = "bccp",
    version,
    about = "Clean noisy real-time image data before re-training a classifier"
)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a dataset from another format into an image folder.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Split an image folder into clean Monday and corrupted Tuesday data with manifests.
    Prepare(PrepareArgs),
    /// Summarise an image folder or a prepared Monday/Tuesday dataset.
    Info(InfoArgs),
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// IDX files (MNIST, Fashion-MNIST; raw or gzip) → OUT/<class>/<index>.png.
    Idx(IdxArgs),
}

#[derive(Args, Debug)]
struct IdxArgs {
    /// IDX file of images (u8, [count, rows, cols]).
    #[arg(long)]
    images: PathBuf,
    /// IDX file of labels (u8, [count]).
    #[arg(long)]
    labels: PathBuf,
    /// Class names in label order, comma-separated (label k → folder of the k-th name).
    #[arg(long, value_delimiter = ',', required = true)]
    classes: Vec<String>,
    /// Output image folder.
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// Source image folder ROOT/<class>/<file>.
    #[arg(long)]
    source: PathBuf,
    /// Output folder (monday/, tuesday_original/, tuesday/, monday.jsonl, tuesday.jsonl).
    #[arg(long)]
    out: PathBuf,
    /// Share of each class that goes to Monday, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.5)]
    split: f64,
    /// Corruption of Tuesday's images: mixed, random_boxes, mosaic, random_line or none.
    #[arg(long, default_value = "mixed")]
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

#[derive(Args, Debug)]
struct InfoArgs {
    /// An image folder, or the output of `bccp prepare`.
    dir: PathBuf,
}

fn progress(quiet: bool) -> Progress {
    if quiet {
        Progress::hidden()
    } else {
        Progress::stderr()
    }
}

fn run_import_idx(args: IdxArgs, quiet: bool) -> Result<()> {
    let opts = data::idx::IdxImport {
        images: args.images,
        labels: args.labels,
        classes: args.classes,
        out: args.out,
        force: args.force,
    };
    let started = std::time::Instant::now();
    let per_class = data::idx::import_idx(&opts, &progress(quiet))?;
    println!(
        "imported {} images into {} in {:.1}s",
        per_class.iter().sum::<usize>(),
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    for (name, n) in opts.classes.iter().zip(per_class) {
        println!("  {name:<20} {n}");
    }
    Ok(())
}

fn run_prepare(args: PrepareArgs, quiet: bool) -> Result<()> {
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
    let summary = data::prepare(&opts, &progress(quiet))?;
    for (path, why) in &summary.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let info = &summary.info;
    let (monday, tuesday): (usize, usize) = (
        info.monday_per_class.iter().sum(),
        info.tuesday_per_class.iter().sum(),
    );
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
    Ok(())
}

fn run_info(args: InfoArgs) -> Result<()> {
    if args.dir.join(data::prepare::DATASET_INFO_FILE).is_file() {
        let info = data::prepare::read_dataset_info(&args.dir)?;
        let monday = data::read_manifest(&args.dir.join("monday.jsonl"))?;
        let tuesday = data::read_manifest(&args.dir.join("tuesday.jsonl"))?;
        println!(
            "prepared dataset {} (source {}, split {}, corruption {}, seed {})",
            args.dir.display(),
            info.source,
            info.split,
            info.corruption,
            info.seed
        );
        println!("{:<20} {:>8} {:>8}", "class", "monday", "tuesday");
        let mut counts = vec![(0usize, 0usize); info.classes.len()];
        for r in &monday {
            counts
                .get_mut(r.target)
                .with_context(|| {
                    format!(
                        "monday.jsonl: record {} has target {} but the dataset has {} classes",
                        r.id,
                        r.target,
                        info.classes.len()
                    )
                })?
                .0 += 1;
        }
        for r in &tuesday {
            counts
                .get_mut(r.target)
                .with_context(|| {
                    format!(
                        "tuesday.jsonl: record {} has target {} but the dataset has {} classes",
                        r.id,
                        r.target,
                        info.classes.len()
                    )
                })?
                .1 += 1;
        }
        for (name, (m, t)) in info.classes.iter().zip(&counts) {
            println!("{name:<20} {m:>8} {t:>8}");
        }
        println!("{:<20} {:>8} {:>8}", "total", monday.len(), tuesday.len());
    } else {
        let folder = ImageFolder::scan(&args.dir)?;
        println!(
            "image folder {} with {} classes",
            args.dir.display(),
            folder.classes.len()
        );
        for (name, n) in folder.classes.iter().zip(folder.class_counts()) {
            println!("{name:<20} {n:>8}");
        }
        println!("{:<20} {:>8}", "total", folder.items.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(ImportCommand::Idx(args)) => run_import_idx(args, cli.quiet),
        Command::Prepare(args) => run_prepare(args, cli.quiet),
        Command::Info(args) => run_info(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
