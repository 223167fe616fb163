//! The schema, as numbered migrations in the SQL of each back-end. A database records the
//! versions applied in `schema_version`; opening it applies the missing ones in one transaction.
//!
//! | table              | columns                                                              |
//! |--------------------|----------------------------------------------------------------------|
//! | `samples`          | id, ikey (unique), timestamp, image_path, sha256, label_given,       |
//! |                    | label_true, label_verified (v2), source, split, status, reject_reason|
//! | `predictions`      | id, timestamp, sample_id, request_id, model, version, class,         |
//! |                    | probability, latency_ms                                              |
//! | `retrains`         | id, started, finished, trigger, challenger, champion, decision,      |
//! |                    | reasons (JSON), watermark                                            |
//! | `consumer_offsets` | name (key), offset, updated                                          |
//! | `classes` (v2)     | idx (key), name (unique)                                             |
//! | `flags` (v4)       | retrain_id, sample_id (key together), score, suggested               |
//!
//! v3 gives `ikey` and `sha256` PostgreSQL's bytewise "C" collation (faster key lookups).

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 4;

/// One step of the schema.
pub(crate) struct Migration {
    pub version: u32,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Creates the version table (both back-ends accept this SQL).
pub(crate) const CREATE_VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied TEXT NOT NULL)";

/// The secondary indexes of `samples` (schema version 1 on; the same statement on both
/// back-ends) that a bulk load into an empty table builds at its end instead of row by row
/// ([`super::Store::begin_bulk_load`]): inserting 60 000 rows in random content-hash order
/// into a B-tree costs more than sorting them once.
pub(crate) const DEFERRABLE_INDEXES: [(&str, &str); 2] = [
    (
        "samples_sha256",
        "CREATE INDEX IF NOT EXISTS samples_sha256 ON samples (sha256)",
    ),
    (
        "samples_source_split",
        "CREATE INDEX IF NOT EXISTS samples_source_split ON samples (source, split)",
    ),
];

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: r#"
CREATE TABLE samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ikey TEXT NOT NULL UNIQUE,
    timestamp TEXT NOT NULL,
    image_path TEXT NOT NULL,
    sha256 TEXT,
    label_given INTEGER NOT NULL,
    label_true INTEGER,
    source TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'gate')),
    status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
    reject_reason TEXT,
    CHECK ((status = 'rejected') = (reject_reason IS NOT NULL))
);
CREATE INDEX samples_sha256 ON samples (sha256);
CREATE INDEX samples_source_split ON samples (source, split);
CREATE TABLE predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    sample_id INTEGER REFERENCES samples (id),
    request_id TEXT,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    class INTEGER NOT NULL,
    probability REAL NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE TABLE retrains (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL,
    finished TEXT,
    trigger TEXT NOT NULL,
    challenger TEXT,
    champion TEXT,
    decision TEXT NOT NULL,
    reasons TEXT NOT NULL DEFAULT '{}',
    watermark INTEGER
);
CREATE TABLE consumer_offsets (
    name TEXT PRIMARY KEY,
    "offset" INTEGER NOT NULL,
    updated TEXT NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE samples (
    id BIGSERIAL PRIMARY KEY,
    ikey TEXT NOT NULL UNIQUE,
    timestamp TIMESTAMPTZ NOT NULL,
    image_path TEXT NOT NULL,
    sha256 TEXT,
    label_given BIGINT NOT NULL,
    label_true BIGINT,
    source TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'gate')),
    status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
    reject_reason TEXT,
    CHECK ((status = 'rejected') = (reject_reason IS NOT NULL))
);
CREATE INDEX samples_sha256 ON samples (sha256);
CREATE INDEX samples_source_split ON samples (source, split);
CREATE TABLE predictions (
    id BIGSERIAL PRIMARY KEY,
    timestamp TIMESTAMPTZ NOT NULL,
    sample_id BIGINT REFERENCES samples (id),
    request_id TEXT,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    class BIGINT NOT NULL,
    probability DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL
);
CREATE TABLE retrains (
    id BIGSERIAL PRIMARY KEY,
    started TIMESTAMPTZ NOT NULL,
    finished TIMESTAMPTZ,
    trigger TEXT NOT NULL,
    challenger TEXT,
    champion TEXT,
    decision TEXT NOT NULL,
    reasons JSONB NOT NULL DEFAULT '{}',
    watermark BIGINT
);
CREATE TABLE consumer_offsets (
    name TEXT PRIMARY KEY,
    "offset" BIGINT NOT NULL,
    updated TIMESTAMPTZ NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        sqlite: r#"
CREATE TABLE classes (idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
ALTER TABLE samples ADD COLUMN label_verified INTEGER;
"#,
        postgres: r#"
CREATE TABLE classes (idx BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE);
ALTER TABLE samples ADD COLUMN label_verified BIGINT;
"#,
    },
    Migration {
        version: 3,
        // The content key and hash are opaque ASCII: byte order is right for them, and
        // PostgreSQL's "C" collation compares them without the locale (a quarter less server
        // time per inserted row). SQLite already compares text bytewise.
        sqlite: "",
        postgres: r#"
ALTER TABLE samples ALTER COLUMN ikey TYPE TEXT COLLATE "C", ALTER COLUMN sha256 TYPE TEXT COLLATE "C";
"#,
    },
    Migration {
        version: 4,
        // What a retrain cycle flagged as probably mislabelled, for the review page.
        sqlite: r#"
CREATE TABLE flags (
    retrain_id INTEGER NOT NULL REFERENCES retrains (id),
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    score REAL NOT NULL,
    suggested INTEGER,
    PRIMARY KEY (retrain_id, sample_id)
);
"#,
        postgres: r#"
CREATE TABLE flags (
    retrain_id BIGINT NOT NULL REFERENCES retrains (id),
    sample_id BIGINT NOT NULL REFERENCES samples (id),
    score DOUBLE PRECISION NOT NULL,
    suggested BIGINT,
    PRIMARY KEY (retrain_id, sample_id)
);
"#,
    },
];

/// A value bound to a filter's placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
}

/// The `WHERE` clause of a sample filter with numbered placeholders written by `placeholder`
/// (`?1` for SQLite, `$1` for PostgreSQL), and the values to bind, in order.
pub(crate) fn filter_sql(
    filter: &super::SampleFilter,
    placeholder: fn(usize) -> String,
) -> (String, Vec<Param>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    let mut bind = |clause: &str, value: Param, clauses: &mut Vec<String>| {
        params.push(value);
        clauses.push(clause.replace('?', &placeholder(params.len())));
    };
    bind("id > ?", Param::Int(filter.after_id), &mut clauses);
    if let Some(up_to) = filter.up_to_id {
        bind("id <= ?", Param::Int(up_to), &mut clauses);
    }
    if let Some(source) = &filter.source {
        bind("source = ?", Param::Text(source.clone()), &mut clauses);
    }
    if let Some(split) = filter.split {
        bind(
            "split = ?",
            Param::Text(split.as_str().into()),
            &mut clauses,
        );
    }
    if let Some(accepted) = filter.accepted {
        let status = if accepted { "accepted" } else { "rejected" };
        bind("status = ?", Param::Text(status.into()), &mut clauses);
    }
    if filter.trusted {
        clauses.push("(label_true IS NOT NULL OR label_verified IS NOT NULL)".into());
    }
    if filter.verified {
        clauses.push("label_verified IS NOT NULL".into());
    }
    (clauses.join(" AND "), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_bind_every_value() {
        let f = super::super::SampleFilter {
            after_id: 7,
            source: Some("x'; drop table samples; --".into()),
            ..super::super::SampleFilter::gate(None)
        };
        let (sql, params) = filter_sql(&f, |i| format!("${i}"));
        assert_eq!(
            sql,
            "id > $1 AND source = $2 AND split = $3 AND status = $4 AND \
             (label_true IS NOT NULL OR label_verified IS NOT NULL)"
        );
        assert_eq!(params.len(), 4);
        assert_eq!(params[0], Param::Int(7));
    }

    #[test]
    fn migrations_are_numbered_from_one_to_the_version() {
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    }
}
