//! A throwaway S3 stand-in for the tests: PyPI `moto[server]`'s `moto_server` from the venv that
//! `scripts/setup-mlflow.sh` makes (pinned), on 127.0.0.1 and a free port, with a small minimum
//! part size (4 KiB) so a small model file goes up in parts; stopped (its process group) on
//! drop. A missing `moto_server` fails the test with what to run. [`MotoServer::start_with_iam`]
//! turns moto's IAM authentication on, so keys and signatures are checked as S3 checks them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::mlflow::venv;

/// The access key the tests give a moto that accepts any ([`MotoServer::start_with_iam`] uses
/// the key moto's IAM makes instead).
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
    /// The access key id and secret of [`MotoServer::env`].
    pub key: String,
    pub secret: String,
}

/// Run through moto's unchecked first calls ([`MotoServer::start_with_iam`]): IAM user `bccp`
/// with an access key and a policy allowing every S3 action; prints the key.
const MAKE_IAM_USER: &str = r#"
iam = boto3.client('iam', region_name='us-east-1')
iam.create_user(UserName='bccp')
key = iam.create_access_key(UserName='bccp')['AccessKey']
iam.put_user_policy(UserName='bccp', PolicyName='s3', PolicyDocument=json.dumps({
    'Version': '2012-10-17',
    'Statement': [{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}]}))
print(json.dumps([key['AccessKeyId'], key['SecretAccessKey']]))
"#;

impl MotoServer {
    /// Starts `moto_server` (any key accepted) and waits until it answers.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Starts `moto_server` with IAM authentication: after the three calls that create IAM
    /// user `bccp`, its access key and its S3 policy, every call must be signed with a key of
    /// moto's IAM (unknown key ids are refused with `InvalidAccessKeyId`, wrong signatures with
    /// `SignatureDoesNotMatch`). [`MotoServer::env`] then gives that user's key.
    pub fn start_with_iam() -> Self {
        let mut server = Self::launch(Some(3));
        let got = server.python(MAKE_IAM_USER, &[]);
        let (key, secret): (String, String) = serde_json::from_value(got).unwrap();
        server.key = key;
        server.secret = secret;
        server
    }

    /// Starts the server; `free_calls`: moto's `INITIAL_NO_AUTH_ACTION_COUNT` (IAM
    /// authentication after that many calls), none for no authentication.
    fn launch(free_calls: Option<u32>) -> Self {
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
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap());
        if let Some(n) = free_calls {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap();
        let mut server = Self {
            child,
            log,
            port,
            key: KEY.to_owned(),
            secret: SECRET.to_owned(),
        };
        let started = Instant::now();
        loop {
            // With authentication on, every request counts against the free calls: listening
            // is enough then.
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && (free_calls.is_some()
                    || ureq::get(&server.endpoint())
                        .timeout(Duration::from_secs(2))
                        .call()
                        .is_ok())
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
            ("AWS_ACCESS_KEY_ID", self.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("BCCP_S3_PART_SIZE", PART_SIZE.to_string()),
        ]
    }

    /// Runs a Python snippet with boto3 (`s3` is a client of this server; `argv[1:]` are
    /// `args`) and parses the JSON it prints last.
    pub fn python(&self, code: &str, args: &[&str]) -> serde_json::Value {
        let prelude = "import boto3, json, sys\ns3 = boto3.client('s3')\n";
        let mut python = Command::new(super::mlflow::python());
        python
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .args(args)
            .envs(self.env());
        super::process::python_json(python)
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
        super::process::stop_group(&mut self.child);
    }
}
