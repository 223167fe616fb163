//! The `Store` trait against both back-ends (SQLite and a throwaway PostgreSQL server): the
//! same behavioural body runs on each; plus the faults of each back-end (a busy SQLite file, a
//! PostgreSQL connection killed mid-stream).

mod common;

use std::time::{Duration, Instant};

use bccp::store::{
    NewPrediction, NewRetrain, NewSample, RetrainOutcome, SampleFilter, SampleStatus, Split, Store,
    RUNNING, SCHEMA_VERSION,
};
use common::pg::{Backend, TestDb};

fn sample(key: &str, label: i64, source: &str, split: Split) -> NewSample {
    NewSample {
        key: key.into(),
        timestamp: "2024-01-01T09:00:00Z".into(),
        image_path: format!("/data/{key}.png"),
        sha256: Some(format!("{key:0>64}")),
        label_given: label,
        label_true: Some((label + 1) % 3),
        source: source.into(),
        split,
        status: SampleStatus::Accepted,
    }
}

fn samples_round_trip(db: &TestDb) {
    let mut store = db.open();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.max_sample_id().unwrap(), 0);
    let mut rejected = sample("bad", 0, "ingest", Split::Train);
    rejected.status = SampleStatus::Rejected("undecodable: /data/bad.png".into());
    rejected.label_true = None;
    let rows = vec![
        sample("a", 0, "monday", Split::Train),
        sample("b", 1, "monday", Split::Gate),
        sample("c", 2, "tuesday", Split::Gate),
        rejected,
    ];
    let ids = store.insert_samples(&rows).unwrap();
    assert!(ids.iter().all(Option::is_some), "{ids:?}");
    let ids: Vec<i64> = ids.into_iter().flatten().collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    // A batch repeating a stored key and a key twice: those rows are not inserted again.
    let again = store
        .insert_samples(&[
            sample("a", 0, "monday", Split::Train),
            sample("d", 1, "tuesday", Split::Train),
            sample("d", 1, "tuesday", Split::Train),
        ])
        .unwrap();
    assert!(
        again[0].is_none() && again[1].is_some() && again[2].is_none(),
        "{again:?}"
    );
    assert_eq!(store.count_samples(&SampleFilter::default()).unwrap(), 5);

    // Read back exactly.
    let all = store.samples(&SampleFilter::default(), 100).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].key, "a");
    assert_eq!(all[0].timestamp, "2024-01-01T09:00:00Z");
    assert_eq!(all[0].image_path, "/data/a.png");
    assert_eq!(all[0].label_given, 0);
    assert_eq!(all[0].label_true, Some(1));
    assert_eq!(all[0].label_verified, None);
    assert_eq!(all[1].split, Split::Gate);
    assert_eq!(
        all[3].status,
        SampleStatus::Rejected("undecodable: /data/bad.png".into())
    );
    assert_eq!(all[3].label_true, None);

    // Filters: a watermark, the gate set per day, accepted only, limits.
    let since = store.samples(&SampleFilter::since(ids[1]), 100).unwrap();
    assert_eq!(
        since.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
        ["c", "d"]
    );
    let gate = store
        .samples(&SampleFilter::gate(Some("tuesday")), 100)
        .unwrap();
    assert_eq!(gate.len(), 1);
    assert_eq!(gate[0].key, "c");
    assert_eq!(store.count_samples(&SampleFilter::gate(None)).unwrap(), 2);
    let rejected_only = SampleFilter {
        accepted: Some(false),
        ..SampleFilter::default()
    };
    assert_eq!(store.count_samples(&rejected_only).unwrap(), 1);
    assert_eq!(store.samples(&SampleFilter::default(), 2).unwrap().len(), 2);
    assert_eq!(store.max_sample_id().unwrap(), all[4].id);

    // A verified label makes an ingested sample trusted.
    assert!(store.set_verified_label(ids[3], 2).unwrap());
    assert!(!store.set_verified_label(9_999_999, 2).unwrap());
    let trusted = SampleFilter {
        trusted: true,
        source: Some("ingest".into()),
        ..SampleFilter::default()
    };
    let v = store.samples(&trusted, 10).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].label_verified, v[0].best_label()), (Some(2), 2));

    // Hashes known to the store.
    let known = store
        .known_hashes(&[format!("{:0>64}", "a"), "f".repeat(64)])
        .unwrap();
    assert_eq!(known.len(), 1);
    assert!(known.contains(&format!("{:0>64}", "a")));

    // Classes: indexes in order of first appearance, stable.
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        store.ensure_classes(&names(&["cat", "dog"])).unwrap(),
        [0, 1]
    );
    assert_eq!(
        store.ensure_classes(&names(&["dog", "emu"])).unwrap(),
        [1, 2]
    );
    assert_eq!(store.classes().unwrap(), names(&["cat", "dog", "emu"]));

    // Text that a bulk format must escape comes back as it went in.
    let mut odd = sample("e\\\t\u{e9}", 0, "tuesday", Split::Train);
    odd.image_path = "/data/a\tb\\c\nd\re \u{1F600}.png".into();
    odd.status = SampleStatus::Rejected("line 1\nline 2\\N".into());
    odd.label_true = None;
    let id = store.insert_samples(std::slice::from_ref(&odd)).unwrap()[0].unwrap();
    let after = SampleFilter {
        after_id: id - 1,
        ..SampleFilter::default()
    };
    let back = store.samples(&after, 10).unwrap();
    assert_eq!(
        (
            back[0].key.as_str(),
            back[0].image_path.as_str(),
            &back[0].status,
            back[0].label_true
        ),
        (odd.key.as_str(), odd.image_path.as_str(), &odd.status, None)
    );

    // A new connection sees everything committed.
    drop(store);
    assert_eq!(
        db.open().count_samples(&SampleFilter::default()).unwrap(),
        6
    );
}

fn predictions_retrains_and_offsets(db: &TestDb) {
    let mut store = db.open();
    let ids = store
        .insert_samples(&[sample("a", 0, "monday", Split::Train)])
        .unwrap();
    let p = NewPrediction {
        timestamp: "2024-01-02T10:00:00Z".into(),
        sample_id: ids[0],
        request_id: Some("req-1".into()),
        model: "fashion-mnist-bccp".into(),
        version: 3,
        class: 7,
        probability: 0.875,
        latency_ms: 4.5,
    };
    let q = NewPrediction {
        sample_id: None,
        request_id: None,
        ..p.clone()
    };
    let pids = store.insert_predictions(&[p.clone(), q.clone()]).unwrap();
    assert_eq!(pids.len(), 2);
    let read = store.predictions(0, 10).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!((read[0].id, &read[0].prediction), (pids[0], &p));
    assert_eq!(read[1].prediction, q);
    assert_eq!(store.predictions(pids[0], 10).unwrap().len(), 1);

    assert_eq!(store.last_retrain().unwrap(), None);
    assert_eq!(store.offset("retrain").unwrap(), None);
    let id = store
        .start_retrain(&NewRetrain {
            started: "2024-01-02T11:00:00Z".into(),
            trigger: "min-new 1".into(),
            champion: None,
        })
        .unwrap();
    let running = store.last_retrain().unwrap().unwrap();
    assert_eq!((running.id, running.decision.as_str()), (id, RUNNING));
    assert_eq!((running.finished, running.watermark), (None, None));
    // A cycle that never finishes (killed) leaves the offsets where they were.
    assert_eq!(store.offset("retrain").unwrap(), None);

    let reasons = serde_json::json!({"gate": {"monday": 0.91, "tuesday": 0.84}, "margin": 0.01});
    let outcome = RetrainOutcome {
        finished: "2024-01-02T11:05:00Z".into(),
        challenger: Some("m@2".into()),
        champion: Some("m@2".into()),
        decision: "promoted".into(),
        reasons: reasons.clone(),
        watermark: ids[0],
    };
    store
        .finish_retrain(id, &outcome, &[("retrain", ids[0].unwrap()), ("other", 5)])
        .unwrap();
    let done = store.last_retrain().unwrap().unwrap();
    assert_eq!(done.finished.as_deref(), Some("2024-01-02T11:05:00Z"));
    assert_eq!(done.started, "2024-01-02T11:00:00Z");
    assert_eq!(done.decision, "promoted");
    assert_eq!(done.reasons, reasons);
    assert_eq!(done.watermark, ids[0]);
    assert_eq!(store.offset("retrain").unwrap(), ids[0]);
    assert_eq!(store.offset("other").unwrap(), Some(5));

    // Finishing an unknown cycle fails and moves no offset.
    let err = store
        .finish_retrain(id + 100, &outcome, &[("retrain", 999)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no retrain with id"), "{err}");
    assert_eq!(store.offset("retrain").unwrap(), ids[0]);

    store.set_offset("retrain", 42).unwrap();
    assert_eq!(store.offset("retrain").unwrap(), Some(42));
    assert_eq!(store.retrains().unwrap().len(), 1);
}

/// The reference's view: exactly `(id, timestamp, image_path, target)`, accepted rows only,
/// target = the label given.
fn reference_view(db: &TestDb) {
    let mut store = db.open();
    let mut bad = sample("bad", 1, "ingest", Split::Train);
    bad.status = SampleStatus::Rejected("undecodable: x".into());
    store
        .insert_samples(&[sample("a", 2, "monday", Split::Train), bad])
        .unwrap();
    store.create_reference_view("fashion_mnist").unwrap();
    // Again (a second generator run): replaced, not an error.
    store.create_reference_view("fashion_mnist").unwrap();
    let err = store
        .create_reference_view("x; DROP TABLE samples")
        .unwrap_err();
    assert!(err.to_string().contains("view name"), "{err}");
    let path = db.dir.path().join("store.sqlite3");
    let (columns, rows): (Vec<String>, Vec<(i64, String, i64)>) = match db.backend {
        Backend::Sqlite => {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let mut stmt = conn.prepare("PRAGMA table_info(fashion_mnist)").unwrap();
            let columns = stmt
                .query_map([], |r| r.get::<_, String>(1))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let mut stmt = conn
                .prepare("SELECT id, image_path, target FROM fashion_mnist")
                .unwrap();
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            (columns, rows)
        }
        Backend::Postgres => {
            let mut client = db.server.as_ref().unwrap().client("bccp_test");
            let columns = client
                .query(
                    "SELECT column_name::text FROM information_schema.columns \
                     WHERE table_name = 'fashion_mnist' ORDER BY ordinal_position",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let rows = client
                .query(
                    "SELECT id, image_path, target::bigint, timestamp::text FROM fashion_mnist",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            (columns, rows)
        }
    };
    assert_eq!(columns, ["id", "timestamp", "image_path", "target"]);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("/data/a.png", 2));
}

/// A database at schema version 1 (before `classes` and `label_verified`) is migrated on open,
/// its rows kept; a database newer than this build is refused with a clear error.
fn migration_from_an_older_schema(db: &TestDb) {
    let url = bccp::store::DbUrl::parse(&db.url).unwrap();
    {
        let mut old = bccp::store::open_at_version(&url, 1).unwrap();
        assert_eq!(old.schema_version().unwrap(), 1);
        old.insert_samples(&[sample("old", 1, "monday", Split::Train)])
            .unwrap();
        // The v2 table does not exist yet.
        assert!(old.classes().is_err());
    }
    let mut store = db.open();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let rows = store.samples(&SampleFilter::default(), 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].key.as_str(), rows[0].label_verified),
        ("old", None)
    );
    assert!(store.set_verified_label(rows[0].id, 0).unwrap());
    assert_eq!(store.ensure_classes(&["a".to_string()]).unwrap(), [0]);
    drop(store);
    // Opening again changes nothing.
    assert_eq!(db.open().schema_version().unwrap(), SCHEMA_VERSION);

    // A newer schema than this build knows.
    match db.backend {
        Backend::Sqlite => {
            let conn = rusqlite::Connection::open(db.dir.path().join("store.sqlite3")).unwrap();
            conn.execute(
                "INSERT INTO schema_version (version, applied) VALUES (99, 'x')",
                [],
            )
            .unwrap();
        }
        Backend::Postgres => {
            db.server
                .as_ref()
                .unwrap()
                .client("bccp_test")
                .execute(
                    "INSERT INTO schema_version (version, applied) VALUES (99, 'x')",
                    &[],
                )
                .unwrap();
        }
    }
    let err = bccp::store::open(&url).err().unwrap().to_string();
    assert!(
        err.contains("schema version 99") && err.contains("newer"),
        "{err}"
    );
}

on_both_backends!(
    samples_round_trip,
    predictions_retrains_and_offsets,
    reference_view,
    migration_from_an_older_schema,
    bulk_load_builds_its_indexes_at_the_end,
    bulk_load_of_big_batches_keeps_arrival_order_and_skips_stored_keys,
);

/// Another connection holds SQLite's write lock for 600 ms while the store (busy timeout
/// 20 ms) inserts: the insert is retried with back-off and succeeds, not an error.
#[test]
fn busy_sqlite_is_retried_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let mut store =
        bccp::store::SqliteStore::open_with(&path, Duration::from_millis(20), SCHEMA_VERSION)
            .unwrap();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            tx.execute("INSERT INTO classes (idx, name) VALUES (0, 'held')", [])
                .unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(600));
            tx.commit().unwrap();
        })
    };
    locked_rx.recv().unwrap();
    let start = Instant::now();
    let ids = store
        .insert_samples(&[sample("a", 0, "monday", Split::Train)])
        .unwrap();
    let waited = start.elapsed();
    holder.join().unwrap();
    assert!(ids[0].is_some());
    assert!(
        store.stats().retries > 0,
        "the insert should have met the lock: {:?}",
        store.stats()
    );
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert_eq!(store.classes().unwrap(), ["held"]);
}

/// The indexes of `samples` in the store `url` (of `db`'s server), sorted.
fn sample_indexes(db: &TestDb, url: &str) -> Vec<String> {
    match &db.server {
        None => {
            let conn = rusqlite::Connection::open(url.trim_start_matches("sqlite:")).unwrap();
            let mut stmt = conn
                .prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'samples' \
                     AND name NOT LIKE 'sqlite_autoindex%' ORDER BY name",
                )
                .unwrap();
            let names = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
            names.map(Result::unwrap).collect()
        }
        Some(server) => {
            let name = url.rsplit('/').next().unwrap();
            let rows = server
                .client(name)
                .query(
                    "SELECT indexname::TEXT FROM pg_indexes WHERE tablename = 'samples' \
                     AND indexname IN ('samples_sha256', 'samples_source_split') ORDER BY 1",
                    &[],
                )
                .unwrap();
            rows.iter().map(|r| r.get(0)).collect()
        }
    }
}

fn bulk_load_builds_its_indexes_at_the_end(db: &TestDb) {
    let all = ["samples_sha256", "samples_source_split"];
    let rows = |from: usize| -> Vec<NewSample> {
        (from..from + 3)
            .map(|i| sample(&format!("k{i}"), 1, "monday", Split::Train))
            .collect()
    };
    let mut store = db.open();
    assert_eq!(sample_indexes(db, &db.url), all);
    // Into the empty table: the content-hash and source/split indexes wait for the end.
    assert!(store.begin_bulk_load().unwrap());
    assert!(sample_indexes(db, &db.url).is_empty());
    store.insert_samples(&rows(0)).unwrap();
    // The key still skips a duplicate, and queries stay right without the indexes.
    assert_eq!(store.insert_samples(&rows(0)).unwrap(), [None, None, None]);
    let hash = format!("{:0>64}", "k1");
    let known = store.known_hashes(std::slice::from_ref(&hash)).unwrap();
    assert!(known.contains(&hash));
    store.end_bulk_load().unwrap();
    assert_eq!(sample_indexes(db, &db.url), all);
    // Into a table with rows: nothing is deferred.
    assert!(!store.begin_bulk_load().unwrap());
    store.insert_samples(&rows(3)).unwrap();
    assert_eq!(sample_indexes(db, &db.url), all);
    store.end_bulk_load().unwrap();
    drop(store);

    // A bulk load that never ends (a crash): the next open builds what is missing.
    let url = db.another("crashed");
    let mut store = common::pg::open(&url);
    assert!(store.begin_bulk_load().unwrap());
    store.insert_samples(&rows(0)).unwrap();
    drop(store);
    assert!(sample_indexes(db, &url).is_empty());
    let mut store = common::pg::open(&url);
    assert_eq!(sample_indexes(db, &url), all);
    assert_eq!(store.count_samples(&SampleFilter::default()).unwrap(), 3);
}

/// Batches big enough that PostgreSQL splits them over two connections: every row is stored
/// once, ids follow the rows' order across the halves, and a batch holding a stored key (in
/// either half) or a key twice still stores the others, as an ordinary batch does.
fn bulk_load_of_big_batches_keeps_arrival_order_and_skips_stored_keys(db: &TestDb) {
    let keys = |from: usize, n: usize| -> Vec<String> {
        (from..from + n).map(|i| format!("b{i:05}")).collect()
    };
    let rows = |keys: &[String]| -> Vec<NewSample> {
        keys.iter()
            .map(|k| sample(k, 1, "monday", Split::Train))
            .collect()
    };
    let ascending = |ids: &[Option<i64>]| {
        let ids: Vec<i64> = ids.iter().flatten().copied().collect();
        ids.windows(2).all(|w| w[0] < w[1])
    };
    let mut store = db.open();
    assert!(store.begin_bulk_load().unwrap());
    if let Some(server) = &db.server {
        // The second connection of the load.
        let name = db.url.rsplit('/').next().unwrap();
        let connections: i64 = server
            .client(name)
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'bccp'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(connections, 2);
    }
    let first = keys(0, 5000);
    let ids = store.insert_samples(&rows(&first)).unwrap();
    assert!(ids.iter().all(Option::is_some) && ascending(&ids));
    if let Some(server) = &db.server {
        // Two transactions wrote the batch: one half each.
        let name = db.url.rsplit('/').next().unwrap();
        let halves: Vec<i64> = server
            .client(name)
            .query(
                "SELECT COUNT(*) FROM samples GROUP BY xmin::text ORDER BY MIN(id)",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(halves, [2500, 2500]);
    }

    // A stored key in the second half, then one in the first half, and a key twice.
    let mut second = keys(5000, 4000);
    second[3500] = first[10].clone();
    let ids = store.insert_samples(&rows(&second)).unwrap();
    assert_eq!(ids.iter().filter(|id| id.is_none()).count(), 1);
    assert!(ids[3500].is_none() && ascending(&ids));
    let mut third = keys(9000, 3000);
    third[5] = first[20].clone();
    third[2999] = third[2998].clone();
    let ids = store.insert_samples(&rows(&third)).unwrap();
    assert!(ids[5].is_none() && ids[2998].is_some() && ids[2999].is_none());
    assert!(ascending(&ids));
    store.end_bulk_load().unwrap();

    assert_eq!(
        sample_indexes(db, &db.url),
        ["samples_sha256", "samples_source_split"]
    );
    // Arrival order is id order.
    let stored: Vec<String> = store
        .samples(&SampleFilter::default(), usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    let mut expected = first.clone();
    expected.extend(second.iter().filter(|k| **k != first[10]).cloned());
    expected.extend(
        third
            .iter()
            .take(2999)
            .filter(|k| **k != first[20])
            .cloned(),
    );
    assert_eq!(stored.len(), 5000 + 3999 + 2998);
    assert_eq!(stored, expected);
}

/// While batches are inserted, another connection keeps terminating the store's backend
/// (`pg_terminate_backend`): the store reconnects and retries, and in the end every row is
/// there exactly once.
#[test]
fn postgres_connection_killed_mid_stream_loses_and_duplicates_nothing() {
    let db = TestDb::new(Backend::Postgres);
    let server = db.server.as_ref().unwrap();
    let url = format!("{}?application_name=bccp-victim", db.url);
    let mut store = common::pg::open(&url);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let mut client = server.client("bccp_test");
        let done = done.clone();
        std::thread::spawn(move || {
            let mut kills = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let rows = client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = 'bccp-victim'",
                        &[],
                    )
                    .unwrap();
                kills += rows.len() as u64;
                std::thread::sleep(Duration::from_millis(40));
            }
            kills
        })
    };
    let (batches, per_batch) = (60, 50);
    for b in 0..batches {
        let rows: Vec<NewSample> = (0..per_batch)
            .map(|k| sample(&format!("{b}-{k}"), k % 3, "tuesday", Split::Train))
            .collect();
        store.insert_samples(&rows).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.join().unwrap();
    assert!(kills > 0, "the killer never found the connection");
    assert!(
        store.stats().reconnects > 0,
        "no reconnect after {kills} kills: {:?}",
        store.stats()
    );
    let mut check = server.client("bccp_test");
    let row = check
        .query_one("SELECT COUNT(*), COUNT(DISTINCT ikey) FROM samples", &[])
        .unwrap();
    let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((n, distinct), (batches * per_batch, batches * per_batch));
}

/// Another writer stores key "x" while a batch of "x" and "y" is being inserted: the batch's
/// look-up did not see "x" (not yet committed), its plain insert waits on the other writer's
/// key and fails once that commits; the batch then skips "x" and inserts "y", as if "x" had
/// been stored before it started.
#[test]
fn postgres_batch_racing_another_writer_skips_its_key() {
    let db = TestDb::new(Backend::Postgres);
    let server = db.server.as_ref().unwrap();
    let mut other = server.client("bccp_test");
    let mut store = common::pg::open(&format!("{}?application_name=bccp-racer", db.url));
    let mut tx = other.transaction().unwrap();
    tx.execute(
        "INSERT INTO samples (ikey, timestamp, image_path, label_given, source, split, status) \
         VALUES ('x', now(), '/data/x.png', 0, 'monday', 'train', 'accepted')",
        &[],
    )
    .unwrap();
    let racer = std::thread::spawn(move || {
        let ids = store
            .insert_samples(&[
                sample("x", 1, "monday", Split::Train),
                sample("y", 2, "monday", Split::Train),
            ])
            .unwrap();
        (ids, store.stats())
    });
    // Commit only once the batch waits on the uncommitted key.
    let mut watch = server.client("bccp_test");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = watch
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE application_name = 'bccp-racer' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the batch never waited on the key"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    tx.commit().unwrap();
    let (ids, stats) = racer.join().unwrap();
    assert!(ids[0].is_none() && ids[1].is_some(), "{ids:?}");
    assert_eq!(stats.key_conflicts, 1);
    let rows = server
        .client("bccp_test")
        .query("SELECT ikey, label_given FROM samples ORDER BY ikey", &[])
        .unwrap();
    let stored: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [("x".to_string(), 0), ("y".to_string(), 2)]);
}

/// Another writer holds a lower id, uncommitted, while a higher one is committed: the
/// watermark is returned only once that writer has ended, so the range up to it misses
/// nothing (taking the highest id seen at once would skip the lower one for good).
#[test]
fn postgres_watermark_waits_for_a_writer_with_a_lower_id() {
    let db = TestDb::new(Backend::Postgres);
    let server = db.server.as_ref().unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let mut store = db.open();
    store
        .insert_samples(&[sample("a", 0, "monday", Split::Train)])
        .unwrap();
    let mut other = server.client(&name);
    let mut tx = other.transaction().unwrap();
    let lower: i64 = tx
        .query_one(
            "INSERT INTO samples (ikey, timestamp, image_path, label_given, source, split, status) \
             VALUES ('b', now(), '/data/b.png', 0, 'monday', 'train', 'accepted') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let higher = store
        .insert_samples(&[sample("c", 0, "monday", Split::Train)])
        .unwrap()[0]
        .unwrap();
    assert!(lower < higher);
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let top = store.max_sample_id().unwrap();
        let counted = store
            .count_samples(&SampleFilter {
                up_to_id: Some(top),
                ..SampleFilter::default()
            })
            .unwrap();
        (top, counted, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    tx.commit().unwrap();
    let (top, counted, waited) = reader.join().unwrap();
    assert_eq!(top, higher);
    assert_eq!(counted, 3, "the lower id is inside the watermark's range");
    assert!(
        waited >= Duration::from_millis(250),
        "returned after {waited:?}"
    );
}
