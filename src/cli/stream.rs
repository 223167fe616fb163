//! `bccp stream consume|publish` (feature `kafka`): samples from a Kafka topic into the store,
//! store rows out to a topic, in the reference's JSON Connect envelope or plain JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

use bccp::stream::consume::{consume, ConsumeOptions};
use bccp::stream::publish::{publish, PublishOptions, Rows};
use bccp::stream::{Format, StopAfter};

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Sample records from a topic into the store (ingest's rules), exactly once.
    Consume(ConsumeArgs),
    /// New store rows (samples or predictions) to a topic.
    Publish(PublishArgs),
}

/// When to stop (else: Ctrl-C).
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many seconds without a new record (caught up).
    #[arg(long)]
    idle: Option<f64>,
}

impl StopArgs {
    fn stop_after(&self) -> Result<StopAfter> {
        let seconds = |flag: &str, v: Option<f64>| -> Result<Option<Duration>> {
            v.map(|s| {
                Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| anyhow::anyhow!("{flag} {s}: expected a number of seconds > 0"))
            })
            .transpose()
        };
        Ok(StopAfter {
            limit: self.limit,
            duration: seconds("--duration", self.duration)?,
            idle: seconds("--idle", self.idle)?,
        })
    }
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    /// Kafka bootstrap brokers, HOST:PORT[,HOST:PORT…].
    #[arg(long)]
    brokers: String,
    /// The topic (the reference's: postgres-source-{dataset}).
    #[arg(long)]
    topic: String,
    /// The consumer group (default: {dataset}-consumer-group for a topic
    /// postgres-source-{dataset}, else {topic}-consumer-group).
    #[arg(long)]
    group: Option<String>,
    #[arg(long, value_enum, default_value = "connect-json")]
    format: Format,
    /// What relative image paths are relative to (default: the working folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// The source recorded with the samples.
    #[arg(long, default_value = "kafka")]
    source: String,
    /// Records per store transaction, at most.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[command(flatten)]
    stop: StopArgs,
    #[command(flatten)]
    db: super::DbArgs,
}

#[derive(Args, Debug)]
#[group(id = "rows", required = true, multiple = false, args = ["samples", "predictions"])]
pub struct PublishArgs {
    /// Kafka bootstrap brokers, HOST:PORT[,HOST:PORT…].
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Publish accepted samples (the reference's table rows).
    #[arg(long)]
    samples: bool,
    /// Publish the predictions the server recorded.
    #[arg(long)]
    predictions: bool,
    #[arg(long, value_enum, default_value = "connect-json")]
    format: Format,
    /// The Connect struct's name (default: {dataset} for a topic postgres-source-{dataset},
    /// else the topic; predictions get a _prediction suffix).
    #[arg(long)]
    schema_name: Option<String>,
    /// Records per acknowledged batch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Seconds the broker may take to acknowledge a record before the batch is sent again.
    #[arg(long, default_value_t = 30)]
    delivery_timeout: u64,
    #[command(flatten)]
    stop: StopArgs,
    #[command(flatten)]
    db: super::DbArgs,
}

/// `postgres-source-fashion_mnist` → `fashion_mnist`; another topic stays as it is.
fn dataset_of(topic: &str) -> &str {
    topic.strip_prefix("postgres-source-").unwrap_or(topic)
}

pub fn run(command: StreamCommand) -> Result<()> {
    let _graceful = bccp::runtime::graceful_stop();
    let stop = || bccp::runtime::stop_requested().is_some();
    match command {
        StreamCommand::Consume(args) => {
            let opts = ConsumeOptions {
                group: args
                    .group
                    .clone()
                    .unwrap_or_else(|| format!("{}-consumer-group", dataset_of(&args.topic))),
                brokers: args.brokers,
                topic: args.topic,
                format: args.format,
                source: args.source,
                image_root: args.image_root,
                batch_size: args.batch_size,
                stop_after: args.stop.stop_after()?,
            };
            let mut db = args.db.open()?;
            let started = std::time::Instant::now();
            let summary = consume(db.as_mut(), &opts, &stop)?;
            println!(
                "consumed {} (group {}) into {} in {:.1} s: {}{}",
                opts.topic,
                opts.group,
                db.location(),
                started.elapsed().as_secs_f64(),
                summary.line(),
                if summary.stopped {
                    "; stopped by signal, committed rows kept"
                } else {
                    ""
                }
            );
        }
        StreamCommand::Publish(args) => {
            let rows = if args.predictions {
                Rows::Predictions
            } else {
                Rows::Samples
            };
            let schema_name = args.schema_name.clone().unwrap_or_else(|| {
                let base = dataset_of(&args.topic);
                match rows {
                    Rows::Samples => base.to_owned(),
                    Rows::Predictions => format!("{base}_prediction"),
                }
            });
            let opts = PublishOptions {
                brokers: args.brokers,
                topic: args.topic,
                rows,
                format: args.format,
                schema_name,
                batch_size: args.batch_size,
                poll: Duration::from_millis(500),
                delivery_timeout: Duration::from_secs(args.delivery_timeout.max(1)),
                stop_after: args.stop.stop_after()?,
            };
            let mut db = args.db.open()?;
            let started = std::time::Instant::now();
            let summary = publish(db.as_mut(), &opts, &stop)?;
            println!(
                "published {} {} from {} to {} in {:.1} s (position {}, batches retried {}){}",
                summary.published,
                if args.predictions {
                    "predictions"
                } else {
                    "samples"
                },
                db.location(),
                opts.topic,
                started.elapsed().as_secs_f64(),
                summary.position,
                summary.retried_batches,
                if summary.stopped {
                    "; stopped by signal"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
