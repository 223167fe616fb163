//! `bccp embed`: embed an image folder or manifest into a safetensors file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{BackboneArgs, CacheArgs, DeviceArgs, PrecisionArgs};
use bccp::backbone::Embedder;
use bccp::data::ImageList;
use bccp::embeddings::ShardRows;
use bccp::shard::ShardSpec;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// An image folder ROOT/<class>/<file>, or a JSON Lines manifest (paths relative to it).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Output safetensors file (`embeddings` f32 [N, D], `targets` i64 [N]).
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, alias = "batch", default_value_t = 32)]
    batch_size: usize,
    /// Skip images that cannot be decoded (with a warning and a count) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Embed only the I-th of N contiguous parts of the image list (0-based, e.g. 2/8): images
    /// [I·n/N, (I+1)·n/N). The file records each row's position in the full list (`rows`), the
    /// shard, the list's length and fingerprint.
    #[arg(long, value_name = "I/N")]
    shard: Option<ShardSpec>,
    // bf16 embeddings go to a cache of their own.
    #[command(flatten)]
    precision: PrecisionArgs,
}

pub fn run(args: EmbedArgs, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be 1 or more");
    let full = ImageList::from_path(&args.data)?;
    anyhow::ensure!(!full.is_empty(), "{} holds no images", args.data.display());
    super::print_skipped(&full.skipped);
    let shard = args.shard.filter(|s| !s.is_whole());
    let range = shard.map_or(0..full.len(), |s| s.range(full.len()));
    let list = match shard {
        Some(_) => full.slice(range.clone()),
        None => full.clone(),
    };
    let started = std::time::Instant::now();
    let config = args.backbone.embedder(
        &args.device,
        args.cache.dir(),
        args.batch_size,
        args.skip_bad,
    )?;
    let config = bccp::backbone::EmbedderConfig {
        precision: args.precision.or_f32(),
        ..config
    };
    let embedder = Embedder::new(&config)?;
    let (mut set, stats) = embedder.embed(&list, &super::progress(quiet))?;
    super::print_cache_warning(&stats);
    set.list_sha256 = full.fingerprint();
    if let Some(spec) = shard {
        set.shard = Some(ShardRows {
            spec,
            rows: stats
                .kept
                .iter()
                .map(|&i| (range.start + i) as i64)
                .collect(),
            total: full.len(),
        });
    }
    set.save(&args.out)?;
    for (path, why) in &stats.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let (n, d) = set.embeddings.dims2()?;
    let skipped = match stats.skipped.len() {
        0 => String::new(),
        k => format!(", {k} unreadable skipped"),
    };
    let part = match shard {
        Some(s) => format!(
            " (shard {s}: images {}..{} of {})",
            range.start,
            range.end,
            full.len()
        ),
        None => String::new(),
    };
    println!(
        "embedded {n} images{part} with {}{} ({d}-d) on {:?} in {:.1}s: {} from cache, {} computed{skipped}; wrote {}",
        embedder.spec().name,
        args.precision.note(),
        embedder.device().location(),
        started.elapsed().as_secs_f64(),
        stats.cached,
        stats.computed,
        args.out.display()
    );
    Ok(())
}
