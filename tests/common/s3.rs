//! A throwaway S3 stand-in for the tests: PyPI `moto[server]`'s `moto_server` from the venv that
//! `scripts/setup-mlflow.sh` makes (pinned), on 127.0.0.1 and a free port, with a small minimum
//! part size (4 KiB) so a small model file goes up in parts; stopped (its process group) on
//! drop. A missing `moto_server` fails the test with what to run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::mlflow::venv;

/// The access key the tests use (moto accepts any unless told to check).
pub const KEY: &str = "bccp-test-key";
pub const SECRET: &str = "bccp-test-secret";
pub const REGION: &str = "us-east-1";
/// The part size the tests give bccp and the minimum moto accepts.
pub const PART_SIZE: usize = 4096;

/// A running `moto_server`.
pub struct MotoServer {
    child: Child,
    log: tempfile::NamedTempFile,
    pub port: u16,
}

impl MotoServer {
    /// Starts `moto_server` and waits until it answers.
    pub fn start() -> Self {
        let bin = venv().join("bin/moto_server");
        assert!(
            bin.is_file(),
            "no moto_server in {}: run scripts/setup-mlflow.sh (scripts/test.sh does) or set \
             BCCP_MLFLOW_VENV; the S3 tests do not skip",
            venv().display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("S3_UPLOAD_PART_MIN_SIZE", PART_SIZE.to_string())
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap();
        let mut server = Self { child, log, port };
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && ureq::get(&server.endpoint())
                    .timeout(Duration::from_secs(2))
                    .call()
                    .is_ok()
            {
                return server;
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || started.elapsed() > Duration::from_secs(60) {
                panic!(
                    "moto_server did not come up ({exited:?}); log:\n{}",
                    std::fs::read_to_string(server.log.path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS environment bccp and boto3 read: endpoint, region, credentials, part size.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_owned()),
            ("BCCP_S3_PART_SIZE", PART_SIZE.to_string()),
        ]
    }

    /// Runs a Python snippet with boto3 (`s3` is a client of this server; `argv[1:]` are
    /// `args`) and parses the JSON it prints last.
    pub fn python(&self, code: &str, args: &[&str]) -> serde_json::Value {
        let prelude = "import boto3, json, sys\ns3 = boto3.client('s3')\n";
        let out = Command::new(super::mlflow::python())
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .args(args)
            .envs(self.env())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        self.python(
            "s3.create_bucket(Bucket=sys.argv[1])\nprint(json.dumps(1))",
            &[name],
        );
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}
