//! `bccp predict`: classify images with a registered run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{CacheArgs, DeviceArgs, PrecisionArgs, RegistryArgs};
use bccp::registry::TrainedRun;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A registered run: NAME (latest version), NAME:VERSION or NAME@ALIAS (e.g.
    /// my-model@champion).
    #[arg(long)]
    model: String,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let registry = args.registry.registry();
    let device = args.device.device()?;
    let trained = TrainedRun::load_reusing(
        &registry,
        &args.model,
        &device,
        args.cache.dir().as_deref(),
        None,
        args.precision.precision,
    )?;
    for (path, p) in args.images.iter().zip(trained.predict(&args.images)?) {
        println!("{}\t{}\t{:.3}", path.display(), p.class, p.probability);
    }
    Ok(())
}
