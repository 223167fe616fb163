//! The floor under `bccp ingest --folder`: the folder scanned and every file read, hashed and
//! strictly decoded exactly as the ingest does it (`bccp::store::ingest::check_file`, on all
//! cores), with no database at all. Prints `FILES SECONDS` (scan included) for
//! `scripts/bench-ingest.sh`:
//!
//! `cargo run --release --example ingest_floor -- FOLDER`

use anyhow::{Context, Result};
use rayon::prelude::*;

fn main() -> Result<()> {
    let folder = std::env::args()
        .nth(1)
        .context("usage: ingest_floor FOLDER (an image folder, ROOT/<class>/…)")?;
    let root = std::path::PathBuf::from(folder);
    let started = std::time::Instant::now();
    let scanned = bccp::data::ImageFolder::scan(&root)?;
    let accepted = scanned
        .items
        .par_iter()
        .filter(|item| {
            bccp::store::ingest::check_file(&root.join(&item.path))
                .kind
                .is_none()
        })
        .count();
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        accepted == scanned.items.len(),
        "{} of {} files did not decode",
        scanned.items.len() - accepted,
        scanned.items.len()
    );
    println!("{accepted} {seconds}");
    Ok(())
}
