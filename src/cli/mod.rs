//! The commands of the `bccp` binary, one file each: parse → library call → print. The
//! argument groups several commands share are defined here once and flattened.

pub mod audit;
pub mod classify;
pub mod closest;
pub mod cut_scores;
pub mod embed;
pub mod experiment;
pub mod generate;
pub mod import;
pub mod info;
pub mod ingest;
pub mod label_issues;
pub mod merge_topk;
pub mod models;
pub mod predict;
pub mod prepare;
pub mod retrain;
pub mod runs;
pub mod sample;
pub mod serve;
#[cfg(feature = "kafka")]
pub mod stream;
pub mod train;
pub mod up;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bccp::backbone::EmbedderConfig;
use bccp::ops::bf16_gemm::Precision;
use bccp::progress::Progress;
use bccp::registry::Registry;

/// `--device`.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl DeviceArgs {
    /// The device named.
    pub fn device(&self) -> Result<candle_core::Device> {
        Ok(bccp::device::parse_device(&self.device)?)
    }
}

/// The embedding cache flags.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Embedding cache folder (default: BCCP_CACHE, else BCCP_HOME/cache, else the per-user cache
    /// folder, e.g. ~/.cache/bccp).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Recompute every embedding and leave the cache untouched.
    #[arg(long)]
    pub no_cache: bool,
}

impl CacheArgs {
    /// The cache folder, or `None` with `--no-cache`.
    pub fn dir(&self) -> Option<PathBuf> {
        (!self.no_cache).then(|| {
            self.cache_dir
                .clone()
                .unwrap_or_else(bccp::backbone::cache::default_cache_dir)
        })
    }
}

/// The registry folder.
/// `--precision` of the commands that run a backbone's forward pass.
#[derive(Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// The backbone's products: bf16 operands summed in f32 on CPUs with AVX512-BF16 (the CNNs
    /// on the channels-last engine, ResNet-18 about 2× faster; the transformers' linear
    /// layers), outputs within bf16 rounding; or f32. GPUs refuse bf16. Default: f32, or for a
    /// registered model the precision it was trained in.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl PrecisionArgs {
    /// The precision asked for, f32 when none was.
    pub fn or_f32(&self) -> Precision {
        self.precision.unwrap_or(Precision::F32)
    }

    /// `" (bf16 products)"` for bf16, empty for f32: what a command's summary line adds.
    pub fn note(&self) -> &'static str {
        match self.or_f32() {
            Precision::F32 => "",
            Precision::Bf16 => " (bf16 products)",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Registry folder.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

impl RegistryArgs {
    /// The registry.
    pub fn registry(&self) -> Registry {
        Registry::open(&self.runs_dir)
    }
}

/// The data store (`--db`).
#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// The data store: sqlite:PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    /// (default: sqlite:<per-user data folder>/store.sqlite3, e.g.
    /// ~/.local/share/bccp/store.sqlite3; BCCP_HOME moves it).
    #[arg(long)]
    pub db: Option<String>,
}

impl DbArgs {
    /// The store's URL.
    pub fn url(&self) -> Result<bccp::store::DbUrl> {
        Ok(match &self.db {
            Some(text) => bccp::store::DbUrl::parse(text)?,
            None => bccp::store::DbUrl::default_sqlite(),
        })
    }

    /// Opens (creating and migrating as needed) the store.
    pub fn open(&self) -> Result<Box<dyn bccp::store::Store>> {
        Ok(bccp::store::open(&self.url()?)?)
    }
}

/// A pretrained backbone: which one, its weights and input size.
#[derive(Args, Debug, Clone)]
pub struct BackboneArgs {
    /// Backbone from the zoo (`bccp models` lists them).
    #[arg(long, alias = "model", default_value = "mobilenet_v2")]
    pub backbone: String,
    /// Local weights (.safetensors) instead of the zoo's source.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Input size override (e.g. 64 for 28×28 images).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Never touch the network for hub weights (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl BackboneArgs {
    /// An embedder configuration for this backbone on `device`, through `cache_dir`.
    pub fn embedder(
        &self,
        device: &DeviceArgs,
        cache_dir: Option<PathBuf>,
        batch_size: usize,
        skip_bad: bool,
    ) -> Result<EmbedderConfig> {
        Ok(EmbedderConfig {
            backbone: self.backbone.clone(),
            weights: self.weights.clone(),
            image_size: self.image_size,
            offline: self.offline,
            device: device.device()?,
            cache_dir,
            batch_size,
            skip_bad,
            precision: bccp::ops::bf16_gemm::Precision::F32,
        })
    }
}

/// Notes on standard error of what a folder scan skipped, per class and reason.
pub fn print_skipped(skipped: &[bccp::data::SkipCount]) {
    for s in skipped {
        eprintln!(
            "note: class {}: {} file(s) skipped ({})",
            s.class, s.count, s.reason
        );
    }
}

/// The warning of an embedding cache file whose corrupt records were discarded, if any.
pub fn print_cache_warning(stats: &bccp::backbone::EmbedStats) {
    if let Some(warning) = stats.cache_warning() {
        eprintln!("{warning}");
    }
}

/// Progress bars on standard error, or none with `--quiet`.
pub fn progress(quiet: bool) -> Progress {
    if quiet {
        Progress::hidden()
    } else {
        Progress::stderr()
    }
}

/// Mirroring to an MLflow tracking server (`--mlflow`, else `MLFLOW_TRACKING_URI`).
#[derive(Args, Debug, Clone)]
pub struct MlflowArgs {
    /// MLflow tracking server (http://HOST:PORT) to mirror the run to, after the local
    /// registry: params, metrics, files as artifacts, a registered model version (default:
    /// MLFLOW_TRACKING_URI; unset: no mirroring).
    #[arg(long, value_name = "URI")]
    pub mlflow: Option<String>,
    /// The MLflow experiment the runs go to.
    #[arg(long, default_value = "bccp")]
    pub mlflow_experiment: String,
}

/// `--artifacts s3://…`: run folders mirrored to S3-compatible storage.
#[derive(Args, Debug)]
pub struct ArtifactsArgs {
    /// Mirror the registered run folder to S3-compatible storage, under
    /// s3://BUCKET/PREFIX/NAME/VERSION/ (endpoint, region and credentials from AWS_ENDPOINT_URL[_S3],
    /// AWS_REGION/AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; files above
    /// BCCP_S3_PART_SIZE bytes, default 8 MiB, go up in parts), after the local registry.
    #[arg(long, value_name = "S3_URI")]
    pub artifacts: Option<String>,
}

impl ArtifactsArgs {
    /// The target, or `None` without `--artifacts`.
    pub fn target(&self) -> Result<Option<bccp::tracking::s3_mirror::S3Target>> {
        Ok(bccp::tracking::s3_mirror::S3Target::resolve(
            self.artifacts.as_deref(),
        )?)
    }
}

/// Mirrors a run folder to S3 and says where it went.
pub fn mirror_to_s3(
    target: &bccp::tracking::s3_mirror::S3Target,
    run: &bccp::registry::RunDir,
) -> Result<()> {
    let sent = bccp::tracking::s3_mirror::mirror_run_s3(target, run)
        .map_err(|e| train::local_kept(e, run))?;
    let bytes: usize = sent.iter().map(|t| t.bytes).sum();
    let multipart = sent.iter().filter(|t| t.parts > 1).count();
    println!(
        "mirrored to {}: {} files, {bytes} bytes ({multipart} in parts), checksums verified",
        target.run_uri(&run.name, run.version),
        sent.len()
    );
    Ok(())
}

impl MlflowArgs {
    /// The target, or `None` when no server is named.
    pub fn target(&self) -> Result<Option<bccp::tracking::MlflowTarget>> {
        Ok(bccp::tracking::MlflowTarget::resolve(
            self.mlflow.as_deref(),
            &self.mlflow_experiment,
        )?)
    }
}

/// Prints where a mirrored run went.
pub fn print_mirrored(target: &bccp::tracking::MlflowTarget, m: &bccp::tracking::Mirrored) {
    println!(
        "mirrored to MLflow {}: experiment {}, run {}, {} artifacts, model {} version {}",
        target.client.uri(),
        m.experiment_id,
        m.run_id,
        m.artifacts.len(),
        m.model,
        m.model_version
    );
}
