//! `bccp serve --kafka`: every prediction published to a Kafka topic by one producer thread
//! behind a bounded queue — a request only queues its row (never waits for the broker); when
//! the queue (or librdkafka's own bounded buffer) is full the row is dropped and counted in
//! `/metrics` (`bccp_kafka_predictions_total{result}`), as is every failed delivery.

use std::sync::Arc;
use std::thread::JoinHandle;

use super::config::KafkaTarget;
use super::metrics::Metrics;
use crate::store::NewPrediction;

/// The queue's sending side.
#[cfg(feature = "kafka")]
#[derive(Clone)]
pub(crate) struct KafkaLog {
    tx: std::sync::mpsc::SyncSender<NewPrediction>,
    metrics: Arc<Metrics>,
}

/// Built without the `kafka` feature: no value of it exists.
#[cfg(not(feature = "kafka"))]
#[derive(Clone)]
pub(crate) enum KafkaLog {}

#[cfg(not(feature = "kafka"))]
impl KafkaLog {
    pub fn start(
        _: &KafkaTarget,
        _: usize,
        _: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), String> {
        Err("this bccp was built without the `kafka` feature (cargo build --features kafka)".into())
    }

    pub fn log(&self, _: &NewPrediction) {
        match *self {}
    }
}

#[cfg(feature = "kafka")]
impl KafkaLog {
    /// Starts the producer thread; it ends (after flushing for up to 5 s) when every
    /// [`KafkaLog`] is dropped.
    pub fn start(
        target: &KafkaTarget,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), String> {
        use crate::stream::client::{check_brokers, producer_config, Context};
        use rdkafka::producer::BaseProducer;
        check_brokers(&target.brokers)?;
        let producer: BaseProducer<Context> = producer_config(
            &target.brokers,
            capacity,
            std::time::Duration::from_secs(30),
        )
        .create_with_context(Context::default())
        .map_err(|e| format!("kafka producer: {e}"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let m = Arc::clone(&metrics);
        let target = target.clone();
        let handle = std::thread::Builder::new()
            .name("bccp-kafka-log".into())
            .spawn(move || produce(rx, producer, &target, &m))
            .map_err(|e| format!("kafka thread: {e}"))?;
        Ok((Self { tx, metrics }, handle))
    }

    /// Queues a row; when the queue is full it is dropped and counted.
    pub fn log(&self, row: &NewPrediction) {
        if self.tx.try_send(row.clone()).is_err() {
            self.metrics.count_kafka("dropped", 1);
        }
    }
}

#[cfg(feature = "kafka")]
fn produce(
    rx: std::sync::mpsc::Receiver<NewPrediction>,
    producer: rdkafka::producer::BaseProducer<crate::stream::client::Context>,
    target: &KafkaTarget,
    metrics: &Metrics,
) {
    use rdkafka::producer::{BaseRecord, Producer};
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Duration;
    let (mut delivered, mut failed) = (0, 0);
    let mut sync = |producer: &BaseProducer| {
        let ctx = producer.context();
        metrics.count_kafka("delivered", ctx.delivered() - delivered);
        metrics.count_kafka("failed", ctx.failed() - failed);
        delivered = ctx.delivered();
        failed = ctx.failed();
    };
    type BaseProducer = rdkafka::producer::BaseProducer<crate::stream::client::Context>;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(row) => {
                let bytes = match crate::stream::record::encode_prediction(
                    target.format,
                    &target.topic,
                    None,
                    &row,
                ) {
                    Ok(bytes) => bytes,
                    Err(why) => {
                        metrics.count_kafka("failed", 1);
                        eprintln!("warning: prediction not published to kafka: {why}");
                        continue;
                    }
                };
                let record = BaseRecord::<(), [u8]>::to(&target.topic).payload(bytes.as_slice());
                if producer.send(record).is_err() {
                    metrics.count_kafka("dropped", 1);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        producer.poll(Duration::ZERO);
        sync(&producer);
    }
    let _ = producer.flush(Duration::from_secs(5));
    sync(&producer);
}
