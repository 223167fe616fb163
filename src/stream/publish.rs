//! `bccp stream publish`: new rows of the store (accepted samples, or predictions) to a Kafka
//! topic, in the reference's envelope by default, so its sink connector and consumers read
//! them unchanged. The position (the last row id published) is kept in the store's
//! `consumer_offsets` under `kafka-publish:<what>:<topic>` and moved only after the broker
//! acknowledged every record of the batch: a restarted publisher goes on from there (at least
//! once: a batch cut by a crash is published again).

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::client::{check_brokers, producer_config, Backoff, Context};
use super::record::{encode_sample, encode_stored_prediction, Format};
use super::{StopAfter, StreamError};
use crate::store::{SampleFilter, Store};

/// Which rows are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Accepted samples (the reference's table), by increasing id.
    Samples,
    /// Predictions the server recorded, by increasing id.
    Predictions,
}

impl Rows {
    fn name(self) -> &'static str {
        match self {
            Rows::Samples => "samples",
            Rows::Predictions => "predictions",
        }
    }
}

/// Parameters of [`publish`].
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub brokers: String,
    pub topic: String,
    pub rows: Rows,
    pub format: Format,
    /// The Connect struct's name (the reference's table, e.g. `fashion_mnist`).
    pub schema_name: String,
    /// Records per acknowledged batch.
    pub batch_size: usize,
    /// How often the store is checked for new rows when caught up.
    pub poll: Duration,
    /// How long the broker may take to acknowledge a record before the batch is retried.
    pub delivery_timeout: Duration,
    pub stop_after: StopAfter,
}

/// What [`publish`] did.
#[derive(Debug, Clone, Default)]
pub struct PublishSummary {
    pub published: u64,
    /// The last row id published (the stored position).
    pub position: i64,
    /// Batches sent again after a failed delivery.
    pub retried_batches: u64,
    pub broker_errors: u64,
    pub stopped: bool,
}

/// The `consumer_offsets` name of a publisher's position.
pub fn position_name(rows: Rows, topic: &str) -> String {
    format!("kafka-publish:{}:{topic}", rows.name())
}

/// Publishes rows after the stored position until `opts.stop_after` or `stop`.
pub fn publish(
    store: &mut dyn Store,
    opts: &PublishOptions,
    stop: &dyn Fn() -> bool,
) -> Result<PublishSummary, StreamError> {
    check_brokers(&opts.brokers).map_err(StreamError::Invalid)?;
    if opts.batch_size == 0 {
        return Err(StreamError::Invalid(
            "--batch-size 0: expected at least 1".into(),
        ));
    }
    let producer: BaseProducer<Context> = producer_config(
        &opts.brokers,
        opts.batch_size.max(1000),
        opts.delivery_timeout,
    )
    .create_with_context(Context::default())
    .map_err(|error| StreamError::Kafka {
        what: "creating the producer",
        error,
    })?;
    let name = position_name(opts.rows, &opts.topic);
    let mut summary = PublishSummary {
        position: store.offset(&name)?.unwrap_or(0),
        ..PublishSummary::default()
    };
    let started = Instant::now();
    let mut last_row = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        if stop() {
            summary.stopped = true;
            break;
        }
        if opts
            .stop_after
            .reached(summary.published, started, last_row)
        {
            break;
        }
        let room = opts.stop_after.room(summary.published, opts.batch_size);
        let batch = next_rows(store, opts, summary.position, room)?;
        let Some(&(last_id, _)) = batch.last() else {
            let until = Instant::now() + opts.poll;
            while Instant::now() < until && !stop() {
                producer.poll(Duration::from_millis(50));
            }
            continue;
        };
        last_row = Instant::now();
        if send_batch(&producer, &opts.topic, &batch, opts.delivery_timeout, stop)? {
            store.set_offset(&name, last_id)?;
            summary.position = last_id;
            summary.published += batch.len() as u64;
            backoff.reset();
        } else if !stop() {
            summary.retried_batches += 1;
            backoff.wait(stop);
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    summary.broker_errors = producer.context().errors();
    Ok(summary)
}

/// The next rows after `position`, encoded: `(id, bytes)`.
fn next_rows(
    store: &mut dyn Store,
    opts: &PublishOptions,
    position: i64,
    limit: usize,
) -> Result<Vec<(i64, Vec<u8>)>, StreamError> {
    let encode_error = |id| move |message| StreamError::Encode { id, message };
    Ok(match opts.rows {
        Rows::Samples => store
            .samples(
                &SampleFilter {
                    after_id: position,
                    accepted: Some(true),
                    ..SampleFilter::default()
                },
                limit,
            )?
            .iter()
            .map(|s| {
                encode_sample(opts.format, &opts.schema_name, s)
                    .map(|b| (s.id, b))
                    .map_err(encode_error(s.id))
            })
            .collect::<Result<_, _>>()?,
        Rows::Predictions => store
            .predictions(position, limit)?
            .iter()
            .map(|p| {
                encode_stored_prediction(opts.format, &opts.schema_name, p)
                    .map(|b| (p.id, b))
                    .map_err(encode_error(p.id))
            })
            .collect::<Result<_, _>>()?,
    })
}

/// Sends a batch and waits until the broker acknowledged all of it: true; false when a record
/// failed or did not arrive in time (the caller retries the batch).
fn send_batch(
    producer: &BaseProducer<Context>,
    topic: &str,
    batch: &[(i64, Vec<u8>)],
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<bool, StreamError> {
    let failed_before = producer.context().failed();
    for (_, bytes) in batch {
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(bytes.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(100));
                    if stop() {
                        return Ok(false);
                    }
                }
                Err((error, _)) => {
                    return Err(StreamError::Kafka {
                        what: "queueing a record",
                        error,
                    })
                }
            }
        }
    }
    let flushed = producer.flush(timeout + Duration::from_secs(5)).is_ok();
    Ok(flushed && producer.context().failed() == failed_before)
}
