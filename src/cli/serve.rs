//! `bccp serve`: the prediction server for a registered model (following an alias such as
//! `NAME@champion` as it moves), until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{CacheArgs, DbArgs, DeviceArgs, PrecisionArgs, RegistryArgs};
use bccp::serve::{ServeConfig, Token};

/// The server's settings that `bccp serve` and `bccp up` share.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Folder that `{"image_path": …}` requests are relative to; nothing outside it is read.
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Most images in one backbone batch (requests arriving together are batched). Under
    /// load, batches of at most half the clients alternate: one computes while the next
    /// gathers, so the cores are not left idle between batches.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// Most images in one request (JSON batch or multipart).
    #[arg(long, default_value_t = 64)]
    pub max_request_images: usize,
    /// Largest image accepted, width × height in pixels.
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_image_pixels: u64,
    /// Classes listed in each answer's top_k.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// How often the followed alias is checked, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// File holding the API token required by every endpoint that writes (/samples,
    /// /admin/*); mandatory off loopback (else BCCP_API_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where uploaded feedback images are kept (default: BCCP_HOME/uploads, e.g.
    /// ~/.local/share/bccp/uploads).
    #[arg(long)]
    pub upload_dir: Option<PathBuf>,
    /// Publish every prediction to Kafka too: HOST:PORT[,HOST:PORT…][,TOPIC] (default topic
    /// bccp-predictions); non-blocking, bounded queue, counted in /metrics. Needs the `kafka`
    /// build feature.
    #[arg(long)]
    pub kafka: Option<String>,
    /// The records' format for --kafka.
    #[arg(long, value_enum, default_value = "connect-json")]
    pub kafka_format: bccp::stream::Format,
    /// The review page (GET /review) shows the label issues of this `bccp audit --db` output
    /// folder (its report.jsonl) instead of what the latest retrain cycle flagged.
    #[arg(long, value_name = "DIR")]
    pub review_audit: Option<PathBuf>,
}

impl ServerArgs {
    /// The API token: `--token-file`, else `BCCP_API_TOKEN`, else none.
    fn token(&self) -> Result<Option<Token>> {
        if let Some(path) = &self.token_file {
            return Ok(Some(
                Token::from_file(path)
                    .with_context(|| format!("--token-file {}", path.display()))?,
            ));
        }
        match std::env::var("BCCP_API_TOKEN") {
            Ok(text) if !text.trim().is_empty() => {
                Ok(Some(Token::new(&text).context("BCCP_API_TOKEN")?))
            }
            _ => Ok(None),
        }
    }

    /// The server's configuration, the rest given by the command.
    pub fn config(
        &self,
        model: &str,
        runs_dir: PathBuf,
        bind: SocketAddr,
        db: Option<bccp::store::DbUrl>,
        device: candle_core::Device,
        cache_dir: Option<PathBuf>,
    ) -> Result<ServeConfig> {
        let mut config = ServeConfig::new(model, runs_dir);
        config.image_root = self.image_root.clone();
        config.db = db;
        config.bind = bind;
        config.device = device;
        config.cache_dir = cache_dir;
        config.max_batch = self.max_batch;
        config.max_wait = Duration::from_millis(self.max_wait_ms);
        config.max_body_bytes = self.max_body_mib.saturating_mul(1 << 20);
        config.max_request_images = self.max_request_images;
        config.max_image_pixels = self.max_image_pixels;
        config.top_k = self.top_k;
        config.poll = Duration::from_millis(self.poll_ms);
        config.token = self.token()?;
        if let Some(dir) = &self.upload_dir {
            config.upload_dir = dir.clone();
        }
        config.kafka = self
            .kafka
            .as_deref()
            .map(|text| bccp::serve::KafkaTarget::parse(text, self.kafka_format))
            .transpose()?;
        config.review_audit = self.review_audit.clone();
        Ok(config)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The model served: NAME@ALIAS (followed as it moves, e.g. my-model@champion),
    /// NAME:VERSION, or NAME (the latest version, followed); mlflow:NAME@ALIAS (an MLflow
    /// registered model's alias, followed; see --mlflow) or s3://BUCKET/PREFIX/NAME/VERSION (a
    /// run folder written by --artifacts), downloaded into the cache folder's remote-models/.
    #[arg(long)]
    model: String,
    /// The MLflow tracking server of an mlflow: model (default: MLFLOW_TRACKING_URI).
    #[arg(long, value_name = "URI")]
    mlflow: Option<String>,
    /// Address to listen on; anything but loopback needs an API token.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: SocketAddr,
    /// Do not record predictions or accept feedback (no data store).
    #[arg(long)]
    no_store: bool,
    /// Start even if the model does not exist yet (503 until it does).
    #[arg(long)]
    wait_for_model: bool,
    // With bf16, a new version on another backbone fails to load and the one served stays.
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let db = (!args.no_store).then(|| args.db.url()).transpose()?;
    let remote = bccp::tracking::remote::RemoteModel::parse(&args.model, args.mlflow.as_deref())?;
    // A remote model is served from a cache registry of its own, one per source.
    let (spec, runs_dir) = match &remote {
        None => (args.model.clone(), args.registry.runs_dir.clone()),
        Some(r) => {
            let key: String = r
                .spec()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let base = args
                .cache
                .dir()
                .unwrap_or_else(|| args.registry.runs_dir.clone());
            (r.local_spec(), base.join("remote-models").join(key))
        }
    };
    let mut config = args.server.config(
        &spec,
        runs_dir,
        args.bind,
        db,
        args.device.device()?,
        args.cache.dir(),
    )?;
    config.wait_for_model = args.wait_for_model;
    config.precision = args.precision.precision;
    config.remote = remote.map(std::sync::Arc::new);
    let _graceful = bccp::runtime::graceful_stop();
    let server = bccp::serve::start(config)?;
    match server.model() {
        Some(m) => println!(
            "serving {}:{} ({}){} on http://{}",
            m.name,
            m.version,
            args.model,
            match m.precision {
                "bf16" => " with bf16 products",
                _ => "",
            },
            server.addr()
        ),
        None => println!(
            "listening on http://{} (no model yet: waiting for {})",
            server.addr(),
            args.model
        ),
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    while bccp::runtime::stop_requested().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("stopping: finishing requests in flight");
    server.shutdown()?;
    Ok(())
}
