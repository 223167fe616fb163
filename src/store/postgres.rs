//! The PostgreSQL back-end (the sync `postgres` crate). A transaction that fails because the
//! connection was lost (server restart, `pg_terminate_backend`, network) or on a serialisation
//! failure is retried on a new connection with back-off. A batch of samples inserts only the keys
//! not yet stored, so retrying a batch whose commit had gone through before the connection
//! dropped inserts nothing twice, and no committed row is lost.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

use super::error::{Result, StoreError};
use super::pg_copy::{self, TwoLanes};
use super::retry::{Backoff, RETRY_WINDOW};
use super::schema::{
    filter_sql, Param, CREATE_VERSION_TABLE, DEFERRABLE_INDEXES, MIGRATIONS, SCHEMA_VERSION,
};
use super::url::PgUrl;
use super::{
    Flag, NewPrediction, NewRetrain, NewSample, Prediction, Retrain, RetrainOutcome, Sample,
    SampleFilter, SampleStatus, Split, Store, StoreStats, RUNNING,
};

type PgResult<T> = std::result::Result<T, postgres::Error>;
type Tx<'a> = postgres::Transaction<'a>;

/// The PostgreSQL store.
pub struct PgStore {
    config: Config,
    /// `None` after the connection was lost, until the next attempt re-opens it.
    client: Option<Client>,
    /// A second connection while a bulk load into an empty samples table runs: it copies
    /// half of every batch and builds one of the deferred indexes ([`pg_copy::copy_on_two`]).
    bulk_lane: Option<Client>,
    location: String,
    stats: StoreStats,
}

/// A timestamp column read back as `YYYY-MM-DDTHH:MM:SSZ`.
fn ts(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
}

fn sample_columns() -> String {
    format!(
        "id, ikey, {}, image_path, sha256, label_given, label_true, label_verified, source, \
         split, status, reject_reason",
        ts("timestamp")
    )
}

fn retrain_columns() -> String {
    format!(
        "id, {}, {}, trigger, challenger, champion, decision, reasons::text, watermark",
        ts("started"),
        ts("finished")
    )
}

/// How long [`Store::max_sample_id`] waits for the samples' open writers.
const WRITERS_WAIT: Duration = Duration::from_secs(60);

/// A key of the advisory lock that serialises migrations of one database.
const MIGRATION_LOCK: i64 = 0x6263_6370_0001;

impl PgStore {
    /// Predictions selected by `tail` (a `WHERE … ORDER BY … LIMIT` clause binding the id
    /// bound and the limit).
    fn read_predictions(
        &mut self,
        tail: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Prediction>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let sql = format!(
            "SELECT id, {}, sample_id, request_id, model, version, class, probability, \
             latency_ms FROM predictions {tail}",
            ts("timestamp")
        );
        let rows = self.transaction("reading predictions", |tx| {
            tx.query(&sql, &[&after_id, &limit])
        })?;
        Ok(rows
            .iter()
            .map(|r| Prediction {
                id: r.get(0),
                prediction: NewPrediction {
                    timestamp: r.get(1),
                    sample_id: r.get(2),
                    request_id: r.get(3),
                    model: r.get(4),
                    version: r.get(5),
                    class: r.get(6),
                    probability: r.get(7),
                    latency_ms: r.get(8),
                },
            })
            .collect())
    }

    /// Connects and migrates the database.
    pub fn connect(url: &PgUrl) -> Result<Self> {
        Self::connect_with(url, SCHEMA_VERSION)
    }

    /// [`connect`](Self::connect), migrating only up to schema `version`.
    pub fn connect_with(url: &PgUrl, version: u32) -> Result<Self> {
        let bad = |message: String| StoreError::Postgres {
            location: url.display.clone(),
            message,
        };
        let mut config = Config::from_str(&url.url).map_err(|e| bad(e.to_string()))?;
        if config.get_application_name().is_none() {
            config.application_name("bccp");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let client = config
            .connect(NoTls)
            .map_err(|e| bad(format!("cannot connect: {}", message(&e))))?;
        let mut store = Self {
            config,
            client: Some(client),
            bulk_lane: None,
            location: url.display.clone(),
            stats: StoreStats::default(),
        };
        store.migrate(version)?;
        if version >= 1 {
            store.build_deferred_indexes()?;
        }
        Ok(store)
    }

    /// Builds the indexes of [`DEFERRABLE_INDEXES`] that are missing (a bulk load's, or one a
    /// crash interrupted). Reads first, so a store with every index takes no lock for it.
    fn build_deferred_indexes(&mut self) -> Result<()> {
        let present: Vec<String> = self.transaction("listing the indexes", |tx| {
            let rows = tx.query(
                "SELECT indexname::TEXT FROM pg_indexes \
                 WHERE schemaname = current_schema() AND tablename = 'samples'",
                &[],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })?;
        if DEFERRABLE_INDEXES
            .iter()
            .all(|(name, _)| present.iter().any(|p| p == name))
        {
            return Ok(());
        }
        self.transaction("building the samples indexes", |tx| {
            for (_, create) in DEFERRABLE_INDEXES {
                tx.batch_execute(create)?;
            }
            Ok(())
        })
    }

    /// Runs `op` in a transaction, committed at the end; on a lost connection or another
    /// transient failure, re-connects and runs it again (with back-off, up to
    /// [`RETRY_WINDOW`]).
    fn transaction<T>(
        &mut self,
        what: &'static str,
        mut op: impl FnMut(&mut Tx<'_>) -> PgResult<T>,
    ) -> Result<T> {
        let mut backoff = Backoff::new(RETRY_WINDOW);
        loop {
            let client = match self.client.take() {
                Some(client) => Ok(client),
                None => self.config.connect(NoTls).inspect(|_| {
                    self.stats.reconnects += 1;
                }),
            };
            let result = client.and_then(|mut client| {
                let result = run(&mut client, &mut op);
                // Keep a connection that is still up, whatever the outcome.
                if !client.is_closed() {
                    self.client = Some(client);
                }
                result
            });
            match result {
                Ok(value) => return Ok(value),
                Err(e) if is_transient(&e) || self.client.is_none() => {
                    if !backoff.wait() {
                        return Err(StoreError::GaveUp {
                            location: self.location.clone(),
                            what,
                            attempts: backoff.attempts(),
                            seconds: backoff.seconds(),
                            last: message(&e),
                        });
                    }
                    self.stats.retries += 1;
                }
                Err(e) => {
                    return Err(StoreError::Postgres {
                        location: self.location.clone(),
                        message: format!("{what}: {}", message(&e)),
                    })
                }
            }
        }
    }

    fn migrate(&mut self, target: u32) -> Result<()> {
        let found = self.transaction("migrating the schema", |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(CREATE_VERSION_TABLE)?;
            let current: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version",
                    &[],
                )?
                .get(0);
            let current = current as u32;
            if current > SCHEMA_VERSION {
                return Ok(current);
            }
            for m in MIGRATIONS
                .iter()
                .filter(|m| m.version > current && m.version <= target)
            {
                tx.batch_execute(m.postgres)?;
                tx.execute(
                    "INSERT INTO schema_version (version, applied) VALUES ($1, $2)",
                    &[&i64::from(m.version), &super::now_utc()],
                )?;
            }
            Ok(current)
        })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                location: self.location.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            location: self.location.clone(),
            message,
        }
    }
}

/// Inserts `rows` in one statement (the columns as arrays, unnested, in order), with
/// `on_conflict` after the rows; the inserted rows' ids by key.
fn insert_sample_rows(
    tx: &mut Tx<'_>,
    rows: &[&NewSample],
    on_conflict: &str,
) -> PgResult<HashMap<String, i64>> {
    let keys: Vec<&str> = rows.iter().map(|s| s.key.as_str()).collect();
    let times: Vec<&str> = rows.iter().map(|s| s.timestamp.as_str()).collect();
    let paths: Vec<&str> = rows.iter().map(|s| s.image_path.as_str()).collect();
    let hashes: Vec<Option<&str>> = rows.iter().map(|s| s.sha256.as_deref()).collect();
    let given: Vec<i64> = rows.iter().map(|s| s.label_given).collect();
    let truth: Vec<Option<i64>> = rows.iter().map(|s| s.label_true).collect();
    let sources: Vec<&str> = rows.iter().map(|s| s.source.as_str()).collect();
    let splits: Vec<&str> = rows.iter().map(|s| s.split.as_str()).collect();
    let statuses: Vec<&str> = rows.iter().map(|s| s.status.as_str()).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|s| s.status.reason()).collect();
    let sql = format!(
        "INSERT INTO samples (ikey, timestamp, image_path, sha256, label_given, \
         label_true, source, split, status, reject_reason) \
         SELECT k, t::timestamptz, p, h, g, tr, s, sp, st, r \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
         $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[]) \
         WITH ORDINALITY AS u(k, t, p, h, g, tr, s, sp, st, r, n) ORDER BY n \
         {on_conflict} RETURNING ikey, id"
    );
    let returned = tx.query(
        &sql,
        &[
            &keys, &times, &paths, &hashes, &given, &truth, &sources, &splits, &statuses, &reasons,
        ],
    )?;
    Ok(returned
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect())
}

fn run<T>(client: &mut Client, op: &mut impl FnMut(&mut Tx<'_>) -> PgResult<T>) -> PgResult<T> {
    let mut tx = client.transaction()?;
    let value = op(&mut tx)?;
    tx.commit()?;
    Ok(value)
}

/// A lost connection, a server shutting down or refusing connections for now, or a
/// serialisation failure or deadlock: worth another attempt.
fn is_transient(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
        }
        // No SQL state: an I/O error talking to the server.
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// The server's own message when there is one (with its detail), else the client's.
fn message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            text
        }
        None => e.to_string(),
    }
}

fn sample_from_row(r: &postgres::Row) -> std::result::Result<Sample, String> {
    let split: String = r.get(9);
    let status: String = r.get(10);
    Ok(Sample {
        id: r.get(0),
        key: r.get(1),
        timestamp: r.get(2),
        image_path: r.get(3),
        sha256: r.get(4),
        label_given: r.get(5),
        label_true: r.get(6),
        label_verified: r.get(7),
        source: r.get(8),
        split: Split::parse(&split).ok_or_else(|| format!("sample split {split:?}"))?,
        status: SampleStatus::from_columns(&status, r.get(11))
            .ok_or_else(|| format!("sample status {status:?}"))?,
    })
}

fn retrain_from_row(r: &postgres::Row) -> std::result::Result<Retrain, String> {
    let reasons: String = r.get(7);
    Ok(Retrain {
        id: r.get(0),
        started: r.get(1),
        finished: r.get(2),
        trigger: r.get(3),
        challenger: r.get(4),
        champion: r.get(5),
        decision: r.get(6),
        reasons: serde_json::from_str(&reasons).map_err(|e| format!("retrain reasons: {e}"))?,
        watermark: r.get(8),
    })
}

fn to_sql(p: &Param) -> &(dyn postgres::types::ToSql + Sync) {
    match p {
        Param::Int(v) => v,
        Param::Text(v) => v,
    }
}

impl Store for PgStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn schema_version(&mut self) -> Result<u32> {
        let v: i64 = self.transaction("reading the schema version", |tx| {
            Ok(tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version",
                    &[],
                )?
                .get(0))
        })?;
        Ok(v as u32)
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }

    fn classes(&mut self) -> Result<Vec<String>> {
        self.transaction("reading classes", |tx| {
            let rows = tx.query("SELECT name FROM classes ORDER BY idx", &[])?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn ensure_classes(&mut self, names: &[String]) -> Result<Vec<i64>> {
        self.transaction("adding classes", |tx| {
            // Two writers adding classes at once would both pick the next index.
            tx.batch_execute("LOCK TABLE classes IN EXCLUSIVE MODE")?;
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let found = tx.query_opt("SELECT idx FROM classes WHERE name = $1", &[name])?;
                let idx = match found {
                    Some(row) => row.get(0),
                    None => tx
                        .query_one(
                            "INSERT INTO classes (idx, name) \
                             SELECT COALESCE(MAX(idx) + 1, 0), $1 FROM classes RETURNING idx",
                            &[name],
                        )?
                        .get(0),
                };
                out.push(idx);
            }
            Ok(out)
        })
    }

    fn begin_bulk_load(&mut self) -> Result<bool> {
        let empty = self.transaction("starting a bulk load", |tx| {
            let empty: bool = tx
                .query_one("SELECT NOT EXISTS (SELECT 1 FROM samples)", &[])?
                .get(0);
            if empty {
                for (name, _) in DEFERRABLE_INDEXES {
                    tx.batch_execute(&format!("DROP INDEX IF EXISTS {name}"))?;
                }
            }
            Ok(empty)
        })?;
        // Only a load into an empty table takes a second connection; without one (the server
        // refused it) the load goes on one.
        self.bulk_lane = if empty {
            self.config.connect(NoTls).ok()
        } else {
            None
        };
        Ok(empty)
    }

    fn end_bulk_load(&mut self) -> Result<()> {
        if let (Some(mut lane), Some(client)) = (self.bulk_lane.take(), self.client.as_mut()) {
            // Side by side, one index on each connection, each without parallel workers (two
            // builds already take two cores; workers on top made them slower); whatever fails
            // here is built (or reported) by the checked pass below.
            let [(_, first), (_, second)] = DEFERRABLE_INDEXES;
            let serial = |create: &str| {
                format!(
                    "SET max_parallel_maintenance_workers = 0; {create}; \
                     RESET max_parallel_maintenance_workers"
                )
            };
            std::thread::scope(|scope| {
                scope.spawn(|| lane.batch_execute(&serial(second)));
                let _ = client.batch_execute(&serial(first));
            });
        }
        self.build_deferred_indexes()
    }

    fn insert_samples(&mut self, rows: &[NewSample]) -> Result<Vec<Option<i64>>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut inserted = HashMap::new();
        let mut rest: Vec<&NewSample> = rows.iter().collect();
        // A bulk load into an empty table: straight in on two connections. Anything in the
        // way (a key stored meanwhile, a lost connection) sends the batch the checked way.
        if let (Some(lane), Some(client), true) = (
            self.bulk_lane.as_mut(),
            self.client.as_mut(),
            rows.len() >= pg_copy::SPLIT_MIN_ROWS,
        ) {
            match pg_copy::copy_on_two(client, lane, &rest) {
                TwoLanes::Stored(ids) => inserted = ids,
                TwoLanes::FirstStored(n, ids) => {
                    inserted = ids;
                    rest.drain(..n);
                    self.bulk_lane = None;
                }
                TwoLanes::NotStored(e) => {
                    let conflict = e.as_ref().and_then(|e| e.code())
                        == Some(&postgres::error::SqlState::UNIQUE_VIOLATION);
                    self.stats.key_conflicts += u64::from(conflict);
                    if !conflict || lane.is_closed() {
                        self.bulk_lane = None;
                    }
                    if client.is_closed() {
                        self.client = None;
                    }
                }
            }
            if inserted.len() == rows.len() {
                return Ok(rows.iter().map(|s| inserted.remove(&s.key)).collect());
            }
        }
        let keys: Vec<&str> = rest.iter().map(|s| s.key.as_str()).collect();
        let (checked, conflicted) = self.transaction("inserting samples", |tx| {
            // The keys already stored are looked up first and the others copied in (`COPY`
            // takes the server about 60% of an `INSERT … SELECT FROM unnest`'s time, and
            // `ON CONFLICT` would add a speculative insertion per row). A writer that stores
            // one of the keys in between makes the copy fail on the unique key; the batch
            // then goes in with `INSERT … ON CONFLICT DO NOTHING`.
            tx.batch_execute(pg_copy::CLAIM_IDS)?;
            let stored: HashSet<String> = tx
                .query("SELECT ikey FROM samples WHERE ikey = ANY($1)", &[&keys])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut seen = HashSet::with_capacity(rest.len());
            let new: Vec<&NewSample> = rest
                .iter()
                .copied()
                .filter(|s| !stored.contains(&s.key) && seen.insert(s.key.as_str()))
                .collect();
            if new.is_empty() {
                return Ok((HashMap::new(), false));
            }
            let mut plain = tx.transaction()?;
            let conflicted = match pg_copy::copy_sample_rows(&mut plain, &new) {
                Ok(Some(ids)) => {
                    plain.commit()?;
                    return Ok((ids, false));
                }
                Ok(None) => false,
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => true,
                Err(e) => return Err(e),
            };
            plain.rollback()?;
            let ids = insert_sample_rows(tx, &new, "ON CONFLICT (ikey) DO NOTHING")?;
            Ok((ids, conflicted))
        })?;
        self.stats.key_conflicts += u64::from(conflicted);
        inserted.extend(checked);
        // A key repeated within the batch: its first row was inserted, the others not.
        Ok(rows.iter().map(|s| inserted.remove(&s.key)).collect())
    }

    fn samples(&mut self, filter: &SampleFilter, limit: usize) -> Result<Vec<Sample>> {
        let (clause, params) = filter_sql(filter, |i| format!("${i}"));
        let sql = format!(
            "SELECT {} FROM samples WHERE {clause} ORDER BY id LIMIT {}",
            sample_columns(),
            limit.min(i64::MAX as usize)
        );
        let rows = self.transaction("reading samples", |tx| {
            let bound: Vec<_> = params.iter().map(to_sql).collect();
            tx.query(&sql, &bound)
        })?;
        rows.iter()
            .map(|r| sample_from_row(r).map_err(|m| self.corrupt(m)))
            .collect()
    }

    fn count_samples(&mut self, filter: &SampleFilter) -> Result<u64> {
        let (clause, params) = filter_sql(filter, |i| format!("${i}"));
        let sql = format!("SELECT COUNT(*) FROM samples WHERE {clause}");
        let n: i64 = self.transaction("counting samples", |tx| {
            let bound: Vec<_> = params.iter().map(to_sql).collect();
            Ok(tx.query_one(&sql, &bound)?.get(0))
        })?;
        Ok(n as u64)
    }

    fn max_sample_id(&mut self) -> Result<i64> {
        // Concurrent writers commit their ids out of order: a lower id may still be on its way
        // when a higher one is visible. Every writer holds its lock on the table and its
        // transaction id before it draws ids (`pg_copy::CLAIM_IDS`), so the transactions
        // that may still add an id below the highest one seen are exactly the table's writers
        // open at that moment; the watermark is returned once they have ended.
        let (top, mut writers) = self.transaction("reading the last sample id", |tx| {
            let row = tx.query_one(
                "SELECT COALESCE((SELECT MAX(id) FROM samples), 0)::BIGINT, \
                 ARRAY(SELECT DISTINCT t.transactionid::TEXT FROM pg_locks r \
                       JOIN pg_locks t ON t.virtualtransaction = r.virtualtransaction \
                       WHERE r.locktype = 'relation' AND r.relation = 'samples'::regclass \
                       AND r.database = (SELECT oid FROM pg_database \
                                         WHERE datname = current_database()) \
                       AND r.mode = 'RowExclusiveLock' AND r.pid <> pg_backend_pid() \
                       AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock' \
                       AND t.granted)",
                &[],
            )?;
            Ok((row.get::<_, i64>(0), row.get::<_, Vec<String>>(1)))
        })?;
        let deadline = std::time::Instant::now() + WRITERS_WAIT;
        while !writers.is_empty() {
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Postgres {
                    location: self.location.clone(),
                    message: format!(
                        "reading the last sample id: {} transaction(s) writing samples (ids {}) \
                         still open after {} s; a cycle waits for them so that no sample is \
                         skipped, and the next one tries again",
                        writers.len(),
                        writers.join(", "),
                        WRITERS_WAIT.as_secs()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
            let open = writers.clone();
            writers = self.transaction("waiting for the samples' writers", |tx| {
                let rows = tx.query(
                    "SELECT transactionid::TEXT FROM pg_locks WHERE locktype = 'transactionid' \
                     AND mode = 'ExclusiveLock' AND granted AND transactionid::TEXT = ANY($1)",
                    &[&open],
                )?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })?;
        }
        Ok(top)
    }

    fn known_hashes(&mut self, hashes: &[String]) -> Result<HashSet<String>> {
        let hashes = hashes.to_vec();
        self.transaction("looking up hashes", |tx| {
            let rows = tx.query(
                "SELECT DISTINCT sha256 FROM samples WHERE sha256 = ANY($1)",
                &[&hashes],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn set_verified_label(&mut self, id: i64, label: i64) -> Result<bool> {
        let n = self.transaction("setting a verified label", |tx| {
            tx.execute(
                "UPDATE samples SET label_verified = $1 WHERE id = $2",
                &[&label, &id],
            )
        })?;
        Ok(n == 1)
    }

    fn record_flags(&mut self, retrain_id: i64, flags: &[Flag]) -> Result<()> {
        self.transaction("recording flagged samples", |tx| {
            tx.execute("DELETE FROM flags WHERE retrain_id = $1", &[&retrain_id])?;
            let stmt = tx.prepare(
                "INSERT INTO flags (retrain_id, sample_id, score, suggested) \
                 VALUES ($1, $2, $3, $4)",
            )?;
            for f in flags {
                tx.execute(&stmt, &[&retrain_id, &f.sample_id, &f.score, &f.suggested])?;
            }
            Ok(())
        })
    }

    fn flags(&mut self, retrain_id: Option<i64>) -> Result<Option<(i64, Vec<Flag>)>> {
        self.transaction("reading flagged samples", |tx| {
            let id: Option<i64> = match retrain_id {
                Some(id) => Some(id),
                None => tx
                    .query_one("SELECT MAX(retrain_id) FROM flags", &[])?
                    .get(0),
            };
            let Some(id) = id else { return Ok(None) };
            let rows = tx
                .query(
                    "SELECT sample_id, score, suggested FROM flags WHERE retrain_id = $1 \
                     ORDER BY score DESC, sample_id",
                    &[&id],
                )?
                .iter()
                .map(|r| Flag {
                    sample_id: r.get(0),
                    score: r.get(1),
                    suggested: r.get(2),
                })
                .collect();
            Ok(Some((id, rows)))
        })
    }

    fn insert_predictions(&mut self, rows: &[NewPrediction]) -> Result<Vec<i64>> {
        self.transaction("inserting predictions", |tx| {
            let stmt = tx.prepare(
                "INSERT INTO predictions (timestamp, sample_id, request_id, model, version, \
                 class, probability, latency_ms) \
                 VALUES ($1::text::timestamptz, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            )?;
            rows.iter()
                .map(|p| {
                    Ok(tx
                        .query_one(
                            &stmt,
                            &[
                                &p.timestamp,
                                &p.sample_id,
                                &p.request_id,
                                &p.model,
                                &p.version,
                                &p.class,
                                &p.probability,
                                &p.latency_ms,
                            ],
                        )?
                        .get(0))
                })
                .collect()
        })
    }

    fn predictions(&mut self, after_id: i64, limit: usize) -> Result<Vec<Prediction>> {
        self.read_predictions("WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit)
    }

    fn recent_predictions(&mut self, limit: usize) -> Result<Vec<Prediction>> {
        let mut rows =
            self.read_predictions("WHERE id > $1 ORDER BY id DESC LIMIT $2", 0, limit)?;
        rows.reverse();
        Ok(rows)
    }

    fn start_retrain(&mut self, retrain: &NewRetrain) -> Result<i64> {
        self.transaction("recording a retrain", |tx| {
            Ok(tx
                .query_one(
                    "INSERT INTO retrains (started, trigger, champion, decision) \
                     VALUES ($1::text::timestamptz, $2, $3, $4) RETURNING id",
                    &[
                        &retrain.started,
                        &retrain.trigger,
                        &retrain.champion,
                        &RUNNING,
                    ],
                )?
                .get(0))
        })
    }

    fn finish_retrain(
        &mut self,
        id: i64,
        outcome: &RetrainOutcome,
        offsets: &[(&str, i64)],
    ) -> Result<()> {
        let reasons = outcome.reasons.to_string();
        let updated = self.transaction("recording a retrain decision", |tx| {
            let n = tx.execute(
                "UPDATE retrains SET finished = $1::text::timestamptz, challenger = $2, \
                 champion = $3, decision = $4, reasons = $5::text::jsonb, watermark = $6 \
                 WHERE id = $7",
                &[
                    &outcome.finished,
                    &outcome.challenger,
                    &outcome.champion,
                    &outcome.decision,
                    &reasons,
                    &outcome.watermark,
                    &id,
                ],
            )?;
            if n != 1 {
                // Nothing was changed, and the offsets must not move without the decision.
                return Ok(false);
            }
            for (name, offset) in offsets {
                tx.execute(
                    "INSERT INTO consumer_offsets (name, \"offset\", updated) \
                     VALUES ($1, $2, now()) ON CONFLICT (name) DO UPDATE \
                     SET \"offset\" = excluded.\"offset\", updated = excluded.updated",
                    &[name, offset],
                )?;
            }
            Ok(true)
        })?;
        if updated {
            Ok(())
        } else {
            Err(self.corrupt(format!("no retrain with id {id}")))
        }
    }

    fn retrains(&mut self) -> Result<Vec<Retrain>> {
        let sql = format!("SELECT {} FROM retrains ORDER BY id", retrain_columns());
        let rows = self.transaction("reading retrains", |tx| tx.query(&sql, &[]))?;
        rows.iter()
            .map(|r| retrain_from_row(r).map_err(|m| self.corrupt(m)))
            .collect()
    }

    fn last_retrain(&mut self) -> Result<Option<Retrain>> {
        let sql = format!(
            "SELECT {} FROM retrains ORDER BY id DESC LIMIT 1",
            retrain_columns()
        );
        let row = self.transaction("reading the last retrain", |tx| tx.query_opt(&sql, &[]))?;
        row.map(|r| retrain_from_row(&r).map_err(|m| self.corrupt(m)))
            .transpose()
    }

    fn offset(&mut self, name: &str) -> Result<Option<i64>> {
        let row = self.transaction("reading an offset", |tx| {
            tx.query_opt(
                "SELECT \"offset\" FROM consumer_offsets WHERE name = $1",
                &[&name],
            )
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    fn set_offset(&mut self, name: &str, offset: i64) -> Result<()> {
        self.transaction("setting an offset", |tx| {
            tx.execute(
                "INSERT INTO consumer_offsets (name, \"offset\", updated) VALUES ($1, $2, now()) \
                 ON CONFLICT (name) DO UPDATE SET \"offset\" = excluded.\"offset\", \
                 updated = excluded.updated",
                &[&name, &offset],
            )
        })?;
        Ok(())
    }

    fn create_reference_view(&mut self, name: &str) -> Result<()> {
        super::check_identifier(name)?;
        let sql = format!(
            "CREATE OR REPLACE VIEW \"{name}\" AS SELECT id, timestamp, image_path, \
             label_given::integer AS target FROM samples WHERE status = 'accepted'"
        );
        self.transaction("creating the reference view", |tx| tx.batch_execute(&sql))
    }
}
