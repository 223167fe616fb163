//! `bccp stream consume`: sample records from a Kafka topic into the store, with the rules of
//! `bccp ingest` (each image read, hashed and strictly decoded; same content already stored:
//! a duplicate, skipped; unreadable or undecodable: stored as rejected with the reason).
//!
//! Exactly once into the store: each batch of records is written in one transaction, every
//! row under an idempotency key (`content:<sha256>` as `bccp ingest` keys it; for an image
//! that cannot be read, `kafka:<topic>:<partition>:<offset>`), and the group's offsets are
//! committed to Kafka only after that transaction committed. A consumer killed between the
//! two gets the batch again; its rows are then already stored and nothing is added twice. A malformed record is logged with its offset, counted and skipped
//! (its offset is committed with the batch).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::client::{base_config, check_brokers, Backoff, Context};
use super::record::{decode_sample, Format, SampleRecord};
use super::{StopAfter, StreamError};
use crate::store::ingest::{check_file, Checked};
use crate::store::{NewSample, Split, Store};

/// Parameters of [`consume`].
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// `HOST:PORT[,HOST:PORT…]`.
    pub brokers: String,
    pub topic: String,
    /// The consumer group (offsets are committed under it).
    pub group: String,
    pub format: Format,
    /// The `source` column of the rows.
    pub source: String,
    /// What relative `image_path`s are relative to (default: the working folder).
    pub image_root: Option<PathBuf>,
    /// Records per store transaction, at most.
    pub batch_size: usize,
    pub stop_after: StopAfter,
}

/// What [`consume`] did.
#[derive(Debug, Clone, Default)]
pub struct ConsumeSummary {
    /// Records read from the topic (malformed ones included).
    pub received: u64,
    pub accepted: u64,
    /// Content already stored, or a record stored before (re-delivered).
    pub duplicates: u64,
    /// Stored as rejected, per reason kind (`undecodable`, `unreadable`, …).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Records that are not a sample record (logged and skipped).
    pub malformed: u64,
    /// Broker errors seen (each retried).
    pub broker_errors: u64,
    /// Ended by the caller's stop (Ctrl-C).
    pub stopped: bool,
}

impl ConsumeSummary {
    /// `received 10: accepted 7, duplicates 1, rejected 1 (undecodable 1), malformed 1`.
    pub fn line(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let mut line = format!(
            "received {}: accepted {}, duplicates {}, rejected {rejected}",
            self.received, self.accepted, self.duplicates
        );
        if rejected > 0 {
            let kinds: Vec<String> = self
                .rejected
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            line.push_str(&format!(" ({})", kinds.join(", ")));
        }
        line.push_str(&format!(", malformed {}", self.malformed));
        line
    }
}

/// A well-formed record and where it was.
struct Received {
    partition: i32,
    offset: i64,
    record: SampleRecord,
}

/// Reads the topic into `store` until `opts.stop_after` or `stop` (checked between batches).
pub fn consume(
    store: &mut dyn Store,
    opts: &ConsumeOptions,
    stop: &dyn Fn() -> bool,
) -> Result<ConsumeSummary, StreamError> {
    check_brokers(&opts.brokers).map_err(StreamError::Invalid)?;
    if opts.batch_size == 0 {
        return Err(StreamError::Invalid(
            "--batch-size 0: expected at least 1".into(),
        ));
    }
    let kafka = |what| move |error| StreamError::Kafka { what, error };
    let consumer: BaseConsumer<Context> = base_config(&opts.brokers)
        .set("group.id", &opts.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Bounded prefetch: librdkafka keeps at least this many records queued per partition
        // (default 100 000), fetched 256 KiB at a time, 4 MiB at most.
        .set(
            "queued.min.messages",
            (2 * opts.batch_size.max(100)).to_string(),
        )
        .set("fetch.message.max.bytes", "262144")
        .set("queued.max.messages.kbytes", "4096")
        // A consumer killed without leaving the group holds its partitions this long.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(Context::default())
        .map_err(kafka("creating the consumer"))?;
    consumer
        .subscribe(&[&opts.topic])
        .map_err(kafka("subscribing"))?;
    let mut summary = ConsumeSummary::default();
    // Next offset to commit, per partition: advanced only after the store committed.
    let mut to_commit: BTreeMap<i32, i64> = BTreeMap::new();
    let started = Instant::now();
    let mut last_record = Instant::now();
    let mut assigned = false;
    let mut backoff = Backoff::default();
    loop {
        if stop() {
            summary.stopped = true;
            break;
        }
        // Joining the group takes the coordinator's rebalance delay (seconds): "idle" counts
        // from when partitions are assigned.
        if !assigned {
            assigned = consumer.assignment().is_ok_and(|a| a.count() > 0);
            last_record = Instant::now();
        }
        if opts
            .stop_after
            .reached(summary.received, started, last_record)
        {
            break;
        }
        let room = opts.stop_after.room(summary.received, opts.batch_size);
        let mut batch = Vec::new();
        let mut read = BTreeMap::new();
        let mut n = 0;
        while n < room {
            match consumer.poll(Duration::from_millis(100)) {
                None => break,
                Some(Err(e)) => {
                    summary.broker_errors += 1;
                    eprintln!("warning: kafka: {e}; retrying");
                    break;
                }
                Some(Ok(m)) => {
                    n += 1;
                    read.insert(m.partition(), m.offset() + 1);
                    let decoded = match m.payload() {
                        Some(bytes) => decode_sample(opts.format, bytes),
                        None => Err("empty record (no value)".into()),
                    };
                    match decoded {
                        Ok(record) => batch.push(Received {
                            partition: m.partition(),
                            offset: m.offset(),
                            record,
                        }),
                        Err(why) => {
                            summary.malformed += 1;
                            eprintln!(
                                "warning: malformed record {}/{}@{} skipped: {why}",
                                m.topic(),
                                m.partition(),
                                m.offset()
                            );
                        }
                    }
                }
            }
        }
        if n > 0 {
            last_record = Instant::now();
            summary.received += n as u64;
            write_batch(store, opts, &batch, &mut summary)?;
            to_commit.extend(read);
        }
        if !to_commit.is_empty() {
            match commit(&consumer, &opts.topic, &to_commit) {
                Ok(()) => {
                    to_commit.clear();
                    backoff.reset();
                }
                Err(e) => {
                    // The rows are in the store; a re-delivery is recognised. Try again later.
                    eprintln!("warning: kafka: committing offsets: {e}; retrying");
                    backoff.wait(stop);
                }
            }
        }
    }
    // Offsets of the last batch, if the broker takes them now: a few tries, then the next run
    // gets those records again and skips them as already stored.
    for _ in 0..3 {
        if to_commit.is_empty() || commit(&consumer, &opts.topic, &to_commit).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    summary.broker_errors += consumer.context().errors();
    Ok(summary)
}

fn commit(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut list = TopicPartitionList::new();
    for (&partition, &next) in offsets {
        list.add_partition_offset(topic, partition, Offset::Offset(next))?;
    }
    consumer.commit(&list, CommitMode::Sync)
}

/// One batch into the store in one transaction: files checked in parallel, content already
/// stored (or twice in the batch) set aside as duplicates.
fn write_batch(
    store: &mut dyn Store,
    opts: &ConsumeOptions,
    batch: &[Received],
    summary: &mut ConsumeSummary,
) -> Result<(), StreamError> {
    let root = opts
        .image_root
        .clone()
        .unwrap_or_else(|| PathBuf::from("."));
    let paths: Vec<PathBuf> = batch
        .iter()
        .map(|r| {
            let path = root.join(&r.record.image_path);
            std::path::absolute(&path).unwrap_or(path)
        })
        .collect();
    let checked: Vec<Checked> = paths.par_iter().map(|p| check_file(p)).collect();
    let hashes: Vec<String> = checked.iter().filter_map(|c| c.sha256.clone()).collect();
    let known = store.known_hashes(&hashes)?;
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    let mut kinds = Vec::new();
    let now = crate::store::now_utc();
    for ((r, path), c) in batch.iter().zip(paths).zip(checked) {
        if let Some(h) = &c.sha256 {
            if known.contains(h) || !seen.insert(h.clone()) {
                summary.duplicates += 1;
                continue;
            }
        }
        // Keyed by content like `bccp ingest` (a record re-delivered, or a topic re-created
        // with offsets from 0 again, adds nothing twice); without content, by position.
        let key = match &c.sha256 {
            Some(h) => format!("content:{h}"),
            None => format!("kafka:{}:{}:{}", opts.topic, r.partition, r.offset),
        };
        rows.push(NewSample {
            key,
            timestamp: r.record.timestamp.clone().unwrap_or_else(|| now.clone()),
            image_path: path.to_string_lossy().into_owned(),
            sha256: c.sha256,
            label_given: r.record.target,
            label_true: None,
            source: opts.source.clone(),
            split: Split::Train,
            status: c.status,
        });
        kinds.push(c.kind);
    }
    let ids = store.insert_samples(&rows)?;
    for (id, kind) in ids.iter().zip(kinds) {
        match (id, kind) {
            (None, _) => summary.duplicates += 1,
            (Some(_), None) => summary.accepted += 1,
            (Some(_), Some(kind)) => *summary.rejected.entry(kind).or_default() += 1,
        }
    }
    Ok(())
}
