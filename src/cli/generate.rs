//! `bccp generate`: the reference's data generator into the store: every record of a prepared
//! dataset's day(s) in batched transactions (`--bulk`), then random records at `--rate`,
//! bounded by `--duration` or `--limit`; Ctrl-C stops cleanly between transactions.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use bccp::data::Day;
use bccp::store::{self, GenerateOptions, StreamBound};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A dataset written by `bccp prepare`.
    #[arg(long, short = 'd')]
    dataset: PathBuf,
    #[command(flatten)]
    db: super::DbArgs,
    /// Only this day's records (default: Monday, then Tuesday).
    #[arg(long, value_enum)]
    day: Option<Day>,
    /// Insert every record of the day(s) first, in batched transactions.
    #[arg(long)]
    bulk: bool,
    /// Then stream random records at this rate: N, N/s, N/min or N/h.
    #[arg(long)]
    rate: Option<String>,
    /// Stream for this long (500ms, 10s, 2m, 1h; `forever`: until Ctrl-C).
    #[arg(long)]
    duration: Option<String>,
    /// Stream at most this many rows.
    #[arg(long)]
    limit: Option<u64>,
    /// Probability that a Tuesday user label is right (else another class); Monday's labels
    /// are the true ones.
    #[arg(long, default_value_t = 1.0)]
    user_accuracy: f64,
    /// Share of the records held out as the trusted gate set (split `gate`).
    #[arg(long, default_value_t = 0.1)]
    gate_fraction: f64,
    /// Seed of the user labels, the gate split and the streamed draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = bccp::store::GENERATE_BATCH_ROWS)]
    batch_size: usize,
    /// Name of the reference-compatible view `NAME(id, timestamp, image_path, target)`
    /// (default: the dataset folder's name, letters and digits kept, others turned to `_`).
    #[arg(long)]
    view: Option<String>,
}

/// The default view name of a dataset folder: `runs/default/fashion-mnist` → `fashion_mnist`.
fn default_view(dataset: &std::path::Path) -> Option<String> {
    let name = std::fs::canonicalize(dataset)
        .ok()?
        .file_name()?
        .to_string_lossy()
        .to_lowercase();
    let mut view: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if view.is_empty() || view.starts_with(|c: char| c.is_ascii_digit()) {
        view.insert(0, '_');
    }
    view.truncate(63);
    Some(view)
}

pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    let rate = args
        .rate
        .as_deref()
        .map(store::generate::parse_rate)
        .transpose()?;
    let duration = args
        .duration
        .as_deref()
        .map(store::generate::parse_duration)
        .transpose()?;
    if rate.is_some() && duration.is_none() && args.limit.is_none() {
        bail!(
            "--rate streams until a bound: pass --duration D or --limit N \
             (--duration forever streams until Ctrl-C)"
        );
    }
    let view = match args.view {
        Some(v) => Some(v),
        None => default_view(&args.dataset),
    };
    let opts = GenerateOptions {
        dataset: args.dataset,
        days: match args.day {
            Some(day) => vec![day],
            None => vec![Day::Monday, Day::Tuesday],
        },
        bulk: args.bulk,
        rate,
        bound: StreamBound {
            duration: duration.flatten(),
            limit: args.limit,
        },
        user_accuracy: args.user_accuracy,
        gate_fraction: args.gate_fraction,
        seed: args.seed,
        batch_size: args.batch_size,
        view,
    };
    // The dataset is read while the store is opened (connected and migrated).
    let (db, input) = std::thread::scope(|scope| {
        let db = scope.spawn(|| args.db.open());
        let input = store::GenerateInput::read(&opts);
        let db = db
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (db, input)
    });
    let mut db = db?;
    let input = input?;
    let _graceful = bccp::runtime::graceful_stop();
    let stop = || bccp::runtime::stop_requested().is_some();
    let started = std::time::Instant::now();
    let summary = store::generate_from(db.as_mut(), &opts, &input, &stop, &mut |line| {
        if !quiet {
            eprintln!("{line}");
        }
    })?;
    let bulk: Vec<String> = summary
        .bulk
        .iter()
        .map(|(day, n)| format!("{} {n}", day.as_str()))
        .collect();
    let stats = db.stats();
    println!(
        "generated into {}: bulk {}{}, streamed {}{} in {:.1} s{}{}",
        db.location(),
        if bulk.is_empty() {
            "-".to_owned()
        } else {
            bulk.join(", ")
        },
        match summary.already_stored {
            0 => String::new(),
            n => format!(" ({n} already stored)"),
        },
        summary.streamed,
        summary
            .rate
            .map(|r| format!(" at {r} rows/s"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        match (stats.retries, stats.reconnects) {
            (0, 0) => String::new(),
            (r, c) => format!(", {r} retries, {c} reconnects"),
        },
        match bccp::runtime::stop_requested() {
            Some(signal) => format!("; stopped by signal {signal}, committed rows kept"),
            None => String::new(),
        },
    );
    if let Some(view) = &opts.view {
        if !quiet {
            eprintln!("reference view: {view}(id, timestamp, image_path, target)");
        }
    }
    Ok(())
}
