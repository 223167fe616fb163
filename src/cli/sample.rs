//! `bccp sample`: choose images to replay from the reuse buffer.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use bccp::embeddings::EmbeddingSet;
use bccp::sampling::{select, PairMode, ReuseBuffer, Sampling};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Embedding file of the reuse buffer (Monday's training images).
    #[arg(long)]
    buffer: PathBuf,
    /// What to replay.
    #[arg(long, value_enum)]
    sampling: Sampling,
    /// Share of the buffer to replay, in [0, 1].
    #[arg(long)]
    ratio: f64,
    /// How closest pairs are found: faithful (the reference's procedure) or buffer
    /// (whole-buffer neighbours).
    #[arg(long, alias = "mode", value_enum, default_value_t = PairMode::Buffer)]
    sampling_mode: PairMode,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output JSON Lines file: one chosen image per line (index, path, target, partner, value).
    #[arg(long)]
    out: PathBuf,
}

/// One line of the output.
#[derive(serde::Serialize)]
struct Line<'a> {
    index: usize,
    partner: Option<usize>,
    path: Option<&'a String>,
    target: i64,
    value: Option<f32>,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let set = EmbeddingSet::load(&args.buffer)?;
    let (n, dim) = set.embeddings.dims2()?;
    let embeddings = set.embeddings.flatten_all()?.to_vec1::<f32>()?;
    let buffer = ReuseBuffer {
        embeddings: &embeddings,
        dim,
        targets: &set.targets,
    };
    let chosen = select(
        &buffer,
        args.sampling,
        args.ratio,
        args.sampling_mode,
        args.seed,
    )?;
    let mut text = String::new();
    for s in &chosen {
        let line = Line {
            index: s.index,
            partner: s.partner,
            path: set.paths.get(s.index),
            target: set.targets[s.index],
            value: s.value,
        };
        text.push_str(&serde_json::to_string(&line)?);
        text.push('\n');
    }
    bccp::fsutil::write_atomic(&args.out, text.as_bytes())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "selected {} of {n} buffer images; wrote {}",
        chosen.len(),
        args.out.display()
    );
    Ok(())
}
