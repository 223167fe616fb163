//! `bccp import idx`: IDX files (MNIST, Fashion-MNIST) into an image folder.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use bccp::data::idx::{import_idx, IdxImport};

/// The formats `bccp import` reads.
#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// IDX files (MNIST, Fashion-MNIST; raw or gzip) → OUT/<class>/<index>.png.
    Idx(IdxArgs),
}

#[derive(Args, Debug)]
pub struct IdxArgs {
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

pub fn run(command: ImportCommand, quiet: bool) -> Result<()> {
    let ImportCommand::Idx(args) = command;
    let opts = IdxImport {
        images: args.images,
        labels: args.labels,
        classes: args.classes,
        out: args.out,
        force: args.force,
    };
    let started = std::time::Instant::now();
    let per_class = import_idx(&opts, &super::progress(quiet))?;
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
