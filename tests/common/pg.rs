//! A throwaway PostgreSQL server for the tests: `initdb` in a temporary folder, `pg_ctl start`
//! on 127.0.0.1 with a free port (and its unix socket in the same folder), stopped and removed
//! on drop. As root, the server runs as the `postgres` user (PostgreSQL refuses to run as
//! root). Missing binaries fail the test with what to install: CI must run these tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running server; `postgres` is its superuser, trusted without a password.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

/// The folder holding `initdb` and `pg_ctl`: `PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian), else the `PATH`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in PG_BIN, \
             /usr/lib/postgresql/*/bin or PATH: install Debian's `postgresql` package \
             (scripts/test.sh does: apt-get install -y postgresql) or set PG_BIN; the \
             PostgreSQL tests do not skip"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Initialises and starts a server; panics with the server's log if it cannot.
    pub fn start() -> Self {
        let bin = pg_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("bccp-pg")
            .tempdir()
            .unwrap();
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "chown postgres {} failed: as root the tests run PostgreSQL as the `postgres` \
                 user, which the `postgresql` package creates",
                dir.path().display()
            );
        }
        let mut server = Self {
            dir,
            bin,
            as_postgres,
            port: 0,
        };
        let data = server.data();
        server.run_ok(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // A free port can be taken by another process between the check and the start: try a
        // few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c full_page_writes=off -c max_connections=50",
                server.dir.path().display()
            );
            let log = server.dir.path().join("log");
            let out = server.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if out.status.success() {
                server.port = port;
                return server;
            }
            last = format!(
                "{}{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("pg_ctl start failed 5 times: {last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    fn run_ok(&self, tool: &str, args: &[&str]) {
        let out = self.run(tool, args);
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A client of database `db`.
    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url(db)))
    }

    /// Creates database `name` and returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
        self.url(name)
    }

    /// The server's folder (data and socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

/// The two back-ends, for running one behavioural test body against each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An empty store of either back-end: an SQLite file in a temporary folder, or a database on
/// a throwaway server.
pub struct TestDb {
    pub backend: Backend,
    /// The `--db` value.
    pub url: String,
    pub dir: tempfile::TempDir,
    pub server: Option<PgServer>,
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                backend,
                url: format!("sqlite:{}", dir.path().join("store.sqlite3").display()),
                dir,
                server: None,
            },
            Backend::Postgres => {
                let server = PgServer::start();
                let url = server.create_db("bccp_test");
                Self {
                    backend,
                    url,
                    dir,
                    server: Some(server),
                }
            }
        }
    }

    /// Another empty store of the same back-end (`name`: a file or database name).
    pub fn another(&self, name: &str) -> String {
        match &self.server {
            None => format!("sqlite:{}", self.dir.path().join(name).display()),
            Some(server) => server.create_db(name),
        }
    }

    /// Opens the store.
    pub fn open(&self) -> Box<dyn bccp::store::Store> {
        open(&self.url)
    }
}

/// Opens the store at `url`.
pub fn open(url: &str) -> Box<dyn bccp::store::Store> {
    let url = bccp::store::DbUrl::parse(url).unwrap();
    bccp::store::open(&url).unwrap_or_else(|e| panic!("open {}: {e}", url.display()))
}

/// Defines `NAME::sqlite` and `NAME::postgres` tests that run the body `NAME(&TestDb)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(&$crate::common::pg::TestDb::new($crate::common::pg::Backend::Sqlite));
            }
            #[test]
            fn postgres() {
                super::$name(&$crate::common::pg::TestDb::new($crate::common::pg::Backend::Postgres));
            }
        }
    )*};
}
