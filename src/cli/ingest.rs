//! `bccp ingest`: a user's images into the store, from a folder `ROOT/<class>/…` or a JSON
//! Lines file of `{"path": …, "label": …, "timestamp": …}`; duplicates by content are skipped,
//! unreadable images are stored as rejected with the reason.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bccp::store::ingest::Note;
use bccp::store::{self, IngestInput, IngestOptions};

#[derive(Args, Debug)]
#[group(id = "input", required = true, multiple = false, args = ["folder", "jsonl"])]
pub struct IngestArgs {
    #[command(flatten)]
    db: super::DbArgs,
    /// An image folder ROOT/<class>/<file> (the class folder names the label).
    #[arg(long)]
    folder: Option<PathBuf>,
    /// A JSON Lines file: {"path": "a.png", "label": "cat" or 3, "timestamp": RFC 3339 (optional)};
    /// relative paths are relative to the file's folder.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// The source recorded with the samples (e.g. a camera or a day).
    #[arg(long, default_value = "ingest")]
    source: String,
    /// Rows per transaction.
    #[arg(long, default_value_t = bccp::store::BULK_BATCH_ROWS)]
    batch_size: usize,
}

pub fn run(args: IngestArgs) -> Result<()> {
    let input = match (args.folder, args.jsonl) {
        (Some(folder), _) => IngestInput::Folder(folder),
        (None, Some(jsonl)) => IngestInput::Jsonl(jsonl),
        // clap's group requires one of them.
        (None, None) => anyhow::bail!("pass --folder DIR or --jsonl FILE"),
    };
    let opts = IngestOptions {
        input,
        source: args.source,
        batch_size: args.batch_size,
    };
    let mut db = args.db.open()?;
    let _graceful = bccp::runtime::graceful_stop();
    let stop = || bccp::runtime::stop_requested().is_some();
    let started = std::time::Instant::now();
    let summary = store::ingest(db.as_mut(), &opts, &stop)?;
    super::print_skipped(&summary.scan_skipped);
    for note in &summary.notes {
        match note {
            Note::Duplicate { path } => {
                eprintln!(
                    "note: duplicate skipped (same content already stored): {}",
                    path.display()
                )
            }
            Note::Rejected { reason, .. } => eprintln!("note: rejected: {reason}"),
        }
    }
    println!(
        "ingested into {} in {:.1} s: {}{}",
        db.location(),
        started.elapsed().as_secs_f64(),
        summary.line(),
        if summary.stopped {
            "; stopped by signal, committed rows kept"
        } else {
            ""
        }
    );
    Ok(())
}
