//! The real-time data store: samples as they arrive, predictions, re-training decisions and
//! consumer offsets, behind one [`Store`] trait with two back-ends.
//!
//! * SQLite, embedded, the default: one file (`sqlite:PATH`, default
//!   [`crate::paths::store_file`]), WAL mode, a busy timeout and retries with back-off when
//!   another process holds the write lock.
//! * PostgreSQL (`postgres://…`): a lost connection is re-opened and the batch retried; every
//!   sample carries a unique idempotency key and is inserted with `ON CONFLICT DO NOTHING`, so
//!   a batch retried after its commit went through adds nothing twice.
//!
//! The schema is versioned ([`SCHEMA_VERSION`]) and migrated on open, in one transaction.
//! Every write of several rows is one transaction; all SQL is parameterised (the only name
//! spliced into SQL, a reference view's, is checked to be a plain identifier first).
//!
//! [`generate`] (the reference's data generator, done right) and [`ingest`] (a user's folder or
//! JSON Lines file) feed the store.

mod ahead;
pub mod error;
pub mod generate;
pub mod ingest;
mod pg_copy;
mod postgres;
mod retry;
mod schema;
mod sqlite;
pub mod url;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

pub use error::{Result, StoreError};

/// Rows per transaction of the bulk writers (`generate --bulk`, `ingest`): large enough that
/// an index page is written to the log about once per batch, not once per few rows.
pub const BULK_BATCH_ROWS: usize = 5000;

/// Rows per transaction of `generate` (and `up --generate`): its rows carry only text (the
/// content hashes come from the manifest), so a larger batch costs little memory, and with the
/// content-hash index taking rows in random order, 20 000 rows per commit write its pages to
/// SQLite's log a quarter as often as [`BULK_BATCH_ROWS`] (60 000 rows in 0.45–0.49 s against
/// 0.55–0.64 s; no change on PostgreSQL). `ingest` keeps the smaller batch: it reads users'
/// files of any size a batch ahead.
pub const GENERATE_BATCH_ROWS: usize = 20_000;

pub use generate::{
    generate, generate_from, GenerateInput, GenerateOptions, GenerateSummary, StreamBound,
};
pub use ingest::{ingest, IngestInput, IngestOptions, IngestSummary};

/// Runs `load` as a bulk load of `store` ([`Store::begin_bulk_load`]): what the start
/// deferred is built on every way out (a stop, an error; after a crash, by the next open).
pub(crate) fn bulk_load<T>(
    store: &mut dyn Store,
    load: impl FnOnce(&mut dyn Store) -> Result<T>,
) -> Result<T> {
    let deferred = store.begin_bulk_load()?;
    let loaded = load(store);
    if deferred {
        store.end_bulk_load()?;
    }
    loaded
}
pub use postgres::PgStore;
pub use schema::SCHEMA_VERSION;
pub use sqlite::SqliteStore;
pub use url::DbUrl;

/// Which part of the data a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training candidates.
    Train,
    /// Held out: the trusted gate set a challenger and the champion are compared on.
    Gate,
}

impl Split {
    /// The name stored in the `split` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Gate => "gate",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "train" => Some(Split::Train),
            "gate" => Some(Split::Gate),
            _ => None,
        }
    }
}

/// Whether a sample can be used; a rejected one keeps why (e.g. its image does not decode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SampleStatus {
    Accepted,
    Rejected(String),
}

impl SampleStatus {
    /// The name stored in the `status` column.
    pub fn as_str(&self) -> &'static str {
        match self {
            SampleStatus::Accepted => "accepted",
            SampleStatus::Rejected(_) => "rejected",
        }
    }

    /// The reason stored in `reject_reason`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            SampleStatus::Accepted => None,
            SampleStatus::Rejected(reason) => Some(reason),
        }
    }

    fn from_columns(status: &str, reason: Option<String>) -> Option<Self> {
        match (status, reason) {
            ("accepted", None) => Some(SampleStatus::Accepted),
            ("rejected", Some(reason)) => Some(SampleStatus::Rejected(reason)),
            _ => None,
        }
    }
}

/// A sample to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSample {
    /// Unique idempotency key: a row with a key already stored is not inserted again (e.g.
    /// `content:<sha256>` for an ingested file, `manifest:<dataset>:<id>` for a generated one).
    pub key: String,
    /// Arrival time, `YYYY-MM-DDTHH:MM:SSZ` (UTC).
    pub timestamp: String,
    /// Absolute path of the image file.
    pub image_path: String,
    /// Hex SHA-256 of the file's bytes; `None` when the file could not be read.
    pub sha256: Option<String>,
    /// The label the user gave (an index into [`Store::classes`]).
    pub label_given: i64,
    /// The true label, when known (generated data).
    pub label_true: Option<i64>,
    /// Where the sample came from: the day (`monday`, `tuesday`) or another source name.
    pub source: String,
    pub split: Split,
    pub status: SampleStatus,
}

/// A stored sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: i64,
    pub key: String,
    pub timestamp: String,
    pub image_path: String,
    pub sha256: Option<String>,
    pub label_given: i64,
    pub label_true: Option<i64>,
    /// A label checked by a person after arrival, if any.
    pub label_verified: Option<i64>,
    pub source: String,
    pub split: Split,
    pub status: SampleStatus,
}

impl Sample {
    /// The best label known: verified, else true, else as given.
    pub fn best_label(&self) -> i64 {
        self.label_verified
            .or(self.label_true)
            .unwrap_or(self.label_given)
    }
}

/// Which samples to read or count; every field narrows the selection, `Default` selects all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleFilter {
    /// Only ids above this one (a watermark; 0 for all).
    pub after_id: i64,
    /// Only ids up to this one (inclusive).
    pub up_to_id: Option<i64>,
    pub source: Option<String>,
    pub split: Option<Split>,
    /// `Some(true)`: accepted only; `Some(false)`: rejected only.
    pub accepted: Option<bool>,
    /// Only samples with a true or a verified label (the trusted ones).
    pub trusted: bool,
    /// Only samples a person verified.
    pub verified: bool,
}

impl SampleFilter {
    /// Accepted samples that arrived after `watermark` (a re-training cycle's candidates).
    pub fn since(watermark: i64) -> Self {
        Self {
            after_id: watermark,
            accepted: Some(true),
            ..Self::default()
        }
    }

    /// The trusted gate set: accepted gate samples with a true or verified label, of one
    /// source (day) or all.
    pub fn gate(source: Option<&str>) -> Self {
        Self {
            source: source.map(str::to_owned),
            split: Some(Split::Gate),
            accepted: Some(true),
            trusted: true,
            ..Self::default()
        }
    }
}

/// A sample a re-training cycle flagged as probably mislabelled (cut or relabelled), kept for
/// review.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    pub sample_id: i64,
    /// The cleansing method's noise score (higher: more likely mislabelled).
    pub score: f64,
    /// The label the method suggests instead (a class index), when it has one.
    pub suggested: Option<i64>,
}

/// A prediction to record (by the prediction server).
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrediction {
    pub timestamp: String,
    /// The stored sample predicted, if the request named one.
    pub sample_id: Option<i64>,
    /// The request's own id, if any.
    pub request_id: Option<String>,
    pub model: String,
    pub version: i64,
    pub class: i64,
    pub probability: f64,
    pub latency_ms: f64,
}

/// A stored prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: i64,
    pub prediction: NewPrediction,
}

/// The start of a re-training cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRetrain {
    pub started: String,
    /// What started it (e.g. `min-new 5000`, `schedule`, `manual`).
    pub trigger: String,
    /// The champion at the start (`name@version`), if any.
    pub champion: Option<String>,
}

/// How a re-training cycle ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrainOutcome {
    pub finished: String,
    /// The challenger trained (`name@version`), if one was.
    pub challenger: Option<String>,
    /// The champion after the decision.
    pub champion: Option<String>,
    /// e.g. `promoted`, `rejected`, `skipped`, `failed`.
    pub decision: String,
    /// Why, as JSON (gate accuracies per day, margins, …).
    pub reasons: serde_json::Value,
    /// The last sample id this cycle consumed.
    pub watermark: Option<i64>,
}

/// A stored re-training cycle; `finished`, `watermark` and the outcome are unset (decision
/// `running`) while it runs, or if it died.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrain {
    pub id: i64,
    pub started: String,
    pub finished: Option<String>,
    pub trigger: String,
    pub challenger: Option<String>,
    pub champion: Option<String>,
    pub decision: String,
    pub reasons: serde_json::Value,
    pub watermark: Option<i64>,
}

/// The decision of a retrain row that has started but not finished.
pub const RUNNING: &str = "running";

/// How often the store had to retry (busy database, lost connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions tried again after a transient failure.
    pub retries: u64,
    /// Connections re-opened (PostgreSQL).
    pub reconnects: u64,
    /// Sample batches that met a key another writer stored while they were being inserted
    /// (PostgreSQL; the batch then skips that key, as it skips any stored key).
    pub key_conflicts: u64,
}

/// The data store. Every method is one transaction (retried on a busy database or a lost
/// connection); writes of several rows commit together or not at all.
pub trait Store: Send {
    /// Where the store is, for messages (`sqlite:/path` or `postgres://user@host:port/db`,
    /// never a password).
    fn location(&self) -> &str;

    /// The schema version of the database (after migration: [`SCHEMA_VERSION`]).
    fn schema_version(&mut self) -> Result<u32>;

    /// Retries and reconnects so far.
    fn stats(&self) -> StoreStats;

    /// The class names, index order.
    fn classes(&mut self) -> Result<Vec<String>>;

    /// The index of each name, adding the names not yet known after the existing ones.
    fn ensure_classes(&mut self, names: &[String]) -> Result<Vec<i64>>;

    /// Inserts samples in one transaction; for each row its new id, or `None` when a row with
    /// its key was already stored (then nothing is changed). After a lost connection, a batch
    /// whose commit had gone through is reported as already stored.
    fn insert_samples(&mut self, rows: &[NewSample]) -> Result<Vec<Option<i64>>>;

    /// Starts a bulk load of samples ([`bulk_load`] wraps a load in it and its end). A back-end
    /// may then defer index upkeep while the samples table is empty: both drop the
    /// content-hash and source/split indexes, to build them once, sorted, in
    /// [`Self::end_bulk_load`] (a crash in between leaves them to the next open, which builds
    /// whatever is missing), and PostgreSQL copies each large batch on two connections.
    /// Queries stay correct meanwhile, only slower. Returns whether anything was deferred.
    fn begin_bulk_load(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Ends a bulk load: builds what [`Self::begin_bulk_load`] deferred.
    fn end_bulk_load(&mut self) -> Result<()> {
        Ok(())
    }

    /// Samples matching `filter`, by increasing id, at most `limit`.
    fn samples(&mut self, filter: &SampleFilter, limit: usize) -> Result<Vec<Sample>>;

    /// The number of samples matching `filter`.
    fn count_samples(&mut self, filter: &SampleFilter) -> Result<u64>;

    /// The largest sample id (0 when empty): the watermark of "everything so far". No sample
    /// with a lower id appears after it returns: on PostgreSQL, where concurrent writers commit
    /// their ids out of order, it waits (up to a minute) for the writers open when it looked.
    fn max_sample_id(&mut self) -> Result<i64>;

    /// The hashes among `hashes` that a stored sample has.
    fn known_hashes(&mut self, hashes: &[String]) -> Result<HashSet<String>>;

    /// Records a person's verified label of sample `id`; false if there is no such sample.
    fn set_verified_label(&mut self, id: i64, label: i64) -> Result<bool>;

    /// Records what cycle `retrain_id` flagged (replacing what it recorded before), in one
    /// transaction.
    fn record_flags(&mut self, retrain_id: i64, flags: &[Flag]) -> Result<()>;

    /// The flags of cycle `retrain_id`, or of the latest cycle that recorded any (`None`),
    /// highest score first, with that cycle's id; `None` when there are none.
    fn flags(&mut self, retrain_id: Option<i64>) -> Result<Option<(i64, Vec<Flag>)>>;

    /// Inserts predictions in one transaction; their ids.
    fn insert_predictions(&mut self, rows: &[NewPrediction]) -> Result<Vec<i64>>;

    /// Predictions with ids above `after_id`, by increasing id, at most `limit`.
    fn predictions(&mut self, after_id: i64, limit: usize) -> Result<Vec<Prediction>>;

    /// The last `limit` predictions recorded, by increasing id (what a dashboard charts).
    fn recent_predictions(&mut self, limit: usize) -> Result<Vec<Prediction>>;

    /// Records the start of a re-training cycle (decision [`RUNNING`]); its id.
    fn start_retrain(&mut self, retrain: &NewRetrain) -> Result<i64>;

    /// Records how cycle `id` ended and moves the consumer `offsets` (name → last consumed
    /// id) in the same transaction: both happen or neither.
    fn finish_retrain(
        &mut self,
        id: i64,
        outcome: &RetrainOutcome,
        offsets: &[(&str, i64)],
    ) -> Result<()>;

    /// Every re-training cycle, by increasing id.
    fn retrains(&mut self) -> Result<Vec<Retrain>>;

    /// The most recent re-training cycle, if any.
    fn last_retrain(&mut self) -> Result<Option<Retrain>>;

    /// A consumer's offset, if it has one.
    fn offset(&mut self, name: &str) -> Result<Option<i64>>;

    /// Sets a consumer's offset.
    fn set_offset(&mut self, name: &str, offset: i64) -> Result<()>;

    /// Creates (or replaces) the reference-compatible view `name(id, timestamp, image_path,
    /// target)` over the accepted samples (target: the label given), so the reference's
    /// connectors and dashboards read the store. `name` must be a plain SQL identifier.
    fn create_reference_view(&mut self, name: &str) -> Result<()>;
}

/// Opens the store `url` names (creating and migrating it as needed).
pub fn open(url: &DbUrl) -> Result<Box<dyn Store>> {
    Ok(match url {
        DbUrl::Sqlite(path) => Box::new(SqliteStore::open(path)?),
        DbUrl::Postgres(conn) => Box::new(PgStore::connect(conn)?),
    })
}

/// Opens the store and migrates it only up to schema `version`: for tests of migrations.
#[doc(hidden)]
pub fn open_at_version(url: &DbUrl, version: u32) -> Result<Box<dyn Store>> {
    Ok(match url {
        DbUrl::Sqlite(path) => Box::new(SqliteStore::open_with(
            path,
            sqlite::DEFAULT_BUSY_TIMEOUT,
            version,
        )?),
        DbUrl::Postgres(conn) => Box::new(PgStore::connect_with(conn, version)?),
    })
}

/// Checks that `name` is a plain SQL identifier (letters, digits and `_`, not starting with a
/// digit, at most 63 bytes), so it can be spliced into DDL.
pub fn check_identifier(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "view name",
            name,
            "letters, digits and '_', not starting with a digit, at most 63 characters",
        ))
    }
}

/// The current time as stored, `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    crate::data::timestamp::format_utc(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["fashion_mnist", "_x", "T1"] {
            assert!(check_identifier(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1x",
            "a-b",
            "a b",
            "x;drop table samples",
            &"a".repeat(64),
        ] {
            let err = check_identifier(bad).unwrap_err().to_string();
            assert!(err.contains("view name"), "{err}");
        }
    }

    #[test]
    fn status_and_split_round_trip() {
        for split in [Split::Train, Split::Gate] {
            assert_eq!(Split::parse(split.as_str()), Some(split));
        }
        assert_eq!(Split::parse("test"), None);
        let rejected = SampleStatus::Rejected("decode: bad".into());
        assert_eq!(
            SampleStatus::from_columns(rejected.as_str(), rejected.reason().map(str::to_owned)),
            Some(rejected)
        );
        assert_eq!(
            SampleStatus::from_columns("accepted", None),
            Some(SampleStatus::Accepted)
        );
        assert_eq!(SampleStatus::from_columns("rejected", None), None);
    }
}
