//! `bccp classify`: the top ImageNet classes of images, a check that a pretrained backbone is
//! wired right.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{BackboneArgs, DeviceArgs, PrecisionArgs};
use bccp::backbone::{imagenet, Embedder};

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Number of classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let config = bccp::backbone::EmbedderConfig {
        precision: args.precision.or_f32(),
        ..args.backbone.embedder(&args.device, None, 64, false)?
    };
    let embedder = Embedder::new(&config)?;
    let names = imagenet::class_names();
    for (path, row) in args
        .images
        .iter()
        .zip(embedder.imagenet_probs(&args.images)?)
    {
        println!("{}", path.display());
        for (class, p) in imagenet::top_k(&row, args.top) {
            let name = names.get(class).copied().unwrap_or("?");
            println!("  {:>5.1}%  {class:>4}  {name}", 100.0 * p);
        }
    }
    Ok(())
}
