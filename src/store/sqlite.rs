//! The embedded back-end: one SQLite file in WAL mode (readers never wait for the writer),
//! `synchronous = FULL` (a committed row survives a power loss), a busy timeout, and every
//! transaction retried with back-off while another connection holds the write lock.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};

use super::error::{Result, StoreError};
use super::retry::{Backoff, RETRY_WINDOW};
use super::schema::{
    filter_sql, Param, CREATE_VERSION_TABLE, DEFERRABLE_INDEXES, MIGRATIONS, SCHEMA_VERSION,
};
use super::{
    Flag, NewPrediction, NewRetrain, NewSample, Prediction, Retrain, RetrainOutcome, Sample,
    SampleFilter, SampleStatus, Split, Store, StoreStats, RUNNING,
};

/// How long SQLite itself waits for a lock before reporting `SQLITE_BUSY` (then the
/// transaction is retried with back-off, up to [`RETRY_WINDOW`]).
pub(crate) const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    location: String,
    stats: StoreStats,
}

const SAMPLE_COLUMNS: &str = "id, ikey, timestamp, image_path, sha256, label_given, label_true, \
     label_verified, source, split, status, reject_reason";

const RETRAIN_COLUMNS: &str =
    "id, started, finished, trigger, challenger, champion, decision, reasons, watermark";

impl SqliteStore {
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
            "SELECT id, timestamp, sample_id, request_id, model, version, class, \
             probability, latency_ms FROM predictions {tail}"
        );
        self.transaction("reading predictions", false, |tx| {
            let mut stmt = tx.prepare(&sql)?;
            let rows = stmt.query_map(params![after_id, limit], |r| {
                Ok(Prediction {
                    id: r.get(0)?,
                    prediction: NewPrediction {
                        timestamp: r.get(1)?,
                        sample_id: r.get(2)?,
                        request_id: r.get(3)?,
                        model: r.get(4)?,
                        version: r.get(5)?,
                        class: r.get(6)?,
                        probability: r.get(7)?,
                        latency_ms: r.get(8)?,
                    },
                })
            })?;
            rows.collect()
        })
    }

    /// Opens (creating the file and its folder as needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, DEFAULT_BUSY_TIMEOUT, SCHEMA_VERSION)
    }

    /// [`open`](Self::open) with SQLite's busy timeout and the schema version to migrate to.
    pub fn open_with(path: &Path, busy_timeout: Duration, version: u32) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        }
        let err = |error| StoreError::Sqlite {
            path: path.to_path_buf(),
            error,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(busy_timeout).map_err(err)?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
            location: format!("sqlite:{}", path.display()),
            stats: StoreStats::default(),
        };
        // Switching to WAL needs the write lock too: retried like any write.
        let mode: String = store.retrying("setting WAL mode", |conn| {
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                location: store.location.clone(),
                message: format!("cannot switch to WAL mode (journal mode stays {mode})"),
            });
        }
        store
            .conn
            .execute_batch(
                "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -32768;",
            )
            .map_err(err)?;
        store.migrate(version)?;
        if version >= 1 {
            store.build_deferred_indexes()?;
        }
        Ok(store)
    }

    /// Builds the indexes of [`DEFERRABLE_INDEXES`] that are missing (a bulk load's, or one a
    /// crash interrupted). Reads first, so a store with every index takes no write lock.
    fn build_deferred_indexes(&mut self) -> Result<()> {
        let present = self.transaction("listing the indexes", false, |tx| {
            let mut stmt = tx.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'samples'",
            )?;
            let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
            names.collect::<rusqlite::Result<HashSet<String>>>()
        })?;
        if DEFERRABLE_INDEXES
            .iter()
            .all(|(name, _)| present.contains(*name))
        {
            return Ok(());
        }
        self.transaction("building the samples indexes", true, |tx| {
            DEFERRABLE_INDEXES
                .iter()
                .try_for_each(|(_, create)| tx.execute_batch(create))
        })
    }

    fn error(&self, error: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            error,
        }
    }

    /// Runs `op` on the connection, retrying while the database is busy or locked.
    fn retrying<T>(
        &mut self,
        what: &'static str,
        mut op: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut backoff = Backoff::new(RETRY_WINDOW);
        loop {
            match op(&mut self.conn) {
                Ok(value) => return Ok(value),
                Err(e) if is_busy(&e) => {
                    if !backoff.wait() {
                        return Err(StoreError::GaveUp {
                            location: self.location.clone(),
                            what,
                            attempts: backoff.attempts(),
                            seconds: backoff.seconds(),
                            last: e.to_string(),
                        });
                    }
                    self.stats.retries += 1;
                }
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    /// Runs `op` in a transaction (`BEGIN IMMEDIATE` for writes, so a writer takes the lock
    /// up front instead of failing half-way), committed at the end, retried while busy.
    fn transaction<T>(
        &mut self,
        what: &'static str,
        write: bool,
        mut op: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let behavior = if write {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        };
        self.retrying(what, |conn| {
            let tx = conn.transaction_with_behavior(behavior)?;
            let value = op(&tx)?;
            tx.commit()?;
            Ok(value)
        })
    }

    fn migrate(&mut self, target: u32) -> Result<()> {
        let location = self.location.clone();
        let found = self.transaction("migrating the schema", true, |tx| {
            tx.execute_batch(CREATE_VERSION_TABLE)?;
            let current: i64 = tx.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )?;
            let current = current as u32;
            if current > SCHEMA_VERSION {
                return Ok(current);
            }
            for m in MIGRATIONS
                .iter()
                .filter(|m| m.version > current && m.version <= target)
            {
                tx.execute_batch(m.sqlite)?;
                tx.execute(
                    "INSERT INTO schema_version (version, applied) VALUES (?1, ?2)",
                    params![i64::from(m.version), super::now_utc()],
                )?;
            }
            Ok(current)
        })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                location,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(())
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn bad_column(index: usize, message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, message.into())
}

fn sample_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sample> {
    let split: String = r.get(9)?;
    let status: String = r.get(10)?;
    Ok(Sample {
        id: r.get(0)?,
        key: r.get(1)?,
        timestamp: r.get(2)?,
        image_path: r.get(3)?,
        sha256: r.get(4)?,
        label_given: r.get(5)?,
        label_true: r.get(6)?,
        label_verified: r.get(7)?,
        source: r.get(8)?,
        split: Split::parse(&split).ok_or_else(|| bad_column(9, format!("split {split:?}")))?,
        status: SampleStatus::from_columns(&status, r.get(11)?)
            .ok_or_else(|| bad_column(10, format!("status {status:?}")))?,
    })
}

fn retrain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Retrain> {
    let reasons: String = r.get(7)?;
    Ok(Retrain {
        id: r.get(0)?,
        started: r.get(1)?,
        finished: r.get(2)?,
        trigger: r.get(3)?,
        challenger: r.get(4)?,
        champion: r.get(5)?,
        decision: r.get(6)?,
        reasons: serde_json::from_str(&reasons)
            .map_err(|e| bad_column(7, format!("reasons: {e}")))?,
        watermark: r.get(8)?,
    })
}

fn to_sql(p: &Param) -> &dyn rusqlite::ToSql {
    match p {
        Param::Int(v) => v,
        Param::Text(v) => v,
    }
}

impl Store for SqliteStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn schema_version(&mut self) -> Result<u32> {
        let v: i64 = self.transaction("reading the schema version", false, |tx| {
            tx.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
        })?;
        Ok(v as u32)
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }

    fn classes(&mut self) -> Result<Vec<String>> {
        self.transaction("reading classes", false, |tx| {
            let mut stmt = tx.prepare("SELECT name FROM classes ORDER BY idx")?;
            let names = stmt.query_map([], |r| r.get(0))?;
            names.collect()
        })
    }

    fn ensure_classes(&mut self, names: &[String]) -> Result<Vec<i64>> {
        self.transaction("adding classes", true, |tx| {
            let mut find = tx.prepare("SELECT idx FROM classes WHERE name = ?1")?;
            let mut add = tx.prepare(
                "INSERT INTO classes (idx, name) \
                 SELECT COALESCE(MAX(idx) + 1, 0), ?1 FROM classes RETURNING idx",
            )?;
            names
                .iter()
                .map(
                    |name| match find.query_row([name], |r| r.get(0)).optional()? {
                        Some(idx) => Ok(idx),
                        None => add.query_row([name], |r| r.get(0)),
                    },
                )
                .collect()
        })
    }

    fn begin_bulk_load(&mut self) -> Result<bool> {
        self.transaction("starting a bulk load", true, |tx| {
            let empty: bool =
                tx.query_row("SELECT NOT EXISTS (SELECT 1 FROM samples)", [], |r| {
                    r.get(0)
                })?;
            if empty {
                for (name, _) in DEFERRABLE_INDEXES {
                    tx.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
                }
            }
            Ok(empty)
        })
    }

    fn end_bulk_load(&mut self) -> Result<()> {
        self.build_deferred_indexes()
    }

    fn insert_samples(&mut self, rows: &[NewSample]) -> Result<Vec<Option<i64>>> {
        self.transaction("inserting samples", true, |tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO samples (ikey, timestamp, image_path, sha256, label_given, \
                 label_true, source, split, status, reject_reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (ikey) DO NOTHING",
            )?;
            rows.iter()
                .map(|s| {
                    let changed = stmt.execute(params![
                        s.key,
                        s.timestamp,
                        s.image_path,
                        s.sha256,
                        s.label_given,
                        s.label_true,
                        s.source,
                        s.split.as_str(),
                        s.status.as_str(),
                        s.status.reason(),
                    ])?;
                    // One row inserted, or none on a key already stored.
                    Ok((changed == 1).then(|| tx.last_insert_rowid()))
                })
                .collect()
        })
    }

    fn samples(&mut self, filter: &SampleFilter, limit: usize) -> Result<Vec<Sample>> {
        let (clause, params) = filter_sql(filter, |i| format!("?{i}"));
        let sql = format!(
            "SELECT {SAMPLE_COLUMNS} FROM samples WHERE {clause} ORDER BY id LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        self.transaction("reading samples", false, |tx| {
            let mut stmt = tx.prepare(&sql)?;
            let bound: Vec<&dyn rusqlite::ToSql> = params.iter().map(to_sql).collect();
            let rows = stmt.query_map(bound.as_slice(), sample_from_row)?;
            rows.collect()
        })
    }

    fn count_samples(&mut self, filter: &SampleFilter) -> Result<u64> {
        let (clause, params) = filter_sql(filter, |i| format!("?{i}"));
        let sql = format!("SELECT COUNT(*) FROM samples WHERE {clause}");
        let n: i64 = self.transaction("counting samples", false, |tx| {
            let bound: Vec<&dyn rusqlite::ToSql> = params.iter().map(to_sql).collect();
            tx.query_row(&sql, bound.as_slice(), |r| r.get(0))
        })?;
        Ok(n as u64)
    }

    fn max_sample_id(&mut self) -> Result<i64> {
        self.transaction("reading the last sample id", false, |tx| {
            tx.query_row("SELECT COALESCE(MAX(id), 0) FROM samples", [], |r| r.get(0))
        })
    }

    fn known_hashes(&mut self, hashes: &[String]) -> Result<HashSet<String>> {
        self.transaction("looking up hashes", false, |tx| {
            // One statement over the whole list: with the content-hash index a look-up per
            // hash, without it (a bulk load defers it) one pass over the table, not one per
            // hash.
            let list = serde_json::to_string(hashes)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let mut stmt = tx.prepare_cached(
                "SELECT DISTINCT sha256 FROM samples \
                 WHERE sha256 IN (SELECT value FROM json_each(?1))",
            )?;
            let known = stmt
                .query_map([list], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<HashSet<String>>>()?;
            Ok(known)
        })
    }

    fn set_verified_label(&mut self, id: i64, label: i64) -> Result<bool> {
        let n = self.transaction("setting a verified label", true, |tx| {
            tx.execute(
                "UPDATE samples SET label_verified = ?1 WHERE id = ?2",
                params![label, id],
            )
        })?;
        Ok(n == 1)
    }

    fn record_flags(&mut self, retrain_id: i64, flags: &[Flag]) -> Result<()> {
        self.transaction("recording flagged samples", true, |tx| {
            tx.execute(
                "DELETE FROM flags WHERE retrain_id = ?1",
                params![retrain_id],
            )?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO flags (retrain_id, sample_id, score, suggested) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for f in flags {
                stmt.execute(params![retrain_id, f.sample_id, f.score, f.suggested])?;
            }
            Ok(())
        })
    }

    fn flags(&mut self, retrain_id: Option<i64>) -> Result<Option<(i64, Vec<Flag>)>> {
        self.transaction("reading flagged samples", false, |tx| {
            let id: Option<i64> = match retrain_id {
                Some(id) => Some(id),
                None => tx.query_row("SELECT MAX(retrain_id) FROM flags", [], |r| r.get(0))?,
            };
            let Some(id) = id else { return Ok(None) };
            let mut stmt = tx.prepare_cached(
                "SELECT sample_id, score, suggested FROM flags WHERE retrain_id = ?1 \
                 ORDER BY score DESC, sample_id",
            )?;
            let rows = stmt
                .query_map(params![id], |r| {
                    Ok(Flag {
                        sample_id: r.get(0)?,
                        score: r.get(1)?,
                        suggested: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((id, rows)))
        })
    }

    fn insert_predictions(&mut self, rows: &[NewPrediction]) -> Result<Vec<i64>> {
        self.transaction("inserting predictions", true, |tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO predictions (timestamp, sample_id, request_id, model, version, \
                 class, probability, latency_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 RETURNING id",
            )?;
            rows.iter()
                .map(|p| {
                    stmt.query_row(
                        params![
                            p.timestamp,
                            p.sample_id,
                            p.request_id,
                            p.model,
                            p.version,
                            p.class,
                            p.probability,
                            p.latency_ms
                        ],
                        |r| r.get(0),
                    )
                })
                .collect()
        })
    }

    fn predictions(&mut self, after_id: i64, limit: usize) -> Result<Vec<Prediction>> {
        self.read_predictions("WHERE id > ?1 ORDER BY id LIMIT ?2", after_id, limit)
    }

    fn recent_predictions(&mut self, limit: usize) -> Result<Vec<Prediction>> {
        let mut rows =
            self.read_predictions("WHERE id > ?1 ORDER BY id DESC LIMIT ?2", 0, limit)?;
        rows.reverse();
        Ok(rows)
    }

    fn start_retrain(&mut self, retrain: &NewRetrain) -> Result<i64> {
        self.transaction("recording a retrain", true, |tx| {
            tx.query_row(
                "INSERT INTO retrains (started, trigger, champion, decision) \
                 VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![retrain.started, retrain.trigger, retrain.champion, RUNNING],
                |r| r.get(0),
            )
        })
    }

    fn finish_retrain(
        &mut self,
        id: i64,
        outcome: &RetrainOutcome,
        offsets: &[(&str, i64)],
    ) -> Result<()> {
        let reasons = outcome.reasons.to_string();
        let location = self.location.clone();
        let updated = self.transaction("recording a retrain decision", true, |tx| {
            let n = tx.execute(
                "UPDATE retrains SET finished = ?1, challenger = ?2, champion = ?3, \
                 decision = ?4, reasons = ?5, watermark = ?6 WHERE id = ?7",
                params![
                    outcome.finished,
                    outcome.challenger,
                    outcome.champion,
                    outcome.decision,
                    reasons,
                    outcome.watermark,
                    id
                ],
            )?;
            if n != 1 {
                // Nothing to commit: the offsets must not move without the decision.
                return Ok(false);
            }
            let now = super::now_utc();
            for (name, offset) in offsets {
                tx.execute(
                    "INSERT INTO consumer_offsets (name, \"offset\", updated) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET \"offset\" = excluded.\"offset\", \
                     updated = excluded.updated",
                    params![name, offset, now],
                )?;
            }
            Ok(true)
        });
        match updated? {
            true => Ok(()),
            false => Err(StoreError::Corrupt {
                location,
                message: format!("no retrain with id {id}"),
            }),
        }
    }

    fn retrains(&mut self) -> Result<Vec<Retrain>> {
        self.transaction("reading retrains", false, |tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT {RETRAIN_COLUMNS} FROM retrains ORDER BY id"
            ))?;
            let rows = stmt.query_map([], retrain_from_row)?;
            rows.collect()
        })
    }

    fn last_retrain(&mut self) -> Result<Option<Retrain>> {
        self.transaction("reading the last retrain", false, |tx| {
            tx.query_row(
                &format!("SELECT {RETRAIN_COLUMNS} FROM retrains ORDER BY id DESC LIMIT 1"),
                [],
                retrain_from_row,
            )
            .optional()
        })
    }

    fn offset(&mut self, name: &str) -> Result<Option<i64>> {
        self.transaction("reading an offset", false, |tx| {
            tx.query_row(
                "SELECT \"offset\" FROM consumer_offsets WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn set_offset(&mut self, name: &str, offset: i64) -> Result<()> {
        self.transaction("setting an offset", true, |tx| {
            tx.execute(
                "INSERT INTO consumer_offsets (name, \"offset\", updated) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET \"offset\" = excluded.\"offset\", \
                 updated = excluded.updated",
                params![name, offset, super::now_utc()],
            )
        })?;
        Ok(())
    }

    fn create_reference_view(&mut self, name: &str) -> Result<()> {
        super::check_identifier(name)?;
        // SQLite has no CREATE OR REPLACE VIEW.
        let sql = format!(
            "DROP VIEW IF EXISTS \"{name}\"; \
             CREATE VIEW \"{name}\" AS SELECT id, timestamp, image_path, label_given AS target \
             FROM samples WHERE status = 'accepted';"
        );
        self.transaction("creating the reference view", true, |tx| {
            tx.execute_batch(&sql)
        })
    }
}
