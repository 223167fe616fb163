//! `bccp stream consume|publish` and `bccp serve --kafka` against a real Kafka-compatible
//! broker (`tansu`, started on 127.0.0.1 and a free port by tests/common/kafka.rs), with
//! `kafka-python` as the standard client on the other side: the reference's envelope byte for
//! byte, a round trip between two stores, records a standard client wrote (malformed ones
//! counted and skipped), a consumer killed mid-stream (no loss, no duplicates), a broker gone
//! and back, a broker restarted on S3-backed storage, and predictions published by the server.

#![cfg(feature = "kafka")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bccp::store::{DbUrl, SampleFilter};
use common::kafka::Broker;
use serde_json::{json, Value};

fn open(db: &str) -> Box<dyn bccp::store::Store> {
    bccp::store::open(&DbUrl::parse(db).unwrap()).unwrap()
}

fn sqlite(dir: &Path, name: &str) -> String {
    format!("sqlite:{}", dir.join(name).display())
}

/// `(timestamp, image_path, sha256, label, status)` of every sample, as a set.
fn rows(db: &str) -> BTreeSet<(String, String, Option<String>, i64, String)> {
    open(db)
        .samples(&SampleFilter::default(), usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                s.timestamp,
                s.image_path,
                s.sha256,
                s.label_given,
                s.status.as_str().to_owned(),
            )
        })
        .collect()
}

/// Runs `bccp ARGS` and returns stdout and stderr of a successful run.
fn run(args: &[&str]) -> (String, String) {
    let out = common::bccp(args);
    let stdout = common::success(&out);
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// kafka-python: every record's value of `topic` (all partitions, from the start), as text.
const READ_ALL: &str = r#"
import json, sys
from kafka import KafkaConsumer
c = KafkaConsumer(sys.argv[2], bootstrap_servers=sys.argv[1], auto_offset_reset="earliest",
                  consumer_timeout_ms=4000)
print(json.dumps([m.value.decode() for m in c]))
"#;

/// kafka-python: the committed offsets of group argv[3] on topic argv[2], summed.
const COMMITTED: &str = r#"
import json, sys
from kafka import KafkaConsumer, TopicPartition
c = KafkaConsumer(bootstrap_servers=sys.argv[1], group_id=sys.argv[3], enable_auto_commit=False)
parts = c.partitions_for_topic(sys.argv[2]) or set()
print(json.dumps(sum(c.committed(TopicPartition(sys.argv[2], p)) or 0 for p in parts)))
"#;

/// kafka-python: sends each line of the file argv[3] as a record to topic argv[2] (partition 0).
const SEND_LINES: &str = r#"
import json, sys
from kafka import KafkaProducer
p = KafkaProducer(bootstrap_servers=sys.argv[1], linger_ms=20)
n = 0
for line in open(sys.argv[3], "rb"):
    p.send(sys.argv[2], value=line.rstrip(b"\n"), partition=0)
    n += 1
p.flush()
print(json.dumps(n))
"#;

#[test]
fn publish_then_consume_round_trips_between_two_stores() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let topic = "postgres-source-shop";
    broker.create_topic(topic, 3);
    common::make_folder(&dir.path().join("images"), &[7, 5, 6]);
    let (a, b) = (
        sqlite(dir.path(), "a.sqlite3"),
        sqlite(dir.path(), "b.sqlite3"),
    );
    let images = dir.path().join("images");
    run(&["ingest", "--folder", images.to_str().unwrap(), "--db", &a]);
    // One rejected row in A: not published (the reference's table holds accepted rows).
    std::fs::write(images.join("class0/broken.png"), b"not a png").unwrap();
    run(&["ingest", "--folder", images.to_str().unwrap(), "--db", &a]);
    assert_eq!(rows(&a).len(), 19);
    let brokers = broker.brokers();
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "stream",
            "publish",
            "--brokers",
            &brokers,
            "--topic",
            topic,
            "--samples",
            "--db",
            &a,
            "--idle",
            "1",
        ];
        args.extend_from_slice(extra);
        run(&args).0
    };
    let out = publish(&["--batch-size", "5"]);
    assert!(out.starts_with("published 18 samples"), "{out}");
    assert!(out.contains("position 18"), "{out}");
    // The position is stored: a second run publishes nothing.
    let out = publish(&[]);
    assert!(out.starts_with("published 0 samples"), "{out}");

    let (out, _) = run(&[
        "stream",
        "consume",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--db",
        &b,
        "--idle",
        "3",
    ]);
    assert!(
        out.contains("(group shop-consumer-group)")
            && out.contains("received 18: accepted 18, duplicates 0, rejected 0, malformed 0"),
        "{out}"
    );
    let accepted: BTreeSet<_> = rows(&a).into_iter().filter(|r| r.4 == "accepted").collect();
    assert_eq!(rows(&b), accepted);
    let committed = broker.python(COMMITTED, &[topic, "shop-consumer-group"]);
    assert_eq!(committed, json!(18));
    // Consuming again from the committed offsets: nothing new.
    let (out, _) = run(&[
        "stream",
        "consume",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--db",
        &b,
        "--idle",
        "3",
    ]);
    assert!(out.contains("received 0:"), "{out}");
}

#[test]
fn the_reference_envelope_byte_for_byte_read_by_a_standard_client() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_topic("postgres-source-fashion_mnist", 1);
    let img = dir.path().join("a.png");
    std::fs::write(&img, common::http::png(8, 8, 1)).unwrap();
    let jsonl = dir.path().join("in.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n",
            json!({"path": "a.png", "label": 3, "timestamp": "2024-01-02T03:04:05Z"})
        ),
    )
    .unwrap();
    let db = sqlite(dir.path(), "s.sqlite3");
    run(&["ingest", "--jsonl", jsonl.to_str().unwrap(), "--db", &db]);
    let brokers = broker.brokers();
    for (topic, format) in [
        ("postgres-source-fashion_mnist", "connect-json"),
        ("plain", "json"),
    ] {
        if topic == "plain" {
            broker.create_topic(topic, 1);
        }
        run(&[
            "stream",
            "publish",
            "--brokers",
            &brokers,
            "--topic",
            topic,
            "--samples",
            "--db",
            &db,
            "--format",
            format,
            "--limit",
            "1",
        ]);
    }
    let path = std::path::absolute(&img).unwrap();
    let path = json!(path.to_str().unwrap()).to_string();
    let got = broker.python(READ_ALL, &["postgres-source-fashion_mnist"]);
    assert_eq!(
        got,
        json!([format!(
            concat!(
                r#"{{"schema":{{"type":"struct","fields":["#,
                r#"{{"type":"int32","optional":false,"field":"id"}},"#,
                r#"{{"type":"string","optional":true,"field":"timestamp"}},"#,
                r#"{{"type":"string","optional":true,"field":"image_path"}},"#,
                r#"{{"type":"int32","optional":true,"field":"target"}}],"#,
                r#""optional":false,"name":"fashion_mnist"}},"#,
                r#""payload":{{"id":1,"timestamp":"2024-01-02 03:04:05.0","image_path":{},"target":3}}}}"#
            ),
            path
        )])
    );
    let plain = broker.python(READ_ALL, &["plain"]);
    assert_eq!(
        plain,
        json!([format!(
            r#"{{"id":1,"timestamp":"2024-01-02 03:04:05.0","image_path":{path},"target":3}}"#
        )])
    );
}

#[test]
fn records_of_a_standard_client_are_ingested_and_malformed_ones_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let topic = "postgres-source-cams";
    broker.create_topic(topic, 1);
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("imgs")).unwrap();
    for k in 0..5u8 {
        std::fs::write(
            root.join(format!("imgs/{k}.png")),
            common::http::png(9, 7, k),
        )
        .unwrap();
    }
    std::fs::copy(root.join("imgs/0.png"), root.join("imgs/copy.png")).unwrap();
    let record = |id: i64, path: &str, target: Value| {
        json!({
            "schema": {"type": "struct", "fields": [], "optional": false, "name": "cams"},
            "payload": {"id": id, "timestamp": "2024-05-06 07:08:09.5", "image_path": path,
                        "target": target}
        })
        .to_string()
    };
    let mut lines: Vec<String> = (0..5)
        .map(|k| record(k + 1, &format!("imgs/{k}.png"), json!(k % 3)))
        .collect();
    lines.push("{not json".into()); // offset 5
    lines.push(json!({"id": 7, "image_path": "imgs/1.png", "target": 1}).to_string()); // 6
    lines.push(record(8, "imgs/2.png", json!(-2))); // offset 7
    lines.push(record(9, "imgs/missing.png", json!(1))); // rejected: unreadable
    lines.push(record(10, "imgs/copy.png", json!(0))); // same content as imgs/0.png
    let file = dir.path().join("records.txt");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    assert_eq!(
        broker.python(SEND_LINES, &[topic, file.to_str().unwrap()]),
        json!(10)
    );
    let db = sqlite(dir.path(), "s.sqlite3");
    let (out, err) = run(&[
        "stream",
        "consume",
        "--brokers",
        &broker.brokers(),
        "--topic",
        topic,
        "--db",
        &db,
        "--image-root",
        root.to_str().unwrap(),
        "--idle",
        "3",
        "--source",
        "cams",
    ]);
    assert!(
        out.contains(
            "received 10: accepted 5, duplicates 1, rejected 1 (unreadable 1), malformed 3"
        ),
        "{out}"
    );
    for (offset, why) in [(5, "not JSON"), (6, "payload"), (7, "target -2")] {
        let line = format!("malformed record {topic}/0@{offset} skipped:");
        assert!(
            err.lines().any(|l| l.contains(&line) && l.contains(why)),
            "{line} {why}: {err}"
        );
    }
    let stored = open(&db).samples(&SampleFilter::default(), 100).unwrap();
    assert_eq!(stored.len(), 6);
    let first = &stored[0];
    assert_eq!(first.timestamp, "2024-05-06T07:08:09Z");
    assert_eq!(first.label_given, 0);
    assert_eq!(first.source, "cams");
    assert_eq!(
        Path::new(&first.image_path),
        std::path::absolute(root.join("imgs/0.png")).unwrap()
    );
    assert_eq!(
        first.key,
        format!("content:{}", first.sha256.as_deref().unwrap())
    );
    assert_eq!(stored[5].key, format!("kafka:{topic}:0:8"));
    let labels: Vec<i64> = stored.iter().map(|s| s.label_given).collect();
    assert_eq!(labels, [0, 1, 2, 0, 1, 1]);
    assert!(stored[5].image_path.ends_with("missing.png"));
    assert!(matches!(
        stored[5].status,
        bccp::store::SampleStatus::Rejected(ref r) if r.starts_with("unreadable")
    ));
}

/// Writes `n` distinct small PNGs under `dir` and a file of their Connect records (relative
/// paths); returns the record file.
fn many_records(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("imgs")).unwrap();
    let mut lines = String::new();
    for k in 0..n {
        let img = image::RgbImage::from_fn(4, 4, |x, y| {
            image::Rgb([(k % 256) as u8, (k / 256) as u8, (x * 4 + y) as u8])
        });
        let rel = format!("imgs/{k}.png");
        img.save(dir.join(&rel)).unwrap();
        lines.push_str(
            &json!({"schema": {"type": "struct"},
                    "payload": {"id": k + 1, "timestamp": "2024-01-01 00:00:00.0",
                                "image_path": rel, "target": k % 10}})
            .to_string(),
        );
        lines.push('\n');
    }
    let file = dir.join("records.txt");
    std::fs::write(&file, lines).unwrap();
    file
}

/// Starts `bccp stream consume` in the background.
fn consumer(brokers: &str, topic: &str, db: &str, root: &Path) -> std::process::Child {
    consumer_with(brokers, topic, db, root, "250", "4")
}

/// `bccp stream consume` with batches of `batch` records, ending after `idle` seconds without
/// one.
fn consumer_with(
    brokers: &str,
    topic: &str,
    db: &str,
    root: &Path,
    batch: &str,
    idle: &str,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args([
            "--quiet",
            "stream",
            "consume",
            "--brokers",
            brokers,
            "--topic",
            topic,
        ])
        .args(["--db", db, "--image-root", root.to_str().unwrap()])
        .args(["--batch-size", batch, "--idle", idle])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn count(db: &str) -> u64 {
    open(db)
        .count_samples(&SampleFilter::default())
        .unwrap_or(0)
}

/// Image paths of the store, each once, and whether any came twice.
fn assert_each_once(db: &str, root: &Path, n: usize) {
    let stored = open(db)
        .samples(&SampleFilter::default(), usize::MAX)
        .unwrap();
    let paths: BTreeSet<String> = stored.iter().map(|s| s.image_path.clone()).collect();
    assert_eq!(stored.len(), n, "rows");
    assert_eq!(paths.len(), n, "distinct images");
    let want: BTreeSet<String> = (0..n)
        .map(|k| {
            std::path::absolute(root.join(format!("imgs/{k}.png")))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(paths, want);
}

#[test]
fn a_consumer_killed_mid_stream_loses_and_duplicates_nothing() {
    let n = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let topic = "postgres-source-big";
    broker.create_topic(topic, 1);
    let file = many_records(dir.path(), n);
    assert_eq!(
        broker.python(SEND_LINES, &[topic, file.to_str().unwrap()]),
        json!(n)
    );
    let db = sqlite(dir.path(), "s.sqlite3");
    let brokers = broker.brokers();
    let mut first = consumer(&brokers, topic, &db, dir.path());
    let started = Instant::now();
    while count(&db) < 2000 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the consumer stored {} rows in 120 s",
            count(&db)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = count(&db);
    assert!(at_kill < n as u64, "killed after the end ({at_kill})");
    let second = consumer(&brokers, topic, &db, dir.path())
        .wait_with_output()
        .unwrap();
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_each_once(&db, dir.path(), n);
    assert_eq!(
        broker.python(COMMITTED, &[topic, "big-consumer-group"]),
        json!(n)
    );
    // The restarted consumer read what had no committed offset: at most the rows not stored
    // at the kill plus the one batch stored but not yet committed.
    let received: u64 = out
        .split("received ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        received >= n as u64 - at_kill && received <= n as u64 - at_kill + 250,
        "{received} after {at_kill}: {out}"
    );
}

#[test]
fn a_broker_gone_mid_stream_is_retried_and_the_stream_resumes() {
    // The broker drops out of reach (every connection cut, new ones refused) and comes back
    // with its data; the consumer keeps retrying and goes on from where it was.
    let mut broker = Broker::start_behind_proxy();
    outage_mid_stream(&mut broker, "gone", |b| b.cut(), |b| b.restore());
}

#[test]
fn a_broker_restarted_mid_stream_keeps_the_stream_exactly_once() {
    // The broker process is killed and started again on the same storage (an S3 stand-in):
    // topics, records and committed offsets come back, and the consumer resumes.
    let moto = common::s3::MotoServer::start();
    let mut broker = Broker::start_on_s3(&moto, "tansu");
    outage_mid_stream(&mut broker, "restart", Broker::kill, Broker::restart);
}

/// 3000 records through a consumer while the broker has an outage (`down`, 4 s, `up`) after
/// the first 300 are stored: the consumer waits it out with warnings, then every record is
/// stored exactly once and the group's committed offsets reach the end.
fn outage_mid_stream(
    broker: &mut Broker,
    name: &str,
    down: impl Fn(&mut Broker),
    up: impl Fn(&mut Broker),
) {
    let n = 3000;
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("postgres-source-{name}");
    broker.create_topic(&topic, 1);
    let file = many_records(dir.path(), n);
    broker.python(SEND_LINES, &[&topic, file.to_str().unwrap()]);
    let db = sqlite(dir.path(), "s.sqlite3");
    let brokers = broker.brokers();
    // Idle time counts while the broker is away too: well past the 4 s outage plus the
    // reconnection back-off on a loaded machine (8 s was seen to end the run early).
    let mut child = consumer_with(&brokers, &topic, &db, dir.path(), "100", "30");
    let started = Instant::now();
    while count(&db) < 300 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    down(broker);
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "the consumer gave up");
    // What was prefetched before the outage is stored; the rest needs the broker back.
    let during = count(&db);
    assert!(during < n as u64, "all {during} stored without the broker");
    up(broker);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("warning: kafka:"), "{stderr}");
    assert_each_once(&db, dir.path(), n);
    assert_eq!(
        broker.python(COMMITTED, &[&topic, &format!("{name}-consumer-group")]),
        json!(n)
    );
}

#[test]
fn serve_publishes_every_prediction_and_the_store_s_predictions_follow() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_topic("preds", 1);
    broker.create_topic("stored-preds", 1);
    let days = common::prepared_small(dir.path());
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    common::success(&common::quick_train(&days, &runs, &cache, "m", &[]));
    let db = sqlite(dir.path(), "s.sqlite3");
    let kafka = format!("{},preds", broker.brokers());
    let server = common::http::ServeProcess::start(
        &[
            "--model",
            "m",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--image-root",
            days.to_str().unwrap(),
            "--db",
            &db,
            "--device",
            "cpu",
            "--kafka",
            &kafka,
        ],
        &[],
    );
    let mut images: Vec<String> = std::fs::read_dir(days.join("monday/class1"))
        .unwrap()
        .map(|e| format!("monday/class1/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    images.sort();
    images.truncate(5);
    let mut targets = Vec::new();
    for img in &images {
        let reply = common::http::post_json(server.addr, "/predict", &json!({"image_path": img}));
        assert_eq!(reply.status, 200, "{}", reply.text());
        targets.push(reply.json()["target"].as_i64().unwrap());
    }
    assert!(common::http::eventually(Duration::from_secs(20), || {
        common::http::get(server.addr, "/metrics")
            .text()
            .contains("bccp_kafka_predictions_total{result=\"delivered\"} 5")
    }));
    let got = broker.python(READ_ALL, &["preds"]);
    let got: Vec<Value> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::from_str(v.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(got.len(), 5);
    for (record, target) in got.iter().zip(&targets) {
        assert_eq!(record["schema"]["name"], "preds");
        assert_eq!(record["payload"]["target"], *target);
        assert_eq!(record["payload"]["id"], Value::Null);
    }
    let status = server.stop(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    // The predictions the server stored, published from the store in plain JSON.
    let (out, _) = run(&[
        "stream",
        "publish",
        "--brokers",
        &broker.brokers(),
        "--topic",
        "stored-preds",
        "--predictions",
        "--format",
        "json",
        "--db",
        &db,
        "--idle",
        "1",
    ]);
    assert!(out.starts_with("published 5 predictions"), "{out}");
    let stored = broker.python(READ_ALL, &["stored-preds"]);
    let stored: Vec<Value> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::from_str(v.as_str().unwrap()).unwrap())
        .collect();
    let ids: Vec<i64> = stored.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    let mut want = targets.clone();
    want.sort();
    let mut have: Vec<i64> = stored
        .iter()
        .map(|r| r["target"].as_i64().unwrap())
        .collect();
    have.sort();
    assert_eq!(have, want);
    assert!(stored
        .iter()
        .all(|r| r["model"] == "m" && r["version"] == 1));
}
