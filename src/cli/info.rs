//! `bccp info`: images per class of an image folder or a prepared dataset.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bccp::data::DatasetSummary;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// An image folder, or the output of `bccp prepare`.
    dir: PathBuf,
}

pub fn run(args: InfoArgs) -> Result<()> {
    match DatasetSummary::of(&args.dir)? {
        DatasetSummary::Prepared { info, per_class } => {
            println!(
                "prepared dataset {} (source {}, split {}, corruption {}, seed {})",
                args.dir.display(),
                info.source,
                info.split,
                info.corruption,
                info.seed
            );
            println!("{:<20} {:>8} {:>8}", "class", "monday", "tuesday");
            for (name, (m, t)) in info.classes.iter().zip(&per_class) {
                println!("{name:<20} {m:>8} {t:>8}");
            }
            let monday: usize = per_class.iter().map(|c| c.0).sum();
            let tuesday: usize = per_class.iter().map(|c| c.1).sum();
            println!("{:<20} {monday:>8} {tuesday:>8}", "total");
        }
        DatasetSummary::Folder { folder, per_class } => {
            println!(
                "image folder {} with {} classes",
                args.dir.display(),
                folder.classes.len()
            );
            for (name, n) in folder.classes.iter().zip(&per_class) {
                println!("{name:<20} {n:>8}");
            }
            println!("{:<20} {:>8}", "total", folder.items.len());
            super::print_skipped(&folder.skipped_summary());
        }
    }
    Ok(())
}
