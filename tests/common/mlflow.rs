//! A throwaway MLflow tracking server for the tests: the real `mlflow server` from the venv that
//! `scripts/setup-mlflow.sh` makes (PyPI `mlflow`, pinned), with a SQLite backend store and a
//! local artifacts folder in a temporary folder, `--serve-artifacts`, on 127.0.0.1 and a free
//! port; stopped (its whole process group) and removed on drop. A missing venv fails the test
//! with what to run: CI must run these tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv holding `mlflow`: `BCCP_MLFLOW_VENV`, else `$TMPDIR/bccp-mlflow-venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("BCCP_MLFLOW_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("bccp-mlflow-venv"))
}

/// The venv's Python (with the `mlflow` client).
pub fn python() -> PathBuf {
    let py = venv().join("bin/python");
    assert!(
        venv().join("bin/mlflow").is_file(),
        "no `mlflow` in {}: run scripts/setup-mlflow.sh (scripts/test.sh does) or set \
         BCCP_MLFLOW_VENV; the MLflow tests do not skip",
        venv().display()
    );
    py
}

/// A running server.
pub struct MlflowServer {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
    /// Environment of the server and of [`MlflowServer::python`] (the S3 stand-in's).
    env: Vec<(&'static str, String)>,
}

impl MlflowServer {
    /// Starts a server whose artifacts go through its proxy to a local folder.
    pub fn start() -> Self {
        Self::launch(None, Vec::new())
    }

    /// Starts a server whose default artifact root is `root` (`s3://…`), not proxied: clients
    /// write there themselves, with `env` (the S3 endpoint and credentials).
    pub fn start_s3(root: &str, env: Vec<(&'static str, String)>) -> Self {
        Self::launch(Some(root), env)
    }

    /// Starts a server and waits for its `/health`; panics with its log if it does not come up.
    fn launch(s3_root: Option<&str>, mut env: Vec<(&'static str, String)>) -> Self {
        if let Some((_, endpoint)) = env.iter().find(|(k, _)| *k == "AWS_ENDPOINT_URL") {
            env.push(("MLFLOW_S3_ENDPOINT_URL", endpoint.clone()));
        }
        let py = python();
        let dir = tempfile::Builder::new()
            .prefix("bccp-mlflow")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let store = format!("sqlite:///{}", dir.path().join("mlflow.db").display());
        let artifacts = dir.path().join("artifacts");
        let mut cmd = Command::new(&py);
        cmd.args(["-m", "mlflow", "server", "--backend-store-uri", &store]);
        match s3_root {
            None => cmd
                .arg("--artifacts-destination")
                .arg(&artifacts)
                .arg("--serve-artifacts"),
            Some(root) => cmd.args(["--default-artifact-root", root, "--no-serve-artifacts"]),
        };
        cmd.args(["--host", "127.0.0.1", "--workers", "1"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", py.display()));
        let mut server = Self {
            dir,
            child,
            port,
            env,
        };
        let started = Instant::now();
        loop {
            if ureq::get(&format!("{}/health", server.uri()))
                .timeout(Duration::from_secs(2))
                .call()
                .is_ok()
            {
                return server;
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || started.elapsed() > Duration::from_secs(120) {
                panic!(
                    "mlflow server did not come up ({exited:?}); log:\n{}",
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Its URI.
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Runs a Python snippet with MLflow's own client (`argv[1]` is the server's URI, then
    /// `args`) and parses the JSON it prints last.
    pub fn python(&self, code: &str, args: &[&str]) -> serde_json::Value {
        let mut python = Command::new(python());
        python
            .arg("-c")
            .arg(code)
            .arg(self.uri())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        super::process::python_json(python)
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        // The server and its gunicorn workers share the process group the child leads.
        super::process::stop_group(&mut self.child);
    }
}
