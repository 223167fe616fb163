//! The `--db` flag: `sqlite:PATH` or `postgres://…`, parsed once into a [`DbUrl`].

use std::path::PathBuf;
use std::str::FromStr;

use super::error::{Result, StoreError};

/// Where the store is.
#[derive(Debug, Clone)]
pub enum DbUrl {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection (the URL as given, validated).
    Postgres(PgUrl),
}

/// A validated PostgreSQL URL.
#[derive(Debug, Clone)]
pub struct PgUrl {
    /// The URL as given (may hold a password; never printed).
    pub url: String,
    /// `postgres://user@host:port/db` without the password, for messages.
    pub display: String,
}

impl DbUrl {
    /// Parses a `--db` value.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |message: &str| StoreError::BadUrl {
            url: redact(text),
            message: message.into(),
        };
        if let Some(rest) = text.strip_prefix("sqlite:") {
            // `sqlite:///abs/path` and `sqlite://rel` as in other tools' URLs.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("the SQLite file path is empty"));
            }
            return Ok(DbUrl::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let config = ::postgres::Config::from_str(text).map_err(|e| bad(&e.to_string()))?;
            if config.get_hosts().is_empty() {
                return Err(bad("no host"));
            }
            let display = display_pg(&config);
            return Ok(DbUrl::Postgres(PgUrl {
                url: text.to_owned(),
                display,
            }));
        }
        if text.contains("://") {
            return Err(bad("unknown scheme"));
        }
        Err(bad("not a URL (a file is written sqlite:PATH)"))
    }

    /// The default store: the SQLite file under the per-user data folder.
    pub fn default_sqlite() -> Self {
        DbUrl::Sqlite(crate::paths::store_file())
    }

    /// The store for messages, without a password.
    pub fn display(&self) -> String {
        match self {
            DbUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            DbUrl::Postgres(pg) => pg.display.clone(),
        }
    }
}

impl FromStr for DbUrl {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// `postgres://user@host:port/db` of a configuration.
pub(crate) fn display_pg(config: &::postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(::postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(::postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config
        .get_ports()
        .first()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{host}{port}/{db}")
}

/// A URL with any `:password@` replaced by `:***@`, for error messages.
fn redact(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &text[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_forms() {
        for (text, path) in [
            ("sqlite:/tmp/a.db", "/tmp/a.db"),
            ("sqlite:rel/a.db", "rel/a.db"),
            ("sqlite:///tmp/a.db", "/tmp/a.db"),
        ] {
            match DbUrl::parse(text).unwrap() {
                DbUrl::Sqlite(p) => assert_eq!(p, PathBuf::from(path)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn postgres_forms_hide_the_password() {
        let url = DbUrl::parse("postgres://me:secret@db.example:5433/bccp").unwrap();
        assert_eq!(url.display(), "postgres://me@db.example:5433/bccp");
        assert!(DbUrl::parse("postgresql://me@localhost/x").is_ok());
        let err = DbUrl::parse("postgres://me:secret@host:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(err.contains("me:***@host"), "{err}");
    }

    #[test]
    fn errors_name_the_flag_and_the_valid_forms() {
        for (text, why) in [
            ("sqlite:", "path is empty"),
            ("mysql://x/y", "unknown scheme"),
            ("/tmp/a.db", "not a URL"),
        ] {
            let err = DbUrl::parse(text).unwrap_err().to_string();
            assert!(err.starts_with("invalid --db"), "{err}");
            assert!(err.contains(why), "{err}");
            assert!(
                err.contains("sqlite:PATH") && err.contains("postgres://"),
                "{err}"
            );
        }
    }
}
