//! Kafka as a bridge (feature `kafka`): samples in from a topic ([`consume`]), store rows and
//! predictions out to a topic ([`publish`], and `bccp serve --kafka`), in the reference's JSON
//! Connect envelope or plain JSON ([`record`], always compiled: it is plain serde).
//!
//! Delivery guarantees: into the store, exactly once — every record is inserted under an
//! idempotency key (its image's content hash, as `bccp ingest`; its topic, partition and
//! offset when the image cannot be read) and the consumer group's offsets are committed to
//! Kafka only after the rows' transaction committed, so a record re-delivered after a crash
//! is recognised and not stored twice. Out to Kafka, at least once — the
//! publisher's position is stored (`consumer_offsets`) only after the broker acknowledged
//! every record of a batch; a crash in between publishes that batch again.

pub mod record;

#[cfg(feature = "kafka")]
pub mod client;
#[cfg(feature = "kafka")]
pub mod consume;
#[cfg(feature = "kafka")]
pub mod publish;

pub use record::Format;

/// When a long-running stream stops (besides Ctrl-C, checked by the caller's `stop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopAfter {
    /// After this many records.
    pub limit: Option<u64>,
    /// After this long.
    pub duration: Option<std::time::Duration>,
    /// After this long without a new record (caught up).
    pub idle: Option<std::time::Duration>,
}

/// What can go wrong streaming.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Invalid(String),
    #[cfg(feature = "kafka")]
    #[error("kafka: {what}: {error}")]
    Kafka {
        what: &'static str,
        error: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("store row {id} cannot be published: {message}")]
    Encode { id: i64, message: String },
}

impl StopAfter {
    /// Whether to stop now, after `count` records, `started` and the last record at `last`.
    pub fn reached(
        &self,
        count: u64,
        started: std::time::Instant,
        last: std::time::Instant,
    ) -> bool {
        self.limit.is_some_and(|n| count >= n)
            || self.duration.is_some_and(|d| started.elapsed() >= d)
            || self.idle.is_some_and(|d| last.elapsed() >= d)
    }

    /// Records still allowed after `count`, at most `batch`.
    pub fn room(&self, count: u64, batch: usize) -> usize {
        match self.limit {
            Some(n) => (n.saturating_sub(count)).min(batch as u64) as usize,
            None => batch,
        }
    }
}
