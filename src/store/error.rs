//! Errors of the data store; each names the database (path or `postgres://user@host/db`).

use std::path::PathBuf;

/// What can go wrong opening, migrating, reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid --db {url:?}: {message}; expected sqlite:PATH (e.g. sqlite:/data/bccp.sqlite3) \
         or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    BadUrl { url: String, message: String },
    /// A SQLite error; the error is in the message (not a `source`, so a chain printer shows it
    /// once).
    #[error("SQLite database {path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("PostgreSQL database {location}: {message}")]
    Postgres { location: String, message: String },
    #[error("{location}: {what} failed after {attempts} attempts over {seconds:.1} s ({last})")]
    GaveUp {
        location: String,
        what: &'static str,
        attempts: u32,
        seconds: f64,
        last: String,
    },
    #[error(
        "database {location} has schema version {found}, newer than this bccp understands \
         ({supported}); use a newer bccp"
    )]
    NewerSchema {
        location: String,
        found: u32,
        supported: u32,
    },
    #[error("database {location}: {message}")]
    Corrupt { location: String, message: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid {name} {value:?}: {expected}")]
    InvalidValue {
        name: &'static str,
        value: String,
        expected: String,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

impl StoreError {
    /// An invalid option value.
    pub fn invalid(name: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        Self::InvalidValue {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
